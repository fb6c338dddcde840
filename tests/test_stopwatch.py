"""The benchmark's stopwatch: rotated blocks, gated percentiles, quiet threads, torch.compile."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from torch._dynamo.utils import counters

from resfuse import runtime
from resfuse.errors import ConfigError
from resfuse.runtime.bench import (
    _busy,
    benchmark,
    block_order,
    fastest_per_class,
    latency_stats,
    parse_backend,
    report,
    round_ratios,
    run_blocks,
    tail_percentile,
    timed_sessions,
)
from resfuse.runtime.cli import bench_main
from resfuse.runtime.machine import cpu_flags


def test_block_order_rotates_the_first_session_each_round() -> None:
    assert block_order(3, 4) == [
        (0, 0), (1, 0), (2, 0),
        (1, 1), (2, 1), (0, 1),
        (2, 2), (0, 2), (1, 2),
        (0, 3), (1, 3), (2, 3),
    ]  # fmt: skip
    assert block_order(1, 2) == [(0, 0), (0, 1)]
    assert block_order(2, 1) == [(0, 0), (1, 0)]


def test_blocks_run_in_block_order_each_after_one_uncounted_call() -> None:
    calls: list[int] = []

    def call(k: int) -> list[float]:
        calls.append(k)
        return [100.0 * k + len(calls), -1.0]  # ms, then a second figure

    found = run_blocks(2, 2, 3, call)
    # round 0: engine 0 then 1; round 1: engine 1 then 0; each block 1 + 3 calls
    assert calls == [0] * 4 + [1] * 4 + [1] * 4 + [0] * 4
    assert found.shape == (2, 2, 3, 2)
    assert found[0, 0, :, 0].tolist() == [2, 3, 4]  # the first call of a block is not counted
    assert found[1, 1, :, 0].tolist() == [110, 111, 112] and (found[..., 1] == -1).all()


def test_latency_stats_and_round_ratios() -> None:
    times = np.array([[1.0, 3.0], [2.0, 6.0]])  # (rounds, iters) ms
    stats = latency_stats(times, batch=4)
    assert (stats["n"], stats["rounds"], stats["iters"]) == (4, 2, 2)
    assert (stats["p50_ms"], stats["min_ms"], stats["mean_ms"]) == (2.5, 1.0, 3.0)
    assert stats["round_p50_ms"] == [2.0, 4.0] and stats["p90_ms"] is None  # too few calls
    assert stats["throughput_ips"] == 4 * 1e3 / 3.0
    assert round_ratios([4.0, 8.0, 9.0], [2.0, 2.0, 3.0]) == ([2.0, 4.0, 3.0], 3.0)


def test_the_originals_are_timed_once_deployed_backends_per_artifact() -> None:
    backends = ["torch", "torch-compile", "onnxruntime"]
    assert timed_sessions("a.json", backends, also=["b.json", "c.json"]) == [
        (Path("a.json"), "torch"),
        (Path("a.json"), "torch-compile"),
        (Path("a.json"), "onnxruntime"),
        (Path("b.json"), "onnxruntime"),
        (Path("c.json"), "onnxruntime"),
    ]


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("onnxruntime", ("onnxruntime", {})),
        ("openvino:precision=bf16", ("openvino", {"precision": "bf16"})),
        (
            "onnxruntime:spinning=false:threads=3",
            ("onnxruntime", {"spinning": False, "threads": 3}),
        ),
        ("onnxruntime:spinning=True", ("onnxruntime", {"spinning": True})),
    ],
)
def test_backend_specs_carry_options(spec: str, expected) -> None:
    assert parse_backend(spec) == expected


@pytest.mark.parametrize("spec", ["openvino:precision", "openvino:=bf16", "openvino:precision="])
def test_a_malformed_backend_spec_says_how_to_write_it(spec: str) -> None:
    with pytest.raises(ConfigError, match="options go as NAME:KEY=VALUE"):
        parse_backend(spec)


def test_option_variants_of_one_backend_are_each_timed_on_every_artifact() -> None:
    backends = ["torch", "openvino", "openvino:precision=bf16"]
    assert timed_sessions("a.json", backends, also=["b.json"])[3:] == [
        (Path("b.json"), "openvino"),
        (Path("b.json"), "openvino:precision=bf16"),
    ]


def _fake(backend: str, precision: str, p50: float, side: int = 64, within: bool = True) -> dict:
    return {
        "within_tolerance": within,
        "artifact": "m",
        "backend": backend,
        "precision": precision,
        "shape": [1, 3, side, side],
        "p50_ms": p50,
        "speedup_vs_torch": None,
        "rel_l2": 0.0,
    }


def test_the_fastest_engine_is_named_per_shape_and_accuracy_class() -> None:
    records = [
        _fake("torch", "float32", 10.0),
        _fake("onnxruntime", "float32", 6.0),
        _fake("openvino", "float32", 7.0),
        _fake("openvino:precision=bf16", "bfloat16", 4.0),
        _fake("trt", "float16", 3.0),  # float16 and bfloat16: one class
        _fake("onnxruntime", "int8", 5.0),  # slower than bf16, but a class of its own
        _fake("onnxruntime", "float32", 20.0, side=128),
    ]
    named = [(f["shape"], f["accuracy_class"], f["backend"]) for f in fastest_per_class(records)]
    assert named == [
        ("1x3x64x64", "float32", "onnxruntime"),
        ("1x3x64x64", "16-bit float", "trt"),
        ("1x3x64x64", "int8", "onnxruntime"),
        ("1x3x128x128", "float32", "onnxruntime"),
    ]


def test_the_bench_recommends_only_engines_within_tolerance() -> None:
    records = [
        _fake("slow", "float32", 90.0),
        _fake("fast-but-wrong", "float32", 40.0, within=False),
    ]
    assert [f["backend"] for f in fastest_per_class(records)] == ["slow"]
    assert fastest_per_class([_fake("wrong", "float32", 40.0, within=False)]) == []


@pytest.mark.parametrize(
    "n,q,expected",
    [
        # 0, 1, ..., n-1: the q-th percentile sits at rank q/100 * (n - 1).
        (49, 90, None),  # 4.9 samples above: not enough
        (50, 90, 44.1),  # 5 above
        (99, 95, None),
        (100, 95, 94.05),
        (499, 99, None),
        (500, 99, 494.01),
        (8, 99, None),  # the p99 of 8 calls would be their maximum, 7
    ],
)
def test_tail_percentiles_need_five_samples_above(n: int, q: int, expected) -> None:
    value = tail_percentile(np.arange(n, dtype=float), q)
    assert value == (None if expected is None else pytest.approx(expected))


def test_blocks_on_real_sessions_give_ratios_per_round(exported) -> None:
    calls = []
    result = benchmark(
        exported["masked"].manifest_path,
        shapes=[(1, 3, 64, 64)],
        warmup=2,
        iters=3,
        rounds=2,
        threads=1,
        progress=lambda: calls.append(1),
    )
    assert len(calls) == 2 * (2 + 2 * (1 + 3))  # sessions x (warm-up + rounds x block)
    assert result["machine"]["cpu_flags"] == cpu_flags()
    torch, ort = result["records"]
    for r in (torch, ort):
        assert (r["n"], r["rounds"], r["iters"], r["warmup"]) == (6, 2, 3, 2)
        assert len(r["round_p50_ms"]) == 2 and r["first_call_ms"] > 0
        assert r["std_ms"] > 0 and r["p90_ms"] is None and r["within_tolerance"]
    ratios = [t / o for t, o in zip(torch["round_p50_ms"], ort["round_p50_ms"], strict=True)]
    assert ort["speedup_rounds"] == pytest.approx(ratios)
    assert ort["speedup_vs_torch"] == pytest.approx(np.median(ratios))
    assert torch["speedup_rounds"] == [1.0, 1.0]
    # torch is the reference; ONNX Runtime float32 is off by rounding only.
    assert torch["rel_l2"] == torch["max_abs"] == 0.0
    assert ort["rel_l2"] < 1e-5 and ort["max_abs"] < 1e-4
    # Two backends timed: ONNX Runtime's threads sleep between calls.
    assert ort["settings"]["spinning"] is False
    assert "'vs torch': median ratio of the rounds' block medians" in report(result)


def test_one_backend_keeps_spinning_and_is_judged_against_a_loaded_torch(exported) -> None:
    result = benchmark(
        exported["spp"].manifest_path,
        backends=["onnxruntime"],
        shapes=[(1, 3, 64, 64)],
        warmup=1,
        iters=1,
        rounds=1,
    )
    [ort] = result["records"]
    assert ort["settings"]["spinning"] is True  # ONNX Runtime's own default, alone
    assert 0 < ort["rel_l2"] < 1e-5 and ort["speedup_vs_torch"] is None
    assert ort["n"] == 1 and ort["std_ms"] is None  # no spread from one call


def test_spinning_option_reaches_the_onnxruntime_session(exported) -> None:
    path = exported["masked"].manifest_path
    for asked, entry in ((False, "0"), (True, "1"), (None, "1")):
        options = {} if asked is None else {"spinning": asked}
        with runtime.load(path, threads=1, **options) as session:
            held = session.runner.session.get_session_options()
            for pool in ("intra_op", "inter_op"):
                assert held.get_session_config_entry(f"session.{pool}.allow_spinning") == entry
            assert session.runner.describe()["spinning"] is (entry == "1")
    with pytest.raises(ConfigError, match="option spinning must be True or False"):
        runtime.load(path, spinning="off")


def test_torch_compile_refuses_more_shapes_than_it_keeps_graphs(exported) -> None:
    shapes = [(1, 3, 64, 64 + 8 * i) for i in range(9)]
    with pytest.raises(ConfigError, match="torch-compile on 9 shapes: .* keeps 8 graphs"):
        benchmark(exported["masked"].manifest_path, backends=["torch-compile"], shapes=shapes)


@pytest.mark.slow  # compiling resnet18: 1-2 minutes on 2 busy cores, unless inductor cached it
def test_torch_compile_beside_eager_and_onnxruntime_in_one_command(
    exported, tmp_path: Path
) -> None:
    """The compiled original is a peer: compiled in its first call, then timed and judged."""
    graphs = counters["stats"]["unique_graphs"]
    out = tmp_path / "bench.json"
    args = [str(exported["masked"].manifest_path), "--backends", "torch,torch-compile,onnxruntime"]
    args += ["--shapes", "1x3x64x64", "--warmup", "1", "--iters", "2", "--rounds", "2"]
    result = CliRunner().invoke(bench_main, [*args, "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "| masked-resnet18 | torch-compile |" in result.stdout
    assert counters["stats"]["unique_graphs"] > graphs  # torch.compile really compiled
    records = {r["backend"]: r for r in json.loads(out.read_text())["records"]}
    assert list(records) == ["torch", "torch-compile", "onnxruntime"]
    compiled = records["torch-compile"]
    assert compiled["precision"] == "float32" and compiled["first_call_ms"] > 0
    assert compiled["n"] == 4 and len(compiled["speedup_rounds"]) == 2
    assert compiled["rel_l2"] < 1e-5 and compiled["within_tolerance"]
    assert compiled["settings"]["threads"] == 1


@pytest.mark.parametrize("before,warned", [(0.4, False), (1.0, False), (1.01, True), (3.1, True)])
def test_a_busy_machine_is_named_in_the_report(before: float, warned: bool) -> None:
    machine = {"usable_cpus": 2, "load_average": {"before": [before, 0, 0], "after": [2, 0, 0]}}
    note = _busy(machine)
    assert bool(note) is warned
    if warned:
        assert f"load {before:.2f} on 2 CPUs" in note and "rerun when it is idle" in note
