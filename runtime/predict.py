"""Batch inference over a folder of images and volumes: one output file per input, resumable.

Each image under INPUT_DIR (recursively) gives OUT_DIR/<its relative path>.npy, or, for a model
with a segmentation head, OUT_DIR/<its relative path>.mask.png (the argmax class per pixel). The
image's own suffix stays in the output name, so `a.png` and `a.jpg` never write the same file.
Each NIfTI volume (and with `series=True` each folder of DICOM files, as one series) gives
OUT_DIR/<its relative path>.nii.gz, or .mask.nii.gz, run slice by slice (resfuse.runtime.volumes)
and written on the input's grid with its affine.

Every output is written to a hidden temporary name and renamed (resfuse.artifacts.replace_file),
so an output that exists is complete, and a killed run leaves no half file. Beside each output a
hidden record, .<output name>.json, names what made it: the artifact (its ONNX sha256 and
preprocessing) and the input (its size and sha256). A rerun skips an output only when its record
matches the artifact and the input as they are now; any other output is stale and redone.
Images of the same H x W run as one batch. An image that cannot be read, or breaks the input
contract, is reported and skipped; the run goes on.

Locally everything runs in this process; `ray=True` runs the same work as a Ray Data pipeline
(`map_batches` with one Session per actor), on this machine or an existing cluster.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from resfuse.artifacts import Manifest, read_manifest, replace_file
from resfuse.console import err
from resfuse.errors import ConfigError, InputContractError, ResfuseError
from resfuse.images import _is_dicom, find_images, grayscale_note, output_plane, pil
from resfuse.runtime import seg
from resfuse.runtime.seg import SEG_SUFFIX
from resfuse.runtime.session import Session, load
from resfuse.runtime.tiling import Tiling
from resfuse.runtime.volumes import (
    find_volumes,
    is_nifti,
    nibabel,
    predict_volume,
    read_volume,
    series_files,
    slice_axis,
    slice_size,
)
from resfuse.runtime.volumes import nifti_bytes as volume_bytes

MASK_SUFFIX = ".mask.png"
VOLUME_SUFFIXES = (".mask.nii.gz", ".nii.gz")  # (a model with a head, without)


@dataclass(frozen=True)
class Options:
    """How inputs run, besides the artifact and the batch size."""

    axis: int | None = None  # volumes: the slice axis; None: the acquisition's (slice_axis)
    volume_index: int | None = None  # 4-D NIfTI: the volume to read
    tiling: dict[str, Any] = field(default_factory=dict)  # session.run's tiling keywords
    seg: str | None = None  # DICOM SEG output of this type (resfuse.runtime.seg); None: the others

    def volume_record(self, source: Path) -> dict[str, Any]:
        """What a volume's record must match to be resumed, besides artifact and input: the
        index only for a 4-D file (a 3-D one is read whole whatever it says)."""
        return {"axis": self.axis, "volume_index": self.index_of(source)}

    def index_of(self, source: Path) -> int | None:
        return self.volume_index if _is_4d(source) else None


@dataclass(frozen=True)
class Job:
    """One image or volume and the file its output goes to."""

    source: Path
    output: Path
    stale: bool = False  # its output exists, but another artifact or input made it

    @property
    def is_volume(self) -> bool:
        """A NIfTI file or a series folder: known from the path alone, so Ray actors, which
        get only paths, tell them apart too."""
        return self.source.is_dir() or is_nifti(self.source)


@dataclass
class Summary:
    total: int = 0
    done: int = 0
    stale: int = 0  # of `done`: outputs that existed but were made by another artifact or input
    skipped: int = 0  # outputs already complete, from this artifact and input, by an earlier run
    failures: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        redone = f" ({self.stale} stale redone)" if self.stale else ""
        return (
            f"{self.done} written{redone}, {self.skipped} already done, "
            f"{len(self.failures)} failed, "
            f"of {self.total} images in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s)"
        )


# Outputs: shared with resfuse.runtime.serve, so a file and an HTTP answer are the same bytes.


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def mask_png(logits: np.ndarray) -> bytes:
    """The argmax class of each pixel of one (1, classes, H, W) output, as a grayscale PNG
    (8-bit up to 256 classes, 16-bit above)."""
    classes = logits.shape[1]
    mask = logits[0].argmax(axis=0).astype(np.uint8 if classes <= 256 else np.uint16)
    buffer = io.BytesIO()
    pil().fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


def has_head(session: Session) -> bool:
    return session.manifest.config.num_classes is not None


# Provenance: what made an output, so a rerun knows whether it is still the answer


def record_path(output: Path) -> Path:
    """The record beside an output; hidden, so globs of outputs (*.npy, *.png) never see it."""
    return output.with_name(f".{output.name}.json")


def artifact_identity(manifest: Manifest) -> dict[str, Any]:
    """What an output depends on besides its image: the graph, by the sha256 the manifest
    records for it, and the preprocessing that turns an image into the graph's input."""
    return {
        "onnx_sha256": manifest.record("onnx")["sha256"],
        "preprocess": manifest.data.get("preprocess"),
    }


