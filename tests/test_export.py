import errno
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import resfuse
from resfuse.artifacts import read_manifest, sha256_of
from resfuse.contract import InputContract, Range
from resfuse.errors import ArtifactWriteError, ConfigError, ExportError, ManifestError, ParityError
from resfuse.export import onnx as onnx_export
from resfuse.export import pipeline
from resfuse.export.pipeline import ExportOptions, export_artifact
from resfuse.models import METHODS, ModelConfig
from resfuse.shapes import parity_shapes

_SESSIONS: dict = {}


def _session(path: Path) -> ort.InferenceSession:
    if path not in _SESSIONS:
        _SESSIONS[path] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _SESSIONS[path]


def _check_parity(result, shape: tuple[int, ...]) -> None:
    model = resfuse.load_original(str(result.manifest_path))
    x = torch.randn(shape)
    with torch.inference_mode():
        expected = model(x).numpy()
    got = _session(result.onnx_path).run(None, {"image": x.numpy()})[0]
    assert got.shape == expected.shape == (shape[0], 67, *shape[2:])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(4, 3, 200, 333), (1, 3, 1024, 40), (1, 3, 35, 1000)])
def test_parity_at_shapes_the_export_never_saw(exported, method: str, shape) -> None:
    _check_parity(exported[method], shape)


@given(
    method=st.sampled_from(list(METHODS)),
    h=st.integers(32, 300),
    w=st.integers(32, 300),
    batch=st.integers(1, 3),
)
@example(method="spp", h=32, w=32, batch=1)  # the minimum: one stride-32 cell
@example(method="masked", h=33, w=65, batch=2)  # k * stride + 1: a 1-pixel last cell
@example(method="upsample", h=300, w=33, batch=1)  # tall
@example(method="masked", h=32, w=300, batch=1)  # wide
def test_parity_at_sizes_drawn_by_hypothesis(
    exported, method: str, h: int, w: int, batch: int
) -> None:
    _check_parity(exported[method], (batch, 3, h, w))


@pytest.mark.parametrize("method", METHODS)
def test_graph_axes_are_symbolic(exported, method: str) -> None:
    graph = onnx.load(exported[method].onnx_path).graph
    for value in (graph.input[0], graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims[:1] + dims[2:]] == ["batch", "height", "width"]
    assert graph.input[0].name == "image" and graph.output[0].name == "fused"
    onnx.checker.check_model(exported[method].onnx_path, full_check=True)


@pytest.mark.parametrize("method", METHODS)
def test_manifest_describes_and_pins_the_artifact(exported, method: str) -> None:
    result = exported[method]
    data = json.loads(result.manifest_path.read_text())
    assert data["format"] == "resfuse-artifact" and data["format_version"] == 2
    assert data["model"] == {
        "method": method,
        "backbone": "resnet18",
        "stage": 4,
        "in_channels": 3,
        "num_classes": None,
        "features": 64,
        "levels": [1, 2, 4],
    }
    assert data["input"]["contract"] == {
        "channels": 3,
        "height": {"min": 32, "max": 1024},
        "width": {"min": 32, "max": 1024},
        "batch": {"min": 1, "max": 32},
        "dtype": "float32",
    }
    assert data["output"] == {
        "name": "fused",
        "channels": 67,
        "layout": "NCHW",
        "size": "same as input",
    }
    for key, path in (("onnx", result.onnx_path), ("weights", result.weights_path)):
        assert data["files"][key]["sha256"] == sha256_of(path)
        assert data["files"][key]["bytes"] == path.stat().st_size
    assert data["files"]["onnx"]["opset"] == 18
    assert data["precision"] == "float32" and "source" not in data  # it is its own source
    assert data["targets"] == ["cpu", "cuda", "tensorrt"]
    assert {"torch", "onnx", "onnxruntime"} <= set(data["versions"])
    shapes = [tuple(r["shape"]) for r in data["parity"]["results"]]
    assert shapes == parity_shapes(read_manifest(result.manifest_path).contract)
    assert all(r["passed"] and r["max_abs"] <= 1e-4 for r in data["parity"]["results"])


def test_load_original_reproduces_the_exported_weights(exported) -> None:
    result = exported["spp"]
    a = resfuse.load_original(str(result.manifest_path))
    b = resfuse.load_original(str(result.manifest_path))
    assert not a.training
    x = torch.randn(2, 3, 70, 90)
    with torch.inference_mode():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
        assert not torch.equal(a(x), resfuse.build_model("spp")(x))


def test_tampered_weights_are_refused(exported, tmp_path: Path) -> None:
    src = exported["masked"]
    for path in (src.manifest_path, src.onnx_path, src.weights_path):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    weights = tmp_path / src.weights_path.name
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ManifestError, match="does not match the size and sha256"):
        resfuse.load_original(str(tmp_path / src.manifest_path.name))
    weights.unlink()
    with pytest.raises(ManifestError, match="is missing"):
        resfuse.load_original(str(tmp_path / src.manifest_path.name))


@pytest.mark.parametrize(
    "content,message",
    [
        ("{", "cannot read manifest"),
        ('{"format": "other"}', "is not a resfuse manifest"),
        ('{"format": "resfuse-artifact", "format_version": 1}', "field 'model' must be an object"),
    ],
)
def test_bad_manifests(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "m.json").write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path / "m.json")
    with pytest.raises(ManifestError, match="no manifest at"):
        read_manifest(tmp_path / "absent.onnx")


