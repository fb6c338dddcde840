"""Validation of a manifest, which is plain JSON anyone can write: every field resfuse reads is
checked for type, range and allowed values before use, and a bad one is named in one line."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from resfuse.errors import ManifestError, ResfuseError
from resfuse.images import PreprocessError, check_preprocess
from resfuse.precisions import TARGETS, dtypes

# What a manifest is, named beside its fields. This module validates parsed JSON and knows
# nothing of Manifest or of reading files, so artifacts.py imports it and never the other way.
FORMAT = "resfuse-artifact"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: files named NAME.onnx; same fields otherwise
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_KEYS = ("onnx", "weights")  # no ONNX external data: one self-contained .onnx file


class _Fields:
    """Typed lookups in one manifest; each failure names the manifest and the dotted field."""

    FIX = "re-export the artifact with resfuse-export rather than editing its manifest"

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, expected: str, got: object) -> NoReturn:
        shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
        raise ManifestError(
            f"{self.path}: field {field!r} must be {expected}, got {shown}; {self.FIX}"
        )

    def section(self, data: dict[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
        value = data.get(key) if isinstance(data, dict) else None
        if not isinstance(value, dict):
            self.fail(prefix + key, "an object", value)
        return value

    def integer(self, value: object, field: str, low: int = 0, high: int | None = None) -> int:
        if type(value) is not int or value < low or (high is not None and value > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            self.fail(field, f"an integer {span}", value)
        return value

    def number(self, value: object, field: str, positive: bool = False) -> float:
        ok = type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]
        if not ok or value < 0 or (positive and value == 0):  # type: ignore[operator]
            self.fail(field, "a positive number" if positive else "a number >= 0", value)
        return float(value)  # type: ignore[arg-type]

    def text(self, value: object, field: str, choices: Sequence[str] = ()) -> str:
        if not isinstance(value, str) or not value or (choices and value not in choices):
            self.fail(field, f"one of {list(choices)}" if choices else "a non-empty string", value)
        return value

    def flag(self, value: object, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, "true or false", value)
        return value


def validate_manifest(data: object, path: Path) -> None:
    """Raise ManifestError naming the first field that is missing, mistyped or out of range."""
    f = _Fields(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f'{path} is not a resfuse manifest (no "format": "{FORMAT}")')
    version = data.get("format_version")
    if version not in READABLE_VERSIONS or type(version) is not int:
        raise ManifestError(
            f"{path} has format version {version!r}, this resfuse reads {list(READABLE_VERSIONS)}; "
            f"re-export the artifact with this version of resfuse"
        )
    config = _model(f, data)
    _input(f, data, config)
    _output(f, data, config)
    _files(f, data)
    _preprocess(f, data, config.in_channels)
    precision = f.text(data.get("precision"), "precision", dtypes())
    if "targets" in data:
        _targets(f, data["targets"])
    if "source" in data:
        _source(f, data["source"], precision)
    if "quantization" in data and not isinstance(data["quantization"], dict):
        f.fail("quantization", "an object", data["quantization"])
    if "parity" in data:
        _parity(f, data)
    if "class_names" in data:
        _class_names(f, data["class_names"], config.num_classes)
    for key in ("name", "created", "weights_source"):
        if key in data:
            f.text(data[key], key)
    if "export_seconds" in data:
        f.number(data["export_seconds"], "export_seconds")
    versions = data.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        f.fail("versions", "an object of version strings", versions)


def _class_names(f: _Fields, names: object, classes: int | None) -> None:
    """A head's class names (DICOM SEG segment labels): one per class, distinct, short."""
    ok = (
        isinstance(names, list)
        and len(names) == classes
        and all(isinstance(n, str) and n.strip() and len(n) <= 64 for n in names)
        and len(set(names)) == len(names)
    )
    if not ok:
        f.fail("class_names", f"{classes or 0} distinct names of 1..64 characters", names)


def _targets(f: _Fields, targets: object) -> None:
    ok = (
        isinstance(targets, list)
        and bool(targets)
        and all(isinstance(t, str) and t in TARGETS for t in targets)
        and len(set(targets)) == len(targets)
    )
    if not ok:
        f.fail("targets", f"a list of {', '.join(TARGETS)}, each at most once", targets)


def _source(f: _Fields, source: object, precision: str) -> None:
    """The float32 graph a variant was made from: its artifact's name and its ONNX sha256."""
    if not isinstance(source, dict) or set(source) != {"name", "onnx_sha256"}:
        f.fail("source", "an object with name and onnx_sha256", source)
    name = f.text(source["name"], "source.name")
    if not _plain(name):
        f.fail("source.name", "a plain artifact name", name)
    sha = source["onnx_sha256"]
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        f.fail("source.onnx_sha256", "64 lowercase hex digits", sha)
    if precision == "float32":
        f.fail("source", "absent for a float32 artifact (it is its own source)", source)


