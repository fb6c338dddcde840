"""Transposed convolutions whose kernel equals their stride, as 1x1 convolutions and a shuffle.

Such a ConvTranspose (upsample's 2x2, stride-2 blocks) maps each input cell to its own kh x kw
output block, so it equals a 1x1 convolution with kh * kw * C outputs, one group of C per
(row, column) phase, followed by a sub-pixel shuffle that puts phase (r, c) of cell (i, j) at
(kh * i + r, kw * j + c). ONNX Runtime's CPU provider runs convolutions in int8 but transposed
convolutions in float32 only, so the INT8 export for CPUs rewrites them before quantizing.

The shuffle is written channels-last, as ONNX Runtime runs int8 convolutions: a Transpose to
NHWC, one Transpose that moves whole rows of kw * C values (a general 6-D permutation, as
DepthToSpace does it, costs ONNX Runtime several times more), and a Transpose back; ONNX
Runtime's own layout transposes around each int8 convolution cancel the first and the last.
The reshapes take their sizes from 0 (copy), -1 (infer) and the output width; widths come from
one Shape of the first block's input and are multiplied by kw from block to block, so no Shape
reads a full-resolution quantized tensor (it would keep a float copy of it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from resfuse.export.onnx import drop_unused_initializers


def subpixel_convtranspose(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every ConvTranspose whose kernel equals its stride (no padding, dilation or
    groups, constant weights); a ReLU that alone takes its output moves before the shuffle, so
    quantization sees convolution -> ReLU. Edits `proto` in place and returns it."""
    graph = proto.graph
    consts = {t.name: t for t in graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    widths: dict[str, str] = {}  # tensor -> 1-D int64 tensor holding its width
    rewritten: list[onnx.NodeProto] = []
    moved: set[str] = set()  # outputs of the ReLUs now inside a rewrite
    for node in graph.node:
        if node.op_type == "Relu" and node.output[0] in moved:
            continue
        kernel = _kernel(node, consts)
        if kernel is None:
            if node.op_type == "Relu" and node.input[0] in widths:
                widths[node.output[0]] = widths[node.input[0]]
            rewritten.append(node)
            continue
        relu = _sole_relu(node.output[0], users, outputs)
        if relu is not None:
            moved.add(relu.output[0])
        rewritten += _rewrite(node, kernel, relu, consts, widths, graph)
    del graph.node[:]
    graph.node.extend(rewritten)
    produced = {out for node in graph.node for out in node.output}
    for stale in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(stale)
    drop_unused_initializers(graph)
    return proto


def _kernel(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> tuple[int, int] | None:
    """(kh, kw) when `node` is a ConvTranspose this module rewrites, else None."""
    if node.op_type != "ConvTranspose" or len(node.input) < 2 or node.input[1] not in consts:
        return None
    if len(node.input) > 2 and node.input[2] and node.input[2] not in consts:
        return None
    weight = consts[node.input[1]]
    if len(weight.dims) != 4 or weight.data_type != onnx.TensorProto.FLOAT:
        return None
    kernel = (int(weight.dims[2]), int(weight.dims[3]))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    defaults = {
        "kernel_shape": list(kernel),
        "strides": [1, 1],
        "pads": [0, 0, 0, 0],
        "dilations": [1, 1],
        "output_padding": [0, 0],
        "group": 1,
        "auto_pad": b"NOTSET",
    }
    if set(attrs) - set(defaults):
        return None  # output_shape: left as it is
    # Plain but for the stride, which equals the kernel: each cell its own output block.
    plain = {**defaults, "strides": list(kernel)}
    return kernel if {**defaults, **attrs} == plain else None


def _sole_relu(
    tensor: str, users: dict[str, list[onnx.NodeProto]], outputs: set[str]
) -> onnx.NodeProto | None:
    consumers = users.get(tensor, [])
    if len(consumers) == 1 and consumers[0].op_type == "Relu" and tensor not in outputs:
        return consumers[0]
    return None


def _rewrite(
    node: onnx.NodeProto,
    kernel: tuple[int, int],
    relu: onnx.NodeProto | None,
    consts: dict[str, onnx.TensorProto],
    widths: dict[str, str],
    graph: onnx.GraphProto,
) -> list[onnx.NodeProto]:
    kh, kw = kernel
    stem = f"{node.name or node.output[0]}/subpixel"
    weight = numpy_helper.to_array(consts[node.input[1]])  # (Cin, C, kh, kw)
    cin, c = weight.shape[:2]
    # Output channel (r, col, c): the kernel tap (r, col) of output channel c.
    pointwise = weight.transpose(2, 3, 1, 0).reshape(kh * kw * c, cin, 1, 1)
    inputs = [node.input[0], _constant(graph, f"{stem}/weight", pointwise)]
    if len(node.input) > 2 and node.input[2]:
        bias = numpy_helper.to_array(consts[node.input[2]])
        inputs.append(_constant(graph, f"{stem}/bias", np.tile(bias, kh * kw)))
    nodes = [
        helper.make_node("Conv", inputs, [f"{stem}/phases"], f"{stem}/conv", kernel_shape=[1, 1])
    ]
    phases = f"{stem}/phases"
    if relu is not None:
        nodes.append(helper.make_node("Relu", [phases], [f"{stem}/relu"], relu.name))
        phases = f"{stem}/relu"
    width = widths.get(node.input[0])
    if width is None:
        width = f"{stem}/in_width"
        index = _constant(graph, f"{stem}/width_axis", np.array([3], np.int64))
        nodes += [
            helper.make_node("Shape", [node.input[0]], [f"{stem}/in_shape"], f"{stem}/shape"),
            helper.make_node("Gather", [f"{stem}/in_shape", index], [width], f"{stem}/width"),
        ]
    out_width, out = f"{stem}/out_width", (relu or node).output[0]
    widths[out] = out_width
    factor = _constant(graph, f"{stem}/kw", np.array([kw], np.int64))
    nodes.append(helper.make_node("Mul", [width, factor], [out_width], f"{stem}/scale_width"))

    # Channels last, as ONNX Runtime runs int8 convolutions (its layout transposes around
    # them cancel against these two): (N, h, w, kh*kw*C) -> (N, h, w, kh, kw*C) -> (N, h, kh,
    # w, kw*C), a move of whole kw*C blocks, = (N, kh*h, kw*w, C); then channels first again.
    split = _constant(graph, f"{stem}/split", np.array([0, 0, 0, kh, -1], np.int64))
    head = _constant(graph, f"{stem}/out_head", np.array([0, -1], np.int64))
    tail = _constant(graph, f"{stem}/out_tail", np.array([c], np.int64))
    nodes += [
        _transpose(phases, f"{stem}/nhwc", [0, 2, 3, 1]),
        helper.make_node("Reshape", [f"{stem}/nhwc", split], [f"{stem}/split_out"], f"{stem}/r1"),
        _transpose(f"{stem}/split_out", f"{stem}/shuffled", [0, 1, 3, 2, 4]),
        helper.make_node("Concat", [head, out_width, tail], [f"{stem}/out_shape"], axis=0),
        helper.make_node(
            "Reshape", [f"{stem}/shuffled", f"{stem}/out_shape"], [f"{stem}/out_nhwc"], f"{stem}/r2"
        ),
        _transpose(f"{stem}/out_nhwc", out, [0, 3, 1, 2]),
    ]
    return nodes


def _constant(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _transpose(tensor: str, out: str, perm: list[int]) -> onnx.NodeProto:
    return helper.make_node("Transpose", [tensor], [out], f"{out}/transpose", perm=perm)
