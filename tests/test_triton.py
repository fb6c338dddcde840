"""Triton model repositories: the layout a stock server loads, parsed by Triton's schema."""

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from resfuse.artifacts import read_manifest
from resfuse.engine_manifest import BuildSettings
from resfuse.errors import ArtifactWriteError, ConfigError, EngineError
from resfuse.export.cli import main
from resfuse.export.engines import store_engine
from resfuse.export.triton import TritonOptions, model_config, parse_config, write_triton_repo
from resfuse.profiles import Profile
from resfuse.tensorrt_env import BuildEnvironment


def test_repository_layout_and_config_match_the_manifest(exported, tmp_path: Path) -> None:
    manifest = read_manifest(exported["masked"].manifest_path)
    model = write_triton_repo(manifest.path, tmp_path / "repo")
    assert model == tmp_path / "repo" / "masked-resnet18"
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*")) == [
        "1",
        "1/model.onnx",
        "config.pbtxt",
    ]
    onnx_sha = hashlib.sha256((model / "1" / "model.onnx").read_bytes()).hexdigest()
    assert onnx_sha == manifest.data["files"]["onnx"]["sha256"]
    config = parse_config((model / "config.pbtxt").read_text())
    assert (config.name, config.platform, config.max_batch_size) == (
        "masked-resnet18",
        "onnxruntime_onnx",
        32,
    )
    [inp], [out] = config.input, config.output
    assert (inp.name, list(inp.dims)) == ("image", [3, -1, -1])
    assert (out.name, list(out.dims)) == ("fused", [67, -1, -1])
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    [group] = config.instance_group
    assert group.count == 1 and group.kind == group.KIND_CPU
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator


def test_the_model_triton_loads_takes_any_height_width_and_batch(exported, tmp_path: Path) -> None:
    model = write_triton_repo(exported["spp"].manifest_path, tmp_path)
    session = ort.InferenceSession(str(model / "1" / "model.onnx"))
    for shape in [(1, 3, 64, 96), (2, 3, 97, 131)]:
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        [y] = session.run(None, {"image": x})
        assert y.shape == (shape[0], 67, *shape[2:])


def test_gpu_instances_with_the_tensorrt_accelerator(exported, tmp_path: Path) -> None:
    options = TritonOptions(kind="gpu", instances=2, tensorrt=True, tensorrt_fp16=True)
    model = write_triton_repo(exported["masked"].manifest_path, tmp_path, options, name="seg")
    config = parse_config((model / "config.pbtxt").read_text())
    assert config.name == "seg" and model.name == "seg"
    [group] = config.instance_group
    assert group.count == 2 and group.kind == group.KIND_GPU
    [accelerator] = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {"precision_mode": "FP16"}


def test_a_static_batch_keeps_its_batch_dimension(exported) -> None:
    manifest = read_manifest(exported["masked"].manifest_path)
    manifest.data["input"]["contract"]["batch"]["max"] = 1  # as `--max-batch 1` exports it
    config = parse_config(model_config(manifest, "m", TritonOptions()))
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 3, -1, -1]
    assert not config.HasField("dynamic_batching")


def test_a_field_triton_does_not_know_is_refused() -> None:
    with pytest.raises(ConfigError, match="Triton would reject this config.pbtxt: .*max_batch"):
        parse_config('name: "m"\nmax_batch: 4\n')


