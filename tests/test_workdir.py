"""Every command leaves the working directory as it found it: empty stays empty."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every command in a subprocess

BIN = Path(sys.executable).parent


def run_in_empty_folder(folder: Path, command: str, *args: str) -> subprocess.CompletedProcess:
    folder.mkdir(exist_ok=True)
    assert list(folder.iterdir()) == []
    proc = subprocess.run(
        [str(BIN / command), *args], cwd=folder, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == [], f"{command} wrote into the cwd"
    return proc


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """float32 and INT8 exports of one model, both made from an empty working directory."""
    out = tmp_path_factory.mktemp("artifacts")
    cwd = tmp_path_factory.mktemp("cwd")
    common = ["--method", "upsample", "--max-size", "128", "--output", str(out)]
    run_in_empty_folder(cwd, "resfuse-export", *common)
    run_in_empty_folder(
        cwd, "resfuse-export", *common, "--int8", "--calib-random", "--calib-count", "4",
        "--calib-size", "96",
    )  # fmt: skip
    return out


def test_export_leaves_the_working_directory_clean(artifacts: Path) -> None:
    assert (artifacts / "upsample-resnet18.json").is_file()
    assert (artifacts / "upsample-resnet18-int8.json").is_file()


def test_check_leaves_the_working_directory_clean(artifacts: Path, tmp_path: Path) -> None:
    manifest = str(artifacts / "upsample-resnet18.json")
    proc = run_in_empty_folder(tmp_path / "cwd", "resfuse-check", manifest, "--shapes", "1x3x64x64")
    assert "all 1 inputs pass" in proc.stdout


def test_bench_leaves_the_working_directory_clean(artifacts: Path, tmp_path: Path) -> None:
    run_in_empty_folder(
        tmp_path / "cwd",
        "resfuse-bench",
        str(artifacts / "upsample-resnet18.json"),
        "--also",
        str(artifacts / "upsample-resnet18-int8.json"),
        "--shapes",
        "1x3x64x64",
        "--warmup",
        "1",
        "--iters",
        "2",
    )
