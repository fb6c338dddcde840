"""Versions of the libraries that produced or ran an artifact (for manifests and results)."""

from __future__ import annotations

import platform
from importlib import metadata

_PACKAGES = (
    "resfuse",
    "torch",
    "onnx",
    "onnxscript",
    "onnxslim",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "numpy",
)


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return found
