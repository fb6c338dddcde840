"""What a TensorRT plan is bound to: the flavour that built it, its version, CUDA, the platform
and the GPUs it targets; and the rules for where a plan may run.

Two flavours share one builder API (resfuse.export.tensorrt_build):
- `tensorrt` (TensorRT 10/11): builds on the GPU it targets, timing caches, version-compatible
  plans (with host code) and `ampere+` hardware compatibility;
- `tensorrt-rtx` (TensorRT for RTX): builds ahead of time with no GPU for a list of compute
  capabilities; kernels are finished just in time on the device and kept in a runtime cache.
What each flavour can do lives in its Flavour entry; the rest of resfuse asks it, never the name.
"""

from __future__ import annotations

import functools
import importlib
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from resfuse.artifacts import Manifest
from resfuse.errors import BackendUnavailableError, ConfigError
from resfuse.torch_extra import require_torch

_TEGRA_RELEASE = "/etc/nv_tegra_release"  # Jetson and DRIVE boards (L4T) carry this file


@dataclass(frozen=True)
class Flavour:
    """One TensorRT flavour: its module, and what its builder can and cannot do."""

    name: str  # as --engine and the engine manifest spell it
    module: str  # the Python module
    label: str
    install: str  # what to install, for the error that says it is missing
    min_major: int
    needs_gpu_to_build: bool
    timing_cache: bool
    host_code: bool  # version-compatible plans, which embed a lean runtime
    hardware_compat: bool  # `ampere+` plans for several GPU generations
    targets: tuple[str, ...] = ()  # compute capabilities it builds for without a GPU
    default_targets: tuple[str, ...] = ()


FLAVOURS = {
    "tensorrt": Flavour(
        name="tensorrt",
        module="tensorrt",
        label="TensorRT",
        install="pip install 'resfuse[gpu]' (tensorrt>=10.1) on a machine with an NVIDIA GPU",
        min_major=10,
        needs_gpu_to_build=True,
        timing_cache=True,
        host_code=True,
        hardware_compat=True,
    ),
    "tensorrt-rtx": Flavour(
        name="tensorrt-rtx",
        module="tensorrt_rtx",
        label="TensorRT-RTX",
        install="pip install 'resfuse[rtx]' (tensorrt-rtx-cu12)",
        min_major=1,
        needs_gpu_to_build=False,
        timing_cache=False,  # deprecated there: kernels are compiled on the device instead
        host_code=False,  # a version-compatible build fails: it ships no lean runtime
        hardware_compat=False,  # `ampere+` is accepted and ignored with a warning
        targets=("7.5", "8.0", "8.6", "8.9", "12.0", "12.1"),
        default_targets=("8.6", "8.9", "12.0"),  # NVIDIA's portable default set
    ),
}


def flavour(name: str) -> Flavour:
    if name not in FLAVOURS:
        raise ConfigError(f"--engine {name!r} is not one of {', '.join(FLAVOURS)}")
    return FLAVOURS[name]


def import_flavour(entry: Flavour) -> Any:
    """The flavour's module, or BackendUnavailableError naming what to install. tensorrt-stubs
    alone leave an empty `tensorrt` namespace package that imports: that is no TensorRT."""
    try:
        module = importlib.import_module(entry.module)
    except (ImportError, OSError) as exc:  # OSError: the bindings without their libraries
        reason = " ".join(str(exc).split())[:160]
    else:
        if not hasattr(module, "Builder"):
            reason = "only its type stubs are installed"
        elif _major(module.__version__) < entry.min_major:
            reason = f"version {module.__version__} is older than {entry.min_major}"
        else:
            return module
    raise BackendUnavailableError(
        f"{entry.label} is not installed ({reason}); {entry.install}, or choose another "
        f"--engine ({', '.join(FLAVOURS)})"
    )


def _major(version: str) -> int:
    return int(version.split(".")[0])


def installed_flavours() -> list[str]:
    """The flavours that import here, TensorRT first."""
    found = []
    for entry in FLAVOURS.values():
        try:
            import_flavour(entry)
        except BackendUnavailableError:
            continue
        found.append(entry.name)
    return found


