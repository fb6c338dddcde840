"""`resfuse-serve` and `resfuse-predict`: thin command lines over resfuse.runtime.serve and
resfuse.runtime.predict (Ray is imported only when a command needs it)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click
from rich.markup import escape

from resfuse.console import err, fail, out
from resfuse.errors import ResfuseError
from resfuse.runtime.backends import BACKENDS
from resfuse.runtime.cli import _progress
from resfuse.runtime.options import (
    CONTEXT,
    backend_option,
    device_option,
    dicomweb_options,
    resolve_backend,
    seg_options,
    threads_option,
    tile_options,
    tiling_options,
)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _deployed() -> list[str]:
    """The backends that run the artifact: the PyTorch original is not what is deployed."""
    return [name for name, runner in BACKENDS.items() if not runner.runs_original]


@click.command(context_settings=CONTEXT)
@click.argument("artifact", type=click.Path(path_type=Path))
@backend_option(_deployed)
@device_option()
@threads_option
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--max-replicas",
    default=None,
    type=click.IntRange(min=1),
    help="Autoscale between --replicas and this many replicas, on ongoing requests.",
)
@click.option(
    "--max-batch",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images one batch gathers (each H x W then runs as its own call).",
)
@click.option(
    "--batch-wait-ms",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0, max=10_000),
    help="How long a batch waits for more requests.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; loopback only unless you name another (0.0.0.0: every one).",
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--address",
    default=None,
    help="An existing Ray cluster (auto, HOST:6379 or ray://HOST:10001) [default: start Ray "
    "here]. The artifact must be at the same path on its nodes.",
)
@click.option(
    "--max-body-mb",
    default=64.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True, max=4096),
    help="Largest request body; larger ones get 413.",
)
@tile_options
def serve_main(
    artifact: Path,
    backend: str,
    device: str,
    threads: int | None,
    replicas: int,
    max_replicas: int | None,
    max_batch: int,
    batch_wait_ms: float,
    host: str,
    port: int,
    address: str | None,
    max_body_mb: float,
    tile: str | tuple[int, int] | None,
    overlap: float,
    blend: str,
) -> None:
    """Serve ARTIFACT over HTTP on Ray Serve until SIGINT or SIGTERM.

    POST /predict (PNG/JPEG/TIFF, DICOM, NIfTI, or .npy as application/octet-stream;
    ?format=png for a class mask, ?tile=auto for images larger than the artifact's range),
    GET /healthz, GET /metadata."""
    from resfuse.runtime.serve import ServeOptions, connect, deploy, stop

    try:
        backend = resolve_backend(artifact, backend, device, threads)
    except ResfuseError as exc:
        fail(str(exc))
    options = ServeOptions(
        artifact=artifact,
        backend=backend,
        device=device,
        replicas=replicas,
        max_replicas=max_replicas,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        host=host,
        port=port,
        address=address,
        max_body_mb=max_body_mb,
        tile=tile,
        overlap=overlap,
        blend=blend,
    )
    try:
        started = connect(options)
    except ResfuseError as exc:
        fail(str(exc))
    # after ray.init, which installs a SIGTERM handler that aborts the process
    stopping = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stopping.set()) for s in _STOP_SIGNALS}
    try:
        deploy(options)
        out.print(f"serving {artifact} at {options.url} (SIGINT or SIGTERM stops)", highlight=False)
        stopping.wait()
    finally:
        err.print("stopping: shutting Serve down", highlight=False)
        stop(started, local=address is None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@click.command(context_settings=CONTEXT)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("input_dir", required=False, type=click.Path(path_type=Path))
@click.option("--output", "output_dir", default=None, type=click.Path(path_type=Path))
@backend_option(_deployed)
@device_option()
@threads_option
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--ray", "use_ray", is_flag=True, help="Run as a Ray Data pipeline.")
@click.option("--address", default=None, help="An existing Ray cluster (with --ray).")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Ray actors, one Session each (with --ray).",
)
@click.option(
    "--series",
    is_flag=True,
    help="Read each folder holding DICOM files as one series (a volume), not as 2-D images.",
)
@click.option(
    "--axis",
    default=None,
    type=click.IntRange(0, 2),
    help="Volumes: the voxel axis to slice along [default: the acquisition's: a series' "
    "slices, a NIfTI's slice_dim, else its third axis].",
)
@click.option(
    "--volume-index",
    default=None,
    type=click.IntRange(min=0),
    help="4-D NIfTI files: the volume (0-based) to run; 3-D files are read whole.",
)
@tile_options
@seg_options
@dicomweb_options
def predict_main(
    artifact: Path,
    input_dir: Path | None,
    output_dir: Path | None,
    backend: str,
    device: str,
    threads: int | None,
    batch_size: int,
    use_ray: bool,
    address: str | None,
    workers: int,
    series: bool,
    axis: int | None,
    volume_index: int | None,
    tile: object,
    overlap: float,
    blend: str,
    output_format: str,
    seg_type: str,
    dicomweb_url: str | None,
    study: str | None,
    series_uids: tuple[str, ...],
    timeout: float,
    retries: int,
) -> None:
    """Run ARTIFACT on every image and volume under INPUT_DIR; write OUTPUT/<relative
    path>.npy (a model with a head: .mask.png), for NIfTI volumes (and with --series DICOM
    series folders) OUTPUT/<relative path>.nii.gz (.mask.nii.gz); with --format seg a DICOM
    SEG, OUTPUT/<relative path>.seg.dcm, per DICOM file and series. Outputs that exist are
    complete and skipped, so a rerun resumes. Exits 1 when any input failed (each is listed);
    the others are written.

    With --dicomweb URL --study UID (no INPUT_DIR): each image series of the study is fetched
    from the PACS, run, and its SEG stored back in the study; series that hold a SEG of this
    artifact already are skipped."""
    if dicomweb_url is not None or study is not None:
        _predict_dicomweb(
            artifact,
            input_dir,
            output_dir,
            backend,
            device,
            threads,
            batch_size,
            output_format,
            seg_type,
            dicomweb_url,
            study,
            series_uids,
            timeout,
            retries,
        )
        return
    if input_dir is None or output_dir is None:
        raise click.UsageError(
            "give INPUT_DIR and --output OUT_DIR, or --dicomweb URL --study UID to read from a PACS"
        )
    if series_uids:
        raise click.UsageError("--series-uid picks series of a --dicomweb study; add --dicomweb")
    if output_format != "seg" and _given("seg_type"):
        raise click.UsageError("--seg-type shapes a DICOM SEG; add --format seg, or drop it")
    from resfuse.runtime.predict import predict

    try:
        backend = resolve_backend(artifact, backend, device, threads)
        with _progress() as bar:
            task = bar.add_task("predicting", total=None)
            summary = predict(
                artifact,
                input_dir,
                output_dir,
                backend=backend,
                device=device,
                batch_size=batch_size,
                use_ray=use_ray,
                address=address,
                workers=workers,
                on_plan=lambda n: bar.update(task, total=n),
                progress=lambda k: bar.advance(task, k),
                series=series,
                axis=axis,
                volume_index=volume_index,
                tiling=tiling_options(tile, overlap, blend),
                seg_type=seg_type if output_format == "seg" else None,
            )
    except ResfuseError as exc:
        fail(str(exc))
    for source, reason in summary.failures:
        err.print(
            f"[red]failed:[/] {escape(f'{source}: {reason}')}", highlight=False, soft_wrap=True
        )
    out.print(summary.describe(), highlight=False)
    if summary.failures:
        fail(f"{len(summary.failures)} of {summary.total} images failed; see above")


def _predict_dicomweb(
    artifact: Path,
    input_dir: Path | None,
    output_dir: Path | None,
    backend: str,
    device: str,
    threads: int | None,
    batch_size: int,
    output_format: str,
    seg_type: str,
    url: str | None,
    study: str | None,
    series_uids: tuple[str, ...],
    timeout: float,
    retries: int,
) -> None:
    """resfuse-predict against a PACS: every SEG goes back to it, so no folders are taken."""
    if url is None or study is None:
        raise click.UsageError("--dicomweb URL and --study UID go together; give both")
    if input_dir is not None or output_dir is not None:
        raise click.UsageError(
            "--dicomweb reads from and stores to the PACS; drop INPUT_DIR and --output"
        )
    if output_format == "auto":  # a PACS stores SEG, never .npy or NIfTI: seg is implied
        output_format = "seg"
    from resfuse.runtime.dicomweb import Connection, check_url, predict_dicomweb

    try:
        check_url(url)  # first: a URL with credentials in it is never echoed further
        backend = resolve_backend(artifact, backend, device, threads)
        with _progress() as bar:
            task = bar.add_task("series", total=None)
            outcome = predict_dicomweb(
                artifact,
                Connection(url, timeout, retries),
                study,
                list(series_uids) or None,
                seg_type=seg_type,
                backend=backend,
                device=device,
                batch_size=batch_size,
                on_plan=lambda n: bar.update(task, total=n),
                progress=lambda k: bar.advance(task, k),
            )
    except ResfuseError as exc:
        fail(str(exc))
    for series, reason in outcome.failures:
        err.print(
            f"[red]failed:[/] {escape(f'series {series}: {reason}')}",
            highlight=False,
            soft_wrap=True,
        )
    out.print(outcome.describe(), highlight=False)
    if outcome.failures:
        fail(f"{len(outcome.failures)} series failed; see above")


def _given(name: str) -> bool:
    """Whether the option `name` was typed on the command line (not its default)."""
    ctx = click.get_current_context(silent=True)
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return source is click.core.ParameterSource.COMMANDLINE
