"""A float16 graph widened to float32 on the wire (resfuse.onnx_wire.widen_float16), without the
`onnx` package, and the onnxruntime backend's `fp16_arithmetic` that uses it: what an ARM core
with FP16 arithmetic runs instead of ONNX Runtime's float16 kernels (docs/edge.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from resfuse import runtime
from resfuse.artifacts import read_manifest
from resfuse.errors import ConfigError
from resfuse.onnx_wire import widen_float16
from resfuse.runtime.machine import fp16_arithmetic


def _float16_anywhere(graph: onnx.GraphProto) -> list[str]:
    """onnx's own walk: every float16 tensor, type or data type attribute in `graph`."""
    found = [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT16]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            found.append(value.name)
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "dtype") and attr.i == TensorProto.FLOAT16:
                found.append(f"{node.name or node.op_type}.{attr.name}")
            tensors = [attr.t] * attr.HasField("t") + list(attr.tensors)
            found += [f"{node.op_type}.{attr.name}" for t in tensors if t.data_type == 10]
            for sub in [attr.g] * attr.HasField("g") + list(attr.graphs):
                found += _float16_anywhere(sub)
    return found


def _run(model: bytes, x: np.ndarray, **feeds: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x, **feeds})[0]


@pytest.mark.parametrize("method", ["masked", "spp"])  # spp: its integral image kept float32
def test_an_artifact_widened_holds_its_float16_weights_in_float32(
    fp16, exported, method: str
) -> None:
    """The suite's fp16 artifacts: no float16 left, a valid model, every weight the float16 value
    exactly, and the output that of x86's ONNX Runtime on the float16 graph (which computes it in
    float32 after casts), still inside the artifact's gate against the float32 artifact."""
    manifest = read_manifest(fp16[method])
    half_bytes = manifest.read("onnx")
    half, wide = onnx.load_from_string(half_bytes), onnx.load_from_string(widen_float16(half_bytes))
    onnx.checker.check_model(wide, full_check=True)
    assert _float16_anywhere(half.graph) and not _float16_anywhere(wide.graph)
    assert not wide.graph.value_info  # stale types dropped: ONNX Runtime infers them again
    halves = {t.name: numpy_helper.to_array(t) for t in half.graph.initializer}
    for tensor in wide.graph.initializer:
        before = halves[tensor.name]
        if before.dtype == np.float16:
            assert tensor.data_type == TensorProto.FLOAT
            np.testing.assert_array_equal(numpy_helper.to_array(tensor), before.astype(np.float32))
        else:  # integers and float32 weights untouched
            np.testing.assert_array_equal(numpy_helper.to_array(tensor), before)

    x = np.random.default_rng(0).standard_normal((2, 3, 97, 131), dtype=np.float32)
    widened, as_shipped = _run(wide.SerializeToString(), x), _run(half_bytes, x)
    original = _run(exported[method].onnx_path.read_bytes(), x)

    def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    # masked 4e-7: x86 computes all of it in float32; spp 1.4e-4: x86's ONNX Runtime still runs
    # a few of its float16 nodes in float16, which the widened graph does not
    assert rel_l2(widened, as_shipped) < 1e-3
    off, shipped_off = rel_l2(widened, original), rel_l2(as_shipped, original)
    assert off <= min(1.01 * shipped_off, manifest.tolerance.max_rel_l2), (off, shipped_off)