@pytest.mark.parametrize(
    "options,message",
    [
        (TritonOptions(kind="tpu"), "instance kind must be one of"),
        (TritonOptions(instances=0), "instances must be >= 1"),
        (TritonOptions(max_queue_delay_us=-1), "queue delay must be >= 0"),
        (TritonOptions(tensorrt=True), "GPU instances only; add --triton-kind gpu"),
        (TritonOptions(kind="gpu", tensorrt_fp16=True), "option of the TensorRT accelerator"),
    ],
)
def test_bad_options_are_named(options: TritonOptions, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        options.validate()


def test_rewriting_replaces_the_model_whole(exported, tmp_path: Path) -> None:
    write_triton_repo(exported["masked"].manifest_path, tmp_path, name="seg")
    stale = tmp_path / "seg" / "2"
    stale.mkdir()  # a version a newer export does not have
    options = TritonOptions(instances=3)
    write_triton_repo(exported["masked"].manifest_path, tmp_path, options, name="seg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg"]  # no staging or old folder
    assert not stale.exists()
    assert "count: 3" in (tmp_path / "seg" / "config.pbtxt").read_text()


def test_a_file_where_the_repository_should_be_is_an_error(exported, tmp_path: Path) -> None:
    blocker = tmp_path / "repo"
    blocker.write_text("not a folder")
    with pytest.raises(ArtifactWriteError, match="check that .*repo is a writable folder"):
        write_triton_repo(exported["masked"].manifest_path, blocker)
    assert blocker.read_text() == "not a folder"


def test_export_writes_the_repository_beside_the_artifact(tmp_path: Path) -> None:
    args = ["--method", "upsample", "--max-size", "128", "--max-batch", "4"]
    args += ["--output", str(tmp_path / "art"), "--triton-repo", str(tmp_path / "repo")]
    result = CliRunner().invoke(main, [*args, "--triton-instances", "2"])
    assert result.exit_code == 0, result.output
    assert f"Triton model: {tmp_path / 'repo' / 'upsample-resnet18'}" in result.stdout
    config = parse_config((tmp_path / "repo" / "upsample-resnet18" / "config.pbtxt").read_text())
    assert config.max_batch_size == 4 and config.instance_group[0].count == 2
    model = (tmp_path / "repo" / "upsample-resnet18" / "1" / "model.onnx").read_bytes()
    manifest = read_manifest(tmp_path / "art" / "upsample-resnet18.json")
    assert model == manifest.read("onnx")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--triton-tensorrt", "fp16"], "need --triton-repo DIR"),
        (["--triton-repo", "REPO", "--triton-tensorrt", "fp16"], "add --triton-kind gpu"),
    ],
)
def test_triton_options_are_checked_before_the_export(
    args: list[str], message: str, tmp_path: Path
) -> None:
    args = [a.replace("REPO", str(tmp_path / "repo")) for a in args]
    result = CliRunner().invoke(main, ["--method", "masked", "--output", str(tmp_path), *args])
    assert result.exit_code != 0 and message in result.output
    assert list(tmp_path.iterdir()) == []  # nothing exported, no repository


H200 = BuildEnvironment("tensorrt", "10.13.0.35", "12.9", "linux-x86_64", "NVIDIA H200", "9.0")
PLAN = bytes(range(256)) * 16  # stands in for a plan: nothing here deserialises it


def _engine(
    artifact: Path, cache: Path, max_batch: int = 8, env: BuildEnvironment = H200, **settings
) -> Path:
    profiles = [
        Profile((1, 3, 64, 64), (1, 3, 256, 256), (4, 3, 512, 512)),
        Profile((1, 3, 512, 512), (1, 3, 1024, 1024), (max_batch, 3, 1024, 1024)),
    ]
    manifest = read_manifest(artifact)
    return store_engine(cache, manifest, profiles, BuildSettings(**settings), env, PLAN, 1.0)


def test_an_engine_is_served_as_a_tensorrt_plan(exported, tmp_path: Path) -> None:
    artifact = exported["masked"].manifest_path
    engine = _engine(artifact, tmp_path / "cache")
    options = TritonOptions(kind="gpu", instances=2)
    model = write_triton_repo(artifact, tmp_path / "repo", options, engine=engine)
    assert (model / "1" / "model.plan").read_bytes() == PLAN
    assert not (model / "1" / "model.onnx").exists()
    config = parse_config((model / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 8  # the profiles' largest batch, not the manifest's 32
    assert list(config.input[0].dims) == [3, -1, -1]
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU


def test_an_engine_is_refused_where_triton_could_not_load_it(exported, tmp_path: Path) -> None:
    artifact = exported["masked"].manifest_path
    engine = _engine(artifact, tmp_path / "cache")
    repo = tmp_path / "repo"
    with pytest.raises(ConfigError, match="GPU instances only; use --triton-kind gpu"):
        write_triton_repo(artifact, repo, TritonOptions(), engine=engine)
    gpu_trt = TritonOptions(kind="gpu", tensorrt=True)
    with pytest.raises(ConfigError, match="applies to ONNX models, not to an engine"):
        write_triton_repo(artifact, repo, gpu_trt, engine=engine)
    other = _engine(exported["spp"].manifest_path, tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"built from another ONNX model .*\(spp-resnet18.json\)"):
        write_triton_repo(artifact, repo, TritonOptions(kind="gpu"), engine=other)
    rtx = BuildEnvironment("tensorrt-rtx", "1.7.1", "12", "linux-x86_64", "any", "8.6")
    portable = _engine(artifact, tmp_path / "cache", env=rtx)
    with pytest.raises(ConfigError, match="tensorrt-rtx plan, and Triton's tensorrt_plan"):
        write_triton_repo(artifact, repo, TritonOptions(kind="gpu"), engine=portable)
    host = _engine(artifact, tmp_path / "cache", trust_host_code=True)
    with pytest.raises(EngineError, match="carries host code"):
        write_triton_repo(artifact, repo, TritonOptions(kind="gpu"), engine=host)
    assert not repo.exists() or list(repo.iterdir()) == []
