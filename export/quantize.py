"""Static INT8 quantization (QDQ) of an exported float32 graph with ONNX Runtime's tooling.

Convolutions are quantized: per-channel symmetric int8 weights, per-tensor activations, MinMax
calibration. Activations come in two schemes: uint8 with a zero point (the u8s8 pair ONNX
Runtime's x86 kernels run fastest; the default), or symmetric int8 with zero point 0, the only
form TensorRT takes. For CPUs, transposed convolutions with kernel = stride are first rewritten
as convolutions (`subpixel`: ONNX Runtime has no int8 transposed convolution on the CPU), and a
ReLU after a convolution folds into its uint8 output; ONNX Runtime then runs the reshapes,
transposes and crop that follow on the 8-bit values. For TensorRT the graph keeps its transposed
convolutions, quantized as convolutions are (TensorRT runs deconvolutions in int8), and the
residual Adds of the backbone read int8 inputs (TensorRT's Q/DQ placement for skip connections).
Everything else, the sigmoid gate, the pyramid's cumulative sums and the full-resolution
interpolation and concatenation of each fusion method, stays float32, and the image reaches the
fused output unquantized. On CPUs a Concat that only a quantized convolution reads (the fused
tensor under a segmentation head) concatenates 8-bit values instead (`quantized_concat`).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from resfuse.contract import InputContract
from resfuse.errors import ConfigError, ExportError, InputContractError
from resfuse.export.onnx import copy_model
from resfuse.export.quantized_concat import quantize_concats
from resfuse.export.sensitivity import Unit, module_of
from resfuse.export.subpixel import subpixel_convtranspose
from resfuse.images import image_files, load_image
from resfuse.shapes import Shape


def _op_types(symmetric: bool) -> list[str]:
    """With uint8 activations a ReLU after a convolution is removed and the convolution's output
    takes its range, [0, max]: no requantizing step between them. TensorRT (symmetric int8)
    fuses the ReLU itself and runs transposed convolutions in int8 (the quantizer gives their
    [C_in, C_out/group, kH, kW] weights one scale per output channel, axis 1); its Q/DQ placement
    for skip connections quantizes the residual Add's inputs, the skip branch included."""
    return ["Conv", "ConvTranspose", "Add"] if symmetric else ["Conv", "Relu"]


def _quantized_parts(symmetric: bool) -> str:
    """What quantize_int8 quantizes, in words, for the manifest."""
    if symmetric:
        return (
            "Conv and ConvTranspose: inputs, weights and outputs; residual Add (one input a "
            "Conv's output): inputs, its sum float32 into the ReLU after it"
        )
    return "Conv: inputs, weights and outputs, a ReLU after one folded into its uint8 output"


# --calib-method: ONNX Runtime's calibrators by the names users know them by. MinMax takes each
# tensor's whole range; percentile (99.999%) and entropy (KL divergence) clip rare extremes,
# which keeps resolution for the bulk of values when one outlier channel would take it all.
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


