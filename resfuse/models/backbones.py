"""ResNet encoders cut after a stage, so that the fusion methods see stride-8/16/32 features."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torchvision.models import ResNet

from resfuse.errors import ConfigError
from resfuse.models.spec import backbone_spec, check_stage


class ResNetEncoder(nn.Module):
    """torchvision ResNet up to `layer{stage}`: feature map of size ceil(H / stride)."""

    def __init__(
        self, name: str, stage: int = 4, in_channels: int = 3, pretrained: bool = False
    ) -> None:
        super().__init__()
        spec = backbone_spec(name)
        check_stage(stage)
        if in_channels < 1:
            raise ConfigError(f"in_channels must be at least 1, got {in_channels}")
        net = _torchvision_resnet(name, pretrained)
        if in_channels != 3:
            net.conv1 = _adapt_stem(net.conv1, in_channels)
        self.in_channels = in_channels
        self.stage = stage
        self.stride = 2 ** (stage + 1)
        self.out_channels = spec.widths[stage - 1]
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.Sequential(*(getattr(net, f"layer{i}") for i in range(1, stage + 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))

    def torchvision_part(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The entries of a torchvision ResNet state dict that this cut reads (conv1, bn1 and
        layer1..layer{stage}; fc and deeper layers are not used), under their torchvision names,
        the stem kernel adapted to in_channels."""
        used = {torchvision_name(key).partition(".")[0] for key in self.state_dict()}
        part = {key: value for key, value in state.items() if key.partition(".")[0] in used}
        stem = part.get("conv1.weight")
        if stem is not None and stem.dim() == 4 and stem.shape[1] != self.in_channels:
            part["conv1.weight"] = _adapt_kernel(stem, self.in_channels)
        return part

    def load_torchvision_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision ResNet state dict into this cut: `torchvision_part` must hold
        exactly this cut's keys and shapes."""
        own = {torchvision_name(key): key for key in self.state_dict()}
        part = self.torchvision_part(state)
        self.load_state_dict({own.get(key, key): value for key, value in part.items()})


def torchvision_name(key: str) -> str:
    """An encoder state key under its torchvision ResNet name: stem.0.* is conv1.*, stem.1.* is
    bn1.*, layers.2.* is layer3.*."""
    part, index, rest = key.split(".", 2)
    if part == "stem":
        return f"{('conv1', 'bn1')[int(index)]}.{rest}"
    return f"layer{int(index) + 1}.{rest}"


def _torchvision_resnet(name: str, pretrained: bool) -> ResNet:
    import torchvision.models as tvm

    build = getattr(tvm, name)
    if not pretrained:
        return cast("ResNet", build(weights=None))
    try:
        return cast("ResNet", build(weights="DEFAULT"))
    except Exception as exc:  # network, hub cache or checksum failures all land here
        raise ConfigError(
            f"could not fetch torchvision's pretrained {name} weights ({type(exc).__name__}: "
            f"{exc}); on an offline machine pass a local file with weights=PATH instead"
        ) from exc


def _adapt_kernel(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Turn an RGB stem kernel into one for `in_channels` inputs, keeping its response to a
    uniform input (as timm does): 1 channel sums the RGB kernels, others repeat and rescale."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _adapt_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    # ResNet's stem: 7x7, stride 2, padding 3, no bias.
    new = nn.Conv2d(in_channels, conv.out_channels, 7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        new.weight.copy_(_adapt_kernel(conv.weight, in_channels))
    return new
