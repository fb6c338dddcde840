"""INT8 export: real calibration, a real QDQ graph in ONNX Runtime, judged against PyTorch."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from PIL import Image

from resfuse.artifacts import load_original
from resfuse.compare import Tolerance, compare
from resfuse.contract import InputContract, Range
from resfuse.errors import ConfigError, InputContractError, ParityError
from resfuse.export.pipeline import ExportOptions, ExportResult, export_artifact
from resfuse.export.quantize import Calibration, quantize_int8
from resfuse.models import ModelConfig
from resfuse.runtime import load
from resfuse.runtime.bench import _record, benchmark
from resfuse.runtime.check import check_artifact
from resfuse.runtime.cli import bench_main
from resfuse.runtime.inputs import load_image

pytestmark = pytest.mark.slow  # INT8 exports

EXE = Path(sys.executable).with_name("resfuse-export")
PREPROCESS = {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="module")
def calib_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smooth gradients with noise, at several sizes: something like images, unlike N(0, 1)."""
    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(96, 128), (200, 150), (64, 64), (130, 90), (75, 300)]):
        ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
        pixels = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "README.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def int8(calib_images: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    options = ExportOptions(
        max_size=512, precision="int8", calibration=Calibration(calib_images, count=4, size=128)
    )
    return export_artifact(ModelConfig("masked"), tmp_path_factory.mktemp("int8"), options)


def test_calibration_inputs_from_images_and_random(calib_images: Path) -> None:
    contract = InputContract(3, Range(32, 512), Range(32, 512), Range(1, 4))
    batches = Calibration(calib_images, count=3, size=100).inputs(contract, PREPROCESS, seed=0)
    assert [b.shape for b in batches] == [(1, 3, 100, 100)] * 3
    with Image.open(calib_images / "img0.png") as image:
        expected = load_image(
            image.resize((100, 100), Image.Resampling.BILINEAR), PREPROCESS, contract
        )
    np.testing.assert_array_equal(batches[0], expected)
    small = Calibration(None, count=2, size=8).inputs(contract, PREPROCESS, seed=3)
    assert [b.shape for b in small] == [(1, 3, 32, 32)] * 2  # clamped to the contract's minimum
    again = Calibration(None, count=2, size=8).inputs(contract, PREPROCESS, seed=3)
    np.testing.assert_array_equal(small[1], again[1])


@pytest.mark.parametrize(
    "kwargs,text",
    [
        ({"count": 0}, "--calib-count must be at least 1"),
        ({"images": Path("/nonexistent")}, "--calib-images /nonexistent is not a folder"),
    ],
)
def test_bad_calibration_is_refused(kwargs, text) -> None:
    with pytest.raises(ConfigError, match=text):
        Calibration(**kwargs)


def test_unreadable_calibration_image_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    contract = InputContract(3, Range(32, 512), Range(32, 512), Range(1, 4))
    with pytest.raises(ConfigError, match="cannot read calibration image .*broken.png"):
        Calibration(tmp_path, count=1, size=64).inputs(contract, PREPROCESS, seed=0)


def test_int8_artifact_is_quantized_dynamic_and_recorded(int8: ExportResult, exported) -> None:
    graph = onnx.load(int8.onnx_path).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DequantizeLinear") >= 20 and "QuantizeLinear" in ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 20  # every convolution's weights
    assert int8.onnx_bytes < 0.4 * exported["masked"].onnx_bytes
    manifest = json.loads(int8.manifest_path.read_text())
    assert int8.name == "masked-resnet18-int8" and manifest["precision"] == "int8"
    assert manifest["targets"] == ["cpu"]  # uint8 activations: see test_precision.py for TensorRT
    # made from the float32 graph of its own input range (min 64): not `exported`'s (min 32)
    source = manifest["source"]
    assert source["name"] == "masked-resnet18" and len(source["onnx_sha256"]) == 64
    assert source["onnx_sha256"] != exported["masked"].files["onnx"]["sha256"]
    assert manifest["quantization"]["calibration"]["count"] == 4
    assert manifest["parity"]["max_rel_l2"] == 0.1
    shapes = [tuple(r["shape"]) for r in manifest["parity"]["results"]]
    assert (3, 3, 65, 77) in shapes and (1, 3, 257, 311) in shapes
    for r in manifest["parity"]["results"]:
        assert r["passed"] and 1e-4 < r["rel_l2"] <= 0.1  # really quantized, and close
    assert manifest["input"]["contract"]["height"]["min"] == 64  # two cells by default
    with load(int8.manifest_path) as session:
        assert session.run(np.zeros((2, 3, 65, 77), np.float32)).shape == (2, 67, 65, 77)
        with pytest.raises(InputContractError, match="height 33 is outside .* 64..512"):
            session.run(np.zeros((1, 3, 33, 45), np.float32))


