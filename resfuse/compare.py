"""Compare a deployed model's output with its reference, Polygraphy-style error statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass
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


def compare(reference: np.ndarray, output: np.ndarray, tol: Tolerance) -> ErrorStats:
    """Error statistics of `output` against `reference`, judged by `tol`; NaN/Inf always fails."""
    if reference.shape != output.shape:
        raise ParityError(
            f"output shape {output.shape} differs from the reference's {reference.shape}"
        )
    ref = reference.astype(np.float64, copy=False)
    out = output.astype(np.float64, copy=False)
    nonfinite = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
    diff = np.abs(out - ref)
    diff = np.where(np.isfinite(diff), diff, np.inf)
    mag = np.abs(ref)
    atol, rtol = tol.atol, tol.rtol
    big = mag > atol
    ref_norm = float(np.linalg.norm(ref))
    out_norm = float(np.linalg.norm(np.where(np.isfinite(out), out, 0.0)))
    dot = float(np.vdot(np.where(np.isfinite(out), out, 0.0), ref))
    required = float(np.max(diff - rtol * mag, initial=0.0))
    rel_l2 = (
        float(np.linalg.norm(np.where(np.isfinite(diff), diff, 0.0)) / ref_norm)
        if ref_norm
        else float(out_norm > 0)
    )
    within = required <= atol if tol.max_rel_l2 is None else rel_l2 <= tol.max_rel_l2
    return ErrorStats(
        max_abs=float(diff.max(initial=0.0)),
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        p99_abs=float(np.percentile(diff, 99)) if diff.size else 0.0,
        max_rel=float((diff[big] / mag[big]).max(initial=0.0)),
        rel_l2=rel_l2,
        cosine=dot / (ref_norm * out_norm)
        if ref_norm and out_norm
        else float(ref_norm == out_norm),
        nonfinite=nonfinite,
        required_atol=max(required, 0.0),
        passed=nonfinite == 0 and within,
    )