def input_identity(source: Path) -> dict[str, Any]:
    """The size and sha256 of the bytes of `source`: a replaced image is caught whatever its
    timestamps say (copies, archives and checkouts set them at will). A series folder: the
    total size, and the sha256 of its DICOM files' names and sha256s."""
    if not source.is_dir():
        return _file_identity(source)
    files = series_files(source)
    lines = [f"{p.name}\0{_file_identity(p)['sha256']}\n" for p in files]
    digest = hashlib.sha256("".join(lines).encode()).hexdigest()
    return {"bytes": _input_size(source), "sha256": digest}


def _file_identity(source: Path) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _input_size(source: Path) -> int:
    if source.is_dir():
        return sum(p.stat().st_size for p in series_files(source))
    return source.stat().st_size


def is_current(source: Path, output: Path, artifact: dict[str, Any]) -> bool:
    """Whether `output` exists and its record names `artifact` and the bytes `source` has now;
    a missing or unreadable record (an output of an older resfuse) counts as stale."""
    try:
        record = json.loads(record_path(output).read_bytes())
        if not output.is_file() or record["artifact"] != artifact:
            return False
        if record["input"]["bytes"] != _input_size(source):  # no need to hash
            return False
        return bool(record["input"] == input_identity(source))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def job_artifact(job: Job, manifest: Manifest, options: Options) -> dict[str, Any]:
    """What `job`'s output depends on besides its input: for a volume, the slice axis and the
    volume index too (images' records keep the form older runs wrote)."""
    artifact = artifact_identity(manifest)
    if options.tiling:  # how large inputs were cut: JSON's form, so a read record compares
        artifact["tiling"] = json.loads(json.dumps(options.tiling))
    if options.seg is not None:  # a BINARY SEG is no answer to a FRACTIONAL request
        artifact["seg"] = options.seg
    return {**artifact, "volume": options.volume_record(job.source)} if job.is_volume else artifact


# Planning


def plan(
    input_dir: Path,
    output_dir: Path,
    manifest: Manifest,
    options: Options | None = None,
    *,
    series: bool = False,
) -> tuple[list[Job], int]:
    """The jobs whose output is missing or stale, and how many inputs there are in all. With
    `series`, each folder of DICOM files is one volume and its files are no images."""
    options = options or Options()
    if output_dir.resolve().is_relative_to(input_dir.resolve()):
        raise ConfigError(
            f"--output {output_dir} is inside INPUT_DIR {input_dir}, so outputs would be read "
            f"as inputs on the next run; choose an output folder outside it"
        )
    head = manifest.config.num_classes is not None
    images = find_images(input_dir, "INPUT_DIR")
    volumes = find_volumes(input_dir, series)
    folders = {v for v in volumes if v.is_dir()}
    images = [p for p in images if not (p.parent in folders and _is_dicom(p))]
    jobs = []
    for source in [*images, *volumes]:
        index = options.index_of(source)
        job = Job(source, _output_path(source, input_dir, output_dir, head, index, options.seg))
        if not is_current(source, job.output, job_artifact(job, manifest, options)):
            jobs.append(Job(job.source, job.output, stale=job.output.is_file()))
    return jobs, len(images) + len(volumes)