def test_variant_stage_head_grayscale_static_batch(out_dir: Path) -> None:
    config = ModelConfig(
        "spp", "resnet34", stage=3, in_channels=1, num_classes=2, features=16, levels=(1, 3, 6)
    )
    result = export_artifact(config, out_dir, ExportOptions(min_size=16, max_size=512, max_batch=1))
    graph = onnx.load(result.onnx_path).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1 and dims[2].dim_param == "height"
    assert graph.output[0].name == "logits"
    model = resfuse.load_original(str(result.manifest_path))
    x = torch.randn(1, 1, 16, 113)
    with torch.inference_mode():
        expected = model(x).numpy()
    got = _session(result.onnx_path).run(None, {"image": x.numpy()})[0]
    assert got.shape == (1, 2, 16, 113)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_parity_failure_leaves_the_earlier_artifact(exported, out_dir: Path) -> None:
    earlier = exported["spp"]
    for path in (earlier.manifest_path, earlier.onnx_path, earlier.weights_path):
        shutil.copy(path, out_dir)
    before = _snapshot(out_dir)
    with pytest.raises(ParityError, match="nothing was written"):
        export_artifact(ModelConfig("spp"), out_dir, ExportOptions(atol=0, rtol=0, max_size=512))
    assert _snapshot(out_dir) == before


def test_a_failure_while_writing_keeps_the_earlier_artifact(
    exported, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure comes after the .onnx is in place and half the weights are written."""
    earlier = exported["upsample"]
    for path in (earlier.manifest_path, earlier.onnx_path, earlier.weights_path):
        shutil.copy(path, out_dir)
    before = _snapshot(out_dir)

    def disk_full(model: torch.nn.Module, path: Path) -> None:
        Path(path).write_bytes(b"\0" * 1_000_000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "save_weights", disk_full)
    with pytest.raises(ArtifactWriteError, match="No space left on device.*was not changed"):
        export_artifact(ModelConfig("upsample"), out_dir, ExportOptions(max_size=256, seed=3))
    after = _snapshot(out_dir)
    assert after.pop(".upsample-resnet18.lock") == b""
    assert after == before
    assert resfuse.load_original(str(out_dir / earlier.manifest_path.name)) is not None


def test_a_specialised_graph_is_refused() -> None:
    static = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 3, 64, 64])
    graph = onnx.helper.make_graph([], "g", [static], [static])
    contract = InputContract(3, Range(32, 64), Range(32, 64), Range(1, 4))
    with pytest.raises(ExportError, match="fixed the batch axis to 1"):
        onnx_export.check_dynamic_axes(onnx.helper.make_model(graph), contract)


@pytest.mark.parametrize(
    "options,message",
    [
        (ExportOptions(min_size=16), "--min-size 16 is below the smallest input"),
        (ExportOptions(min_size=256, max_size=128), "larger than --max-size 128"),
        (ExportOptions(max_batch=0), "--max-batch must be at least 1"),
        (ExportOptions(opset=9), "--opset 9 is outside"),
    ],
)
def test_option_errors(options: ExportOptions, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        options.contract(ModelConfig("masked"))


def _two_slices(shared_output: bool = False, second_axis: int = 3) -> onnx.ModelProto:
    """x[:, :, :H, :W] as the exporter writes it: one Slice per axis, ends read from `like`."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, values: list[int]) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, np.int64), name)

    nodes = [
        helper.make_node("Shape", ["like"], ["shape"]),
        helper.make_node("Gather", ["shape", "i2"], ["h"], axis=0),
        helper.make_node("Gather", ["shape", "i3"], ["w"], axis=0),
        helper.make_node("Slice", ["x", "zero", "h", "axis2", "one"], ["rows"]),
        helper.make_node("Slice", ["rows", "zero", "w", "axis_b", "one"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, "h", "w"])]
    if shared_output:
        outputs.append(
            helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["b", 4, "h", "w8"])
        )
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, "h8", "w8"])
    like = helper.make_tensor_value_info("like", TensorProto.FLOAT, ["b", 1, "h", "w"])
    inits = [const("i2", [2]), const("i3", [3]), const("zero", [0]), const("one", [1])]
    inits += [const("axis2", [2]), const("axis_b", [second_axis])]
    graph = helper.make_graph(nodes, "crop", [image, like], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray, like: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "like": like})


def test_per_axis_crops_merge_into_one_slice_with_the_same_output() -> None:
    original = _two_slices()
    merged = onnx_export.merge_slices(_two_slices())
    onnx_export.check_model(merged)
    assert [n.op_type for n in merged.graph.node].count("Slice") == 1
    rng = np.random.default_rng(0)
    for h, w in [(5, 7), (16, 16), (1, 9)]:
        x = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
        like = np.zeros((2, 1, h, w), np.float32)
        expected, got = _run(original, x, like), _run(merged, x, like)
        assert got[0].shape == (2, 4, h, w)
        np.testing.assert_array_equal(got[0], expected[0])


@pytest.mark.parametrize(
    "model",
    [_two_slices(shared_output=True), _two_slices(second_axis=2)],
    ids=["first-crop-also-an-output", "same-axis-twice"],
)
def test_slices_that_cannot_merge_are_left_alone(model: onnx.ModelProto) -> None:
    before = model.SerializeToString()
    assert onnx_export.merge_slices(model).SerializeToString() == before


@pytest.mark.parametrize("method", METHODS)
def test_no_full_resolution_tensor_is_copied_to_crop_it(exported, method: str) -> None:
    # spp and masked interpolate straight to H x W (no crop at all); upsample crops its
    # transposed convolutions' output once, not once per axis.
    ops = [n.op_type for n in onnx.load(exported[method].onnx_path).graph.node]
    assert ops.count("Slice") == (1 if method == "upsample" else 0)
    assert "Resize" not in ops or method == "spp"  # spp resizes only its pooled bins
