"""OpenVINO: the same ONNX artifact on OpenVINO's CPU plugin, a peer of ONNX Runtime on x86 CPUs."""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any

import numpy as np

from resfuse.artifacts import Manifest
from resfuse.errors import BackendUnavailableError, ConfigError, ModelLoadError
from resfuse.runtime.backends.base import Option, Runner, check_count, one_of, validate_options
from resfuse.runtime.backends.onnxrt import refuse_external_data
from resfuse.runtime.machine import physical_cores

_DEVICES = {"cpu": "CPU"}
_PRECISIONS = ("f32", "bf16")
_HINTS = ("LATENCY", "THROUGHPUT")
# OpenVINO prefixes a message with the source lines it passed through: noise to a user.
_SOURCE_LINES = re.compile(r"(Exception from|Check '.*?' failed at) \S+:\d+:\s*")
_SETTINGS = ("INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT")
OPTIONS = MappingProxyType(
    {
        "precision": Option(
            f"inference precision, one of {_PRECISIONS} (default f32)", one_of(*_PRECISIONS)
        ),
        "threads": Option("INFERENCE_NUM_THREADS (default: physical cores)", check_count),
        "performance_hint": Option(
            f"one of {_HINTS} (default LATENCY: one stream, all threads per call)",
            one_of(*_HINTS),
        ),
    }
)


class OpenVinoRunner(Runner):
    """Options: precision ("f32" or "bf16"), threads, performance_hint; see OPTIONS.

    Each call gets its own InferRequest (creating one costs ~0.04 ms): a request is not safe to
    share between threads, and the compiled model's own `__call__` reuses one, so Session.run
    from many threads would race ("Infer Request is busy")."""

    name = "openvino"
    threaded = True
    declared = OPTIONS

    def __init__(self, manifest: Manifest, device: str = "cpu", **options: Any) -> None:
        validate_options(self.name, options, self.declared)
        if device not in _DEVICES:
            raise ConfigError(
                f"openvino device must be one of {', '.join(_DEVICES)}, not {device!r}; its "
                f"GPU and NPU plugins are not supported by resfuse"
            )
        super().__init__(manifest, device, **options)
        self.compiled: Any = None

    def config(self) -> dict[str, Any]:
        # The precision hint is always explicit: on a CPU with AVX512-BF16 or AMX, OpenVINO
        # otherwise runs bf16 silently, far outside the artifact's float32 tolerance.
        return {
            "INFERENCE_PRECISION_HINT": self.options.get("precision", "f32"),
            "INFERENCE_NUM_THREADS": int(self.options.get("threads") or physical_cores()),
            "PERFORMANCE_HINT": self.options.get("performance_hint", "LATENCY"),
        }

    def activate(self) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendUnavailableError(
                "the openvino backend needs OpenVINO: pip install 'resfuse[openvino]'"
            ) from exc
        core = ov.Core()
        plugin = _DEVICES[self.device]
        if self.options.get("precision") == "bf16":
            _require_bf16(core, plugin)
        name = self.manifest.record("onnx")["path"]
        model = self.manifest.read("onnx")  # OpenVINO parses the very bytes hashed
        refuse_external_data(model, name)
        try:
            # Dynamic batch, H and W stay dynamic: one compiled model serves every shape.
            self.compiled = core.compile_model(core.read_model(model), plugin, self.config())
        except Exception as exc:  # OpenVINO raises RuntimeError and its own OpConversionFailure
            raise ModelLoadError(
                f"OpenVINO refused {name}: {_detail(exc)}; re-export it with resfuse-export"
            ) from exc

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.compiled is None:
            raise RuntimeError("runner used before activate()")
        request = self.compiled.create_infer_request()
        # share_inputs: the call is synchronous, so x outlives it; outputs are copied out of
        # the request's buffers, which the request is free to reuse.
        return request.infer({0: x}, share_inputs=True)[0]

    def deactivate(self) -> None:
        self.compiled = None

    @property
    def precision(self) -> str:
        # The hint governs float math, float16 graphs' included (bf16 is not float16); an INT8
        # artifact's quantized convolutions stay int8.
        floats = ("float32", "float16")
        if self.manifest.precision in floats and self.options.get("precision") == "bf16":
            return "bfloat16"
        return self.manifest.precision

    def describe(self) -> dict[str, Any]:
        """The settings OpenVINO applied, read back from the compiled model; before activate()
        (or after deactivate()), the ones asked for."""
        config = self.config()
        threads, precision, hint = (config[key] for key in _SETTINGS)
        version = None
        if self.compiled is not None:
            import openvino as ov

            threads, precision, hint = (self.compiled.get_property(key) for key in _SETTINGS)
            precision, hint = precision.get_type_name(), str(hint)
            version = ov.get_version()
        return {
            **super().describe(),
            "threads": int(threads),
            "precision": precision,
            "performance_hint": hint,
            "openvino": version,
        }


def _require_bf16(core: Any, plugin: str) -> None:
    """OpenVINO falls back to f32 without a word where the CPU has no bf16 instructions
    (AVX512-BF16 or AMX); asking for bf16 there is refused instead of timed as f32."""
    capabilities = core.get_property(plugin, "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:
        raise ConfigError(
            f"openvino precision 'bf16' needs a CPU with AVX512-BF16 or AMX; this one offers "
            f"{', '.join(capabilities)}; use precision='f32'"
        )


def _detail(exc: Exception) -> str:
    text = " ".join(_SOURCE_LINES.sub("", str(exc)).split())
    return text[:300] or type(exc).__name__
