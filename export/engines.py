"""TensorRT engines from artifacts: a content-addressed cache of plans with sidecar manifests.

An entry in the cache folder is NAME.<key[:16]>.json, its sidecar manifest, and the plan it
names, NAME.<key[:16]>.<sha256[:12]>.plan, written by resfuse.artifacts' writer under a lock per
entry: the plan first, then the sidecar's rename commits the entry. The key hashes everything
that decides a plan's bytes and where it runs: the ONNX sha256, the TensorRT and CUDA versions,
the GPU's name and compute capability, the profiles, the build settings and
ENGINE_CACHE_FORMAT. A plan is native code for the GPU: read_engine checks its size and sha256
before anything deserialises it, and refuses one that carries host code (a version-compatible
plan) unless the caller trusts it. TensorRT itself is imported only to build
(resfuse.export.tensorrt_build) or to read this machine's versions (current_environment).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from resfuse.artifacts import (
    ArtifactWriter,
    Manifest,
    ensure_writable,
    manifest_path_for,
    read_manifest,
    replace_file,
    write_artifact,
)
from resfuse.errors import (
    ArtifactWriteError,
    BackendUnavailableError,
    ConfigError,
    EngineError,
    ManifestError,
)
from resfuse.export.profiles import Profile, default_profiles, validate_profiles
from resfuse.schema import PRECISIONS, _Fields, _plain

ENGINE_FORMAT = "resfuse-engine"
ENGINE_FORMAT_VERSION = 1
ENGINE_CACHE_FORMAT = 1  # bump when the same key fields would now build a different plan
HARDWARE_COMPAT = ("none", "ampere+")
MAX_BUILDER_LEVEL = 5
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LABELS = {
    "tensorrt_version": "TensorRT",
    "cuda_version": "CUDA",
    "gpu_name": "GPU",
    "compute_capability": "compute capability",
}


@dataclass(frozen=True)
class BuildSettings:
    """How TensorRT builds. No precision here: a strongly typed network takes the artifact's."""

    builder_level: int = 3  # builder optimisation level 0-5: higher searches longer
    workspace_gib: float | None = None  # workspace pool limit; None: TensorRT's default
    hardware_compat: str = "none"  # "ampere+": one plan for every GPU of compute capability 8.0+
    trust_host_code: bool = False  # build version-compatible plans, which embed host code

    def validate(self) -> None:
        """Raise ConfigError naming the option, its value, what is allowed."""
        level = self.builder_level
        if type(level) is not int or not 0 <= level <= MAX_BUILDER_LEVEL:
            raise ConfigError(
                f"--builder-level {level!r} is outside 0..{MAX_BUILDER_LEVEL}; 3 is TensorRT's "
                f"default, higher levels build longer for possibly faster engines"
            )
        gib = self.workspace_gib
        number = isinstance(gib, int | float) and not isinstance(gib, bool)
        if gib is not None and not (number and math.isfinite(gib) and gib > 0):
            raise ConfigError(
                f"--workspace {gib!r} must be a positive number of GiB; leave it out to let "
                f"TensorRT use what the GPU has"
            )
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise ConfigError(
                f"--hardware-compat {self.hardware_compat!r} is not one of "
                f"{', '.join(HARDWARE_COMPAT)}; ampere+ builds one plan for compute capability 8.0+"
            )
        if not isinstance(self.trust_host_code, bool):
            raise ConfigError(
                f"trust_host_code must be True or False, not {self.trust_host_code!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        gib = self.workspace_gib
        return {  # workspace as a float, so that 4 and 4.0 give one key
            "builder_level": self.builder_level,
            "workspace_gib": None if gib is None else float(gib),
            "hardware_compat": self.hardware_compat,
            "trust_host_code": self.trust_host_code,
        }


@dataclass(frozen=True)
class BuildEnvironment:
    """What a plan is bound to besides its inputs: TensorRT, CUDA and the GPU."""

    tensorrt_version: str
    cuda_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "9.0"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class EngineRecord:
    """A validated engine sidecar manifest; `data` is the JSON as read."""

    path: Path
    key: str
    source_manifest: str
    onnx_sha256: str
    precision: str
    profiles: tuple[Profile, ...]
    settings: BuildSettings
    environment: BuildEnvironment
    plan_path: Path
    plan_sha256: str
    plan_bytes: int
    build_seconds: float
    created: str
    data: dict[str, Any] = field(repr=False, compare=False)

    @property
    def host_code(self) -> bool:
        """A version-compatible plan embeds TensorRT's lean runtime: host code that runs when
        the plan is deserialised."""
        return self.settings.trust_host_code


# --- this machine -------------------------------------------------------------------------


def import_tensorrt() -> Any:
    """The tensorrt module, or BackendUnavailableError naming what to install. tensorrt-stubs
    alone leave an empty `tensorrt` namespace package that imports: that is no TensorRT."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the bindings without their libnvinfer
        reason = " ".join(str(exc).split())[:160]
    else:
        if not hasattr(tensorrt, "Builder"):
            reason = "only its type stubs are installed"
        elif int(tensorrt.__version__.split(".")[0]) < 10:
            reason = f"version {tensorrt.__version__} is older than 10"
        else:
            return tensorrt
    raise BackendUnavailableError(
        f"TensorRT is not installed ({reason}); on a machine with an NVIDIA GPU run "
        f"pip install 'resfuse[gpu]' (tensorrt>=10), or use NVIDIA's TensorRT container"
    )


@functools.lru_cache(maxsize=1)
def current_environment() -> BuildEnvironment:
    """This machine's TensorRT, CUDA and GPU (the current CUDA device), read once per process."""
    trt = import_tensorrt()
    gpu_name, capability, cuda = _cuda_device()
    return BuildEnvironment(str(trt.__version__), cuda, gpu_name, capability)


def _cuda_device() -> tuple[str, str, str]:
    """(GPU name, compute capability, CUDA version) from torch, else from cuda-python."""
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return torch.cuda.get_device_name(index), f"{major}.{minor}", str(torch.version.cuda)
    try:
        from cuda.bindings import runtime as cudart  # cuda-python 12.6+
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            cudart = None
    if cudart is not None:
        error, device = cudart.cudaGetDevice()
        if int(error) == 0:
            _, props = cudart.cudaGetDeviceProperties(device)
            _, version = cudart.cudaRuntimeGetVersion()
            name = props.name.decode(errors="replace").rstrip("\x00")
            cuda = f"{version // 1000}.{version % 1000 // 10}"
            return name, f"{props.major}.{props.minor}", cuda
    raise BackendUnavailableError(
        "TensorRT is installed but no CUDA GPU is visible to torch or cuda-python; install a "
        "CUDA build of torch (or cuda-python) and check nvidia-smi and CUDA_VISIBLE_DEVICES"
    )


# --- the cache key and its folder -----------------------------------------------------------


def cache_key(
    onnx_sha256: str,
    env: BuildEnvironment,
    profiles: Sequence[Profile],
    settings: BuildSettings,
) -> str:
    """sha256 of a canonical JSON (sorted keys, no whitespace) of every field that decides a
    plan, with ENGINE_CACHE_FORMAT: the same inputs give the same key in any process."""
    return _key(ENGINE_CACHE_FORMAT, onnx_sha256, env, profiles, settings)


def _key(
    cache_format: int,
    onnx_sha256: str,
    env: BuildEnvironment,
    profiles: Sequence[Profile],
    settings: BuildSettings,
) -> str:
    fields = {
        "engine_cache_format": cache_format,
        "onnx_sha256": onnx_sha256,
        "environment": env.to_dict(),
        "profiles": [p.to_dict() for p in profiles],
        "settings": settings.to_dict(),
    }
    return _digest(fields)


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/resfuse/engines, else ~/.cache/resfuse/engines (beside the TensorRT
    execution provider's ~/.cache/resfuse/ort-trt)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: relative is invalid
    return root / "resfuse" / "engines"


def entry_name(manifest: Manifest, key: str) -> str:
    return f"{manifest.path.stem}.{key[:16]}"


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


def _writable_folder(folder: Path, option: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        usable = os.access(folder, os.W_OK | os.X_OK)
        reason = "permission denied"
    except OSError as exc:
        usable, reason = False, str(exc.strerror or exc)
    if not usable:
        raise ArtifactWriteError(
            f"cannot write into {folder} ({reason}); choose a writable {option}"
        )


def _timing_cache_path(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"--timing-cache {path} is a folder; give a file path (it is created)")
    _writable_folder(path.parent, "--timing-cache")


# --- engine sidecar manifests ---------------------------------------------------------------


class _EngineFields(_Fields):
    def fail(self, field: str, expected: str, got: object) -> NoReturn:
        shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
        raise ManifestError(
            f"{self.path}: field {field!r} must be {expected}, got {shown}; rebuild the engine "
            f"with resfuse-build rather than editing its manifest"
        )

    def sha256(self, value: object, field: str) -> str:
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            self.fail(field, "64 lowercase hex digits", value)
        return value

    def exactly(self, value: object, field: str, names: Sequence[str]) -> dict[str, Any]:
        """An object with no keys but `names` (each checked by the caller)."""
        if not isinstance(value, dict):
            self.fail(field, f"an object with {', '.join(names)}", value)
        unknown = sorted(set(value) - set(names))
        if unknown:
            self.fail(f"{field}.{unknown[0]}", f"absent (known: {', '.join(names)})", "set")
        return value


def read_record(path: str | Path) -> EngineRecord:
    """Read and validate an engine sidecar (or the one beside a .plan); the plan is not read."""
    path = manifest_path_for(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ManifestError(
            f"no engine manifest at {path}; build the engine with resfuse-build"
        ) from None
    except OSError as exc:
        raise ManifestError(f"cannot read engine manifest {path}: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"cannot read engine manifest {path}: not JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != ENGINE_FORMAT:
        raise ManifestError(
            f'{path} is not a resfuse engine manifest (no "format": "{ENGINE_FORMAT}"); give the '
            f"engine's .json from resfuse-build, or build one from the artifact"
        )
    version = data.get("format_version")
    if type(version) is not int or version != ENGINE_FORMAT_VERSION:
        raise ManifestError(
            f"{path} has engine format version {version!r}, this resfuse reads "
            f"{ENGINE_FORMAT_VERSION}; rebuild the engine with this version's resfuse-build"
        )
    return _record(_EngineFields(path), data)


def _record(f: _EngineFields, data: dict[str, Any]) -> EngineRecord:
    key = f.sha256(data.get("key"), "key")
    cache_format = f.integer(data.get("engine_cache_format"), "engine_cache_format", 1)
    source = f.exactly(data.get("source"), "source", ("manifest", "onnx_sha256"))
    f.text(source.get("manifest"), "source.manifest")
    onnx_sha256 = f.sha256(source.get("onnx_sha256"), "source.onnx_sha256")
    f.text(data.get("precision"), "precision", PRECISIONS)
    profiles = _profiles(f, data)
    settings = _settings(f, data)
    environment = f.exactly(data.get("environment"), "environment", tuple(_LABELS))
    for name in _LABELS:
        f.text(environment.get(name), f"environment.{name}")
    env = BuildEnvironment(**environment)
    files = f.exactly(data.get("files"), "files", ("plan",))
    plan = f.exactly(files.get("plan"), "files.plan", ("path", "sha256", "bytes"))
    if not isinstance(plan.get("path"), str) or not _plain(plan["path"]):
        f.fail("files.plan.path", "a plain file name in the manifest's folder", plan.get("path"))
    f.sha256(plan.get("sha256"), "files.plan.sha256")
    f.integer(plan.get("bytes"), "files.plan.bytes", 1)
    seconds = f.number(data.get("build_seconds"), "build_seconds")
    f.text(data.get("created"), "created")
    if _key(cache_format, onnx_sha256, env, profiles, settings) != key:
        raise ManifestError(
            f"{f.path}: field 'key' is not the hash of the fields it covers (ONNX sha256, "
            f"environment, profiles, settings): the manifest was edited; rebuild the engine with "
            f"resfuse-build"
        )
    return EngineRecord(
        path=f.path,
        key=key,
        source_manifest=source["manifest"],
        onnx_sha256=onnx_sha256,
        precision=data["precision"],
        profiles=tuple(profiles),
        settings=settings,
        environment=env,
        plan_path=f.path.parent / plan["path"],
        plan_sha256=plan["sha256"],
        plan_bytes=plan["bytes"],
        build_seconds=seconds,
        created=data["created"],
        data=data,
    )


def _profiles(f: _EngineFields, data: dict[str, Any]) -> list[Profile]:
    entries = data.get("profiles")
    if not isinstance(entries, list) or not entries:
        f.fail("profiles", "a non-empty list", entries)
    for i, entry in enumerate(entries):
        section = f.exactly(entry, f"profiles[{i}]", ("min", "opt", "max"))
        for name in ("min", "opt", "max"):
            shape = section.get(name)
            if not isinstance(shape, list) or len(shape) != 4:
                f.fail(f"profiles[{i}].{name}", "4 whole numbers, NCHW", shape)
            for d, value in enumerate(shape):
                f.integer(value, f"profiles[{i}].{name}[{d}]", 1)
    return [Profile.from_dict(entry) for entry in entries]


def _settings(f: _EngineFields, data: dict[str, Any]) -> BuildSettings:
    section = f.exactly(data.get("settings"), "settings", tuple(BuildSettings().to_dict()))
    level = f.integer(section.get("builder_level"), "settings.builder_level", 0, MAX_BUILDER_LEVEL)
    gib = section.get("workspace_gib")
    if gib is not None:
        gib = f.number(gib, "settings.workspace_gib", positive=True)
    compat = f.text(section.get("hardware_compat"), "settings.hardware_compat", HARDWARE_COMPAT)
    trust = f.flag(section.get("trust_host_code"), "settings.trust_host_code")
    return BuildSettings(level, gib, compat, trust)


def _sidecar(
    manifest: Manifest,
    key: str,
    profiles: Sequence[Profile],
    settings: BuildSettings,
    env: BuildEnvironment,
    plan: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    return {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "key": key,
        "engine_cache_format": ENGINE_CACHE_FORMAT,
        "source": {
            "manifest": manifest.path.name,
            "onnx_sha256": manifest.record("onnx")["sha256"],
        },
        "precision": manifest.precision,
        "profiles": [p.to_dict() for p in profiles],
        "settings": settings.to_dict(),
        "environment": env.to_dict(),
        "files": {"plan": plan},
        "build_seconds": round(seconds, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _mismatch(
    built: BuildEnvironment, here: BuildEnvironment, settings: BuildSettings
) -> str | None:
    """How a plan built in `built` cannot run `here`, the first field named; None if it can.
    Version-compatible plans run on a later TensorRT of the same major version (or 10 -> 11) and
    need only the same CUDA major; ampere+ plans run on compute capability 8.0 and later."""
    ok = {name: getattr(built, name) == getattr(here, name) for name in _LABELS}
    if settings.trust_host_code:
        old, new = _version(built.tensorrt_version), _version(here.tensorrt_version)
        ok["tensorrt_version"] = new >= old and (
            new[:1] == old[:1] or (old[:1], new[:1]) == ((10,), (11,))
        )
        ok["cuda_version"] = _version(built.cuda_version)[:1] == _version(here.cuda_version)[:1]
    if settings.hardware_compat == "ampere+":
        ampere = _version(here.compute_capability) >= (8, 0)
        if not ampere:
            return (
                f"engine built for GPUs of compute capability 8.0 and later (hardware compat "
                f"ampere+), this machine's {here.gpu_name} has {here.compute_capability}"
            )
        ok["gpu_name"] = ok["compute_capability"] = True
    for name, label in _LABELS.items():
        if not ok[name]:
            return (
                f"engine built for {label} {getattr(built, name)}, this machine has "
                f"{getattr(here, name)}"
            )
    return None


def read_engine(
    path: str | Path,
    env: BuildEnvironment | None = None,
    allow_host_code: bool = False,
) -> tuple[EngineRecord, bytes]:
    """The validated sidecar of an engine (given by its .json or its .plan) and the plan's bytes,
    checked against the recorded size and sha256: deserialise these bytes, never the file again.
    Refuses a version-compatible plan (host code) unless `allow_host_code`; the caller must also
    set TensorRT's `engine_host_code_allowed` only then. Given `env`, names the first field in
    which the plan cannot run on that machine."""
    record = read_record(path)
    if record.host_code and not allow_host_code:
        raise EngineError(
            f"{record.path.name} is a version-compatible plan: it carries host code (TensorRT's "
            f"lean runtime) that runs when it is loaded; load it only if you trust where it came "
            f"from (allow_host_code=True, resfuse-build --trust-host-code)"
        )
    if env is not None:
        problem = _mismatch(record.environment, env, record.settings)
        if problem is not None:
            raise EngineError(
                f"{record.path.name}: {problem}; rebuild it with resfuse-build "
                f"{record.source_manifest}"
            )
    return record, _read_plan(record)


def _read_plan(record: EngineRecord) -> bytes:
    target = record.plan_path
    try:
        with open(target, "rb") as fh:
            data = fh.read(record.plan_bytes + 1)
    except FileNotFoundError:
        raise ManifestError(
            f"{target} named by {record.path} is missing; rebuild the engine"
        ) from None
    except OSError as exc:
        raise ManifestError(f"cannot read {target}: {exc.strerror or exc}") from exc
    if len(data) != record.plan_bytes or hashlib.sha256(data).hexdigest() != record.plan_sha256:
        raise ManifestError(
            f"{target} does not match the size and sha256 in {record.path}: the plan was changed, "
            f"truncated or replaced after it was built; it was not loaded; rebuild it with "
            f"resfuse-build"
        )
    return data


def _writes(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


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
    writer.commit(_sidecar(manifest, key, profiles, settings, env, record, seconds))


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


def export_engine(path: str | Path, output_dir: str | Path) -> Path:
    """Copy a verified engine (sidecar and plan) into `output_dir`, atomically; the new sidecar.
    Copying runs nothing, so host code is allowed through: loading it is the reader's choice."""
    record, plan = read_engine(path, allow_host_code=True)
    name = record.path.name.removesuffix(".json")
    ensure_writable(output_dir, name)
    with write_artifact(output_dir, name) as writer:
        data = dict(record.data, files={"plan": writer.add(".plan", _writes(plan))})
        writer.commit(data)
    return writer.manifest_path


# --- find or build --------------------------------------------------------------------------


def find_or_build(
    artifact_manifest_path: str | Path,
    profiles: Sequence[Profile] | None = None,
    settings: BuildSettings = BuildSettings(),
    cache_dir: str | Path | None = None,
    timing_cache: str | Path | None = None,
    rebuild: bool = True,
    *,
    env: BuildEnvironment | None = None,
    progress: Callable[[str], None] = lambda step: None,
) -> Path:
    """The sidecar path of the cached engine for this artifact, profiles (default: the
    manifest's ranges) and settings on this machine (`env`, default current_environment()).

    Everything is validated before TensorRT is imported. A valid entry is returned without
    importing the builder; a missing or damaged one is built. With rebuild=False nothing is
    built: a damaged entry is refused with the damage named, and a missing one is replaced by
    an engine of the same inputs built elsewhere that runs here, or refused naming the field in
    which such an engine differs.
    The timing cache (default: one per environment in the cache folder) is reused and updated.
    """
    manifest = read_manifest(artifact_manifest_path)
    check_tensorrt_target(manifest)
    profiles = default_profiles(manifest) if profiles is None else list(profiles)
    validate_profiles(profiles, manifest)
    settings.validate()
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir)
    timing = None if timing_cache is None else Path(timing_cache)
    if rebuild:
        _writable_folder(cache, "--cache-dir")
        if timing is not None:
            _timing_cache_path(timing)
    env = current_environment() if env is None else env
    key = cache_key(manifest.record("onnx")["sha256"], env, profiles, settings)
    name = entry_name(manifest, key)
    sidecar = cache / f"{name}.json"
    try:
        return _cached(sidecar, env, settings)
    except (ManifestError, EngineError):
        if not rebuild and sidecar.exists():
            raise  # this entry is damaged: the error says how
        if not rebuild:
            return _compatible(cache, manifest, profiles, settings, env)
    timing = timing or cache / f"timing-{_digest(env.to_dict())[:16]}.cache"
    with write_artifact(cache, name) as writer:
        try:  # another process may have built it while this one waited for the lock
            return _cached(writer.manifest_path, env, settings)
        except (ManifestError, EngineError):
            pass
        progress(f"building the TensorRT engine (TensorRT {env.tensorrt_version}, {env.gpu_name})")
        plan, new_timings, seconds = _build(manifest, profiles, settings, _read_timings(timing))
        _commit(writer, manifest, profiles, settings, env, plan, seconds)
    _save_timings(timing, new_timings)
    return writer.manifest_path


def _cached(path: Path, env: BuildEnvironment, settings: BuildSettings) -> Path:
    read_engine(path, env, allow_host_code=settings.trust_host_code)
    return path


def _compatible(
    cache: Path,
    manifest: Manifest,
    profiles: Sequence[Profile],
    settings: BuildSettings,
    env: BuildEnvironment,
) -> Path:
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
        problem = _mismatch(record.environment, env, settings)
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
    manifest: Manifest,
    profiles: Sequence[Profile],
    settings: BuildSettings,
    timings: bytes | None,
) -> tuple[bytes, bytes, float]:
    import_tensorrt()  # a clear error first: tensorrt-stubs alone would import as a module
    from resfuse.export.tensorrt_build import build_plan

    onnx = manifest.read("onnx")  # verified bytes: the model hashed is the model built
    start = time.perf_counter()
    plan, new_timings = build_plan(onnx, manifest.input_name, profiles, settings, timings)
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
