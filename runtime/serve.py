"""Online inference on Ray Serve: one Session per replica, same-size requests batched.

HTTP API (the deployment answers at the route prefix "/"):
- POST /predict: a PNG/JPEG/TIFF body (Content-Type image/png, image/jpeg, image/tiff) or a
  DICOM file (application/dicom), run through the manifest's preprocessing, or a float32 NCHW
  tensor as .npy bytes (Content-Type application/octet-stream; a DICOM or NIfTI file sent as
  octet-stream is known by its own header). The answer is the output as .npy bytes, or with
  ?format=png, for a model with a segmentation head and one image, the argmax class mask as a
  PNG; with ?format=seg (&seg_type=binary|fractional), for a DICOM image, its DICOM
  Segmentation (application/dicom; resfuse.runtime.seg). A NIfTI volume (application/x-nifti,
  .nii or .nii.gz bytes) runs slice by slice and is
  answered as .nii.gz bytes (application/gzip) with the input's affine.
  ?tile=auto|N|HxW (&overlap=, &blend=; default: resfuse-serve --tile) runs an image outside
  the artifact's H x W range as overlapping tiles, stitched back to its full size.
- GET /healthz: {"status": "ok"} once the replica has its Session.
- GET /metadata: the artifact's contract, method, precision, output, preprocessing.

Errors are JSON {"error": message} with: 400 a body that is not what its Content-Type says (or
a bad query), 413 a body over the size limit, 415 another Content-Type, 422 a tensor or image
that breaks the input contract (rank, channels, dtype, H x W range, batch, NaN), a DICOM object
that is no image (SEG, RTSTRUCT) or a DICOM compression this server has no decoder for (the
message names the package), 404/405 other paths and methods. Each request is checked on its
own before batching, so a bad one fails alone.

Batching: `serve.batch` collects up to --max-batch images (a request's batch dimension counts);
a collected batch is split by H x W and each size runs as one call of at most the artifact's
batch limit, so a batch never mixes sizes.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import math
import tempfile
import zlib
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from resfuse.artifacts import read_manifest
from resfuse.errors import ConfigError, InputContractError, ResfuseError
from resfuse.orientation import InPlane
from resfuse.runtime.predict import has_head, init_ray, mask_png, npy_bytes, run_groups
from resfuse.runtime.session import Session, load
from resfuse.runtime.tiling import Tiling, parse_tile

APP_NAME = "resfuse"
NPY_TYPE = "application/octet-stream"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/tiff")
DICOM_TYPE = "application/dicom"
NIFTI_TYPE = "application/x-nifti"
NIFTI_ANSWER_TYPE = "application/gzip"  # the answer is .nii.gz bytes
NPY_MAGIC = b"\x93NUMPY"
GZIP_MAGIC = b"\x1f\x8b"
BODY_NAME = "the NIfTI body"  # what messages call a volume sent to the server


@dataclass(frozen=True)
class ServeOptions:
    artifact: Path
    backend: str = "onnxruntime"
    device: str = "cpu"
    replicas: int = 1
    max_replicas: int | None = None  # above `replicas`: autoscale between the two
    max_batch: int = 16
    batch_wait_ms: float = 2.0
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None  # an existing Ray cluster; None: start Ray on this machine
    max_body_mb: float = 64.0
    cpus_per_replica: float = 1.0
    tile: str | tuple[int, int] | None = None  # requests' default ?tile; None: no tiling
    overlap: float = 0.25
    blend: str = "gaussian"

    def check(self) -> None:
        """Every option, before Ray starts: the artifact's manifest and sha256 included."""
        contract = read_manifest(self.artifact).contract  # fails here, not in every replica
        if isinstance(self.tile, tuple):  # "auto" is the backend's own size: it fits
            Tiling(self.tile, self.overlap, self.blend).fit(contract)
        if self.replicas < 1:
            raise ConfigError(f"--replicas {self.replicas} must be at least 1; pass 1 or more")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ConfigError(
                f"--max-replicas {self.max_replicas} is below --replicas {self.replicas}; "
                f"pass a maximum at least {self.replicas}, or leave it out for a fixed count"
            )
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch {self.max_batch} must be at least 1")
        if not (math.isfinite(self.batch_wait_ms) and self.batch_wait_ms >= 0):
            raise ConfigError(f"--batch-wait-ms {self.batch_wait_ms} must be 0 or more")
        if not (math.isfinite(self.max_body_mb) and self.max_body_mb > 0):
            raise ConfigError(f"--max-body-mb {self.max_body_mb} must be a positive number")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} is outside 1..65535; choose a free port")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class Answer:
    body: bytes
    media: str
    notes: list[str] = field(default_factory=list)  # sent as X-Resfuse-Warning


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ResfuseDeployment:
    """The Ray Serve replica: a plain class, made a deployment by `application()`."""

    def __init__(self, options: ServeOptions) -> None:
        from ray import serve

        keep_replica_grpc_on_loopback()  # before Serve starts that server, after this returns
        self.options = options
        self.session = load(options.artifact, options.backend, options.device)
        contract = self.session.contract
        # the artifact's batch limit, and serve.batch's: a batch never holds more images
        self.limit = min(options.max_batch, contract.batch.max or options.max_batch)
        self._batched = serve.batch(
            max_batch_size=options.max_batch,
            batch_wait_timeout_s=options.batch_wait_ms / 1000,
            batch_size_fn=lambda items: sum(int(x.shape[0]) for x in items),
        )(self._run_batch)

    async def _run_batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        # off the event loop, so requests keep arriving (and batching) while this one runs
        return await asyncio.to_thread(run_groups, self.session, inputs, self.limit)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response

        try:
            answer = await self._route(request)
            notes = " | ".join(for_http(note) for note in answer.notes)
            headers = {"X-Resfuse-Warning": notes} if notes else None
            return Response(answer.body, media_type=answer.media, headers=headers)
        except HTTPError as exc:
            return JSONResponse({"error": for_http(str(exc))}, status_code=exc.status)
        except Exception as exc:  # noqa: BLE001 - a backend failure: JSON like the rest
            return JSONResponse({"error": f"inference failed: {exc}"}, status_code=500)

    def __del__(self) -> None:  # Serve deletes a replica on scale-down and shutdown
        session = getattr(self, "session", None)
        if session is not None:
            session.close()

    async def _route(self, request: Any) -> Answer:
        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {"/predict": "POST", "/healthz": "GET", "/metadata": "GET"}
        if path not in routes:
            raise HTTPError(404, f"no route {path}; use POST /predict, GET /healthz, GET /metadata")
        if method != routes[path]:
            raise HTTPError(405, f"{path} takes {routes[path]}, not {method}")
        if path == "/healthz":
            return Answer(json.dumps({"status": "ok"}).encode(), "application/json")
        if path == "/metadata":
            return Answer(json.dumps(metadata(self.session)).encode(), "application/json")
        return await self._predict(request)

    async def _predict(self, request: Any) -> Answer:
        fmt = request.query_params.get("format", "npy")
        if fmt not in ("npy", "png", "seg"):
            raise HTTPError(
                400, f"format={fmt!r} is unknown; use format=npy, format=png or format=seg"
            )
        if fmt in ("png", "seg") and not has_head(self.session):
            raise HTTPError(
                400,
                f"format={fmt} gives a class mask, and this model has no segmentation head "
                "(num_classes); ask for format=npy",
            )
        seg_type = _seg_type(request.query_params, fmt)
        tiling = self.tiling(request.query_params)
        axis, index = (_count(request.query_params, key) for key in ("axis", "volume_index"))
        if axis is not None and axis > 2:
            raise HTTPError(400, f"axis={axis} is not a voxel axis of a volume; use 0, 1 or 2")
        body = await read_body(request, self.options.max_body_bytes)
        notes: list[str] = []  # what the intensity rule clipped: told in a response header
        source = self.seg_source(body) if seg_type is not None else None
        x, plane = self.decode(body, request.headers.get("content-type", ""), notes, index)
        answer = partial(self._answer, fmt=fmt, notes=notes, source=source, seg_type=seg_type)
        if not isinstance(x, np.ndarray):
            return await self._predict_volume(x, fmt, tiling, axis)
        tiled = bool(tiling) and x.ndim == 4 and not self.session.runner.accepts(*x.shape[2:])
        try:
            self.session.check(x, spatial=not tiled)  # alone: a bad request never fails a batch
        except InputContractError as exc:  # out of range: it names tiles (here ?tile=auto)
            raise HTTPError(422, str(exc)) from exc
        if tiled:  # tiles batch themselves, up to the backend's limit
            try:
                output = await asyncio.to_thread(self.session.run, x, **tiling)
            except ConfigError as exc:  # a tile count past the limit
                raise HTTPError(422, str(exc)) from exc
            return answer(plane.to_stored(np.asarray(output)))
        if x.shape[0] > self.options.max_batch:  # serve.batch would refuse it with a 500
            raise HTTPError(
                422,
                f"a batch of {x.shape[0]} images is over this server's --max-batch "
                f"{self.options.max_batch}; split it into smaller requests",
            )
        if fmt == "png" and x.shape[0] != 1:
            raise HTTPError(400, f"format=png takes one image, got a batch of {x.shape[0]}")
        return answer(plane.to_stored(await self._batched(x)))

    def _answer(
        self,
        output: np.ndarray,
        fmt: str,
        notes: list[str],
        source: Any = None,
        seg_type: str | None = None,
    ) -> Answer:
        """`output` (on the body's own pixels) as the format asked for."""
        if fmt == "png":
            return Answer(mask_png(output), "image/png", notes)
        if source is not None and seg_type is not None:
            from resfuse.runtime import seg

            try:
                data = seg.seg_bytes(
                    self.session.manifest, [source], seg.image_frames(output, seg_type), seg_type
                )
            except (ResfuseError, ValueError) as exc:  # a source highdicom cannot reference
                raise HTTPError(422, str(exc)) from exc
            return Answer(data, DICOM_TYPE, notes)
        return Answer(npy_bytes(output), NPY_TYPE, notes)

    def seg_source(self, body: bytes) -> Any:
        """The DICOM image a format=seg answer references: only a DICOM body has one."""
        from resfuse.images import pydicom

        if not is_dicom(body):
            raise HTTPError(
                415,
                f"format=seg answers a DICOM image with its SEG, which references it; send "
                f"the image as {DICOM_TYPE}, or ask for format=png",
            )
        try:
            return pydicom().dcmread(io.BytesIO(body))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad bytes
            raise HTTPError(400, f"the body is not a readable DICOM file: {exc}") from exc

    def tiling(self, query: Any) -> dict[str, Any]:
        """Session.run's tiling keywords: the query's ?tile (&overlap, &blend), else the
        server's --tile; {} for none. A bad value is a 400 naming it."""
        options = self.options
        tile = query.get("tile", None)
        try:
            roi = parse_tile(tile) if tile is not None else options.tile
            if roi is None:
                return {}
            overlap = float(query.get("overlap", options.overlap))
            blend = str(query.get("blend", options.blend))
            self.session.tiling(roi, overlap, blend)  # refused here, before the body is read
        except (ResfuseError, ValueError) as exc:
            raise HTTPError(400, str(exc)) from exc
        return {"tile": roi, "overlap": overlap, "blend": blend}

    def decode(
        self, body: bytes, content_type: str, notes: list[str], volume_index: int | None = None
    ) -> tuple[np.ndarray | Any, InPlane]:
        """An image, DICOM or .npy body as the model's input; a NIfTI body as a Volume; with
        how the output turns back onto the body's pixels (a DICOM image's orientation).
        Clipping notes go to `notes`."""
        media = content_type.split(";")[0].strip().lower()
        if not body:
            raise HTTPError(400, "the request body is empty; send an image or .npy bytes")
        if media == DICOM_TYPE or (media == NPY_TYPE and is_dicom(body)):
            return self.decode_dicom(body, notes)
        if media == NIFTI_TYPE or (media == NPY_TYPE and is_nifti(body)):
            return decode_volume(body, volume_index), InPlane()
        if media == NPY_TYPE:
            return decode_npy(body), InPlane()
        if media in IMAGE_TYPES:
            return self.decode_image(body, notes), InPlane()
        raise HTTPError(
            415,
            f"Content-Type {media or '(none)'} is not accepted; send {', '.join(IMAGE_TYPES)}, "
            f"{DICOM_TYPE}, {NIFTI_TYPE} or {NPY_TYPE} (.npy bytes of a float32 NCHW tensor)",
        )

    def decode_dicom(self, body: bytes, notes: list[str]) -> tuple[np.ndarray, InPlane]:
        from resfuse.images import dicom_plane, pydicom

        try:
            module = pydicom()
        except ConfigError as exc:
            raise HTTPError(415, f"this server cannot read DICOM: {exc}") from exc
        try:
            dataset = module.dcmread(io.BytesIO(body))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad bytes
            raise HTTPError(400, f"the body is not a readable DICOM file: {exc}") from exc
        return self.preprocess(dataset, notes), dicom_plane(dataset)

    async def _predict_volume(
        self, volume: Any, fmt: str, tiling: dict[str, Any], axis: int | None
    ) -> Answer:
        from resfuse.runtime.volumes import nifti_bytes, predict_volume, slice_axis, slice_size

        if fmt != "npy":
            raise HTTPError(400, f"a NIfTI volume is answered as NIfTI; drop ?format={fmt}")
        # its geometry's notes, then what the intensity rule clipped: told in a response header
        notes: list[str] = list(volume.notes)
        axis = slice_axis(volume) if axis is None else axis
        if tiling and self.session.runner.accepts(*slice_size(volume, axis)):
            tiling = {}  # as resfuse-predict: tiles only where slices do not fit whole
        run = partial(
            predict_volume, self.session, volume, axis=axis, on_clip=notes.append, **tiling
        )
        try:
            output = await asyncio.to_thread(run)
        except ResfuseError as exc:  # a slice or volume the model cannot take, a tile count
            raise HTTPError(422, str(exc)) from exc
        return Answer(nifti_bytes(volume, output), NIFTI_ANSWER_TYPE, notes)

    def decode_image(self, body: bytes, notes: list[str]) -> np.ndarray:
        from resfuse.images import pil

        try:
            image = pil().open(io.BytesIO(body))
            image.load()
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad bytes
            raise HTTPError(400, f"the body is not a readable image: {exc}") from exc
        return self.preprocess(image, notes)

    def preprocess(self, image: Any, notes: list[str]) -> np.ndarray:
        """An opened image or DICOM dataset as the model's input: 422 for one that is no image
        or breaks the contract, 415 for one this server lacks a decoder for."""
        try:
            return self.session.preprocess(image, on_clip=notes.append)
        except InputContractError as exc:
            raise HTTPError(422, str(exc)) from exc
        except ConfigError as exc:
            raise HTTPError(415, str(exc)) from exc


