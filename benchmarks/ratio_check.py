"""Does resfuse-bench's ratio to PyTorch hold up? The same two engines timed by a script that
shares none of resfuse's stopwatch.

    python benchmarks/ratio_check.py                       # masked-resnet18, 512x512, 2 threads
    python benchmarks/ratio_check.py --artifact benchmarks/artifacts/spp-resnet50.json

The independent side times PyTorch eager (the model rebuilt from the artifact's weights) and a
plain onnxruntime.InferenceSession on the artifact's .onnx, each block in a process of its own
(no thread pool of one engine can linger into the other's block): 3 warm-up calls, then
--calls timed calls, the block median kept. Blocks alternate engine by engine, --rounds rounds
before and after one `resfuse-bench --backends torch,onnxruntime` run on the same artifact,
shape and threads. Target: the two ratios agree within 10%. Writes
benchmarks/results/ratio_check.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
ENGINES = ("torch", "onnxruntime")


def worker(artifact: Path, engine: str, side: int, threads: int, calls: int) -> float:
    """One block in this process: the median ms of `calls` consecutive calls after 3 warm-ups."""
    manifest = json.loads(artifact.read_text())
    x = np.random.default_rng(0).standard_normal((1, 3, side, side), dtype=np.float32)
    if engine == "torch":
        import torch
        from safetensors.torch import load_file

        from resfuse.models import build_model

        torch.set_num_threads(threads)
        model = build_model(**manifest["model"]).eval()
        model.load_state_dict(load_file(artifact.parent / manifest["files"]["weights"]["path"]))
        tensor = torch.from_numpy(x)

        def call() -> None:
            with torch.inference_mode():
                model(tensor)
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(
            str(artifact.parent / manifest["files"]["onnx"]["path"]),
            options,
            providers=["CPUExecutionProvider"],
        )
        name = session.get_inputs()[0].name

        def call() -> None:
            session.run(None, {name: x})

    for _ in range(3):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def block(args: argparse.Namespace, engine: str) -> float:
    command = [sys.executable, __file__, "--worker", engine, "--artifact", str(args.artifact)]
    command += ["--side", str(args.side), "--threads", str(args.threads)]
    command += ["--calls", str(args.calls)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def independent_rounds(args: argparse.Namespace, first: int) -> list[dict[str, float]]:
    rounds = []
    for r in range(args.rounds):
        order = ENGINES if (first + r) % 2 == 0 else ENGINES[::-1]
        ms = {engine: block(args, engine) for engine in order}
        rounds.append({**ms, "ratio": ms["torch"] / ms["onnxruntime"]})
        print(f"independent round: {rounds[-1]}", flush=True)
    return rounds


def resfuse_bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [str(Path(sys.executable).with_name("resfuse-bench")), str(args.artifact)]
        command += ["--backends", ",".join(ENGINES), "--shapes", f"1x3x{args.side}x{args.side}"]
        command += ["--threads", str(args.threads), "--json", str(out)]
        subprocess.run(command, check=True, capture_output=True)
        records = json.loads(out.read_text())["records"]
    ort = next(r for r in records if r["backend"] == "onnxruntime")
    torch_ = next(r for r in records if r["backend"] == "torch")
    return {
        "torch_p50_ms": torch_["p50_ms"],
        "onnxruntime_p50_ms": ort["p50_ms"],
        "ratio": ort["speedup_vs_torch"],
        "ratio_rounds": ort["speedup_rounds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, default=HERE / "artifacts/masked-resnet18.json")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="independent rounds, each side")
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(worker(args.artifact, args.worker, args.side, args.threads, args.calls))
        return
    if not args.artifact.exists():
        sys.exit(
            f"{args.artifact} not found: run benchmarks/cpu_latency.py first, or pass --artifact"
        )
    rounds = independent_rounds(args, 0)
    bench = resfuse_bench(args)
    print(f"resfuse-bench: {bench}", flush=True)
    rounds += independent_rounds(args, 1)
    independent = float(np.median([r["ratio"] for r in rounds]))
    difference = bench["ratio"] / independent - 1
    result = {
        "artifact": str(args.artifact),
        "shape": [1, 3, args.side, args.side],
        "threads": args.threads,
        "independent_rounds": rounds,
        "independent_ratio": independent,
        "resfuse_bench": bench,
        "difference": difference,
        "agree_within_10pct": abs(difference) <= 0.10,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results/ratio_check.json").write_text(json.dumps(result, indent=2) + "\n")
    ratios = [r["ratio"] for r in rounds]
    print(
        f"\n| stopwatch | torch / onnxruntime | range |\n|---|---|---|\n"
        f"| independent ({len(rounds)} rounds, a process per block) | {independent:.2f}x | "
        f"{min(ratios):.2f}..{max(ratios):.2f} |\n"
        f"| resfuse-bench (5 rounds) | {bench['ratio']:.2f}x | "
        f"{min(bench['ratio_rounds']):.2f}..{max(bench['ratio_rounds']):.2f} |\n\n"
        f"difference {difference:+.1%}: "
        f"{'agree within 10%' if result['agree_within_10pct'] else 'DISAGREE by more than 10%'}"
    )


if __name__ == "__main__":
    main()
