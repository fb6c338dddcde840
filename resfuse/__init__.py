"""resfuse: ResNet fusion models from PyTorch to ONNX, TensorRT and ONNX Runtime.

The base install runs artifacts (resfuse.runtime) without PyTorch; the model names below that
need torch (FusionModel, build_model, METHODS) are imported on first use (PEP 562), and in an
install without torch they raise a one-line error naming the extra to install.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# ONNX Runtime 1.29 and later upload usage events to Microsoft from Linux and macOS too, and
# keep a device id and an event cache under ~/.cache/Microsoft: not what a hospital's or an edge
# box's runtime may do unasked. Read once, when ONNX Runtime starts, so set before any session;
# ORT_DISABLE_TELEMETRY=0 in the environment turns it back on (docs/install.md).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from resfuse.errors import (  # noqa: E402 - after the telemetry opt-out, which must come first
    ArtifactWriteError,
    BackendUnavailableError,
    ConfigError,
    ExportError,
    InputContractError,
    ManifestError,
    ModelLoadError,
    ParityError,
    ResfuseError,
    SessionClosedError,
    WeightsError,
)
from resfuse.models.spec import BACKBONES, ModelConfig
from resfuse.torch_extra import has_torch

if TYPE_CHECKING:
    from resfuse.models.fusion import METHODS as METHODS
    from resfuse.models.model import FusionModel as FusionModel
    from resfuse.models.model import build_model as build_model

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        from resfuse import models

        return getattr(models, name)
    raise AttributeError(f"module 'resfuse' has no attribute {name!r}")


def load_original(manifest_path: str) -> FusionModel:
    """Rebuild an artifact's PyTorch original (eval mode) from its manifest and weights."""
    from resfuse.artifacts import load_original as _load

    return _load(manifest_path)


_TORCH_NAMES = ["METHODS", "FusionModel", "build_model"]
__all__ = [
    "ArtifactWriteError",
    "BackendUnavailableError",
    "BACKBONES",
    "ConfigError",
    "ExportError",
    "InputContractError",
    "ManifestError",
    "ModelConfig",
    "ModelLoadError",
    "ParityError",
    "ResfuseError",
    "SessionClosedError",
    "WeightsError",
    "load_original",
    "__version__",
    # `from resfuse import *` works in the base install too
    *(_TORCH_NAMES if has_torch() else []),
]
