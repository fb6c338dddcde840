"""A Session: one artifact on one backend, with every input checked before the backend sees it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from resfuse.artifacts import Manifest, read_manifest
from resfuse.errors import ConfigError, SessionClosedError
from resfuse.images import output_plane
from resfuse.runtime.backend_spec import merge_options
from resfuse.runtime.backends import Runner, claimed, create_runner
from resfuse.runtime.inputs import check_finite, is_image, load_image
from resfuse.runtime.tiling import Tiling, sliding_window
from resfuse.torch_extra import is_tensor

if TYPE_CHECKING:  # a caller's tensors only: the session itself needs no torch (base install)
    import torch


class Session:
    """Call `run(x)` from any number of threads: the runners keep no per-call state."""

    def __init__(self, runner: Runner, *, finite_check: bool = True, resize: str | None = None):
        self.runner = runner
        self.manifest: Manifest = runner.manifest
        self.contract = self.manifest.contract
        self.finite_check = finite_check
        self.resize = resize
        self.closed = False

    @property
    def backend(self) -> str:
        return self.runner.name

    def preprocess(
        self,
        source: str | Path | Any,
        *,
        resize: str | None = None,
        on_clip: Callable[[str], None] | None = None,
    ) -> np.ndarray:
        """An image file or PIL image as the model's (1, C, H, W) input, resized by `resize`
        (default: the session's policy, else the manifest's); `on_clip` hears, once, when the
        intensity rule clips a large share of its pixels (resfuse.images)."""
        return load_image(
            source,
            self.manifest.data.get("preprocess", {}),
            self.contract,
            resize or self.resize,
            on_clip=on_clip,
        )

    def check(self, x: np.ndarray | torch.Tensor, *, spatial: bool = True) -> None:
        dtype = str(x.dtype).removeprefix("torch.")
        self.contract.check(x.shape, dtype, spatial=spatial)
        if self.finite_check:
            if is_tensor(x):
                if not bool(x.isfinite().all()):
                    check_finite(x.detach().cpu().numpy())  # counts and raises
            else:
                check_finite(x)

    def run(
        self,
        x: np.ndarray | torch.Tensor | str | Path | Any,
        *,
        tile: int | tuple[int, int] | str | None = None,
        overlap: float = 0.25,
        blend: str = "gaussian",
        sigma_scale: float = 0.125,
        tile_batch: int | None = None,
        align: int | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Numpy (or an image) in, numpy out; a torch tensor in, a tensor out on its device.

        With `tile` ("auto", a size N or (H, W)), inputs of any H x W run as overlapping tiles
        of that size, `tile_batch` at a time (default: the backend's), blended by `blend`
        ("gaussian" or "constant") and stitched on the CPU, windows starting on multiples of
        `align` (default: the model's stride; 1: MONAI's positions): resfuse.runtime.tiling."""
        if self.closed:
            raise SessionClosedError(
                f"the session on {self.manifest.path.name} ({self.backend}) is closed; open a "
                f"new one with resfuse.runtime.load(), or call run() inside the `with` block"
            )
        if is_image(x):  # its output goes back onto its own pixels (a DICOM file's orientation)
            plane = output_plane(x)
            x = self.preprocess(x, resize="none" if tile is not None else None)
            out = self.run(
                x,
                tile=tile,
                overlap=overlap,
                blend=blend,
                sigma_scale=sigma_scale,
                tile_batch=tile_batch,
                align=align,
            )
            return plane.to_stored(np.asarray(out))
        if tile is not None:
            tiling = self.tiling(tile, overlap, blend, sigma_scale, tile_batch, align)
            return self._run_tiled(x, tiling)
        if is_tensor(x):
            self.check(x)
            infer_tensor = getattr(self.runner, "infer_tensor", None)
            if infer_tensor is not None:
                return infer_tensor(x)
            out = self.runner.infer(np.ascontiguousarray(x.detach().cpu().numpy()))
            return _like(out, x)
        self.check(_array(x))
        return self.runner.infer(np.ascontiguousarray(x))

    def tiling(
        self,
        tile: int | tuple[int, int] | str,
        overlap: float = 0.25,
        blend: str = "gaussian",
        sigma_scale: float = 0.125,
        tile_batch: int | None = None,
        align: int | None = None,
    ) -> Tiling:
        """The tiling `run(tile=...)` applies on this backend, refused here if it cannot run."""
        roi, batch = self.runner.default_tile()
        if tile != "auto":
            roi = (tile, tile) if isinstance(tile, int) else _pair(tile)
        stride = align or self.manifest.config.stride
        tiling = Tiling(roi, overlap, blend, sigma_scale, tile_batch or batch, stride)
        tiling.fit(self.contract)
        return tiling

    def _run_tiled(self, x: object, tiling: Tiling) -> np.ndarray | torch.Tensor:
        """Tiles through the backend, stitched on the CPU; the fused output's image channels
        are the input's own where the method passes the image through (blending would round
        them)."""
        tensor = x if is_tensor(x) else None
        array = _array(x if tensor is None else tensor.detach().cpu().numpy())
        self.check(array, spatial=False)
        out = sliding_window(lambda tiles: self.runner.infer(tiles), array, tiling)
        config = self.manifest.config
        if config.num_classes is None and config.spec.passes_image:
            out[:, : array.shape[1]] = array
        return out if tensor is None else _like(out, tensor)

    def close(self) -> None:
        """Release the backend; idempotent. run() afterwards raises SessionClosedError."""
        if not self.closed:
            self.closed = True
            self.runner.deactivate()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _array(x: object) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"run() takes a numpy array, a torch tensor, an image path or a PIL image, "
            f"not {type(x).__name__}"
        )
    return x


