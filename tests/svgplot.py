"""Read a report's plotted values back out of its inline SVG, the way a reader's eye does: each
axis mapped from its tick marks' positions and labels, each series' markers and bars mapped
through it. A report whose plot drifted from its JSON (a wrong series, a wrong axis, a unit
off) reads back different numbers."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from functools import cached_property

import numpy as np

_SVG = "{http://www.w3.org/2000/svg}"
_NUMBERS = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def figures(page: str) -> dict[str, ET.Element]:
    """Each <figure>'s SVG, by its caption's text."""
    found = {}
    for chunk in page.split("<figure>")[1:]:
        title = re.search(r"<h2>(.*?)</h2>", chunk)
        start, end = chunk.find("<svg"), chunk.find("</svg>")
        if title and start >= 0:
            found[title.group(1)] = ET.fromstring(chunk[start : end + len("</svg>")])
    return found


class Axes:
    """Pixel to data along x and y, fitted on the tick marks (a linear axis); an axis is read
    when first used (a bar chart's x ticks are names)."""

    def __init__(self, figure: ET.Element) -> None:
        self.figure = figure

    @cached_property
    def x(self) -> np.ndarray:
        return self._fit(self.figure, "xtick", 0)

    @cached_property
    def y(self) -> np.ndarray:
        return self._fit(self.figure, "ytick", 1)

    @staticmethod
    def _fit(figure: ET.Element, kind: str, along: int) -> np.ndarray:
        pixels, values = [], []
        for tick in figure.iter(f"{_SVG}g"):
            if not re.fullmatch(rf"{kind}_\d+", tick.get("id", "")):
                continue
            mark = next(tick.iter(f"{_SVG}use"))
            label = next(tick.iter(f"{_SVG}text")).text or ""
            pixels.append(float(mark.get("xy"[along]) or 0))
            values.append(float(label.replace("\u2212", "-")))
        assert len(pixels) >= 2, f"fewer than two {kind} labels to read the axis from"
        return np.polyfit(pixels, values, 1)

    def points(self, figure: ET.Element, gid: str) -> list[tuple[float, float]]:
        """The data coordinates of the markers drawn in the series `gid`."""
        group = next(g for g in figure.iter(f"{_SVG}g") if g.get("id") == gid)
        return [
            (
                float(np.polyval(self.x, float(u.get("x") or 0))),
                float(np.polyval(self.y, float(u.get("y") or 0))),
            )
            for u in group.iter(f"{_SVG}use")
        ]

    def bars(self, figure: ET.Element, gid: str) -> list[float]:
        """The heights, in data units, of the bars drawn for `gid` (left to right)."""
        heights = []
        for group in figure.iter(f"{_SVG}g"):
            if group.get("id") != gid:
                continue
            for path in group.iter(f"{_SVG}path"):
                ys = [float(v) for v in _NUMBERS.findall(path.get("d") or "")[1::2]]
                base, top = max(ys), min(ys)
                heights.append(float(np.polyval(self.y, top) - np.polyval(self.y, base)))
        return heights
