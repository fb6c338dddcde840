"""NCHW input shapes: the one alias, how they are written and read, and the parity grid.

Export, build and runtime all speak of shapes; they read them from here, so a runtime that checks
an artifact needs nothing of the export code to know which shapes its sweep ran.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from resfuse.contract import InputContract
from resfuse.errors import ConfigError

Shape = tuple[int, int, int, int]

# (batch, H, W) before clamping to the contract: the minimum, sizes that are no multiple of 32,
# a tall and a wide aspect ratio, batch 1 and > 1.
_GRID = ((1, 0, 0), (2, 97, 131), (1, 257, 311), (1, 449, 121), (1, 121, 449), (3, 65, 77))


def format_shape(shape: Sequence[int]) -> str:
    """(1, 3, 512, 512) -> '1x3x512x512', the form every option and table uses."""
    return "x".join(str(d) for d in shape)


def parse_shape(text: str, option: str = "--opt") -> Shape:
    """`1x3x512x512` as a shape; ConfigError naming the text and the form otherwise."""
    parts = text.strip().lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(
            f"{option} {text!r} is not a shape; give NxCxHxW, four positive whole numbers such "
            f"as 1x3x512x512"
        )
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


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


def parity_shapes(contract: InputContract) -> list[Shape]:
    """The grid clamped into the contract, each shape once: the sweep export runs and check
    repeats by default."""
    shapes: list[Shape] = []
    for b, h, w in _GRID:
        shape = (
            contract.batch.clamp(b),
            contract.channels,
            contract.height.clamp(h),
            contract.width.clamp(w),
        )
        if shape not in shapes:
            shapes.append(shape)
    return shapes
