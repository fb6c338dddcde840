"""Artifacts on disk: names, the atomic write protocol under SIGKILL and concurrency, leftovers."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import onnx.numpy_helper
import pytest

from resfuse.artifacts import Manifest, check_name, read_manifest, write_artifact
from resfuse.errors import ArtifactWriteError, ConfigError, ExportError, ManifestError
from resfuse.export import onnx as onnx_export
from resfuse.export.pipeline import ExportOptions, export_artifact
from resfuse.models import ModelConfig

# Writes the artifact whose manifest is argv[1] into folder argv[2] under name argv[3], through
# the same writer the export uses; a subprocess, so that a test can SIGKILL it mid-write.
WRITER = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    from resfuse.artifacts import read_manifest, write_artifact

    source, folder, name = read_manifest(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    repeat = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    for _ in range(repeat):
        with write_artifact(folder, name) as writer:
            files = {}
            for key, suffix in (("onnx", ".onnx"), ("weights", ".safetensors")):
                src = source.path.parent / source.record(key)["path"]
                files[key] = writer.add(suffix, lambda p, src=src: shutil.copyfile(src, p))
            writer.commit({**source.data, "name": name, "files": files})
    """
)


def _write(source: Path, folder: Path, name: str, repeat: int = 1) -> subprocess.Popen:
    args = [sys.executable, "-c", WRITER, str(source), str(folder), name, str(repeat)]
    return subprocess.Popen(args, stderr=subprocess.PIPE, text=True)


def _state(folder: Path, name: str) -> tuple[Manifest, dict[str, bytes]]:
    """The artifact as a reader sees it: a valid manifest and files that match it."""
    manifest = read_manifest(folder / f"{name}.json")
    return manifest, {key: manifest.read(key) for key in ("onnx", "weights")}


def _fingerprint(manifest_path: Path) -> tuple[str, str]:
    data = read_manifest(manifest_path).data["files"]
    return data["onnx"]["sha256"], data["weights"]["sha256"]


def _only_the_artifact(folder: Path, name: str) -> None:
    manifest = read_manifest(folder / f"{name}.json")
    named = {manifest.record(k)["path"] for k in ("onnx", "weights")}
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        {f"{name}.json", f".{name}.lock", *named}
    )


@pytest.fixture
def two(exported) -> tuple[Path, Path]:
    """Two real artifacts with different contents (masked and spp), by manifest."""
    return exported["masked"].manifest_path, exported["spp"].manifest_path


@pytest.mark.slow  # writes in subprocesses
def test_export_names_files_by_content_and_replaces_them_whole(two, tmp_path: Path) -> None:
    old, new = two
    _write(old, tmp_path, "m").wait()
    first = read_manifest(tmp_path / "m.json")
    onnx_name = first.record("onnx")["path"]
    assert onnx_name == f"m.{first.record('onnx')['sha256'][:12]}.onnx"
    _write(new, tmp_path, "m").wait()
    assert _fingerprint(tmp_path / "m.json") == _fingerprint(new)
    _only_the_artifact(tmp_path, "m")  # the old version's files are gone
    _write(new, tmp_path, "m").wait()  # the same content again: same names, nothing to add
    _only_the_artifact(tmp_path, "m")


@pytest.mark.slow  # writes in subprocesses
@pytest.mark.parametrize("point", ["temporary", "onnx", "weights", "early", "late"])
def test_sigkill_leaves_the_old_or_the_new_artifact(two, tmp_path: Path, point: str) -> None:
    old, new = two
    _write(old, tmp_path, "m").wait()
    before = set(os.listdir(tmp_path))
    proc = _write(new, tmp_path, "m", repeat=1)
    _kill_at(proc, tmp_path, point, before)
    manifest, _ = _state(tmp_path, "m")  # verified: every file matches the manifest
    assert _fingerprint(manifest.path) in (_fingerprint(old), _fingerprint(new))
    leftovers = set(os.listdir(tmp_path)) - before
    if point in ("temporary", "onnx", "weights"):
        assert leftovers, f"the kill at {point!r} came after the write had finished"
    # The next write into the folder clears what the killed one left behind.
    _write(old, tmp_path, "m").wait()
    assert _fingerprint(tmp_path / "m.json") == _fingerprint(old)
    _only_the_artifact(tmp_path, "m")


def _kill_at(proc: subprocess.Popen, folder: Path, point: str, before: set[str]) -> None:
    deadline = time.monotonic() + 60
    delay = {"early": 0.5, "late": 1.5}.get(point)
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() < deadline:
        if delay is not None and time.monotonic() - start >= delay:
            break
        new = set(os.listdir(folder)) - before
        if point == "temporary" and any(".tmp" in n for n in new):
            break
        if point in ("onnx", "weights") and any(
            n.endswith(".onnx" if point == "onnx" else ".safetensors") for n in new
        ):
            break
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_concurrent_writers_of_one_name_never_mix(two, tmp_path: Path) -> None:
    old, new = two
    writers = [_write(old, tmp_path, "m", repeat=3), _write(new, tmp_path, "m", repeat=3)]
    seen = set()
    while any(w.poll() is None for w in writers):
        try:
            seen.add(_fingerprint(tmp_path / "m.json"))
            _state(tmp_path, "m")
        except ManifestError as exc:  # not there yet, or replaced while being read
            assert "no manifest" in str(exc) or "replaced by another export" in str(exc)
        time.sleep(0.01)
    assert all(w.returncode == 0 for w in writers), [w.stderr.read() for w in writers]
    assert seen <= {_fingerprint(old), _fingerprint(new)}
    _state(tmp_path, "m")
    _only_the_artifact(tmp_path, "m")


