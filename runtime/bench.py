"""Latency and accuracy of every backend on every shape in one run, against the PyTorch original.
Where PyTorch is not installed (the base install, an edge box), the deployed backends are timed
alone and their accuracy is not measured: the records hold None there, never a guess.

The stopwatch times each backend in blocks of consecutive calls, never call by call: threads a
backend leaves running after its call (ONNX Runtime's spinning) would slow the next backend's.
Each round runs one block per backend, the order rotated round by round; the first call of a
block re-warms caches after another backend ran and is not counted. Ratios to torch are taken
round by round and summarised by their median and range.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from resfuse import torch_extra
from resfuse.artifacts import read_manifest
from resfuse.compare import ErrorStats, MaskGates, compare_output, mask_agreement
from resfuse.errors import ConfigError, ResfuseError
from resfuse.precisions import accuracy_class
from resfuse.runtime.backend_spec import parse_spec as parse_backend
from resfuse.runtime.backends import BACKENDS, Phases, quiet_options, runs_original, threaded
from resfuse.runtime.inputs import image_files
from resfuse.runtime.machine import machine_info
from resfuse.runtime.report import markdown_table
from resfuse.runtime.session import Session, load
from resfuse.shapes import Shape, format_shape

BENCH_FORMAT = "resfuse-bench"
_TAILS = (90, 95, 99)  # percentiles reported when enough samples lie above them
_ABOVE = 5  # samples that must lie above a reported percentile
# Why a run without torch has no accuracy figures: the result's "accuracy" and the report's line.
NO_REFERENCE = (
    f"no PyTorch here to run the original ({torch_extra.EXTRA}), or check it with resfuse-check "
    f"where torch is installed"
)
# What each option needs the original for, in require_torch's words.
_JUDGING = {
    "--images": "which judges each engine's error on images against the PyTorch original,",
    "--report": "which plots each engine's error against the PyTorch original,",
}


@dataclass
class BenchRecord:
    artifact: str  # the manifest's stem
    backend: str
    device: str
    precision: str  # the backend computes in: the originals float32, OpenVINO bf16 bfloat16
    shape: list[int]
    n: int  # timed calls behind every latency figure: rounds x iters
    rounds: int
    iters: int  # timed calls per block; each block runs one more first, not counted
    warmup: int  # calls per shape before the first round
    p50_ms: float
    p90_ms: float | None  # None where fewer than 5 samples lie above it
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float
    std_ms: float | None  # sample standard deviation (ddof=1); None from a single call
    min_ms: float
    first_call_ms: float  # the first call on this shape; torch-compile compiles in it
    throughput_ips: float  # images (batch items) per second at the mean latency
    h2d_ms: float  # mean host-to-device copy, 0 where the backend has none to report apart
    compute_ms: float
    d2h_ms: float
    round_p50_ms: list[float]  # each round's block median
    # The error fields are None where no reference ran (no torch installed): not measured.
    rel_l2: float | None  # against torch (eager): the timed input's first call, or worst image
    max_abs: float | None
    within_tolerance: bool | None  # by the artifact's manifest tolerance, as resfuse-check judges
    agreement: float | None = None  # a model with a head: share of pixels with torch's argmax
    judged_on: str | None = "random"  # the error's inputs: "random" (the timed one) or "images"
    speedup_vs_torch: float | None = None  # median over rounds of torch p50 / this p50
    speedup_rounds: list[float] | None = None  # those ratios, round by round
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Judgement:
    """A session's error against torch eager, and the inputs that gave it."""

    stats: ErrorStats
    agreement: float | None  # a model with a head: argmax agreement; None for fused outputs
    inputs: str = "random"  # "random" (the timed input) or "images" (the worst of them)


def judge(reference: np.ndarray, output: np.ndarray, session: Session) -> Judgement:
    """`output` of `session` against torch's on the same input, by the artifact's tolerance."""
    config = session.manifest.config
    stats = compare_output(reference, output, session.manifest.tolerance, config.image_channels)
    if session.manifest.config.num_classes is None:
        return Judgement(stats, None)
    return Judgement(stats, mask_agreement(reference, output, MaskGates()).agreement)


