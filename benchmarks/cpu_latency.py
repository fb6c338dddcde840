"""CPU latency of the three fusion methods: ONNX Runtime against PyTorch eager, same threads.

    python benchmarks/cpu_latency.py            # exports, times, writes benchmarks/RESULTS.md

Writes benchmarks/results/cpu.json (every record and the machine), benchmarks/results/cpu.png
and benchmarks/RESULTS.md. Targets it reports on (never asserted in tests: shared machines are
noisy, so both sides of each ratio are measured in the same run, back to back):
- ONNX Runtime at least 1.8x faster (p50) than PyTorch eager at 512x512, batch 1, every method;
- the runtime wrapper adds at most 3% over a bare InferenceSession.run on the same input;
- achieved GFLOP/s against the machine's float32 matrix-product peak.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resfuse.artifacts import read_manifest
from resfuse.export.pipeline import ExportOptions, export_artifact
from resfuse.models import METHODS, ModelConfig, build_model
from resfuse.runtime import load
from resfuse.runtime.bench import benchmark, plot
from resfuse.runtime.machine import machine_info
from resfuse.runtime.report import markdown_table

HERE = Path(__file__).parent
SHAPES = {224: 30, 512: 20, 1024: 6}  # side -> timed iterations


def export_all(folder: Path, backbones: list[str], reuse: bool) -> list[Path]:
    manifests = []
    for backbone in backbones:
        for method in METHODS:
            manifest = folder / f"{method}-{backbone}.json"
            if not (reuse and manifest.exists()):
                print(f"exporting {method}-{backbone}", flush=True)
                export_artifact(ModelConfig(method, backbone), folder, ExportOptions())
            read_manifest(manifest).file("onnx")  # verified before it is timed
            manifests.append(manifest)
    return manifests


def gemm_peak_gflops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """Best float32 matrix-product rate: the ceiling a convolution network can approach."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_gflop(manifest: Path, side: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = read_manifest(manifest).config
    model = build_model(**cfg.to_dict())
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, cfg.in_channels, side, side))
    return counter.get_total_flops() / 1e9


