"""A fusion model = ResNet encoder + fusion method (+ optional segmentation head), composed."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resfuse.contract import InputContract, Range
from resfuse.errors import ConfigError, WeightsError
from resfuse.models.backbones import ResNetEncoder, backbone_spec, check_stage, torchvision_name
from resfuse.models.fusion import METHODS, conv_bn_relu, declared_options
from resfuse.weights import check_fit, options_hint, read_state_dict


@dataclass(frozen=True, init=False)
class ModelConfig:
    """Everything needed to rebuild a fusion model; stored in every artifact's manifest.

    The shared fields, then `options`: a value for every option of every registered method, as
    (key, value) pairs so that the config stays hashable. Its method is built with the options
    it declares (method_options); the others only keep every manifest's keys the same.
    """

    method: str
    backbone: str
    stage: int
    in_channels: int
    num_classes: int | None
    features: int
    options: tuple[tuple[str, Any], ...]

    def __init__(
        self,
        method: str,
        backbone: str = "resnet18",
        stage: int = 4,
        in_channels: int = 3,
        num_classes: int | None = None,
        features: int = 64,
        **options: Any,
    ) -> None:
        # frozen: set past the dataclass's __setattr__, which refuses every assignment
        self.__dict__.update(
            method=method,
            backbone=backbone,
            stage=stage,
            in_channels=in_channels,
            num_classes=num_classes,
            features=features,
        )
        self._check()
        self.__dict__["options"] = _parse_options(options)

    def _check(self) -> None:
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

    @property
    def method_options(self) -> dict[str, Any]:
        """The options this config's method takes: its constructor's keyword arguments."""
        own = METHODS[self.method].options
        return {key: value for key, value in self.options if key in own}

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

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The keys of to_dict, and all that from_dict reads: the shared fields, then the
        options of every registered method."""
        return (*cls._shared(), *declared_options())

    @classmethod
    def _shared(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "options"]

    def to_dict(self) -> dict[str, Any]:
        shared = {key: getattr(self, key) for key in self._shared()}
        # tuples as the lists JSON gives back, so a config and its manifest compare equal
        return shared | {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**{key: data[key] for key in cls.field_names() if key in data})


def _parse_options(given: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Every registered method's options, each parsed by its declaration, defaults filled in."""
    declared = declared_options()
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ConfigError(
            f"unknown model option {unknown[0]!r}; the fusion methods take "
            f"{', '.join(declared) or 'none'}"
        )
    return tuple(
        (key, option.parse(given.get(key, option.default))) for key, option in declared.items()
    )


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
