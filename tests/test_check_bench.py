"""resfuse-check and resfuse-bench: the library and the real command lines."""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from clirun import invoke
from onnx import numpy_helper
from PIL import Image

from resfuse import runtime
from resfuse.artifacts import sha256_of
from resfuse.compare import ErrorStats, Tolerance, compare
from resfuse.errors import ConfigError, ResfuseError
from resfuse.runtime.bench import _record, add_speedups, benchmark, compare_baseline
from resfuse.runtime.check import check_artifact
from resfuse.runtime.cli import bench_main, check_main
from resfuse.runtime.inputs import image_files

BIN = Path(sys.executable).parent


TOOLS = {"resfuse-check": check_main, "resfuse-bench": bench_main}


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    """The command in this process (conftest.invoke)."""
    return invoke(TOOLS[tool], *args)


def run_installed(tool: str, *args: str) -> subprocess.CompletedProcess:
    """The console script, as a user runs it."""
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
    proc = run_installed("resfuse-check", str(manifest), "--shapes", "1x3x64x64,1x3x40x90")
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
        (["--backend", "tensorrt"], "runs on device 'cuda'"),
    ]:
        bad = run("resfuse-check", path, *args)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        assert text in bad.stderr or text in bad.stdout, bad.stderr
    missing = run("resfuse-check", str(tmp_path / "nothing.onnx"))
    assert missing.returncode == 1 and "no manifest at" in missing.stderr


