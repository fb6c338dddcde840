"""INT8 under a segmentation head: the head's Concat on 8-bit values against the float32 Concat,
and both against float32 ONNX Runtime, in the same rotated rounds.

    python benchmarks/head_concat.py                          # every method, resnet18, 4 classes
    python benchmarks/head_concat.py --methods upsample --out head.json

Each model is exported in float32 with a head, then quantized twice from the same graph and
the same calibration inputs: as `resfuse-export --int8` does it (`concat_8bit`, the default)
and with the head's Concat left in float32, the form before it. The two INT8 graphs must give
equal outputs, bit for bit (the script says so, and stops otherwise). Timing is the project's
block protocol (`runtime.bench.run_blocks`): bare ONNX Runtime sessions, one per graph, each
with the thread count given and spinning off, as the onnxruntime backend makes them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cpu_latency import FP32, _spread
from int8_ratio import _commit

from resfuse.artifacts import write_json
from resfuse.export.onnx import INPUT_NAME
from resfuse.export.pipeline import export_artifact
from resfuse.export.quantize import quantize_int8
from resfuse.models import METHODS, ModelConfig
from resfuse.runtime.bench import round_ratios, run_blocks
from resfuse.runtime.machine import machine_info
from resfuse.runtime.report import markdown_table

GRAPHS = ("float32", "int8 float32 concat", "int8 8-bit concat")


def graphs(config: ModelConfig, folder: Path, side: int, calib: int) -> list[bytes]:
    """The float32 graph and its two INT8 forms, calibrated on `calib` random normal inputs."""
    fp32 = onnx.load(export_artifact(config, folder, FP32).onnx_path)
    rng = np.random.default_rng(0)
    shape = (1, config.in_channels, side, side)
    batches = [rng.standard_normal(shape, dtype=np.float32) for _ in range(calib)]
    before = quantize_int8(fp32, INPUT_NAME, batches, concat_8bit=False)
    after = quantize_int8(fp32, INPUT_NAME, batches)
    return [g.SerializeToString() for g in (fp32, before, after)]


def session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def measure(models: list[bytes], x: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    sessions = [session(m, args.threads) for m in models]
    outputs = [s.run(None, {INPUT_NAME: x})[0] for s in sessions]
    if not np.array_equal(outputs[1], outputs[2]):
        raise SystemExit("the two INT8 graphs disagree: the 8-bit Concat changed the numbers")

    def call(k: int) -> list[float]:
        start = time.perf_counter()
        sessions[k].run(None, {INPUT_NAME: x})
        return [(time.perf_counter() - start) * 1e3]

    times = run_blocks(len(sessions), args.rounds, args.iters, call)[..., 0]
    rounds = [[float(np.median(block)) for block in engine] for engine in times]
    p50 = {name: float(np.median(t)) for name, t in zip(GRAPHS, times, strict=True)}
    fp32, before, after = rounds
    return {
        "p50_ms": p50,
        "round_p50_ms": dict(zip(GRAPHS, rounds, strict=True)),
        "equal_outputs": True,
        "concat_speedup_rounds": round_ratios(before, after)[0],
        "int8_before_over_fp32_rounds": round_ratios(fp32, before)[0],
        "int8_after_over_fp32_rounds": round_ratios(fp32, after)[0],
    }


def table(rows: list[dict[str, Any]]) -> str:
    body = [
        [
            r["model"],
            *(f"{r['p50_ms'][g]:.1f}" for g in GRAPHS),
            _spread(r["concat_speedup_rounds"]),
            _spread(r["int8_before_over_fp32_rounds"]),
            _spread(r["int8_after_over_fp32_rounds"]),
        ]
        for r in rows
    ]
    headers = [
        "model",
        *(f"{g} p50 ms" for g in GRAPHS),
        "8-bit concat speed-up",
        "INT8/fp32 before",
        "INT8/fp32 now",
    ]
    return markdown_table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--calib", type=int, default=8, help="random calibration inputs")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results/head-concat.json"
    )
    args = parser.parse_args()

    x = np.random.default_rng(1).standard_normal((1, 3, args.side, args.side), dtype=np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            config = ModelConfig(method, args.backbone, num_classes=args.classes)
            print(f"exporting and quantizing {method}-{args.backbone}", flush=True)
            models = graphs(config, Path(tmp), args.side, args.calib)
            print(f"timing at {args.side}x{args.side}", flush=True)
            row = measure(models, x, args)
            rows.append({"model": f"{method}-{args.backbone} ({args.classes} classes)", **row})
    summary = {
        "format": "resfuse-head-concat",
        "commit": _commit(),
        "machine": machine_info(),
        **{k: vars(args)[k] for k in ("threads", "side", "rounds", "iters", "calib")},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, summary)
    cpu = summary["machine"]
    flags = " ".join(cpu.get("cpu_flags", []))
    print(f"\n{cpu.get('cpu')} · flags {flags} · {args.threads} threads")
    print(table(rows))


if __name__ == "__main__":
    main()
