"""Turning what a user passes (arrays, tensors, image files, PIL images) into checked inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from resfuse.contract import InputContract
from resfuse.errors import ConfigError, InputContractError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
RESIZE_POLICIES = ("none", "fit")


def check_finite(x: np.ndarray) -> None:
    bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if bad:
        raise InputContractError(
            f"the input holds {bad} NaN/Inf values; clean or mask them before inference"
        )


def image_files(folder: str | Path, option: str = "--images") -> list[Path]:
    """The PNG/JPEG/... files directly in `folder`, sorted; `option` names it in errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{option} {folder} is not a folder of PNG/JPEG files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{option} {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def pil() -> Any:
    """PIL.Image, or an error naming the extra that installs it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError("image inputs need Pillow: pip install 'resfuse[images]'") from exc
    return Image


def is_image(x: object) -> bool:
    if isinstance(x, (str, Path)):
        return True
    return type(x).__module__.startswith("PIL.")


def load_image(
    source: str | Path | Any,
    preprocess: dict[str, Any],
    contract: InputContract,
    resize: str | None = None,
) -> np.ndarray:
    """Read an image as (1, C, H, W) float32: mode for C, resize policy, scale, mean and std."""
    image_mod = pil()
    policy = resize or preprocess.get("resize", "none")
    if policy not in RESIZE_POLICIES:
        raise ConfigError(f"resize policy must be one of {RESIZE_POLICIES}, not {policy!r}")
    if isinstance(source, (str, Path)):
        try:
            with image_mod.open(source) as opened:
                image = opened.copy()
        except (OSError, image_mod.UnidentifiedImageError) as exc:
            raise InputContractError(f"cannot read {source} as an image: {exc}") from exc
    else:
        image = source
    mode = {1: "L", 3: "RGB"}.get(contract.channels)
    if mode is None:
        raise ConfigError(
            f"image files give 1 or 3 channels; this model takes {contract.channels}: pass arrays"
        )
    image = image.convert(mode)
    if policy == "fit":
        image = _fit(image, contract, image_mod)
    x = np.asarray(image, dtype=np.float32).reshape(image.height, image.width, -1)
    x = x * np.float32(preprocess.get("scale", 1 / 255))
    mean = np.asarray(preprocess.get("mean", [0.0] * contract.channels), dtype=np.float32)
    std = np.asarray(preprocess.get("std", [1.0] * contract.channels), dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _fit(image: Any, contract: InputContract, image_mod: Any) -> Any:
    """Scale, keeping the aspect ratio, into the contract's H and W range."""
    w, h = image.size
    factor = 1.0
    hmax, wmax = contract.height.max, contract.width.max
    if hmax is not None and wmax is not None and (h > hmax or w > wmax):
        factor = min(hmax / h, wmax / w)
    if h * factor < contract.height.min or w * factor < contract.width.min:
        factor = max(contract.height.min / h, contract.width.min / w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if size == (w, h):
        return image
    resample = image_mod.Resampling.BILINEAR
    return image.resize(size, resample)
