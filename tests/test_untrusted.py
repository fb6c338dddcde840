"""Manifests and models are untrusted input: every bad field is named, every file a manifest names
stays in its folder, the bytes hashed are the bytes loaded, and fuzzed files raise typed errors."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resfuse import runtime
from resfuse.artifacts import read_manifest, sha256_of
from resfuse.errors import ConfigError, ManifestError, ModelLoadError, SessionClosedError
from resfuse.export.pipeline import ExportOptions, export_artifact
from resfuse.models import ModelConfig

_DELETE = object()


def _copy(result: Any, folder: Path) -> tuple[Path, dict[str, Any]]:
    """A private copy of an exported artifact, and its manifest's data to edit."""
    for path in (result.manifest_path, result.onnx_path, result.weights_path):
        shutil.copy(path, folder)
    manifest = folder / result.manifest_path.name
    return manifest, json.loads(manifest.read_text())


def _point_at(manifest: Path, data: dict[str, Any], key: str, target: Path) -> None:
    """Rewrite the manifest so that file `key` is `target`, with a matching size and sha256."""
    data["files"][key].update(
        path=target.name, sha256=sha256_of(target), bytes=target.stat().st_size
    )
    manifest.write_text(json.dumps(data))


def _set(data: dict[str, Any], dotted: str, value: object) -> dict[str, Any]:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize(
    "field,value",
    [
        ("files.onnx", "model.onnx"),  # the wrong type: once an AttributeError
        ("files.onnx.sha256", _DELETE),  # once a KeyError
        ("files.onnx.sha256", "ABC"),
        ("files.weights.bytes", -1),
        ("files.weights.bytes", "12"),
        ("files.onnx.path", "/etc/passwd"),
        ("files.onnx.path", "../other/model.onnx"),
        ("files.onnx.path", "sub/model.onnx"),
        ("files.extra", {"path": "x.bin", "sha256": "0" * 64, "bytes": 1}),
        ("model.method", "transformer"),
        ("model.stage", 7),
        ("model.stage", True),
        ("model.features", 2.5),
        ("model.levels", []),
        ("model.colour", "red"),
        ("input.name", 3),
        ("input.layout", "NHWC"),
        ("input.contract.channels", 4),
        ("input.contract.height.min", 8),
        ("input.contract.height.max", 16),
        ("input.contract.batch", [1, 8]),
        ("input.contract.dtype", "float16"),
        ("output.channels", 5),
        ("output.name", "logits"),
        ("precision", "int4"),
        ("precision", _DELETE),
        ("targets", ["gpu"]),
        ("targets", "cpu"),
        ("source", {"name": "masked-resnet18", "onnx_sha256": "0" * 64}),  # float32's is itself
        ("parity.atol", -1),
        ("parity.max_rel_l2", "big"),
        ("parity.rtol", float("nan")),
        ("preprocess", None),
        ("export_seconds", -3),
        ("versions", ["torch"]),
    ],
)
def test_each_bad_field_is_named_in_one_line(
    exported, tmp_path: Path, field: str, value: object
) -> None:
    manifest, data = _copy(exported["masked"], tmp_path)
    manifest.write_text(json.dumps(_set(data, field, value)))
    with pytest.raises(ManifestError) as info:
        runtime.load(manifest)
    message = str(info.value)
    assert "\n" not in message
    top = field.split(".")[0]
    named = (f"field '{field}'", f"field '{top}'", f": {top} must")
    assert any(n in message for n in named), message


def test_a_manifest_cannot_point_at_another_model(exported, tmp_path: Path) -> None:
    """Once a manifest beside model.onnx could name an absolute path to another model."""
    other = exported["spp"]
    manifest, data = _copy(exported["masked"], tmp_path)
    data["files"]["onnx"].update(
        path=str(other.onnx_path), sha256=sha256_of(other.onnx_path), bytes=other.onnx_bytes
    )
    manifest.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="'files.onnx.path' must be a plain file name"):
        runtime.load(manifest)


def test_the_bytes_checked_are_the_bytes_loaded(exported, tmp_path: Path) -> None:
    manifest_path, _ = _copy(exported["masked"], tmp_path)
    manifest = read_manifest(manifest_path)
    data = manifest.read("onnx")
    assert len(data) == exported["masked"].onnx_bytes
    onnx_file = tmp_path / manifest.record("onnx")["path"]
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])  # truncated after the manifest was read
    with pytest.raises(ManifestError, match="changed, truncated or replaced"):
        manifest.read("onnx")
    onnx_file.write_bytes(data + b"extra")
    with pytest.raises(ManifestError, match="changed, truncated or replaced"):
        manifest.read("onnx")


def test_external_data_is_refused(exported, tmp_path: Path) -> None:
    manifest, data = _copy(exported["masked"], tmp_path)
    model = onnx.load(tmp_path / data["files"]["onnx"]["path"])
    external = tmp_path / "external.onnx"
    onnx.save_model(model, external, save_as_external_data=True, location="weights.bin")
    _point_at(manifest, data, "onnx", external)
    with pytest.raises(ModelLoadError, match="external data files, which resfuse does not load"):
        runtime.load(manifest)