def worst(judgements: Sequence[Judgement], inputs: str) -> Judgement:
    """Several inputs' judgements as one: the largest error of any input, the lowest agreement,
    and passed only where every input passed."""
    stats = [j.stats for j in judgements]
    worst_one = max(stats, key=lambda s: (not s.passed, s.rel_l2))
    combined = replace(
        worst_one,
        max_abs=max(s.max_abs for s in stats),
        rel_l2=max(s.rel_l2 for s in stats),
        nonfinite=sum(s.nonfinite for s in stats),
        passed=all(s.passed for s in stats),
    )
    agreements = [j.agreement for j in judgements if j.agreement is not None]
    return Judgement(combined, min(agreements) if agreements else None, inputs)


def judge_on_images(
    sessions: Sequence[Session],
    reference: Session,
    folder: Path,
    progress: Callable[[], None] = lambda: None,
) -> dict[int, Judgement]:
    """By session index, each deployed session's error on every image under `folder` (each at
    its own size, read by its own artifact's preprocess, as resfuse-check reads it) against torch
    eager on the same input: the worst image. The originals are left to the timed input:
    torch-compile would compile a graph for every image size."""
    deployed = [k for k, s in enumerate(sessions) if not runs_original(s.backend)]
    found: dict[int, list[Judgement]] = {k: [] for k in deployed}
    for file in image_files(folder):
        expected: dict[bytes, np.ndarray] = {}  # torch's output, by input
        for k in deployed:
            x = _image_input(sessions[k], file, folder)
            key = hashlib.sha256(repr(x.shape).encode() + x.tobytes()).digest()
            if key not in expected:
                expected[key] = np.asarray(_run(reference, x, file, folder))
            output = np.asarray(_run(sessions[k], x, file, folder))
            found[k].append(judge(expected[key], output, sessions[k]))
            progress()
    return {k: worst(judged, "images") for k, judged in found.items()}


def _image_input(session: Session, file: Path, folder: Path) -> np.ndarray:
    try:
        return session.preprocess(file)
    except ResfuseError as exc:
        raise ConfigError(f"--images {file.relative_to(folder)}: {exc}") from exc


def _run(session: Session, x: np.ndarray, file: Path, folder: Path) -> np.ndarray:
    try:
        return np.asarray(session.run(x))
    except ResfuseError as exc:
        raise ConfigError(f"--images {file.relative_to(folder)}: {exc}") from exc


def tail_percentile(samples: np.ndarray, q: int) -> float | None:
    """The q-th percentile where at least 5 samples lie above it (n * (100 - q) / 100 >= 5),
    else None: the p99 of 8 calls is their maximum under another name."""
    if samples.size * (100 - q) < _ABOVE * 100:  # integers: 50 * (1 - 0.9) is below 5 in floats
        return None
    return float(np.percentile(samples, q))


def block_order(sessions: int, rounds: int) -> list[tuple[int, int]]:
    """(session index, round) of every block, in the order they run: each round times every
    session once, starting one session further on than the round before, so that no backend
    keeps the same place in the rounds (first after the warm-up, or last)."""
    return [((r + k) % sessions, r) for r in range(rounds) for k in range(sessions)]


def run_blocks(
    count: int, rounds: int, iters: int, call: Callable[[int], Sequence[float]]
) -> np.ndarray:
    """The block protocol: `rounds` rounds of one block per engine in block_order, each block
    one call not counted (it re-warms caches after another engine ran), then `iters` timed
    calls. `call(k)` runs engine k once and gives its figures (ms first, then any split);
    returns them as (count, rounds, iters, figures)."""
    found: np.ndarray | None = None
    for k, r in block_order(count, rounds):
        call(k)
        block = np.array([call(k) for _ in range(iters)], dtype=np.float64)
        if found is None:
            found = np.empty((count, rounds, iters, block.shape[1]))
        found[k, r] = block
    assert found is not None, "no blocks: count and rounds must be at least 1"
    return found


def latency_stats(times: np.ndarray, batch: int) -> dict[str, Any]:
    """A record's latency fields from its (rounds, iters) ms: the median of every timed call,
    the tails where enough calls lie above them, the block medians that ratios are taken of."""
    flat = times.ravel()
    mean = float(flat.mean())
    return {
        "n": flat.size,
        "rounds": times.shape[0],
        "iters": times.shape[1],
        "p50_ms": float(np.median(flat)),
        **{f"p{q}_ms": tail_percentile(flat, q) for q in _TAILS},
        "mean_ms": mean,
        "std_ms": float(flat.std(ddof=1)) if flat.size > 1 else None,
        "min_ms": float(flat.min()),
        "throughput_ips": batch * 1e3 / mean,
        "round_p50_ms": [float(np.median(block)) for block in times],
    }


