"""GPU latency: PyTorch eager (float32, and float16 under autocast), torch.compile, ONNX
Runtime's CUDA EP and resfuse's TensorRT engines (float32, float16, int8) at 512x512 and
1024x1024, batch 1 and 8.

    python benchmarks/gpu_latency.py [--methods masked] [--output benchmarks/results]

benchmarks/gpu.sh runs it after the GPU tests. Every engine gets the same CUDA tensor and leaves
its output on the GPU (ONNX Runtime through IO binding), so no row holds a host copy. Each call
sits between two torch.cuda.synchronize(); engines are timed in blocks of consecutive calls, one
block each per round, the order rotated over the rounds (resfuse.runtime.bench.block_order), the
first call of a block not counted. Ratios are taken round by round: median and range.

Targets it reports on:
- TensorRT float16 at least 5x faster (p50) than PyTorch eager float32 at 1024x1024, batch 1;
- resfuse's TensorRT runner (infer_tensor) within 5% of the same engine's bare
  execute_async_v3 + stream synchronize loop, timed in the same rounds; the bare context is
  made as the runner makes its own (TensorRTRunner.context_for) and every TensorRT call's
  answer is checked.

PyTorch runs with its defaults (TF32 convolutions on Ampere and later, cudnn.benchmark off), as
recorded in the results. Accuracy (relative L2) is against PyTorch float32 on the GPU with TF32
off. The int8 engines are calibrated on random inputs: their latency is real, their accuracy is
not that of a model calibrated on images. Each engine is built once (minutes at builder level 3)
and cached under WORK/engines. An engine variant whose export, build or first run at a shape
raises is recorded (method, variant, stage, shape, the error in one line) and the run goes on
without its rows. Without a CUDA device it prints one line and exits 1, having written nothing.
Writes OUTPUT/gpu.json (every record, every failure, the machine) and OUTPUT/gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

HERE = Path(__file__).parent
SHAPES = [(1, 3, 512, 512), (8, 3, 512, 512), (1, 3, 1024, 1024), (8, 3, 1024, 1024)]
VARIANTS = {  # artifact variant -> (name suffix, resfuse-export options)
    "fp32": ("", []),
    "fp16": ("-fp16", ["--precision", "fp16"]),
    "int8": (
        "-int8-trt",
        # random calibration: latency only; its error bound widened as in cpu_latency.py
        ["--precision", "int8", "--target", "tensorrt", "--calib-random", "--max-rel-l2", "0.2"],
    ),
}
ALL = frozenset(VARIANTS)
# One profile over the timed shapes, its kernels tuned for the target's shape.
PROFILE = "1x3x512x512:1x3x1024x1024:8x3x1024x1024"
TARGET_SHAPE = [1, 3, 1024, 1024]
TARGET_SPEEDUP = 5.0
TARGET_OVERHEAD = 0.05
Call = Callable[[], Any]
T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """One engine on one artifact; `bind(x)` prepares it for the CUDA tensor x and returns the
    call to repeat (returning the output, left on the GPU)."""

    artifact: Path
    variant: str
    backend: str
    precision: str
    bind: Callable[[torch.Tensor], Call]


@dataclass
class Outcomes:
    """What did not run, and why: backends not installed here (`skipped`, one line each) and
    steps that raised (`failures`: where, and the error in one line)."""

    skipped: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def attempt(self, step: Callable[[], T], **where: Any) -> T | None:
        """step(), or None once its failure is recorded: one engine variant that fails to
        export, parse, build or run must not end the run and lose every other row."""
        from resfuse.errors import BackendUnavailableError

        try:
            return step()
        except BackendUnavailableError as exc:
            self.skip(exc)
        except Exception as exc:  # anything one variant raises is its own failure, not the run's
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            self.failures.append({**where, "error": error})
            at = " ".join(str(v) for v in where.values() if v is not None)
            print(f"gpu_latency.py: failed ({at}): {error}", file=sys.stderr)
        return None

    def skip(self, reason: Exception) -> None:
        if str(reason) not in self.skipped:
            print(f"gpu_latency.py: skipped: {reason}", file=sys.stderr)
            self.skipped.append(str(reason))


def main() -> int:
    args = _arguments()
    if not torch.cuda.is_available():
        print(
            f"gpu_latency.py: torch {torch.__version__} sees no CUDA device; run it on a machine "
            f"with an NVIDIA GPU (benchmarks/gpu.sh); nothing was measured or written",
            file=sys.stderr,
        )
        return 1
    from resfuse.artifacts import write_json
    from resfuse.runtime.machine import machine_info

    outcomes = Outcomes()
    records: list[dict[str, Any]] = []
    for method in args.methods:
        artifacts = _export(
            method, args.work, args.reuse, outcomes, frozenset(["fp32", *args.variants])
        )
        if "fp32" not in artifacts:
            continue  # torch eager, the reference of every row, runs the float32 artifact
        with _candidates(method, artifacts, args.work / "engines", outcomes) as candidates:
            for shape in SHAPES:
                print(f"timing {method}-resnet18 at {'x'.join(map(str, shape))}", flush=True)
                records += time_shape(
                    method, candidates, shape, args.warmup, args.iters, args.rounds, outcomes
                )
    result = {
        "format": "resfuse-gpu-bench",
        "machine": machine_info() | _gpu_info(),
        "profile": PROFILE,
        "protocol": {"warmup": args.warmup, "iters": args.iters, "rounds": args.rounds},
        "records": records,
        "targets": targets(records),
        "skipped": outcomes.skipped,
        "failures": outcomes.failures,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "gpu.json", result)
    (args.output / "gpu.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["upsample", "spp", "masked"])
    parser.add_argument("--output", type=Path, default=HERE / "results")
    parser.add_argument("--work", type=Path, default=HERE / "artifacts" / "gpu")
    parser.add_argument("--reuse", action="store_true", help="keep artifacts already exported")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="artifact variants to export and time (fp32 is always one: torch's reference)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args()


def _gpu_info() -> dict[str, Any]:
    return {
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch_tf32_conv": torch.backends.cudnn.allow_tf32,
        "torch_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def _export(
    method: str, work: Path, reuse: bool, outcomes: Outcomes, variants: frozenset[str] = ALL
) -> dict[str, Path]:
    """The `variants` (float32, float16, int8-for-TensorRT) of one method, by resfuse-export;
    a variant whose export fails is recorded in `outcomes` and left out."""
    found = {}
    for variant in (v for v in VARIANTS if v in variants):
        where = {"method": method, "variant": variant, "backend": None, "stage": "export"}
        step = partial(export_variant, method, variant, work, reuse)
        path = outcomes.attempt(step, **where, shape=None)
        if path is not None:
            found[variant] = path
    return found


def export_variant(method: str, variant: str, work: Path, reuse: bool) -> Path:
    """One artifact by resfuse-export, its manifest's path; ExportError with the last line
    resfuse-export wrote when it fails."""
    from resfuse.errors import ExportError

    suffix, options = VARIANTS[variant]
    name = f"{method}-resnet18{suffix}"
    if not (reuse and (work / f"{name}.json").exists()):
        print(f"exporting {name}", flush=True)
        exe = Path(sys.executable).with_name("resfuse-export")
        command = [str(exe), "--method", method, "--output", str(work), "--name", name]
        command += ["--max-size", "1024", "--max-batch", "8", *options]
        proc = subprocess.run(command, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise ExportError(f"resfuse-export {name} exited with {proc.returncode}: {last}")
    return work / f"{name}.json"


@contextlib.contextmanager
def _candidates(
    method: str, artifacts: dict[str, Path], cache: Path, outcomes: Outcomes
) -> Iterator[list[Candidate]]:
    """Everything timed on one model; its sessions close when the model is done. A backend
    that is not installed is skipped, an engine variant that fails to build is recorded: both
    in `outcomes`."""
    from resfuse.artifacts import load_original
    from resfuse.runtime import load

    fp32 = artifacts["fp32"]
    with contextlib.ExitStack() as stack:
        eager = stack.enter_context(load(fp32, "torch", "cuda")).runner
        original = load_original(fp32).cuda()
        found = [
            Candidate(fp32, "fp32", "torch", "float32", partial(_repeat, eager)),
            Candidate(
                fp32, "fp32", "torch (autocast fp16)", "float16", partial(_autocast, original)
            ),
            # compiled on its first call at each shape (that call is not timed)
            Candidate(fp32, "fp32", "torch.compile", "float32", partial(_compiled, original)),
        ]
        backend = "onnxruntime (cuda)"
        where = {"method": method, "variant": "fp32", "backend": backend, "stage": "load"}
        ort = outcomes.attempt(partial(load, fp32, "onnxruntime", "cuda"), **where, shape=None)
        if ort is not None:
            stack.enter_context(ort)
            found.append(Candidate(fp32, "fp32", backend, "float32", _io_bound(ort)))
        for variant, artifact in artifacts.items():
            where = {"method": method, "variant": variant, "backend": "tensorrt", "stage": "build"}
            step = partial(engine_candidates, artifact, variant, cache, stack)
            found += outcomes.attempt(step, **where, shape=None) or []
        yield found


def engine_candidates(
    artifact: Path, variant: str, cache: Path, stack: contextlib.ExitStack
) -> list[Candidate]:
    """resfuse's TensorRT runner on the artifact's engine (built, or found in `cache`), and the
    same engine bare; the session closes with `stack`."""
    from resfuse.runtime import load

    session = stack.enter_context(
        load(artifact, "tensorrt", "cuda", cache_dir=cache, profiles=[PROFILE])
    )
    runner, precision = session.runner, session.manifest.precision
    return [
        Candidate(artifact, variant, "tensorrt", precision, partial(_repeat, runner)),
        Candidate(artifact, variant, "tensorrt (bare)", precision, _bare(runner)),
    ]


def _repeat(runner: Any, x: torch.Tensor) -> Call:
    return lambda: runner.infer_tensor(x)


def _compiled(model: torch.nn.Module, x: torch.Tensor) -> Call:
    compiled = torch.compile(model)

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return compiled(x)

    return call


def _autocast(model: torch.nn.Module, x: torch.Tensor) -> Call:
    def call() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            return model(x)

    return call


def _io_bound(session: Any) -> Callable[[torch.Tensor], Call]:
    """ONNX Runtime with its input bound to the tensor's GPU memory and its output on the GPU."""
    ort = session.runner.session
    name, out_name = ort.get_inputs()[0].name, ort.get_outputs()[0].name

    def bind(x: torch.Tensor) -> Call:
        binding = ort.io_binding()
        binding.bind_input(
            name, "cuda", x.device.index or 0, np.float32, tuple(x.shape), x.data_ptr()
        )
        binding.bind_output(out_name, "cuda")

        def call() -> Any:
            ort.run_with_iobinding(binding)
            return binding.get_outputs()[0]

        return call

    return bind


