"""Verdicts a deployment engineer can act on (issue 18): bounded memory in the comparison,
unwritable outputs refused before the work, the same recursive image listing in check and
predict, and grayscale inputs to a 3-channel model said once."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from resfuse.compare import Tolerance, compare
from resfuse.errors import ConfigError
from resfuse.runtime.check import check_artifact
from resfuse.runtime.cli import bench_main, check_main
from resfuse.runtime.predict import predict


def _float64_reference(ref: np.ndarray, out: np.ndarray, tol: Tolerance) -> dict[str, float]:
    """The statistics as whole float64 arrays give them: what the chunks must reproduce."""
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    diff = np.abs(o - r)
    diff = np.where(np.isfinite(diff), diff, np.inf)
    mag = np.abs(r)
    big = mag > tol.atol
    return {
        "max_abs": float(diff.max()),
        "p99_abs": float(np.percentile(diff, 99)),
        "max_rel": float((diff[big] / mag[big]).max()),
        "required_atol": max(float(np.max(diff - tol.rtol * mag)), 0.0),
        "mean_abs": float(diff.mean()),
        "rel_l2": float(np.linalg.norm(np.where(np.isfinite(diff), diff, 0.0)) / np.linalg.norm(r)),
    }


def test_large_comparison_allocates_no_float64_copy() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1, 64, 512, 512), dtype=np.float32)
    out = ref + rng.standard_normal(ref.shape, dtype=np.float32) * np.float32(1e-5)
    tracemalloc.start()
    try:
        stats = compare(ref, out, Tolerance())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < ref.size * 8 / 4, f"{peak / 2**20:.0f} MiB traced for {ref.size} elements"
    assert stats.passed and 0 < stats.max_abs < 1e-4


@pytest.mark.parametrize("size", [1, 2, 101, 1_000_003])  # the last spans several chunks
def test_chunked_statistics_match_whole_float64_arrays(size: int) -> None:
    rng = np.random.default_rng(size)
    ref = rng.standard_normal(size).astype(np.float32)
    out = ref + rng.standard_normal(size).astype(np.float32) * np.float32(1e-3)
    tol = Tolerance()
    stats = compare(ref, out, tol).to_dict()
    expected = _float64_reference(ref, out, tol)
    for key in ("max_abs", "p99_abs", "max_rel", "required_atol"):  # order statistics: exact
        assert stats[key] == expected[key], key
    for key in ("mean_abs", "rel_l2"):  # sums: the same up to float64 rounding
        assert stats[key] == pytest.approx(expected[key], rel=1e-12), key


def test_nonfinite_outputs_are_counted_across_chunks() -> None:
    ref = np.ones(1_000_003, dtype=np.float32)
    out = ref.copy()
    out[[5, 700_000]] = [np.nan, np.inf]
    stats = compare(ref, out, Tolerance())
    assert stats.nonfinite == 2 and not stats.passed
    assert stats.max_abs == np.inf and stats.p99_abs == 0.0


@pytest.fixture
def blocked(tmp_path: Path) -> Path:
    """A regular file where a folder must be: unwritable below it, even for root."""
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


def test_check_refuses_an_unwritable_json_before_checking(exported, blocked: Path) -> None:
    artifact = str(exported["spp"].manifest_path)
    target = blocked / "check.json"
    result = CliRunner().invoke(check_main, [artifact, "--shapes", "1x3x64x64", "--json", target])
    assert result.exit_code == 1
    assert f"--json {target} cannot be written" in result.stderr
    assert "choose a writable path" in result.stderr
    assert "max abs" not in result.stdout  # refused before the check ran, not after
    assert "Traceback" not in result.output


def test_bench_refuses_an_unwritable_json_before_timing(exported, blocked: Path) -> None:
    artifact = str(exported["spp"].manifest_path)
    args = [artifact, "--shapes", "1x3x64x64", "--iters", "1", "--rounds", "1"]
    result = CliRunner().invoke(bench_main, [*args, "--json", str(blocked / "bench.json")])
    assert result.exit_code == 1
    assert "--json" in result.stderr and "cannot be written" in result.stderr
    assert "p50" not in result.stdout  # no table: nothing was timed


def _write(path: Path, gray: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (48, 64) if gray else (48, 64, 3)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)).save(path)


@pytest.fixture
def nested(tmp_path: Path) -> Path:
    """A colour image on top, a grayscale one a folder down, and a hidden one (skipped)."""
    folder = tmp_path / "in"
    _write(folder / "top.png")
    _write(folder / "sub" / "gray.png", gray=True)
    _write(folder / ".cache" / "hidden.png")
    return folder


def test_predict_refuses_an_unwritable_output_once(exported, nested: Path, blocked: Path) -> None:
    with pytest.raises(ConfigError, match="--output .* cannot be written .*choose a writable"):
        predict(exported["masked"].manifest_path, nested, blocked / "out")


def test_check_lists_images_recursively_as_predict_does(exported, nested: Path) -> None:
    report = check_artifact(exported["spp"].manifest_path, images=nested, shapes=[])
    assert [r.source for r in report.records] == ["sub/gray.png", "top.png"]
    assert report.passed


def test_check_says_once_that_grayscale_is_repeated(exported, nested: Path) -> None:
    _write(nested / "sub" / "gray2.png", gray=True)
    artifact = str(exported["spp"].manifest_path)
    args = [artifact, "--images", str(nested), "--shapes", "1x3x32x32"]
    result = CliRunner().invoke(check_main, args)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "2 of 3 images are grayscale" in warnings[0]


def test_predict_says_once_that_grayscale_is_repeated(
    exported, nested: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = predict(exported["masked"].manifest_path, nested, tmp_path / "out")
    assert summary.done == 2 and not summary.failures
    warnings = [line for line in capsys.readouterr().err.splitlines() if "grayscale" in line]
    assert len(warnings) == 1 and "1 of 2 images are grayscale" in warnings[0]
