"""Transposed convolutions with kernel = stride rewritten as convolutions: same values on real
ONNX Runtime at odd sizes, and every other transposed convolution left as it was."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from resfuse.export.subpixel import subpixel_convtranspose


def _chain(
    kernels: list[tuple[int, int]],
    relu: bool = True,
    bias: bool = True,
    channels: tuple[int, ...] = (5, 4, 3),
    **attrs: object,
) -> onnx.ModelProto:
    """x -> [ConvTranspose (kernel = stride) -> ReLU] per kernel; (N, C, h, w) all dynamic."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, (kh, kw) in enumerate(kernels):
        cin, cout = channels[i], channels[i + 1]
        weight = numpy_helper.from_array(
            rng.standard_normal((cin, cout, kh, kw)).astype(np.float32), f"w{i}"
        )
        inits.append(weight)
        inputs = [x, f"w{i}"]
        if bias:
            inits.append(
                numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"b{i}")
            )
            inputs.append(f"b{i}")
        strides = attrs.get("strides", [kh, kw])
        extra = {k: v for k, v in attrs.items() if k != "strides"}
        nodes.append(
            helper.make_node(
                "ConvTranspose", inputs, [f"up{i}"], f"up{i}", strides=strides, **extra
            )
        )
        x = f"up{i}"
        if relu:
            nodes.append(helper.make_node("Relu", [x], [f"relu{i}"], f"relu{i}"))
            x = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", channels[0], "h", "w"])],
        [
            helper.make_tensor_value_info(
                x, TensorProto.FLOAT, ["n", channels[len(kernels)], "H", "W"]
            )
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


@pytest.mark.parametrize(
    "kernels,relu,bias",
    [
        ([(2, 2), (2, 2)], True, True),  # upsample's blocks, chained: one Shape for both
        ([(2, 2)], False, False),
        ([(2, 3), (3, 2)], True, False),  # non-square kernels
    ],
)
def test_rewrite_gives_the_same_values(kernels, relu: bool, bias: bool) -> None:
    original = _chain(kernels, relu, bias)
    rewritten = subpixel_convtranspose(_copy(original))
    onnx.checker.check_model(rewritten, full_check=True)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "ConvTranspose" not in ops and ops.count("Conv") == len(kernels)
    assert ops.count("Shape") == 1  # widths are carried from block to block
    assert ops.count("Relu") == (len(kernels) if relu else 0)
    for shape in [(1, 5, 7, 9), (2, 5, 1, 1), (3, 5, 4, 13)]:
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        expected, got = _run(original, x), _run(rewritten, x)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_relu_moves_before_the_shuffle() -> None:
    # ReLU commutes with the shuffle; right after the convolution, quantization folds it into
    # the convolution's uint8 output range.
    rewritten = subpixel_convtranspose(_chain([(2, 2)]))
    producer = {out: n for n in rewritten.graph.node for out in n.output}
    relu = next(n for n in rewritten.graph.node if n.op_type == "Relu")
    assert producer[relu.input[0]].op_type == "Conv"
    assert rewritten.graph.output[0].name == "relu0"  # the graph's names are kept


@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": [1, 1]},  # overlapping blocks
        {"pads": [1, 1, 1, 1]},
        {"output_shape": [8, 8]},
        {"dilations": [2, 2]},
    ],
    ids=["stride-1", "padded", "output-shape", "dilated"],
)
def test_other_transposed_convolutions_are_left_alone(attrs: dict) -> None:
    model = _chain([(2, 2)], **attrs)
    before = model.SerializeToString()
    assert subpixel_convtranspose(model).SerializeToString() == before


def test_weights_computed_in_the_graph_are_left_alone() -> None:
    model = _chain([(2, 2)], bias=False)
    graph = model.graph
    weight = graph.initializer.pop()
    graph.input.append(helper.make_tensor_value_info(weight.name, TensorProto.FLOAT, weight.dims))
    before = model.SerializeToString()
    assert subpixel_convtranspose(model).SerializeToString() == before


def test_a_relu_that_is_not_the_only_reader_stays_where_it_is() -> None:
    model = _chain([(2, 2)])
    graph = model.graph
    graph.output.append(helper.make_tensor_value_info("up0", TensorProto.FLOAT, None))
    rewritten = subpixel_convtranspose(_copy(model))
    producer = {out: n for n in rewritten.graph.node for out in n.output}
    relu = next(n for n in rewritten.graph.node if n.op_type == "Relu")
    assert producer[relu.input[0]].op_type == "Transpose"  # after the shuffle, reading up0
    x = np.random.default_rng(2).standard_normal((1, 5, 3, 4)).astype(np.float32)
    session = ort.InferenceSession(
        rewritten.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, expected in zip(
        session.run(None, {"x": x}), reference.run(None, {"x": x}), strict=True
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