def default_flavour() -> Flavour:
    """TensorRT where it is installed, else TensorRT-RTX; neither: one line naming both."""
    found = installed_flavours()
    if not found:
        raise BackendUnavailableError(
            "neither TensorRT nor TensorRT-RTX is installed; pip install 'resfuse[rtx]' builds "
            "engines for RTX GPUs on any machine, pip install 'resfuse[gpu]' (tensorrt>=10.1) "
            "builds on the NVIDIA GPU that will run them"
        )
    return FLAVOURS[found[0]]


def resolve(name: str | None) -> Flavour:
    return default_flavour() if name is None else flavour(name)


# --- what a plan is bound to ------------------------------------------------------------------


@dataclass(frozen=True)
class BuildEnvironment:
    """What a plan is bound to besides its inputs. For a plan, `compute_capability` lists the
    capabilities it targets ("9.0" for a TensorRT build on an H100, "8.6,8.9,12.0" for a
    portable TensorRT-RTX build) and `gpu_name` the GPU it was built on, if it was; for a
    machine that runs plans, its GPU."""

    flavour: str
    tensorrt_version: str
    cuda_version: str  # the CUDA that this TensorRT was built against
    platform: str  # OS and architecture, "-tegra" for Jetson and DRIVE
    gpu_name: str
    compute_capability: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @property
    def capabilities(self) -> tuple[str, ...]:
        return tuple(self.compute_capability.split(","))


LABELS = {
    "flavour": "flavour",
    "tensorrt_version": "TensorRT",
    "cuda_version": "CUDA",
    "platform": "platform",
    "gpu_name": "GPU",
    "compute_capability": "compute capability",
}
ANY_GPU = "any GPU of its compute capabilities"


def this_platform() -> str:
    """linux-x86_64, linux-aarch64, linux-aarch64-tegra (Jetson, DRIVE), win32-amd64..."""
    name = f"{sys.platform}-{platform.machine().lower()}"
    return f"{name}-tegra" if os.path.exists(_TEGRA_RELEASE) else name


def tensorrt_cuda(entry: Flavour) -> str:
    """The CUDA major version this flavour's wheels were built for (tensorrt-cu12,
    tensorrt_rtx_cu12_bindings...), or "unknown" for an install without pip metadata."""
    for dist in metadata.packages_distributions().get(entry.module, []):
        found = re.search(r"cu(\d+)", dist)
        if found:
            return found.group(1)
    return "unknown"


@functools.lru_cache(maxsize=2)
def current_environment(name: str | None = None) -> BuildEnvironment:
    """This machine as a place that runs (or, for TensorRT, builds) plans: the flavour, its
    version and CUDA, the platform and the current CUDA device. Read once per process."""
    entry = resolve(name)
    module = import_flavour(entry)
    gpu_name, capability = _cuda_device()
    return BuildEnvironment(
        entry.name, str(module.__version__), tensorrt_cuda(entry), this_platform(),
        gpu_name, capability,
    )  # fmt: skip


def build_environment(entry: Flavour, targets: tuple[str, ...] | None = None) -> BuildEnvironment:
    """What a build binds its plan to. TensorRT builds for the GPU it runs on; TensorRT-RTX for
    `targets` (default: this machine's GPU where there is one, else NVIDIA's portable set), on
    any machine, so its key holds the targets and no GPU."""
    if entry.needs_gpu_to_build:
        if targets:
            raise ConfigError(
                f"--compute-capability is for TensorRT-RTX: {entry.label} builds for the GPU it "
                f"runs on; leave it out, or build with --engine tensorrt-rtx"
            )
        return current_environment(entry.name)
    targets = targets or _local_target() or entry.default_targets
    check_targets(entry, targets)
    module = import_flavour(entry)
    return BuildEnvironment(
        entry.name, str(module.__version__), tensorrt_cuda(entry), this_platform(), ANY_GPU,
        ",".join(targets),
    )  # fmt: skip