def _output_path(
    source: Path,
    input_dir: Path,
    output_dir: Path,
    head: bool,
    index: int | None = None,
    seg: str | None = None,
) -> Path:
    """OUTPUT/<relative path><suffix>; one volume of a 4-D file: <relative path>.vol<index>
    <suffix>, so each volume picked keeps its own output."""
    if seg is not None:
        suffix = SEG_SUFFIX
    elif is_nifti(source) or source.is_dir():
        suffix = VOLUME_SUFFIXES[0] if head else VOLUME_SUFFIXES[1]
    else:
        suffix = MASK_SUFFIX if head else ".npy"
    if index is not None:
        suffix = f".vol{index}{suffix}"
    relative = source.relative_to(input_dir)
    if relative == Path():  # INPUT_DIR itself is the series: named after it
        relative = Path(input_dir.resolve().name)
    return output_dir / f"{relative}{suffix}"


def _is_4d(source: Path) -> bool:
    """A NIfTI file of several volumes, from its header (an unreadable one fails when run)."""
    if not is_nifti(source):
        return False
    try:
        shape = nibabel().load(source).shape
    except Exception:  # noqa: BLE001 - nibabel, gzip and zlib each raise their own
        return False
    return len(shape) > 3 and any(n > 1 for n in shape[3:])


def check_writable(output_dir: Path) -> None:
    """Fail once, before any work, where outputs cannot be written (a read-only folder, a file
    in its way): otherwise every image would fail alone with the same reason. Probes the folder,
    or the nearest existing one above it (the rest is created on the first write)."""
    probe = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".resfuse-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--output {output_dir} cannot be written ({exc.strerror or exc} at {probe}); "
            f"choose a writable output folder"
        ) from exc


def check_batch_size(batch_size: int, manifest: Manifest) -> None:
    allowed = manifest.contract.batch
    if batch_size not in allowed:
        raise ConfigError(
            f"--batch-size {batch_size} is outside the artifact's batch range "
            f"{allowed.describe()}; choose a batch size in that range"
        )


# The work, shared by the local loop and the Ray actors


def run_groups(session: Session, arrays: list[np.ndarray], limit: int) -> list[np.ndarray]:
    """Run (n, C, H, W) inputs of any sizes: same H x W together, at most `limit` images per
    call; the outputs come back one per input, in order."""
    outputs: list[np.ndarray | None] = [None] * len(arrays)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(arrays):
        groups.setdefault(tuple(x.shape[1:]), []).append(i)
    for members in groups.values():
        for chunk in _chunks(members, arrays, limit):
            batch = np.concatenate([arrays[i] for i in chunk])
            result = np.asarray(session.run(batch))
            start = 0
            for i in chunk:
                n = arrays[i].shape[0]
                outputs[i] = result[start : start + n]
                start += n
    return [o for o in outputs if o is not None]


def _chunks(members: list[int], arrays: list[np.ndarray], limit: int) -> Iterator[list[int]]:
    chunk: list[int] = []
    count = 0
    for i in members:
        n = arrays[i].shape[0]
        if chunk and count + n > limit:
            yield chunk
            chunk, count = [], 0
        chunk.append(i)
        count += n
    if chunk:
        yield chunk


def write_output(job: Job, data: bytes, record: dict[str, Any]) -> None:
    """The output's bytes and its record. The old record goes first and the new one comes
    last, so wherever a run is killed, a record never describes an output it did not see
    written."""
    job.output.parent.mkdir(parents=True, exist_ok=True)
    sidecar = record_path(job.output)
    sidecar.unlink(missing_ok=True)
    replace_file(job.output, data)
    replace_file(sidecar, json.dumps(record, sort_keys=True).encode())


def process(
    session: Session, jobs: list[Job], limit: int, options: Options | None = None
) -> list[tuple[Job, str | None]]:
    """Read, run and write `jobs`; (job, None) when written, (job, reason) when it failed.
    Images of one size share batches; each volume runs alone, slice batches of `limit`."""
    options = options or Options()
    results = [process_volume(session, job, limit, options) for job in jobs if job.is_volume]
    return results + _process_images(
        session, [job for job in jobs if not job.is_volume], limit, options
    )


