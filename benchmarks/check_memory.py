"""Peak memory of `resfuse-check` at 2048x2048 against ONNX Runtime alone on the same input.

    python benchmarks/check_memory.py                          # masked resnet18, 1x3x2048x2048
    python benchmarks/check_memory.py --method spp --artifact artifacts/spp-resnet18.json

Target: the check's peak resident memory is at most 1.5x the backend's own peak. The check
holds the backend's output and the PyTorch reference's (1.1 GB each for 67 channels at
2048x2048) and runs the reference, so it cannot equal the backend; what it must not do is copy
whole outputs again (float64 copies took `spp-resnet50` at 2048x2048 to 18.7 GB).

Each command runs in a fresh Python of its own, itself started by a small wrapper that reads
resource.getrusage(RUSAGE_CHILDREN).ru_maxrss: the peak of that one command and nothing else.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from resfuse.artifacts import write_json
from resfuse.export.pipeline import ExportOptions, export_artifact
from resfuse.models import METHODS, ModelConfig
from resfuse.runtime.machine import machine_info

TARGET = 1.5  # the check's peak over the backend's own peak

# The backend alone: the same load() and the same random input as resfuse-check's first shape.
_BACKEND_ALONE = """
import sys
import numpy as np
from resfuse.runtime import load
shape = tuple(int(d) for d in sys.argv[2].split("x"))
x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
with load(sys.argv[1], "onnxruntime", "cpu") as session:  # resfuse-check's threads
    session.run(x)
"""

# One command in a child of its own, so RUSAGE_CHILDREN is that command's peak alone.
_PEAK = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:]).returncode
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
print(json.dumps({"rc": code, "peak_kib": peak_kib, "seconds": time.perf_counter() - start}))
"""


def peak(command: list[str]) -> dict[str, Any]:
    """The peak resident memory (MiB), exit code and wall time of `command`, and the lines it
    printed (`output`)."""
    wrapper = subprocess.run(
        [sys.executable, "-c", _PEAK, *command], capture_output=True, text=True, check=True
    )
    *printed, last = wrapper.stdout.strip().splitlines()
    result = json.loads(last)
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(command)} exited {result['rc']}:\n{wrapper.stderr}")
    return {"peak_mib": result["peak_kib"] / 1024, "seconds": result["seconds"], "output": printed}


def measure(artifact: Path, shape: str) -> dict[str, Any]:
    check = Path(sys.executable).with_name("resfuse-check")
    backend = peak([sys.executable, "-c", _BACKEND_ALONE, str(artifact), shape])
    checked = peak([str(check), str(artifact), "--shapes", shape])
    backend.pop("output"), checked.pop("output")  # the check's table is not a measurement
    return {
        "backend": backend,
        "check": checked,
        "ratio": checked["peak_mib"] / backend["peak_mib"],
        "target": TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="masked", choices=METHODS)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--shape", default="1x3x2048x2048")
    parser.add_argument("--artifact", type=Path, default=None, help="[default: a fresh export]")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/memory.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        artifact = (
            args.artifact
            or export_artifact(
                ModelConfig(args.method, backbone=args.backbone), Path(tmp), ExportOptions()
            ).manifest_path
        )
        print(f"measuring {artifact.name} at {args.shape}", flush=True)
        row = measure(artifact, args.shape)
    summary = {
        "format": "resfuse-check-memory",
        "machine": machine_info(),
        "artifact": artifact.name,
        "shape": args.shape,
        **row,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, summary)
    cpu = summary["machine"]
    print(f"\n{cpu.get('cpu')} · flags {' '.join(cpu.get('cpu_flags', []))}")
    print("| run | peak RSS (MiB) | wall (s) |\n| --- | --- | --- |")
    for name in ("backend", "check"):
        print(f"| {name} | {row[name]['peak_mib']:.0f} | {row[name]['seconds']:.1f} |")
    verdict = "meets" if row["ratio"] <= TARGET else "MISSES"
    print(f"\ncheck / backend = {row['ratio']:.2f} ({verdict} the target <= {TARGET})")


if __name__ == "__main__":
    main()
