"""Parity sweep: ONNX Runtime (CPU) against the PyTorch original over a grid of input shapes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch

from resfuse.compare import (
    ErrorStats,
    MaskAgreement,
    MaskGates,
    Tolerance,
    compare_output,
    mask_agreement,
    pooled,
)
from resfuse.models import FusionModel
from resfuse.shapes import Shape


@dataclass(frozen=True)
class ParityResult:
    shape: Shape
    stats: ErrorStats
    mask: MaskAgreement | None = None  # a model with a head: its argmax mask against torch's

    @property
    def passed(self) -> bool:
        return self.stats.passed and (self.mask is None or self.mask.passed)

    def to_dict(self) -> dict[str, Any]:
        mask = self.mask.to_dict() if self.mask is not None else {}
        return {"shape": list(self.shape), **self.stats.to_dict(), **mask}


def failure(results: list[ParityResult], gates: MaskGates | None) -> str | None:
    """Why a sweep fails, in one line, or None: any shape outside the tolerance, or (with mask
    gates) the agreement and per-class Dice pooled over every shape below them. Pooled, since a
    class covering a few pixels of a 32 x 32 input has a Dice of 0 or 1 at that shape alone."""
    failed = [r for r in results if not r.stats.passed]
    if failed:
        bad = failed[0].stats
        return (
            f"at {len(failed)} of {len(results)} shapes the output is outside the tolerance; at "
            f"{failed[0].shape} max |error| {bad.max_abs:.3g}, rel L2 {bad.rel_l2:.3g}, NaN/Inf "
            f"{bad.nonfinite}"
        )
    masks = [r.mask for r in results if r.mask is not None]
    if gates is None or not masks:
        return None
    sweep = pooled(masks, gates)
    if sweep.passed:
        return None
    return f"over the sweep the mask gate fails: {sweep.describe()} ({gates.describe()})"


def onnxruntime_cpu(proto: onnx.ModelProto) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = False  # every call of the sweep has a new shape
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def run_parity(
    model: FusionModel,
    candidate: Callable[[np.ndarray], np.ndarray],
    shapes: list[Shape],
    tol: Tolerance,
    seed: int = 0,
    sample: Callable[[Shape, int], np.ndarray] | None = None,
    gates: MaskGates | None = None,
) -> list[ParityResult]:
    """Each shape once, on random normal inputs or on `sample(shape, index)`; a model with a
    head also gets its argmax mask compared, judged by `gates` (None: not compared)."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for i, shape in enumerate(shapes):
        if sample is None:
            x = torch.randn(shape, generator=generator)
        else:
            x = torch.from_numpy(sample(shape, i))
        with torch.inference_mode():
            reference = model(x).numpy()
        output = candidate(x.numpy())
        stats = compare_output(reference, output, tol, model.config.image_channels)
        mask = None if gates is None else mask_agreement(reference, output, gates)
        results.append(ParityResult(shape, stats, mask))
    return results


def worst(results: list[ParityResult]) -> ParityResult:
    return max(results, key=lambda r: (not r.passed, r.stats.required_atol))