def keep_replica_grpc_on_loopback() -> None:
    """On a Ray whose node IP is loopback (one resfuse started here), bind this replica's
    inter-deployment gRPC server to that IP too. Ray Serve hard-codes "[::]:0" for it
    (serve/_private/replica.py, no setting moves it), the one server of a local resfuse-serve
    that would otherwise listen on every interface; nothing off this machine may call it."""
    import ray
    from ray.serve._private import replica

    node_ip = ray.util.get_node_ip_address()
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or not _is_loopback(node_ip):
        return  # a cluster node, or a Serve that binds otherwise: leave it to Serve
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def add_port(server: Any, address: str) -> Any:
        return bind(server, address.replace("[::]", host, 1))

    replica.add_port_to_grpc_server = add_port


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: some cluster's node, never one resfuse started
        return False


def _seg_type(query: Any, fmt: str) -> str | None:
    """?seg_type= of a format=seg request (binary by default); None for other formats."""
    seg_type = query.get("seg_type", None)
    if fmt != "seg":
        if seg_type is not None:
            raise HTTPError(400, "seg_type= shapes a format=seg answer; add format=seg")
        return None
    if (seg_type or "binary") not in ("binary", "fractional"):
        raise HTTPError(400, f"seg_type={seg_type!r} is unknown; use binary or fractional")
    return seg_type or "binary"


