"""TensorRT engines from artifacts: a content-addressed cache of plans with sidecar manifests.

An entry in the cache folder is NAME.<key[:16]>.json, its sidecar manifest (resfuse.export.
engine_manifest), and the plan it names, NAME.<key[:16]>.<sha256[:12]>.plan, written by
resfuse.artifacts' writer under a lock per entry: the plan first, then the sidecar's rename
commits the entry. The key hashes everything that decides a plan's bytes and where it runs: the
ONNX sha256, the flavour, its version and CUDA, the platform, the GPU (TensorRT) or the target
compute capabilities (TensorRT-RTX), the profiles, the build settings and ENGINE_CACHE_FORMAT.
A plan is native code for the GPU: its size and sha256 are checked before anything deserialises
it. TensorRT itself is imported only to build (resfuse.export.tensorrt_build).
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from resfuse.artifacts import (
    ArtifactWriter,
    Manifest,
    ensure_writable,
    read_manifest,
    replace_file,
    write_artifact,
)
from resfuse.engine_manifest import (
    BuildSettings,
    Engine,
    digest,
    plan_key,
    read_engine,
    read_record,
    sidecar,
)
from resfuse.errors import ArtifactWriteError, ConfigError, EngineError, ManifestError
from resfuse.profiles import Profile, default_profiles, validate_profiles
from resfuse.tensorrt_env import (
    BuildEnvironment,
    Flavour,
    build_environment,
    check_tensorrt_target,
    flavour,
    import_flavour,
    mismatch,
    resolve,
)

ENGINE_CACHE_FORMAT = 3  # bump when the same key fields would now build a different plan
# 3: TensorRT-RTX plans require user-allocated context memory (BuilderFlag.REQUIRE_USER_ALLOCATION)


def cache_key(
    onnx_sha256: str,
    env: BuildEnvironment,
    profiles: Sequence[Profile],
    settings: BuildSettings,
) -> str:
    return plan_key(ENGINE_CACHE_FORMAT, onnx_sha256, env, profiles, settings)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/resfuse/engines, else ~/.cache/resfuse/engines (beside the TensorRT
    execution provider's ~/.cache/resfuse/ort-trt)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: relative is invalid
    return root / "resfuse" / "engines"


def entry_name(manifest: Manifest, key: str) -> str:
    return f"{manifest.path.stem}.{key[:16]}"


def _timing_cache_path(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"--timing-cache {path} is a folder; give a file path (it is created)")
    ensure_writable(path.parent, path.name, "--timing-cache")


def _commit(
    writer: ArtifactWriter,
    manifest: Manifest,
    profiles: Sequence[Profile],
    settings: BuildSettings,
    env: BuildEnvironment,
    plan: bytes,
    seconds: float,
) -> None:
    record = writer.add(".plan", _writes(plan))
    key = cache_key(manifest.record("onnx")["sha256"], env, profiles, settings)
    entry = sidecar(manifest, key, ENGINE_CACHE_FORMAT, profiles, settings, env, record, seconds)
    writer.commit(entry)


def _writes(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


def store_engine(
    cache_dir: str | Path,
    manifest: Manifest,
    profiles: Sequence[Profile],
    settings: BuildSettings,
    env: BuildEnvironment,
    plan: bytes,
    build_seconds: float,
) -> Path:
    """Write `plan` and its sidecar as the cache entry of these inputs; the sidecar's path."""
    key = cache_key(manifest.record("onnx")["sha256"], env, profiles, settings)
    with write_artifact(cache_dir, entry_name(manifest, key)) as writer:
        _commit(writer, manifest, profiles, settings, env, plan, build_seconds)
    return writer.manifest_path


def export_engine(engine: Engine, output_dir: str | Path) -> Path:
    """Copy a verified engine (sidecar and plan) into `output_dir`, atomically; the new sidecar.
    Copying runs nothing, so host code passes through: loading it is the reader's choice."""
    name = engine.record.path.name.removesuffix(".json")
    ensure_writable(output_dir, name)
    with write_artifact(output_dir, name) as writer:
        data = dict(engine.record.data, files={"plan": writer.add(".plan", _writes(engine.plan))})
        writer.commit(data)
    return writer.manifest_path


# --- find or build --------------------------------------------------------------------------