def round_ratios(slow: Sequence[float], fast: Sequence[float]) -> tuple[list[float], float]:
    """Round by round, the slower engine's block median over the faster's, and their median:
    blocks of one round run close together, so a machine slower in one round slows both."""
    rounds = [s / f for s, f in zip(slow, fast, strict=True)]
    return rounds, float(np.median(rounds))


def _record(
    session: Session,
    shape: Shape,
    times: np.ndarray,
    phases: np.ndarray,
    *,
    warmup: int,
    first_call_ms: float,
    error: ErrorStats | None,
    label: str,
    agreement: float | None = None,
    judged_on: str | None = "random",
) -> BenchRecord:
    """times: (rounds, iters) ms; phases: (rounds, iters, 3) ms of copy in, compute, copy out;
    error: None where no reference ran."""
    h2d, compute, d2h = phases.reshape(-1, 3).mean(axis=0)
    return BenchRecord(
        artifact=session.manifest.path.stem,
        backend=label,
        device=session.runner.device,
        precision=session.runner.precision,
        shape=list(shape),
        warmup=warmup,
        **latency_stats(times, shape[0]),
        first_call_ms=first_call_ms,
        h2d_ms=float(h2d),
        compute_ms=float(compute),
        d2h_ms=float(d2h),
        rel_l2=None if error is None else error.rel_l2,
        max_abs=None if error is None else error.max_abs,
        within_tolerance=None if error is None else error.passed,
        agreement=agreement,
        judged_on=judged_on,
        settings=session.runner.describe(),
    )


def _timed_call(session: Session, x: np.ndarray) -> tuple[np.ndarray, float, Phases]:
    """One call of the checked path (input check + backend): output, total ms, its phases."""
    start = time.perf_counter()
    session.check(x)
    out, split = session.runner.infer_timed(x)
    return out, (time.perf_counter() - start) * 1e3, split


def time_shape(
    sessions: list[Session],
    shape: Shape,
    *,
    warmup: int,
    iters: int,
    rounds: int,
    reference: Session | None,
    labels: list[str] | None = None,
    seed: int = 0,
    progress: Callable[[], None] = lambda: None,
    judged: dict[int, Judgement] | None = None,
) -> list[BenchRecord]:
    """Warm every session up (`warmup` >= 1 calls; the first is timed apart and its output
    judged against `reference`, torch eager, on the same input, unless `judged` holds the
    session's error from elsewhere: images; not judged without a reference), then time the
    sessions in rotated blocks (see the module docstring). `labels` name the records (default:
    the backends' names)."""
    judged = judged or {}
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)

    def call(k: int) -> tuple[np.ndarray, float, Phases]:
        progress()
        return _timed_call(sessions[k], x)

    expected = None if reference is None or reference in sessions else reference.runner.infer(x)
    first: dict[int, tuple[float, Judgement | None]] = {}  # first call's ms and error, by session
    # A timed reference warms up first: its first output is then the expected one.
    for k in sorted(range(len(sessions)), key=lambda k: sessions[k] is not reference):
        out, ms, _ = call(k)
        if reference is None:  # nothing to judge against: not measured, never guessed
            first[k] = ms, None
        else:
            expected = out if expected is None else expected
            first[k] = ms, judged.get(k) or judge(expected, out, sessions[k])
        for _ in range(warmup - 1):
            call(k)

    def figures(k: int) -> tuple[float, float, float, float]:
        _, ms, split = call(k)
        return ms, split.h2d_ms, split.compute_ms, split.d2h_ms

    found = run_blocks(len(sessions), rounds, iters, figures)
    records = []
    for k, s in enumerate(sessions):
        ms, judgement = first[k]
        records.append(
            _record(
                s,
                shape,
                found[k, ..., 0],
                found[k, ..., 1:],
                warmup=warmup,
                first_call_ms=ms,
                error=None if judgement is None else judgement.stats,
                label=labels[k] if labels else s.backend,
                agreement=None if judgement is None else judgement.agreement,
                judged_on=None if judgement is None else judgement.inputs,
            )
        )
    return records


