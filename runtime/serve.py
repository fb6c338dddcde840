"""Online inference on Ray Serve: one Session per replica, same-size requests batched.

HTTP API (the deployment answers at the route prefix "/"):
- POST /predict: a PNG/JPEG/TIFF body (Content-Type image/png, image/jpeg, image/tiff), run
  through the manifest's preprocessing, or a float32 NCHW tensor as .npy bytes (Content-Type
  application/octet-stream). The answer is the output as .npy bytes, or with ?format=png, for a
  model with a segmentation head and one image, the argmax class mask as a PNG.
- GET /healthz: {"status": "ok"} once the replica has its Session.
- GET /metadata: the artifact's contract, method, precision, output, preprocessing.

Errors are JSON {"error": message} with: 400 a body that is not an image or .npy (or a bad
query), 413 a body over the size limit, 415 another Content-Type, 422 a tensor or image that
breaks the input contract (rank, channels, dtype, H x W range, batch, NaN), 404/405 other paths
and methods. Each request is checked on its own before batching, so a bad one fails alone.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resfuse.artifacts import read_manifest
from resfuse.errors import ConfigError, InputContractError
from resfuse.runtime.predict import has_head, init_ray, mask_png, npy_bytes, run_groups
from resfuse.runtime.session import Session, load

APP_NAME = "resfuse"
NPY_TYPE = "application/octet-stream"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/tiff")


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

    def check(self) -> None:
        """Every option, before Ray starts: the artifact's manifest and sha256 included."""
        read_manifest(self.artifact)  # a bad artifact fails here, not in every replica
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
            body, media = await self._route(request)
            return Response(body, media_type=media)
        except HTTPError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except Exception as exc:  # noqa: BLE001 - a backend failure: JSON like the rest
            return JSONResponse({"error": f"inference failed: {exc}"}, status_code=500)

    def __del__(self) -> None:  # Serve deletes a replica on scale-down and shutdown
        session = getattr(self, "session", None)
        if session is not None:
            session.close()

    async def _route(self, request: Any) -> tuple[bytes, str]:
        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {"/predict": "POST", "/healthz": "GET", "/metadata": "GET"}
        if path not in routes:
            raise HTTPError(404, f"no route {path}; use POST /predict, GET /healthz, GET /metadata")
        if method != routes[path]:
            raise HTTPError(405, f"{path} takes {routes[path]}, not {method}")
        if path == "/healthz":
            return json.dumps({"status": "ok"}).encode(), "application/json"
        if path == "/metadata":
            return json.dumps(metadata(self.session)).encode(), "application/json"
        return await self._predict(request)

    async def _predict(self, request: Any) -> tuple[bytes, str]:
        fmt = request.query_params.get("format", "npy")
        if fmt not in ("npy", "png"):
            raise HTTPError(400, f"format={fmt!r} is unknown; use format=npy or format=png")
        if fmt == "png" and not has_head(self.session):
            raise HTTPError(
                400,
                "format=png gives a class mask, and this model has no segmentation head "
                "(num_classes); ask for format=npy",
            )
        body = await read_body(request, self.options.max_body_bytes)
        x = self.decode(body, request.headers.get("content-type", ""))
        try:
            self.session.check(x)  # alone, so one bad request never fails a batch
        except InputContractError as exc:
            raise HTTPError(422, str(exc)) from exc
        if x.shape[0] > self.options.max_batch:  # serve.batch would refuse it with a 500
            raise HTTPError(
                422,
                f"a batch of {x.shape[0]} images is over this server's --max-batch "
                f"{self.options.max_batch}; split it into smaller requests",
            )
        if fmt == "png" and x.shape[0] != 1:
            raise HTTPError(400, f"format=png takes one image, got a batch of {x.shape[0]}")
        output = await self._batched(x)
        return (mask_png(output), "image/png") if fmt == "png" else (npy_bytes(output), NPY_TYPE)

    def decode(self, body: bytes, content_type: str) -> np.ndarray:
        media = content_type.split(";")[0].strip().lower()
        if not body:
            raise HTTPError(400, "the request body is empty; send an image or .npy bytes")
        if media == NPY_TYPE:
            return decode_npy(body)
        if media in IMAGE_TYPES:
            return self.decode_image(body)
        raise HTTPError(
            415,
            f"Content-Type {media or '(none)'} is not accepted; send {', '.join(IMAGE_TYPES)} "
            f"or {NPY_TYPE} (.npy bytes of a float32 NCHW tensor)",
        )

    def decode_image(self, body: bytes) -> np.ndarray:
        from resfuse.images import pil

        try:
            image = pil().open(io.BytesIO(body))
            image.load()
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad bytes
            raise HTTPError(400, f"the body is not a readable image: {exc}") from exc
        try:
            return self.session.preprocess(image)
        except InputContractError as exc:
            raise HTTPError(422, str(exc)) from exc


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


def decode_npy(body: bytes) -> np.ndarray:
    """.npy bytes, never pickles; dtype and shape are the contract's to judge (422)."""
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
