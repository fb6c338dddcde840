"""resfuse-build without a GPU: profiles, cache keys, engine manifests, refusals, the CLI up to
the point where TensorRT is needed, and mypy over the TensorRT code against tensorrt-stubs. The
tests that build engines are marked `tensorrt` and skip where TensorRT is absent."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from resfuse import tensorrt_env
from resfuse.artifacts import read_manifest, replace_file
from resfuse.engine_manifest import BuildSettings
from resfuse.errors import (
    BackendUnavailableError,
    ConfigError,
    EngineError,
    InputContractError,
    ManifestError,
)
from resfuse.export import build_cli, engines
from resfuse.export.engines import (
    cache_key,
    default_cache_dir,
    export_engine,
    find_or_build,
    read_engine,
    store_engine,
)
from resfuse.export.pipeline import ExportResult
from resfuse.profiles import (
    Profile,
    default_profiles,
    parse_profile,
    profile_for,
    validate_profiles,
)
from resfuse.shapes import parse_shape
from resfuse.tensorrt_env import FLAVOURS, BuildEnvironment, import_flavour

ROOT = Path(__file__).resolve().parents[1]
H200 = BuildEnvironment("tensorrt", "10.13.0.35", "12.9", "linux-x86_64", "NVIDIA H200", "9.0")
WIDE = Profile((1, 3, 32, 32), (1, 3, 512, 512), (4, 3, 1024, 1024))  # masked: the default
PLAN = bytes(range(256)) * 64  # stands in for a plan: read_engine never parses it


def _absent(name: str) -> str | None:
    try:
        import_flavour(FLAVOURS[name])
    except BackendUnavailableError as exc:
        return str(exc)
    return None


NO_TENSORRT = _absent("tensorrt")
needs_tensorrt = pytest.mark.skipif(NO_TENSORRT is not None, reason=f"{NO_TENSORRT}")
without_tensorrt = pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT is installed here")


@pytest.fixture
def artifact(exported: dict[str, ExportResult]) -> Path:
    return exported["masked"].manifest_path


def _edit(artifact: Path, folder: Path, change: Any) -> Path:
    """A copy of the artifact in `folder` whose manifest `change(data)` edited; its files are
    hard links (never written)."""
    data = json.loads(artifact.read_text())
    change(data)
    folder.mkdir(exist_ok=True)
    for record in data["files"].values():
        target = folder / record["path"]
        if not target.exists():
            os.link(artifact.parent / record["path"], target)
    path = folder / artifact.name
    path.write_text(json.dumps(data))
    return path


def _store(artifact: Path, cache: Path, **kwargs: Any) -> Path:
    settings = kwargs.pop("settings", BuildSettings())
    env = kwargs.pop("env", H200)
    profiles = kwargs.pop("profiles", [WIDE])
    return store_engine(cache, read_manifest(artifact), profiles, settings, env, PLAN, 1.5)


# --- profiles -------------------------------------------------------------------------------


def test_shapes_and_profiles_parse() -> None:
    assert parse_shape("1x3x64x64") == (1, 3, 64, 64)
    assert parse_shape(" 2X1X97X131 ") == (2, 1, 97, 131)
    profile = parse_profile("1x3x64x64:1x3x512x512:8x3x2048x2048")
    assert profile == Profile((1, 3, 64, 64), (1, 3, 512, 512), (8, 3, 2048, 2048))
    assert parse_profile(profile.describe()) == profile
    assert Profile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


@pytest.mark.parametrize(
    "text", ["1x3x64", "1x3x64x64x1", "ax3x64x64", "0x3x64x64", "1x3x-4x64", ""]
)
def test_bad_shape_is_named(text: str) -> None:
    with pytest.raises(
        ConfigError, match=re.escape(f"--min {text!r} is not a shape; give NxCxHxW")
    ):
        parse_shape(text, "--min")


def test_bad_profile_text_is_named() -> None:
    with pytest.raises(ConfigError, match="--profile '1x3x64x64:1x3x512x512' is not MIN:OPT:MAX"):
        parse_profile("1x3x64x64:1x3x512x512")
    with pytest.raises(ConfigError, match="--profile '1x3x64' is not a shape"):
        parse_profile("1x3x64:1x3x64x64:1x3x64x64")


def test_default_profile_is_capped_to_what_a_gpu_holds(artifact: Path) -> None:
    """The artifact takes batch 32 at 1024^2: a context sized for that holds 8 GiB per 64-channel
    float32 map. The default stops at batch 4 and 1024^2, inside the manifest's ranges."""
    manifest = read_manifest(artifact)
    assert (manifest.contract.batch.max, manifest.contract.height.max) == (32, 1024)
    capped = Profile((1, 3, 32, 32), (1, 3, 512, 512), (4, 3, 1024, 1024))
    assert default_profiles(manifest) == [capped]


