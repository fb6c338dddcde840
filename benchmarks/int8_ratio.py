"""INT8 against float32 ONNX Runtime, the two in the same rotated rounds: the INT8 target alone.

    python benchmarks/int8_ratio.py                      # every method, resnet18 and resnet50
    python benchmarks/int8_ratio.py --methods masked --backbones resnet18 --out int8.json

cpu_latency.py measures every engine at three sizes (about 45 minutes on 2 cores); this script
measures only what the INT8 target is about (float32 and INT8 ONNX Runtime, with PyTorch eager
as the reference, at 512x512, batch 1), so it also fits a short lease of another machine, one
with VNNI say. Same exports (`cpu_latency.FP32`, `cpu_latency.INT8`), same stopwatch
(`runtime.bench.benchmark`), same ratio rule (round by round, median and range). With
`--profile`, ONNX Runtime's own profiler splits each INT8 call by operator type.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from cpu_latency import INT8, _over, export_all, int8_table, op_profile

from resfuse.artifacts import write_json
from resfuse.models import METHODS
from resfuse.runtime.bench import benchmark
from resfuse.runtime.machine import machine_info


def measure(
    fp32: Path, int8: Path, side: int, threads: int, rounds: int, iters: int
) -> dict[str, Any]:
    result = benchmark(
        fp32,
        backends=["torch", "onnxruntime"],
        shapes=[(1, 3, side, side)],
        iters=iters,
        rounds=rounds,
        threads=threads,
        also=[int8],
    )
    by = {(r["artifact"], r["backend"]): r for r in result["records"]}
    ort, q = by[(fp32.stem, "onnxruntime")], by[(int8.stem, "onnxruntime")]
    ratios = _over(ort, q)
    return {
        "model": fp32.stem,
        "torch_p50_ms": by[(fp32.stem, "torch")]["p50_ms"],
        "fp32_p50_ms": ort["p50_ms"],
        "int8_p50_ms": q["p50_ms"],
        "int8_rel_l2": q["rel_l2"],
        "ratio_rounds": ratios,
        "ratio": float(np.median(ratios)),
        "records": result["records"],
    }


def _commit() -> str | None:
    """The checkout's commit, so a run can be matched to the graphs it timed; "-dirty" when
    tracked Python files differ from it (the graphs timed are then not that commit's)."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        changes = _git("status", "--porcelain", "-uno", "--", "*.py")
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}-dirty" if changes else head


def _git(*args: str) -> str:
    found = subprocess.run(
        ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
    )
    return found.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet18,resnet50")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--artifacts", type=Path, default=None, help="[default: a temp folder]")
    parser.add_argument("--reuse", action="store_true", help="reuse earlier exports")
    parser.add_argument("--profile", action="store_true", help="operator shares of INT8 calls")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/int8.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.artifacts or Path(tmp)
        pairs = export_all(folder, args.backbones.split(","), args.reuse, args.methods.split(","))
        rows = []
        for fp32, int8 in pairs:
            print(f"timing {fp32.stem} at {args.side}x{args.side}", flush=True)
            rows.append(measure(fp32, int8, args.side, args.threads, args.rounds, args.iters))
        profiles = {q.stem: op_profile(q, args.threads) for _, q in pairs} if args.profile else {}
    summary = {
        "format": "resfuse-int8-ratio",
        "commit": _commit(),
        "machine": machine_info(),
        "threads": args.threads,
        "side": args.side,
        "rounds": args.rounds,
        "iters": args.iters,
        "calibration": INT8.calibration.describe() if INT8.calibration else None,
        "rows": rows,
        "op_profile": profiles,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, summary)
    cpu = summary["machine"]
    flags = " ".join(cpu.get("cpu_flags", []))
    print(f"\n{cpu.get('cpu')} · flags {flags} · {args.threads} threads")
    print(int8_table(rows))
    for model, shares in profiles.items():
        top = ", ".join(f"{op} {share:.1%}" for op, share in list(shares.items())[:6])
        print(f"{model}: {top}")


if __name__ == "__main__":
    main()
