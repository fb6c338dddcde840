"""When INT8 or float16 misses its gate: the sensitivity ranking and the mixed-precision rescue,
on the hazard a trained network can hold, planted in a real fusion model's backbone: one
channel of a BatchNorm before a ReLU scaled up, the next convolution's weights for that channel
scaled down by the same factor, so the float32 output is unchanged. Per-tensor INT8 then gives
that activation's whole range to one channel; float16 overflows on it (x 1e5 > 65504)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from clirun import invoke
from planted import CONFIG, plant

from resfuse import runtime
from resfuse.artifacts import read_manifest
from resfuse.compare import (
    ErrorStats,
    MaskGates,
    Tolerance,
    compare_output,
    mask_agreement,
    pooled,
)
from resfuse.export.cli import main as export_main
from resfuse.export.float16 import to_float16
from resfuse.export.parity import ParityResult, failure, onnxruntime_cpu, run_parity
from resfuse.export.pipeline import (
    ExportOptions,
    ExportResult,
    GateError,
    Mixed,
    _rescue,
    export_artifact,
)
from resfuse.export.quantize import Calibration
from resfuse.export.sensitivity import Conversion, Sensitivity, Unit, counts
from resfuse.models import build_model

pytestmark = pytest.mark.slow  # INT8 exports, each calibrated several times
PLANTED = ("encoder.layers.0.0.conv1", "encoder.layers.0.0.conv2")  # bn1 sits between them
CALIBRATION = Calibration(None, count=8, size=64)


def int8(**changes: object) -> ExportOptions:
    base = {"min_size": 32, "max_size": 128, "max_batch": 2, "precision": "int8"}
    return ExportOptions(**{**base, "calibration": CALIBRATION, **changes})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return plant(tmp_path_factory.mktemp("planted") / "w.safetensors", 1000.0)


@pytest.fixture(scope="module")
def rescued(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("rescued")
    return export_artifact(CONFIG, out, int8(keep_accuracy=True), weights=weights)


def test_the_planted_hazard_fails_int8_and_ranks_first(weights: Path, tmp_path: Path) -> None:
    """Full INT8 misses the bound by 4x; --explain ranks the two layers around the planted
    activation first, far ahead of the rest; nothing is written."""
    with pytest.raises(GateError) as caught:
        export_artifact(CONFIG, tmp_path, int8(explain=True), weights=weights)
    assert "--keep-accuracy" in str(caught.value) and "nothing was written" in str(caught.value)
    assert len(caught.value.results) == 6 and not any(r.passed for r in caught.value.results)
    ranking = caught.value.ranking
    assert {s.unit.module for s in ranking[:2]} == set(PLANTED)
    assert ranking[1].rel_l2 > 10 * ranking[2].rel_l2
    assert not list(tmp_path.glob("*.json"))


def test_the_rescue_keeps_the_planted_layers_float_and_passes(rescued: ExportResult) -> None:
    assert rescued.name == "upsample-resnet18-int8-mixed"
    assert all(r.passed for r in rescued.parity)
    kept = {s.unit.module for s in rescued.mixed.kept}
    assert kept == set(PLANTED)  # a handful at most: here the two around the activation
    record = json.loads(rescued.manifest_path.read_text())["mixed"]["kept_float"]
    assert {k["module"] for k in record} == set(PLANTED)
    assert all(k["node"] and k["rel_l2_alone"] > 0.1 and "rescue" in k["why"] for k in record)
    assert read_manifest(rescued.manifest_path).precision == "int8"


def test_the_rescued_graph_runs_on_onnxruntime_and_openvino(rescued: ExportResult) -> None:
    """The same exclusion list serves each: the QDQ graph without Q/DQ around the kept layers."""
    pytest.importorskip("openvino", reason="pip install 'resfuse[openvino]'")
    x = np.random.default_rng(3).standard_normal((1, 1, 96, 80), dtype=np.float32)
    with runtime.load(rescued.manifest_path, "torch") as original:
        reference = np.asarray(original.run(x))
    for backend in ("onnxruntime", "openvino"):
        with runtime.load(rescued.manifest_path, backend) as session:
            stats = compare_output(
                reference, np.asarray(session.run(x)), Tolerance(max_rel_l2=0.1), 1
            )
        assert stats.passed, (backend, stats.rel_l2)


def test_the_tensorrt_form_is_rescued_and_builds_with_tensorrt_rtx(
    weights: Path, tmp_path: Path
) -> None:
    result = export_artifact(
        CONFIG, tmp_path, int8(target="tensorrt", keep_accuracy=True), weights=weights
    )
    assert result.name == "upsample-resnet18-int8-trt-mixed"
    assert {s.unit.module for s in result.mixed.kept} == set(PLANTED)
    _builds_with_rtx(result.manifest_path, tmp_path / "cache")


def test_an_unplanted_model_needs_no_rescue(tmp_path: Path) -> None:
    clean = plant(tmp_path / "clean.safetensors", 1.0)
    result = export_artifact(CONFIG, tmp_path, int8(keep_accuracy=True), weights=clean)
    assert result.name == "upsample-resnet18-int8" and not result.mixed.kept
    assert "mixed" not in json.loads(result.manifest_path.read_text())


def test_float16_keeps_what_overflows_in_float32_and_passes(tmp_path: Path) -> None:
    """x 1e5: the activation reaches ~1e5, past float16's 65504. Measured before conversion,
    the nodes that write or read it stay float32; converted without them the graph gives inf."""
    weights = plant(tmp_path / "w.safetensors", 1e5)
    options = ExportOptions(min_size=32, max_size=128, max_batch=2, precision="float16")
    result = export_artifact(CONFIG, tmp_path / "out", options, weights=weights)
    assert result.name == "upsample-resnet18-fp16" and all(r.passed for r in result.parity)
    kept = json.loads(result.manifest_path.read_text())["mixed"]["kept_float"]
    assert {k["module"] for k in kept} >= set(PLANTED) and all("65504" in k["why"] for k in kept)

    source = read_manifest(export_artifact(CONFIG, tmp_path / "f32", ExportOptions(
        min_size=32, max_size=128, max_batch=2), weights=weights).manifest_path)  # fmt: skip
    naive = to_float16(onnx.load_from_string(source.read("onnx")))
    model = build_model(**CONFIG.to_dict(), weights=weights)
    results = run_parity(
        model, onnxruntime_cpu(naive), [(1, 1, 64, 64)], Tolerance(max_rel_l2=5e-3)
    )
    assert results[0].stats.nonfinite > 0 or not results[0].stats.passed

    pytest.importorskip("openvino", reason="pip install 'resfuse[openvino]'")
    x = np.random.default_rng(4).standard_normal((1, 1, 80, 96), dtype=np.float32)
    with runtime.load(result.manifest_path, "torch") as original:
        reference = np.asarray(original.run(x))
    with runtime.load(result.manifest_path, "openvino") as session:
        out = np.asarray(session.run(x))
    assert compare_output(reference, out, Tolerance(max_rel_l2=5e-3), 1).passed
    _builds_with_rtx(result.manifest_path, tmp_path / "cache")


def _builds_with_rtx(manifest: Path, cache: Path) -> None:
    from resfuse.engine_manifest import BuildSettings
    from resfuse.errors import BackendUnavailableError
    from resfuse.export import engines
    from resfuse.profiles import Profile
    from resfuse.tensorrt_env import FLAVOURS, import_flavour

    try:
        import_flavour(FLAVOURS["tensorrt-rtx"])
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    profile = Profile((1, 1, 32, 32), (1, 1, 64, 64), (1, 1, 128, 128))
    built = engines.find_or_build(
        manifest, [profile], BuildSettings(builder_level=0), cache, engine="tensorrt-rtx"
    )
    assert built.record.precision == read_manifest(manifest).precision
    assert len(built.plan) > 100_000


def test_a_failing_export_prints_its_table_and_names_the_rescue(
    weights: Path, tmp_path: Path
) -> None:
    args = ["--method", "upsample", "--stage", "2", "--in-channels", "1", "--features", "8"]
    args += ["--int8", "--calib-random", "--calib-count", "8", "--calib-size", "64"]
    args += ["--min-size", "32", "--max-size", "128", "--max-batch", "2", "-o", str(tmp_path)]
    proc = invoke(export_main, *args, "--weights", str(weights))
    assert proc.returncode == 1
    assert proc.stdout.count("FAIL") == 6 and "1x1x128x128" in proc.stdout  # the whole table
    assert "--keep-accuracy" in proc.stderr and "\n" not in proc.stderr.strip()


def test_a_head_is_gated_on_its_mask_pooled_over_the_sweep() -> None:
    """Agreement and per-class Dice pooled by pixel counts over the sweep's shapes."""
    ref = np.zeros((1, 2, 4, 4), np.float32)
    ref[0, 1, :2] = 1  # class 1 in the top half
    out = ref.copy()
    out[0, 1, 1, 0] = -1  # one pixel of class 1 lost
    one = mask_agreement(ref, out, MaskGates(0.9, 0.9))
    both = pooled([one, mask_agreement(ref, ref, MaskGates(0.9, 0.9))], MaskGates(0.96, 0.9))
    assert one.agreement == 15 / 16 and both.agreement == 31 / 32
    assert both.dice[1] == pytest.approx(2 * 15 / (8 + 7 + 8 + 8))
    assert both.passed and not pooled([one], MaskGates(0.97, None)).passed
    assert failure([], MaskGates(0.99, 0.98)) is None
    # a class on 5 of 10,000 pixels (0.05%) is reported, not gated: one pixel swings its Dice
    big = np.zeros((1, 2, 100, 100), np.float32)
    big[0, 1, 0, :5] = 1
    lost = big.copy()
    lost[0, 1, 0, :3] = -1
    rare = mask_agreement(big, lost, MaskGates(0.99, 0.98))
    assert rare.dice[1] == pytest.approx(4 / 7) and 1 not in rare.gated_dice and rare.passed
    big[0, 1, 1, :20] = 1  # 25 pixels (0.25%): gated
    assert not mask_agreement(big, lost, MaskGates(0.99, 0.98)).passed