def test_a_graph_onnxruntime_rejects_is_a_typed_error(exported, tmp_path: Path) -> None:
    manifest, data = _copy(exported["masked"], tmp_path)
    model = onnx.load(tmp_path / data["files"]["onnx"]["path"])
    model.graph.node[0].op_type = "NoSuchOperator"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    _point_at(manifest, data, "onnx", broken)
    with pytest.raises(ModelLoadError, match="ONNX Runtime refused broken.onnx: .*NoSuchOperator"):
        runtime.load(manifest)


def test_weights_that_do_not_fit_the_manifest_are_a_typed_error(exported, tmp_path: Path) -> None:
    manifest, data = _copy(exported["masked"], tmp_path)
    other = Path(shutil.copy(exported["spp"].weights_path, tmp_path))
    _point_at(manifest, data, "weights", other)
    with pytest.raises(ManifestError, match="does not hold the weights of the model"):
        runtime.load(manifest, backend="torch")


def test_run_after_close_and_bad_options(exported) -> None:
    path = exported["masked"].manifest_path
    session = runtime.load(path)
    session.close()
    session.close()  # idempotent
    with pytest.raises(SessionClosedError, match="is closed; open a new one"):
        session.run(np.zeros((1, 3, 32, 32), np.float32))
    for options, message in (
        ({"threads": -1}, "threads must be a whole number >= 1, got -1"),
        ({"threads": 0}, "threads must be a whole number >= 1, got 0"),
        ({"threads": 1.5}, "threads must be a whole number >= 1, got 1.5"),
        ({"inter_op_threads": 0}, "inter_op_threads must be a whole number >= 1"),
        ({"mem_pattern": "no"}, "mem_pattern must be True or False"),
    ):
        with pytest.raises(ConfigError, match=message):
            runtime.load(path, **options)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real artifact (resnet18 cut at stage 2, grayscale) for the fuzzers."""
    out = tmp_path_factory.mktemp("small")
    config = ModelConfig("masked", stage=2, in_channels=1, features=4)
    options = ExportOptions(min_size=8, max_size=64, simplify=False)
    return export_artifact(config, out, options).manifest_path


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifests_load_or_raise_manifest_error(small: Path, data: st.DataObject) -> None:
    raw = bytearray(small.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    target = small.with_name("fuzzed.json")
    target.write_bytes(bytes(raw))
    try:
        read_manifest(target)
    except ManifestError:
        pass


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=_JSON)
def test_any_value_in_any_field_is_validated(small: Path, data: st.DataObject, value) -> None:
    manifest = json.loads(small.read_text())
    paths = list(_leaves(manifest))
    field = data.draw(st.sampled_from(paths))
    target = small.with_name("structured.json")
    target.write_text(json.dumps(_set(manifest, field, value)))
    try:
        read_manifest(target)
    except ManifestError:
        pass


def _leaves(node: Any, prefix: str = "") -> Any:
    """Dotted paths of every field (objects only: lists are replaced whole)."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")


# In a subprocess, so that a crash in native code fails the test instead of killing pytest.
ONNX_FUZZER = textwrap.dedent(
    """
    import json, random, sys, hashlib
    from pathlib import Path
    from resfuse import runtime
    from resfuse.errors import ResfuseError

    manifest = Path(sys.argv[1])
    data = json.loads(manifest.read_text())
    model = (manifest.parent / data["files"]["onnx"]["path"]).read_bytes()
    rng = random.Random(int(sys.argv[2]))
    head = 4096  # nodes, inputs and outputs come first; then the initializers' raw data
    outcomes = {"loaded": 0, "typed": 0}
    for i in range(int(sys.argv[3])):
        fuzzed = bytearray(model)
        for _ in range(rng.randint(1, 8)):
            region = rng.choice([(0, head), (len(model) - head, len(model)), (0, len(model))])
            fuzzed[rng.randrange(*region)] = rng.randrange(256)
        if rng.random() < 0.2:
            fuzzed = fuzzed[: rng.randrange(len(fuzzed))]
        target = manifest.with_name(f"fuzz.onnx")
        target.write_bytes(fuzzed)
        data["files"]["onnx"].update(
            path=target.name, sha256=hashlib.sha256(fuzzed).hexdigest(), bytes=len(fuzzed)
        )
        fuzzed_manifest = manifest.with_name("fuzz.json")
        fuzzed_manifest.write_text(json.dumps(data))
        try:
            runtime.load(fuzzed_manifest).close()
            outcomes["loaded"] += 1
        except ResfuseError:
            outcomes["typed"] += 1
    print(json.dumps(outcomes))
    """
)


def test_fuzzed_onnx_files_load_or_raise_a_typed_error(small: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", ONNX_FUZZER, str(small), "7", "150"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcomes["typed"] > 0 and sum(outcomes.values()) == 150
