"""The runner life cycle every backend follows (as in Polygraphy): activate, infer, deactivate."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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


def reject_unknown(backend: str, options: dict[str, Any], known: Iterable[str]) -> None:
    """One-line ConfigError naming options a backend does not take, and those it does."""
    known = list(known)
    unknown = set(options) - set(known)
    if unknown:
        raise ConfigError(f"unknown {backend} options {sorted(unknown)}; known: {', '.join(known)}")


class Runner(ABC):
    """Runs one artifact on one backend. `infer` takes and returns host float32 NCHW arrays that
    the Session has already checked against the manifest's contract."""

    name = ""

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
