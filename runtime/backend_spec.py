"""Backend specs, one grammar for every command and for resfuse.runtime.load: NAME, or
NAME:KEY=VALUE[,KEY=VALUE] (`openvino:precision=bf16,threads=2`). Values `true` and `false` are
booleans, whole numbers are ints, anything else a string."""

from __future__ import annotations

import re
from typing import Any

from resfuse.errors import ConfigError
from resfuse.runtime.backends import threaded

_FORM = "options go as NAME:KEY=VALUE[,KEY=VALUE], e.g. openvino:precision=bf16,threads=2"
# ':' between pairs is the form resfuse-bench took first (onnxruntime:spinning=false:threads=3).
_PAIRS = re.compile("[,:]")


def _typed(value: str) -> bool | int | str:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return int(value) if value.isdigit() else value


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'openvino:precision=bf16' -> ('openvino', {'precision': 'bf16'})."""
    name, sep, rest = spec.strip().partition(":")
    if not name or "=" in name:
        raise ConfigError(f"backend {spec!r} names no backend; {_FORM}")
    options: dict[str, Any] = {}
    for pair in _PAIRS.split(rest) if sep else []:
        key, eq, value = pair.partition("=")
        if not eq or not key or not value:
            raise ConfigError(f"backend {spec!r}: {_FORM}; got {pair!r}")
        if key in options:
            raise ConfigError(f"backend {spec!r} sets {key} twice; give it once")
        options[key] = _typed(value)
    return name, options


def format_spec(name: str, options: dict[str, Any]) -> str:
    """The spec parse_spec reads back as (name, options): how a command hands a backend with
    options to code that takes one backend string (predict, serve's replicas)."""
    if not options:
        return name
    text = {True: "true", False: "false"}
    pairs = (f"{k}={text[v] if isinstance(v, bool) else v}" for k, v in options.items())
    return f"{name}:{','.join(pairs)}"


def split_specs(text: str) -> list[str]:
    """resfuse-bench's comma-separated --backends: a KEY=VALUE piece with no backend name before
    it belongs to the spec before it ('openvino:precision=bf16,threads=2,torch' is two)."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if specs and "=" in piece and ":" not in piece:
            specs[-1] += f",{piece}"
        elif piece:
            specs.append(piece)
    return specs


def merge_options(spec: str, given: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The spec's name and its options joined with keyword options; one option set two ways
    to two values is refused rather than one silently winning."""
    name, options = parse_spec(spec)
    clashes = sorted(k for k in options.keys() & given.keys() if options[k] != given[k])
    if clashes:
        key = clashes[0]
        raise ConfigError(
            f"backend {spec!r} sets {key}={options[key]!r} but {key}={given[key]!r} was given "
            f"too; set it in one place"
        )
    return name, options | given


def with_threads(spec: str, threads: int | None) -> str:
    """The spec with --threads among its options; refused for a backend with no CPU threads."""
    if threads is None:
        return format_spec(*parse_spec(spec))
    name, _ = parse_spec(spec)
    if name not in threaded():
        raise ConfigError(
            f"backend {name} takes no --threads (only {', '.join(threaded())} run on CPU "
            f"threads); leave --threads out"
        )
    return format_spec(*merge_options(spec, {"threads": threads}))
