"""TensorRT optimization profiles: the input shapes an engine is built for.

A profile is three NCHW shapes, min <= opt <= max in every dimension; the engine accepts any
shape between min and max and tunes its kernels for opt. Several profiles serve resolution
buckets. Everything here is checked against the artifact's manifest before TensorRT is imported,
so a bad profile costs a second, not a failed build.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from resfuse.artifacts import Manifest
from resfuse.errors import ConfigError, InputContractError
from resfuse.shapes import Shape, format_shape, parse_shape

DIMENSIONS = ("batch", "channels", "height", "width")
OPT_SIZE = 512  # the default opt H and W: kernels are tuned for the size most often served
# The default profile's max, within the manifest's ranges. A context holds activation memory for
# its profile's largest shape: one 64-channel float32 map at 32 x 2048 x 2048 is 34 GB, at
# 4 x 1024 x 1024 1 GiB. Larger shapes are one --max (or --profile) away.
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_SIZE = 1024


@dataclass(frozen=True)
class Profile:
    min: Shape
    opt: Shape
    max: Shape

    def fields(self) -> tuple[tuple[str, Shape], ...]:
        return (("min", self.min), ("opt", self.opt), ("max", self.max))

    def holds(self, shape: Sequence[int]) -> bool:
        """Whether an input of `shape` lies between min and max in every dimension."""
        return len(shape) == 4 and all(
            lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max, strict=True)
        )

    def describe(self) -> str:
        """MIN:OPT:MAX, the form --profile takes."""
        return ":".join(format_shape(shape) for _, shape in self.fields())

    def to_dict(self) -> dict[str, list[int]]:
        return {name: list(shape) for name, shape in self.fields()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        shapes = (tuple(int(d) for d in data[name]) for name in ("min", "opt", "max"))
        return cls(*shapes)  # type: ignore[arg-type]


def parse_profile(text: str) -> Profile:
    """`MIN:OPT:MAX` (each NxCxHxW) as a Profile; min <= opt <= max is checked by
    validate_profiles, against the artifact."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ConfigError(
            f"--profile {text!r} is not MIN:OPT:MAX; give three NxCxHxW shapes joined by ':', "
            f"such as 1x3x64x64:1x3x512x512:8x3x2048x2048"
        )
    return Profile(*(parse_shape(p, "--profile") for p in parts))


def default_profiles(manifest: Manifest) -> list[Profile]:
    """One profile from the manifest's minimum batch, H and W to at most DEFAULT_MAX_BATCH x C
    x DEFAULT_MAX_SIZE^2 (a GPU holds that), opt at 1 x C x 512 x 512, clamped into the
    manifest's ranges."""
    contract = manifest.contract
    ranges = (contract.batch, contract.height, contract.width)
    unbounded = [
        n for n, r in zip(("batch", "height", "width"), ranges, strict=True) if r.max is None
    ]
    if unbounded:
        raise ConfigError(
            f"{manifest.path.name} sets no upper bound on {unbounded[0]}, and a TensorRT profile "
            f"needs one; give the shapes with --min/--opt/--max or --profile MIN:OPT:MAX"
        )
    c = contract.channels
    return [
        Profile(
            min=(contract.batch.min, c, contract.height.min, contract.width.min),
            opt=(
                contract.batch.clamp(1),
                c,
                contract.height.clamp(OPT_SIZE),
                contract.width.clamp(OPT_SIZE),
            ),
            max=(
                contract.batch.clamp(DEFAULT_MAX_BATCH),
                c,
                contract.height.clamp(DEFAULT_MAX_SIZE),
                contract.width.clamp(DEFAULT_MAX_SIZE),
            ),
        )
    ]


def validate_profiles(profiles: Sequence[Profile], manifest: Manifest) -> None:
    """Raise ConfigError naming the first bad profile and field: each shape NCHW with positive
    whole numbers, the model's channels, min <= opt <= max, inside the manifest's ranges."""
    if not profiles:
        raise ConfigError("no profiles given; leave them out for the artifact's own ranges")
    for index, profile in enumerate(profiles):
        _check(index, profile, manifest)


def _check(index: int, profile: Profile, manifest: Manifest) -> None:
    contract = manifest.contract
    where = f"profile {index} ({_show(profile)})"
    for name, shape in profile.fields():
        if not isinstance(shape, tuple) or len(shape) != 4:
            raise ConfigError(f"{where}: {name} must have 4 dimensions, NxCxHxW; fix that shape")
        if not all(type(d) is int and d > 0 for d in shape):
            raise ConfigError(f"{where}: {name} must be four positive whole numbers")
        if shape[1] != contract.channels:
            raise ConfigError(
                f"{where}: {name} has {shape[1]} channels, {manifest.path.name} takes "
                f"{contract.channels}; use Nx{contract.channels}xHxW"
            )
    for dim, label in enumerate(DIMENSIONS):
        low, opt, high = (shape[dim] for _, shape in profile.fields())
        if not low <= opt <= high:
            raise ConfigError(
                f"{where}: {label} runs min {low}, opt {opt}, max {high}; every dimension needs "
                f"min <= opt <= max"
            )
    sizes = "--min-size/--max-size"
    ranges = (
        (0, contract.batch, "--max-batch"),
        (2, contract.height, sizes),
        (3, contract.width, sizes),
    )
    for dim, allowed, option in ranges:
        for name, shape in profile.fields():
            if shape[dim] not in allowed:
                raise ConfigError(
                    f"{where}: {name} {DIMENSIONS[dim]} {shape[dim]} is outside "
                    f"{manifest.path.name}'s {DIMENSIONS[dim]} range {allowed.describe()}; keep "
                    f"profiles inside it (or re-export with other {option})"
                )


def _show(profile: Profile) -> str:
    try:
        return profile.describe()
    except TypeError:  # a shape that is not a sequence: shown as given
        return repr(profile)


def profile_for(profiles: Sequence[Profile], shape: Sequence[int]) -> int:
    """Index of the first profile whose range holds `shape`; InputContractError naming every
    profile's range when none does."""
    for index, profile in enumerate(profiles):
        if profile.holds(shape):
            return index
    ranges = ", ".join(
        f"{i}: {format_shape(p.min)}..{format_shape(p.max)}" for i, p in enumerate(profiles)
    )
    raise InputContractError(
        f"input shape {format_shape(shape)} is in no profile of this engine ({ranges}); resize "
        f"or split the input into one of them, or rebuild with resfuse-build --profile "
        f"MIN:OPT:MAX covering it"
    )


__all__ = [
    "DIMENSIONS",
    "Profile",
    "default_profiles",
    "parse_profile",
    "profile_for",
    "validate_profiles",
]
