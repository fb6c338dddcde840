"""The openvino backend: the artifact's ONNX bytes on OpenVINO's CPU plugin, against torch."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from resfuse import runtime
from resfuse.artifacts import sha256_of
from resfuse.errors import BackendUnavailableError, ConfigError, ManifestError, ModelLoadError
from resfuse.export.pipeline import ExportOptions, ExportResult, export_artifact
from resfuse.models import ModelConfig
from resfuse.runtime.cli import bench_main
from resfuse.runtime.machine import physical_cores
from resfuse.runtime.session import Session

ov = pytest.importorskip("openvino", reason="pip install 'resfuse[openvino]' to test it")
HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
ODD_SHAPES = [(1, 3, 33, 45), (2, 3, 97, 131), (3, 3, 256, 32)]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("openvino")
    return export_artifact(ModelConfig("masked"), out, ExportOptions(max_size=256))


@pytest.fixture(scope="module")
def sessions(artifact: ExportResult) -> Any:
    path = artifact.manifest_path
    with (
        runtime.load(path, backend="openvino", threads=2) as openvino,
        runtime.load(path, backend="torch") as reference,
    ):
        yield openvino, reference


def _input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _copy(result: ExportResult, folder: Path) -> tuple[Path, dict[str, Any]]:
    """A private copy of the artifact, and its manifest's data to edit."""
    for path in (result.manifest_path, result.onnx_path, result.weights_path):
        shutil.copy(path, folder)
    manifest = folder / result.manifest_path.name
    return manifest, json.loads(manifest.read_text())


def _point_at(manifest: Path, data: dict[str, Any], target: Path) -> None:
    """Make the manifest name `target` as its ONNX file, with a matching size and sha256."""
    data["files"]["onnx"].update(
        path=target.name, sha256=sha256_of(target), bytes=target.stat().st_size
    )
    manifest.write_text(json.dumps(data))


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_f32_matches_torch_within_the_artifacts_tolerance(sessions, shape) -> None:
    openvino, reference = sessions
    x = _input(shape)
    out = openvino.run(x)
    assert isinstance(out, np.ndarray) and out.shape == (shape[0], 67, *shape[2:])
    tol = openvino.manifest.tolerance
    np.testing.assert_allclose(out, reference.run(x), atol=tol.atol, rtol=tol.rtol)


def test_one_session_many_threads(sessions) -> None:
    openvino, _ = sessions
    inputs = [_input((1 + i % 2, 3, 40 + 9 * i, 70 - 3 * i), seed=i) for i in range(6)]
    expected = [openvino.run(x) for x in inputs]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                np.testing.assert_allclose(openvino.run(inputs[i]), expected[i], atol=1e-6)
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_describe_reads_back_what_openvino_applied(artifact: ExportResult) -> None:
    path = artifact.manifest_path
    with runtime.load(path, backend="openvino", threads=1, performance_hint="THROUGHPUT") as s:
        assert s.runner.describe() == {
            "backend": "openvino",
            "device": "cpu",
            "threads": 1,
            "precision": "f32",
            "performance_hint": "THROUGHPUT",
            "openvino": ov.get_version(),
        }
    with runtime.load(path, backend="openvino") as session:
        settings = session.runner.describe()
        assert settings["threads"] == physical_cores()
        assert (settings["precision"], settings["performance_hint"]) == ("f32", "LATENCY")


