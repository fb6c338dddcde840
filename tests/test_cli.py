"""resfuse-export through a real subprocess, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resfuse

pytestmark = pytest.mark.slow  # resfuse-export in subprocesses

EXE = Path(sys.executable).with_name("resfuse-export")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=600)


def test_export_prints_parity_and_summary(out_dir: Path) -> None:
    proc = run("--method", "masked", "--output", str(out_dir), "--max-size", "512")
    assert proc.returncode == 0, proc.stderr
    assert "masked-resnet18 (float32): ONNX Runtime (CPU) vs PyTorch" in proc.stdout
    assert proc.stdout.count("pass") == 6 and "FAIL" not in proc.stdout
    assert "exported" in proc.stdout and "MiB" in proc.stdout
    manifest = json.loads((out_dir / "masked-resnet18.json").read_text())
    onnx_file, weights_file = (manifest["files"][k]["path"] for k in ("onnx", "weights"))
    assert onnx_file == f"masked-resnet18.{manifest['files']['onnx']['sha256'][:12]}.onnx"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [".masked-resnet18.lock", "masked-resnet18.json", onnx_file, weights_file]
    )
    assert manifest["input"]["contract"]["height"] == {"min": 32, "max": 512}


def _assert_one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert any(text in line for line in lines), proc.stderr


@pytest.mark.parametrize(
    "args,text",
    [
        (["--method", "bogus"], "'bogus' is not one of 'upsample', 'spp', 'masked', 'all'"),
        (["--method", "spp", "--backbone", "vgg"], "'vgg' is not one of"),
        (["--method", "spp", "--min-size", "16"], "--min-size 16 is below the smallest input"),
        (
            ["--method", "spp", "--min-size", "600", "--max-size", "500"],
            "larger than --max-size 500",
        ),
        (["--method", "spp", "--weights", "/nonexistent/w.pt"], "does not exist"),
        (["--method", "all", "--name", "x"], "--name names one artifact"),
        (["--method", "spp", "--int8"], "--int8 needs calibration data"),
        (["--method", "spp", "--calib-random"], "add --int8"),
        (
            ["--method", "spp", "--int8", "--calib-images", "/nonexistent"],
            "--calib-images /nonexistent is not a folder",
        ),
        (["--method", "spp", "--max-rel-l2", "-1"], "must not be negative"),
        (["--method", "spp", "--window", "40"], "--window takes CENTER,WIDTH, two numbers"),
        (["--method", "spp", "--window", "40,0"], "window"),
        (["--method", "spp", "--intensity-range", "max"], "--intensity-range takes dtype"),
        (["--method", "spp", "--name", "../x"], "--name '../x' is not a plain file name"),
    ],
)
def test_bad_input_is_one_clear_line(out_dir: Path, args: list[str], text: str) -> None:
    proc = run(*args, "--output", str(out_dir))
    _assert_one_line_error(proc, text)
    assert list(out_dir.iterdir()) == []


def test_unwritable_output_is_one_line_and_leaves_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the output folder should be")
    proc = run("--method", "masked", "--max-size", "256", "--output", str(blocker / "sub"))
    _assert_one_line_error(proc, "cannot write into")
    assert blocker.read_text() == "a file where the output folder should be"


def test_pickled_weights_are_refused_and_earlier_files_survive(out_dir: Path) -> None:
    evil = out_dir.parent / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "cfg": Path("/etc")}, evil)
    (out_dir / "masked-resnet18.onnx").write_text("an earlier export")
    proc = run("--method", "masked", "--weights", str(evil), "--output", str(out_dir))
    _assert_one_line_error(proc, "holds pickled Python objects")
    assert [p.name for p in out_dir.iterdir()] == ["masked-resnet18.onnx"]
    assert (out_dir / "masked-resnet18.onnx").read_text() == "an earlier export"


def test_parity_failure_exits_non_zero_and_writes_nothing(out_dir: Path) -> None:
    proc = run(
        "--method",
        "spp",
        "--atol",
        "0",
        "--rtol",
        "0",
        "--max-size",
        "512",
        "--output",
        str(out_dir),
    )
    _assert_one_line_error(proc, "ONNX Runtime differs from PyTorch")
    assert list(out_dir.iterdir()) == []


def test_trained_weights_are_exported(out_dir: Path, tmp_path: Path) -> None:
    trained = resfuse.build_model("upsample", num_classes=3)
    torch.save(trained.state_dict(), tmp_path / "trained.pt")
    proc = run(
        "--method",
        "upsample",
        "--num-classes",
        "3",
        "--weights",
        str(tmp_path / "trained.pt"),
        "--max-size",
        "256",
        "--no-simplify",
        "--output",
        str(out_dir),
        "--name",
        "seg",
    )
    assert proc.returncode == 0, proc.stderr
    rebuilt = resfuse.load_original(str(out_dir / "seg.json"))
    x = torch.randn(1, 3, 64, 80)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x), trained(x), atol=0, rtol=0)
    manifest = json.loads((out_dir / "seg.json").read_text())
    assert manifest["weights_source"].endswith("trained.pt")
    assert manifest["files"]["onnx"]["simplified"] is False
