"""A TensorRT plan from an artifact's verified ONNX bytes: the one module that builds, called by
resfuse.export.engines with the flavour's module (`tensorrt` or `tensorrt_rtx`) once
import_flavour() found it. Both flavours share these calls.

The network is strongly typed: each tensor keeps the type the ONNX graph gives it (float32,
float16 tensors, explicit Q/DQ int8), so the engine's precision is the artifact's and no
precision flag is set. The same calls build on TensorRT 10 (the flag opts in), 11 (every network
is strongly typed; the flag is accepted) and TensorRT-RTX. Objects are typed against
tensorrt-stubs; the module itself is passed in, since it differs by flavour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from resfuse.engine_manifest import BuildSettings
from resfuse.errors import ConfigError, ExportError, ModelLoadError
from resfuse.profiles import Profile

if TYPE_CHECKING:
    import tensorrt as trt

_GIB = 1 << 30


def build_plan(
    lib: Any,
    onnx: bytes,
    input_name: str,
    profiles: Sequence[Profile],
    settings: BuildSettings,
    *,
    timing_cache: bytes | None = None,
    targets: Sequence[str] = (),
) -> tuple[bytes, bytes | None]:
    """The serialized engine and, where `timing_cache` is given, the timing cache after the
    build (it plus the tactics timed now). `targets`: the compute capabilities a TensorRT-RTX
    plan is built for; empty for TensorRT, which builds for its GPU."""
    build = prepare_build(lib, onnx, input_name, profiles, settings, targets=targets)
    if timing_cache is not None:
        _use_timing_cache(build.config, timing_cache)
    plan = build.serialize()
    config = build.config
    timings = None if timing_cache is None else bytes(config.get_timing_cache().serialize())
    return plan, timings


@dataclass
class Build:
    """A network parsed and configured, not yet built: its builder config is what the plan
    will be built with (tests read the flags back from it). The parser is kept: it owns the
    weights the network points to until the build."""

    builder: trt.Builder
    network: trt.INetworkDefinition
    parser: trt.OnnxParser
    config: trt.IBuilderConfig

    def serialize(self) -> bytes:
        plan = self.builder.build_serialized_network(self.network, self.config)
        if plan is None:
            raise ExportError(
                "TensorRT could not build the engine (its log above says why); try a larger "
                "--workspace or a lower --builder-level, or smaller profiles"
            )
        return bytes(plan)


def prepare_build(
    lib: Any,
    onnx: bytes,
    input_name: str,
    profiles: Sequence[Profile],
    settings: BuildSettings,
    *,
    targets: Sequence[str] = (),
) -> Build:
    """The strongly typed network parsed from `onnx`, its profiles and settings set."""
    logger = lib.Logger(lib.Logger.WARNING)
    builder: trt.Builder = lib.Builder(logger)
    network = builder.create_network(1 << int(lib.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser: trt.OnnxParser = lib.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelLoadError(
            f"TensorRT's ONNX parser refused the model ({' '.join(errors.split())[:300]}); "
            f"check the artifact with resfuse-check, or re-export it with another --opset"
        )
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != [input_name]:
        raise ConfigError(
            f"TensorRT refused profiles for input {input_name!r}: the parsed network's inputs "
            f"are {inputs}; re-export the artifact, whose manifest names another input"
        )
    config = builder.create_builder_config()
    for profile in profiles:
        _add_profile(lib, builder, config, input_name, profile)
    _configure(lib, config, settings)
    _target(lib, config, targets)
    return Build(builder, network, parser, config)


def _parser_error(error: trt.ParserError) -> str:
    """The parser's words with the node they are about, when it names one."""
    node = f"{error.node_operator()} node {error.node_name()!r}: " if error.node_name() else ""
    return node + str(error.desc())


def _add_profile(
    lib: Any,
    builder: trt.Builder,
    config: trt.IBuilderConfig,
    name: str,
    profile: Profile,
) -> None:
    """TensorRT's Python bindings raise from set_shape where C++ returns false, and a profile it
    finds invalid makes add_optimization_profile return -1: both become one ConfigError."""
    shapes = [lib.Dims(list(shape)) for _, shape in profile.fields()]
    result = builder.create_optimization_profile()
    try:
        result.set_shape(name, *shapes)
        index = config.add_optimization_profile(result)
    except (RuntimeError, TypeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ConfigError(f"TensorRT refused profile {profile.describe()} ({detail})") from exc
    if index < 0:
        raise ConfigError(
            f"TensorRT refused profile {profile.describe()} for input {name!r} (its log above "
            f"says why); give profiles with min <= opt <= max on the model's input"
        )


def _configure(lib: Any, config: trt.IBuilderConfig, settings: BuildSettings) -> None:
    config.builder_optimization_level = settings.builder_level
    if settings.workspace_gib is not None:
        limit = int(settings.workspace_gib * _GIB)
        config.set_memory_pool_limit(lib.MemoryPoolType.WORKSPACE, limit)
    if settings.hardware_compat == "ampere+":
        config.hardware_compatibility_level = lib.HardwareCompatibilityLevel.AMPERE_PLUS
    if settings.trust_host_code:
        config.set_flag(lib.BuilderFlag.VERSION_COMPATIBLE)
    # TF32 is on by default and rounds float32 products to 10-bit mantissas: float32 tensors
    # compute in float32, as the artifact's parity sweep judged them.
    tf32 = getattr(lib.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)
    # TensorRT-RTX only (TensorRT 10/11 have no such flag): without it, RTX may allocate inside
    # execute_async_v3 when a shape exceeds its static limits, which a CUDA graph cannot
    # capture; with it, every context is user-managed (the runner gives each its memory) and
    # the build fails for a network that cannot be captured, instead of a later capture.
    user_allocation = getattr(lib.BuilderFlag, "REQUIRE_USER_ALLOCATION", None)
    if user_allocation is not None:
        config.set_flag(user_allocation)


def _target(lib: Any, config: Any, targets: Sequence[str]) -> None:
    """TensorRT-RTX: the compute capabilities the plan must run on (checked against the
    flavour's list before the build); the rest of each kernel is compiled on the device."""
    if not targets:
        return
    config.num_compute_capabilities = len(targets)
    for index, target in enumerate(targets):
        member = getattr(lib.ComputeCapability, "SM" + target.replace(".", ""))
        if not config.set_compute_capability(member, index):
            raise ConfigError(f"TensorRT-RTX refused compute capability {target} as a target")


def _use_timing_cache(config: trt.IBuilderConfig, data: bytes) -> None:
    """Load a previous build's timing cache; one from another GPU or TensorRT version, or one
    TensorRT cannot read, is replaced by an empty cache rather than steering tactic choice."""
    cache = config.create_timing_cache(data) if data else None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
