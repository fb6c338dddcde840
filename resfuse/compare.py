"""Compare a deployed model's output with its reference, Polygraphy-style error statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from resfuse.errors import ParityError


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


def compare(reference: np.ndarray, output: np.ndarray, atol: float, rtol: float) -> ErrorStats:
    """Elementwise rule |out - ref| <= atol + rtol * |ref| (numpy.allclose); NaN/Inf fails."""
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
    big = mag > atol
    ref_norm = float(np.linalg.norm(ref))
    out_norm = float(np.linalg.norm(np.where(np.isfinite(out), out, 0.0)))
    dot = float(np.vdot(np.where(np.isfinite(out), out, 0.0), ref))
    required = float(np.max(diff - rtol * mag, initial=0.0))
    return ErrorStats(
        max_abs=float(diff.max(initial=0.0)),
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        p99_abs=float(np.percentile(diff, 99)) if diff.size else 0.0,
        max_rel=float((diff[big] / mag[big]).max(initial=0.0)),
        rel_l2=float(np.linalg.norm(np.where(np.isfinite(diff), diff, 0.0)) / ref_norm)
        if ref_norm
        else float(out_norm > 0),
        cosine=dot / (ref_norm * out_norm)
        if ref_norm and out_norm
        else float(ref_norm == out_norm),
        nonfinite=nonfinite,
        required_atol=max(required, 0.0),
        passed=nonfinite == 0 and required <= atol,
    )
