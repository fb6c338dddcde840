"""Real engines on this machine: NVIDIA's TensorRT-RTX builder compiles every method and
precision through resfuse-build's own code (find_or_build, build_plan, the cache), with no GPU.
Only running the plans needs one (tests/test_tensorrt_runtime.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from resfuse.artifacts import read_manifest
from resfuse.engine_manifest import BuildSettings
from resfuse.errors import BackendUnavailableError, ConfigError, ModelLoadError
from resfuse.export import build_cli, engines
from resfuse.export.pipeline import ExportOptions, ExportResult, export_artifact
from resfuse.export.quantize import Calibration
from resfuse.models import METHODS, ModelConfig
from resfuse.profiles import Profile
from resfuse.tensorrt_env import FLAVOURS, import_flavour


def _rtx_absent() -> str | None:
    try:
        import_flavour(FLAVOURS["tensorrt-rtx"])
    except BackendUnavailableError as exc:
        return str(exc)
    return None


pytestmark = [
    pytest.mark.slow,  # TensorRT-RTX engine builds
    pytest.mark.skipif(_rtx_absent() is not None, reason=f"{_rtx_absent()}"),
]
FAST = BuildSettings(builder_level=0)  # what is tested is the build path, not tactic search
TWO = [  # inside every variant's range (INT8 artifacts start at 64: two feature cells)
    Profile((1, 3, 64, 64), (1, 3, 64, 64), (2, 3, 96, 96)),
    Profile((1, 3, 97, 65), (1, 3, 112, 112), (1, 3, 128, 128)),
]
PRECISIONS = {
    "fp16": ExportOptions(max_size=128, precision="float16"),
    "int8": ExportOptions(
        max_size=128,
        precision="int8",
        calibration=Calibration(count=2, size=64),
        target="tensorrt",
        max_rel_l2=1.0,  # random weights, two random calibration inputs: the build is tested
    ),
}


@pytest.fixture(scope="module")
def variants(
    exported: dict[str, ExportResult], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path]:
    """All nine method x precision artifacts: conftest's float32 ones and, beside them here,
    float16 and INT8-for-TensorRT exports of each method."""
    out = tmp_path_factory.mktemp("rtx-variants")
    found = {(m, "fp32"): exported[m].manifest_path for m in METHODS}
    for m in METHODS:
        for name, options in PRECISIONS.items():
            found[(m, name)] = export_artifact(ModelConfig(m), out, options).manifest_path
    return found


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_and_precision_builds_then_hits_the_cache(
    variants: dict[tuple[str, str], Path], tmp_path: Path, method: str, precision: str
) -> None:
    artifact = variants[(method, precision)]
    steps: list[str] = []
    built = engines.find_or_build(
        artifact, TWO, FAST, tmp_path, engine="tensorrt-rtx", progress=steps.append
    )
    record = built.record
    assert len(steps) == 1 and steps[0].startswith("building the TensorRT-RTX engine")
    manifest = read_manifest(artifact)
    assert record.precision == manifest.precision and record.profiles == tuple(TWO)
    assert record.environment.flavour == "tensorrt-rtx"
    assert record.environment.compute_capability == "8.6,8.9,12.0"  # no GPU: the portable set
    assert len(built.plan) == record.plan_bytes > 1_000_000  # weights and kernels, not a stub
    assert engines.read_engine(record.path).plan == built.plan  # the sidecar verifies

    again = engines.find_or_build(
        artifact, TWO, FAST, tmp_path, engine="tensorrt-rtx", progress=steps.append
    )
    assert again.record == record and len(steps) == 1  # a cache hit: nothing was built


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig("upsample", backbone="resnet34", stage=3),
        ModelConfig("spp", stage=2, num_classes=4),
        ModelConfig("masked", in_channels=1, num_classes=2),
        ModelConfig("masked", backbone="resnet50", stage=3),
    ],
    ids=["resnet34-stage3", "spp-stage2-head", "masked-1ch-head", "resnet50-stage3"],
)
def test_other_configurations_build(config: ModelConfig, tmp_path: Path) -> None:
    result = export_artifact(config, tmp_path / "a", ExportOptions(max_size=128))
    c = config.in_channels
    profile = Profile((1, c, 32, 32), (1, c, 64, 64), (1, c, 128, 128))
    built = engines.find_or_build(
        result.manifest_path, [profile], FAST, tmp_path / "c", engine="tensorrt-rtx",
        targets=("8.9",),
    )  # fmt: skip
    assert built.record.environment.compute_capability == "8.9"
    assert built.record.precision == "float32"


def test_targets_are_part_of_the_key(exported: dict[str, ExportResult], tmp_path: Path) -> None:
    artifact = exported["masked"].manifest_path
    small = [TWO[0]]  # float32: any profile inside 32..1024
    one = engines.find_or_build(artifact, small, FAST, tmp_path, engine="tensorrt-rtx")
    other = engines.find_or_build(
        artifact, small, FAST, tmp_path, engine="tensorrt-rtx", targets=("12.0",)
    )
    assert one.record.key != other.record.key
    assert other.record.environment.compute_capability == "12.0"


def _cli(*args: str | Path) -> object:
    return CliRunner().invoke(build_cli.main, [str(a) for a in args])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--trust-host-code"], "--trust-host-code is not available with --engine tensorrt-rtx"),
        (["--timing-cache", "t.cache"], "--timing-cache is not available with --engine"),
        (["--hardware-compat", "ampere+"], "--hardware-compat ampere+ is not available"),
        (["--compute-capability", "9.0"], "TensorRT-RTX cannot target compute capability 9.0"),
        (["--compute-capability", "8.6,8.6"], "cannot target a repeated capability"),
        (["--compute-capability", "sm86"], "is not a list of MAJOR.MINOR capabilities"),
    ],
)
def test_what_rtx_cannot_honour_is_refused_before_the_build(
    exported: dict[str, ExportResult], tmp_path: Path, args: list[str], message: str
) -> None:
    artifact = exported["masked"].manifest_path
    result = _cli(artifact, "--engine", "tensorrt-rtx", "--cache-dir", tmp_path, *args)
    assert result.exit_code == 1, result.output  # type: ignore[attr-defined]
    assert message in " ".join(result.stderr.split())  # type: ignore[attr-defined]
    assert not list(tmp_path.glob("*.plan"))


def test_compute_capability_is_refused_for_tensorrt(
    exported: dict[str, ExportResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # whatever is installed: never reached
    artifact = exported["masked"].manifest_path
    with pytest.raises(ConfigError, match="--compute-capability is for TensorRT-RTX"):
        engines.find_or_build(artifact, cache_dir=tmp_path, engine="tensorrt", targets=("8.6",))


def test_the_cli_builds_and_says_so(exported: dict[str, ExportResult], tmp_path: Path) -> None:
    """As a user runs it, in a subprocess; the second run finds the engine."""
    artifact = exported["spp"].manifest_path
    exe = Path(sys.executable).with_name("resfuse-build")
    command = [str(exe), str(artifact), "--engine", "tensorrt-rtx", "--builder-level", "0"]
    command += [
        "--profile",
        "1x3x32x32:1x3x64x64:1x3x128x128",
        "--cache-dir",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "built in" in first.stdout and "tensorrt-rtx 1." in first.stdout
    assert "compute capability 8.6,8.9,12.0" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "found in the cache" in second.stdout
    copied = Path(first.stdout.splitlines()[0])
    assert copied.parent == tmp_path / "o" and engines.read_engine(copied).plan


def test_the_parsers_refusal_is_one_line(exported: dict[str, ExportResult], tmp_path: Path) -> None:
    """A graph TensorRT's ONNX parser refuses (an operator it does not know) reaches the user
    as one ModelLoadError line with the parser's own words."""
    source = exported["masked"].manifest_path
    model = onnx.load_model_from_string(read_manifest(source).read("onnx"))
    node = model.graph.node[-1]
    node.op_type, node.domain = "NoSuchOperator", "resfuse.test"
    model.opset_import.append(onnx.helper.make_opsetid("resfuse.test", 1))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    artifact = _rewrite(source, broken, tmp_path)
    with pytest.raises(ModelLoadError, match="TensorRT's ONNX parser refused the model") as info:
        engines.find_or_build(artifact, [TWO[0]], FAST, tmp_path / "c", engine="tensorrt-rtx")
    assert "\n" not in str(info.value) and "NoSuchOperator" in str(info.value)