def process_volume(
    session: Session, job: Job, limit: int, options: Options
) -> tuple[Job, str | None]:
    """One volume read, run slice by slice and written; (job, reason) when any step failed."""
    artifact = job_artifact(job, session.manifest, options)
    try:
        # hashed before it is read, as an image is
        record = {"artifact": artifact, "input": input_identity(job.source)}
        volume = read_volume(job.source, index=options.volume_index)
        axis = slice_axis(volume) if options.axis is None else options.axis
        for note in volume.notes:
            _warn(note)
        h, w = slice_size(volume, axis)
        tiling = {} if session.runner.accepts(h, w) else options.tiling  # as images: if needed
        if options.seg is not None:
            data = _series_seg(session, job.source, options.seg, limit, tiling)
        else:
            output = predict_volume(
                session, volume, axis=axis, batch_size=limit, on_clip=_warn, **tiling
            )
            data = volume_bytes(volume, output)
    except Exception as exc:  # noqa: BLE001 - no one volume (or a backend failure) aborts
        return job, str(exc)
    try:
        write_output(job, data, record)
    except OSError as exc:
        return job, f"cannot write {job.output}: {exc}"
    return job, None


def _series_seg(
    session: Session, folder: Path, seg_type: str, limit: int, tiling: dict[str, Any]
) -> bytes:
    """A series folder's DICOM SEG (NIfTI files have no instances to reference)."""
    if not folder.is_dir():
        raise InputContractError(
            f"{folder} is NIfTI, and a DICOM SEG must reference DICOM images; pass DICOM "
            f"series, or drop --format seg"
        )
    sources, frames = seg.series_frames(session, folder, seg_type, limit, **tiling)
    return seg.seg_bytes(session.manifest, sources, frames, seg_type)


def _image_output(session: Session, job: Job, output: np.ndarray, options: Options) -> bytes:
    """One image's output bytes: a SEG, a class mask PNG (a model with a head) or .npy, each
    on the file's own pixels."""
    output = output_plane(job.source).to_stored(output)  # onto the file's own pixels
    if options.seg is not None:
        source = seg.dicom_source(job.source)
        frames = seg.image_frames(output, options.seg)
        return seg.seg_bytes(session.manifest, [source], frames, options.seg)
    return mask_png(output) if has_head(session) else npy_bytes(output)


def _process_images(
    session: Session, jobs: list[Job], limit: int, options: Options
) -> list[tuple[Job, str | None]]:
    results: list[tuple[Job, str | None]] = []
    ready: list[tuple[Job, np.ndarray, dict[str, Any]]] = []
    tiled: list[tuple[Job, np.ndarray, dict[str, Any]]] = []
    for job in jobs:
        try:
            # hashed before it is read: if the file changes in between, the record is the
            # older one, so the next run redoes it rather than keeping a wrong output
            artifact = job_artifact(job, session.manifest, options)  # the one that runs here
            record = {"artifact": artifact, "input": input_identity(job.source)}
            x = session.preprocess(job.source, on_clip=_warn)
            whole = not options.tiling or session.runner.accepts(*x.shape[2:])
            session.check(x, spatial=whole)  # alone: an image out of range fails by itself
            (ready if whole else tiled).append((job, x, record))
        except Exception as exc:  # noqa: BLE001 - no one file (a decompression bomb) aborts
            results.append((job, str(exc)))
    try:  # same sizes batched whole; an image too large for one call alone, in tiles
        outputs = run_groups(session, [x for _, x, _ in ready], limit)
        outputs += [np.asarray(session.run(x, **options.tiling)) for _, x, _ in tiled]
    except (ResfuseError, RuntimeError, ValueError) as exc:  # a backend failure: this batch only
        return results + [(job, f"inference failed: {exc}") for job, _, _ in ready + tiled]
    for (job, _, record), output in zip(ready + tiled, outputs, strict=True):
        try:
            data = _image_output(session, job, output, options)
        except (ResfuseError, ValueError) as exc:  # highdicom refuses a source it cannot use
            results.append((job, str(exc)))
            continue
        try:
            write_output(job, data, record)
            results.append((job, None))
        except OSError as exc:
            results.append((job, f"cannot write {job.output}: {exc}"))
    return results


