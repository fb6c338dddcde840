"""The three ways to bring stride-s ResNet features back to the image's H x W and join them.

Each method maps (image (B, Ci, H, W), features (B, Cf, ceil(H/s), ceil(W/s))) to a fused tensor
(B, Ci + `features`, H, W) for every H, W: sizes are read from the tensors at run time, so the
exported graphs stay dynamic.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from resfuse.errors import ConfigError
from resfuse.models.pooling import adaptive_avg_pool2d
from resfuse.models.spec import (
    METHOD_SPECS,
    SPP_LEVELS,
    MethodSpec,
    Option,
    bin_counts,
    declare_method,
)


class _Registry(dict[str, "type[FusionMethod]"]):
    """The method classes by name. Removing one removes its declaration (spec.METHOD_SPECS) too,
    so that configs and manifests stop taking it as well."""

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        METHOD_SPECS.pop(name, None)


METHODS: dict[str, type[FusionMethod]] = _Registry()


def register_method(name: str) -> Callable[[type[FusionMethod]], type[FusionMethod]]:
    """Register a fusion method under `name`. A built-in method takes its declaration from
    spec.py (readable without torch); another declares it on the class (options, state_prefix,
    passes_image), recorded in spec.py here; features_in stays on the class (it reads tensors)."""

    def add(cls: type[FusionMethod]) -> type[FusionMethod]:
        spec = METHOD_SPECS.get(name) or declare_method(
            MethodSpec(name, dict(cls.options), cls.passes_image, cls.state_prefix)
        )
        cls.name, cls.options = name, spec.options
        cls.passes_image, cls.state_prefix = spec.passes_image, spec.state_prefix
        METHODS[name] = cls
        return cls

    return add


def resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize to `like`'s H x W; exports as a Resize whose sizes come from Shape."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def to_image_grid(x: torch.Tensor, image: torch.Tensor, stride: int) -> torch.Tensor:
    """Stride-`stride` features to the image's H x W, each cell kept over its own input block.

    ResNet's ceil rounding puts cell i over input rows stride*i .. stride*i + stride - 1, the
    partial cell last. The result equals a bilinear resize (half-pixel centres) to the aligned
    grid (stride * h, stride * w) cropped to H x W: every cell centred on its block, where a
    resize straight to H x W would stretch the partial last cell over the image. It is computed
    as two small interpolation matrices, rows @ x @ cols^T, which give H x W in one product: no
    aligned tensor to crop, which on a CPU cost more than the resize itself (a full-resolution
    copy per axis). Exports as Range and MatMul, so H and W stay dynamic.
    """
    rows = _interpolation(image.shape[2], x.shape[2], stride, x)
    cols = _interpolation(image.shape[3], x.shape[3], stride, x)
    return rows @ (x @ cols.transpose(0, 1))


def _interpolation(out: int, size: int, stride: int, like: torch.Tensor) -> torch.Tensor:
    """(out, size) bilinear weights from `size` cells to `out` pixels, `stride` pixels a cell:
    pixel y samples cell coordinate (y + 0.5) / stride - 0.5, clamped to the grid as PyTorch's
    bilinear interpolation clamps it, and cell j weighs max(0, 1 - |coordinate - j|). Computed
    in float32 (float16 counts half pixels exactly only up to 1024); the weights, multiples of
    1 / (2 * stride), are exact in float16 too."""
    pixels = torch.arange(out, dtype=torch.float32, device=like.device)
    cells = torch.arange(size, dtype=torch.float32, device=like.device)
    coordinate = ((pixels + 0.5) / stride - 0.5).clamp(0, size - 1)
    weights = (1 - (coordinate[:, None] - cells[None, :]).abs()).clamp(min=0)
    return weights.to(like.dtype)


def conv_bn_relu(cin: int, cout: int, kernel: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class FusionMethod(nn.Module):
    """Base of the fusion methods. A subclass declares what the rest of resfuse needs to know of
    it, and its constructor takes (feature_channels, stride, features, **options)."""

    name: ClassVar[str] = ""
    # Whether the fused output's first channels are the image itself, bit for bit (a gate
    # scales them otherwise): checks compare them exactly, tiling copies them from the input.
    passes_image: ClassVar[bool] = True
    # The config keys the constructor takes beyond features, with defaults and checks.
    options: ClassVar[Mapping[str, Option]] = {}
    # The state-dict prefix, under the model's "fusion.", that only this method's weights have:
    # guess_config names the method a checkpoint was saved from by it.
    state_prefix: ClassVar[str] = ""

    def __init__(self, feature_channels: int, stride: int, features: int) -> None:
        super().__init__()
        if features < 1:
            raise ConfigError(f"features must be at least 1, got {features}")
        self.stride = stride
        self.features = features

    def forward(self, image: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def features_in(cls, state: Mapping[str, torch.Tensor]) -> int | None:
        """The `features` a state dict of this method (keys without "fusion.") was saved with:
        the width of its last BatchNorm, by default that of a conv_bn_relu named `project`."""
        norm = state.get("project.1.running_mean")
        return norm.shape[0] if norm is not None and norm.dim() == 1 else None


@register_method("upsample")
class UpsampleFusion(FusionMethod):
    """Learned upsampling: one stride-2 ConvTranspose2d block per halving of the backbone.

    The blocks produce s * ceil(H/s) >= H rows. ResNet's ceil rounding puts feature cell i over
    input rows s*i .. s*i + s - 1, the partial cell last, so cropping the bottom/right surplus
    keeps the features aligned with the image: exact H x W for every H, W (Slice in ONNX).
    """

    def __init__(self, feature_channels: int, stride: int, features: int = 64) -> None:
        super().__init__(feature_channels, stride, features)
        blocks: list[nn.Module] = []
        cin = feature_channels
        steps = stride.bit_length() - 1
        for i in range(1, steps + 1):
            cout = features if i == steps else max(features, feature_channels >> i)
            blocks += [
                nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            cin = cout
        self.up = nn.Sequential(*blocks)

    def forward(self, image: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        up = self.up(feats)[:, :, : image.shape[2], : image.shape[3]]
        return torch.cat([image, up], dim=1)

    @classmethod
    def features_in(cls, state: Mapping[str, torch.Tensor]) -> int | None:
        """The last block's BatchNorm is as wide as `features` (one block per halving)."""
        norms = {
            int(match[1]): value
            for key, value in state.items()
            if (match := re.fullmatch(r"up\.(\d+)\.running_mean", key)) and value.dim() == 1
        }
        return norms[max(norms)].shape[0] if norms else None