def _bare(
    runner: Any, new_stream: Callable[[], Any] | None = None
) -> Callable[[torch.Tensor], Call]:
    """The runner's engine with nothing of resfuse around it, its context made as the runner
    makes its own (runner.context_for: user-managed memory for the profile, TensorRT-RTX's
    runtime cache), on its own stream: shape and tensor addresses set once, then per call one
    execute_async_v3 and a wait for that stream, so the output is complete when the call
    returns. Every TensorRT call's answer is checked: a refused one raises, not a fast no-op."""

    def bind(x: torch.Tensor) -> Call:
        from resfuse.profiles import profile_for

        stream = (new_stream or torch.cuda.Stream)()
        index = profile_for(runner.record.profiles, tuple(x.shape))
        context, memory = runner.context_for(index, stream)
        name, output = runner.manifest.input_name, runner.manifest.data["output"]["name"]
        _checked(context.set_input_shape(name, tuple(x.shape)), "set_input_shape", name)
        out = torch.empty(tuple(context.get_tensor_shape(output)), device=x.device)
        _checked(context.set_tensor_address(name, x.data_ptr()), "set_tensor_address", name)
        _checked(context.set_tensor_address(output, out.data_ptr()), "set_tensor_address", output)
        stream.synchronize()
        return BareCall(context, stream, out, memory)

    return bind


