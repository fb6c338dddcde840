"""resfuse-check and resfuse-bench: the library and the real command lines."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from resfuse.artifacts import sha256_of
from resfuse.runtime.bench import benchmark, compare_baseline
from resfuse.runtime.check import check_artifact

BIN = Path(sys.executable).parent


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = {"scan.png": (97, 131), "photo.jpg": (64, 200), "tall.png": (300, 40)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("ignored")
    return folder


@pytest.mark.parametrize(
    "method,passthrough", [("upsample", "exact"), ("spp", "exact"), ("masked", "image*(1-mask)")]
)
def test_check_passes_on_random_and_real_images(exported, images, method, passthrough) -> None:
    report = check_artifact(
        exported[method].manifest_path, images=images, shapes=[(1, 3, 224, 224), (2, 3, 257, 311)]
    )
    assert report.passed
    assert [r.source for r in report.records] == [
        "random",
        "random",
        "photo.jpg",
        "scan.png",
        "tall.png",
    ]
    assert report.records[3].shape == (1, 3, 97, 131)
    for r in report.records:
        assert r.passthrough.startswith(passthrough) and r.passthrough_ok
        assert r.stats.max_abs <= 1e-4 and r.stats.cosine > 0.999999 and r.stats.nonfinite == 0
        assert 0 <= r.stats.required_atol <= r.stats.max_abs


def _swap_weights(src, folder: Path) -> Path:
    """The artifact with an ONNX graph whose weights differ from the PyTorch original's, its
    manifest updated to match (as when a graph is re-exported from other weights)."""
    for path in (src.manifest_path, src.weights_path):
        shutil.copy(path, folder)
    model = onnx.load(src.onnx_path)
    for init in model.graph.initializer:
        if len(init.dims) == 4:  # every convolution kernel, 10% larger
            scaled = numpy_helper.to_array(init) * np.float32(1.1)
            init.CopyFrom(numpy_helper.from_array(scaled, init.name))
    onnx_path = folder / src.onnx_path.name
    onnx.save(model, onnx_path)
    manifest_path = folder / src.manifest_path.name
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["onnx"].update(sha256=sha256_of(onnx_path), bytes=onnx_path.stat().st_size)
    manifest_path.write_text(json.dumps(manifest))
    return manifest_path


def test_check_fails_when_the_model_really_differs(exported, tmp_path: Path) -> None:
    manifest = _swap_weights(exported["upsample"], tmp_path)
    report = check_artifact(manifest, shapes=[(1, 3, 64, 64)])
    assert not report.passed and report.records[0].stats.max_abs > 1e-3
    proc = run("resfuse-check", str(manifest), "--shapes", "1x3x64x64,1x3x40x90")
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "2 of 2 inputs failed the check" in proc.stderr


def test_check_cli_json_and_errors(exported, images, tmp_path: Path) -> None:
    path = str(exported["masked"].manifest_path)
    proc = run(
        "resfuse-check",
        path,
        "--images",
        str(images),
        "--shapes",
        "1x3x64x64",
        "--json",
        str(tmp_path / "check.json"),
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\|\s+random \|\s+1x3x64x64 \|", proc.stdout)
    assert "all 4 inputs pass" in proc.stdout
    data = json.loads((tmp_path / "check.json").read_text())
    assert data["passed"] and len(data["records"]) == 4
    assert {
        "max_abs",
        "mean_abs",
        "rel_l2",
        "p99_abs",
        "cosine",
        "nonfinite",
        "required_atol",
        "passthrough",
        "passed",
    } <= set(data["records"][0])
    for args, text in [
        (["--shapes", "1x3x224"], "is not BxCxHxW"),
        (["--shapes", "1x3x2000x64"], "height 2000 is outside the allowed range 32..1024"),
        (["--images", str(tmp_path / "none")], "is not a folder"),
        (["--backend", "tensorrt"], "not in this release"),
    ]:
        bad = run("resfuse-check", path, *args)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        assert text in bad.stderr or text in bad.stdout, bad.stderr
    missing = run("resfuse-check", str(tmp_path / "nothing.onnx"))
    assert missing.returncode == 1 and "no manifest at" in missing.stderr


def test_benchmark_records(exported) -> None:
    result = benchmark(
        exported["spp"].manifest_path,
        shapes=[(1, 3, 64, 64), (2, 3, 96, 80)],
        warmup=1,
        iters=3,
        threads=1,
    )
    assert result["format"] == "resfuse-bench" and result["machine"]["cpu"]
    assert {"torch", "onnxruntime"} <= set(result["machine"]["versions"])
    records = result["records"]
    assert [(r["backend"], r["shape"]) for r in records] == [
        ("torch", [1, 3, 64, 64]),
        ("onnxruntime", [1, 3, 64, 64]),
        ("torch", [2, 3, 96, 80]),
        ("onnxruntime", [2, 3, 96, 80]),
    ]
    for r in records:
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["iters"] == 3 and r["settings"]["threads"] == 1
        assert r["throughput_ips"] == pytest.approx(r["shape"][0] * 1e3 / r["mean_ms"])
        assert r["compute_ms"] > 0 and r["h2d_ms"] == r["d2h_ms"] == 0
    torch_p50 = records[2]["p50_ms"]
    assert records[3]["speedup_vs_torch"] == pytest.approx(torch_p50 / records[3]["p50_ms"])
    rows, ok = compare_baseline(result, result, 0.0)
    assert ok and len(rows) == 4


def test_bench_cli_outputs_and_baseline_gate(exported, tmp_path: Path) -> None:
    path = str(exported["masked"].manifest_path)
    common = ["--shapes", "1x3x64x64", "--warmup", "1", "--iters", "3", "--threads", "1"]
    proc = run(
        "resfuse-bench",
        path,
        *common,
        "--json",
        str(tmp_path / "b.json"),
        "--markdown",
        str(tmp_path / "b.md"),
        "--plot",
        str(tmp_path / "b.png"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "| masked-resnet18 | onnxruntime |    cpu |" in proc.stdout
    assert (tmp_path / "b.md").read_text().startswith("|        artifact |     backend |")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "b.json").read_text())
    assert len(result["records"]) == 2
    ok = run(
        "resfuse-bench",
        path,
        *common,
        "--baseline",
        str(tmp_path / "b.json"),
        "--max-regression",
        "100",
    )
    assert ok.returncode == 0, ok.stderr
    for record in result["records"]:  # a baseline 100x faster than anything real
        record["p50_ms"] /= 100
    (tmp_path / "fast.json").write_text(json.dumps(result))
    slow = run("resfuse-bench", path, *common, "--baseline", str(tmp_path / "fast.json"))
    assert slow.returncode == 1 and "REGRESSION" in slow.stdout
    assert "p50 latency regressed by more than 10%" in slow.stderr
    bad = run("resfuse-bench", path, "--backends", "torch,tvm")
    assert bad.returncode == 1 and "unknown backends ['tvm']" in bad.stderr
