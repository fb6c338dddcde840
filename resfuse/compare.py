"""Compare a deployed model's output with its reference, Polygraphy-style error statistics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from resfuse.errors import ConfigError, ParityError


@dataclass(frozen=True)
class Tolerance:
    """What counts as a match. Float models: elementwise |out - ref| <= atol + rtol * |ref|
    (numpy.allclose). A quantized model cannot meet an elementwise bound everywhere, so when
    `max_rel_l2` is set it is judged by its relative L2 error instead; atol and rtol then only
    scale the reported statistics."""

    atol: float = 1e-4
    rtol: float = 1e-4
    max_rel_l2: float | None = None

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0 or (self.max_rel_l2 is not None and self.max_rel_l2 < 0):
            raise ConfigError("tolerances (--atol, --rtol, --max-rel-l2) must not be negative")

    def describe(self) -> str:
        if self.max_rel_l2 is not None:
            return f"rel L2 <= {self.max_rel_l2:g}"
        return f"atol {self.atol:g}, rtol {self.rtol:g}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ErrorStats:
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float  # over elements with |reference| > atol; smaller ones are judged by atol
    rel_l2: float  # ||out - ref|| / ||ref||
    cosine: float
    nonfinite: int  # NaN/Inf in the output
    required_atol: float  # smallest atol that passes at the given rtol
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# np.percentile's default ("linear") p99, taken from the largest differences only.
_P99 = 99 / 100
# Elements per step: float64 temporaries of 2 MiB each, whatever the output's size.
_CHUNK = 1 << 18


def compare_output(
    reference: np.ndarray, output: np.ndarray, tol: Tolerance, image_channels: int | None
) -> ErrorStats:
    """`compare` for a model's NCHW output. A fused output's first `image_channels` channels
    are the image (passed through, or gated) and its features the rest, judged apart and the
    worse part's statistics returned: the image's norm is about 100x the features', so one
    relative L2 over both hid a feature map broken by 30% (an INT8 scale off by 100x)."""
    if image_channels is None:  # a head's logits: one kind of number
        return compare(reference, output, tol)
    parts = (slice(None, image_channels), slice(image_channels, None))
    stats = [compare(reference, output, tol, channels=part) for part in parts]
    return max(stats, key=lambda s: (not s.passed, s.rel_l2))


def compare(
    reference: np.ndarray, output: np.ndarray, tol: Tolerance, channels: slice = slice(None)
) -> ErrorStats:
    """Error statistics of `output` against `reference` (over `channels` of NCHW arrays only),
    judged by `tol`; NaN/Inf always fails. Float64 chunk by chunk: whole float64 copies of a
    1x67x2048x2048 output and its reference would take 4.5 GB, more than the backend that
    computed them; each image's channels are a view, so none is copied whole either."""
    if reference.shape != output.shape:
        raise ParityError(
            f"output shape {output.shape} differs from the reference's {reference.shape}"
        )
    if channels == slice(None):
        pairs = [(reference.reshape(-1), output.reshape(-1))]
    else:
        views = zip(reference, output, strict=True)
        pairs = [(r[channels].reshape(-1), o[channels].reshape(-1)) for r, o in views]
    n = sum(ref.size for ref, _ in pairs)
    low = int((n - 1) * _P99)  # the p99's lower neighbour in sorted order
    step = max(_CHUNK, n - low)  # a step holds the kept tail: each partition stays linear
    sums, maxima, top = [], [], np.empty(0)
    for ref, out in pairs:
        for i in range(0, ref.size, step):
            chunk_sums, chunk_maxima, diff = _chunk_stats(ref[i : i + step], out[i : i + step], tol)
            sums.append(chunk_sums)
            maxima.append(chunk_maxima)
            top = _largest(np.concatenate([top, diff]), n - low)
    (nonfinite, abs_sum, diff_sq, ref_sq, out_sq, dot), (max_abs, required, max_rel) = (
        np.sum(sums, axis=0) if sums else np.zeros(6),
        np.max(maxima, axis=0) if maxima else np.zeros(3),  # np.max: a NaN propagates
    )
    ref_norm, out_norm = float(np.sqrt(ref_sq)), float(np.sqrt(out_sq))
    rel_l2 = float(np.sqrt(diff_sq) / ref_norm) if ref_norm else float(out_norm > 0)
    within = required <= tol.atol if tol.max_rel_l2 is None else rel_l2 <= tol.max_rel_l2
    return ErrorStats(
        max_abs=float(max_abs),
        mean_abs=float(abs_sum / n) if n else 0.0,
        p99_abs=_p99(top, (n - 1) * _P99 - low) if n else 0.0,
        max_rel=float(max_rel),
        rel_l2=rel_l2,
        cosine=float(dot) / (ref_norm * out_norm)
        if ref_norm and out_norm
        else float(ref_norm == out_norm),
        nonfinite=int(nonfinite),
        required_atol=max(float(required), 0.0),
        passed=nonfinite == 0 and bool(within),
    )


