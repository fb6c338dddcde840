"""What the fusion models are, without PyTorch: the backbones' stages and widths, each fusion
method's declaration (options, whether it passes the image, its weights' prefix) and ModelConfig.

The runtime validates manifests, tiles and checks with these alone, so an install without torch
reads them; the nn.Modules (backbones.py, fusion.py, model.py) take their declarations from here.
A method defined outside resfuse declares itself with register_method (fusion.py), which records
it here too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from numbers import Integral
from typing import Any

from resfuse.errors import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    widths: tuple[int, int, int, int]  # output channels of layer1..layer4
    blocks: tuple[int, int, int, int]  # residual blocks in layer1..layer4


_BASIC = (64, 128, 256, 512)
_BOTTLENECK = (256, 512, 1024, 2048)
BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("resnet18", _BASIC, (2, 2, 2, 2)),
        BackboneSpec("resnet34", _BASIC, (3, 4, 6, 3)),
        BackboneSpec("resnet50", _BOTTLENECK, (3, 4, 6, 3)),
        BackboneSpec("resnet101", _BOTTLENECK, (3, 4, 23, 3)),
        BackboneSpec("resnet152", _BOTTLENECK, (3, 8, 36, 3)),
    )
}
STAGES = (2, 3, 4)


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def check_stage(stage: int) -> None:
    if stage not in STAGES:
        raise ConfigError(
            f"stage {stage} is not supported; choose 2, 3 or 4 (output stride 8, 16 or 32)"
        )


@dataclass(frozen=True)
class Option:
    """A config key a method takes beyond the shared ones (backbone, stage, features, ...).

    `parse` gives the value as the method's constructor takes it, or raises ConfigError saying
    what fits: configs, and so manifests, are checked with it before a model is built.
    """

    default: Any
    parse: Callable[[Any], Any]


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of resfuse needs to know of a fusion method, beyond its nn.Module."""

    name: str
    # The config keys the constructor takes beyond features, with defaults and checks.
    options: Mapping[str, Option] = field(default_factory=dict)
    # Whether the fused output's first channels are the image itself, bit for bit (a gate
    # scales them otherwise): checks compare them exactly, tiling copies them from the input.
    passes_image: bool = True
    # The state-dict prefix, under the model's "fusion.", that only this method's weights have:
    # guess_config names the method a checkpoint was saved from by it.
    state_prefix: str = ""


METHOD_SPECS: dict[str, MethodSpec] = {}


def declare_method(spec: MethodSpec) -> MethodSpec:
    """Record a method's declaration; one equal to the recorded one is a no-op."""
    # An empty prefix would claim every checkpoint, and one config carries every method's
    # options (declared_options), so a key two methods declare must be the same option.
    if not spec.state_prefix:
        raise TypeError(f"fusion method {spec.name!r} declares no state_prefix")
    others = {
        k: o for s in METHOD_SPECS.values() if s.name != spec.name for k, o in s.options.items()
    }
    for key, option in spec.options.items():
        if others.get(key, option) != option:
            raise TypeError(f"fusion method {spec.name!r} redeclares option {key!r} differently")
    METHOD_SPECS[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    if name not in METHOD_SPECS:
        raise ConfigError(
            f"unknown fusion method {name!r}; choose one of {', '.join(METHOD_SPECS)}"
        )
    return METHOD_SPECS[name]


def declared_options() -> dict[str, Option]:
    """The options of every declared method. A config carries all of them, whichever method it
    builds, so that every manifest lists the same keys (each has always listed spp's levels)."""
    return {key: option for spec in METHOD_SPECS.values() for key, option in spec.options.items()}


SPP_LEVELS = (1, 2, 4)


def bin_counts(levels: object) -> tuple[int, ...]:
    """SPP's levels: distinct bin counts from 1 to 64 (the bound manifests have always had), in
    a list or tuple."""
    counts = tuple(levels) if isinstance(levels, (list, tuple)) else ()
    if not counts or not all(map(_bin_count, counts)) or len(set(counts)) < len(counts):
        raise ConfigError(
            f"SPP levels must be distinct bin counts from 1 to 64 such as (1, 2, 4), got {levels}"
        )
    return tuple(int(k) for k in counts)


def _bin_count(k: object) -> bool:
    # not a bool: JSON keeps true apart from 1, and so do manifests
    return isinstance(k, Integral) and not isinstance(k, bool) and 1 <= int(k) <= 64


# The built-in methods (their nn.Modules: fusion.py)
declare_method(MethodSpec("upsample", state_prefix="up."))
declare_method(MethodSpec("spp", {"levels": Option(SPP_LEVELS, bin_counts)}, True, "branches."))
declare_method(MethodSpec("masked", passes_image=False, state_prefix="gate."))


@dataclass(frozen=True, init=False)
class ModelConfig:
    """Everything needed to rebuild a fusion model; stored in every artifact's manifest.

    The shared fields, then `options`: a value for every option of every declared method, as
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
        method_spec(self.method)
        backbone_spec(self.backbone)
        check_stage(self.stage)
        if self.in_channels < 1:
            raise ConfigError(f"in_channels must be at least 1, got {self.in_channels}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(
                f"num_classes must be at least 1 (or None for no head), got {self.num_classes}"
            )

    @property
    def spec(self) -> MethodSpec:
        return METHOD_SPECS[self.method]

    @property
    def method_options(self) -> dict[str, Any]:
        """The options this config's method takes: its constructor's keyword arguments."""
        own = self.spec.options
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
        options of every declared method."""
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
    """Every declared method's options, each parsed by its declaration, defaults filled in."""
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
