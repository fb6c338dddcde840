"""Plain Markdown tables: readable on a terminal and pasteable into issues and RESULTS.md."""

from __future__ import annotations

import re
from collections.abc import Sequence

from resfuse.errors import ConfigError

Shape = tuple[int, int, int, int]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def parse_shapes(text: str) -> list[Shape]:
    """'1x3x224x224,2x3x257x311' -> [(1, 3, 224, 224), (2, 3, 257, 311)]."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if not re.fullmatch(r"\d+x\d+x\d+x\d+", part):
            raise ConfigError(
                f"shape {part!r} is not BxCxHxW; write e.g. 1x3x224x224, several joined by commas"
            )
        b, c, h, w = (int(d) for d in part.split("x"))
        shapes.append((b, c, h, w))
    if not shapes:
        raise ConfigError("no shapes given; write e.g. --shapes 1x3x224x224,1x3x512x512")
    return shapes


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)
