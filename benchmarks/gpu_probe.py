"""TensorRT-RTX on this GPU, in under a minute: for each artifact, build its engine at builder
level 0 on a small profile (resfuse-build --engine tensorrt-rtx), ask TensorRT-RTX whether the
plan runs here (Runtime.get_engine_validity), then run it once through resfuse.runtime.load
against the PyTorch original. benchmarks/gpu_check.sh runs it under `timeout 60`.

    python benchmarks/gpu_probe.py ARTIFACT.json [...] --cache DIR --output probe.json

Every stage is recorded (ok, seconds, one line of detail or error) and OUTPUT is rewritten after
each, so a probe that is killed still leaves what it saw. TensorRT-RTX runs only on the GPU
generations its ComputeCapability enum names (1.7: 7.5, 8.0, 8.6, 8.9, 12.0, 12.1). On another
GPU (an H100 or H200 is 9.0) each plan is built for 8.9 instead, nothing is run, and the one
expected answer is get_engine_validity's INVALID with UNSUPPORTED_CC among its diagnostics.
Exit status: 0 when every stage passed on a supported GPU; 3 when, on an unsupported one, every
plan built and was refused for its compute capability (expected); 1 otherwise (a failed build,
another refusal, or a plan for 8.9 said to be valid on 9.0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

PROFILE = "1x3x64x64:1x3x128x128:2x3x256x256"
SHAPE = (1, 3, 128, 128)
EXPECTED_REFUSAL = 3
OTHER_GENERATION = "8.9"  # what a plan is built for on a GPU TensorRT-RTX does not support


def main() -> int:
    args = _arguments()
    if not torch.cuda.is_available():
        print(f"gpu_probe.py: torch {torch.__version__} sees no CUDA device; nothing was probed")
        return 1
    major, minor = torch.cuda.get_device_capability()
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "stages": [],
    }
    stage = partial(_stage, report, args.output)
    supported = stage("import", _import) is not None and _targets(major, minor)
    report["supported"] = supported
    targets = [] if supported else ["--compute-capability", OTHER_GENERATION]
    for artifact in args.artifacts:
        sidecar = stage(f"build {artifact.stem}", partial(_build, artifact, args.cache, targets))
        if sidecar is not None:
            stage(f"validity {artifact.stem}", partial(_validity, Path(sidecar)))
        if supported:
            stage(f"run {artifact.stem}", partial(_run, artifact, args.cache))
    return _verdict(report)


def _stage(report: dict[str, Any], output: Path, name: str, step: Callable[[], str]) -> str | None:
    """step()'s detail, or None when it raised; either way recorded in `report`, which is
    written to `output` at once (a probe killed by its timeout keeps what it saw)."""
    start = time.perf_counter()
    try:
        detail, ok = step(), True
    except Exception as exc:  # each stage's failure is a finding to record, not a crash
        detail, ok = f"{type(exc).__name__}: {' '.join(str(exc).split())}", False
    seconds = round(time.perf_counter() - start, 2)
    report["stages"].append({"stage": name, "ok": ok, "seconds": seconds, "detail": detail})
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{name}: {'ok' if ok else 'FAILED'} ({seconds} s): {detail}", flush=True)
    return detail if ok else None


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path, help="artifact manifests (.json)")
    parser.add_argument("--cache", type=Path, required=True, help="engine cache folder")
    parser.add_argument("--output", type=Path, required=True, help="the report (JSON)")
    return parser.parse_args()


def _import() -> str:
    import tensorrt_rtx

    return f"tensorrt_rtx {tensorrt_rtx.__version__}"


def _targets(major: int, minor: int) -> bool:
    """Whether TensorRT-RTX builds for this GPU: its ComputeCapability enum names each GPU
    generation it supports (SM86, SM120, ...)."""
    import tensorrt_rtx

    return f"SM{major}{minor}" in tensorrt_rtx.ComputeCapability.__members__


def _build(artifact: Path, cache: Path, targets: list[str]) -> str:
    """The engine's sidecar path, the first line resfuse-build prints."""
    low, opt, high = PROFILE.split(":")
    exe = Path(sys.executable).with_name("resfuse-build")
    command = [str(exe), str(artifact), "--engine", "tensorrt-rtx", "--builder-level", "0"]
    command += targets
    command += ["--cache-dir", str(cache), "--min", low, "--opt", opt, "--max", high]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=45)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        raise RuntimeError(f"resfuse-build exited with {proc.returncode}: {last}")
    return proc.stdout.splitlines()[0].strip()


def _validity(sidecar: Path) -> str:
    """TensorRT-RTX's own answer for the verified plan bytes: VALID, SUBOPTIMAL or INVALID,
    with the reasons it gives; INVALID raises."""
    import tensorrt_rtx as trt

    from resfuse.export.engines import read_engine
    from resfuse.runtime.backends.tensorrt import invalidity_reasons

    plan = read_engine(sidecar).plan
    validity, diagnostics = trt.Runtime(trt.Logger(trt.Logger.WARNING)).get_engine_validity(plan)
    reasons = invalidity_reasons(trt, diagnostics)
    answer = f"{validity.name}; diagnostics: {', '.join(reasons) or 'none'}"
    if validity == trt.EngineValidity.INVALID:
        raise RuntimeError(f"get_engine_validity: {answer}")
    return answer


def _run(artifact: Path, cache: Path) -> str:
    """One call through resfuse.runtime.load (the engine built above, from the cache), judged
    by its relative L2 against the PyTorch original on the same GPU."""
    from resfuse.compare import Tolerance, compare
    from resfuse.runtime import load

    x = torch.randn(SHAPE, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    options = {"flavour": "tensorrt-rtx", "builder_level": 0, "cache_dir": cache}
    with load(artifact, "tensorrt", "cuda", profiles=[PROFILE], **options) as engine:
        out = engine.run(x).float().cpu().numpy()
    with load(artifact, "torch", "cuda") as original:
        reference = original.run(x).float().cpu().numpy()
    return f"output {list(out.shape)}, rel L2 {compare(reference, out, Tolerance()).rel_l2:.1e}"


def _verdict(report: dict[str, Any]) -> int:
    stages = report["stages"]
    failed = [s for s in stages if not s["ok"]]
    names = ", ".join(s["stage"] for s in failed)
    if report["supported"]:
        if not failed:
            print("TensorRT-RTX: every stage passed on this GPU")
            return 0
        print(f"TensorRT-RTX: {names} failed on a GPU it supports")
        return 1
    refused = [
        s for s in failed if s["stage"].startswith("validity ") and "UNSUPPORTED_CC" in s["detail"]
    ]
    validities = [s for s in stages if s["stage"].startswith("validity ")]
    if validities and refused == failed == validities:
        print(
            f"TensorRT-RTX: plans for {OTHER_GENERATION} refused on compute capability "
            f"{report['compute_capability']} (UNSUPPORTED_CC), which it does not support: expected"
        )
        return EXPECTED_REFUSAL
    other = names or f"no stage (a plan for {OTHER_GENERATION} was said to run here)"
    print(
        f"TensorRT-RTX on compute capability {report['compute_capability']}: {other} failed "
        f"otherwise than expected"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
