"""torch -> ONNX with dynamic batch, H and W (the dynamo exporter), checked and simplified."""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from pathlib import Path

import onnx
import torch

from resfuse.contract import InputContract
from resfuse.errors import ExportError
from resfuse.models import FusionModel

INPUT_NAME = "image"
_AXES = {0: "batch", 2: "height", 3: "width"}


def example_input(contract: InputContract) -> torch.Tensor:
    """Batch 2 (a dim seen as 1 gets specialised) and an H != W that is no multiple of 32."""
    batch = min(2, contract.batch.max or 2)
    h = contract.height.clamp(3 * contract.height.min + 1)
    w = contract.width.clamp(4 * contract.width.min + 3)
    return torch.randn(batch, contract.channels, h, w)


def _dynamic_shapes(contract: InputContract) -> dict[int, torch.export.Dim]:
    dims = {}
    for axis, name in _AXES.items():
        allowed = getattr(contract, name)
        if allowed.max != allowed.min:  # an equal range is a static axis
            dims[axis] = torch.export.Dim(name, min=allowed.min, max=allowed.max)
    return dims


def export_onnx(model: FusionModel, contract: InputContract, opset: int) -> onnx.ModelProto:
    """Export `model` for every input its contract admits; raise ExportError otherwise."""
    sample = example_input(contract)
    log = io.StringIO()
    try:
        # The exporter narrates to stdout and warns about internals; keep both for the error.
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (sample,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[model.config.output_name],
                dynamic_shapes=(_dynamic_shapes(contract),),
                opset_version=opset,
                verbose=False,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"torch.onnx.export failed for {model.config.method}/{model.config.backbone} at "
            f"opset {opset}: {first[:300]}. Try another --opset (18 is the tested default)"
        ) from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    check_dynamic_axes(proto, contract)
    return proto


def check_dynamic_axes(proto: onnx.ModelProto, contract: InputContract) -> None:
    """Exporters can silently specialise a dimension; refuse a graph that did."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for axis, name in _AXES.items():
        allowed = getattr(contract, name)
        symbolic = dims[axis].HasField("dim_param")
        if allowed.min != allowed.max and not symbolic:
            raise ExportError(
                f"the exported graph fixed the {name} axis to {dims[axis].dim_value} although "
                f"{allowed.describe()} was declared; the model's forward must read sizes from "
                f"its input tensors (x.shape) instead of Python constants"
            )
    if dims[1].dim_value != contract.channels:
        raise ExportError(
            f"exported graph has {dims[1].dim_value} channels, expected {contract.channels}"
        )


def check_model(proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ExportError(f"onnx.checker rejected the exported graph: {first[:300]}") from exc


def simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim's constant folding and fusions; the caller keeps it only if parity holds."""
    import onnxslim

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            slim = onnxslim.slim(proto)
    except Exception as exc:  # a third-party optimiser: any failure means "keep the raw graph"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no detail"
        raise ExportError(f"onnxslim failed ({type(exc).__name__}: {first})") from exc
    if not isinstance(slim, onnx.ModelProto):
        raise ExportError("onnxslim returned no model")
    return slim


def save(proto: onnx.ModelProto, path: Path) -> None:
    """One self-contained file (the fusion models are far below ONNX's 2 GB limit)."""
    onnx.save_model(proto, str(path), save_as_external_data=False)


def digest(proto: onnx.ModelProto) -> str:
    """The sha256 of the file `save` writes (the serialised proto), without writing it."""
    return hashlib.sha256(proto.SerializeToString()).hexdigest()