@dataclass(frozen=True)
class Calibration:
    """Calibration inputs: up to `count` readable images from `images` (a folder; unreadable
    files are skipped with a warning), or `count` random normal inputs when `images` is None,
    all at `size` x `size`."""

    images: str | Path | None = None
    count: int = 32
    size: int = 512
    method: str = "minmax"  # a key of CALIBRATION_METHODS
    # What the last inputs() call read from `images` ("used", "skipped": lists of files), for
    # the manifest's record and the parity sweep's sampler: which files are readable is only
    # known once they are read with the artifact's preprocessing.
    _read: dict[str, list[Path]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"--calib-count must be at least 1, got {self.count}")
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"--calib-method {self.method!r} is not one of "
                f"{', '.join(CALIBRATION_METHODS)}; minmax is the default"
            )
        if self.images is not None:
            self._files(self.images)  # a bad folder fails before the export

    def _files(self, images: str | Path) -> list[Path]:
        return image_files(images, "--calib-images")[: self.count]

    def _used(self, images: str | Path) -> list[Path]:
        """The files inputs() read; before it has run, the ones it would try first."""
        return self._read.get("used") or self._files(images)

    def describe(self) -> dict[str, Any]:
        """The record of the calibration: `count` is the inputs used, fewer than --calib-count
        when the folder holds fewer readable images; `skipped` counts the unreadable ones."""
        method = CALIBRATION_METHODS[self.method]
        if not self.images:
            return {
                "method": method,
                "source": "random normal inputs",
                "count": self.count,
                "size": self.size,
            }
        skipped = self._read.get("skipped", [])
        return {
            "method": method,
            "source": f"images in {self.images}",
            "count": len(self._used(self.images)),
            "size": self.size,
            "skipped": len(skipped),
            "skipped_files": [str(p.relative_to(self.images)) for p in skipped],
        }

    def inputs(
        self,
        contract: InputContract,
        preprocess: dict[str, Any],
        seed: int,
        warn: Callable[[str], None] | None = None,
    ) -> list[np.ndarray]:
        """The calibration batches, (1, C, size, size) float32 each, at a size the contract
        accepts (the model's minimum and maximum bound `size`). An image file that cannot be
        read is told to `warn` (default: a Python warning) and skipped; none readable is an
        error."""
        h, w = contract.height.clamp(self.size), contract.width.clamp(self.size)
        if self.images is None:
            rng = np.random.default_rng(seed)
            return [
                rng.standard_normal((1, contract.channels, h, w), dtype=np.float32)
                for _ in range(self.count)
            ]
        batches: list[np.ndarray] = []
        used: list[Path] = []
        skipped: list[tuple[Path, str]] = []
        for file in image_files(self.images, "--calib-images"):
            if len(used) == self.count:
                break
            try:
                batches.append(_resized(file, h, w, preprocess, contract))
            except InputContractError as exc:  # unreadable, or a kind of image read with loss
                skipped.append((file, str(exc)))
                (warn or _python_warning)(f"skipped a calibration image: {exc}")
            else:
                used.append(file)
        if not used:
            raise ConfigError(_none_readable(self.images, skipped))
        self._read.update(used=used, skipped=[file for file, _ in skipped])
        return batches

    def sampler(
        self, contract: InputContract, preprocess: dict[str, Any]
    ) -> Callable[[Shape, int], np.ndarray] | None:
        """Inputs of any shape from the calibration images, for the INT8 parity sweep: random
        normal inputs lie outside what images calibrate for. None: calibrated on random inputs,
        which the sweep's own random inputs already match."""
        if self.images is None:
            return None
        files = self._used(self.images)

        def sample(shape: Shape, index: int) -> np.ndarray:
            b, _, h, w = shape
            picks = [files[(index + i) % len(files)] for i in range(b)]
            return np.concatenate([_resized(f, h, w, preprocess, contract) for f in picks])

        return sample


def _resized(
    file: Path, h: int, w: int, preprocess: dict[str, Any], contract: InputContract
) -> np.ndarray:
    return load_image(file, preprocess, contract, size=(h, w))


def _python_warning(note: str) -> None:
    warnings.warn(note, UserWarning, stacklevel=3)


def _none_readable(folder: str | Path, skipped: list[tuple[Path, str]]) -> str:
    """One line for a calibration folder none of whose image files can be read."""
    file, reason = skipped[0]
    others = "; none of the others could be read either" if len(skipped) > 1 else ""
    return (
        f"cannot read calibration image {file}: {reason}{others}; put images the artifact "
        f"can read into --calib-images {folder}"
    )


_CPU_REWRITES = [
    "ConvTranspose (kernel = stride) -> Conv + sub-pixel shuffle",
    "Concat read only by quantized convolutions -> 8-bit inputs at its output's scale",
]


def quantization_record(calibration: Calibration, symmetric: bool = False) -> dict[str, Any]:
    """How quantize_int8 quantizes, for the manifest; keep it beside the call it describes."""
    activations = "int8, symmetric (zero point 0)" if symmetric else "uint8, asymmetric"
    return {
        "format": "QDQ",
        "ops": _op_types(symmetric),
        "quantized": _quantized_parts(symmetric),
        "rewrites": [] if symmetric else list(_CPU_REWRITES),
        "weights": "int8, symmetric, per output channel",
        "activations": f"{activations}, per tensor",
        "biases": "float32" if symmetric else "int32",
        "calibration": calibration.describe(),
    }