def find_or_build(
    artifact: Manifest | str | Path,
    profiles: Sequence[Profile] | None = None,
    settings: BuildSettings | None = None,
    cache_dir: str | Path | None = None,
    timing_cache: str | Path | None = None,
    rebuild: bool = True,
    *,
    engine: str | None = None,
    targets: tuple[str, ...] | None = None,
    env: BuildEnvironment | None = None,
    progress: Callable[[str], None] = lambda step: None,
) -> Engine:
    """The verified cached engine for this artifact, profiles (default: the manifest's ranges,
    capped: default_profiles) and settings, built by flavour `engine` (default: the installed
    one) for `env` (default: this GPU for TensorRT, `targets` for TensorRT-RTX).

    Everything is validated before TensorRT is imported. A valid entry is returned without
    importing the builder; a missing or damaged one is built. With rebuild=False nothing is
    built: a damaged entry is refused with the damage named, and a missing one is replaced by
    an engine of the same inputs built elsewhere that runs here, or refused naming the field in
    which such an engine differs. TensorRT's timing cache (default: one per environment in the
    cache folder) is reused and updated; TensorRT-RTX has none.
    """
    manifest = artifact if isinstance(artifact, Manifest) else read_manifest(artifact)
    check_tensorrt_target(manifest)
    profiles = default_profiles(manifest) if profiles is None else list(profiles)
    validate_profiles(profiles, manifest)
    settings = settings or BuildSettings()
    settings.validate()
    entry = flavour(env.flavour) if env is not None else resolve(engine)
    settings.check_flavour(entry, timing_cache)
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir)
    timing = None if timing_cache is None else Path(timing_cache)
    if rebuild:
        ensure_writable(cache, manifest.path.stem, "--cache-dir")
        if timing is not None:
            _timing_cache_path(timing)
    env = build_environment(entry, targets) if env is None else env
    key = cache_key(manifest.record("onnx")["sha256"], env, profiles, settings)
    name = entry_name(manifest, key)
    path = cache / f"{name}.json"
    try:
        return _cached(path, env, settings)
    except (ManifestError, EngineError):
        if not rebuild and path.exists():
            raise  # this entry is damaged: the error says how
        if not rebuild:
            return _compatible(cache, manifest, profiles, settings, env)
    if entry.timing_cache:
        timing = timing or cache / f"timing-{digest(env.to_dict())[:16]}.cache"
    with write_artifact(cache, name) as writer:
        try:  # another process may have built it while this one waited for the lock
            return _cached(writer.manifest_path, env, settings)
        except (ManifestError, EngineError):
            pass
        progress(f"building the {entry.label} engine ({entry.label} {env.tensorrt_version}, "
                 f"compute capability {env.compute_capability})")  # fmt: skip
        plan, new_timings, seconds = _build(entry, manifest, profiles, settings, env, timing)
        _commit(writer, manifest, profiles, settings, env, plan, seconds)
    if timing is not None and new_timings is not None:
        _save_timings(timing, new_timings)
    return read_engine(writer.manifest_path, env, settings.trust_host_code)


def _cached(path: Path, env: BuildEnvironment, settings: BuildSettings) -> Engine:
    return read_engine(path, env, allow_host_code=settings.trust_host_code)


def _compatible(
    cache: Path,
    manifest: Manifest,
    profiles: Sequence[Profile],
    settings: BuildSettings,
    env: BuildEnvironment,
) -> Engine:
    """With rebuilding off: an engine of the same inputs built elsewhere that runs here
    (hardware- or version-compatible), else EngineError naming the field in which one differs."""
    sha256 = manifest.record("onnx")["sha256"]
    problems = []
    for path in sorted(cache.glob(f"{glob.escape(manifest.path.stem)}.*.json")):
        try:
            record = read_record(path)
        except ManifestError:
            continue
        if (record.onnx_sha256, record.profiles, record.settings) != (
            sha256,
            tuple(profiles),
            settings,
        ):
            continue
        problem = mismatch(
            record.environment, env, settings.trust_host_code, settings.hardware_compat
        )
        if problem is None:
            return _cached(path, env, settings)
        problems.append(f"{path.name}: {problem}")
    found = (
        problems[0]
        if problems
        else f"no engine of {manifest.path.name} with these profiles and settings in {cache}"
    )
    raise EngineError(f"{found}; rebuild it with resfuse-build (rebuilding is off)")


def _build(
    entry: Flavour,
    manifest: Manifest,
    profiles: Sequence[Profile],
    settings: BuildSettings,
    env: BuildEnvironment,
    timing: Path | None,
) -> tuple[bytes, bytes | None, float]:
    lib = import_flavour(entry)  # a clear error first: tensorrt-stubs alone import as a module
    from resfuse.export.tensorrt_build import build_plan

    onnx = manifest.read("onnx")  # verified bytes: the model hashed is the model built
    targets = () if entry.needs_gpu_to_build else env.capabilities
    start = time.perf_counter()
    plan, new_timings = build_plan(
        lib, onnx, manifest.input_name, profiles, settings,
        timing_cache=(_read_timings(timing) or b"") if timing else None, targets=targets,
    )  # fmt: skip
    return plan, new_timings, time.perf_counter() - start


def _read_timings(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(
            f"cannot read the timing cache {path} ({exc.strerror or exc}); fix its permissions "
            f"or give another --timing-cache"
        ) from exc


def _save_timings(path: Path, data: bytes) -> None:
    """Concurrent builds each write the cache they loaded plus their own timings: the last
    wins, never a torn file."""
    import filelock

    try:
        with filelock.FileLock(path.with_name(f".{path.name}.lock")):
            replace_file(path, data)
    except OSError as exc:
        raise ArtifactWriteError(
            f"the engine was built and cached, but the timing cache {path} could not be written "
            f"({exc.strerror or exc}); give a writable --timing-cache"
        ) from exc