def test_default_profile_stays_inside_smaller_ranges(artifact: Path, tmp_path: Path) -> None:
    two = _edit(artifact, tmp_path / "two", _set("input.contract.batch.max", 2))
    assert default_profiles(read_manifest(two))[0].max == (2, 3, 1024, 1024)

    def small(data: dict[str, Any]) -> None:
        data["input"]["contract"]["height"]["max"] = 256  # opt 512 is clamped to it

    (profile,) = default_profiles(read_manifest(_edit(artifact, tmp_path / "small", small)))
    assert profile == Profile((1, 3, 32, 32), (1, 3, 256, 512), (4, 3, 256, 1024))

    def unbounded(data: dict[str, Any]) -> None:
        data["input"]["contract"]["width"]["max"] = None

    manifest = read_manifest(_edit(artifact, tmp_path / "open", unbounded))
    with pytest.raises(ConfigError, match="sets no upper bound on width.*--min/--opt/--max"):
        default_profiles(manifest)


@pytest.mark.parametrize(
    "profiles,message",
    [
        ([], "no profiles given"),
        (
            [Profile((1, 3, 600, 64), (1, 3, 512, 512), (8, 3, 1024, 1024))],
            "profile 0 (1x3x600x64:1x3x512x512:8x3x1024x1024): height runs min 600, opt 512, "
            "max 1024; every dimension needs min <= opt <= max",
        ),
        (
            [Profile((1, 3, 64, 64), (1, 3, 512, 900), (8, 3, 1024, 800))],
            "width runs min 64, opt 900, max 800",
        ),
        (
            [Profile((1, 3, 64, 64), (1, 3, 512, 512), (64, 3, 1024, 1024))],
            "max batch 64 is outside masked-resnet18.json's batch range 1..32; keep profiles "
            "inside it (or re-export with other --max-batch)",
        ),
        (
            [Profile((1, 3, 64, 64), (1, 3, 512, 512), (8, 3, 2048, 1024))],
            "max height 2048 is outside masked-resnet18.json's height range 32..1024",
        ),
        (
            [Profile((1, 3, 16, 64), (1, 3, 512, 512), (8, 3, 1024, 1024))],
            "min height 16 is outside masked-resnet18.json's height range 32..1024",
        ),
        (
            [Profile((1, 3, 64, 64), (1, 1, 512, 512), (8, 3, 1024, 1024))],
            "opt has 1 channels, masked-resnet18.json takes 3; use Nx3xHxW",
        ),
        (
            [Profile((1, 3, 64), (1, 3, 512, 512), (8, 3, 1024, 1024))],  # type: ignore[arg-type]
            "min must have 4 dimensions, NxCxHxW",
        ),
        (
            [Profile((1, 3, 64.0, 64), (1, 3, 512, 512), (8, 3, 1024, 1024))],  # type: ignore[arg-type]
            "min must be four positive whole numbers",
        ),
        (
            [WIDE, Profile((1, 3, 64, 64), (1, 3, 512, 512), (8, 3, 1024, 1030))],
            "profile 1 (1x3x64x64:1x3x512x512:8x3x1024x1030): max width 1030 is outside",
        ),
    ],
)
def test_bad_profiles_are_named(artifact: Path, profiles: list[Profile], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_profiles(profiles, read_manifest(artifact))


def test_profile_for_picks_the_first_range_that_holds_the_shape() -> None:
    small = Profile((1, 3, 32, 32), (1, 3, 128, 128), (4, 3, 256, 256))
    large = Profile((1, 3, 32, 32), (1, 3, 512, 512), (1, 3, 1024, 1024))
    assert profile_for([small, large], (2, 3, 100, 250)) == 0
    assert profile_for([small, large], (1, 3, 100, 257)) == 1
    with pytest.raises(InputContractError) as caught:
        profile_for([small, large], (2, 3, 512, 512))
    assert str(caught.value).startswith(
        "input shape 2x3x512x512 is in no profile of this engine (0: 1x3x32x32..4x3x256x256, "
        "1: 1x3x32x32..1x3x1024x1024)"
    )


# --- settings and the cache key -------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        ({"builder_level": 6}, "--builder-level 6 is outside 0..5"),
        ({"builder_level": True}, "--builder-level True is outside 0..5"),
        ({"workspace_gib": 0}, "--workspace 0 must be a positive number of GiB"),
        ({"workspace_gib": float("nan")}, "--workspace nan must be a positive"),
        ({"hardware_compat": "turing"}, "--hardware-compat 'turing' is not one of none, ampere+"),
        ({"trust_host_code": "yes"}, "trust_host_code must be True or False"),
    ],
)
def test_bad_settings_are_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        replace(BuildSettings(), **change).validate()


