"""Tiled inference against whole-image inference: peak memory and throughput at 4096 x 4096, and
how far tiled outputs are from whole-image ones on real photographs.

    python benchmarks/tiling.py                      # both parts, 3 rotated blocks
    python benchmarks/tiling.py --repeats 1 --size 2048 --skip-context

Part 1: a 1-channel masked resnet18 with a 2-class head, exported with --max-size SIZE so the
whole image can run at all; one fresh Python per run (its peak resident memory read by the
wrapper in check_memory.py), `whole` (one call) and `tiled` (512 x 512 tiles, overlap 0.25,
gaussian) in blocks whose order rotates, on ONNX Runtime's CPU. Ratios are quoted as the median
of the blocks with their min..max.

Part 2: the three methods (resnet18, random weights, 3 channels, no head) on scikit-image's
photographs, tiled at 256 x 256 against one whole-image call: relative L2 of the feature
channels (the image channels are exact both ways). spp pools over each tile instead of the
whole image, so its context differs most; the weights are untrained, so the numbers bound the
architecture's effect, not a trained model's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from check_memory import peak

from resfuse.artifacts import write_json
from resfuse.export.pipeline import ExportOptions, export_artifact
from resfuse.models import METHODS, ModelConfig
from resfuse.runtime import load
from resfuse.runtime.machine import machine_info

TILE = 512

# One run in a Python of its own: load, one call (whole or tiled), its seconds on stdout.
_RUN = """
import json, sys, time
import numpy as np
from resfuse.runtime import load
artifact, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
x = np.random.default_rng(0).standard_normal((1, 1, size, size), dtype=np.float32)
with load(artifact, "onnxruntime", "cpu") as session:
    tiling = {} if mode == "whole" else {"tile": int(mode), "overlap": 0.25, "blend": "gaussian"}
    start = time.perf_counter()
    out = session.run(x, **tiling)
    print(json.dumps({"infer_s": time.perf_counter() - start, "shape": list(out.shape)}))
"""


def one_run(artifact: Path, size: int, mode: str) -> dict[str, Any]:
    result = peak([sys.executable, "-c", _RUN, str(artifact), str(size), mode])
    printed = json.loads(result.pop("output")[-1])
    return {**result, **printed}


def memory_part(folder: Path, size: int, repeats: int) -> dict[str, Any]:
    config = ModelConfig("masked", in_channels=1, num_classes=2)
    artifact = export_artifact(config, folder, ExportOptions(max_size=size, max_batch=4))
    modes = ["whole", str(TILE)]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for block in range(repeats):
        for mode in modes[block % 2 :] + modes[: block % 2]:  # order rotates per block
            print(f"block {block + 1}/{repeats}: {mode} at {size}x{size}", flush=True)
            runs[mode].append(one_run(artifact.manifest_path, size, mode))
    memory = [
        w["peak_mib"] / t["peak_mib"] for w, t in zip(runs["whole"], runs[str(TILE)], strict=True)
    ]
    speed = [
        t["infer_s"] / w["infer_s"] for w, t in zip(runs["whole"], runs[str(TILE)], strict=True)
    ]
    return {
        "artifact": artifact.manifest_path.name,
        "input": f"1x1x{size}x{size}",
        "tile": f"{TILE}x{TILE}, overlap 0.25, gaussian",
        "runs": runs,
        "whole_over_tiled_peak": _spread(memory),
        "tiled_over_whole_time": _spread(speed),
    }


def context_part(folder: Path) -> list[dict[str, Any]]:
    from skimage import data

    photos = {name: getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
    rows = []
    for method in METHODS:
        exported = export_artifact(ModelConfig(method), folder, ExportOptions(max_size=1024))
        with load(exported.manifest_path, "onnxruntime") as session:
            for name, pixels in photos.items():
                from PIL import Image

                x = session.preprocess(Image.fromarray(pixels))
                whole = np.asarray(session.run(x))[:, 3:]
                tiled = np.asarray(session.run(x, tile=256, overlap=0.25))[:, 3:]
                rel = float(np.linalg.norm(tiled - whole) / np.linalg.norm(whole))
                rows.append(
                    {"method": method, "image": name, "shape": list(x.shape), "rel_l2": rel}
                )
                print(
                    f"{method:9} {name:10} {x.shape[2]}x{x.shape[3]}  rel L2 {rel:.2e}", flush=True
                )
    return rows


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-context", action="store_true", help="part 1 only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/tiling.json")
    args = parser.parse_args()
    summary: dict[str, Any] = {"format": "resfuse-tiling", "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        summary["memory"] = memory_part(Path(tmp), args.size, args.repeats)
        write_json(args.out, {**summary, "context": []})  # part 1 kept if part 2 fails
        summary["context"] = [] if args.skip_context else context_part(Path(tmp))
    write_json(args.out, summary)
    report(summary)


def report(summary: dict[str, Any]) -> None:
    cpu, memory = summary["machine"], summary["memory"]
    print(f"\n{cpu.get('cpu')} · flags {' '.join(cpu.get('cpu_flags', []))}")
    print(f"\n{memory['artifact']} at {memory['input']}, onnxruntime CPU")
    print("| run | peak RSS (MiB) | inference (s) |\n| --- | --- | --- |")
    for mode, runs in memory["runs"].items():
        mib = statistics.median(r["peak_mib"] for r in runs)
        secs = statistics.median(r["infer_s"] for r in runs)
        print(f"| {mode} | {mib:.0f} | {secs:.2f} |")
    for key, label in (
        ("whole_over_tiled_peak", "whole / tiled peak"),
        ("tiled_over_whole_time", "tiled / whole time"),
    ):
        s = memory[key]
        print(f"{label}: {s['median']:.2f} ({s['min']:.2f}..{s['max']:.2f})")
    if summary["context"]:
        print("\n| method | image | tiled vs whole, rel L2 of features |\n| --- | --- | --- |")
        for row in summary["context"]:
            print(f"| {row['method']} | {row['image']} | {row['rel_l2']:.2e} |")


if __name__ == "__main__":
    main()