@dataclass
class BareCall:
    """One bare engine call; it holds the memory its context was given."""

    context: Any
    stream: Any
    out: torch.Tensor
    memory: Any

    def __call__(self) -> torch.Tensor:
        _checked(self.context.execute_async_v3(self.stream.cuda_stream), "execute_async_v3", "")
        self.stream.synchronize()
        return self.out


def _checked(ok: bool, call: str, tensor: str) -> None:
    from resfuse.errors import EngineError

    if not ok:
        on = f" for {tensor!r}" if tensor else ""
        raise EngineError(f"TensorRT refused {call}{on} in the bare baseline (its log says why)")


def _timed(call: Call) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _host(out: Any) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        return out.float().cpu().numpy()
    return np.asarray(out.numpy(), dtype=np.float32)  # an ONNX Runtime OrtValue


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def time_shape(
    method: str,
    candidates: list[Candidate],
    shape: tuple[int, int, int, int],
    warmup: int,
    iters: int,
    rounds: int,
    outcomes: Outcomes,
) -> list[dict[str, Any]]:
    """One record per candidate: first call (judged against float32), warm-up, rotated blocks.
    A candidate whose first call at this shape raises is recorded in `outcomes` and not timed."""
    from resfuse.runtime.bench import run_blocks

    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=generator)
    with _no_tf32():
        reference = _host(candidates[0].bind(x)())  # candidates[0] is torch eager float32
    ready = []
    for c in candidates:
        where = {"method": method, "variant": c.variant, "backend": c.backend, "stage": "run"}
        step = partial(_prepare, c, x, reference, warmup)
        prepared = outcomes.attempt(step, **where, shape=list(shape))
        if prepared is not None:
            ready.append((c, *prepared))
    candidates = [c for c, _, _ in ready]
    calls = [call for _, call, _ in ready]
    first = [f for _, _, f in ready]
    times = run_blocks(len(calls), rounds, iters, lambda k: [_timed(calls[k])])[..., 0]
    records = [
        _record(method, c, shape, times[k], first=first[k], warmup=warmup)
        for k, c in enumerate(candidates)
    ]
    _add_speedups(records)
    return records