def wrapper_overhead(manifest: Path, threads: int, rounds: int = 30) -> dict[str, float]:
    """Session.run against the same ONNX Runtime session's bare run, interleaved call by call."""
    x = np.random.default_rng(0).standard_normal((1, 3, 512, 512), dtype=np.float32)
    with load(manifest, threads=threads) as session:
        bare = session.runner.session
        name = bare.get_inputs()[0].name
        for _ in range(3):
            session.run(x)
        wrapped_ms, bare_ms = [], []
        for _ in range(rounds):
            wrapped_ms.append(_timed(lambda: session.run(x)) * 1e3)
            bare_ms.append(_timed(lambda: bare.run(None, {name: x})) * 1e3)
    wrapped, plain = float(np.median(wrapped_ms)), float(np.median(bare_ms))
    return {"wrapped_p50_ms": wrapped, "bare_p50_ms": plain, "overhead": wrapped / plain - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet18,resnet50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--artifacts", type=Path, default=HERE / "artifacts")
    parser.add_argument("--reuse", action="store_true", help="reuse earlier exports")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite RESULTS.md and the plots from results/cpu.json",
    )
    args = parser.parse_args()
    out = HERE / "results"
    if args.report_only:
        summary = json.loads((out / "cpu.json").read_text())
        plot_records(summary, out)
        write_results(summary)
        return

    manifests = export_all(args.artifacts, args.backbones.split(","), args.reuse)
    records: list[dict[str, Any]] = []
    for manifest in manifests:
        for side, iters in SHAPES.items():
            print(f"timing {manifest.stem} at {side}x{side}", flush=True)
            result = benchmark(
                manifest,
                ("torch", "onnxruntime"),
                [(1, 3, side, side)],
                warmup=2,
                iters=iters,
                threads=args.threads,
            )
            for record in result["records"]:
                record["artifact"] = manifest.stem
                record["gflop"] = model_gflop(manifest, side)
                record["gflops_achieved"] = record["gflop"] / (record["p50_ms"] / 1e3)
            records.extend(result["records"])
    peak = gemm_peak_gflops(args.threads)
    overhead = wrapper_overhead(
        args.artifacts / f"masked-{args.backbones.split(',')[0]}.json", args.threads
    )
    summary = {
        "format": "resfuse-bench",
        "artifact": "benchmarks/artifacts/*",
        "machine": machine_info(),
        "threads": args.threads,
        "gemm_peak_gflops": peak,
        "wrapper_overhead": overhead,
        "records": records,
    }
    out.mkdir(exist_ok=True)
    (out / "cpu.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_records(summary, out)
    write_results(summary)
    print((HERE / "RESULTS.md").read_text())


def plot_records(summary: dict[str, Any], out: Path) -> None:
    by_artifact: dict[str, list[dict[str, Any]]] = {}
    for r in summary["records"]:
        by_artifact.setdefault(r["artifact"], []).append(r)
    for name, records in by_artifact.items():
        plot({**summary, "artifact": name, "records": records}, out / f"cpu-{name}.png")


def write_results(summary: dict[str, Any]) -> None:
    m = summary["machine"]
    peak = summary["gemm_peak_gflops"]
    rows = []
    for r in summary["records"]:
        rows.append(
            [
                r["artifact"],
                r["backend"],
                "x".join(map(str, r["shape"][2:])),
                f"{r['p50_ms']:.1f}",
                f"{r['p90_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['throughput_ips']:.2f}",
                f"{r['gflops_achieved']:.0f}",
                f"{r['gflops_achieved'] / peak:.0%}",
                f"{r['speedup_vs_torch']:.2f}x",
            ]
        )
    plots = "\n".join(
        f"![{name}](results/cpu-{name}.png)"
        for name in dict.fromkeys(r["artifact"] for r in summary["records"])
    )
    at512 = [
        r for r in summary["records"] if r["backend"] == "onnxruntime" and r["shape"][2] == 512
    ]
    target = markdown_table(
        ["artifact", "ORT p50 ms", "torch p50 ms", "speedup", "target 1.8x"],
        [
            [
                r["artifact"],
                f"{r['p50_ms']:.1f}",
                f"{r['p50_ms'] * r['speedup_vs_torch']:.1f}",
                f"{r['speedup_vs_torch']:.2f}x",
                "met" if r["speedup_vs_torch"] >= 1.8 else "NOT met",
            ]
            for r in at512
        ],
    )
    o = summary["wrapper_overhead"]
    text = f"""# CPU latency: ONNX Runtime against PyTorch eager

Made by `python benchmarks/cpu_latency.py` (raw records: `results/cpu.json`, plots:
`results/cpu-*.png`). Batch 1, float32, {summary["threads"]} threads for both backends, warm-up
excluded; each shape timed on both backends back to back in one run.

Machine: {m["cpu"]}, {m["logical_cpus"]} logical CPUs ({m["physical_cores"]} physical cores),
{m["os"]}; {", ".join(f"{k} {v}" for k, v in m["versions"].items())}.

## Target: ONNX Runtime at least 1.8x faster than PyTorch eager at 512x512

{target}

## Runtime wrapper overhead (masked-resnet18, 512x512, medians of interleaved calls)

`Session.run` (input contract, NaN/Inf scan, dispatch) {o["wrapped_p50_ms"]:.2f} ms against a bare
`InferenceSession.run` {o["bare_p50_ms"]:.2f} ms on the same session: {o["overhead"]:+.1%}
(target: at most +3%).

## Compute efficiency

Float32 matrix-product peak measured here (torch, 2048x2048, best of 10):
{peak:.0f} GFLOP/s. The GFLOP/s column below is the model's FLOPs (torch's FlopCounterMode)
over its p50 latency, and "of peak" its ratio to that matrix-product rate. The float32 ceiling
follows: a model cannot run much faster than its FLOPs at the peak rate, and the full-resolution
tail of each method (resize, gating, concatenation of 64+ channels at H x W) is memory-bound
work on top of that.

## All records

{
        markdown_table(
            [
                "artifact",
                "backend",
                "HxW",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "images/s",
                "GFLOP/s",
                "of peak",
                "vs torch",
            ],
            rows,
        )
    }

## Latency against resolution

{plots}
"""
    (HERE / "RESULTS.md").write_text(text)


if __name__ == "__main__":
    main()