def test_a_blocked_manifest_rename_keeps_the_old_artifact(
    two, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = two
    _write(old, tmp_path, "m").wait()
    files_before = sorted(os.listdir(tmp_path))
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if str(dst).endswith("m.json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    source = read_manifest(new)
    with pytest.raises(ArtifactWriteError, match="the artifact there was not changed"):
        with write_artifact(tmp_path, "m") as writer:
            files = {
                key: writer.add(
                    suffix,
                    lambda p, k=key: shutil.copyfile(
                        source.path.parent / source.record(k)["path"], p
                    ),
                )
                for key, suffix in (("onnx", ".onnx"), ("weights", ".safetensors"))
            }
            writer.commit({**source.data, "name": "m", "files": files})
    assert sorted(os.listdir(tmp_path)) == files_before
    assert _fingerprint(tmp_path / "m.json") == _fingerprint(old)
    _state(tmp_path, "m")


def test_a_folder_in_the_manifests_place_is_refused_before_the_export(tmp_path: Path) -> None:
    (tmp_path / "masked-resnet18.json").mkdir()
    (tmp_path / "masked-resnet18.onnx").write_text("an earlier export")
    steps: list[str] = []
    with pytest.raises(ArtifactWriteError, match="is not a file.*nothing was written"):
        export_artifact(ModelConfig("masked"), tmp_path, progress=steps.append)
    assert steps == []  # refused before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "masked-resnet18.json",
        "masked-resnet18.onnx",
    ]
    assert (tmp_path / "masked-resnet18.onnx").read_text() == "an earlier export"


@pytest.mark.parametrize(
    "name",
    ["/abs/path/x", "sub/x", "..", ".", ".hidden", "a\\b", "", "-x", "x\n", "m.0123456789ab"],
)
def test_names_must_be_plain_and_are_checked_before_the_export(name: str, tmp_path: Path) -> None:
    steps: list[str] = []
    with pytest.raises(ConfigError, match="is not a plain file name"):
        export_artifact(ModelConfig("masked"), tmp_path, name=name, progress=steps.append)
    assert steps == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["masked", "lungs-v2.1", "a_b"])
def test_plain_names_pass(name: str) -> None:
    assert check_name(name) == name


def test_version_1_artifacts_still_read_and_are_replaced_cleanly(two, tmp_path: Path) -> None:
    old, new = two
    source = read_manifest(old)
    files = {}
    for key, suffix in (("onnx", ".onnx"), ("weights", ".safetensors")):
        shutil.copyfile(source.path.parent / source.record(key)["path"], tmp_path / f"m{suffix}")
        files[key] = {**source.record(key), "path": f"m{suffix}"}
    (tmp_path / "m.json").write_text(
        json.dumps({**source.data, "format_version": 1, "name": "m", "files": files})
    )
    (tmp_path / "m-notes.onnx").write_text("not the artifact's: stays")
    _state(tmp_path, "m")
    _write(new, tmp_path, "m").wait()
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.safetensors").exists()
    assert (tmp_path / "m-notes.onnx").exists()
    assert _fingerprint(tmp_path / "m.json") == _fingerprint(new)


def test_reader_opens_by_any_of_the_artifacts_files(exported) -> None:
    result = exported["masked"]
    for path in (result.manifest_path, result.onnx_path, result.weights_path):
        assert read_manifest(path).path == result.manifest_path


def test_options_with_a_bad_name_fail_through_the_cli(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("resfuse-export")
    proc = subprocess.run(
        [str(exe), "--method", "masked", "--output", str(tmp_path), "--name", "/tmp/elsewhere"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--name '/tmp/elsewhere' is not a plain file name" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def _failing_slim(proto: onnx.ModelProto) -> onnx.ModelProto:
    raise ExportError("onnxslim failed (RuntimeError: injected)")


def _wrong_slim(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A "simplified" graph that computes something else: one weight tensor doubled."""
    wrong = copy.deepcopy(proto)
    tensor = max(wrong.graph.initializer, key=lambda t: len(t.raw_data))
    values = onnx.numpy_helper.to_array(tensor) * 2
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    return wrong


@pytest.mark.parametrize(
    "slim,note",
    [
        (_failing_slim, "kept the raw graph: onnxslim failed (RuntimeError: injected)"),
        (_wrong_slim, "kept the raw graph: the simplified one failed parity at (1, 3, 32, 32)"),
    ],
)
def test_a_failed_simplification_keeps_the_raw_graph_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slim: object, note: str
) -> None:
    monkeypatch.setattr(onnx_export, "simplify", slim)
    result = export_artifact(ModelConfig("masked"), tmp_path, ExportOptions(max_size=128))
    assert not result.simplified and result.simplify_note.startswith(note)
    assert all(r.stats.passed for r in result.parity)  # the raw graph's own sweep
    data = json.loads(result.manifest_path.read_text())
    assert data["files"]["onnx"]["simplify"] == result.simplify_note
    assert data["files"]["onnx"]["simplified"] is False
    _only_the_artifact(tmp_path, "masked-resnet18")
