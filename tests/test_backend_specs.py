"""One backend spec grammar (NAME or NAME:KEY=VALUE[,KEY=VALUE]) and one --threads option for
resfuse-check, -bench, -predict, -serve and resfuse.runtime.load, on real ONNX Runtime and
OpenVINO sessions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from resfuse import runtime
from resfuse.errors import ConfigError
from resfuse.runtime.backend_spec import format_spec, parse_spec, split_specs, with_threads
from resfuse.runtime.cli import bench_main, check_main
from resfuse.runtime.options import resolve_backend
from resfuse.runtime.serve_cli import predict_main, serve_main

Image = pytest.importorskip("PIL.Image", reason="needs Pillow")
pytest.importorskip("openvino", reason="pip install 'resfuse[openvino]' to test it")

OV_KNOWN = "unknown openvino options ['precison']; known: precision, threads, performance_hint"


@pytest.fixture
def manifest(exported) -> Path:
    return Path(exported["masked"].manifest_path)


def _intra_op_threads(session: runtime.Session) -> int:
    """What the live ONNX Runtime session holds, not what was asked for."""
    return int(session.runner.session.get_session_options().intra_op_num_threads)


@pytest.mark.parametrize(
    "spec,expected",
    [
        (
            "onnxruntime:threads=2,spinning=false,optimization=basic",
            ("onnxruntime", {"threads": 2, "spinning": False, "optimization": "basic"}),
        ),
        (
            "tensorrt:cuda_graphs=True,builder_level=5",
            ("tensorrt", {"cuda_graphs": True, "builder_level": 5}),
        ),
    ],
)
def test_good_specs_parse_with_typed_values_and_round_trip(spec: str, expected) -> None:
    assert parse_spec(spec) == expected
    assert parse_spec(format_spec(*expected)) == expected


@pytest.mark.parametrize(
    "spec,message",
    [
        ("openvino:precision", "options go as NAME:KEY=VALUE[,KEY=VALUE]"),
        ("openvino:=bf16", "options go as NAME:KEY=VALUE[,KEY=VALUE]"),
        ("openvino:precision=bf16,", "options go as NAME:KEY=VALUE[,KEY=VALUE]"),
        (":threads=2", "names no backend"),
        ("threads=2", "names no backend"),
        ("onnxruntime:threads=1,threads=2", "sets threads twice; give it once"),
    ],
)
def test_bad_specs_are_one_line_naming_the_form(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        parse_spec(spec)
    assert "\n" not in str(caught.value)


def test_bench_backend_lists_keep_each_specs_options_together() -> None:
    assert split_specs("torch, openvino:precision=bf16,threads=2,onnxruntime:spinning=false") == [
        "torch",
        "openvino:precision=bf16,threads=2",
        "onnxruntime:spinning=false",
    ]


def test_threads_join_the_spec_and_tensorrt_refuses_them() -> None:
    assert with_threads("openvino:precision=bf16", 2) == "openvino:precision=bf16,threads=2"
    assert with_threads("onnxruntime:threads=2", 2) == "onnxruntime:threads=2"
    with pytest.raises(ConfigError, match="backend tensorrt takes no --threads"):
        with_threads("tensorrt:cuda_graphs=true", 2)
    with pytest.raises(ConfigError, match="sets threads=1 but threads=2 was given too"):
        with_threads("onnxruntime:threads=1", 2)


def test_load_takes_a_spec_merged_with_keyword_options(manifest: Path) -> None:
    spec = "onnxruntime:threads=1,mem_pattern=false"
    with runtime.load(manifest, spec, optimization="basic") as session:
        assert session.backend == "onnxruntime" and _intra_op_threads(session) == 1
        assert session.runner.describe()["mem_pattern"] is False
        assert session.run(np.zeros((1, 3, 64, 64), np.float32)).shape[-2:] == (64, 64)
    with runtime.load(manifest, "openvino:precision=f32,threads=1") as session:
        assert session.runner.describe()["threads"] == 1
    with pytest.raises(ConfigError, match="sets threads=1 but threads=2 was given too"):
        runtime.load(manifest, "onnxruntime:threads=1", threads=2)
    with pytest.raises(ConfigError, match=re.escape(OV_KNOWN)):
        runtime.load(manifest, "openvino:precison=bf16")


def test_check_runs_a_spec_with_threads(manifest: Path, tmp_path: Path) -> None:
    report = tmp_path / "check.json"
    args = [str(manifest), "--backend", "openvino:precision=f32", "--threads", "1"]
    args += ["--shapes", "1x3x64x64", "--json", str(report)]
    result = CliRunner().invoke(check_main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["backend"] == "openvino:precision=f32,threads=1"


@pytest.mark.parametrize(
    "backend,threads,message",
    [
        ("openvino:precison=bf16", [], OV_KNOWN),
        ("tensorrt", ["--threads", "2"], "backend tensorrt takes no --threads"),
    ],
)
def test_check_refuses_an_unknown_key_and_threads_for_tensorrt(
    manifest: Path, backend: str, threads: list[str], message: str
) -> None:
    args = [str(manifest), "--backend", backend, *threads, "--shapes", "1x3x64x64"]
    result = CliRunner().invoke(check_main, args)
    assert result.exit_code == 1 and message in result.stderr, result.output


def test_bench_times_an_engine_with_options_and_threads(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [str(manifest), "--backends", "torch,onnxruntime:spinning=false,mem_pattern=false"]
    args += ["--threads", "1", "--shapes", "1x3x64x64", "--warmup", "1", "--iters", "1"]
    result = CliRunner().invoke(bench_main, [*args, "--rounds", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    ort = json.loads(out.read_text())["records"][1]
    assert ort["backend"] == "onnxruntime:spinning=false,mem_pattern=false"
    assert ort["settings"]["threads"] == 1 and ort["settings"]["mem_pattern"] is False


def _images(folder: Path) -> Path:
    folder.mkdir()
    for name in ("a.png", "b.png"):
        pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


def test_predict_runs_a_spec_with_threads(manifest: Path, tmp_path: Path) -> None:
    images, out = _images(tmp_path / "in"), tmp_path / "out"
    args = [str(manifest), str(images), "--output", str(out)]
    result = CliRunner().invoke(
        predict_main, [*args, "--backend", "openvino:precision=f32", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.npy")) == ["a.png.npy", "b.png.npy"]


def test_predict_refuses_an_unknown_key_before_any_image(manifest: Path, tmp_path: Path) -> None:
    images, out = _images(tmp_path / "in"), tmp_path / "out"
    args = [str(manifest), str(images), "--output", str(out), "--backend", "openvino:precison=bf16"]
    result = CliRunner().invoke(predict_main, args)
    assert result.exit_code == 1 and OV_KNOWN in result.stderr, result.output
    assert not out.exists()


def test_serve_options_become_the_spec_every_replica_loads(manifest: Path) -> None:
    """serve's replicas call load(artifact, ServeOptions.backend): the spec built here."""
    spec = resolve_backend(manifest, "onnxruntime:optimization=basic", "cpu", 1)
    assert parse_spec(spec) == ("onnxruntime", {"optimization": "basic", "threads": 1})
    with runtime.load(manifest, spec) as session:
        assert _intra_op_threads(session) == 1


@pytest.mark.parametrize(
    "backend,threads,message",
    [
        ("openvino:precison=bf16", [], OV_KNOWN),
        ("tensorrt", ["--device", "cuda", "--threads", "2"], "backend tensorrt takes no --threads"),
        ("onnxruntime:threads=1", ["--threads", "2"], "sets threads=1 but threads=2 was given"),
        ("onnxruntime:threads", [], "options go as NAME:KEY=VALUE[,KEY=VALUE]"),
    ],
)
def test_serve_refuses_bad_backend_options_before_ray(
    manifest: Path, backend: str, threads: list[str], message: str
) -> None:
    result = CliRunner().invoke(serve_main, [str(manifest), "--backend", backend, *threads])
    assert result.exit_code in (1, 2) and message in result.stderr, result.output
    assert "Traceback" not in result.stderr
