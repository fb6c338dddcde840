"""Where a reduced-precision graph loses its accuracy, and the fewest layers to keep float.

A unit is one layer a variant reduces: a convolution (with the ReLU folded into it on CPUs), a
transposed convolution, a residual Add (TensorRT's INT8). Its sensitivity is the error at the
output (what the parity sweep and the mask gates judge) of the variant in which that unit alone
is reduced and every other stays float32, on the calibration inputs. Measured at the output,
one unit at a time, because the cheaper measures miss the hazards that matter: a tensor's own
quantization noise (ONNX Runtime's qdq_loss_debug) says nothing of what it does downstream, and
leaving one unit out of the full variant misses a tensor two quantized units share (an
activation with one huge channel stays quantized while either of its readers is).

The rescue keeps the most sensitive units float, fewest first (1, 2, 3, ...), until the sweep
passes or the time is spent. The same node names serve every backend: ONNX Runtime's quantizer
leaves them out (`nodes_to_exclude`), so the QDQ graph that ONNX Runtime, OpenVINO and TensorRT
all run has no Q/DQ around them; float16 keeps them float32 behind Casts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from resfuse.compare import MaskGates, Tolerance, compare_output, mask_agreement
from resfuse.errors import ExportError
from resfuse.shapes import Shape

Sampler = Callable[[Shape, int], np.ndarray]  # a parity sweep's inputs, by shape and index
Make = Callable[[Sequence[str]], onnx.ModelProto]  # node names kept float -> the variant graph
Run = Callable[[onnx.ModelProto], Callable[[np.ndarray], np.ndarray]]


@dataclass(frozen=True)
class Unit:
    """One reducible layer: its ONNX node, the PyTorch module it came from, and every node kept
    float with it."""

    node: str
    module: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Sensitivity:
    unit: Unit
    rel_l2: float  # output error with this unit alone reduced
    agreement: float | None  # a model with a head: argmax agreement with the float32 graph

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"node": self.unit.node, "module": self.unit.module}
        record["rel_l2_alone"] = self.rel_l2
        if self.agreement is not None:
            record["agreement_alone"] = self.agreement
        return record


def module_of(graph: onnx.GraphProto, node: onnx.NodeProto) -> str:
    """The PyTorch module a learned node came from, read off its weight's name (the exporter
    names initializers by parameter path: encoder.layers.2.1.conv1.weight); "" if unknown."""
    weights = {t.name for t in graph.initializer}
    for name in node.input[1:2]:
        if name in weights and name.endswith(".weight"):
            return name.removesuffix(".weight")
    return ""


def rank(
    make: Make,
    units: Sequence[Unit],
    inputs: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    run: Run,
    image_channels: int | None,
    heads: bool,
    progress: Callable[[str], None] = lambda step: None,
) -> list[Sensitivity]:
    """Each unit's sensitivity, most sensitive first: `make` keeps every other unit float,
    `run` runs the graph, compared with `reference` (the float32 graph's outputs on `inputs`)."""
    everything = [name for unit in units for name in unit.nodes]
    found = []
    for i, unit in enumerate(units, 1):
        progress(f"sensitivity: {unit.module or unit.node} ({i} of {len(units)})")
        others = [name for name in everything if name not in unit.nodes]
        infer = run(make(others))
        outputs = [infer(x) for x in inputs]
        found.append(_judged(unit, reference, outputs, image_channels, heads))
    return sorted(found, key=lambda s: -s.rel_l2)


def _judged(
    unit: Unit,
    reference: Sequence[np.ndarray],
    outputs: Sequence[np.ndarray],
    image_channels: int | None,
    heads: bool,
) -> Sensitivity:
    ref, out = np.concatenate(reference), np.concatenate(outputs)
    stats = compare_output(ref, out, Tolerance(max_rel_l2=0.0), image_channels)
    agreement = mask_agreement(ref, out, MaskGates()).agreement if heads else None
    return Sensitivity(unit, stats.rel_l2, agreement)


def counts(total: int, limit: int) -> list[int]:
    """How many units each rescue try keeps float: one by one to 6, then about a third more
    each time, up to `limit` (and never more than there are)."""
    found, k = [], 1
    while k <= min(total, limit):
        found.append(k)
        k = k + 1 if k < 6 else max(k + 1, round(k * 4 / 3))
    return found


def rescue(
    make: Make,
    ranking: Sequence[Sensitivity],
    passes: Callable[[onnx.ModelProto], bool],
    seconds: float,
    limit: int,
    progress: Callable[[str], None] = lambda step: None,
) -> tuple[onnx.ModelProto, list[Sensitivity]]:
    """The variant with the fewest most-sensitive units kept float that `passes`, tried in the
    order `counts` gives, within `seconds`; ExportError naming how far it got otherwise."""
    deadline = time.monotonic() + seconds
    tried = 0
    for k in counts(len(ranking), limit):
        if time.monotonic() > deadline:
            break
        kept = list(ranking[:k])
        progress(f"keeping {k} most sensitive layer(s) float")
        graph = make([name for s in kept for name in s.unit.nodes])
        tried = k
        if passes(graph):
            return graph, kept
    reason = "its time ran out" if time.monotonic() > deadline else "no count passed"
    raise ExportError(
        f"the mixed-precision rescue kept up to {tried} of {len(ranking)} layers float and "
        f"the gate still failed ({reason}); raise --keep-accuracy-seconds or "
        f"--keep-accuracy-limit, calibrate on more representative images, or deploy the "
        f"float32 artifact"
    )


@dataclass
class Conversion:
    """One precision's conversion of a source graph. `make(keep, method)` is the variant with
    the nodes named in `keep` float (and, for INT8, calibrated by `method`)."""

    make: Callable[[Sequence[str], str | None], onnx.ModelProto]
    units: list[Unit]  # what the ranking and the rescue may keep float
    inputs: list[np.ndarray]  # what the conversion measured or calibrated on
    sample: Sampler | None
    methods: tuple[str, ...] = ()  # other calibration methods the rescue tries first
    always_float: list[dict[str, Any]] = field(default_factory=list)  # measured, not ruled

    @classmethod
    def fixed(cls, graph: onnx.ModelProto, sample: Sampler | None = None) -> Conversion:
        """A conversion with nothing it could keep float: one graph, ranked and rescued never."""

        def make(keep: Sequence[str] = (), method: str | None = None) -> onnx.ModelProto:
            return graph

        return cls(make, [], [], sample)
