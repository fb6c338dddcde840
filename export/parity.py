"""Parity sweep: ONNX Runtime (CPU) against the PyTorch original over a grid of input shapes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch

from resfuse.compare import ErrorStats, Tolerance, compare_output
from resfuse.models import FusionModel
from resfuse.shapes import Shape


@dataclass(frozen=True)
class ParityResult:
    shape: Shape
    stats: ErrorStats

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), **self.stats.to_dict()}


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
) -> list[ParityResult]:
    """Each shape once, on random normal inputs or on `sample(shape, index)`."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for i, shape in enumerate(shapes):
        if sample is None:
            x = torch.randn(shape, generator=generator)
        else:
            x = torch.from_numpy(sample(shape, i))
        with torch.inference_mode():
            reference = model(x).numpy()
        stats = compare_output(reference, candidate(x.numpy()), tol, model.config.image_channels)
        results.append(ParityResult(shape, stats))
    return results


def worst(results: list[ParityResult]) -> ParityResult:
    return max(results, key=lambda r: (not r.stats.passed, r.stats.required_atol))
