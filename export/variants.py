"""The converters of resfuse.precisions: each prepares its precision's conversion of the verified
float32 graph (a Source): the graph with any layers kept float, the layers it could keep float
(for the sensitivity ranking and the rescue), the inputs it measured on, and what its parity
sweep draws inputs from (None: random normal inputs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from resfuse.export import onnx as onnx_export
from resfuse.export.float16 import range_hazards, to_float16
from resfuse.export.quantize import CALIBRATION_METHODS, quantizable_units, quantize_int8
from resfuse.export.sensitivity import Conversion, Unit, module_of

if TYPE_CHECKING:
    from resfuse.export.pipeline import Source

_PROBES = 4  # random inputs float16's ranges are measured on
_PROBE_SIZE = 128


def float16_graph(source: Source) -> Conversion:
    """float16 with the rule-based float32 parts, plus every node whose float32 values on random
    inputs exceed float16's range (or vanish below it)."""
    source.progress("measuring float32 ranges for float16")
    contract = source.contract
    size = (contract.height.clamp(_PROBE_SIZE), contract.width.clamp(_PROBE_SIZE))
    rng = np.random.default_rng(source.options.seed)
    probes = [
        rng.standard_normal((1, contract.channels, *size), dtype=np.float32) for _ in range(_PROBES)
    ]
    hazards = range_hazards(source.graph, probes)
    forced = [h.node for h in hazards]
    modules = _modules(source.graph)

    def make(keep: Sequence[str] = (), method: str | None = None) -> onnx.ModelProto:
        source.progress("converting to float16 (sensitive parts stay float32)")
        return to_float16(source.graph, keep=[*forced, *keep])

    learned = [n for n in source.graph.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    units = [Unit(n.name, modules.get(n.name, ""), (n.name,)) for n in learned]
    record = [
        {"node": h.node, "module": modules.get(h.node, ""), "why": h.describe()} for h in hazards
    ]
    return Conversion(make, units, probes, None, always_float=record)


def int8_graph(source: Source) -> Conversion:
    """Static QDQ calibrated on the options' calibration inputs, which its sweep reuses: random
    inputs lie outside what an image-calibrated graph was made for."""
    options, contract = source.options, source.contract
    calibration = options.calibration
    assert calibration is not None  # ExportOptions.contract refuses INT8 without one
    source.progress("reading the calibration inputs")
    preprocess = options.preprocess(source.model.config)
    batches = calibration.inputs(contract, preprocess, options.seed, source.warn)
    symmetric = options.variant.symmetric

    def make(keep: Sequence[str] = (), method: str | None = None) -> onnx.ModelProto:
        chosen = method or calibration.method
        source.progress(f"calibrating ({chosen}) on {len(batches)} inputs, quantizing to INT8")
        return quantize_int8(
            source.graph, onnx_export.INPUT_NAME, batches, symmetric, exclude=keep, method=chosen
        )

    others = tuple(m for m in CALIBRATION_METHODS if m != calibration.method)
    units = quantizable_units(source.graph, symmetric)
    return Conversion(make, units, batches, calibration.sampler(contract, preprocess), others)


def _modules(graph: onnx.ModelProto) -> dict[str, str]:
    return {n.name: module_of(graph.graph, n) for n in graph.graph.node if n.name}
