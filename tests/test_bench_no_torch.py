"""resfuse-bench where PyTorch is not installed (an edge box): the deployed backends are timed
as with torch, and their accuracy is not measured, said in one line and null in the JSON, never
a number made up. In this process, with resfuse.torch_extra.has_torch made False; the base
install's venv runs the same command in tests/test_torch_free.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import invoke

from resfuse import torch_extra
from resfuse.runtime.bench import benchmark, report
from resfuse.runtime.cli import bench_main

EXTRA = "pip install 'resfuse[export]'"
UNMEASURED = ("rel_l2", "max_abs", "agreement", "within_tolerance", "speedup_vs_torch")
# The table's columns from "vs torch (rounds)" to "judged on" (after 15 before them).
ACCURACY_CELLS = slice(15, 21)
COMMON = ["--shapes", "1x3x64x64", "--warmup", "1", "--rounds", "2", "--iters", "3"]


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as the base install sees it: torch not installed."""
    monkeypatch.setattr(torch_extra, "has_torch", lambda: False)


def _rows(table: str) -> list[list[str]]:
    """The cells of the records table's rows (those naming an artifact of the suite's)."""
    rows = [line.strip("|").split("|") for line in table.splitlines() if "| masked-" in line]
    return [[cell.strip() for cell in row] for row in rows]


def _assert_unmeasured(result: dict) -> None:
    assert result["reference"] is None and result["inputs"] is None
    assert result["accuracy"]["measured"] is False
    assert EXTRA in result["accuracy"]["reason"] and "resfuse-check" in result["accuracy"]["reason"]
    assert result["fastest"] == []  # an engine not judged is never recommended
    for r in result["records"]:
        assert all(r[key] is None for key in UNMEASURED), r
        assert r["judged_on"] is None and r["speedup_rounds"] is None
        assert r["p50_ms"] > 0 and r["min_ms"] > 0 and r["first_call_ms"] > 0 and r["n"] == 6


def test_benchmark_times_the_deployed_backends_and_measures_no_accuracy(exported, no_torch):
    calls = []
    result = benchmark(
        exported["masked"].manifest_path,
        backends=["onnxruntime", "onnxruntime:spinning=true"],
        shapes=[(1, 3, 64, 64)],
        warmup=2,
        iters=3,
        rounds=2,
        threads=1,
        progress=lambda: calls.append(1),
    )
    _assert_unmeasured(result)
    # The same stopwatch as with torch: per session 2 warm-up calls, then 2 blocks of 1 + 3.
    assert len(calls) == 2 * (2 + 2 * (1 + 3))
    assert [r["backend"] for r in result["records"]] == ["onnxruntime", "onnxruntime:spinning=true"]
    table = report(result)
    rows = _rows(table)
    assert [row[1] for row in rows] == ["onnxruntime", "onnxruntime:spinning=true"]
    assert all(row[ACCURACY_CELLS] == ["-"] * 6 for row in rows), table
    assert "accuracy not measured: no PyTorch here" in table
    assert "fastest per accuracy class: none recommended" in table
    assert "'vs torch'" not in table  # nor explains a column left empty


def test_the_command_leaves_torch_out_and_says_why(exported, no_torch, tmp_path: Path):
    out = tmp_path / "bench.json"
    path = str(exported["masked"].manifest_path)
    proc = invoke(bench_main, path, *COMMON, "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    _assert_unmeasured(result)
    assert [r["backend"] for r in result["records"]] == ["onnxruntime"]
    assert "torch left out of the default --backends (PyTorch is not installed" in proc.stderr
    [cells] = _rows(proc.stdout)
    assert cells[:6] == ["masked-resnet18", "onnxruntime", "cpu", "float32", "1x3x64x64", "6"]
    assert cells[ACCURACY_CELLS] == ["-"] * 6
    assert [line for line in proc.stdout.splitlines() if "not measured" in line] == [
        f"accuracy not measured: no PyTorch here to run the original ({EXTRA}), or check it "
        f"with resfuse-check where torch is installed."
    ]


@pytest.mark.parametrize(
    ("args", "needs"),
    [
        (["--backends", "torch,onnxruntime"], "backend 'torch', which runs the PyTorch original"),
        (["--backends", "torch-compile"], "backend 'torch-compile', which runs the PyTorch"),
        (["--images", "IMAGES"], "--images, which judges each engine's error on images"),
        (["--report", "OUT"], "--report, which plots each engine's error"),
    ],
)
def test_what_needs_the_original_is_refused_in_one_line(
    exported, no_torch, tmp_path: Path, args: list[str], needs: str
):
    (tmp_path / "images").mkdir()
    given = {"IMAGES": str(tmp_path / "images"), "OUT": str(tmp_path / "run.html")}
    path = str(exported["masked"].manifest_path)
    proc = invoke(bench_main, path, *COMMON, *(given.get(a, a) for a in args))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert needs in lines[0] and EXTRA in lines[0], proc.stderr
    assert not (tmp_path / "run.html").exists()


def test_the_path_without_torch_imports_no_torch(exported) -> None:
    """Where torch is installed but taken for absent, the bench imports none of it: the base
    install, which has no torch to import, runs the same code."""
    script = (
        "import sys\n"
        "from resfuse import torch_extra\n"
        "torch_extra.has_torch = lambda: False\n"
        "from resfuse.runtime.cli import bench_main\n"
        f"args = [{str(exported['masked'].manifest_path)!r}, *{COMMON!r}]\n"
        "try:\n"
        "    bench_main(args)\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "accuracy not measured" in proc.stdout