def _rel_l2(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no AVX512-BF16 or AMX (OpenVINO: no BF16)")
def test_bf16_runs_in_bf16(sessions, artifact: ExportResult) -> None:
    _, reference = sessions
    x = _input((2, 3, 97, 131))
    with runtime.load(artifact.manifest_path, backend="openvino", precision="bf16") as session:
        assert session.runner.describe()["precision"] == "bf16"
        error = _rel_l2(session.run(x), reference.run(x))
    assert 1e-5 < error < 0.05  # above 1e-5: it really ran in bf16, not in f32


@pytest.mark.skipif(HAS_BF16, reason="this CPU runs bf16; test_bf16_runs_in_bf16 covers it")
def test_bf16_is_refused_where_openvino_would_run_f32(artifact: ExportResult) -> None:
    with pytest.raises(ConfigError, match="'bf16' needs a CPU with AVX512-BF16 or AMX.*'f32'"):
        runtime.load(artifact.manifest_path, backend="openvino", precision="bf16")


@pytest.mark.parametrize(
    "device,options,message",
    [
        ("cpu", {"precision": "fp8"}, r"precision must be one of \('f32', 'bf16'\), not 'fp8'"),
        ("cpu", {"threads": 0}, "threads must be a whole number >= 1, got 0"),
        ("cpu", {"threads": True}, "threads must be a whole number >= 1, got True"),
        ("cpu", {"performance_hint": "FAST"}, "performance_hint must be one of .*not 'FAST'"),
        ("cpu", {"precison": "f32"}, r"unknown openvino options \['precison'\]; known: precision"),
        ("tpu", {}, "openvino device must be one of cpu, not 'tpu'"),
    ],
)
def test_bad_options_are_named(artifact: ExportResult, device, options, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        runtime.load(artifact.manifest_path, backend="openvino", device=device, **options)


def test_missing_openvino_names_the_extra(artifact: ExportResult, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    with pytest.raises(BackendUnavailableError, match=r"pip install 'resfuse\[openvino\]'"):
        runtime.load(artifact.manifest_path, backend="openvino")


def test_changed_onnx_bytes_are_refused_before_openvino(artifact, tmp_path: Path) -> None:
    manifest, data = _copy(artifact, tmp_path)
    onnx_file = tmp_path / data["files"]["onnx"]["path"]
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="does not match the size and sha256"):
        runtime.load(manifest, backend="openvino")


def test_external_data_is_refused(artifact: ExportResult, tmp_path: Path) -> None:
    manifest, data = _copy(artifact, tmp_path)
    model = onnx.load(tmp_path / data["files"]["onnx"]["path"])
    external = tmp_path / "external.onnx"
    onnx.save_model(model, external, save_as_external_data=True, location="weights.bin")
    _point_at(manifest, data, external)
    with pytest.raises(ModelLoadError, match="external data files, which resfuse does not load"):
        runtime.load(manifest, backend="openvino")


def test_a_graph_openvino_rejects_is_a_model_load_error(artifact, tmp_path: Path) -> None:
    manifest, data = _copy(artifact, tmp_path)
    model = onnx.load(tmp_path / data["files"]["onnx"]["path"])
    model.graph.node[0].op_type = "NoSuchOperator"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    _point_at(manifest, data, broken)
    with pytest.raises(ModelLoadError, match="OpenVINO refused broken.onnx: .*NoSuchOperator"):
        runtime.load(manifest, backend="openvino")


def test_bench_times_openvino_beside_the_others(artifact: ExportResult, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        bench_main,
        [
            str(artifact.manifest_path),
            "--backends",
            "torch,onnxruntime,openvino",
            "--shapes",
            "1x3x64x48",
            "--warmup",
            "1",
            "--iters",
            "1",
            "--rounds",
            "1",
            "--threads",
            "1",
            "--json",
            str(tmp_path / "bench.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert [r["backend"] for r in records] == ["torch", "onnxruntime", "openvino"]
    assert records[2]["settings"]["precision"] == "f32" and records[2]["settings"]["threads"] == 1


def test_infer_after_deactivate_is_an_error(artifact: ExportResult) -> None:
    session: Session = runtime.load(artifact.manifest_path, backend="openvino", threads=1)
    session.runner.deactivate()
    with pytest.raises(RuntimeError, match="before activate"):
        session.runner.infer(_input((1, 3, 32, 32)))
    assert session.runner.describe()["openvino"] is None