def is_dicom(body: bytes) -> bool:
    """The DICOM preamble: 128 bytes, then "DICM"."""
    return body[128:132] == b"DICM"


def is_nifti(body: bytes) -> bool:
    """A NIfTI-1/2 header (its size, 348 or 540, first), plain or gzipped."""
    if body[:2] == GZIP_MAGIC:
        try:
            body = zlib.decompressobj(wbits=31).decompress(body[:4096], 544)
        except zlib.error:
            return False
    head = body[:4]
    return head in (
        b"\x5c\x01\x00\x00",
        b"\x00\x00\x01\x5c",
        b"\x1c\x02\x00\x00",
        b"\x00\x00\x02\x1c",
    )


def decode_volume(body: bytes, index: int | None = None) -> Any:
    """A NIfTI body as a Volume named "the NIfTI body" (no server path reaches a client), read
    by nibabel from a temporary file (it reads files); `index` picks one of a 4-D file."""
    from resfuse.runtime.volumes import read_volume

    suffix = ".nii.gz" if body[:2] == GZIP_MAGIC else ".nii"
    with tempfile.TemporaryDirectory(prefix="resfuse-serve-") as folder:
        path = Path(folder, f"body{suffix}")
        path.write_bytes(body)
        try:
            volume = read_volume(path, index=index)
        except InputContractError as exc:
            raise HTTPError(422, str(exc).replace(str(path), BODY_NAME)) from exc
        except ConfigError as exc:  # nibabel is not installed on the server
            raise HTTPError(415, str(exc)) from exc
    notes = tuple(note.replace(str(path), BODY_NAME) for note in volume.notes)
    return replace(volume, name=BODY_NAME, notes=notes)