def benchmark(
    path: str | Path,
    *,
    backends: Iterable[str] = ("torch", "onnxruntime"),
    shapes: Iterable[Shape] = ((1, 3, 224, 224), (1, 3, 512, 512)),
    warmup: int = 2,
    iters: int = 4,
    rounds: int = 5,
    threads: int | None = None,
    device: str = "cpu",
    progress: Callable[[], None] = lambda: None,
    also: Iterable[str | Path] = (),
    images: str | Path | None = None,
) -> dict[str, Any]:
    """{"format", "artifact", "inputs", "machine", "records", "fastest"}: one record per
    artifact x backend x shape. Where torch is not installed, the deployed backends are timed
    with no reference: "reference" is None, "accuracy" says why, the records' errors are None.

    `warmup` calls per session and shape (at least 1: the first call is reported apart, and
    judged against torch), then `rounds` rounds of one block per session: one call not counted,
    then `iters` timed calls. `also`: other artifacts of the same PyTorch original (an INT8
    export, another opset); their deployed backends join the same rounds, so their ratios to
    torch stay fair. `images`: a folder whose images (recursively, each at its own size) judge
    the deployed engines' error instead of the timed random input; timing stays on `shapes`."""
    if warmup < 1 or iters < 1 or rounds < 1:
        raise ConfigError(
            f"need --warmup, --iters and --rounds of at least 1, got {warmup}, {iters} and {rounds}"
        )
    backends, shapes = list(backends), list(shapes)
    if images is not None:
        require_reference("--images")
    _require_same_original(path, [Path(p) for p in also])
    count = len(image_files(images)) if images is not None else 0  # a bad folder fails first
    for spec in backends:
        runner = BACKENDS.get(parse_backend(spec)[0])  # an unknown name is refused when loaded
        # An original without torch is refused when loaded, naming the extra; its shape limit
        # is torch's to read.
        if runner is not None and (torch_extra.has_torch() or not runner.runs_original):
            runner.require_shapes(len(shapes))
    runs = timed_sessions(path, backends, also)
    quiet = len(runs) > 1
    records: list[BenchRecord] = []
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:

        def open_session(artifact: Path, spec: str) -> Session:
            backend, asked = parse_backend(spec)
            options: dict[str, Any] = (
                {"threads": threads} if threads and backend in threaded() else {}
            )
            if quiet:  # idle threads of one session would take cores from the next timed
                options |= quiet_options(backend)
            # The original runs on the GPU whenever the deployed backend does.
            on = "cuda" if runs_original(backend) and device != "cpu" else device
            return stack.enter_context(load(artifact, backend, on, **options | asked))

        sessions = [open_session(p, b) for p, b in runs]
        torch_eager = [s for s in sessions if s.backend == "torch"]
        reference = torch_eager[0] if torch_eager else None
        if reference is None and torch_extra.has_torch():
            reference = open_session(Path(path), "torch")
        # Still None: no torch here; the deployed backends are timed, their accuracy not measured
        judged = (
            judge_on_images(sessions, reference, Path(images), progress)
            if images is not None and reference is not None  # --images was refused without
            else {}
        )
        for shape in shapes:
            records += time_shape(
                sessions,
                shape,
                warmup=warmup,
                iters=iters,
                rounds=rounds,
                reference=reference,
                labels=[b for _, b in runs],
                progress=progress,
                judged=judged,
            )
    add_speedups(records)
    rows = [asdict(r) for r in records]
    unmeasured = {"reference": None, "accuracy": {"measured": False, "reason": NO_REFERENCE}}
    return {
        "format": BENCH_FORMAT,
        "artifact": str(path),
        # with a reference, the result is as it always was
        **({} if reference is not None else unmeasured),
        "inputs": None if reference is None else error_inputs(images, count),
        # Other work on the machine slows every engine, not alike: the load says how quiet it was.
        "machine": machine_info()
        | {"load_average": {"before": load_before, "after": os.getloadavg()}},
        "records": rows,
        "fastest": fastest_per_class(rows),
    }


