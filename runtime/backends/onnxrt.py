"""ONNX Runtime: CPU, and CUDA or TensorRT execution providers with onnxruntime-gpu."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from resfuse.artifacts import Manifest
from resfuse.contract import InputContract
from resfuse.errors import BackendUnavailableError, ConfigError, ModelLoadError
from resfuse.onnx_wire import WireError, external_tensors, widen_float16
from resfuse.runtime.backends.base import (
    Option,
    Phases,
    Runner,
    check_count,
    check_flag,
    check_path,
    one_of,
    validate_options,
)
from resfuse.runtime.cudart import cuda_device
from resfuse.runtime.machine import fp16_arithmetic, physical_cores

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    # CUDA next to TensorRT takes the nodes TensorRT cannot; CPU takes shape arithmetic.
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_LEVELS = ("disable", "basic", "extended", "all")
_FP16_ARITHMETIC = ("auto", "float32", "native")
OPTIONS = MappingProxyType(
    {
        "threads": Option("intra-op threads (default: physical cores)", check_count),
        "inter_op_threads": Option(
            "inter-op threads (default 1: the graph is one chain)", check_count
        ),
        "optimization": Option(
            f"graph optimisation level, one of {_LEVELS} (default all)", one_of(*_LEVELS)
        ),
        "mem_pattern": Option("reuse a memory plan across calls (default True)", check_flag),
        "spinning": Option(
            "idle threads spin for the next call instead of sleeping (default True, as ORT)",
            check_flag,
        ),
        "fp16_arithmetic": Option(
            "CPU, fp16 artifacts: `float32` widens the graph to float32 at load, `native` runs "
            "ONNX Runtime's float16 kernels where the CPU has them (ARM64 cores with FP16 "
            "arithmetic: outside the gate the artifact was verified to), `auto` widens on such "
            "CPUs only (default auto)",
            one_of(*_FP16_ARITHMETIC),
        ),
        "fp16": Option(
            "TensorRT EP: build float16 engines (default False); TensorRT 10 only; TensorRT 11 "
            "takes precision from the graph: export --precision fp16",
            check_flag,
        ),
        "opt_shape": Option(
            "TensorRT EP: (B, C, H, W) the kernels are tuned for (default 1 x C x 512 x 512)"
        ),
        "cache_dir": Option(
            "TensorRT EP: engine and timing caches (default ~/.cache/resfuse/ort-trt)", check_path
        ),
    }
)


def ep_environment() -> dict[str, str]:
    """What a TensorRT EP engine depends on besides the model: ONNX Runtime's and TensorRT's
    versions, and the name and compute capability of the GPU the EP runs on (device 0, as
    resfuse opens it), from the CUDA driver, not torch ("unknown" where this process cannot
    tell: TensorRT's Python module absent, or no CUDA driver or device)."""
    import onnxruntime as ort

    gpu, cc = cuda_device(0) or ("unknown", "unknown")
    found = {"onnxruntime": ort.__version__, "tensorrt": "unknown", "gpu": gpu, "cc": cc}
    try:  # its Python module may be absent, a stub, or unable to load its libraries
        import tensorrt

        found["tensorrt"] = str(getattr(tensorrt, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - ImportError, OSError from libnvinfer: unknown
        pass
    return found


def _environment_key(environment: dict[str, str]) -> str:
    """A folder name for one environment: readable where it can be, hashed in full."""
    digest = hashlib.sha256(json.dumps(environment, sort_keys=True).encode()).hexdigest()[:12]
    cc = environment.get("cc", "unknown").replace(".", "")
    return f"ort{environment.get('onnxruntime', '?')}-sm{cc}-{digest}"


def tensorrt_provider_options(
    contract: InputContract,
    input_name: str,
    onnx_sha256: str,
    cache_dir: str | Path | None = None,
    fp16: bool = False,
    opt_shape: tuple[int, int, int, int] | None = None,
    int8: bool = False,
    environment: dict[str, str] | None = None,
) -> dict[str, str]:
    """TensorRT EP options: one profile spanning the contract and caches keyed by the model's
    sha256 and by `environment` (ONNX Runtime and TensorRT versions, GPU name and compute
    capability: ep_environment), so neither a changed ONNX file nor an upgrade nor another GPU
    ever meets an engine built for something else (the EP's own file names carry only the
    precision and SM, and a stale engine fails to deserialize). `int8`: the graph is an INT8
    Q/DQ one, which TensorRT 10 runs in int8 only with trt_int8_enable."""
    low = (contract.batch.min, contract.channels, contract.height.min, contract.width.min)
    high = (contract.batch.max, contract.channels, contract.height.max, contract.width.max)
    if None in high:
        raise ConfigError("the TensorRT EP needs an upper bound on batch, height and width")
    opt = opt_shape or (
        1,
        contract.channels,
        *(r.clamp(512) for r in (contract.height, contract.width)),
    )
    if not all(lo <= o <= hi for lo, o, hi in zip(low, opt, high, strict=True)):  # type: ignore[operator]
        raise ConfigError(f"opt_shape {tuple(opt)} is outside the profile {low}..{high}")
    root = Path(cache_dir or Path.home() / ".cache" / "resfuse" / "ort-trt") / onnx_sha256[:16]
    root = root / _environment_key(environment or ep_environment())

    def dims(shape: tuple[Any, ...]) -> str:
        return f"{input_name}:{'x'.join(str(d) for d in shape)}"

    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(root / "engines"),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(root / "timing"),
        "trt_fp16_enable": "True" if fp16 else "False",
        "trt_int8_enable": "True" if int8 else "False",
        "trt_profile_min_shapes": dims(low),
        "trt_profile_opt_shapes": dims(opt),
        "trt_profile_max_shapes": dims(high),
    }


def require_provider(wanted: str, got: list[str]) -> None:
    """ONNX Runtime skips an execution provider that fails to start (a missing CUDA, cuDNN or
    TensorRT library), or rebuilds the session on the next ones, and only logs it: a session
    that does not lead with the provider asked for would time or check the wrong device."""
    if got[:1] != [wanted]:
        libraries = (
            "CUDA, cuDNN and TensorRT" if wanted == _PROVIDERS["tensorrt"][0] else "CUDA and cuDNN"
        )
        raise BackendUnavailableError(
            f"ONNX Runtime could not start {wanted}: the session got "
            f"{', '.join(got) or 'no provider'}; check that the {libraries} libraries it "
            f"needs are on the library path (LD_LIBRARY_PATH), or use another --device"
        )


def tensorrt_major() -> int | None:
    """The major version of the tensorrt module, None without one. pip's tensorrt installs the
    bindings with the libnvinfer ONNX Runtime's EP loads, so it stands for the EP's TensorRT.
    tensorrt-stubs alone leave an empty namespace package with no Builder: that is none."""
    try:
        import tensorrt
    except (ImportError, OSError):  # OSError: the bindings without their libnvinfer
        return None
    if not hasattr(tensorrt, "Builder"):
        return None
    return int(tensorrt.__version__.split(".")[0])


def refuse_external_data(model: bytes, name: str) -> None:
    """resfuse artifacts are one self-contained .onnx file; a graph that points at external
    data files would read files the manifest never hashed, so it is refused. Read from the
    protobuf wire format (resfuse.onnx_wire): the base install has no `onnx` package."""
    try:
        external = external_tensors(model)
    except WireError as exc:
        raise ModelLoadError(f"{name} is not an ONNX model ({exc}); re-export it") from exc
    if external:
        raise ModelLoadError(
            f"{name} keeps tensors in external data files, which resfuse does not load (they "
            f"would escape the manifest's sha256); re-export it as one file with resfuse-export"
        )


def _off_target(manifest: Manifest, device: str) -> str:
    """Why an artifact does not run on `device`, and what does."""
    made_for = ", ".join(manifest.targets)
    if manifest.precision == "int8" and "tensorrt" not in manifest.targets:  # uint8 INT8
        return (
            f"{manifest.path.name} is made for {made_for}, not {device!r}: its INT8 activations "
            f"are uint8 (asymmetric), a CPU scheme, and TensorRT does not take them; export the "
            f"GPU variant with resfuse-export --precision int8 --target tensorrt, or run this "
            f"one with device='cpu'"
        )
    return (
        f"{manifest.path.name} ({manifest.precision}) is made for {made_for}, not "
        f"{device!r}; run it with device={manifest.targets[0]!r}, or export one for {device}"
    )


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"
    threaded = True
    quiet = MappingProxyType({"spinning": False})  # spinning threads hold their cores
    declared = OPTIONS

    def __init__(self, manifest: Manifest, device: str = "cpu", **options: Any) -> None:
        validate_options(self.name, options, self.declared)
        if device not in _PROVIDERS:
            raise ConfigError(
                f"onnxruntime device must be one of {', '.join(_PROVIDERS)}, not {device!r}"
            )
        if device not in manifest.targets:
            raise ConfigError(_off_target(manifest, device))
        super().__init__(manifest, device, **options)
        self.session: Any = None

    def session_options(self) -> Any:
        import onnxruntime as ort

        level = ort.GraphOptimizationLevel
        levels = dict(
            zip(
                _LEVELS,
                (
                    level.ORT_DISABLE_ALL,
                    level.ORT_ENABLE_BASIC,
                    level.ORT_ENABLE_EXTENDED,
                    level.ORT_ENABLE_ALL,
                ),
                strict=True,
            )
        )
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[self.options.get("optimization", "all")]
        so.intra_op_num_threads = int(self.options.get("threads") or physical_cores())
        so.inter_op_num_threads = int(self.options.get("inter_op_threads", 1))
        so.enable_mem_pattern = bool(self.options.get("mem_pattern", True))
        # Spinning threads answer the next call sooner but keep their cores busy between calls,
        # slowing whatever else runs there (another backend timed beside this one).
        spinning = "1" if self.options.get("spinning", True) else "0"
        for pool in ("intra_op", "inter_op"):
            so.add_session_config_entry(f"session.{pool}.allow_spinning", spinning)
        so.log_severity_level = 3  # errors only: no per-shape warnings on the terminal
        return so

    def providers(self) -> list[Any]:
        if self.device != "tensorrt":
            return list(_PROVIDERS[self.device])
        trt = tensorrt_provider_options(
            self.manifest.contract,
            self.manifest.input_name,
            self.manifest.record("onnx")["sha256"],
            self.options.get("cache_dir"),
            bool(self.options.get("fp16", False)),
            self.options.get("opt_shape"),
            int8=self.manifest.precision == "int8",
        )
        for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
            os.makedirs(trt[key], exist_ok=True)
        return [("TensorrtExecutionProvider", trt), *_PROVIDERS["cuda"]]

    def activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(
                "the onnxruntime backend needs ONNX Runtime: pip install onnxruntime "
                "(or onnxruntime-gpu for CUDA/TensorRT, never both)"
            ) from exc
        wanted = _PROVIDERS[self.device][0]
        if wanted not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"onnxruntime {ort.__version__} here has no {wanted} (it has "
                f"{', '.join(ort.get_available_providers())}); for device {self.device!r} "
                f"install onnxruntime-gpu in place of onnxruntime: pip uninstall -y onnxruntime "
                f"&& pip install onnxruntime-gpu"
            )
        model = self.manifest.read("onnx")  # ONNX Runtime parses the very bytes hashed
        refuse_external_data(model, self.manifest.record("onnx")["path"])
        if self.widens_float16:
            model = widen_float16(model)
        self.session = self.open_session(model)
        self._input = self.session.get_inputs()[0].name

    def open_session(self, model: bytes) -> Any:
        """An InferenceSession that runs on the device's provider, never on a fallback."""
        import onnxruntime as ort

        try:
            # The constructor's retry on the next providers stays on: a provider that fails to
            # start then meets require_provider's error, not a ModelLoadError blaming the model.
            session = ort.InferenceSession(model, self.session_options(), self.providers())
        except Exception as exc:  # ONNX Runtime raises its own Fail/InvalidGraph/... classes
            detail = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ModelLoadError(
                f"ONNX Runtime refused {self.manifest.record('onnx')['path']}: {detail}; "
                f"re-export it with resfuse-export"
            ) from exc
        require_provider(_PROVIDERS[self.device][0], session.get_providers())
        session.disable_fallback()  # nor may a run() that fails move the session to the CPU
        return session

    @property
    def _float16_on_cpu(self) -> bool:
        """A float16 graph on the CPU provider: what fp16_arithmetic is about."""
        return self.device == "cpu" and self.manifest.precision == "float16"

    @property
    def widens_float16(self) -> bool:
        """Whether a float16 graph runs widened to float32. The fp16 variant is verified on ONNX
        Runtime's CPU provider where it computes in float32 (x86: casts around the float16 nodes,
        then weights rounded to float16 are the only error). On a core with FP16 arithmetic (a
        Cortex-A76) its float16 kernels accumulate in float16 instead: rel L2 6e-3 to 8e-3 off
        PyTorch, over the 5e-3 gate (docs/edge.md), and no session option turns them off. Widened,
        the graph computes in float32, as x86 computes most of it (masked: 4e-7 apart on x86
        itself, spp 1.4e-4), at the float32 graph's speed."""
        if not self._float16_on_cpu:
            return False
        mode = self.options.get("fp16_arithmetic", "auto")
        return mode == "float32" or (mode == "auto" and fp16_arithmetic())

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise RuntimeError("runner used before activate()")
        return self.session.run(None, {self._input: x})[0]

    def infer_timed(self, x: np.ndarray) -> tuple[np.ndarray, Phases]:
        """On a GPU, IO binding splits the call: copy in, run (ONNX Runtime synchronises the
        execution providers at the end of a run), copy out. On the CPU it is one span."""
        if self.device == "cpu":
            return super().infer_timed(x)
        import onnxruntime as ort

        t0 = time.perf_counter()
        device_input = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self._input, device_input)
        binding.bind_output(self.session.get_outputs()[0].name, "cuda")
        t1 = time.perf_counter()
        self.session.run_with_iobinding(binding)
        t2 = time.perf_counter()
        out = binding.copy_outputs_to_cpu()[0]
        t3 = time.perf_counter()
        return out, Phases((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)

    def deactivate(self) -> None:
        self.session = None

    @property
    def precision(self) -> str:
        # TensorRT 10 picks float16 kernels where it finds them faster; TensorRT 11 ignores
        # trt_fp16_enable and takes precision from the graph, as does an unknown TensorRT.
        lowers = self.manifest.precision == "float32"  # int8 and float16 graphs stay what they are
        if self.device == "tensorrt" and self.options.get("fp16") and lowers:
            major = tensorrt_major()
            if major is not None and major <= 10:
                return "float16"
        return self.manifest.precision

    def describe(self) -> dict[str, Any]:
        # An active session reports the options ONNX Runtime holds, not the ones asked for.
        so = self.session.get_session_options() if self.session else self.session_options()
        return {
            **super().describe(),
            "threads": so.intra_op_num_threads,
            "optimization": self.options.get("optimization", "all"),
            "mem_pattern": so.enable_mem_pattern,
            "spinning": so.get_session_config_entry("session.intra_op.allow_spinning") == "1",
            "providers": self.session.get_providers() if self.session else _PROVIDERS[self.device],
            **self._fp16_arithmetic(),
        }

    def _fp16_arithmetic(self) -> dict[str, str]:
        """What a float16 graph computes in on the CPU (nothing for other graphs and devices)."""
        if not self._float16_on_cpu:
            return {}
        if self.widens_float16:
            return {"fp16_arithmetic": "float32 (widened at load)"}
        native = fp16_arithmetic()
        said = "float16 (its float16 kernels)" if native else "float32 (after casts)"
        return {"fp16_arithmetic": said}
