"""Fusion models: what they are (spec.py, no torch), encoders (backbones.py), fusion methods
(fusion.py), composition (model.py).

The declarations import here at once; the nn.Modules, which need torch, on first use (PEP 562),
so that the runtime reads configs and manifests in an install without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resfuse.models.spec import BACKBONES, METHOD_SPECS, STAGES, ModelConfig
from resfuse.torch_extra import require_torch

if TYPE_CHECKING:
    from resfuse.models.backbones import ResNetEncoder
    from resfuse.models.fusion import METHODS, FusionMethod, register_method
    from resfuse.models.model import FusionModel, SegmentationHead, build_model


def __getattr__(name: str) -> Any:
    """The torch-backed names, imported when first asked for; without torch, a one-line
    ResfuseError naming the extra to install."""
    if name == "ResNetEncoder":
        require_torch(f"resfuse.models.{name}")
        from resfuse.models.backbones import ResNetEncoder

        return ResNetEncoder
    if name in ("METHODS", "FusionMethod", "register_method"):
        require_torch(f"resfuse.models.{name}")
        from resfuse.models import fusion

        return getattr(fusion, name)
    if name in ("FusionModel", "SegmentationHead", "build_model"):
        require_torch(f"resfuse.models.{name}")
        from resfuse.models import model

        return getattr(model, name)
    raise AttributeError(f"module 'resfuse.models' has no attribute {name!r}")


__all__ = [
    "BACKBONES",
    "METHODS",
    "METHOD_SPECS",
    "STAGES",
    "FusionMethod",
    "FusionModel",
    "ModelConfig",
    "ResNetEncoder",
    "SegmentationHead",
    "build_model",
    "register_method",
]
