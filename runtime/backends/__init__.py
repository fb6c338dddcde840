"""Backends by name: each a Runner class that declares what commands need to know of it
(threaded, runs_original, quiet, claim). Its module imports its heavy library (onnxruntime,
openvino, tensorrt) only when a runner is activated, so the registry holds the classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resfuse.artifacts import Manifest
from resfuse.errors import ConfigError
from resfuse.runtime.backends.base import Claim, Phases, Runner
from resfuse.runtime.backends.onnxrt import OnnxRuntimeRunner
from resfuse.runtime.backends.openvino import OpenVinoRunner
from resfuse.runtime.backends.pyt import CompiledTorchRunner, TorchRunner
from resfuse.runtime.backends.tensorrt import TensorRTRunner

BACKENDS: dict[str, type[Runner]] = {
    runner.name: runner
    for runner in (
        TorchRunner,
        CompiledTorchRunner,
        OnnxRuntimeRunner,
        OpenVinoRunner,
        TensorRTRunner,
    )
}


def threaded() -> list[str]:
    """The backends that take a CPU thread count (`threads`, --threads)."""
    return [name for name, runner in BACKENDS.items() if runner.threaded]


def runs_original(name: str) -> bool:
    """Whether backend `name` runs the PyTorch original rather than the artifact; False for a
    name no backend has (the backend refuses it when loaded)."""
    runner = BACKENDS.get(name)
    return runner is not None and runner.runs_original


def quiet_options(name: str) -> dict[str, Any]:
    """The options that keep backend `name` quiet between its calls (none for an unknown one)."""
    runner = BACKENDS.get(name)
    return dict(runner.quiet) if runner is not None else {}


def claimed(path: str | Path) -> Claim | None:
    """The claim of the backend that alone runs `path` (an engine file); None for an artifact."""
    claims = (runner.claim(path) for runner in BACKENDS.values())
    return next((claim for claim in claims if claim is not None), None)


def create_runner(backend: str, manifest: Manifest, device: str, **options: Any) -> Runner:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[backend](manifest, device, **options)


__all__ = [
    "BACKENDS",
    "Claim",
    "Phases",
    "Runner",
    "claimed",
    "create_runner",
    "quiet_options",
    "runs_original",
    "threaded",
]