def _record(summary: Summary, results: Iterable[tuple[Job, str | None]]) -> None:
    for job, reason in results:
        if reason is None:
            summary.done += 1
            summary.stale += job.stale
        else:
            summary.failures.append((str(job.source), reason + _set_aside(job)))


def _set_aside(job: Job) -> str:
    """A failed job's stale output (made from an earlier input or artifact) renamed to
    <output>.stale, its record removed: kept, but never again taken for this input's answer."""
    if not job.stale or not job.output.is_file():
        return ""
    aside = job.output.with_name(job.output.name + ".stale")
    try:
        job.output.replace(aside)
        record_path(job.output).unlink(missing_ok=True)
    except OSError as exc:
        return f"; its earlier output {job.output} is stale and could not be moved aside: {exc}"
    return f"; its earlier output, made from another input or artifact, was moved to {aside}"


# Drivers


def predict(
    artifact: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    backend: str = "onnxruntime",
    device: str = "cpu",
    batch_size: int = 8,
    use_ray: bool = False,
    address: str | None = None,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    series: bool = False,
    axis: int | None = None,
    volume_index: int | None = None,
    tiling: dict[str, Any] | None = None,
    seg_type: str | None = None,
) -> Summary:
    """Write every missing or stale output; `on_plan(n)` is told how many inputs are to be
    done, and `progress(k)` after each k of them (written or failed). Volumes: NIfTI files, and
    with `series` every folder of DICOM files; `axis` and `volume_index` as predict_volume and
    read_volume take them. `tiling` (Session.run's tile keywords) runs the images and volume
    slices the backend cannot take whole as tiles; it is part of each output's record.
    `seg_type` ("binary" or "fractional") writes a DICOM SEG (OUTPUT/<relative path>.seg.dcm)
    for each DICOM file and series instead (resfuse.runtime.seg)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    manifest = read_manifest(artifact)
    check_batch_size(batch_size, manifest)
    if axis is not None and axis not in (0, 1, 2):
        raise ConfigError(f"--axis {axis} is not a voxel axis of a volume; use 0, 1 or 2")
    options = Options(axis, volume_index, dict(tiling or {}), _check_seg(manifest, seg_type))
    _check_tiling(manifest, options.tiling)
    jobs, total = plan(input_dir, output_dir, manifest, options, series=series)
    if jobs:
        check_writable(output_dir)
        images = [job.source for job in jobs if not job.is_volume]
        _warn_grayscale(images, manifest.contract.channels)
    summary = Summary(total=total, skipped=total - len(jobs))
    if on_plan is not None:
        on_plan(len(jobs))
    tick = progress or (lambda _k: None)
    start = time.perf_counter()
    if jobs:
        run = _predict_ray if use_ray else _predict_local
        for results in run(artifact, jobs, backend, device, batch_size, address, workers, options):
            _record(summary, results)
            tick(len(results))
    summary.seconds = time.perf_counter() - start
    return summary


def _check_seg(manifest: Manifest, seg_type: str | None) -> str | None:
    """A SEG type checked once, before any input is read: a known type, a model with a head."""
    if seg_type is not None:
        seg.check_seg_type(seg_type)
        seg.check_head(manifest)
    return seg_type


def _check_tiling(manifest: Manifest, tiling: dict[str, Any]) -> None:
    """A tile size outside the artifact's range, refused once before any input is read (each
    input would fail alone with the same reason); 'auto' always fits."""
    if tiling and tiling["tile"] != "auto":
        h, w = tiling["tile"]
        Tiling((h, w), tiling["overlap"], tiling["blend"]).fit(manifest.contract)


def _warn(note: str) -> None:
    """A warning on stderr: the driver's when local, the actor's log under Ray."""
    err.print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)


def _warn_grayscale(sources: list[Path], channels: int) -> None:
    note = grayscale_note(sources, channels)
    if note is not None:
        _warn(note)


def _predict_local(
    artifact: str | Path,
    jobs: list[Job],
    backend: str,
    device: str,
    batch_size: int,
    address: str | None,
    workers: int,
    options: Options,
) -> Iterator[list[tuple[Job, str | None]]]:
    """Jobs sorted by image size (read from headers), so same-size images share batches."""
    if address is not None:
        raise ConfigError("--address needs --ray (it names the Ray cluster to run on); add --ray")
    with load(artifact, backend, device) as session:
        ordered = sorted(jobs, key=lambda job: _size_key(job.source))
        for i in range(0, len(ordered), batch_size):
            yield process(session, ordered[i : i + batch_size], batch_size, options)


def _size_key(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header without decoding it; unknown sizes sort first
    (they mostly fail to read, and are reported early)."""
    try:
        with pil().open(path) as image:
            width, height = image.size
            return width, height
    except Exception:  # noqa: BLE001 - any unreadable file: its failure is reported when read
        return (0, 0)