def test_check_uses_the_recorded_bound_and_fails_a_tighter_one(int8: ExportResult) -> None:
    shapes = [(1, 3, 96, 128)]
    report = check_artifact(int8.manifest_path, shapes=shapes)
    assert report.passed and report.precision == "int8"
    assert report.tolerance == Tolerance(1e-4, 1e-4, 0.1)
    assert report.records[0].passthrough.startswith("image*(1-mask)")
    assert not check_artifact(int8.manifest_path, shapes=shapes, tolerance=Tolerance()).passed
    tight = Tolerance(max_rel_l2=1e-3)
    assert not check_artifact(int8.manifest_path, shapes=shapes, tolerance=tight).passed


def test_bench_times_float32_and_int8_in_one_run(int8: ExportResult, exported) -> None:
    fp32 = exported["masked"].manifest_path
    result = benchmark(
        fp32, shapes=[(1, 3, 64, 64)], warmup=1, iters=2, rounds=3, also=[int8.manifest_path]
    )
    records = result["records"]
    assert [(r["artifact"], r["backend"], r["precision"]) for r in records] == [
        ("masked-resnet18", "torch", "float32"),
        ("masked-resnet18", "onnxruntime", "float32"),
        ("masked-resnet18-int8", "onnxruntime", "int8"),
    ]
    torch_rounds, int8_rounds = records[0]["round_p50_ms"], records[2]["round_p50_ms"]
    ratios = [t / i for t, i in zip(torch_rounds, int8_rounds, strict=True)]
    assert records[2]["speedup_rounds"] == pytest.approx(ratios)
    assert records[2]["speedup_vs_torch"] == pytest.approx(np.median(ratios))
    # Errors against torch on the timed input: none for torch itself, float32 rounding for
    # ONNX Runtime, quantization for INT8, within the bound its manifest records (0.1).
    assert records[0]["rel_l2"] == records[0]["max_abs"] == 0.0
    assert records[1]["rel_l2"] < 1e-5 and records[1]["max_abs"] < 1e-4
    assert 1e-4 < records[2]["rel_l2"] <= 0.1 and records[2]["max_abs"] > 1e-3
    assert all(r["within_tolerance"] for r in records)
    assert [r["settings"].get("spinning") for r in records] == [None, False, False]
    with pytest.raises(ConfigError, match="not an export of the same PyTorch model"):
        benchmark(fp32, shapes=[(1, 3, 64, 64)], also=[exported["spp"].manifest_path])


def test_bench_records_the_originals_as_float32(int8: ExportResult) -> None:
    """torch and torch-compile rebuild the float32 original, whatever the artifact holds
    (torch.compile compiles on a first call, so nothing compiles here)."""
    expected = {"torch": "float32", "torch-compile": "float32", "onnxruntime": "int8"}
    for backend, precision in expected.items():
        with load(int8.manifest_path, backend, threads=1) as session:
            record = _record(
                session,
                (1, 3, 64, 64),
                np.ones((1, 1)),
                np.zeros((1, 1, 3)),
                warmup=1,
                first_call_ms=1.0,
                error=compare(np.ones(2), np.ones(2), Tolerance()),
                label=backend,
            )
        assert (record.backend, record.precision) == (backend, precision)


