"""A fusion model = ResNet encoder + fusion method (+ optional segmentation head), composed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from resfuse.contract import InputContract, Range
from resfuse.errors import WeightsError
from resfuse.models.backbones import ResNetEncoder, torchvision_name
from resfuse.models.fusion import METHODS, conv_bn_relu
from resfuse.models.spec import ModelConfig
from resfuse.weights import check_fit, options_hint, read_state_dict


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
        self.fusion = METHODS[config.method](
            self.encoder.out_channels, self.encoder.stride, config.features, **config.method_options
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

    def load_weights(self, path: str | Path) -> None:
        """Load a whole fusion model's weights, or a torchvision ResNet's into the encoder."""
        state = read_state_dict(path)
        hint = options_hint(state, self.config.to_dict())
        if any(k.startswith(("encoder.", "fusion.", "head.")) for k in state):
            check_fit(path, self.state_dict(), state, hint)
            self.load_state_dict(state)
            return
        part = self.encoder.torchvision_part(state)
        if not part:
            raise WeightsError(
                f"{path} is neither a resfuse fusion model (keys encoder.*, fusion.*, head.*) nor "
                f"a torchvision ResNet (conv1.*, bn1.*, layer1.*, ...); its keys begin "
                f"{', '.join(sorted(state)[:3])}; pass weights saved from one of those"
            )
        own = {torchvision_name(k): v for k, v in self.encoder.state_dict().items()}
        check_fit(path, own, part, hint)
        self.encoder.load_torchvision_state(state)


def build_model(
    method: str,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    **config: Any,
) -> FusionModel:
    """Build a fusion model in eval mode; `config` is ModelConfig's (backbone, stage,
    in_channels, num_classes, features, and the fusion methods' own options such as spp's
    levels), with its defaults.

    Weights: random by default; `pretrained=True` takes torchvision's ImageNet backbone (needs a
    network); `weights=PATH` loads a .safetensors file or a PyTorch state dict (weights_only),
    either of a whole fusion model or of a torchvision ResNet backbone.
    """
    model = FusionModel(ModelConfig(method, **config), pretrained=pretrained)
    if weights is not None:
        model.load_weights(weights)
    return model.eval()