def _tiny_graph() -> onnx.ModelProto:
    """Every place a float16 hides that widening must reach: a Cast to float16, an initializer
    in int32_data (onnx's own float16 layout), a Constant node's raw tensor, a Constant inside an
    If's branches, a ConstantOfShape's value, and a float16 graph output."""
    weight = helper.make_tensor("w", TensorProto.FLOAT16, [3], np.float16([0.1, -2.5, 3.3]))
    assert weight.int32_data and not weight.raw_data
    raw = numpy_helper.from_array(np.float16([1.7, 0.2, -0.9]), "c")  # raw_data
    branch_value = numpy_helper.from_array(np.float16([0.5, 0.25, 0.125]), "b")
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["b_out"], value=branch_value)],
        "branch",
        [],
        [helper.make_tensor_value_info("b_out", TensorProto.FLOAT16, [3])],
    )
    fill = helper.make_tensor("fill", TensorProto.FLOAT16, [1], np.float16([0.3]))
    nodes = [
        helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
        helper.make_node("Add", ["xh", "w"], ["a"]),
        helper.make_node("Constant", [], ["c_out"], value=raw),
        helper.make_node("Mul", ["a", "c_out"], ["m"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=branch, else_branch=branch),
        helper.make_node("Sub", ["m", "branch"], ["s"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["filled"], value=fill),
        helper.make_node("Add", ["s", "filled"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [3])],
        initializer=[weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_every_float16_a_graph_can_hold_is_widened() -> None:
    """Widened, the tiny graph computes in float32 on its float16 constants: equal to numpy's
    float32 arithmetic, where the float16 graph rounds after every node."""
    model = _tiny_graph()
    onnx.checker.check_model(model, full_check=True)
    wide = onnx.load_from_string(widen_float16(model.SerializeToString()))
    onnx.checker.check_model(wide, full_check=True)
    assert _float16_anywhere(model.graph) and not _float16_anywhere(wide.graph)

    x, cond = np.float32([1.001, 2.002, -3.003]), np.array(True)
    constants = [np.float16(v).astype(np.float32) for v in ([0.1, -2.5, 3.3], [1.7, 0.2, -0.9])]
    branch, fill = np.float16([0.5, 0.25, 0.125]).astype(np.float32), np.float32(np.float16(0.3))
    expected = (x + constants[0]) * constants[1] - branch + fill
    got = _run(wide.SerializeToString(), x, cond=cond)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    in_float16 = _run(model.SerializeToString(), x, cond=cond)
    assert in_float16.dtype == np.float16  # and rounded: 5e-5 off at 1.67
    assert np.abs(in_float16 - expected).max() > 1e-5


def test_a_graph_without_float16_computes_the_same(exported) -> None:
    data = exported["masked"].onnx_path.read_bytes()
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 96), dtype=np.float32)
    np.testing.assert_array_equal(_run(widen_float16(data), x), _run(data, x))


def test_the_runner_widens_as_asked_and_says_so(fp16) -> None:
    """x86 has no float16 arithmetic: `auto` leaves the graph to ONNX Runtime (float32 after
    casts), `float32` widens it at load; both give the same numbers here. A float32 artifact
    says nothing of it, and an unknown value is one line naming the choices."""
    assert fp16_arithmetic() is False  # this machine is x86 (the aarch64 side: test_edge_check)
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 96), dtype=np.float32)
    outputs, said = {}, {}
    for mode in ("auto", "float32", "native"):
        with runtime.load(fp16["masked"], fp16_arithmetic=mode) as session:
            outputs[mode] = np.asarray(session.run(x))
            said[mode] = session.runner.describe()["fp16_arithmetic"]
    assert said == {
        "auto": "float32 (after casts)",
        "float32": "float32 (widened at load)",
        "native": "float32 (after casts)",
    }
    rel = np.linalg.norm(outputs["float32"] - outputs["auto"]) / np.linalg.norm(outputs["auto"])
    assert rel < 1e-5, rel


def test_fp16_arithmetic_is_an_fp16_cpu_matter(exported, fp16) -> None:
    with runtime.load(exported["masked"].manifest_path, fp16_arithmetic="float32") as session:
        assert "fp16_arithmetic" not in session.runner.describe()
    with pytest.raises(ConfigError, match=r"fp16_arithmetic must be one of \('auto', 'float32'"):
        runtime.load(fp16["masked"], fp16_arithmetic="half")


def test_the_option_is_in_the_runtime_docs() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs/runtime.md").read_text()
    assert "| `onnxruntime` | `fp16_arithmetic` |" in page
