"""The converters of resfuse.precisions: each makes its precision's graph from the verified
float32 one, and says what its parity sweep draws inputs from (None: random normal inputs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx

from resfuse.contract import InputContract
from resfuse.export import onnx as onnx_export
from resfuse.export.float16 import to_float16
from resfuse.export.quantize import quantize_int8
from resfuse.models import FusionModel
from resfuse.shapes import Shape

if TYPE_CHECKING:
    from resfuse.export.pipeline import ExportOptions

Sampler = Callable[[Shape, int], np.ndarray]


def float16_graph(
    model: FusionModel,
    proto: onnx.ModelProto,
    contract: InputContract,
    options: ExportOptions,
    progress: Callable[[str], None],
    warn: Callable[[str], None] | None,
) -> tuple[onnx.ModelProto, Sampler | None]:
    progress("converting to float16 (sensitive parts stay float32)")
    return to_float16(proto), None


def int8_graph(
    model: FusionModel,
    proto: onnx.ModelProto,
    contract: InputContract,
    options: ExportOptions,
    progress: Callable[[str], None],
    warn: Callable[[str], None] | None,
) -> tuple[onnx.ModelProto, Sampler | None]:
    """Static QDQ calibrated on the options' calibration inputs, which its sweep reuses: random
    inputs lie outside what an image-calibrated graph was made for."""
    calibration = options.calibration
    assert calibration is not None  # ExportOptions.contract refuses INT8 without one
    progress("reading the calibration inputs")
    preprocess = options.preprocess(model.config)
    batches = calibration.inputs(contract, preprocess, options.seed, warn)
    progress(f"calibrating on {len(batches)} inputs and quantizing to INT8")
    quantized = quantize_int8(proto, onnx_export.INPUT_NAME, batches, options.variant.symmetric)
    return quantized, calibration.sampler(contract, preprocess)
