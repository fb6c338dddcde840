"""A TensorRT plan from an artifact's verified ONNX bytes: the one module that imports tensorrt
to build, and only resfuse.export.engines imports it, after import_tensorrt() found the library.

The network is strongly typed: each tensor keeps the type the ONNX graph gives it (float32,
float16 tensors, explicit Q/DQ int8), so the engine's precision is the artifact's and no
precision flag is set. The same calls build on TensorRT 10 (the flag opts in) and 11 (every
network is strongly typed; the flag is accepted). Type-checked against tensorrt-stubs.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorrt as trt

from resfuse.errors import ExportError, ModelLoadError
from resfuse.export.engines import BuildSettings
from resfuse.export.profiles import Profile

_GIB = 1 << 30


def build_plan(
    onnx: bytes,
    input_name: str,
    profiles: Sequence[Profile],
    settings: BuildSettings,
    timing_cache: bytes | None = None,
) -> tuple[bytes, bytes]:
    """The serialized engine and the timing cache after the build (`timing_cache` plus the
    tactics timed now)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ModelLoadError(
            f"TensorRT's ONNX parser refused the model ({' '.join(errors.split())[:300]}); "
            f"check the artifact with resfuse-check, or re-export it with another --opset"
        )
    config = builder.create_builder_config()
    for profile in profiles:
        config.add_optimization_profile(_profile(builder, input_name, profile))
    _configure(config, settings)
    _use_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(
            "TensorRT could not build the engine (its log above says why); try a larger "
            "--workspace or a lower --builder-level, or smaller profiles"
        )
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def _profile(builder: trt.Builder, name: str, profile: Profile) -> trt.IOptimizationProfile:
    shapes = (trt.Dims(list(shape)) for _, shape in profile.fields())
    result = builder.create_optimization_profile()
    result.set_shape(name, *shapes)
    return result


def _configure(config: trt.IBuilderConfig, settings: BuildSettings) -> None:
    config.builder_optimization_level = settings.builder_level
    if settings.workspace_gib is not None:
        limit = int(settings.workspace_gib * _GIB)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, limit)
    if settings.hardware_compat == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if settings.trust_host_code:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    # TF32 is on by default and rounds float32 products to 10-bit mantissas: float32 tensors
    # compute in float32, as the artifact's parity sweep judged them.
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)


def _use_timing_cache(config: trt.IBuilderConfig, data: bytes | None) -> None:
    """Load a previous build's timing cache; one from another GPU or TensorRT version, or one
    TensorRT cannot read, is replaced by an empty cache rather than steering tactic choice."""
    cache = config.create_timing_cache(data) if data else None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