def _prepare(
    candidate: Candidate, x: torch.Tensor, reference: np.ndarray, warmup: int
) -> tuple[Call, tuple[float, Any]]:
    """The candidate's call on x, after its first call (ms, error against `reference`) and the
    warm-up calls."""
    from resfuse.compare import Tolerance, compare

    call = candidate.bind(x)
    start = time.perf_counter()
    out = _host(call())
    first = ((time.perf_counter() - start) * 1e3, compare(reference, out, Tolerance()))
    for _ in range(warmup):
        _timed(call)
    return call, first


def _record(
    method: str,
    candidate: Candidate,
    shape: tuple[int, ...],
    times: np.ndarray,
    *,
    first: tuple[float, Any],
    warmup: int,
) -> dict[str, Any]:
    """resfuse-bench's record fields where they apply; times: (rounds, iters) ms."""
    from resfuse.runtime.bench import latency_stats

    first_ms, error = first
    return {
        "method": method,
        "artifact": candidate.artifact.stem,
        "variant": candidate.variant,
        "backend": candidate.backend,
        "device": "cuda",
        "precision": candidate.precision,
        "shape": list(shape),
        "warmup": warmup,
        **latency_stats(times, shape[0]),
        "first_call_ms": first_ms,
        "rel_l2": error.rel_l2,
        "max_abs": error.max_abs,
    }


def _ratio_rounds(slow: dict[str, Any], fast: dict[str, Any]) -> list[float]:
    from resfuse.runtime.bench import round_ratios

    return round_ratios(slow["round_p50_ms"], fast["round_p50_ms"])[0]


def _add_speedups(records: list[dict[str, Any]]) -> None:
    """Round by round, PyTorch eager float32's block median over each engine's."""
    from resfuse.runtime.bench import round_ratios

    torch_fp32 = next(r for r in records if r["backend"] == "torch")
    compiled = next((r for r in records if r["backend"] == "torch.compile"), None)
    for r in records:
        r["speedup_rounds"], r["speedup_vs_torch"] = round_ratios(
            torch_fp32["round_p50_ms"], r["round_p50_ms"]
        )
        r["speedup_vs_compile"] = (
            None
            if compiled is None
            else round_ratios(compiled["round_p50_ms"], r["round_p50_ms"])[1]
        )


def targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The two targets of the module docstring, one row per model (speed-up) and per engine
    and shape (runner overhead); a target whose rows were not measured is absent."""
    rows = []
    for r in records:
        if r["backend"] == "tensorrt" and r["variant"] == "fp16" and r["shape"] == TARGET_SHAPE:
            rounds = r["speedup_rounds"]
            rows.append(
                _target(r, f"TensorRT fp16 >= {TARGET_SPEEDUP:g}x torch eager fp32", rounds)
                | {"met": r["speedup_vs_torch"] >= TARGET_SPEEDUP}
            )
    bare = {
        (r["artifact"], str(r["shape"])): r for r in records if r["backend"] == "tensorrt (bare)"
    }
    for r in records:
        pair = bare.get((r["artifact"], str(r["shape"])))
        if r["backend"] == "tensorrt" and pair is not None:  # a failed bare engine has no row
            rounds = [x - 1 for x in _ratio_rounds(r, pair)]
            overhead = float(np.median(rounds))
            rows.append(
                _target(r, f"runner within {TARGET_OVERHEAD:.0%} of the bare engine", rounds)
                | {"met": overhead <= TARGET_OVERHEAD}
            )
    return rows


def _target(record: dict[str, Any], name: str, rounds: list[float]) -> dict[str, Any]:
    return {
        "target": name,
        "artifact": record["artifact"],
        "shape": record["shape"],
        "value": float(np.median(rounds)),
        "rounds": rounds,
    }


def markdown(result: dict[str, Any]) -> str:
    from resfuse.runtime.report import markdown_table
    from resfuse.shapes import format_shape

    machine = result["machine"]
    versions = machine["versions"]
    lines = [
        f"# GPU latency: {machine['gpu']} (compute capability {machine['compute_capability']})",
        "",
        f"CUDA {machine['cuda']}, cuDNN {machine['cudnn']}, torch {versions.get('torch')}, "
        f"TensorRT {versions.get('tensorrt', 'absent')}, ONNX Runtime GPU "
        f"{versions.get('onnxruntime-gpu', 'absent')}; torch TF32 convolutions "
        f"{machine['torch_tf32_conv']}, cudnn.benchmark {machine['cudnn_benchmark']}. "
        f"TensorRT profile {result['profile']}. Protocol: {result['protocol']} (blocks, order "
        f"rotated per round, each call synchronised). rel L2 against torch float32, TF32 off.",
        "",
        *(f"Skipped: {reason}" for reason in result["skipped"]),
        "",
        *_failures(result["failures"]),
        "## Targets",
        "",
        markdown_table(
            ["target", "artifact", "shape", "median", "rounds", "met"],
            [
                [
                    t["target"],
                    t["artifact"],
                    format_shape(t["shape"]),
                    f"{t['value']:.3f}",
                    " ".join(f"{v:.3f}" for v in t["rounds"]),
                    "yes" if t["met"] else "NO",
                ]
                for t in result["targets"]
            ],
        ),
        "",
        "## Every engine",
        "",
        markdown_table(
            [
                "artifact",
                "backend",
                "precision",
                "shape",
                "p50 ms",
                "p90 ms",
                "min ms",
                "first call ms",
                "images/s",
                "vs torch fp32",
                "vs torch.compile",
                "rel L2",
            ],
            [
                [
                    r["artifact"],
                    r["backend"],
                    r["precision"],
                    format_shape(r["shape"]),
                    f"{r['p50_ms']:.3f}",
                    "-" if r["p90_ms"] is None else f"{r['p90_ms']:.3f}",
                    f"{r['min_ms']:.3f}",
                    f"{r['first_call_ms']:.1f}",
                    f"{r['throughput_ips']:.1f}",
                    f"{r['speedup_vs_torch']:.2f}x ({min(r['speedup_rounds']):.2f}.."
                    f"{max(r['speedup_rounds']):.2f})",
                    "-"
                    if r.get("speedup_vs_compile") is None
                    else f"{r['speedup_vs_compile']:.2f}x",
                    f"{r['rel_l2']:.1e}",
                ]
                for r in result["records"]
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def _failures(failures: list[dict[str, Any]]) -> list[str]:
    """The markdown section of the steps that raised; nothing when none did."""
    from resfuse.runtime.report import markdown_table
    from resfuse.shapes import format_shape

    if not failures:
        return []
    rows = [
        [
            f["method"],
            f["variant"],
            f["backend"] or "-",
            f["stage"],
            "every shape" if f["shape"] is None else format_shape(f["shape"]),
            f["error"].replace("|", "\\|"),  # a pipe would end the table cell
        ]
        for f in failures
    ]
    headers = ["method", "variant", "backend", "stage", "shape", "error"]
    return ["## Failures", "", markdown_table(headers, rows), ""]


if __name__ == "__main__":
    sys.exit(main())