def test_bench_times_option_variants_and_names_the_fastest_per_class(
    int8: ExportResult, exported, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    args = [str(exported["masked"].manifest_path), "--also", str(int8.manifest_path)]
    args += ["--backends", "torch,onnxruntime,onnxruntime:spinning=true", "--shapes", "1x3x64x64"]
    args += ["--warmup", "1", "--iters", "2", "--rounds", "2", "--threads", "1", "--json", str(out)]
    result = CliRunner().invoke(bench_main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    records = data["records"]
    assert [(r["backend"], r["precision"], r["settings"].get("spinning")) for r in records] == [
        ("torch", "float32", None),
        ("onnxruntime", "float32", False),  # quiet while others are timed
        ("onnxruntime:spinning=true", "float32", True),  # unless asked otherwise
        ("onnxruntime", "int8", False),
        ("onnxruntime:spinning=true", "int8", True),
    ]
    for precision in ("float32", "int8"):
        fastest = min(
            (r for r in records if r["precision"] == precision), key=lambda r: r["p50_ms"]
        )
        [named] = [f for f in data["fastest"] if f["accuracy_class"] == precision]
        assert (named["artifact"], named["backend"]) == (fastest["artifact"], fastest["backend"])
        assert named["p50_ms"] == fastest["p50_ms"]
    assert "fastest per accuracy class:" in result.stdout
    assert "2 rounds x 2 timed calls" in result.stdout and "load average" in result.stdout


def test_bench_cli_also(int8: ExportResult, exported) -> None:
    bench = EXE.with_name("resfuse-bench")
    args = [str(exported["masked"].manifest_path), "--also", str(int8.manifest_path)]
    args += ["--shapes", "1x3x64x64", "--warmup", "1", "--iters", "2", "--rounds", "2"]
    proc = subprocess.run([str(bench), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| masked-resnet18-int8 | onnxruntime |    cpu |      int8 |" in proc.stdout


def test_too_tight_a_bound_fails_with_a_hint_and_writes_nothing(tmp_path: Path) -> None:
    options = ExportOptions(
        max_size=256, max_rel_l2=1e-4, precision="int8", calibration=Calibration(count=2, size=64)
    )
    with pytest.raises(ParityError, match="calibrate on representative images"):
        export_artifact(ModelConfig("spp"), tmp_path, options)
    assert list(tmp_path.iterdir()) == []


def test_rel_l2_tolerance() -> None:
    ref = np.ones(100, np.float32)
    out = ref + np.float32(0.05)
    assert compare(ref, out, Tolerance(max_rel_l2=0.06)).passed
    assert not compare(ref, out, Tolerance(max_rel_l2=0.04)).passed
    assert not compare(ref, out, Tolerance()).passed
    out[3] = np.nan
    assert not compare(ref, out, Tolerance(max_rel_l2=10.0)).passed
    with pytest.raises(ConfigError, match="must not be negative"):
        Tolerance(max_rel_l2=-1)


def test_the_documented_int8_command_works_with_its_defaults(tmp_path: Path) -> None:
    """`--method masked --int8 --calib-random` once failed its own sweep at 32x32 (0.104)."""
    args = ["--method", "masked", "--int8", "--calib-random", "--output", str(tmp_path)]
    proc = subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "masked-resnet18-int8 (int8)" in proc.stdout and "rel L2 <= 0.1" in proc.stdout
    assert proc.stdout.count("pass") == 6 and "1x3x64x64" in proc.stdout
    manifest = json.loads((tmp_path / "masked-resnet18-int8.json").read_text())
    assert manifest["input"]["contract"]["width"] == {"min": 64, "max": 2048}


def test_int8_is_refused_on_the_tensorrt_ep(int8: ExportResult) -> None:
    with pytest.raises(ConfigError, match="TensorRT does not take"):
        load(int8.manifest_path, device="tensorrt")


@pytest.fixture(scope="module")
def upsample_int8(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    options = ExportOptions(
        max_size=128, precision="int8", calibration=Calibration(count=2, size=128)
    )
    return export_artifact(ModelConfig("upsample"), tmp_path_factory.mktemp("up8"), options)


def _optimized_ops(onnx_path: Path, tmp_path: Path) -> list[str]:
    """The operators ONNX Runtime runs after its own graph optimisations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3  # its note that the file is hardware specific
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


def test_onnx_runtime_runs_every_upsample_convolution_in_int8(
    upsample_int8: ExportResult, exported, tmp_path: Path
) -> None:
    # ONNX Runtime has no int8 ConvTranspose on the CPU: the export rewrites upsample's blocks
    # as convolutions, each ReLU folds into its convolution's uint8 output (no requantizing
    # step), and the shuffles and the crop run on the 8-bit values.
    float_ops = [n.op_type for n in onnx.load(exported["upsample"].onnx_path).graph.node]
    ops = _optimized_ops(upsample_int8.onnx_path, tmp_path)
    assert ops.count("QLinearConv") == float_ops.count("Conv") + float_ops.count("ConvTranspose")
    assert not {"Conv", "FusedConv", "ConvTranspose", "Relu"} & set(ops)
    # Left in float32: the cropped features for the Concat with the image, and the shuffles'
    # width read once off the backbone's features (at 1/32 resolution).
    assert ops.count("DequantizeLinear") == 2
    manifest = json.loads(upsample_int8.manifest_path.read_text())
    assert manifest["quantization"]["ops"] == ["Conv", "Relu"]
    assert manifest["quantization"]["quantized"].startswith("Conv: inputs, weights and outputs")
    assert manifest["quantization"]["rewrites"][0] == (
        "ConvTranspose (kernel = stride) -> Conv + sub-pixel shuffle"
    )


@pytest.mark.parametrize("method", ["upsample", "masked"])
def test_int8_passes_the_image_through_in_float32(method: str, request) -> None:
    # The quantizer hands every reader of the image its 8-bit copy; only convolutions keep it.
    artifact = request.getfixturevalue("upsample_int8" if method == "upsample" else "int8")
    graph = onnx.load(artifact.onnx_path).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    readers = [n for n in graph.node if "image" in n.input]
    assert {n.op_type for n in readers} >= {
        "QuantizeLinear",
        "Concat" if method == "upsample" else "Mul",
    }
    for node in graph.node:
        if node.op_type != "Conv":
            assert not any(name.startswith("image") and name in dequantized for name in node.input)
    report = check_artifact(artifact.manifest_path, shapes=[(2, 3, 97, 113)])
    assert report.passed, report.records[0]
    if method == "upsample":
        assert report.records[0].passthrough == "exact"


@pytest.fixture(scope="module")
def upsample_int8_trt(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """TensorRT's scheme: the transposed convolutions stay (no sub-pixel rewrite), in int8."""
    options = ExportOptions(
        max_size=128,
        precision="int8",
        calibration=Calibration(count=2, size=128),
        target="tensorrt",
    )
    return export_artifact(ModelConfig("upsample"), tmp_path_factory.mktemp("up8trt"), options)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in graph.node for name in node.output}


def _readers(graph: onnx.GraphProto, tensor: str) -> list[str]:
    return [n.op_type for n in graph.node if tensor in n.input]


def test_tensorrt_int8_quantizes_every_transposed_convolution(
    upsample_int8_trt: ExportResult, exported
) -> None:
    graph = onnx.load(upsample_int8_trt.onnx_path).graph
    producer = _producers(graph)
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    float_ops = [n.op_type for n in onnx.load(exported["upsample"].onnx_path).graph.node]
    deconvs = [n for n in graph.node if n.op_type == "ConvTranspose"]
    assert len(deconvs) == float_ops.count("ConvTranspose") == 5
    for node in deconvs:
        data, weights = node.input[:2]
        kinds = [producer[n].op_type if n in producer else "initializer" for n in (data, weights)]
        assert kinds == ["DequantizeLinear"] * 2, node.name
        weight = producer[weights]
        w, scale, zero = (init[name] for name in weight.input)
        axis = next(a.i for a in weight.attribute if a.name == "axis")
        # weights [C_in, C_out, kH, kW]: one scale per output channel, TensorRT's int8 range
        assert axis == 1 and scale.shape == zero.shape == (w.shape[1],) and not zero.any()
        assert w.dtype == np.int8 and -127 <= w.min() and w.max() <= 127
    record = json.loads(upsample_int8_trt.manifest_path.read_text())["quantization"]
    assert (record["ops"], record["rewrites"]) == (["Conv", "ConvTranspose", "Add"], [])
    assert record["quantized"].startswith("Conv and ConvTranspose: inputs, weights and outputs")


def test_tensorrt_int8_residual_adds_read_int8(upsample_int8_trt: ExportResult) -> None:
    graph = onnx.load(upsample_int8_trt.onnx_path).graph
    producer = _producers(graph)
    adds = [n for n in graph.node if n.op_type == "Add"]
    assert len(adds) == 8  # resnet18: two blocks in each of four stages
    for node in adds:  # the branch's convolution and the skip, each dequantized from int8
        kinds = [producer[name].op_type for name in node.input]
        assert kinds == ["DequantizeLinear"] * 2, node.name
        # the sum is not requantized: the ReLU after it is, for its readers
        assert _readers(graph, node.output[0]) == ["Relu"], node.name


def test_tensorrt_int8_leaves_coordinate_arithmetic_float(exported) -> None:
    """masked's resize grid adds offsets to pixel indices: calibrated at one size, int8 would
    clip them at larger ones. Only the Adds that sum a convolution's output are quantized."""
    model = onnx.load(exported["masked"].onnx_path)
    batch = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
    graph = quantize_int8(model, "image", [batch], symmetric=True).graph
    producer = _producers(graph)
    adds = [n for n in graph.node if n.op_type == "Add"]
    residual = {n.name for n in adds if _readers(graph, n.output[0]) == ["Relu"]}
    assert len(residual) == 8 and len(adds) == 14
    for node in adds:
        kinds = [producer[name].op_type if name in producer else "" for name in node.input]
        quantized = kinds == ["DequantizeLinear"] * 2
        assert quantized == (node.name in residual), f"{node.name} reads {kinds}"


def _tensorrt_rtx() -> Any:
    """TensorRT-RTX, which builds on the CPU; a missing or broken install skips, naming the fix."""
    try:
        import tensorrt_rtx
    except (ImportError, OSError) as exc:  # OSError: the bindings without their libraries
        pytest.skip(f"TensorRT-RTX does not import ({exc}); pip install 'resfuse[rtx]'")
    return tensorrt_rtx


def _from_int8(trt: Any, layer: Any, made_by: dict[str, Any]) -> bool:
    """Every input of `layer` is dequantized from an int8 tensor."""
    sources = [made_by[layer.get_input(j).name] for j in range(layer.num_inputs)]
    return all(
        s.type == trt.LayerType.DEQUANTIZE and s.get_input(0).dtype == trt.DataType.INT8
        for s in sources
    )


def _plan(builder: Any, network: Any) -> Any:
    """A plan for one small profile, built fast: what is tested is that it builds."""
    config = builder.create_builder_config()
    config.builder_optimization_level = 0
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 128, 128))
    config.add_optimization_profile(profile)
    return builder.build_serialized_network(network, config)


def test_tensorrt_rtx_builds_int8_deconvolutions(upsample_int8_trt: ExportResult) -> None:
    trt = _tensorrt_rtx()
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)  # holds the weights the network points into
    assert parser.parse(upsample_int8_trt.onnx_path.read_bytes())
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    made_by = {
        layer.get_output(j).name: layer for layer in layers for j in range(layer.num_outputs)
    }
    deconvs = [layer for layer in layers if layer.type == trt.LayerType.DECONVOLUTION]
    assert [layer.num_inputs for layer in deconvs] == [2] * 5  # data and kernel, both int8
    assert all(_from_int8(trt, layer, made_by) for layer in deconvs)
    sums = [  # the residual Adds; the other element-wise layers compute shapes in int64
        layer
        for layer in layers
        if layer.type == trt.LayerType.ELEMENTWISE
        and layer.get_input(0).dtype == trt.DataType.FLOAT
    ]
    assert len(sums) == 8 and all(_from_int8(trt, layer, made_by) for layer in sums)
    plan = _plan(builder, network)
    assert plan is not None and plan.nbytes > 1_000_000  # weights and kernels, not a stub


def test_tensorrt_int8_upsample_keeps_its_parity_bound(upsample_int8_trt: ExportResult) -> None:
    manifest = upsample_int8_trt.manifest_path
    parity = json.loads(manifest.read_text())["parity"]
    assert parity["max_rel_l2"] == 0.1
    assert all(r["passed"] and 1e-4 < r["rel_l2"] <= 0.1 for r in parity["results"])
    # The exact image channels dominate that norm: the features alone meet the bound too.
    x = torch.randn((2, 3, 97, 113), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = load_original(manifest)(x).numpy()[:, 3:]
    with load(manifest) as session:
        features = session.run(x.numpy())[:, 3:]
    stats = compare(reference, features, Tolerance(max_rel_l2=0.1))
    assert stats.passed and stats.rel_l2 > 1e-3, stats


@pytest.fixture(scope="module")
def upsample_head(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    """A float32 1-channel upsample model with a 2-class head: its fused tensor is internal."""
    config = ModelConfig("upsample", in_channels=1, num_classes=2)
    result = export_artifact(config, tmp_path_factory.mktemp("uphead"), ExportOptions(max_size=128))
    return onnx.load(result.onnx_path)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


def test_a_concat_feeding_the_head_runs_in_8_bits_with_the_same_numbers(
    upsample_head: onnx.ModelProto, tmp_path: Path
) -> None:
    # Quantizing each input of the head's Concat with the Concat's scale gives the numbers of
    # quantizing its float32 output, without dequantizing the features to float32 at H x W.
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1, 1, 96, 96), dtype=np.float32) for _ in range(2)]
    fast = quantize_int8(upsample_head, "image", batches)
    slow = quantize_int8(upsample_head, "image", batches, concat_8bit=False)
    onnx.save(fast, tmp_path / "fast.onnx")
    onnx.save(slow, tmp_path / "slow.onnx")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fast_ops = _optimized_ops(tmp_path / "fast.onnx", tmp_path / "a")
    slow_ops = _optimized_ops(tmp_path / "slow.onnx", tmp_path / "b")
    assert "QLinearConcat" in fast_ops
    assert "QLinearConcat" not in slow_ops
    # The features stay 8-bit from the last convolution into the head: the one float32
    # tensor left is the 2-class logits (and the shuffles' width, at 1/32 resolution).
    assert fast_ops.count("DequantizeLinear") == slow_ops.count("DequantizeLinear") - 1
    for shape in [(1, 1, 96, 96), (2, 1, 97, 75)]:
        x = rng.standard_normal(shape, dtype=np.float32)
        np.testing.assert_array_equal(_run(fast, x), _run(slow, x))
