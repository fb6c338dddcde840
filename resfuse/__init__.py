"""resfuse: ResNet fusion models from PyTorch to ONNX, TensorRT and ONNX Runtime."""

from resfuse.errors import (
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
from resfuse.models import BACKBONES, METHODS, FusionModel, ModelConfig, build_model

__version__ = "0.1.0"


def load_original(manifest_path: str) -> FusionModel:
    """Rebuild an artifact's PyTorch original (eval mode) from its manifest and weights."""
    from resfuse.artifacts import load_original as _load

    return _load(manifest_path)


__all__ = [
    "ArtifactWriteError",
    "BackendUnavailableError",
    "BACKBONES",
    "METHODS",
    "ConfigError",
    "ExportError",
    "FusionModel",
    "InputContractError",
    "ManifestError",
    "ModelConfig",
    "ModelLoadError",
    "ParityError",
    "ResfuseError",
    "SessionClosedError",
    "WeightsError",
    "build_model",
    "load_original",
    "__version__",
]
