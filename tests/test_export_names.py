"""What resfuse-export names and records (issue 18): a variant keeps its suffix under --name and
never replaces an artifact of another precision, the calibration record counts the inputs used,
Triton instances run only on a device the artifact is made for, and the manifest is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from resfuse.artifacts import read_manifest
from resfuse.errors import ConfigError
from resfuse.export.cli import main
from resfuse.export.pipeline import ExportOptions
from resfuse.export.quantize import Calibration
from resfuse.export.triton import TritonOptions, write_triton_repo
from resfuse.models import ModelConfig

pytestmark = pytest.mark.slow  # exports of every precision

SMALL = ["--method", "upsample", "--max-size", "128", "--max-batch", "2"]


def export(out: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*SMALL, "--output", str(out), *args])


@pytest.fixture(scope="module")
def lungs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result, Result]:
    """`--name lungs` in float32 over an earlier float32 manifest of that name, then in fp16."""
    out = tmp_path_factory.mktemp("named")
    (out / "lungs.json").write_text('{"precision": "float32"}')  # targets: the default, all
    f32 = export(out, "--name", "lungs")
    assert f32.exit_code == 0, f32.output
    fp16 = export(out, "--name", "lungs", "--precision", "fp16")
    assert fp16.exit_code == 0, fp16.output
    return out, f32, fp16


def test_a_variant_keeps_its_suffix_and_names_its_float32_source(lungs) -> None:
    out, _, _ = lungs
    f32, fp16 = read_manifest(out / "lungs.json"), read_manifest(out / "lungs-fp16.json")
    assert (f32.precision, fp16.precision) == ("float32", "float16")  # the re-export replaced
    source = {"name": "lungs", "onnx_sha256": f32.record("onnx")["sha256"]}
    assert fp16.data["source"] == source


def test_the_output_names_the_manifest(lungs) -> None:
    out, f32, fp16 = lungs
    assert f"manifest: {out / 'lungs.json'}" in f32.stdout
    assert f"manifest: {out / 'lungs-fp16.json'}" in fp16.stdout


@pytest.mark.parametrize(
    "name,args,existing,message",
    [
        ("lungs-fp16", [], None, "lungs-fp16.json is the float16 artifact for cpu, cuda, tensorrt"),
        (
            "old",
            ["--int8", "--target", "tensorrt", "--calib-random"],
            {"precision": "int8"},  # before `targets`: the CPU's INT8, under the name -int8-trt
            "old-int8-trt.json is the int8 artifact for cpu, which this int8 export would replace",
        ),
    ],
)
def test_an_artifact_of_another_precision_or_targets_is_kept(
    lungs, tmp_path: Path, name: str, args: list[str], existing: dict | None, message: str
) -> None:
    out = tmp_path / "out"
    shutil.copytree(lungs[0], out)
    if existing is not None:
        (out / f"{name}-int8-trt.json").write_text(json.dumps(existing))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = export(out, "--name", name, *args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = [line for line in result.output.splitlines() if line.strip()]
    assert message in line and line.endswith("choose another --name or --output")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_calibration_record_counts_the_images_used(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    config, options = ModelConfig("upsample"), ExportOptions(max_size=128)
    calibration = Calibration(tmp_path, count=32, size=64)
    used = calibration.inputs(options.contract(config), options.preprocess(config), seed=0)
    assert calibration.describe()["count"] == len(used) == 3
    assert Calibration(count=5).describe()["count"] == 5  # random inputs: as many as asked


def test_gpu_instances_of_a_cpu_artifact_are_refused_before_the_export(tmp_path: Path) -> None:
    args = ["--int8", "--calib-random", "--triton-kind", "gpu"]
    result = export(tmp_path / "out", *args, "--triton-repo", str(tmp_path / "repo"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        "the int8 artifact is made for cpu, not cuda, where --triton-kind gpu runs it; use "
        "--triton-kind cpu, or export for GPUs" in result.output
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_gpu_instances_of_a_cpu_manifest_are_refused(lungs, tmp_path: Path) -> None:
    data = json.loads((lungs[0] / "lungs.json").read_text())
    for key in ("onnx", "weights"):
        shutil.copy(lungs[0] / data["files"][key]["path"], tmp_path)
    (tmp_path / "cpu.json").write_text(json.dumps({**data, "name": "cpu", "targets": ["cpu"]}))
    with pytest.raises(ConfigError, match=r"^cpu.json is made for cpu, not cuda, where "):
        write_triton_repo(tmp_path / "cpu.json", tmp_path / "repo", TritonOptions(kind="gpu"))
    assert not (tmp_path / "repo").exists()
    assert write_triton_repo(tmp_path / "cpu.json", tmp_path / "repo").name == "cpu"
