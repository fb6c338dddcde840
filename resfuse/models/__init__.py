"""Fusion models: encoders (backbones.py), fusion methods (fusion.py), composition (model.py)."""

from resfuse.models.backbones import BACKBONES, STAGES, ResNetEncoder
from resfuse.models.fusion import METHODS, FusionMethod, register_method
from resfuse.models.model import FusionModel, ModelConfig, SegmentationHead, build_model

__all__ = [
    "BACKBONES",
    "METHODS",
    "STAGES",
    "FusionMethod",
    "FusionModel",
    "ModelConfig",
    "ResNetEncoder",
    "SegmentationHead",
    "build_model",
    "register_method",
]