def require_reference(option: str) -> None:
    """Refuse `option` (--images, --report) in one line naming the extra where torch is not
    installed: what it gives is each engine's error against the original."""
    torch_extra.require_torch(f"{option}, {_JUDGING[option]}")


def error_inputs(images: str | Path | None, count: int) -> dict[str, Any]:
    """What the error columns were judged on, in the form of a manifest's parity inputs."""
    if images is None:
        return {"kind": "random normal", "at": "each timed shape"}
    return {"kind": "images", "folder": str(Path(images).resolve()), "count": count}


def describe_inputs(inputs: dict[str, Any]) -> str:
    """'images (12 from DIR)' or 'random': the line a report gives the error columns."""
    if inputs.get("kind") != "images":
        return "random"
    return f"images ({inputs['count']} from {inputs['folder']})"


def timed_sessions(
    path: str | Path, backends: Iterable[str], also: Iterable[str | Path] = ()
) -> list[tuple[Path, str]]:
    """(artifact, backend) of every session a run times: each backend on `path`, then the
    deployed backends on each of `also` (the originals are one model, timed once)."""
    backends = list(backends)
    runs = [(Path(path), b) for b in backends]
    deployed = [b for b in backends if not runs_original(parse_backend(b)[0])]
    return runs + [(Path(p), b) for p in also for b in deployed]


def image_calls(runs: Iterable[tuple[Path, str]], images: int) -> int:
    """The calls judge_on_images makes on the sessions of `runs`: each image on each deployed
    engine (the originals are judged on the timed input)."""
    return images * sum(not runs_original(parse_backend(b)[0]) for _, b in runs)


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
    """Round by round, torch's block median over this backend's on the same shape: blocks of
    one round run close together, so a machine slower in one round slows both sides alike."""
    torch_rounds = {format_shape(r.shape): r.round_p50_ms for r in records if r.backend == "torch"}
    for r in records:
        base = torch_rounds.get(format_shape(r.shape))
        if base:
            r.speedup_rounds, r.speedup_vs_torch = round_ratios(base, r.round_p50_ms)