@pytest.fixture
def three_threads():
    """torch at 3 threads, a count no runner here asks for, so one left behind shows."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_benchmark_records(exported, three_threads) -> None:
    result = benchmark(
        exported["spp"].manifest_path,
        shapes=[(1, 3, 64, 64), (2, 3, 96, 80)],
        warmup=1,
        iters=3,
        rounds=2,
        threads=1,
    )
    assert torch.get_num_threads() == 3
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
        assert (r["n"], r["rounds"], r["iters"], r["warmup"]) == (6, 2, 3, 1)
        assert r["settings"]["threads"] == 1 and r["first_call_ms"] > 0
        assert r["compute_ms"] > 0 and r["h2d_ms"] == r["d2h_ms"] == 0
        assert r["speedup_vs_torch"] is not None and len(r["speedup_rounds"]) == 2
    assert records[0]["speedup_rounds"] == records[2]["speedup_rounds"] == [1.0, 1.0]


def _error(rel_l2: float = 0.0) -> ErrorStats:
    """Real error statistics of an output off its reference by `rel_l2` (reference [3, 4])."""
    return compare(np.array([3.0, 4.0]), np.array([3.0, 4.0 + 5 * rel_l2]), Tolerance())


def test_record_statistics_by_hand(exported) -> None:
    """Known timings through the production record builder, against figures worked by hand."""
    times = np.array([[4.0, 1.0, 10.0], [3.0, 2.0, 4.0]])  # ms, 2 rounds of 3, as a run leaves
    phases = np.array([[[1.0, 2.0, 3.0]] * 3, [[1.0, 2.0, 3.0]] * 2 + [[7.0, 8.0, 9.0]]])
    with runtime.load(exported["spp"].manifest_path, threads=1) as session:
        r = _record(
            session,
            (2, 3, 64, 64),
            times,
            phases,
            warmup=7,
            first_call_ms=123.0,
            error=_error(0.1),
            label="onnxruntime",
        )
    # Sorted 1 2 3 4 4 10: median (3 + 4) / 2; mean 24 / 6; too few calls for any tail.
    assert (r.p50_ms, r.min_ms, r.mean_ms) == (3.5, 1.0, 4.0)
    assert (r.p90_ms, r.p95_ms, r.p99_ms) == (None, None, None)
    assert r.std_ms == pytest.approx(10**0.5)  # squared deviations 0 9 36 1 4 0: 50 / (6 - 1)
    assert r.round_p50_ms == [4.0, 3.0]
    assert r.throughput_ips == 500.0  # 2 images every 4 ms
    assert (r.h2d_ms, r.compute_ms, r.d2h_ms) == (2.0, 3.0, 4.0)
    assert (r.shape, r.n, r.rounds, r.iters, r.warmup, r.backend, r.device) == (
        [2, 3, 64, 64],
        6,
        2,
        3,
        7,
        "onnxruntime",
        "cpu",
    )
    assert r.first_call_ms == 123.0 and (r.rel_l2, r.max_abs) == pytest.approx((0.1, 0.5))
    assert not r.within_tolerance  # 0.5 is far outside atol 1e-4
    assert r.precision == "float32" and r.settings["threads"] == 1


def test_speedups_by_hand(exported) -> None:
    """Ratios round by round (torch's block median over the backend's), then their median."""
    with runtime.load(exported["spp"].manifest_path, threads=1) as session:
        base = _record(
            session,
            (1, 3, 64, 64),
            np.ones((3, 1)),
            np.zeros((3, 1, 3)),
            warmup=1,
            first_call_ms=1.0,
            error=_error(),
            label="onnxruntime",
        )
    other = [1, 3, 96, 96]
    records = [
        replace(base, backend="torch", round_p50_ms=[10.0, 20.0, 30.0]),
        replace(base, round_p50_ms=[4.0, 5.0, 20.0]),
        replace(base, artifact="int8", round_p50_ms=[5.0, 10.0, 10.0]),
        replace(base, shape=other, round_p50_ms=[3.0, 3.0, 3.0]),  # no torch at this shape
    ]
    add_speedups(records)
    assert [r.speedup_rounds for r in records] == [
        [1.0, 1.0, 1.0],
        [2.5, 4.0, 1.5],
        [2.0, 2.0, 3.0],
        None,
    ]
    assert [r.speedup_vs_torch for r in records] == [1.0, 2.5, 2.0, None]


def _bench(p50: dict[str, float]) -> dict:
    """A resfuse-bench result with one 1x3x64x64 record per backend and the given p50s."""
    return {
        "artifact": "a.json",
        "records": [
            {"artifact": "a", "backend": b, "device": "cpu", "shape": [1, 3, 64, 64], "p50_ms": t}
            for b, t in p50.items()
        ],
    }


@pytest.mark.parametrize(
    "before,now,limit,change,passed",
    [
        (10.0, 11.0, 0.10, "+10.0%", True),  # exactly at the limit passes (11/10 - 1 > 0.1)
        (10.0, 11.0, 0.09, "+10.0%", False),
        (3.0, 3.3, 0.10, "+10.0%", True),  # at the limit, float error the other way
        (10.0, 10.1, 0.00, "+1.0%", False),
        (10.0, 10.0, 0.00, "+0.0%", True),
        (10.0, 9.0, 0.00, "-10.0%", True),  # faster always passes
        (10.0, 12.5, 0.25, "+25.0%", True),
        (10.0, 12.6, 0.25, "+26.0%", False),
    ],
)
def test_compare_baseline_known_changes(before, now, limit, change: str, passed: bool) -> None:
    rows, ok = compare_baseline(
        _bench({"onnxruntime": now}), _bench({"onnxruntime": before}), limit
    )
    verdict = "ok" if passed else f"REGRESSION > {limit:.0%}"
    assert ok is passed
    assert rows == [
        ["a", "onnxruntime", "cpu", "1x3x64x64", f"{before:.2f}", f"{now:.2f}", change, verdict]
    ]


def test_compare_baseline_one_regression_fails_the_run() -> None:
    rows, ok = compare_baseline(
        _bench({"torch": 20.0, "onnxruntime": 12.0, "tvm": 1.0}),
        _bench({"torch": 20.0, "onnxruntime": 10.0}),
        0.10,
    )
    assert not ok and [row[-1] for row in rows] == ["ok", "REGRESSION > 10%"]
    with pytest.raises(ResfuseError, match="shares no artifact/backend/device/shape"):
        compare_baseline(_bench({"torch": 1.0}), _bench({"onnxruntime": 1.0}), 0.10)
    with pytest.raises(ConfigError, match="--max-regression must be >= 0"):
        compare_baseline(_bench({"torch": 1.0}), _bench({"torch": 1.0}), -0.01)


def test_torch_threads_are_set_while_active_and_restored(exported, three_threads) -> None:
    path = exported["masked"].manifest_path
    session = runtime.load(path, "torch", threads=1)
    assert torch.get_num_threads() == 1 and session.runner.describe()["threads"] == 1
    session.close()
    assert torch.get_num_threads() == 3
    with runtime.load(path, "torch"):  # no option: torch's count untouched
        assert torch.get_num_threads() == 3
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ConfigError, match=rf"threads={bad!r} is not a whole number >= 1"):
            runtime.load(path, "torch", threads=bad)
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize(
    "command,args,message",
    [
        (
            bench_main,
            ["--threads", "-1"],
            "Invalid value for '--threads': -1 is not in the range x>=1",
        ),
        (
            bench_main,
            ["--threads", "0"],
            "Invalid value for '--threads': 0 is not in the range x>=1",
        ),
        (
            bench_main,
            ["--warmup", "0"],
            "Invalid value for '--warmup': 0 is not in the range x>=1",
        ),
        (bench_main, ["--iters", "0"], "Invalid value for '--iters': 0 is not in the range x>=1"),
        (
            bench_main,
            ["--rounds", "0"],
            "Invalid value for '--rounds': 0 is not in the range x>=1",
        ),
        (
            bench_main,
            ["--max-regression", "-0.1"],
            "'--max-regression': -0.1 is not in the range x>=0",
        ),
        (
            bench_main,
            ["--max-regression", "nan"],
            "'--max-regression': 'nan' is not a finite number",
        ),
        (check_main, ["--atol", "-1"], "Invalid value for '--atol': -1.0 is not in the range x>=0"),
        (check_main, ["--rtol", "inf"], "Invalid value for '--rtol': 'inf' is not a finite number"),
        (check_main, ["--max-rel-l2", "nan"], "'--max-rel-l2': 'nan' is not a finite number"),
        (check_main, ["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range x>=0"),
    ],
)
def test_numeric_options_out_of_range_are_named(exported, command, args, message: str) -> None:
    """The real commands on a real artifact, in process: a usage error (exit 2), no exception."""
    path = str(exported["masked"].manifest_path)
    common = ["--shapes", "1x3x64x64"] + (["--iters", "1"] if command is bench_main else [])
    result = CliRunner().invoke(command, [path, *common, *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert message in result.stderr


def test_bench_threads_minus_one_is_one_line_without_traceback(exported) -> None:
    proc = run_installed("resfuse-bench", str(exported["masked"].manifest_path), "--threads", "-1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Error: Invalid value for '--threads': -1 is not in the range x>=1." in proc.stderr


def test_soak_script_runs_briefly(exported, tmp_path: Path) -> None:
    """benchmarks/soak.py end to end on tiny settings: one session, a new shape every call."""
    script = Path(__file__).parents[1] / "benchmarks" / "soak.py"
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--artifact", str(exported["masked"].manifest_path)]
        + ["--calls", "20", "--every", "10", "--warmup", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| mem_pattern | calls |" in proc.stdout
    result = json.loads(out.read_text())
    assert [s["calls"] for s in result["samples"]] == [0, 10, 20]
    assert result["distinct_shapes"] > 10 and result["settings"]["mem_pattern"] is True
    assert result["summary"]["rss_end_mib"] == result["samples"][-1]["rss_mib"] > 0
    assert result["step_up"]["shape"] == [4, 3, 320, 320]
    assert "usable_cpus" in result["machine"]


def test_bench_cli_outputs_and_baseline_gate(exported, tmp_path: Path) -> None:
    path = str(exported["masked"].manifest_path)
    common = ["--shapes", "1x3x64x64", "--warmup", "1", "--iters", "3", "--rounds", "2"]
    common += ["--threads", "1"]
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
        "--report",
        str(tmp_path / "b.html"),
    )
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if "| onnxruntime |" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:6] == ["masked-resnet18", "onnxruntime", "cpu", "float32", "1x3x64x64", "6"]
    assert cells[7:10] == ["-", "-", "-"]  # no p90, p95 or p99 from 6 calls
    assert re.fullmatch(r"[\d.]+x \([\d.]+\.\.[\d.]+\)", cells[15]), row  # median (range)
    assert (tmp_path / "b.md").read_text().startswith("|        artifact |     backend |")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "b.json").read_text())
    assert len(result["records"]) == 2
    page = (tmp_path / "b.html").read_text()  # the same numbers, drawn; nothing to fetch
    assert page.count("<svg") == 2 and "<script" not in page and 'src="http' not in page
    assert all(f"<td>{r['p50_ms']:.2f}</td>" in page for r in result["records"])
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
    old_fields = {"artifact", "backend", "device", "shape", "iters", "warmup", "p50_ms"}
    for record in result["records"]:  # from before the blocked stopwatch, 100x faster
        for key in set(record) - old_fields:
            del record[key]
        record["p50_ms"] /= 100
    (tmp_path / "fast.json").write_text(json.dumps(result))
    slow = run("resfuse-bench", path, *common, "--baseline", str(tmp_path / "fast.json"))
    assert slow.returncode == 1 and "REGRESSION" in slow.stdout
    assert "p50 latency regressed by more than 10%" in slow.stderr
    bad = run("resfuse-bench", path, "--backends", "torch,tvm")
    assert bad.returncode == 1 and "unknown backends ['tvm']" in bad.stderr


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photographs (scikit-image's) at sizes a max-256 artifact takes, one in a subfolder
    and one grayscale, as a user's folder holds them."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    sizes = {"astronaut": (128, 96), "coffee": (120, 80), "chelsea": (100, 150)}
    for name, size in sizes.items():
        Image.fromarray(getattr(skimage.data, name)()).resize(size).save(folder / f"{name}.png")
    Image.fromarray(skimage.data.camera()).resize((90, 90)).save(folder / "sub" / "camera.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _bench_json(path: Path, out: Path, *args: str) -> tuple[dict, str, str]:
    common = ["--shapes", "1x3x64x64", "--warmup", "1", "--iters", "1", "--rounds", "1"]
    result = CliRunner().invoke(
        bench_main, [str(path), *common, "--threads", "1", "--json", str(out), *args]
    )
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.stdout, result.stderr


def test_bench_images_judge_the_error_column(head_artifact, photos, tmp_path: Path) -> None:
    """--images: each deployed engine's error is its worst image's, as resfuse-check measures
    it on the same files; the JSON and the table say so, and timing stays on --shapes."""
    judged, table, stderr = _bench_json(head_artifact, tmp_path / "i.json", "--images", str(photos))
    noise, _, _ = _bench_json(head_artifact, tmp_path / "r.json")
    assert judged["inputs"] == {"kind": "images", "folder": str(photos.resolve()), "count": 4}
    assert noise["inputs"]["kind"] == "random normal"
    torch_eager, deployed = judged["records"]
    assert (torch_eager["judged_on"], deployed["judged_on"]) == ("random", "images")
    assert deployed["shape"] == [1, 3, 64, 64] and deployed["n"] == 1
    # The same engines, settings and files, independently: the worst image, to the last bit.
    with (
        runtime.load(head_artifact, "onnxruntime", threads=1) as deployed_engine,
        runtime.load(head_artifact, "torch", threads=1) as eager,
    ):
        inputs = [deployed_engine.preprocess(f) for f in image_files(photos)]
        errors = [compare(eager.run(x), deployed_engine.run(x), Tolerance()) for x in inputs]
    sizes = {x.shape[2:] for x in inputs}  # each at its own size, not a timed shape
    assert sizes == {(96, 128), (80, 120), (150, 100), (90, 90)}
    assert deployed["rel_l2"] == max(e.rel_l2 for e in errors)
    assert deployed["max_abs"] == max(e.max_abs for e in errors)
    assert deployed["rel_l2"] != noise["records"][1]["rel_l2"]  # what random inputs gave
    assert deployed["within_tolerance"] and deployed["agreement"] == 1.0
    assert re.search(r"\| onnxruntime \|.*\|\s+pass \|\s+images \|", table), table
    assert f"on images (4 from {photos.resolve()})" in table
    assert "grayscale" in stderr  # sub/camera.png into a 3-channel model: said once


def test_bench_images_refuses_what_it_cannot_judge(head_artifact, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    big = tmp_path / "big"
    big.mkdir()
    Image.new("RGB", (300, 64)).save(big / "wide.png")  # the artifact takes at most 256
    for folder, text in [
        (tmp_path / "empty", "holds no"),
        (tmp_path / "none", "is not a folder"),
        (big, "--images wide.png: "),
    ]:
        result = CliRunner().invoke(
            bench_main, [str(head_artifact), "--shapes", "1x3x64x64", "--images", str(folder)]
        )
        assert result.exit_code == 1 and text in result.stderr, result.output
        assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