# What the library's messages name for a command line, as an HTTP client spells it.
_HTTP_SPELLINGS = (
    ("run it in tiles (tile='auto', --tile auto)", "run it in tiles (?tile=auto)"),
    ("--tile auto", "?tile=auto"),
    ("--tile", "?tile="),
    ("--overlap", "?overlap="),
    ("--volume-index ", "?volume_index="),
    (" (index= in Python)", ""),
    ("--axis (axis= in Python; ", "?axis= ("),
)


def for_http(message: str) -> str:
    """A library message (written for resfuse's commands) with query parameters where it
    names command-line options."""
    for command_line, query in _HTTP_SPELLINGS:
        message = message.replace(command_line, query)
    return message


def _count(query: Any, key: str) -> int | None:
    """A query parameter that is a whole number from 0, or None when absent; else a 400."""
    value = query.get(key, None)
    if value is None:
        return None
    if not value.isdigit():
        raise HTTPError(400, f"{key}={value!r} must be a whole number from 0")
    return int(value)


def decode_npy(body: bytes) -> np.ndarray:
    """.npy bytes, never pickles; dtype and shape are the contract's to judge (422)."""
    if not body.startswith(NPY_MAGIC):
        raise HTTPError(
            400,
            f"the body is not .npy, DICOM or NIfTI (it starts {body[:8]!r}); send .npy bytes "
            f"of a float32 NCHW tensor as {NPY_TYPE}, or an image with its own Content-Type",
        )
    try:
        x = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise HTTPError(400, f"the body is not .npy bytes of one array: {exc}") from exc
    if not isinstance(x, np.ndarray):
        raise HTTPError(400, "the body is a .npz archive; send one array saved with numpy.save")
    return x


