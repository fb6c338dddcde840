"""Triton model repositories: the layout a stock server loads, parsed by Triton's schema."""

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from resfuse.artifacts import read_manifest
from resfuse.errors import ArtifactWriteError, ConfigError
from resfuse.export.triton import TritonOptions, model_config, parse_config, write_triton_repo


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
