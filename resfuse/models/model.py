"""A fusion model = ResNet encoder + fusion method (+ optional segmentation head), composed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resfuse.contract import InputContract, Range
from resfuse.errors import ConfigError
from resfuse.models.backbones import ResNetEncoder, backbone_spec, check_stage
from resfuse.models.fusion import METHODS, conv_bn_relu


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a fusion model; stored in every artifact's manifest."""

    method: str
    backbone: str = "resnet18"
    stage: int = 4
    in_channels: int = 3
    num_classes: int | None = None
    features: int = 64
    levels: tuple[int, ...] = field(default=(1, 2, 4))  # used by spp only

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"unknown fusion method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        backbone_spec(self.backbone)
        check_stage(self.stage)
        if self.in_channels < 1:
            raise ConfigError(f"in_channels must be at least 1, got {self.in_channels}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(
                f"num_classes must be at least 1 (or None for no head), got {self.num_classes}"
            )
        object.__setattr__(self, "levels", tuple(int(k) for k in self.levels))

    @property
    def image_channels(self) -> int | None:
        """How many leading output channels carry the image: a fused output's; none under a
        segmentation head."""
        return None if self.num_classes else self.in_channels

    @property
    def stride(self) -> int:
        return 2 ** (self.stage + 1)

    @property
    def out_channels(self) -> int:
        return self.num_classes or self.in_channels + self.features

    @property
    def output_name(self) -> str:
        return "logits" if self.num_classes else "fused"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["levels"] = list(self.levels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class SegmentationHead(nn.Sequential):
    """A small per-pixel classifier on the fused tensor: 3x3 conv-BN-ReLU, then 1x1 to logits."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 32) -> None:
        super().__init__(
            conv_bn_relu(in_channels, hidden, kernel=3), nn.Conv2d(hidden, num_classes, 1)
        )


class FusionModel(nn.Module):
    def __init__(self, config: ModelConfig, pretrained: bool = False) -> None:
        super().__init__()
        self.config = config
        self.encoder = ResNetEncoder(config.backbone, config.stage, config.in_channels, pretrained)
        kwargs: dict[str, Any] = {"levels": config.levels} if config.method == "spp" else {}
        self.fusion = METHODS[config.method](
            self.encoder.out_channels, self.encoder.stride, config.features, **kwargs
        )
        fused = config.in_channels + config.features
        self.head = SegmentationHead(fused, config.num_classes) if config.num_classes else None
        self.contract = InputContract(
            config.in_channels, Range(self.min_size), Range(self.min_size)
        )

    @property
    def min_size(self) -> int:
        """Smallest H and W: one full cell of the backbone's output grid."""
        return self.config.stride

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # keep the check out of exported graphs
            self.contract.check(image.shape, str(image.dtype).removeprefix("torch."))
        fused = self.fusion(image, self.encoder(image))
        return self.head(fused) if self.head is not None else fused


def build_model(
    method: str,
    backbone: str = "resnet18",
    stage: int = 4,
    in_channels: int = 3,
    num_classes: int | None = None,
    features: int = 64,
    levels: tuple[int, ...] = (1, 2, 4),
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> FusionModel:
    """Build a fusion model in eval mode.

    Weights: random by default; `pretrained=True` takes torchvision's ImageNet backbone (needs a
    network); `weights=PATH` loads a .safetensors file or a PyTorch state dict (weights_only),
    either of a whole fusion model or of a torchvision ResNet backbone.
    """
    config = ModelConfig(method, backbone, stage, in_channels, num_classes, features, levels)
    model = FusionModel(config, pretrained=pretrained)
    if weights is not None:
        from resfuse.weights import load_weights_into

        load_weights_into(model, weights)
    return model.eval()