class Predictor:
    """A Ray Data actor: one Session for its life, a batch of jobs per call."""

    def __init__(
        self, artifact: str, backend: str, device: str, batch_size: int, options: Options
    ) -> None:
        self.session = load(artifact, backend, device)
        self.batch_size = batch_size
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jobs = [
            Job(Path(s), Path(o)) for s, o in zip(batch["source"], batch["output"], strict=True)
        ]
        results = process(self.session, jobs, self.batch_size, self.options)
        return {
            "source": np.array([str(job.source) for job, _ in results]),
            "output": np.array([str(job.output) for job, _ in results]),
            "error": np.array([reason or "" for _, reason in results]),
        }


def _predict_ray(
    artifact: str | Path,
    jobs: list[Job],
    backend: str,
    device: str,
    batch_size: int,
    address: str | None,
    workers: int,
    options: Options,
) -> Iterator[list[tuple[Job, str | None]]]:
    """Paths travel, not pixels: on a cluster, INPUT_DIR, OUT_DIR and the artifact must be at
    the same paths on every node (a shared file system)."""
    ray, data = _ray_data()
    started = not ray.is_initialized()
    if started:
        init_ray(ray, address)
    try:
        context = data.DataContext.get_current()
        context.enable_progress_bars = False  # resfuse's bar counts images instead
        ordered = sorted(jobs, key=lambda job: _size_key(job.source))
        # results come back by output path: the driver keeps each job (and whether it is stale)
        by_output = {str(j.output.resolve()): j for j in ordered}
        items = [{"source": str(j.source.resolve()), "output": o} for o, j in by_output.items()]
        dataset = data.from_items(items).map_batches(
            Predictor,
            fn_constructor_kwargs={
                "artifact": str(Path(artifact).resolve()),
                "backend": backend,
                "device": device,
                "batch_size": batch_size,
                "options": options,
            },
            batch_size=batch_size,
            batch_format="numpy",
            concurrency=workers,
            num_gpus=1 if device != "cpu" else 0,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield [
                (by_output[str(o)], e or None)
                for o, e in zip(batch["output"], batch["error"], strict=True)
            ]
    finally:
        if started:
            ray.shutdown()


def init_ray(ray: Any, address: str | None) -> None:
    """Join the cluster at `address` (or at RAY_ADDRESS), or start Ray on this machine with
    every one of its servers (GCS, raylet, workers, agents, dashboard) on 127.0.0.1 only.

    Ray turns a loopback `_node_ip_address` into this machine's outward IP, and then its servers
    listen on every interface; only its single-machine mode (ray_constants.ENABLE_RAY_CLUSTER,
    which RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 sets at import) keeps the node IP on loopback.
    Cluster mode is back once Ray runs, so a later join of a cluster finds the real IP."""
    options = {"include_dashboard": False, "log_to_driver": False}
    if address is not None or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **options)
        return
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # a Ray that renamed it: say so
        raise ConfigError(
            f"Ray {ray.__version__} has no ray_constants.ENABLE_RAY_CLUSTER, which keeps a local "
            f"Ray on 127.0.0.1; install ray 2.60 (resfuse is tested with it), or pass --address"
        )
    cluster = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(dashboard_host="127.0.0.1", **options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster


def _ray_data() -> tuple[Any, Any]:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ConfigError("--ray needs Ray Data: pip install 'resfuse[serve]'") from exc
    return ray, ray.data