def _key(**change: Any) -> str:
    fields: dict[str, Any] = {
        "onnx_sha256": "ab" * 32,
        "env": H200,
        "profiles": [WIDE],
        "settings": BuildSettings(),
    }
    fields.update(change)
    return cache_key(**fields)


def test_cache_key_is_the_same_in_another_process() -> None:
    code = (
        "from resfuse.export.engines import *; from resfuse.profiles import Profile; "
        "from resfuse.engine_manifest import BuildSettings; "
        "from resfuse.tensorrt_env import BuildEnvironment; "
        "print(cache_key('ab' * 32, BuildEnvironment('tensorrt', '10.13.0.35', '12.9', "
        "'linux-x86_64', 'NVIDIA H200', '9.0'), "
        "[Profile((1, 3, 32, 32), (1, 3, 512, 512), (4, 3, 1024, 1024))], BuildSettings()))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")  # another dict/set order, same key
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == _key()
    assert re.fullmatch(r"[0-9a-f]{64}", _key())


def test_cache_key_changes_with_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    other = Profile((1, 3, 32, 32), (1, 3, 256, 256), (32, 3, 1024, 1024))
    keys = [
        _key(),
        _key(onnx_sha256="ab" * 31 + "ac"),
        _key(env=replace(H200, tensorrt_version="10.13.2.6")),
        _key(env=replace(H200, cuda_version="12.8")),
        _key(env=replace(H200, gpu_name="NVIDIA H100 80GB HBM3")),
        _key(env=replace(H200, compute_capability="9.1")),
        _key(env=replace(H200, flavour="tensorrt-rtx")),
        _key(env=replace(H200, platform="linux-aarch64")),
        _key(profiles=[other]),
        _key(profiles=[WIDE, other]),
        _key(profiles=[other, WIDE]),
        _key(settings=BuildSettings(builder_level=4)),
        _key(settings=BuildSettings(workspace_gib=4)),
        _key(settings=BuildSettings(hardware_compat="ampere+")),
        _key(settings=BuildSettings(trust_host_code=True)),
    ]
    monkeypatch.setattr(engines, "ENGINE_CACHE_FORMAT", engines.ENGINE_CACHE_FORMAT + 1)
    keys.append(_key())
    assert len(set(keys)) == len(keys)
    monkeypatch.undo()
    assert _key(settings=BuildSettings(workspace_gib=4)) == _key(
        settings=BuildSettings(workspace_gib=4.0)
    )


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "resfuse" / "engines"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert default_cache_dir() == Path.home() / ".cache" / "resfuse" / "engines"


# --- engine manifests -----------------------------------------------------------------------


def test_engine_round_trip(artifact: Path, tmp_path: Path) -> None:
    settings = BuildSettings(builder_level=5, workspace_gib=2.5)
    path = _store(artifact, tmp_path, settings=settings)
    key = cache_key(read_manifest(artifact).record("onnx")["sha256"], H200, [WIDE], settings)
    assert path == tmp_path / f"masked-resnet18.{key[:16]}.json"
    engine = read_engine(path, H200)
    record, plan = engine.record, engine.plan
    assert plan == PLAN
    assert (record.key, record.profiles, record.settings, record.environment) == (
        key,
        (WIDE,),
        settings,
        H200,
    )
    assert record.source_manifest == "masked-resnet18.json"
    assert record.onnx_sha256 == read_manifest(artifact).record("onnx")["sha256"]
    assert record.precision == "float32" and record.build_seconds == 1.5
    assert record.plan_path.name == f"masked-resnet18.{key[:16]}.{record.plan_sha256[:12]}.plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, record.plan_path.name, f".masked-resnet18.{key[:16]}.lock"]
    )
    assert read_engine(record.plan_path).record == record  # by its plan: the manifest beside it