class _Reader:
    """A list of batches as ONNX Runtime's calibrators read them (get_next until None)."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter({name: b} for b in batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


@contextlib.contextmanager
def _inside(folder: str) -> Iterator[None]:
    """Run in `folder`: ONNX Runtime's quantization tools drop files (shape inference dumps,
    augmented models) into the working directory, which must stay the user's and clean."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def quantize_int8(
    model: onnx.ModelProto,
    input_name: str,
    batches: list[np.ndarray],
    symmetric: bool = False,
    *,
    concat_8bit: bool = True,
    exclude: Iterable[str] = (),
    method: str = "minmax",
) -> onnx.ModelProto:
    """The QDQ INT8 form of `model`, calibrated on `batches` by `method` (CALIBRATION_METHODS);
    `symmetric`: int8 activations with zero point 0 (TensorRT), else uint8 ones (x86 CPUs).
    The nodes named in `exclude` stay float32: no quantizer reads or writes their tensors unless
    another quantized node shares them. `concat_8bit=False` leaves a head's Concat in float32
    (the same numbers, slower: benchmarks/head_concat.py times the two)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="resfuse-int8-") as tmp, _inside(tmp):
        source, prepared, quantized = (Path(tmp) / n for n in ("f32.onnx", "pre.onnx", "q.onnx"))
        if not symmetric:  # TensorRT has int8 deconvolutions; ONNX Runtime's CPU kernels not
            model = subpixel_convtranspose(copy_model(model))
        onnx.save(model, source)
        try:
            # ONNX Runtime's symbolic shape inference cannot follow the dynamic H x W through
            # the pyramid's Gather indices; onnx's own inference is enough for QDQ placement.
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print as they go
                quantize_static(
                    str(prepared),
                    str(quantized),
                    _Reader(input_name, batches),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=_op_types(symmetric),
                    nodes_to_exclude=[*_non_residual_adds(onnx.load(prepared)), *exclude],
                    per_channel=True,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                    extra_options=_extra_options(symmetric),
                )
        except Exception as exc:  # the quantizer raises bare Exceptions of many kinds
            raise ExportError(f"INT8 quantization failed: {type(exc).__name__}: {exc}") from exc
        graph = _float_inputs(onnx.load(quantized))
        return quantize_concats(graph) if concat_8bit and not symmetric else graph


def quantizable_units(model: onnx.ModelProto, symmetric: bool) -> list[Unit]:
    """What quantize_int8 quantizes, layer by layer, as it names the nodes: each convolution
    (on CPUs after the sub-pixel rewrite, with the ReLU that folds into it), and for TensorRT
    each transposed convolution and residual Add too."""
    graph = model if symmetric else subpixel_convtranspose(copy_model(model))
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    skipped = set(_non_residual_adds(graph))
    units, folded = [], set()
    for node in graph.graph.node:
        if node.op_type not in _op_types(symmetric) or node.op_type == "Relu":
            continue
        if node.name in skipped:
            continue
        after = readers.get(node.output[0], [])
        relu = [r.name for r in after if r.op_type == "Relu" and len(after) == 1]
        folded.update(relu)
        module = module_of(graph.graph, node)
        units.append(Unit(node.name, module, (node.name, *relu)))
    # a ReLU after a residual sum is quantized on its own (CPUs): a unit of its own
    alone = [n for n in graph.graph.node if n.op_type == "Relu" and n.name not in folded]
    return units + [Unit(n.name, "", (n.name,)) for n in alone if not symmetric]


def _non_residual_adds(model: onnx.ModelProto) -> list[str]:
    """The Adds that sum no convolution's output: the coordinate arithmetic of spp's and masked's
    resize grids, calibrated on small inputs, would clip on large ones in int8."""
    convs = {n.output[0] for n in model.graph.node if n.op_type == "Conv"}
    return [n.name for n in model.graph.node if n.op_type == "Add" and not convs & {*n.input}]


def _extra_options(symmetric: bool) -> dict[str, Any]:
    # TensorRT's parser takes int8 DequantizeLinear inputs only: its biases stay float
    # (onnx/onnx-tensorrt#850); ONNX Runtime's CPU kernels want int32 ones.
    options: dict[str, Any] = {
        "ActivationSymmetric": symmetric,
        "WeightSymmetric": True,
        "QuantizeBias": not symmetric,
    }
    if symmetric:
        # A residual sum goes into a ReLU whose output is quantized for its readers: a Q/DQ pair
        # on the sum itself would only round it once more.
        options["OpTypesToExcludeOutputQuantization"] = ["Add"]
    return options


def _float_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The quantizer hands every reader of a quantized tensor its dequantized copy; for a graph
    input that includes the float ops that pass the image into the fused output (Concat, the
    masked gate's Mul) and Shape. Give them the input itself: the image channels stay exact,
    and only the convolutions read the image in 8 bits."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    quantized = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] in inputs
    }
    source = {
        n.output[0]: quantized[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized
    }
    for node in graph.node:
        if node.op_type != "Conv":
            node.input[:] = [source.get(name, name) for name in node.input]
    return model
