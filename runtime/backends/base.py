"""The runner life cycle every backend follows (as in Polygraphy): activate, infer, deactivate."""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from resfuse.artifacts import Manifest
from resfuse.errors import ConfigError
from resfuse.profiles import DEFAULT_MAX_BATCH, OPT_SIZE


@dataclass(frozen=True)
class Phases:
    """Milliseconds of one call; copies are 0 where input and output already live on the host."""

    h2d_ms: float
    compute_ms: float
    d2h_ms: float

    @property
    def total_ms(self) -> float:
        return self.h2d_ms + self.compute_ms + self.d2h_ms


def reject_unknown(backend: str, options: Mapping[str, Any], known: Iterable[str]) -> None:
    """One-line ConfigError naming options a backend does not take, and those it does."""
    known = list(known)
    unknown = set(options) - set(known)
    if unknown:
        raise ConfigError(f"unknown {backend} options {sorted(unknown)}; known: {', '.join(known)}")


Check = Callable[[str, str, object, str], None]  # (backend, key, value, its help) -> or raise


@dataclass(frozen=True)
class Option:
    """One option a backend takes: what it does and its default (`help`, which README's table
    of backend options lists and errors quote), and its check (None: the runner checks it)."""

    help: str
    check: Check | None = None


def validate_options(
    backend: str, options: Mapping[str, Any], declared: Mapping[str, Option]
) -> None:
    """ConfigError naming the first option `backend` does not take or whose value does not fit
    its declaration."""
    reject_unknown(backend, options, declared)
    for key, value in options.items():
        check = declared[key].check
        if check is not None:
            check(backend, key, value, declared[key].help)


def check_flag(backend: str, key: str, value: object, help: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{backend} option {key} must be True or False, not {value!r}")


def check_path(backend: str, key: str, value: object, help: str) -> None:
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{backend} option {key} must be a path, not {value!r}")


def one_of(*allowed: str) -> Check:
    def check(backend: str, key: str, value: object, help: str) -> None:
        if value not in allowed:
            raise ConfigError(f"{backend} option {key} must be one of {allowed}, not {value!r}")

    return check


def check_count(backend: str, key: str, value: object, default: str) -> None:
    """A count option (threads, inter_op_threads): a whole number >= 1, or None for `default`
    (the option's help). bool is an int to Python, but threads=True is a mistake, not 1
    thread."""
    if value is None or (
        isinstance(value, Integral) and not isinstance(value, bool) and int(value) >= 1
    ):
        return
    raise ConfigError(
        f"{backend} option {key} must be a whole number >= 1, got {value!r} ({key}={value!r} is "
        f"not a whole number >= 1); pass {key}=1 or more, or leave it out for the default "
        f"({default})"
    )


@dataclass(frozen=True)
class Claim:
    """A file that only one backend runs (a TensorRT engine), and the artifact beside it whose
    manifest holds the contract and preprocessing the Session applies."""

    backend: str
    what: str  # "a TensorRT engine": what the file is, for the message refusing other backends
    path: Path  # the file claimed
    artifact: Path  # the artifact's manifest, loaded in its place
    options: Mapping[str, Any] = field(default_factory=dict)  # make the backend run `path`


class Runner(ABC):
    """Runs one artifact on one backend. `infer` takes and returns host float32 NCHW arrays that
    the Session has already checked against the manifest's contract."""

    name = ""
    # What a command knows of a backend before it runs one, read from the registry (BACKENDS),
    # so that a new backend is declared once, here on its class:
    threaded: ClassVar[bool] = False  # takes a CPU thread count: option `threads`, --threads
    runs_original: ClassVar[bool] = False  # runs the PyTorch original (float32), not the artifact
    # Options that keep its idle threads from running between its calls, so that they take no
    # cores from the backend timed next (resfuse-bench sets them when it times several).
    quiet: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    # The options it takes (validate_options checks them; README's table lists them).
    declared: ClassVar[Mapping[str, Option]] = MappingProxyType({})

    @classmethod
    def claim(cls, path: str | Path) -> Claim | None:
        """The Claim when `path` is a file only this backend runs (not an artifact); else None."""
        return None

    @classmethod
    def require_shapes(cls, count: int) -> None:
        """Refuse to be timed on `count` shapes in one run where its figures would mislead."""
        return None  # most backends time any number of shapes alike

    def __init__(self, manifest: Manifest, device: str, **options: Any) -> None:
        self.manifest = manifest
        self.device = device
        self.options = options

    @abstractmethod
    def activate(self) -> None: ...

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray: ...

    def infer_timed(self, x: np.ndarray) -> tuple[np.ndarray, Phases]:
        """One call with its time split into copies and compute where the backend can tell."""
        start = time.perf_counter()
        out = self.infer(x)
        return out, Phases(0.0, (time.perf_counter() - start) * 1e3, 0.0)

    @abstractmethod
    def deactivate(self) -> None:
        """Release the model or session; `activate` may be called again afterwards."""

    def accepts(self, height: int, width: int) -> bool:
        """Whether one call takes an input of this H x W (the artifact's range)."""
        contract = self.manifest.contract
        return height in contract.height and width in contract.width

    def default_tile(self) -> tuple[tuple[int, int], int]:
        """The tile (H, W) and tiles per call that tiled inference uses unless told: the size
        engines are tuned for, within the artifact's range, a few tiles at a time."""
        contract = self.manifest.contract
        roi = (contract.height.clamp(OPT_SIZE), contract.width.clamp(OPT_SIZE))
        return roi, contract.batch.clamp(DEFAULT_MAX_BATCH)

    @property
    def precision(self) -> str:
        """The precision the backend computes in: the artifact's, unless the backend lowers it
        (OpenVINO bf16, TensorRT fp16 engines) or runs the float32 original (torch)."""
        return self.manifest.precision

    def describe(self) -> dict[str, Any]:
        """Settings that matter for reading its numbers (threads, providers...)."""
        return {"backend": self.name, "device": self.device}