def _model(f: _Fields, data: dict[str, Any]) -> Any:
    from resfuse.models.spec import ModelConfig

    model = f.section(data, "model")
    known = ModelConfig.field_names()
    unknown = sorted(set(model) - set(known))
    if unknown:
        f.fail(f"model.{unknown[0]}", f"absent (known fields: {', '.join(known)})", "set")
    for key in ("method", "backbone"):
        f.text(model.get(key), f"model.{key}")
    for key in ("stage", "in_channels", "features"):
        f.integer(model.get(key), f"model.{key}", 1, 4096)
    if model.get("num_classes") is not None:
        f.integer(model["num_classes"], "model.num_classes", 1, 65536)
    _method_options(f, model)
    try:
        return ModelConfig.from_dict(model)
    except ResfuseError as exc:  # an unknown method or backbone, an unsupported stage
        raise ManifestError(
            f"{f.path}: field 'model' is not a model resfuse builds: {exc}"
        ) from None


def _method_options(f: _Fields, model: dict[str, Any]) -> None:
    """Each fusion method's options, checked by the method that declares them."""
    from resfuse.models.spec import declared_options

    for key, option in declared_options().items():
        try:
            if key in model:
                option.parse(model[key])
        except ResfuseError as exc:
            raise ManifestError(f"{f.path}: field 'model.{key}' does not fit: {exc}") from None


def _range(f: _Fields, contract: dict[str, Any], key: str, low: int) -> None:
    span = f.section(contract, key, "input.contract.")
    field = f"input.contract.{key}"
    start = f.integer(span.get("min"), f"{field}.min", low)
    if span.get("max") is not None:
        f.integer(span["max"], f"{field}.max", start)
    if set(span) - {"min", "max"}:
        f.fail(field, "an object with min and max", span)


def _input(f: _Fields, data: dict[str, Any], config: Any) -> None:
    section = f.section(data, "input")
    f.text(section.get("name"), "input.name")
    f.text(section.get("layout"), "input.layout", ("NCHW",))
    contract = f.section(section, "contract", "input.")
    channels = f.integer(contract.get("channels"), "input.contract.channels", 1)
    if channels != config.in_channels:
        f.fail("input.contract.channels", f"model.in_channels ({config.in_channels})", channels)
    f.text(contract.get("dtype"), "input.contract.dtype", ("float32",))
    _range(f, contract, "height", config.stride)
    _range(f, contract, "width", config.stride)
    _range(f, contract, "batch", 1)


def _output(f: _Fields, data: dict[str, Any], config: Any) -> None:
    section = f.section(data, "output")
    f.text(section.get("name"), "output.name", (config.output_name,))
    channels = f.integer(section.get("channels"), "output.channels", 1)
    if channels != config.out_channels:
        f.fail("output.channels", f"{config.out_channels} for this model", channels)
    f.text(section.get("layout"), "output.layout", ("NCHW",))


def _files(f: _Fields, data: dict[str, Any]) -> None:
    files = f.section(data, "files")
    extra = sorted(set(files) - set(_FILE_KEYS))
    if extra:
        f.fail(f"files.{extra[0]}", f"absent: an artifact has exactly {list(_FILE_KEYS)}", "set")
    for key in _FILE_KEYS:
        record = f.section(files, key, "files.")
        name = record.get("path")
        if not isinstance(name, str) or not _plain(name):
            f.fail(f"files.{key}.path", "a plain file name in the manifest's folder", name)
        sha = record.get("sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            f.fail(f"files.{key}.sha256", "64 lowercase hex digits", sha)
        f.integer(record.get("bytes"), f"files.{key}.bytes", 1)
    onnx = files["onnx"]
    if "opset" in onnx:
        f.integer(onnx["opset"], "files.onnx.opset", 7, 99)
    if "simplified" in onnx:
        f.flag(onnx["simplified"], "files.onnx.simplified")
    if "simplify" in onnx:
        f.text(onnx["simplify"], "files.onnx.simplify")


def _plain(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and Path(name).name == name
    )


def _preprocess(f: _Fields, data: dict[str, Any], channels: int) -> None:
    try:
        check_preprocess(data.get("preprocess"), channels)
    except PreprocessError as exc:
        raise ManifestError(f"{f.path}: {exc.problem}; re-export the artifact") from None


def _parity(f: _Fields, data: dict[str, Any]) -> None:
    parity = f.section(data, "parity")
    for key in ("atol", "rtol"):
        if key in parity:
            f.number(parity[key], f"parity.{key}")
    if parity.get("max_rel_l2") is not None:
        f.number(parity["max_rel_l2"], "parity.max_rel_l2")
    if "results" in parity and not isinstance(parity["results"], list):
        f.fail("parity.results", "a list", parity["results"])
    if "inputs" in parity:  # older manifests have none: their sweeps ran on random inputs
        inputs = f.section(parity, "inputs", "parity.")
        kind = f.text(inputs.get("kind"), "parity.inputs.kind", ("random normal", "images"))
        if kind == "images":
            f.text(inputs.get("folder"), "parity.inputs.folder")