def parse_targets(text: str | None) -> tuple[str, ...] | None:
    """`8.6,8.9,12.0` as a tuple (checked against a flavour by check_targets); None for None."""
    if text is None:
        return None
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts or not all(re.fullmatch(r"\d+\.\d+", p) for p in parts):
        raise ConfigError(
            f"--compute-capability {text!r} is not a list of MAJOR.MINOR capabilities; give "
            f"e.g. 8.6,8.9,12.0"
        )
    return parts


def check_targets(entry: Flavour, targets: tuple[str, ...]) -> None:
    unknown = [t for t in targets if t not in entry.targets]
    if unknown or len(set(targets)) != len(targets):
        what = f"compute capability {unknown[0]}" if unknown else "a repeated capability"
        raise ConfigError(
            f"{entry.label} cannot target {what}; it builds for {', '.join(entry.targets)} "
            f"(data-centre GPUs such as 9.0 need --engine tensorrt)"
        )


def _local_target() -> tuple[str, ...]:
    try:
        return (_cuda_device()[1],)
    except BackendUnavailableError:
        return ()


def _cuda_device() -> tuple[str, str]:
    """(GPU name, compute capability) of torch's current CUDA device; without torch (the base
    install), a TorchMissingError, a BackendUnavailableError: no GPU torch could see."""
    require_torch("resfuse's TensorRT path (torch finds the GPU and holds its memory)")
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "no CUDA GPU is visible to torch; install a CUDA build of torch and check "
            "nvidia-smi and CUDA_VISIBLE_DEVICES"
        )
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


# --- where a plan runs ------------------------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def mismatch(
    built: BuildEnvironment, here: BuildEnvironment, host_code: bool, hardware_compat: str
) -> str | None:
    """How a plan built for `built` cannot run `here`, the first field named; None if it can.
    Version-compatible plans (host code) run on a later TensorRT of the same major version (or
    10 -> 11) and need only the same CUDA major; `ampere+` plans run on compute capability 8.0
    and later, except Jetson and DRIVE; a TensorRT-RTX plan runs on any of its targets."""
    ok = {name: getattr(built, name) == getattr(here, name) for name in LABELS}
    if host_code:
        old, new = _version(built.tensorrt_version), _version(here.tensorrt_version)
        ok["tensorrt_version"] = new >= old and (
            new[:1] == old[:1] or (old[:1], new[:1]) == ((10,), (11,))
        )
        ok["cuda_version"] = _version(built.cuda_version)[:1] == _version(here.cuda_version)[:1]
    if hardware_compat == "ampere+":
        problem = _ampere_plus(here)
        if problem:
            return problem
        ok["gpu_name"] = ok["compute_capability"] = True
    if built.gpu_name == ANY_GPU:
        ok["gpu_name"] = True
        ok["compute_capability"] = here.compute_capability in (
            *built.capabilities,
            built.compute_capability,  # `here` is a build target itself: the same list
        )
    for name, label in LABELS.items():
        if not ok[name]:
            return (
                f"engine built for {label} {getattr(built, name)}, this machine has "
                f"{getattr(here, name)}"
            )
    return None


def _ampere_plus(here: BuildEnvironment) -> str | None:
    if here.platform.endswith("-tegra"):
        return (
            f"engine built with hardware compat ampere+, which NVIDIA does not support on "
            f"Jetson or DRIVE ({here.platform})"
        )
    if _version(here.compute_capability) < (8, 0):
        return (
            f"engine built for GPUs of compute capability 8.0 and later (hardware compat "
            f"ampere+), this machine's {here.gpu_name} has {here.compute_capability}"
        )
    return None


def check_tensorrt_target(manifest: Manifest) -> None:
    """Refuse an artifact whose manifest leaves TensorRT out of its targets (older manifests
    have none: their INT8 graphs have uint8 activations, a CPU scheme)."""
    if "tensorrt" not in manifest.targets:
        int8 = manifest.precision == "int8"
        why = ": its INT8 activations are uint8, TensorRT's are symmetric int8" if int8 else ""
        raise ConfigError(
            f"{manifest.path.name} ({manifest.precision}) is made for "
            f"{', '.join(manifest.targets)}, not TensorRT{why}; export one with resfuse-export "
            f"--precision int8 --target tensorrt, or build from the float32 artifact"
        )