def test_rescue_counts_go_one_by_one_then_grow() -> None:
    assert counts(40, 16) == [1, 2, 3, 4, 5, 6, 8, 11, 15]
    assert counts(2, 16) == [1, 2]


def test_resfuse_check_judges_the_rescued_variant_and_says_it_is_mixed(
    rescued: ExportResult,
) -> None:
    from resfuse.runtime.cli import check_main

    proc = invoke(check_main, str(rescued.manifest_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(int8, 2 layers kept float)" in proc.stdout


def _results(rel_l2: float) -> list[ParityResult]:
    """One shape's result with this error, judged by the INT8 bound (0.1)."""
    stats = ErrorStats(0, 0, 0, 0, rel_l2, 1, 0, 0, passed=rel_l2 <= 0.1)
    return [ParityResult((1, 1, 32, 32), stats)]


def test_the_search_tries_calibration_methods_before_giving_up_layers() -> None:
    """The search order on made-up measurements: the full variant fails; percentile passes,
    so no layer is kept float and the method is recorded; when no method passes, layers are
    kept float under the method that came closest."""
    units = [Unit(f"conv{i}", f"m{i}", (f"conv{i}",)) for i in range(3)]
    made: list[tuple[tuple[str, ...], str | None]] = []

    def conversion() -> Conversion:
        def make(keep: Sequence[str] = (), method: str | None = None) -> onnx.ModelProto:
            made.append((tuple(keep), method))
            graph = onnx.ModelProto()
            graph.doc_string = json.dumps([list(keep), method])
            return graph

        return Conversion(make, units, [], None, ("percentile", "entropy"))

    def sweep_of(errors: dict[str | None, float]) -> Callable[[onnx.ModelProto], list]:
        def sweep(graph: onnx.ModelProto) -> list[ParityResult]:
            keep, method = json.loads(graph.doc_string)
            return _results(0.01 if "conv2" in keep else errors[method])

        return sweep

    ranking = [Sensitivity(units[2], 0.5, None), Sensitivity(units[0], 0.1, None)]
    options = ExportOptions()
    first = (onnx.ModelProto(), _results(0.3))
    wins = {None: 0.3, "percentile": 0.05, "entropy": 0.2}
    mixed = Mixed()
    graph, _, reason = _rescue(
        conversion(), first, sweep_of(wins), None, lambda: ranking, mixed, options
    )
    assert reason is None and mixed.method == "percentile" and not mixed.kept
    assert made == [((), "percentile")]  # entropy is never tried: percentile passed

    made.clear()
    closest = {None: 0.3, "percentile": 0.4, "entropy": 0.2}
    mixed = Mixed()
    _, _, reason = _rescue(
        conversion(), first, sweep_of(closest), None, lambda: ranking, mixed, options
    )
    assert reason is None and mixed.method == "entropy"
    assert [s.unit.node for s in mixed.kept] == ["conv2"]
    assert made[-1] == (("conv2",), "entropy")