def _chunk_stats(
    reference: np.ndarray, output: np.ndarray, tol: Tolerance
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chunk's sums and maxima, and its absolute differences (NaN counted as Inf)."""
    ref = reference.astype(np.float64)
    out = output.astype(np.float64)
    finite = np.isfinite(out)
    diff = np.abs(out - ref)
    diff[~np.isfinite(diff)] = np.inf
    mag = np.abs(ref)
    big = mag > tol.atol
    out = np.where(finite, out, 0.0)
    finite_diff = np.where(np.isfinite(diff), diff, 0.0)
    sums = np.array(
        [
            out.size - np.count_nonzero(finite),
            diff.sum(),
            finite_diff @ finite_diff,
            ref @ ref,
            out @ out,
            out @ ref,
        ]
    )
    maxima = np.array(
        [
            diff.max(initial=0.0),
            np.max(diff - tol.rtol * mag, initial=0.0),
            (diff[big] / mag[big]).max(initial=0.0),
        ]
    )
    return sums, maxima, diff


def _largest(values: np.ndarray, count: int) -> np.ndarray:
    if values.size <= count:
        return values
    return np.partition(values, values.size - count)[values.size - count :]


def _p99(top: np.ndarray, gamma: float) -> float:
    """np.percentile(diff, 99) from the tail `top` of the sorted differences: the same two
    neighbours, interpolated as numpy's _lerp does (exact to the last bit)."""
    pair = np.partition(top, 1)[:2] if top.size > 1 else np.repeat(top, 2)
    a, b = float(pair[0]), float(pair[1])
    step = b - a
    return b - step * (1 - gamma) if gamma >= 0.5 else a + step * gamma


MIN_CLASS_SHARE = 1e-3  # of a mask's pixels: a class below it in both masks is not Dice-gated


@dataclass(frozen=True)
class MaskGates:
    """What a segmentation user signs off on: the share of pixels whose argmax class agrees
    with the PyTorch original, and each class's Dice against it (None: reported, not gated)."""

    min_agreement: float | None = None
    min_dice: float | None = None

    def describe(self) -> str:
        parts = [f"agreement >= {self.min_agreement:.2%}"] if self.min_agreement is not None else []
        parts += [f"every class's Dice >= {self.min_dice:g}"] if self.min_dice is not None else []
        return ", ".join(parts) or "masks reported, not gated"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MaskAgreement:
    """Two argmax masks compared, as pixel counts (so several inputs pool into one judgement):
    how many pixels there are and agree, and per class (present in either mask) the pixels in
    both, in the reference and in the output. A class covering less than MIN_CLASS_SHARE of
    the pixels in both masks is reported but not gated: with a few pixels its Dice swings
    between 0 and 1 on one pixel (a random head's rare class: 0.4 at 99.99% agreement)."""

    pixels: int
    matching: int
    overlap: dict[int, tuple[int, int, int]]  # class: (in both, in the reference, in the output)
    gates: MaskGates = field(default_factory=MaskGates)

    @property
    def agreement(self) -> float:
        return self.matching / self.pixels if self.pixels else 1.0

    @property
    def dice(self) -> dict[int, float]:
        return {c: 2 * both / (a + b) for c, (both, a, b) in sorted(self.overlap.items())}

    @property
    def gated_dice(self) -> dict[int, float]:
        """The Dice of the classes large enough to gate (see the class docstring)."""
        least = MIN_CLASS_SHARE * self.pixels
        dice = self.dice
        return {c: dice[c] for c, (_, a, b) in self.overlap.items() if max(a, b) >= least}

    @property
    def passed(self) -> bool:
        gates = self.gates
        low_dice = min(self.gated_dice.values(), default=1.0)
        return (gates.min_agreement is None or self.agreement >= gates.min_agreement) and (
            gates.min_dice is None or low_dice >= gates.min_dice
        )

    def to_dict(self) -> dict[str, Any]:
        return {"agreement": self.agreement, "dice": {str(c): d for c, d in self.dice.items()}}

    def describe(self) -> str:
        dice = self.gated_dice
        low = min(dice, key=dice.__getitem__) if dice else None
        text = f", min Dice {dice[low]:.4f} (class {low})" if low is not None else ""
        return f"{self.agreement:.4%}{text}"


def mask_agreement(ref: np.ndarray, out: np.ndarray, gates: MaskGates) -> MaskAgreement:
    """Argmax masks of two (B, N, H, W) logit arrays compared pixel by pixel."""
    return label_agreement(ref.argmax(axis=1), out.argmax(axis=1), gates)


def label_agreement(a: np.ndarray, b: np.ndarray, gates: MaskGates) -> MaskAgreement:
    """Two label maps of one shape (a reference, such as a ground-truth mask, and an output)
    compared pixel by pixel."""
    overlap = {}
    for c in np.union1d(np.unique(a), np.unique(b)).tolist():
        in_a, in_b = a == c, b == c
        overlap[int(c)] = (int(np.count_nonzero(in_a & in_b)), int(in_a.sum()), int(in_b.sum()))
    return MaskAgreement(int(a.size), int(np.count_nonzero(a == b)), overlap, gates)


def pooled(masks: Iterable[MaskAgreement], gates: MaskGates) -> MaskAgreement:
    """Several comparisons as one, by their counts: a sweep's agreement and per-class Dice."""
    pixels = matching = 0
    overlap: dict[int, tuple[int, int, int]] = {}
    for mask in masks:
        pixels, matching = pixels + mask.pixels, matching + mask.matching
        for c, counts in mask.overlap.items():
            old = overlap.get(c, (0, 0, 0))
            overlap[c] = (old[0] + counts[0], old[1] + counts[1], old[2] + counts[2])
    return MaskAgreement(pixels, matching, overlap, gates)
