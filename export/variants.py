"""The converters of resfuse.precisions: each makes its precision's graph from the verified
float32 one (a Source), and says what its parity sweep draws inputs from (None: random normal
inputs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx

from resfuse.export import onnx as onnx_export
from resfuse.export.float16 import to_float16
from resfuse.export.quantize import quantize_int8
from resfuse.shapes import Shape

if TYPE_CHECKING:
    from resfuse.export.pipeline import Source

Sampler = Callable[[Shape, int], np.ndarray]


def float16_graph(source: Source) -> tuple[onnx.ModelProto, Sampler | None]:
    source.progress("converting to float16 (sensitive parts stay float32)")
    return to_float16(source.graph), None


def int8_graph(source: Source) -> tuple[onnx.ModelProto, Sampler | None]:
    """Static QDQ calibrated on the options' calibration inputs, which its sweep reuses: random
    inputs lie outside what an image-calibrated graph was made for."""
    options, contract = source.options, source.contract
    calibration = options.calibration
    assert calibration is not None  # ExportOptions.contract refuses INT8 without one
    source.progress("reading the calibration inputs")
    preprocess = options.preprocess(source.model.config)
    batches = calibration.inputs(contract, preprocess, options.seed, source.warn)
    source.progress(f"calibrating on {len(batches)} inputs and quantizing to INT8")
    symmetric = options.variant.symmetric
    quantized = quantize_int8(source.graph, onnx_export.INPUT_NAME, batches, symmetric)
    return quantized, calibration.sampler(contract, preprocess)