def fastest_per_class(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape and accuracy class, the record with the lowest p50 among those within their
    artifact's tolerance, in order of first appearance: which engine to deploy for the error a
    user can accept. An engine outside its tolerance is never recommended, however fast."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if not r["within_tolerance"]:
            continue
        # within an accuracy class: a faster engine of a coarser class is another trade
        key = format_shape(r["shape"]), accuracy_class(r["precision"])
        if key not in best or r["p50_ms"] < best[key]["p50_ms"]:
            best[key] = r
    return [
        {
            "shape": shape,
            "accuracy_class": cls,
            "artifact": r["artifact"],
            "backend": r["backend"],
            "precision": r["precision"],
            "p50_ms": r["p50_ms"],
            "speedup_vs_torch": r["speedup_vs_torch"],
            "rel_l2": r["rel_l2"],
        }
        for (shape, cls), r in best.items()
    ]


def fastest_markdown(result: dict[str, Any]) -> str:
    rows = [
        [
            f["shape"],
            f["accuracy_class"],
            f["artifact"],
            f["backend"],
            f["precision"],
            _ms(f["p50_ms"]),
            "-" if f["speedup_vs_torch"] is None else f"{f['speedup_vs_torch']:.2f}x",
            f"{f['rel_l2']:.1e}",
        ]
        for f in result["fastest"]
    ]
    headers = ["shape", "accuracy class", "artifact", "backend", "precision", "p50 ms"]
    return markdown_table([*headers, "vs torch", "rel L2"], rows)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _sci(value: float | None) -> str:
    """An error figure, '-' where it was not measured (no reference)."""
    return "-" if value is None else f"{value:.1e}"


def _verdict(within: bool | None) -> str:
    return "-" if within is None else "pass" if within else "FAIL"


def _vs_torch(record: dict[str, Any]) -> str:
    """'1.85x (1.80..1.92)': the median ratio over rounds and its range."""
    rounds = record["speedup_rounds"]
    if not rounds:
        return "-"
    return f"{record['speedup_vs_torch']:.2f}x ({min(rounds):.2f}..{max(rounds):.2f})"


def markdown(result: dict[str, Any]) -> str:
    rows = [
        [
            r["artifact"],
            r["backend"],
            r["device"],
            r["precision"],
            format_shape(r["shape"]),
            r["n"],
            *(_ms(r[f"p{q}_ms"]) for q in (50, *_TAILS)),
            _ms(r["mean_ms"]),
            _ms(r["std_ms"]),
            _ms(r["min_ms"]),
            _ms(r["first_call_ms"]),
            f"{r['throughput_ips']:.1f}",
            _vs_torch(r),
            _sci(r["rel_l2"]),
            _sci(r["max_abs"]),
            "-" if r.get("agreement") is None else f"{r['agreement']:.2%}",
            _verdict(r["within_tolerance"]),
            r.get("judged_on", "random") or "-",  # files before judged_on were judged on random
        ]
        for r in result["records"]
    ]
    headers = [
        "artifact",
        "backend",
        "device",
        "precision",
        "shape",
        "n",
        "p50 ms",
        "p90 ms",
        "p95 ms",
        "p99 ms",
        "mean ms",
        "std ms",
        "min ms",
        "first call ms",
        "images/s",
        "vs torch (rounds)",
        "rel L2",
        "max abs",
        "agreement",
        "tolerance",
        "judged on",
    ]
    return markdown_table(headers, rows)


def report(result: dict[str, Any]) -> str:
    """Every record, then the fastest engine per accuracy class, then how the run was made."""
    r = result["records"][0]
    machine = result["machine"]
    flags = [f for f in machine["cpu_flags"] if f.startswith(("avx", "amx", "fma", "sve", "asimd"))]
    load = machine["load_average"]
    return (
        f"{markdown(result)}\n\nfastest per accuracy class:{_fastest(result)}\n\n"
        f"{_error_note(result)}\n"
        f"Latency figures: {r['rounds']} rounds x {r['iters']} timed calls per backend and shape "
        f"(n), blocks rotated each round{_ratio_note(result)}. CPU: {machine['cpu']}, "
        f"{machine['usable_cpus']} usable CPUs, "
        f"{' '.join(flags) or 'no vector flags reported'}; 1-minute load average "
        f"{load['before'][0]:.2f} before, {load['after'][0]:.2f} after.{_busy(machine)}"
    )


def _ratio_note(result: dict[str, Any]) -> str:
    """How 'vs torch' is taken, where torch was timed (never without PyTorch)."""
    if not any(rec["backend"].split(":")[0] == "torch" for rec in result["records"]):
        return ""
    return "; 'vs torch': median ratio of the rounds' block medians (range)"


def measured(result: dict[str, Any]) -> bool:
    """Whether the run judged accuracy against the original: a run without one says why not in
    its "accuracy"; a run with one (and files from before) has no such field."""
    return "accuracy" not in result


def _fastest(result: dict[str, Any]) -> str:
    """The table of fastest engines; without a reference, why there is none: no engine is known
    to be within its tolerance, so none is recommended."""
    if not measured(result):
        return " none recommended: no engine's accuracy was measured"
    return f"\n\n{fastest_markdown(result)}"


def _error_note(result: dict[str, Any]) -> str:
    """What the error columns (rel L2, max abs, agreement, tolerance) were judged on."""
    if not measured(result):
        return f"accuracy not measured: {result['accuracy']['reason']}."
    inputs = result.get("inputs", {})
    if inputs.get("kind") != "images":
        return (
            "Error against torch eager on the timed random input (first call); 'agreement': "
            "share of pixels with torch's argmax class, models with a head."
        )
    return (
        f"Error against torch eager on {describe_inputs(inputs)}, each at its own size: the "
        f"worst image per engine ('judged on: images'); the originals (torch, torch-compile) on "
        f"the timed random input. 'agreement': share of pixels with torch's argmax class, "
        f"models with a head."
    )


def _busy(machine: dict[str, Any]) -> str:
    """A warning when other work held the CPUs as the run began: it slows engines unequally
    (torch's OpenMP threads wait for descheduled peers far more than ONNX Runtime's)."""
    before, cpus = machine["load_average"]["before"][0], machine["usable_cpus"]
    if before <= cpus / 2:
        return ""
    return (
        f"\nnote: other work was running (load {before:.2f} on {cpus} CPUs): these figures and "
        f"ratios are not those of a quiet machine; rerun when it is idle."
    )


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
    return artifact, record["backend"], record["device"], format_shape(record["shape"])


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