@register_method("spp")
class PyramidPoolingFusion(FusionMethod):
    """Spatial pyramid pooling (PSPNet style): context pooled over k x k bins per level, projected,
    joined with the features and projected again (1x1) on the feature grid, then brought to
    H x W by `to_image_grid`: resized to the stride-aligned grid and cropped, so each cell's
    context stays centred on its own input block for every H, W. A 1x1 projection, not PSPNet's 3x3,
    which on resnet50 features costs about 1 GFLOP at 512x512 for little gain."""

    def __init__(
        self,
        feature_channels: int,
        stride: int,
        features: int = 64,
        levels: Sequence[int] = SPP_LEVELS,
    ) -> None:
        super().__init__(feature_channels, stride, features)
        self.levels = bin_counts(levels)
        branch = max(1, feature_channels // 4)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(feature_channels, branch, 1), nn.ReLU(inplace=True))
            for _ in self.levels
        )
        self.project = conv_bn_relu(feature_channels + branch * len(self.levels), features)

    def forward(self, image: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        pyramid = [feats]
        for k, branch in zip(self.levels, self.branches, strict=True):
            pyramid.append(resize_to(branch(adaptive_avg_pool2d(feats, k)), feats))
        context = self.project(torch.cat(pyramid, dim=1))
        return torch.cat([image, to_image_grid(context, image, self.stride)], dim=1)


@register_method("masked")
class MaskedFusion(FusionMethod):
    """Conditional concatenation: a gate m = sigmoid(1x1 conv(features)) gives
    cat([image * (1 - m), projected_features * m]). Gate and projection are computed on the
    feature grid and brought to H x W by `to_image_grid` (aligned resize, then crop), so each
    cell's gate and features stay centred on its own input block, for every H, W."""

    def __init__(self, feature_channels: int, stride: int, features: int = 64) -> None:
        super().__init__(feature_channels, stride, features)
        self.gate = nn.Conv2d(feature_channels, 1, kernel_size=1)
        self.project = conv_bn_relu(feature_channels, features)

    def forward(self, image: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        mask = self.mask(image, feats)
        projected = to_image_grid(self.project(feats), image, self.stride)
        return torch.cat([image * (1 - mask), projected * mask], dim=1)

    def mask(self, image: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """The gate at H x W, for checks that the image channels equal image * (1 - mask)."""
        return to_image_grid(torch.sigmoid(self.gate(feats)), image, self.stride)
