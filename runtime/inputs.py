"""Checks on what a user passes. Reading image files into inputs lives in resfuse.images, where
export (INT8 calibration) reads them too; its names are re-exported here for the runtime."""

from __future__ import annotations

import numpy as np

from resfuse.errors import InputContractError
from resfuse.images import IMAGE_SUFFIXES, image_files, is_image, load_image

__all__ = ["IMAGE_SUFFIXES", "check_finite", "image_files", "is_image", "load_image"]


def check_finite(x: np.ndarray) -> None:
    bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if bad:
        raise InputContractError(
            f"the input holds {bad} NaN/Inf values; clean or mask them before inference"
        )