def test_tampered_or_missing_plan_is_never_returned(artifact: Path, tmp_path: Path) -> None:
    record = read_engine(_store(artifact, tmp_path)).record
    damaged = bytearray(PLAN)
    damaged[100] ^= 1
    record.plan_path.write_bytes(bytes(damaged))
    with pytest.raises(ManifestError, match="does not match the size and sha256 in .* not loaded"):
        read_engine(record.path)
    record.plan_path.write_bytes(PLAN[:-1])
    with pytest.raises(ManifestError, match="does not match the size and sha256"):
        read_engine(record.path)
    record.plan_path.unlink()
    with pytest.raises(ManifestError, match="is missing; rebuild the engine"):
        read_engine(record.path)


def _set(keys: str, value: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        *path, last = keys.split(".")
        for key in path:
            data = data[int(key)] if key.isdigit() else data[key]  # type: ignore[index]
        data[last] = value

    return change


@pytest.mark.parametrize(
    "change,message",
    [
        (_set("format", "resfuse-artifact"), 'is not a resfuse engine manifest (no "format"'),
        (_set("format_version", 3), "has engine format version 3, this resfuse reads 2"),
        (_set("key", "x" * 64), "field 'key' must be 64 lowercase hex digits"),
        (_set("profiles.0.min", [1, 3, 32]), "field 'profiles[0].min' must be 4 whole numbers"),
        (_set("profiles.0.opt", [1, 3, 0, 512]), "field 'profiles[0].opt[2]' must be an integer"),
        (
            _set("settings.builder_level", 9),
            "field 'settings.builder_level' must be an integer 0..5",
        ),
        (_set("settings.fp16", True), "field 'settings.fp16' must be absent"),
        (_set("environment.gpu_name", ""), "field 'environment.gpu_name' must be a non-empty"),
        (_set("files.plan.path", "../x.plan"), "field 'files.plan.path' must be a plain file name"),
        (_set("precision", "float64"), "field 'precision' must be one of"),
        (_set("build_seconds", -1), "field 'build_seconds' must be a number >= 0"),
        # valid fields that no longer hash to the key: edited to pass for another machine
        (_set("environment.gpu_name", "NVIDIA A100"), "field 'key' is not the hash of the fields"),
    ],
)
def test_edited_engine_manifest_is_refused(
    artifact: Path, tmp_path: Path, change: Any, message: str
) -> None:
    path = _store(artifact, tmp_path)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=re.escape(message)):
        read_engine(path, H200)


def test_not_json_engine_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "e.json").write_text("{ nope")
    with pytest.raises(ManifestError, match="cannot read engine manifest .* not JSON"):
        read_engine(tmp_path / "e.json")
    with pytest.raises(ManifestError, match="no engine manifest at .* build the engine"):
        read_engine(tmp_path / "absent.json")


def test_host_code_plan_needs_trust(artifact: Path, tmp_path: Path) -> None:
    path = _store(artifact, tmp_path, settings=BuildSettings(trust_host_code=True))
    with pytest.raises(EngineError, match="version-compatible plan: it carries host code"):
        read_engine(path, H200)
    engine = read_engine(path, H200, allow_host_code=True)
    record, plan = engine.record, engine.plan
    assert record.host_code and plan == PLAN