def _rewrite(source: Path, onnx_file: Path, folder: Path) -> Path:
    """A copy of the artifact's manifest that names `onnx_file` with its real size and hash."""
    import hashlib
    import os

    data = json.loads(source.read_text())
    blob = onnx_file.read_bytes()
    data["files"]["onnx"].update(
        path=onnx_file.name, sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob)
    )
    weights = data["files"]["weights"]["path"]
    os.link(source.parent / weights, folder / weights)
    path = folder / source.name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "name,profile",
    [
        ("image", Profile((1, 3, 64, 64), (1, 3, 32, 32), (1, 3, 128, 128))),  # opt < min
        ("no_such_input", TWO[0]),
    ],
)
def test_a_profile_tensorrt_refuses_is_one_error(
    exported: dict[str, ExportResult], name: str, profile: Profile
) -> None:
    """resfuse's own checks stop such profiles first; past them (build_plan called directly),
    TensorRT's set_shape and add_optimization_profile refusals still become one ConfigError
    instead of an engine built without the profile."""
    from resfuse.export.tensorrt_build import build_plan

    trt = import_flavour(FLAVOURS["tensorrt-rtx"])
    onnx_bytes = read_manifest(exported["masked"].manifest_path).read("onnx")
    with pytest.raises(ConfigError, match="TensorRT refused profile") as caught:
        build_plan(trt, onnx_bytes, name, [profile], FAST)
    assert "\n" not in str(caught.value)


