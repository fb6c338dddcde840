"""`resfuse-check` and `resfuse-bench`: thin command lines over resfuse.runtime."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from resfuse import torch_extra
from resfuse.artifacts import read_manifest, replace_file, write_json
from resfuse.console import err, fail, out
from resfuse.errors import ResfuseError
from resfuse.images import grayscale_note
from resfuse.runtime import bench as bench_lib
from resfuse.runtime.backend_spec import split_specs, with_threads
from resfuse.runtime.backends import BACKENDS
from resfuse.runtime.check import MaskGates, check_artifact, judged_inputs
from resfuse.runtime.inputs import image_files
from resfuse.runtime.options import (
    CONTEXT,
    NON_NEGATIVE,
    backend_option,
    check_writable,
    device_option,
    images_option,
    json_option,
    mask_gate_options,
    shapes_option,
    threads_option,
    tile_options,
    tiling_options,
)
from resfuse.runtime.report import bench_html, markdown_table
from resfuse.shapes import Shape


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


def _warn(note: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        write_json(path, data)
    except OSError as exc:
        fail(f"cannot write {path}: {exc}")


@click.command(context_settings=CONTEXT)
@click.argument("artifact", type=click.Path(path_type=Path))
@backend_option(lambda: [b for b in BACKENDS if b != "torch"])  # torch is the reference
@device_option()
@threads_option
@images_option("A folder of images (searched recursively), each checked at its own size.")
@shapes_option(None, "Random inputs, e.g. 1x3x224x224,2x3x257x311 [default: the export's grid].")
@click.option(
    "--resize",
    type=click.Choice(["none", "fit"]),
    default=None,
    help="Image resize policy [default: the manifest's].",
)
@click.option("--atol", type=NON_NEGATIVE, default=None, help="[default: the export's]")
@click.option("--rtol", type=NON_NEGATIVE, default=None, help="[default: the export's]")
@click.option(
    "--max-rel-l2",
    type=NON_NEGATIVE,
    default=None,
    help="Judge by relative L2 error instead of elementwise [default: the export's; set for "
    "INT8 artifacts].",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@json_option("Also write the report as JSON.")
@mask_gate_options("per input [default: the gates the export passed, if any]")
@tile_options
def check_main(
    artifact: Path,
    backend: str,
    device: str,
    threads: int | None,
    images: Path | None,
    shapes: list[Shape] | None,
    resize: str | None,
    atol: float | None,
    rtol: float | None,
    max_rel_l2: float | None,
    seed: int,
    json_path: Path | None,
    min_agreement: float | None,
    min_dice: float | None,
    tile: object,
    overlap: float,
    blend: str,
) -> None:
    """Check a deployed ARTIFACT (manifest or .onnx) against its PyTorch original.

    Exits non-zero when any input is outside the tolerance: |out - ref| <= atol + rtol * |ref|
    everywhere, or for INT8 artifacts a relative L2 error of at most --max-rel-l2. The defaults
    are the tolerance the artifact passed at export, as recorded in its manifest, and the inputs
    its parity sweep ran on (random ones, or an INT8 artifact's calibration images). A model
    with a head also reports argmax agreement and per-class Dice against the original, gated by
    --min-agreement and --min-dice. With --tile, an input the backend cannot take whole (a
    large image, --shapes beyond the range) runs in tiles on both.
    """
    try:
        backend = with_threads(backend, threads)
        check_writable(json_path, "--json")
        manifest = read_manifest(artifact)
        overrides = {"atol": atol, "rtol": rtol, "max_rel_l2": max_rel_l2}
        tolerance = replace(
            manifest.tolerance, **{k: v for k, v in overrides.items() if v is not None}
        )
        grid, images = judged_inputs(manifest, shapes, images)
        files = image_files(images) if images else []
        note = grayscale_note(files, manifest.contract.channels)
        if note is not None:
            err.print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
        total = len(grid) + len(files)
        with _progress() as bar:
            task = bar.add_task(f"checking {backend} ({device})", total=total)
            report = check_artifact(
                artifact,
                backend,
                device,
                grid,
                images,
                tolerance,
                seed,
                resize,
                progress=lambda: bar.advance(task),
                # none given: the gates the export passed (check_artifact reads them)
                gates=None
                if min_agreement is min_dice is None
                else MaskGates(min_agreement, min_dice),
                on_clip=_warn,
                tiling=tiling_options(tile, overlap, blend),
            )
    except ResfuseError as exc:
        fail(str(exc))
    label = manifest.precision_label  # a mixed variant says what stayed float
    out.print(
        f"{artifact} ({label}): {backend} ({device}) against torch (cpu, float32), "
        f"{tolerance.describe()}\n",
        highlight=False,
    )
    out.print(report.markdown(), highlight=False, markup=False, soft_wrap=True)
    if json_path:
        _write_json(json_path, report.to_dict())
    failed = sum(not r.passed for r in report.records)
    if failed:
        fail(f"{failed} of {len(report.records)} inputs failed the check")
    out.print(f"\nall {len(report.records)} inputs pass", highlight=False)


# resfuse-bench's default --backends: torch is the reference; without it, the deployed backend.
_WITH_TORCH, _WITHOUT_TORCH = "torch,onnxruntime", "onnxruntime"
_BASELINE_HEADERS = [
    "artifact",
    "backend",
    "device",
    "shape",
    "old p50",
    "new p50",
    "change",
    "verdict",
]


@click.command(context_settings=CONTEXT)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--backends",
    default=None,
    help=f"Comma-separated, from: {', '.join(BACKENDS)}; options as NAME:KEY=VALUE[,KEY=VALUE] "
    f"(openvino:precision=bf16), so one engine can run twice. torch-compile compiles on each "
    f"shape's first call (tens of seconds on a CPU), reported as its first call. [default: "
    f"{_WITH_TORCH}; {_WITHOUT_TORCH} where PyTorch is not installed]",
)
@device_option("cuda or tensorrt apply to onnxruntime; torch and torch-compile then run on cuda.")
@shapes_option("1x3x224x224,1x3x512x512,1x3x1024x1024")
@click.option(
    "--also",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Another artifact of the same model (e.g. its INT8 export) timed in the same run; "
    "repeatable.",
)
@images_option(
    "A folder of images (searched recursively, each at its own size) that judge each deployed "
    "engine's error instead of random inputs: the worst image is reported. Timing stays on "
    "--shapes."
)
@click.option(
    "--warmup",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Calls per backend and shape before the rounds; the first is reported apart.",
)
@click.option(
    "--iters",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Timed calls per block, after one call per block that is not counted.",
)
@click.option(
    "--rounds",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rounds of one block per backend, the order rotated each round.",
)
@threads_option
@json_option()
@click.option("--markdown", "md_path", type=click.Path(path_type=Path), default=None)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="PNG of latency against resolution.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path),
    default=None,
    help="A self-contained HTML page: latency against size, error against latency with the "
    "Pareto front, every record (the numbers of --json).",
)
@click.option(
    "--baseline",
    type=click.Path(path_type=Path),
    default=None,
    help="An earlier --json result to compare p50 latencies with.",
)
@click.option(
    "--max-regression",
    default=0.10,
    show_default=True,
    type=NON_NEGATIVE,
    help="Allowed p50 increase over the baseline (0.10 = 10%).",
)
def bench_main(
    artifact: Path,
    backends: str | None,
    device: str,
    shapes: list[Shape],
    also: tuple[Path, ...],
    images: Path | None,
    warmup: int,
    iters: int,
    rounds: int,
    threads: int | None,
    json_path: Path | None,
    md_path: Path | None,
    plot_path: Path | None,
    report_path: Path | None,
    baseline: Path | None,
    max_regression: float,
) -> None:
    """Time ARTIFACT on each backend and shape, and its error against PyTorch on the timed input.

    Backends are timed in blocks of --iters consecutive calls, one block each per round, the
    order rotated over --rounds rounds; the ratio to PyTorch is taken round by round (median and
    range). With --also, other exports of the same model (its INT8 artifact, say) join the same
    rounds, so every ratio comes from one run. The error against PyTorch is judged on the
    timed random input, or with --images on real images. Where PyTorch is not installed (an
    edge box), the deployed backends are timed alone and their accuracy is not measured."""
    try:
        asked, note = (backends, None) if backends is not None else _default_backends()
        names = split_specs(asked)
        outputs = ((json_path, "--json"), (md_path, "--markdown"), (plot_path, "--plot"))
        for path, option in (*outputs, (report_path, "--report")):
            check_writable(path, option)
        unknown = [b for b in names if bench_lib.parse_backend(b)[0] not in BACKENDS]
        if unknown or not names:
            raise ResfuseError(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
        for option, given in (("--images", images), ("--report", report_path)):
            if given is not None:
                bench_lib.require_reference(option)
        old = bench_lib.read_result(baseline) if baseline else None
        count = _bench_images(artifact, images)
        if note is not None:
            err.print(f"note: {note}", highlight=False, soft_wrap=True)
        with _progress() as bar:
            runs = bench_lib.timed_sessions(artifact, names, also)
            calls = warmup + rounds * (iters + 1)  # each block runs one call not counted
            judging = bench_lib.image_calls(runs, count)
            task = bar.add_task("timing", total=len(runs) * len(shapes) * calls + judging)
            result = bench_lib.benchmark(
                artifact,
                backends=names,
                shapes=shapes,
                warmup=warmup,
                iters=iters,
                rounds=rounds,
                threads=threads,
                device=device,
                progress=lambda: bar.advance(task),
                also=also,
                images=images,
            )
        table = bench_lib.report(result)
        out.print(table, highlight=False, markup=False, soft_wrap=True)
        if json_path:
            _write_json(json_path, result)
        if md_path:
            md_path.write_text(table + "\n")
        if plot_path:
            bench_lib.plot(result, plot_path)
        if report_path:
            replace_file(report_path, bench_html(result).encode())
        if old is not None:
            rows, ok = bench_lib.compare_baseline(result, old, max_regression)
            out.print(f"\nagainst {baseline}:\n", highlight=False)
            out.print(
                markdown_table(_BASELINE_HEADERS, rows),
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            if not ok:
                fail(f"p50 latency regressed by more than {max_regression:.0%}")
    except (ResfuseError, OSError) as exc:
        fail(str(exc))


def _default_backends() -> tuple[str, str | None]:
    """resfuse-bench's backends without --backends: torch (the reference) and onnxruntime, or
    where torch is not installed onnxruntime alone, with a note saying so (timing a deployed
    backend needs no original), printed once the options have passed their checks."""
    if torch_extra.has_torch():
        return _WITH_TORCH, None
    return _WITHOUT_TORCH, (
        f"torch left out of the default --backends (PyTorch is not installed here): timing "
        f"{_WITHOUT_TORCH} alone"
    )


def _bench_images(artifact: Path, images: Path | None) -> int:
    """How many images --images holds (0 without it), refusing a folder with none before any
    work, and saying once when grayscale files go into a 3-channel model."""
    if images is None:
        return 0
    files = image_files(images)
    note = grayscale_note(files, read_manifest(artifact).contract.channels)
    if note is not None:
        _warn(note)
    return len(files)


if __name__ == "__main__":
    sys.exit(check_main())
