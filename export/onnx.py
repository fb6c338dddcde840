"""torch -> ONNX with dynamic batch, H and W (the dynamo exporter), checked and simplified."""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
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
    return merge_slices(slim)


def merge_slices(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Join each Slice that only feeds another Slice on other axes into one Slice.

    The exporter crops `x[:, :, :H, :W]` as one Slice per axis, and ONNX Runtime copies the
    whole tensor in each: upsample's two full-resolution copies were 32% of its INT8 call
    (resnet18, 512x512, 2 AVX2 cores); merged, one copy is left (11%). Axes must be
    constants (to know they differ); starts, ends and steps may be computed (a Concat joins
    them). Edits `proto` in place and returns it."""
    graph = proto.graph
    sliced = {out for node in graph.node if node.op_type == "Slice" for out in node.output}
    if not any(n.op_type == "Slice" and n.input[0] in sliced for n in graph.node):
        return proto  # spp and masked: nothing to merge, no shape inference of the whole graph
    typed = onnx.shape_inference.infer_shapes(proto)
    elem = {v.name: v.type.tensor_type.elem_type for v in (*typed.graph.value_info, *graph.input)}
    elem |= {t.name: t.data_type for t in graph.initializer}
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    while pair := _slice_pair(graph, consts, elem):
        first, second = pair
        at = list(graph.node).index(second)
        for k in range(1, len(second.input)):
            name = f"{second.output[0]}_joined_{k}"
            parts = [first.input[k], second.input[k]]
            elem[name] = elem[parts[1]]
            if all(p in consts for p in parts):  # constant axes stay constant
                consts[name] = np.concatenate([consts[p] for p in parts])
                graph.initializer.append(onnx.numpy_helper.from_array(consts[name], name))
            else:
                graph.node.insert(at, onnx.helper.make_node("Concat", parts, [name], axis=0))
                at += 1
            second.input[k] = name
        second.input[0] = first.input[0]
        graph.node.remove(first)
    drop_unused_initializers(graph)
    return proto


def copy_model(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for unused in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(unused)


def _slice_pair(
    graph: onnx.GraphProto, consts: dict[str, Any], elem: dict[str, int]
) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """A Slice whose output only feeds a Slice of other axes, and that Slice."""
    users: dict[str, int] = {o.name: 1 for o in graph.output}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    producer = {out: node for node in graph.node for out in node.output}
    for second in graph.node:
        first = producer.get(second.input[0]) if second.op_type == "Slice" else None
        if first is not None and _mergeable(first, second, users, consts, elem):
            return first, second
    return None


def _mergeable(
    first: onnx.NodeProto,
    second: onnx.NodeProto,
    users: dict[str, int],
    consts: dict[str, Any],
    elem: dict[str, int],
) -> bool:
    if first.op_type != "Slice" or users.get(first.output[0]) != 1:
        return False
    if len(first.input) != len(second.input) or len(first.input) < 4 or "" in first.input:
        return False
    if "" in second.input:
        return False
    axes = [_axes(node, consts) for node in (first, second)]
    if axes[0] is None or axes[1] is None or axes[0] & axes[1]:
        return False
    types = {elem.get(node.input[k]) for node in (first, second) for k in range(1, len(node.input))}
    return len(types) == 1 and None not in types and 0 not in types


def _axes(node: onnx.NodeProto, consts: dict[str, Any]) -> set[int] | None:
    """A Slice's axes when they are a constant list of non-negative axes, else None."""
    axes = consts.get(node.input[3])
    if axes is None or axes.ndim != 1 or (axes < 0).any():
        return None
    return set(axes.tolist())


def save(proto: onnx.ModelProto, path: Path) -> None:
    """One self-contained file (the fusion models are far below ONNX's 2 GB limit)."""
    onnx.save_model(proto, str(path), save_as_external_data=False)


def digest(proto: onnx.ModelProto) -> str:
    """The sha256 of the file `save` writes (the serialised proto), without writing it."""
    return hashlib.sha256(proto.SerializeToString()).hexdigest()
