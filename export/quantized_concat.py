"""Concatenations that feed a quantized convolution, done on 8-bit values.

With a segmentation head, the fused tensor (image and features at H x W) is only the head's
input: the quantizer leaves the Concat in float32 and quantizes its output for the head's first
convolution. ONNX Runtime then dequantizes the 8-bit features to float32 at full resolution,
concatenates in float32 and quantizes the result again: three full-resolution passes, each as
slow as a convolution layer on a CPU. Quantizing each input of such a Concat instead, with the
Concat's own scale, gives the same numbers (quantizing a concatenation is concatenating the
quantized parts) and lets ONNX Runtime concatenate 8-bit tensors (QLinearConcat). An input that
is already an 8-bit tensor moved by Transpose, Reshape or Slice keeps its own scale, so that
ONNX Runtime keeps it in 8 bits and requantizes it inside the Concat, as the float32 path did
by dequantizing and quantizing again.

A Concat whose output is the graph's (a fused output without a head) stays float32: its image
channels are the input itself, bit for bit.
"""

from __future__ import annotations

import onnx
from onnx import helper

# Ops that only move values: the scale of their input is the scale of their output.
_MOVERS = frozenset({"Transpose", "Reshape", "Slice", "Squeeze", "Unsqueeze", "Flatten"})


def quantize_concats(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Quantize the inputs of every Concat read only by QuantizeLinear nodes of one scale
    (uint8 QDQ graphs). Edits `proto` in place and returns it."""
    graph = proto.graph
    producers = {name: node for node in graph.node for name in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    scalars = {t.name for t in graph.initializer if not t.dims}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        params = None if node.output[0] in outputs else _output_params(node, readers, scalars)
        if params is not None:
            nodes += _quantized_inputs(node, params, producers, scalars)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def _output_params(
    node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]], scalars: set[str]
) -> tuple[str, str] | None:
    """(scale, zero point) of the per-tensor QuantizeLinear nodes that alone read a Concat's
    output."""
    if node.op_type != "Concat":
        return None
    users = readers.get(node.output[0], [])
    params = {tuple(u.input[1:3]) for u in users if u.op_type == "QuantizeLinear"}
    if not users or len(params) != 1 or any(u.op_type != "QuantizeLinear" for u in users):
        return None
    scale, zero_point = params.pop()
    return (scale, zero_point) if {scale, zero_point} <= scalars else None


def _quantized_inputs(
    concat: onnx.NodeProto,
    output_params: tuple[str, str],
    producers: dict[str, onnx.NodeProto],
    scalars: set[str],
) -> list[onnx.NodeProto]:
    """A QuantizeLinear -> DequantizeLinear pair on each input of `concat`, which now reads the
    pairs' outputs: with `output_params` (scale, zero point), or an 8-bit input's own."""
    stem = concat.name or concat.output[0]
    pairs: list[onnx.NodeProto] = []
    for i, name in enumerate(concat.input):
        params = list(_carried_params(name, producers, scalars) or output_params)
        quantized, restored = f"{stem}/input{i}_q", f"{stem}/input{i}_dq"
        pairs += [
            helper.make_node("QuantizeLinear", [name, *params], [quantized], quantized),
            helper.make_node("DequantizeLinear", [quantized, *params], [restored], restored),
        ]
        concat.input[i] = restored
    return pairs


def _carried_params(
    name: str, producers: dict[str, onnx.NodeProto], scalars: set[str]
) -> tuple[str, str] | None:
    """The (scale, zero point) of the per-tensor DequantizeLinear that `name` is moved from."""
    node = producers.get(name)
    while node is not None and node.op_type in _MOVERS:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return None
    if not {node.input[1], node.input[2]} <= scalars:
        return None
    return node.input[1], node.input[2]
