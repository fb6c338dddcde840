"""Precision variants (float16, INT8 for TensorRT): real exports, their graphs inspected, run on
ONNX Runtime's CPU and judged against the float32 PyTorch original."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from clirun import invoke
from onnx import numpy_helper

from resfuse import runtime
from resfuse.artifacts import load_original, read_manifest
from resfuse.compare import Tolerance, compare
from resfuse.errors import BackendUnavailableError, ConfigError, ManifestError
from resfuse.export.cli import main as export_main
from resfuse.export.pipeline import ExportOptions
from resfuse.export.quantize import Calibration
from resfuse.models import ModelConfig
from resfuse.runtime.check import check_artifact

pytestmark = pytest.mark.slow  # fp16 and INT8 exports

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
INT8, INT64 = onnx.TensorProto.INT8, onnx.TensorProto.INT64
ODD = (1, 3, 97, 131)


def export(*args: str) -> subprocess.CompletedProcess:
    """resfuse-export in this process (tests/test_cli.py runs the console script)."""
    return invoke(export_main, *args)


def _graph(manifest: Path) -> onnx.GraphProto:
    """The artifact's graph, every tensor's type inferred (value_info)."""
    model = onnx.load_model_from_string(read_manifest(manifest).read("onnx"))
    return onnx.shape_inference.infer_shapes(model).graph


def _types(graph: onnx.GraphProto) -> dict[str, int]:
    """The element type of every tensor in the graph, by name."""
    infos = [*graph.value_info, *graph.input, *graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in infos}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _session(manifest: Path) -> ort.InferenceSession:
    model = read_manifest(manifest).read("onnx")
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def _float_io(graph: onnx.GraphProto) -> None:
    assert [v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]] == [FLOAT] * 2


@pytest.mark.parametrize("method", ["masked", "spp"])
def test_fp16_weights_and_activations_are_float16_and_io_float32(fp16, method: str) -> None:
    graph = _graph(fp16[method])
    _float_io(graph)
    types = _types(graph)
    weights = [t for t in graph.initializer if len(t.dims) == 4]  # every conv's
    assert len(weights) >= 20 and all(t.data_type == FLOAT16 for t in weights)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert all(types[n.input[0]] == types[n.output[0]] == FLOAT16 for n in convs)


def test_fp16_keeps_the_sensitive_parts_float32(fp16) -> None:
    masked, spp = _graph(fp16["masked"]), _graph(fp16["spp"])
    for graph, op, count in ((spp, "CumSum", 2), (masked, "Sigmoid", 1)):
        types = _types(graph)
        nodes = [n for n in graph.node if n.op_type == op]
        assert len(nodes) == count
        assert all(types[n.input[0]] == types[n.output[0]] == FLOAT for n in nodes)
    # spp: the integral image's corner lookups and the division by the bin area
    types = _types(spp)
    lookups = [
        n for n in spp.node if n.op_type == "Gather" and types[n.output[0]] in (FLOAT, FLOAT16)
    ]
    assert len(lookups) == 12 and all(types[n.output[0]] == FLOAT for n in lookups)
    divisions = [n for n in spp.node if n.op_type == "Div" and types[n.output[0]] != INT64]
    assert len(divisions) >= 2 and all(types[n.output[0]] == FLOAT for n in divisions)
    # masked: the blend image * (1 - m) | features * m and its concatenation
    types = _types(masked)
    for op in ("Mul", "Sub", "Concat"):
        blend = [
            n for n in masked.node if n.op_type == op and types[n.output[0]] in (FLOAT, FLOAT16)
        ]
        assert blend and all(types[n.output[0]] == FLOAT for n in blend), op


def test_fp16_has_no_float16_round_trips(fp16) -> None:
    """Nothing float32 passes through float16 on its way to another float32 node (the converter
    leaves such pairs where a kept node's output fans out: spp's integral image)."""
    for manifest in fp16.values():
        graph = _graph(manifest)
        producer = {out: node for node in graph.node for out in node.output}
        casts = {n.output[0]: n.attribute[0].i for n in graph.node if n.op_type == "Cast"}
        back = [n for n in graph.node if n.op_type == "Cast" and n.attribute[0].i == FLOAT]
        trips = [n.name for n in back if casts.get(n.input[0]) == FLOAT16]
        assert back and not trips, (manifest.name, trips)
        assert all(
            producer[n.input[0]].op_type != "Cast" for n in graph.node if n.op_type == "Gather"
        )


def test_fp16_passes_the_image_through_exactly(fp16) -> None:
    x = np.random.default_rng(0).standard_normal(ODD, dtype=np.float32)
    out = _session(fp16["spp"]).run(None, {"image": x})[0]
    np.testing.assert_array_equal(out[:, :3], x)
    report = check_artifact(fp16["spp"], shapes=[ODD])
    assert report.passed and report.records[0].passthrough == "exact"


@pytest.mark.parametrize("variant", ["masked", "spp", "int8-trt"])
def test_variants_keep_dynamic_batch_height_and_width(fp16, int8_trt, variant: str) -> None:
    manifest = int8_trt if variant == "int8-trt" else fp16[variant]
    dims = _graph(manifest).input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    with runtime.load(manifest, threads=2) as session:  # device cpu: allowed for each variant
        for h, w in ((97, 131), (64, 200)):
            out = session.run(np.zeros((2, 3, h, w), np.float32))
            assert out.shape == (2, 67, h, w) and out.dtype == np.float32


@pytest.mark.parametrize("variant", ["masked", "spp", "int8-trt"])
def test_parity_at_an_odd_size_within_the_recorded_bound(fp16, int8_trt, variant: str) -> None:
    manifest = int8_trt if variant == "int8-trt" else fp16[variant]
    bound = read_manifest(manifest).tolerance.max_rel_l2
    assert bound == (0.1 if variant == "int8-trt" else 5e-3)
    x = torch.randn(ODD, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = load_original(manifest)(x).numpy()
    out = _session(manifest).run(None, {"image": x.numpy()})[0]
    stats = compare(reference, out, Tolerance(max_rel_l2=bound))
    assert stats.passed and stats.rel_l2 > 1e-4  # within the bound, and really not float32


def test_int8_for_tensorrt_is_symmetric_qdq(int8_trt) -> None:
    graph = _graph(int8_trt)
    _float_io(graph)
    init = {t.name: t for t in graph.initializer}
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) >= 20 and all(n.input[0] not in init for n in quantize)  # activations
    for node in quantize:
        zero = init[node.input[2]]
        assert zero.data_type == INT8 and not numpy_helper.to_array(zero).any(), node.name
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init]
    assert len(weights) >= 20  # every convolution's; biases stay float (TensorRT takes no int32)
    for node in weights:
        w = numpy_helper.to_array(init[node.input[0]])
        scale, zero = (numpy_helper.to_array(init[name]) for name in node.input[1:3])
        axis = next(a.i for a in node.attribute if a.name == "axis")
        assert w.dtype == np.int8 and -127 <= w.min() and w.max() <= 127  # TensorRT's range
        assert axis == 0 and scale.shape == zero.shape == (w.shape[0],) and not zero.any()


def test_manifests_name_their_targets_and_float32_source(fp16, int8_trt, exported) -> None:
    for method, manifest in fp16.items():
        data = json.loads(manifest.read_text())
        assert data["name"] == f"{method}-resnet18-fp16" and data["precision"] == "float16"
        assert data["targets"] == ["cpu", "cuda", "tensorrt"]
        assert data["parity"]["max_rel_l2"] == 5e-3 and "quantization" not in data
        source = exported[method].files["onnx"]["sha256"]  # the same command without fp16
        assert data["source"] == {"name": f"{method}-resnet18", "onnx_sha256": source}
    data = json.loads(int8_trt.read_text())
    assert (data["precision"], data["targets"]) == ("int8", ["cpu", "cuda", "tensorrt"])
    assert data["quantization"]["activations"] == "int8, symmetric (zero point 0), per tensor"
    # TensorRT has int8 deconvolutions and fuses ReLUs itself: the graph is quantized as it is,
    # transposed convolutions and residual Adds included
    quantization = data["quantization"]
    assert (quantization["ops"], quantization["rewrites"]) == (["Conv", "ConvTranspose", "Add"], [])
    assert data["source"]["name"] == "masked-resnet18"
    assert read_manifest(int8_trt).targets == data["targets"]


def _edited(manifest: Path, folder: Path, **changes: Any) -> Path:
    """A copy of an artifact whose manifest has `changes` (None deletes a field)."""
    data = json.loads(manifest.read_text())
    for key in ("onnx", "weights"):
        shutil.copy(manifest.parent / data["files"][key]["path"], folder)
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    copy = folder / manifest.name
    copy.write_text(json.dumps(data))
    return copy


def test_a_device_outside_the_targets_is_refused_with_the_reason(fp16, tmp_path: Path) -> None:
    only_trt = _edited(fp16["masked"], tmp_path, targets=["tensorrt"])
    with pytest.raises(ConfigError, match=r"\(float16\) is made for tensorrt, not 'cpu'"):
        runtime.load(only_trt)
    # inside its targets the check passes; only the missing GPU provider stops it here
    with pytest.raises(BackendUnavailableError, match="TensorrtExecutionProvider"):
        runtime.load(fp16["masked"], device="tensorrt")


def test_manifests_without_targets_get_them_from_their_precision(
    exported, int8_trt, tmp_path: Path
) -> None:
    """INT8 artifacts from before `targets` had uint8 activations: the CPU only."""
    (tmp_path / "f32").mkdir()
    old_f32 = _edited(exported["spp"].manifest_path, tmp_path / "f32", targets=None)
    assert read_manifest(old_f32).targets == ["cpu", "cuda", "tensorrt"]
    old_int8 = _edited(int8_trt, tmp_path, targets=None, source=None)
    assert read_manifest(old_int8).targets == ["cpu"]
    with pytest.raises(ConfigError, match="uint8 .* TensorRT does not take them"):
        runtime.load(old_int8, device="tensorrt")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("targets", ["gpu"], "field 'targets' must be a list of cpu, cuda, tensorrt"),
        ("targets", ["cpu", "cpu"], "field 'targets' must be a list"),
        ("targets", [], "field 'targets' must be a list"),
        ("source", "masked-resnet18", "field 'source' must be an object"),
        ("source", {"name": "../x", "onnx_sha256": "0" * 64}, "field 'source.name'"),
        ("source", {"name": "m", "onnx_sha256": "ABC"}, "field 'source.onnx_sha256'"),
        ("precision", "float32", "field 'source' must be absent for a float32 artifact"),
    ],
)
def test_bad_targets_and_source_are_named(
    fp16, tmp_path: Path, field: str, value: object, message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        read_manifest(_edited(fp16["masked"], tmp_path, **{field: value}))


@pytest.mark.parametrize(
    "options,message",
    [
        (ExportOptions(target="tensorrt"), "applies to --precision int8 only; a float32"),
        (ExportOptions(precision="float16", target="cpu"), "a float16 artifact is the same graph"),
        (
            ExportOptions(precision="int8", calibration=Calibration(), target="gpu"),
            "--target 'gpu' is not one",
        ),
        (ExportOptions(precision="float16", calibration=Calibration()), "two precisions at once"),
        (ExportOptions(max_rel_l2=0.01), "--max-rel-l2 bounds the fp16 and int8 variants"),
    ],
)
def test_contradictory_precision_options(options: ExportOptions, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        options.contract(ModelConfig("masked"))


@pytest.mark.parametrize(
    "args,text",
    [
        (["--precision", "fp8"], "'fp8' is not one of 'fp32', 'fp16', 'int8'"),
        (["--precision", "fp16", "--target", "tensorrt"], "--target picks the INT8 activation"),
        (["--int8", "--precision", "fp16"], "--int8 means --precision int8 and contradicts"),
        (["--precision", "fp16", "--calib-random"], "--calib-images and --calib-random"),
    ],
)
def test_bad_precision_flags_are_one_clear_line(tmp_path: Path, args: list[str], text: str) -> None:
    proc = export("--method", "masked", *args, "--output", str(tmp_path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert any(text in line for line in proc.stderr.splitlines()), proc.stderr
    assert list(tmp_path.iterdir()) == []