async def read_body(request: Any, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit`, whatever Content-Length claims."""
    declared = request.headers.get("content-length")
    too_big = (
        f"the body is over the {limit} byte limit; send a smaller image or raise --max-body-mb"
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


def metadata(session: Session) -> dict[str, Any]:
    manifest = session.manifest
    return {
        "name": manifest.data.get("name"),
        "method": manifest.config.method,
        "backbone": manifest.config.backbone,
        "num_classes": manifest.config.num_classes,
        "precision": manifest.precision,
        "contract": session.contract.to_dict(),
        "input": manifest.input_name,
        "output": manifest.data.get("output"),
        "preprocess": manifest.data.get("preprocess"),
        "backend": session.backend,
    }


def application(options: ServeOptions) -> Any:
    """The bound Serve application: replicas (or autoscaling) and resources from `options`."""
    from ray import serve

    actor_options: dict[str, Any] = {"num_cpus": options.cpus_per_replica}
    if options.device != "cpu":
        actor_options["num_gpus"] = 1
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas is not None and options.max_replicas > options.replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.replicas,
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": options.max_batch,
            }
        }
    deployment = serve.deployment(
        name="resfuse",
        ray_actor_options=actor_options,
        max_ongoing_requests=max(2 * options.max_batch, 8),  # room for a batch to gather
        health_check_period_s=10,
        **scaling,
    )(ResfuseDeployment)
    return deployment.bind(options)


def connect(options: ServeOptions) -> bool:
    """Check the options, then start Ray here, listening on 127.0.0.1 only (or join
    `options.address`); returns whether this call started Ray, so `stop` knows whether to stop
    it. `options.host` is the HTTP proxy's alone: Ray's own servers stay on loopback."""
    ray, _ = _ray_serve()
    options.check()
    if ray.is_initialized():
        return False
    init_ray(ray, options.address)
    return True


def deploy(options: ServeOptions) -> None:
    """Run the application on Serve, listening on `options.host` only (loopback unless the
    caller names another address). Serve keeps the HTTP options it was first started with."""
    _, serve = _ray_serve()
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(application(options), name=APP_NAME, route_prefix="/", blocking=False)


def start(options: ServeOptions) -> bool:
    """connect, then deploy; returns whether Ray was started here."""
    started = connect(options)
    deploy(options)
    return started


def stop(started_ray: bool, local: bool = True) -> None:
    """Delete the application; on a Ray this process started, stop Serve and Ray too. On an
    existing cluster only resfuse's application goes: other Serve apps there keep running."""
    ray, serve = _ray_serve()
    if local:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
    if started_ray:
        ray.shutdown()


def _ray_serve() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ConfigError("resfuse-serve needs Ray Serve: pip install 'resfuse[serve]'") from exc
    return ray, serve


__all__ = ["ServeOptions", "application", "connect", "deploy", "start", "stop"]
