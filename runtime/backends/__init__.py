"""Backends by name. Each module imports its heavy library only when a runner is activated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from resfuse.artifacts import Manifest
from resfuse.errors import ConfigError
from resfuse.runtime.backends.base import Phases, Runner


def _torch(manifest: Manifest, device: str, **options: Any) -> Runner:
    from resfuse.runtime.backends.pyt import TorchRunner

    return TorchRunner(manifest, device, **options)


def _torch_compile(manifest: Manifest, device: str, **options: Any) -> Runner:
    from resfuse.runtime.backends.pyt import CompiledTorchRunner

    return CompiledTorchRunner(manifest, device, **options)


def _onnxruntime(manifest: Manifest, device: str, **options: Any) -> Runner:
    from resfuse.runtime.backends.onnxrt import OnnxRuntimeRunner

    return OnnxRuntimeRunner(manifest, device, **options)


def _openvino(manifest: Manifest, device: str, **options: Any) -> Runner:
    from resfuse.runtime.backends.openvino import OpenVinoRunner

    return OpenVinoRunner(manifest, device, **options)


def _tensorrt(manifest: Manifest, device: str, **options: Any) -> Runner:
    from resfuse.runtime.backends.tensorrt import TensorRTRunner

    return TensorRTRunner(manifest, device, **options)


BACKENDS: dict[str, Callable[..., Runner]] = {
    "torch": _torch,
    "torch-compile": _torch_compile,
    "onnxruntime": _onnxruntime,
    "openvino": _openvino,
    "tensorrt": _tensorrt,
}
# Backends that take a CPU thread count (`threads`, --threads); TensorRT runs on the GPU.
THREADED = ("torch", "torch-compile", "onnxruntime", "openvino")


def create_runner(backend: str, manifest: Manifest, device: str, **options: Any) -> Runner:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[backend](manifest, device, **options)


__all__ = ["BACKENDS", "THREADED", "Phases", "Runner", "create_runner"]
