"""Sliding-window (tiled) inference: an input of any H x W through a backend bounded in H x W.

The input is cut into overlapping tiles of one size (the ROI), the tiles run in batches through
the backend, and each tile's output is blended back into a full-size output on the CPU, weighted
by an importance map: "constant" (every tile counts the same) or "gaussian" (a tile's centre
counts more than its border, where its receptive field was cut). The scheme is MONAI's
`sliding_window_inference` (same weights and, with `align=1`, the same window positions and
padding: tests hold the two to 1e-5), with one change for strided CNNs: windows start on
multiples of the model's stride (`align`), so each tile's feature grid lies on the whole
image's. MONAI moves the last window back to end at the border, wherever that puts it; a
ResNet's features are not invariant to shifts by less than its stride, and on scikit-image's
coffee (400 x 600, 256 tiles, resnet18 stride 32) that shift alone took the tiled features from
14% to 63% relative L2 away from the whole image's. Aligned, the last window ends up to
align - 1 pixels past the border, over zeros.

Memory: the stitched output and one H x W weight map are the only full-size arrays made; the
backend sees tiles only. An image smaller than the ROI is padded with zeros (after
normalisation, as MONAI pads; aligned, at the bottom and right only, so the grid stays put)
and the output cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from resfuse.contract import InputContract
from resfuse.errors import ConfigError

BLENDS = ("constant", "gaussian")
# tiles one image may take: past this an overlap near 1 (0.99 cuts an 8000^2 image into 219,961
# tiles of 512^2) is a mistake that would run for hours, not a plan
MAX_TILES = 10_000
Predict = Callable[[np.ndarray], np.ndarray]  # (n, C, h, w) float32 -> (n, K, h, w) float32


@dataclass(frozen=True)
class Tiling:
    """How to tile: the ROI (tile H, W), the fraction adjacent tiles share, the blend, the
    gaussian's sigma as a fraction of the ROI, how many tiles go to the backend at once, and
    the multiple windows start on (1: MONAI's positions)."""

    roi: tuple[int, int]
    overlap: float = 0.25
    blend: str = "gaussian"
    sigma_scale: float = 0.125
    batch: int = 1
    align: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"tile overlap must be in [0, 1), got {self.overlap}; e.g. 0.25")
        if self.blend not in BLENDS:
            raise ConfigError(f"tile blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        if min(self.roi) < 1 or self.batch < 1 or self.align < 1:
            raise ConfigError(
                f"tile size, batch and align must be positive, got {self.roi}, {self.batch}, "
                f"{self.align}"
            )
        if not self.sigma_scale > 0:
            raise ConfigError(f"tile sigma_scale must be positive, got {self.sigma_scale}")

    def fit(self, contract: InputContract) -> None:
        """Refuse, in one line, a ROI or batch the backend cannot run."""
        h, w = self.roi
        if h not in contract.height or w not in contract.width:
            raise ConfigError(
                f"tile {h}x{w} is outside the backend's H x W range "
                f"{contract.height.describe()} x {contract.width.describe()}; choose a tile in "
                f"that range, or 'auto'"
            )
        if self.batch not in contract.batch:
            raise ConfigError(
                f"{self.batch} tiles per call is outside the backend's batch range "
                f"{contract.batch.describe()}; choose a tile batch in that range"
            )


def parse_tile(text: str) -> tuple[int, int] | str:
    """--tile: 'auto', 'N' (square) or 'HxW'; anything else is a one-line error."""
    if text == "auto":
        return text
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
        h, w = int(parts[0]), int(parts[-1])
        return h, w
    raise ConfigError(f"--tile must be 'auto', a size N or HxW (e.g. 512 or 512x768), got {text!r}")


def window_starts(size: int, roi: int, overlap: float, align: int = 1) -> list[int]:
    """Where the tiles along one axis start: every `roi * (1 - overlap)` pixels, the last one
    moved back to end at the border (MONAI's dense_patch_slices); with `align`, every start a
    multiple of it: the step rounded down, the last start as far back as that allows (it may
    end up to align - 1 pixels past the border). `size` >= `roi`."""
    step = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    if align > 1 and roi >= align:  # a tile below the stride cannot cover on its grid
        step = max(align, step // align * align)
    count = next(d for d in range(math.ceil(size / step)) if d * step + roi >= size) + 1
    if align == 1 or roi < align:
        return [min(d * step, size - roi) for d in range(count)]
    last = -(-(size - roi) // align) * align  # rounded up: the window still reaches the end
    return sorted({min(d * step, last) for d in range(count)})


def importance_map(roi: tuple[int, int], blend: str, sigma_scale: float) -> np.ndarray:
    """The (h, w) float32 weight of each pixel of a tile's output. MONAI's gaussian: the outer
    product of 1-D gaussians with sigma = sigma_scale * side, floored at its own minimum or 1e-3
    so a border pixel covered by one tile only is never divided by zero."""
    if blend == "constant":
        return np.ones(roi, np.float32)
    axes = []
    for side in roi:
        t = np.arange(-(side - 1) / 2.0, (side - 1) / 2.0 + 1, dtype=np.float32)
        sigma = np.float32(side * sigma_scale)
        axes.append(np.exp(t**2 / (np.float32(-2.0) * sigma**2)).astype(np.float32))
    weights = axes[0][:, None] * axes[1][None, :]
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def sliding_window(predict: Predict, x: np.ndarray, tiling: Tiling) -> np.ndarray:
    """The (N, K, H, W) output of `predict` over (N, C, H, W) `x`, one image at a time, its
    tiles in batches of `tiling.batch`, blended on the CPU."""
    return np.concatenate([_one_image(predict, x[i : i + 1], tiling) for i in range(len(x))])


def _one_image(predict: Predict, x: np.ndarray, tiling: Tiling) -> np.ndarray:
    h, w = x.shape[2:]
    rh, rw = tiling.roi
    if tiling.align == 1:
        padded, crop = _pad_centred(x, tiling.roi)
        rows = window_starts(padded.shape[2], rh, tiling.overlap)
        cols = window_starts(padded.shape[3], rw, tiling.overlap)
    else:
        rows = window_starts(max(h, rh), rh, tiling.overlap, tiling.align)
        cols = window_starts(max(w, rw), rw, tiling.overlap, tiling.align)
        padded, crop = _pad_end(x, (rows[-1] + rh, cols[-1] + rw)), (0, 0)
    _check_count(len(rows) * len(cols), (h, w), tiling)
    weights = importance_map(tiling.roi, tiling.blend, tiling.sigma_scale)
    out: np.ndarray | None = None
    total = np.zeros(padded.shape[2:], np.float32)
    for group in _batches([(t, s) for t in rows for s in cols], tiling.batch):
        tiles = np.concatenate([padded[:, :, t : t + rh, s : s + rw] for t, s in group])
        result = np.asarray(predict(np.ascontiguousarray(tiles)), dtype=np.float32)
        if out is None:  # the channel count is the model's to say: known after the first call
            out = np.zeros((1, result.shape[1], *padded.shape[2:]), np.float32)
        for (t, s), tile_out in zip(group, result, strict=True):
            out[0, :, t : t + rh, s : s + rw] += tile_out * weights
            total[t : t + rh, s : s + rw] += weights
    assert out is not None  # at least one tile: size >= roi
    out /= total
    return out[:, :, crop[0] : crop[0] + h, crop[1] : crop[1] + w]


def _check_count(count: int, size: tuple[int, int], tiling: Tiling) -> None:
    if count <= MAX_TILES:
        return
    usual = len(window_starts(max(size[0], tiling.roi[0]), tiling.roi[0], 0.25, tiling.align))
    usual *= len(window_starts(max(size[1], tiling.roi[1]), tiling.roi[1], 0.25, tiling.align))
    raise ConfigError(
        f"a {size[0]}x{size[1]} input in {tiling.roi[0]}x{tiling.roi[1]} tiles at overlap "
        f"{tiling.overlap:g} takes {count:,} tiles, over the limit of {MAX_TILES:,}; lower "
        f"the overlap (0.25 takes {usual:,}) or use larger tiles"
    )


def _pad_centred(x: np.ndarray, roi: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """`x` padded with zeros to at least the ROI, the pad split evenly (the odd pixel after),
    as MONAI pads, and where the image starts in it."""
    pad_h, pad_w = (max(r - s, 0) for r, s in zip(roi, x.shape[2:], strict=True))
    if not (pad_h or pad_w):
        return x, (0, 0)
    top, left = pad_h // 2, pad_w // 2
    spec = ((0, 0), (0, 0), (top, pad_h - top), (left, pad_w - left))
    return np.pad(x, spec), (top, left)


def _pad_end(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`x` padded with zeros at the bottom and right to `size`, so its grid stays put."""
    pad_h, pad_w = (max(n - s, 0) for n, s in zip(size, x.shape[2:], strict=True))
    return np.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w))) if pad_h or pad_w else x


def _batches(items: list[tuple[int, int]], size: int) -> Iterator[list[tuple[int, int]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
