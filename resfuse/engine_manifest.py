"""Engine sidecar manifests: how a plan was built, what it is bound to, and its bytes' hash.

A sidecar is JSON beside its plan (written by resfuse.export.engines); read_engine validates
every field, recomputes the key over the fields it covers, names the first field in which the
plan cannot run on a given machine, and returns the plan's bytes checked against the recorded
size and sha256: deserialise those bytes, never the file again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from resfuse.artifacts import Manifest, manifest_path_for, read_checked, read_json
from resfuse.errors import ConfigError, EngineError, ManifestError
from resfuse.precisions import dtypes
from resfuse.profiles import Profile
from resfuse.schema import _Fields, _plain
from resfuse.tensorrt_env import LABELS, BuildEnvironment, Flavour, mismatch

ENGINE_FORMAT = "resfuse-engine"
ENGINE_FORMAT_VERSION = 2  # 2: the environment names the flavour and the platform
HARDWARE_COMPAT = ("none", "ampere+")
MAX_BUILDER_LEVEL = 5
_SHA256 = re.compile(r"[0-9a-f]{64}")


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

    def check_flavour(self, entry: Flavour, timing_cache: object = None) -> None:
        """Refuse, before any build, what this flavour cannot honour: never ignore it."""
        compat = self.hardware_compat != "none"
        refused = [
            ("--trust-host-code", self.trust_host_code and not entry.host_code),
            (f"--hardware-compat {self.hardware_compat}", compat and not entry.hardware_compat),
            ("--timing-cache", timing_cache is not None and not entry.timing_cache),
        ]
        for option, bad in refused:
            if bad:
                raise ConfigError(
                    f"{option} is not available with --engine {entry.name} ({entry.label} has no "
                    f"such plans or caches); leave it out, or build with another --engine"
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
class EngineRecord:
    """A validated engine sidecar manifest; `data` is the JSON as read."""

    path: Path
    key: str
    cache_format: int
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


@dataclass(frozen=True)
class Engine:
    """A sidecar and the plan bytes checked against it: what the runtime deserialises."""

    record: EngineRecord
    plan: bytes


class _EngineFields(_Fields):
    FIX = "rebuild the engine with resfuse-build rather than editing its manifest"

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


def plan_key(
    cache_format: int,
    onnx_sha256: str,
    env: BuildEnvironment,
    profiles: Sequence[Profile],
    settings: BuildSettings,
) -> str:
    """sha256 of a canonical JSON (sorted keys, no whitespace) of every field that decides a
    plan: the same inputs give the same key in any process."""
    fields = {
        "engine_cache_format": cache_format,
        "onnx_sha256": onnx_sha256,
        "environment": env.to_dict(),
        "profiles": [p.to_dict() for p in profiles],
        "settings": settings.to_dict(),
    }
    return digest(fields)


def digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def read_record(path: str | Path) -> EngineRecord:
    """Read and validate an engine sidecar (or the one beside a .plan); the plan is not read."""
    path = manifest_path_for(path)
    data, _ = read_json(path, "engine manifest", "build the engine with resfuse-build")
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
    record = _record(_EngineFields(path), data)
    r = record
    if plan_key(r.cache_format, r.onnx_sha256, r.environment, r.profiles, r.settings) != r.key:
        raise ManifestError(
            f"{path}: field 'key' is not the hash of the fields it covers (ONNX sha256, "
            f"environment, profiles, settings): the manifest was edited; rebuild the engine with "
            f"resfuse-build"
        )
    return record


def _record(f: _EngineFields, data: dict[str, Any]) -> EngineRecord:
    source = f.exactly(data.get("source"), "source", ("manifest", "onnx_sha256"))
    f.text(source.get("manifest"), "source.manifest")
    environment = f.exactly(data.get("environment"), "environment", tuple(LABELS))
    for name in LABELS:
        f.text(environment.get(name), f"environment.{name}")
    files = f.exactly(data.get("files"), "files", ("plan",))
    plan = f.exactly(files.get("plan"), "files.plan", ("path", "sha256", "bytes"))
    if not isinstance(plan.get("path"), str) or not _plain(plan["path"]):
        f.fail("files.plan.path", "a plain file name in the manifest's folder", plan.get("path"))
    f.text(data.get("created"), "created")
    return EngineRecord(
        path=f.path,
        key=f.sha256(data.get("key"), "key"),
        cache_format=f.integer(data.get("engine_cache_format"), "engine_cache_format", 1),
        source_manifest=source["manifest"],
        onnx_sha256=f.sha256(source.get("onnx_sha256"), "source.onnx_sha256"),
        precision=f.text(data.get("precision"), "precision", dtypes()),
        profiles=tuple(_profiles(f, data)),
        settings=_settings(f, data),
        environment=BuildEnvironment(**environment),
        plan_path=f.path.parent / plan["path"],
        plan_sha256=f.sha256(plan.get("sha256"), "files.plan.sha256"),
        plan_bytes=f.integer(plan.get("bytes"), "files.plan.bytes", 1),
        build_seconds=f.number(data.get("build_seconds"), "build_seconds"),
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


def sidecar(
    manifest: Manifest,
    key: str,
    cache_format: int,
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
        "engine_cache_format": cache_format,
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


def read_engine(
    path: str | Path, here: BuildEnvironment | None = None, allow_host_code: bool = False
) -> Engine:
    """The verified engine (sidecar and plan bytes) given by its .json or its .plan."""
    return verify(read_record(path), here, allow_host_code)


def verify(
    record: EngineRecord, here: BuildEnvironment | None = None, allow_host_code: bool = False
) -> Engine:
    """The record with its plan bytes checked against the recorded size and sha256, once
    require_runs_here passed."""
    require_runs_here(record, here, allow_host_code)
    return Engine(record, _read_plan(record))


def require_runs_here(
    record: EngineRecord, here: BuildEnvironment | None = None, allow_host_code: bool = False
) -> None:
    """Refuses a version-compatible plan (host code) unless `allow_host_code`; the caller must
    also set TensorRT's `engine_host_code_allowed` only then. Given `here`, names the first
    field in which the plan cannot run on that machine."""
    if record.host_code and not allow_host_code:
        raise EngineError(
            f"{record.path.name} is a version-compatible plan: it carries host code (TensorRT's "
            f"lean runtime) that runs when it is loaded; load it only if you trust where it came "
            f"from (allow_host_code=True, resfuse-build --trust-host-code)"
        )
    if here is not None:
        settings = record.settings
        problem = mismatch(
            record.environment, here, settings.trust_host_code, settings.hardware_compat
        )
        if problem is not None:
            raise EngineError(
                f"{record.path.name}: {problem}; rebuild it with resfuse-build "
                f"{record.source_manifest}"
            )


def _read_plan(record: EngineRecord) -> bytes:
    target = record.plan_path
    return read_checked(
        target,
        record.plan_bytes,
        record.plan_sha256,
        lambda: f"{target} named by {record.path} is missing; rebuild the engine",
        f"{target} does not match the size and sha256 in {record.path}: the plan was changed, "
        f"truncated or replaced after it was built; it was not loaded; rebuild it with "
        f"resfuse-build",
    )