@pytest.mark.parametrize(
    "here,message",
    [
        (
            replace(H200, tensorrt_version="11.4.0"),
            "engine built for TensorRT 10.13.0.35, this "
            "machine has 11.4.0; rebuild it with resfuse-build masked-resnet18.json",
        ),
        (replace(H200, cuda_version="13.0"), "engine built for CUDA 12.9, this machine has 13.0"),
        (
            replace(H200, gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0"),
            "engine built for GPU NVIDIA H200, this machine has NVIDIA A100-SXM4-80GB",
        ),
        (replace(H200, compute_capability="9.1"), "engine built for compute capability 9.0"),
        (replace(H200, flavour="tensorrt-rtx"), "engine built for flavour tensorrt, this"),
        (
            replace(H200, platform="linux-aarch64-tegra"),
            "engine built for platform linux-x86_64, this machine has linux-aarch64-tegra",
        ),
    ],
)
def test_environment_mismatch_names_the_field(
    artifact: Path, tmp_path: Path, here: BuildEnvironment, message: str
) -> None:
    path = _store(artifact, tmp_path)
    with pytest.raises(EngineError, match=re.escape(message)):
        read_engine(path, here)
    assert read_engine(path).plan == PLAN  # no machine given: nothing to compare


def test_compatible_plans_run_where_tensorrt_says_they_do(artifact: Path, tmp_path: Path) -> None:
    ampere = _store(artifact, tmp_path, settings=BuildSettings(hardware_compat="ampere+"))
    read_engine(ampere, replace(H200, gpu_name="NVIDIA A10", compute_capability="8.6"))
    with pytest.raises(EngineError, match="compute capability 8.0 and later .* has 7.5"):
        read_engine(ampere, replace(H200, gpu_name="Tesla T4", compute_capability="7.5"))

    portable = _store(artifact, tmp_path, settings=BuildSettings(trust_host_code=True))
    for version, cuda in (("10.16.1", "12.9"), ("11.4.0", "12.9"), ("10.13.0.35", "12.4")):
        read_engine(portable, replace(H200, tensorrt_version=version, cuda_version=cuda), True)
    for here in (replace(H200, tensorrt_version="10.12.0"), replace(H200, cuda_version="13.0")):
        with pytest.raises(EngineError, match="engine built for (TensorRT|CUDA)"):
            read_engine(portable, here, allow_host_code=True)


def test_ampere_plus_is_refused_on_jetson(artifact: Path, tmp_path: Path) -> None:
    ampere = _store(artifact, tmp_path, settings=BuildSettings(hardware_compat="ampere+"))
    orin = replace(H200, platform="linux-aarch64-tegra", gpu_name="Orin", compute_capability="8.7")
    with pytest.raises(EngineError, match="ampere\\+, which NVIDIA does not support on Jetson"):
        read_engine(ampere, orin)


def test_rtx_plans_run_on_their_targets_only(artifact: Path, tmp_path: Path) -> None:
    """A TensorRT-RTX plan names no GPU, only compute capabilities; here is one GPU."""
    rtx = replace(H200, flavour="tensorrt-rtx", tensorrt_version="1.7.1.116", cuda_version="12")
    built = replace(rtx, gpu_name=tensorrt_env.ANY_GPU, compute_capability="8.6,8.9,12.0")
    path = _store(artifact, tmp_path, env=built)
    assert read_engine(path, built).plan == PLAN  # checked against its own targets
    read_engine(path, replace(rtx, gpu_name="NVIDIA RTX 4090", compute_capability="8.9"))
    with pytest.raises(EngineError, match="built for compute capability 8.6,8.9,12.0, .* has 9.0"):
        read_engine(path, rtx)  # an H100-class GPU


def test_rewritten_entry_leaves_one_plan(artifact: Path, tmp_path: Path) -> None:
    """A rebuild under the same key (a damaged entry) replaces the plan: the old one goes."""
    _store(artifact, tmp_path)
    manifest = read_manifest(artifact)
    path = store_engine(tmp_path, manifest, [WIDE], BuildSettings(), H200, PLAN[::-1], 2.0)
    assert read_engine(path).plan == PLAN[::-1]
    assert len(list(tmp_path.glob("*.plan"))) == 1


def test_replace_file_swaps_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "timing.cache"
    replace_file(target, b"first")
    replace_file(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timing.cache"]  # no temporaries


def test_timing_cache_must_be_a_file_path(artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--timing-cache .* is a folder; give a file path"):
        find_or_build(artifact, cache_dir=tmp_path / "c", timing_cache=tmp_path, env=H200)


def test_export_engine_copies_atomically(artifact: Path, tmp_path: Path) -> None:
    path = _store(artifact, tmp_path / "cache")
    copied = export_engine(read_engine(path), tmp_path / "out")
    assert copied == tmp_path / "out" / path.name
    engine = read_engine(copied, H200)
    record, plan = engine.record, engine.plan
    assert plan == PLAN and record.key == read_engine(path).record.key


# --- find_or_build --------------------------------------------------------------------------


def test_cache_hit_imports_no_tensorrt(artifact: Path, tmp_path: Path) -> None:
    path = _store(artifact, tmp_path)  # written here, through the writer
    code = f"""
import json, sys, time
from resfuse.export.engines import find_or_build
from resfuse.tensorrt_env import BuildEnvironment
env = BuildEnvironment(*{list(H200.to_dict().values())!r})
start = time.perf_counter()
found = find_or_build({str(artifact)!r}, cache_dir={str(tmp_path)!r}, env=env, rebuild=False)
path = found.record.path
seconds = time.perf_counter() - start
heavy = ("tensorrt", "tensorrt_rtx", "polygraphy", "resfuse.export.tensorrt_build")
loaded = [m for m in heavy if m in sys.modules]
print(json.dumps({{"path": str(path), "seconds": seconds, "loaded": loaded}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["path"] == str(path)
    assert result["loaded"] == []
    assert result["seconds"] < 1.0, result


def test_no_rebuild_names_the_field_or_takes_a_compatible_engine(
    artifact: Path, tmp_path: Path
) -> None:
    here = replace(H200, tensorrt_version="11.4.0")
    with pytest.raises(EngineError, match="no engine of masked-resnet18.json with these profiles"):
        find_or_build(artifact, cache_dir=tmp_path, env=here, rebuild=False)
    _store(artifact, tmp_path)  # the same inputs, built with TensorRT 10.13
    with pytest.raises(
        EngineError, match=re.escape("TensorRT 10.13.0.35, this machine has 11.4.0")
    ):
        find_or_build(artifact, cache_dir=tmp_path, env=here, rebuild=False)

    ampere = BuildSettings(hardware_compat="ampere+")
    built = _store(artifact, tmp_path, settings=ampere)
    a10 = replace(H200, gpu_name="NVIDIA A10", compute_capability="8.6")
    assert (
        find_or_build(artifact, None, ampere, tmp_path, env=a10, rebuild=False).record.path == built
    )


def test_damaged_entry_is_refused_or_rebuilt(artifact: Path, tmp_path: Path) -> None:
    record = read_engine(_store(artifact, tmp_path)).record
    sidecar = record.path.read_text()
    record.path.write_text(sidecar.replace('"build_seconds": 1.5', '"build_seconds": "1.5"'))
    with pytest.raises(ManifestError, match="field 'build_seconds' must be a number"):
        find_or_build(artifact, cache_dir=tmp_path, env=H200, rebuild=False)
    record.path.write_text(sidecar)
    record.plan_path.write_bytes(b"not the plan")
    with pytest.raises(ManifestError, match="does not match the size and sha256"):
        find_or_build(artifact, cache_dir=tmp_path, env=H200, rebuild=False)
    if NO_TENSORRT is not None:  # rebuilding goes as far as the builder's import
        with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
            find_or_build(artifact, cache_dir=tmp_path, env=H200)


def _old_int8(data: dict[str, Any]) -> None:
    """An INT8 manifest written before `targets` existed: its graph was the CPU's."""
    data["precision"] = "int8"
    data.pop("targets", None)


@pytest.mark.parametrize(
    "change,message",
    [
        (_old_int8, "(int8) is made for cpu, not TensorRT: its INT8 activations are uint8"),
        (_set("targets", ["cpu"]), "(float32) is made for cpu, not TensorRT"),
    ],
)
def test_artifacts_for_other_targets_are_refused(
    artifact: Path, tmp_path: Path, change: Any, message: str
) -> None:
    edited = _edit(artifact, tmp_path / "a", change)
    with pytest.raises(ConfigError, match=re.escape(message)):
        find_or_build(edited, cache_dir=tmp_path, env=H200)


def test_int8_for_tensorrt_passes_the_target_check(artifact: Path, tmp_path: Path) -> None:
    def tensorrt_int8(data: dict[str, Any]) -> None:
        data["precision"], data["targets"] = "int8", ["tensorrt"]

    edited = _edit(artifact, tmp_path / "a", tensorrt_int8)
    with pytest.raises(EngineError, match="no engine of masked-resnet18.json"):
        find_or_build(edited, cache_dir=tmp_path, env=H200, rebuild=False)


def test_validation_comes_before_tensorrt(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad profiles and settings are named before any TensorRT module is imported."""
    for module in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, module, None)  # an import now fails at once
    bad = [Profile((1, 3, 32, 32), (1, 3, 512, 512), (32, 3, 4096, 1024))]
    for engine in ("tensorrt", "tensorrt-rtx"):
        with pytest.raises(ConfigError, match="max height 4096"):
            find_or_build(artifact, bad, cache_dir=tmp_path, engine=engine)
        with pytest.raises(ConfigError, match="--builder-level 9"):
            find_or_build(
                artifact, settings=BuildSettings(builder_level=9), cache_dir=tmp_path, engine=engine
            )
    with pytest.raises(BackendUnavailableError, match="TensorRT-RTX is not installed"):
        find_or_build(artifact, cache_dir=tmp_path, engine="tensorrt-rtx")
    with pytest.raises(BackendUnavailableError, match="neither TensorRT nor TensorRT-RTX"):
        find_or_build(artifact, cache_dir=tmp_path)


# --- the command line -----------------------------------------------------------------------


def _cli(*args: str | Path) -> Any:
    return CliRunner().invoke(build_cli.main, [str(a) for a in args])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--profile", "1x3x64x64:1x3x512x512:8x3x4096x4096"], "max height 4096 is outside"),
        (["--opt", "1x3x600x600", "--max", "2x3x512x512"], "height runs min 32, opt 600, max 512"),
        (["--min", "1x3x64"], "--min '1x3x64' is not a shape"),
        (["--opt", "1x1x512x512"], "opt has 1 channels, masked-resnet18.json takes 3"),
        (["--profile", "1x3x64x64:1x3x64x64:1x3x64x64", "--opt", "1x3x64x64"], "not both"),
        (["--output", "/proc/resfuse"], "cannot write into /proc/resfuse"),
        (["--cache-dir", "/proc/resfuse"], "choose a writable --cache-dir"),
        (["--builder-level", "7"], "7 is not in the range 0<=x<=5"),
        (["--hardware-compat", "turing"], "'turing' is not one of 'none', 'ampere+'"),
    ],
)
def test_cli_validates_before_tensorrt(
    artifact: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    result = _cli(artifact, "--cache-dir", tmp_path / "cache", *args)
    assert result.exit_code in (1, 2), result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "TensorRT is not installed" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_refuses_a_missing_artifact(tmp_path: Path) -> None:
    result = _cli(tmp_path / "absent.json")
    assert result.exit_code == 1 and "no manifest at" in result.stderr


def test_cli_finds_a_cached_engine_and_copies_it(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The H200 stands in for the GPU and TensorRT this machine lacks; the rest is real."""
    monkeypatch.setattr(tensorrt_env, "current_environment", lambda name=None: H200)
    cache, out = tmp_path / "cache", tmp_path / "out"
    missing = _cli(artifact, "--engine", "tensorrt", "--cache-dir", cache, "--no-rebuild")
    assert missing.exit_code == 1 and "no engine of masked-resnet18.json" in missing.stderr
    path = _store(artifact, cache)
    result = _cli(
        artifact, "--engine", "tensorrt", "--cache-dir", cache, "--no-rebuild", "--output", out
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == str(out / path.name)
    assert (
        "found in the cache: float32 engine for tensorrt 10.13.0.35 (CUDA 12.9, linux-x86_64)"
    ) in result.stdout
    assert "profile 0: 1x3x32x32:1x3x512x512:4x3x1024x1024" in result.stdout
    assert read_engine(out / path.name, H200).plan == PLAN


@without_tensorrt
def test_cli_without_tensorrt_says_what_to_install(artifact: Path, tmp_path: Path) -> None:
    """As a user runs it: a subprocess, one line on stderr, exit 1, after validation."""
    exe = Path(sys.executable).with_name("resfuse-build")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "resfuse.export.build_cli"]
    proc = subprocess.run(
        [*command, str(artifact), "--engine", "tensorrt", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not installed"), lines
    assert "pip install 'resfuse[gpu]'" in lines[0] and "Traceback" not in proc.stderr


# --- mypy against tensorrt-stubs ------------------------------------------------------------

_CANARY = """import tensorrt as trt

trt.Builder(trt.Logger(trt.Logger.WARNING)).create_network(flags="strongly typed")
"""


def _readable_stubs(folder: Path) -> Path:
    """tensorrt-stubs as mypy can read them. The wheel installs plain tensorrt/ and
    tensorrt_bindings/ folders of .pyi files (no -stubs suffix, no py.typed), which mypy skips in
    site-packages, so they go on MYPYPATH; a few generated signatures are not Python (a
    parameter named `in`, a required one after defaults) and become (*args, **kwargs)."""
    try:
        dist = metadata.distribution("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        pytest.fail("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs")
    signature = re.compile(r"^(\s*)def (\w+)\(.*\)( -> .+)?:$")
    for file in dist.files or []:
        if file.suffix != ".pyi":
            continue
        lines = Path(str(dist.locate_file(file))).read_text().splitlines()
        for _ in range(50):
            try:
                ast.parse("\n".join(lines))
                break
            except SyntaxError as exc:
                line = exc.lineno - 1 if exc.lineno else -1
                match = signature.match(lines[line]) if line >= 0 else None
                assert match, f"{file}:{exc.lineno}: cannot repair {exc.msg}"
                lines[line] = f"{match[1]}def {match[2]}(*args: typing.Any, **kwargs: typing.Any)"
                lines[line] += f"{match[3] or ''}:"
        target = folder / str(file)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(lines) + "\n")
    return folder


def _installed_layout(folder: Path) -> Path:
    """resfuse as installed (export/ as resfuse/export, runtime/ as resfuse/runtime) in symlinks:
    mypy cannot follow the editable install's import hook, and would take resfuse.* as Any."""
    package = folder / "resfuse"
    package.mkdir(parents=True)
    for entry in (ROOT / "resfuse").iterdir():
        (package / entry.name).symlink_to(entry)
    for name in ("export", "runtime"):
        (package / name).symlink_to(ROOT / name)
    return folder


def test_tensorrt_code_type_checks_against_the_stubs(tmp_path: Path) -> None:
    """Hollow unless `tensorrt` resolves to the stubs: the canary's wrong call must be caught."""
    stubs = _readable_stubs(tmp_path / "stubs")
    source = _installed_layout(tmp_path / "src")
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\npython_version = 3.11\nignore_missing_imports = True\n"
        "follow_imports = silent\n"
        "[mypy-tensorrt.*,tensorrt,tensorrt_bindings.*,tensorrt_bindings]\nignore_errors = True\n"
        # resfuse's own imports are checked; the heavy libraries behind them are not needed
        "[mypy-torch.*,torchvision.*,onnx.*,onnxruntime.*,onnxscript.*,numpy.*]\n"
        "follow_imports = skip\n"
    )
    (tmp_path / "canary.py").write_text(_CANARY)
    files = ["resfuse/export/tensorrt_build.py"]  # and the runtime's, once it exists
    files += [f for f in ["resfuse/runtime/backends/tensorrt.py"] if (source / f).exists()]
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or "mypy"
    cache = str(tmp_path / "cache")
    proc = subprocess.run(
        [
            mypy,
            "--config-file",
            str(config),
            "--cache-dir",
            cache,
            *files,
            str(tmp_path / "canary.py"),
        ],
        capture_output=True,
        text=True,
        cwd=source,
        env=dict(os.environ, MYPYPATH=f"{stubs}{os.pathsep}{source}"),
        timeout=600,
    )
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    canary = [e for e in errors if "canary.py" in e]
    assert canary and '"create_network" of "Builder" has incompatible type "str"' in canary[0], (
        f"tensorrt did not resolve to tensorrt-stubs, so the check would pass anything:\n"
        f"{proc.stdout}{proc.stderr}"
    )
    assert [e for e in errors if "canary.py" not in e] == [], proc.stdout


# --- with TensorRT and a GPU ----------------------------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("method", ["upsample", "spp", "masked"])
def test_build_fp32_engine_then_hit_the_cache(
    exported: dict[str, ExportResult], tmp_path: Path, method: str
) -> None:
    trt = import_flavour(FLAVOURS["tensorrt"])
    artifact = exported[method].manifest_path
    profile = Profile((1, 3, 32, 32), (1, 3, 256, 256), (2, 3, 512, 512))
    built = find_or_build(artifact, [profile], BuildSettings(builder_level=0), tmp_path)
    engine = read_engine(built.record.path, tensorrt_env.current_environment("tensorrt"))
    record, plan = engine.record, engine.plan
    assert record.precision == "float32" and record.profiles == (profile,)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    assert engine is not None and engine.num_optimization_profiles == 1
    assert engine.get_tensor_name(0) == read_manifest(artifact).input_name
    assert list((tmp_path).glob("timing-*.cache")), "the timing cache was not saved"

    start = time.perf_counter()
    again = find_or_build(artifact, [profile], BuildSettings(builder_level=0), tmp_path)
    assert again.record == built.record
    assert time.perf_counter() - start < 1.0


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_changed_onnx_builds_a_new_engine(artifact: Path, tmp_path: Path) -> None:
    import onnx

    settings, profile = BuildSettings(builder_level=0), [WIDE]
    first = find_or_build(artifact, profile, settings, tmp_path / "cache")
    model = onnx.load_model_from_string(read_manifest(artifact).read("onnx"))
    model.doc_string = "changed after the first build"
    changed = tmp_path / "changed.onnx"
    onnx.save(model, changed)

    def point_at_changed(data: dict[str, Any]) -> None:
        import hashlib

        blob = changed.read_bytes()
        data["files"]["onnx"].update(
            path=changed.name, sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob)
        )

    edited = _edit(artifact, tmp_path, point_at_changed)
    second = find_or_build(edited, profile, settings, tmp_path / "cache")
    assert second != first
    assert second.record.onnx_sha256 != first.record.onnx_sha256