def test_tiles_follow_a_real_engines_profiles(
    exported: dict[str, ExportResult], tmp_path: Path
) -> None:
    """The tensorrt runner's tile size and the H x W it takes whole come from the engine's own
    sidecar (a real TensorRT-RTX build): the first profile's opt, at its max batch. Running the
    plan needs a GPU, so the runner is given the record activate() would read."""
    from resfuse.runtime.backends.tensorrt import TensorRTRunner
    from resfuse.runtime.session import Session

    artifact = exported["masked"].manifest_path
    built = engines.find_or_build(artifact, TWO, FAST, tmp_path, engine="tensorrt-rtx")
    runner = TensorRTRunner(read_manifest(artifact), "cuda")
    assert runner.accepts(1000, 1000)  # before activate: the artifact's range
    runner.record = built.record
    assert runner.default_tile() == ((64, 64), 2)
    assert runner.accepts(96, 96) and runner.accepts(128, 100)  # one profile each
    assert not runner.accepts(200, 200) and not runner.accepts(60, 60)
    assert Session(runner).tiling("auto").roi == (64, 64)


def test_an_invalid_engine_is_told_its_real_reason() -> None:
    """TensorRT-RTX's own EngineInvalidityDiagnostics flags, decoded: a driver too old or too
    little memory is not blamed on the compute capability (issue 27, item 8)."""
    from resfuse.runtime.backends.tensorrt import invalid_engine_message, invalidity_reasons

    lib = import_flavour(FLAVOURS["tensorrt-rtx"])
    flags = lib.EngineInvalidityDiagnostics
    driver = int(flags.OLD_CUDA_DRIVER) | int(flags.INSUFFICIENT_GPU_MEMORY)
    reasons = invalidity_reasons(lib, driver)
    assert sorted(reasons) == ["INSUFFICIENT_GPU_MEMORY", "OLD_CUDA_DRIVER"]
    message = invalid_engine_message("m.engine", "8.9", reasons, driver)
    assert "update the NVIDIA driver" in message and "free GPU memory" in message
    assert "--compute-capability" not in message and "\n" not in message
    cc = invalidity_reasons(lib, int(flags.UNSUPPORTED_CC))
    assert "--compute-capability of this GPU" in invalid_engine_message("m", "8.9", cc, 2)
    assert "diagnostics 0x80" in invalid_engine_message("m", "8.9", [], 0x80)


def test_rtx_plans_require_user_allocation(exported: dict[str, ExportResult]) -> None:
    """A real TensorRT-RTX build's own builder config: REQUIRE_USER_ALLOCATION is set (no
    allocation inside execute_async_v3, so the plan can be captured in a CUDA graph; every
    context must then be user-managed, as the runner makes them), TF32 is off, and the plan
    builds with it (issue 27, item 1)."""
    from resfuse.export.tensorrt_build import prepare_build

    trt = import_flavour(FLAVOURS["tensorrt-rtx"])
    manifest = read_manifest(exported["masked"].manifest_path)
    build = prepare_build(
        trt, manifest.read("onnx"), manifest.input_name, [TWO[0]], FAST, targets=("8.9",)
    )
    assert build.config.get_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    assert not build.config.get_flag(trt.BuilderFlag.TF32)
    assert build.config.num_compute_capabilities == 1
    assert len(build.serialize()) > 1_000_000
    assert engines.ENGINE_CACHE_FORMAT >= 3  # plans built before the flag are not reused