def _like(out: np.ndarray, tensor: torch.Tensor) -> torch.Tensor:
    """`out` as a tensor on `tensor`'s device (torch is imported: the caller gave a tensor)."""
    import torch

    return torch.from_numpy(out).to(tensor.device)


def _pair(tile: object) -> tuple[int, int]:
    if (
        isinstance(tile, (tuple, list))
        and len(tile) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in tile)
    ):
        return int(tile[0]), int(tile[1])
    raise ConfigError(f"tile must be 'auto', a size N or (H, W), got {tile!r}; e.g. tile=512")


def prepare(
    path: str | Path, backend: str = "onnxruntime", device: str = "cpu", **options: Any
) -> Runner:
    """The runner load() activates, built but not activated: every check that needs no backend
    library (manifest, sha256, backend spec, options, device), so a command can refuse a bad one
    before it starts work elsewhere (Ray replicas, actors)."""
    name, options = merge_options(backend, options)
    claim = claimed(path)  # the artifact's manifest holds the contract the Session checks
    if claim is not None:
        if name != claim.backend:
            raise ConfigError(
                f"{claim.path.name} is {claim.what}, which only backend {claim.backend!r} runs, "
                f"not {name!r}; load it with backend={claim.backend!r}, or load "
                f"{claim.artifact.name} instead"
            )
        path, options = claim.artifact, {**options, **claim.options}
    return create_runner(name, read_manifest(path), device, **options)


def load(
    path: str | Path,
    backend: str = "onnxruntime",
    device: str = "cpu",
    *,
    finite_check: bool = True,
    resize: str | None = None,
    **options: Any,
) -> Session:
    """Open an artifact by its manifest (or its .onnx with the manifest beside it), or, on the
    tensorrt backend, an engine by its sidecar manifest (or its .plan) with its artifact beside it.

    The manifest is validated and the artifact's sha256 checked before any backend reads it.
    `backend` is a name or a spec with options ("openvino:precision=bf16"); `options` go to the
    backend too (onnxruntime: threads, optimization, mem_pattern, fp16, ...), and one set in both
    to different values is refused.
    """
    runner = prepare(path, backend, device, **options)
    runner.activate()
    return Session(runner, finite_check=finite_check, resize=resize)
