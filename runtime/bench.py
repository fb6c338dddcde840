"""Latency: every backend on every shape in one run, warm-up excluded, compared with torch."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resfuse.artifacts import read_manifest
from resfuse.errors import ConfigError, ResfuseError
from resfuse.runtime.machine import machine_info
from resfuse.runtime.report import Shape, markdown_table, shape_str
from resfuse.runtime.session import Session, load

BENCH_FORMAT = "resfuse-bench"


@dataclass
class BenchRecord:
    artifact: str  # the manifest's stem
    backend: str
    device: str
    shape: list[int]
    iters: int
    warmup: int
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    throughput_ips: float  # images (batch items) per second at the mean latency
    h2d_ms: float  # mean host-to-device copy, 0 where the backend has none to report apart
    compute_ms: float
    d2h_ms: float
    speedup_vs_torch: float | None = None  # torch p50 / this p50, same shape and run
    precision: str = "float32"  # of the graph the backend runs; torch is the float32 original
    settings: dict[str, Any] = field(default_factory=dict)


def _record(
    session: Session, shape: Shape, times: np.ndarray, phases: np.ndarray, warmup: int
) -> BenchRecord:
    p50, p90, p95, p99 = np.percentile(times, [50, 90, 95, 99])
    mean = float(times.mean())
    h2d, compute, d2h = phases.mean(axis=0)
    return BenchRecord(
        session.manifest.path.stem,
        session.backend,
        session.runner.device,
        list(shape),
        len(times),
        warmup,
        float(p50),
        float(p90),
        float(p95),
        float(p99),
        mean,
        float(times.std()),
        float(times.min()),
        shape[0] * 1e3 / mean,
        float(h2d),
        float(compute),
        float(d2h),
        precision="float32" if session.backend == "torch" else session.manifest.precision,
        settings=session.runner.describe(),
    )


def _timed_call(session: Session, x: np.ndarray) -> tuple[float, tuple[float, float, float]]:
    """One call of the checked path (input check + backend): total ms and its phases."""
    start = time.perf_counter()
    session.check(x)
    _, split = session.runner.infer_timed(x)
    return (time.perf_counter() - start) * 1e3, (split.h2d_ms, split.compute_ms, split.d2h_ms)


def time_shape(
    sessions: list[Session],
    shape: Shape,
    warmup: int,
    iters: int,
    seed: int = 0,
    progress: Callable[[], None] = lambda: None,
) -> list[BenchRecord]:
    """Time every session on one shape, calls interleaved round-robin: a shared, noisy machine
    then slows all backends alike and their ratio stays fair."""
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    for session in sessions:
        for _ in range(warmup):
            session.run(x)
    times = np.empty((len(sessions), iters))
    phases = np.empty((len(sessions), iters, 3))
    for i in range(iters):
        for k, session in enumerate(sessions):
            times[k, i], phases[k, i] = _timed_call(session, x)
            progress()
    return [_record(s, shape, times[k], phases[k], warmup) for k, s in enumerate(sessions)]


def benchmark(
    path: str | Path,
    backends: Iterable[str] = ("torch", "onnxruntime"),
    shapes: Iterable[Shape] = ((1, 3, 224, 224), (1, 3, 512, 512)),
    warmup: int = 3,
    iters: int = 20,
    threads: int | None = None,
    device: str = "cpu",
    progress: Callable[[], None] = lambda: None,
    also: Iterable[str | Path] = (),
) -> dict[str, Any]:
    """{"machine", "artifact", "records"}: one record per artifact x backend x shape.

    `also`: other artifacts of the same PyTorch original (an INT8 export, another opset); their
    deployed backends join the same interleaved run, so their ratios to torch stay fair."""
    if warmup < 0 or iters < 1:
        raise ConfigError(f"need --warmup >= 0 and --iters >= 1, got {warmup} and {iters}")
    backends, others = list(backends), [Path(p) for p in also]
    _require_same_original(path, others)
    runs = [(Path(path), b) for b in backends]
    runs += [(other, b) for other in others for b in backends if b != "torch"]
    options = {"threads": threads} if threads else {}
    records: list[BenchRecord] = []
    with contextlib.ExitStack() as stack:
        sessions = [
            # The reference runs on the GPU whenever the deployed backend does.
            stack.enter_context(
                load(p, b, "cuda" if b == "torch" and device != "cpu" else device, **options)
            )
            for p, b in runs
        ]
        for shape in shapes:
            records += time_shape(sessions, shape, warmup, iters, progress=progress)
    add_speedups(records)
    return {
        "format": BENCH_FORMAT,
        "artifact": str(path),
        "machine": machine_info(),
        "records": [asdict(r) for r in records],
    }


def _require_same_original(path: str | Path, others: list[Path]) -> None:
    """Ratios to torch are only meaningful against one PyTorch original: same model, same
    weights."""
    main = read_manifest(path)
    for other in others:
        manifest = read_manifest(other)
        same_weights = (
            manifest.data["files"]["weights"]["sha256"] == main.data["files"]["weights"]["sha256"]
        )
        if manifest.config != main.config or not same_weights:
            raise ConfigError(
                f"--also {other} is not an export of the same PyTorch model and weights as "
                f"{path}; benchmark it on its own"
            )


def add_speedups(records: list[BenchRecord]) -> None:
    torch_p50 = {shape_str(r.shape): r.p50_ms for r in records if r.backend == "torch"}
    for r in records:
        base = torch_p50.get(shape_str(r.shape))
        r.speedup_vs_torch = base / r.p50_ms if base else None


def markdown(result: dict[str, Any]) -> str:
    rows = [
        [
            r["artifact"],
            r["backend"],
            r["device"],
            r.get("precision", "float32"),
            shape_str(r["shape"]),
            f"{r['p50_ms']:.2f}",
            f"{r['p90_ms']:.2f}",
            f"{r['p95_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['mean_ms']:.2f}",
            f"{r['std_ms']:.2f}",
            f"{r['min_ms']:.2f}",
            f"{r['throughput_ips']:.1f}",
            f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-",
        ]
        for r in result["records"]
    ]
    headers = [
        "artifact",
        "backend",
        "device",
        "precision",
        "shape",
        "p50 ms",
        "p90 ms",
        "p95 ms",
        "p99 ms",
        "mean ms",
        "std ms",
        "min ms",
        "images/s",
        "vs torch",
    ]
    return markdown_table(headers, rows)


def read_result(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResfuseError(f"cannot read benchmark results {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != BENCH_FORMAT:
        raise ResfuseError(f"{path} is not a resfuse-bench JSON file (written with --json)")
    return data


def _key(record: dict[str, Any], result: dict[str, Any]) -> tuple[str, str, str, str]:
    artifact = record.get("artifact", Path(result["artifact"]).stem)  # files before --also
    return artifact, record["backend"], record["device"], shape_str(record["shape"])


def compare_baseline(
    result: dict[str, Any], baseline: dict[str, Any], max_regression: float
) -> tuple[list[list[str]], bool]:
    """Rows (artifact, backend, device, shape, old p50, new p50, change, verdict) and whether
    all pass. Only artifact/backend/device/shape keys present in both runs are compared."""
    if max_regression < 0:
        raise ConfigError(f"--max-regression must be >= 0 (0.10 = 10%), got {max_regression}")
    old = {_key(r, baseline): r for r in baseline["records"]}
    rows, ok = [], True
    for r in result["records"]:
        key = _key(r, result)
        if key not in old:
            continue
        before, now = old[key]["p50_ms"], r["p50_ms"]
        change = now / before - 1
        # 11 ms against 10 ms is +10% on paper but 0.10000000000000009 in floats: a change
        # at the limit passes, within a margin far below any measurable latency difference.
        passed = change <= max_regression + 1e-9
        ok &= passed
        rows.append(
            [
                *key,
                f"{before:.2f}",
                f"{now:.2f}",
                f"{change:+.1%}",
                "ok" if passed else f"REGRESSION > {max_regression:.0%}",
            ]
        )
    if not rows:
        raise ResfuseError(
            "the baseline shares no artifact/backend/device/shape with this run; run the same "
            "artifacts, --backends and --shapes as the baseline"
        )
    return rows, ok


def plot(result: dict[str, Any], path: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        raise ResfuseError("--plot needs matplotlib: pip install 'resfuse[plot]'") from exc
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float, str]]] = {}
    for r in result["records"]:
        b, _, h, w = r["shape"]
        precision = r.get("precision", "float32")
        label = f"{r['artifact']}: {r['backend']} ({r['device']}, {precision}), batch {b}"
        series.setdefault(label, []).append((h * w / 1e6, r["p50_ms"], f"{h}x{w}"))
    for label, points in series.items():
        xs, ys, names = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=label)
        for x, y, name in zip(xs, ys, names, strict=True):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("input size (megapixels, H x W)")
    ax.set_ylabel("p50 latency (ms)")
    machine = result["machine"]
    ax.set_title(
        f"{Path(result['artifact']).stem} on {machine['cpu']}"
        f"{' / ' + machine['gpu'] if machine.get('gpu') else ''}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
