"""The GPU scripts' parts that run without a GPU: gpu_latency.py's per-variant failure record,
gpu_probe.py's verdict, the CUDA runtime finder that Polygraphy is pointed to, and
gpu_check.sh's refusals."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

from resfuse.errors import BackendUnavailableError
from resfuse.runtime.cudart import expose_cudart, find_cudart

ROOT = Path(__file__).parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def _script(name: str) -> Iterator[ModuleType]:
    """A benchmarks/ script as a module, its main() not run."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


@pytest.fixture(scope="module")
def gpu_latency() -> Iterator[ModuleType]:
    yield from _script("gpu_latency")


@pytest.fixture(scope="module")
def gpu_probe() -> Iterator[ModuleType]:
    yield from _script("gpu_probe")


# --- gpu_latency.py -----------------------------------------------------------------------------


def test_failed_variants_are_recorded_and_the_run_goes_on(gpu_latency, tmp_path, monkeypatch):
    """A real resfuse-export that refuses its options and a real engine build that refuses its
    artifact: each is one failure row, the other variants are still returned, and the results
    (JSON and markdown) name both."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("masked-resnet18", "masked-resnet18-fp16"):  # exported by an earlier run
        (work / f"{name}.json").write_text("{}")
    monkeypatch.setitem(gpu_latency.VARIANTS, "int8", ("-int8-trt", ["--precision", "int9"]))
    outcomes = gpu_latency.Outcomes()

    found = gpu_latency._export("masked", work, True, outcomes)
    with contextlib.ExitStack() as stack:
        build = partial(gpu_latency.engine_candidates, found["fp16"], "fp16", tmp_path, stack)
        where = {"method": "masked", "variant": "fp16", "backend": "tensorrt", "stage": "build"}
        assert outcomes.attempt(build, **where, shape=None) is None

    assert sorted(found) == ["fp16", "fp32"]
    export, engine = outcomes.failures
    assert export["variant"] == "int8" and export["stage"] == "export"
    assert "resfuse-export masked-resnet18-int8-trt exited with 2" in export["error"]
    assert "int9" in export["error"] and "\n" not in export["error"]
    assert engine["stage"] == "build" and engine["error"].startswith("ManifestError: ")
    assert not outcomes.skipped
    result = {
        "machine": {
            "gpu": "-",
            "compute_capability": "-",
            "cuda": "-",
            "cudnn": "-",
            "versions": {},
            "torch_tf32_conv": True,
            "cudnn_benchmark": False,
        },
        "profile": gpu_latency.PROFILE,
        "protocol": {},
        "records": [],
        "targets": [],
        "skipped": outcomes.skipped,
        "failures": outcomes.failures,
    }
    assert json.loads(json.dumps(result))["failures"] == outcomes.failures
    text = gpu_latency.markdown(result)
    assert "## Failures" in text
    assert re.search(r"\| +masked \| +int8 \| +- \| +export \| +every shape \| .*int9", text)
    assert re.search(
        r"\| +masked \| +fp16 \| +tensorrt \| +build \| +every shape \| Manifest", text
    )


def test_its_records_carry_resfuse_bench_latency_fields(gpu_latency, tmp_path):
    """The GPU script times with the library's stopwatch: its records' latency fields are the
    ones resfuse-bench writes, computed by the same function."""
    from resfuse.compare import Tolerance, compare
    from resfuse.runtime.bench import BenchRecord, latency_stats

    times = np.arange(1.0, 13.0).reshape(3, 4)
    candidate = gpu_latency.Candidate(tmp_path / "m.json", "fp16", "tensorrt", "float16", None)
    error = compare(np.ones(4, np.float32), np.ones(4, np.float32), Tolerance())
    record = gpu_latency._record(
        "masked", candidate, (2, 3, 8, 8), times, first=(5.0, error), warmup=1
    )
    stats = latency_stats(times, 2)
    assert {k: record[k] for k in stats} == stats
    assert set(stats) <= {f.name for f in dataclasses.fields(BenchRecord)}


def test_runner_without_its_bare_engine_gets_no_overhead_row(gpu_latency):
    """A bare engine that failed at a shape leaves its runner's row without a pair."""
    row = {
        "artifact": "masked-resnet18-fp16",
        "variant": "fp16",
        "shape": [1, 3, 512, 512],
        "round_p50_ms": [1.0, 1.1],
        "speedup_rounds": [5.0, 5.2],
        "speedup_vs_torch": 5.1,
    }
    records = [row | {"backend": "tensorrt"}]
    assert gpu_latency.targets(records) == []
    records.append(row | {"backend": "tensorrt (bare)", "round_p50_ms": [1.0, 1.0]})
    (overhead,) = gpu_latency.targets(records)
    assert overhead["rounds"] == pytest.approx([0.0, 0.1])


class _Context:
    """What the bare baseline asks of a TensorRT execution context, with its answers: a real
    one needs a GPU. `refuse` names the call that returns False; `calls` records them all."""

    def __init__(self, refuse: str = "") -> None:
        self.refuse, self.calls = refuse, []

    def _answer(self, call: str, *args) -> bool:
        self.calls.append(call)
        return call != self.refuse

    def set_input_shape(self, name, shape):
        return self._answer("set_input_shape", name, shape)

    def get_tensor_shape(self, name):
        return (1, 2, 4, 4)

    def set_tensor_address(self, name, address):
        return self._answer("set_tensor_address", name, address)

    def execute_async_v3(self, stream):
        return self._answer("execute_async_v3", stream)


class _Stream:
    cuda_stream = 7

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def synchronize(self) -> None:
        self.log.append("synchronize")


def _bare_runner(context: _Context, made: list) -> SimpleNamespace:
    from resfuse.profiles import Profile

    profiles = [
        Profile((1, 3, 4, 4), (1, 3, 4, 4), (1, 3, 4, 4)),
        Profile((1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8)),
    ]
    return SimpleNamespace(
        record=SimpleNamespace(profiles=profiles),
        manifest=SimpleNamespace(input_name="image", data={"output": {"name": "logits"}}),
        context_for=lambda index, stream: made.append(index) or (context, "memory"),
    )


def test_bare_baseline_checks_every_answer_and_waits_for_its_stream(gpu_latency):
    """The bare TensorRT loop that the runner is held to (within 5%): its context is the
    runner's kind (context_for, for the input's profile), every call's answer is checked, and
    each call waits for its own stream before handing the output over (issue 27, item 7)."""
    from resfuse.errors import EngineError

    x = torch.zeros(1, 3, 8, 8)
    context, made, log = _Context(), [], []
    call = gpu_latency._bare(_bare_runner(context, made), lambda: _Stream(context.calls))(x)
    assert made == [1]  # the profile that holds 8x8
    context.calls.clear()
    out = call()
    assert context.calls == ["execute_async_v3", "synchronize"] and out.shape == (1, 2, 4, 4)
    for refused in ("set_input_shape", "set_tensor_address"):
        bare = gpu_latency._bare(_bare_runner(_Context(refused), []), lambda: _Stream(log))
        with pytest.raises(EngineError, match=f"refused {refused} for 'image'") as caught:
            bare(x)
        assert "\n" not in str(caught.value)
    failing = gpu_latency._bare(
        _bare_runner(_Context("execute_async_v3"), []), lambda: _Stream(log)
    )(x)
    with pytest.raises(EngineError, match="refused execute_async_v3 in the bare baseline"):
        failing()


# --- gpu_probe.py -------------------------------------------------------------------------------


CC = "get_engine_validity: INVALID; diagnostics: UNSUPPORTED_CC"
DRIVER = "get_engine_validity: INVALID; diagnostics: OLD_CUDA_DRIVER"


@pytest.mark.parametrize(
    ("supported", "failed", "status"),
    [
        (True, {}, 0),
        (False, {"validity masked-fp16": CC, "validity masked-fp32": CC}, 3),  # an H100: expected
        (False, {"validity masked-fp16": CC, "validity masked-fp32": DRIVER}, 1),  # not the GPU
        (False, {"build masked-fp16": "ConfigError: ...", "validity masked-fp32": CC}, 1),
        (False, {}, 1),  # a plan for 8.9 said to run on 9.0
        (True, {"run masked-fp16": "EngineError: ..."}, 1),
        (False, {"import": "ModuleNotFoundError: tensorrt_rtx"}, 1),  # no GPU's fault
    ],
)
def test_probe_tells_an_expected_refusal_from_a_failure(gpu_probe, supported, failed, status):
    """On a GPU TensorRT-RTX does not support, only an UNSUPPORTED_CC refusal of every plan
    (each built for 8.9) is expected; any other failure is one (issue 27, the GPU check)."""
    names = [
        "build masked-fp16",
        "validity masked-fp16",
        "build masked-fp32",
        "validity masked-fp32",
    ]
    stages = [
        {"stage": name, "ok": name not in failed, "detail": failed.get(name, "ok")}
        for name in [*failed, *(n for n in names if n not in failed)]
    ]
    report = {"compute_capability": "9.0", "supported": supported, "stages": stages}
    assert gpu_probe._verdict(report) == status


# --- runtime/cudart.py --------------------------------------------------------------------------


def _wheel(site: Path, layout: str, name: str) -> Path:
    """An empty file where an nvidia wheel puts libcudart: a real folder tree to search."""
    lib = site / "nvidia" / layout / "lib" / name
    lib.parent.mkdir(parents=True)
    lib.touch()
    return lib


def test_cudart_is_found_in_any_wheel_layout(tmp_path):
    cu12, cu13 = tmp_path / "cu12-site", tmp_path / "cu13-site"
    old = _wheel(cu12, "cuda_runtime", "libcudart.so.12")
    new = _wheel(cu13, "cu13", "libcudart.so.13")
    (new.parent / "libcudart_static.a").touch()
    assert find_cudart([cu12]) == old
    assert find_cudart([cu12, cu13]) == new  # the newest CUDA, wherever it lies
    assert find_cudart([tmp_path / "absent", ""]) is None
    with pytest.raises(
        BackendUnavailableError, match=r"^no libcudart\.so\.\* in an nvidia [^\n]*$"
    ):
        expose_cudart([tmp_path / "absent"])


def test_polygraphy_loads_the_cudart_put_on_its_path(tmp_path, monkeypatch):
    """Polygraphy's own lookup, made after expose_cudart, picks the CUDA 13 wheel's library
    before any other on LD_LIBRARY_PATH: it tries to load that (empty) file."""
    polygraphy_cuda = pytest.importorskip("polygraphy.cuda.cuda")
    lib = _wheel(tmp_path / "site-packages", "cu13", "libcudart.so.13")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/local/cuda/lib64")
    assert expose_cudart([tmp_path / "site-packages"]) == lib
    expose_cudart([tmp_path / "site-packages"])  # twice: still one entry
    assert os.environ["LD_LIBRARY_PATH"] == f"{lib.parent}:/usr/local/cuda/lib64"
    with pytest.raises(OSError, match=re.escape(str(lib))):
        polygraphy_cuda.Cuda()


# --- gpu_check.sh -------------------------------------------------------------------------------


def test_gpu_scripts_are_valid_bash():
    for script in (CHECK, ROOT / "benchmarks" / "gpu.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(
        ["shellcheck", str(CHECK), str(ROOT / "benchmarks" / "gpu.sh")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout


def _check(tmp_path: Path, wheels: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")}
    return subprocess.run(
        ["bash", str(CHECK), str(wheels), str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )


def _refused(proc: subprocess.CompletedProcess, tmp_path: Path, why: str) -> None:
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and why in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wheels"]  # no logs, no work folder


def test_gpu_check_refuses_a_missing_wheels_folder(tmp_path):
    (tmp_path / "wheels").mkdir()
    _refused(_check(tmp_path, tmp_path / "no-wheels"), tmp_path, "wheels folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    (tmp_path / "wheels").mkdir()
    _refused(_check(tmp_path, tmp_path / "wheels"), tmp_path, "sees no CUDA device")


# --- gpu_verdict.py: what gpu_check.sh's exit status and summary say -----------------------------

VERDICT = ROOT / "benchmarks" / "gpu_verdict.py"


def _verdict(logs: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(VERDICT), str(logs)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_check_fails_when_every_gpu_test_skipped(tmp_path):
    """The gpu-tests step as gpu_check.sh runs it (pytest -m "gpu or tensorrt", JUnit report),
    here, where every GPU test skips; then the verdict gpu_check.sh ends with: it must fail,
    say that nothing ran on a GPU, and give each path's reason (issue 27, the GPU check)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    tests = ["tests/test_gpu_paths.py", "tests/test_tensorrt_runtime.py", "tests/test_runtime.py"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu or tensorrt", "-p", "no:cacheprovider",
         "--basetemp", str(tmp_path / "inner"), "--junitxml", str(logs / "gpu-tests.xml"), *tests],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0 and " skipped" in run.stdout and "passed" not in run.stdout, (
        run.stdout
    )
    proc = _verdict(logs)
    assert proc.returncode == 1, proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check.sh: FAILED: nothing ran on a GPU (all "), last
    assert "sees no CUDA device" in last
    rows = [
        line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert [row.split(" | ")[:2] for row in rows[1:]] == [
        ["| ORT CUDA EP", "not run"],
        ["| ORT TensorRT EP", "not run"],
        ["| resfuse TensorRT runner", "not run"],
        ["| TensorRT-RTX", "not run"],
    ]
    assert all("no GPU test ran (" in row and "CUDA device" in row for row in rows[1:]), rows


def _junit(path: Path, cases: dict[str, str]) -> None:
    """A JUnit report as pytest writes it: test id -> passed, failed or skipped."""
    body = []
    for test_id, outcome in cases.items():
        file, name = test_id.split("::")
        classname = file.removesuffix(".py").replace("/", ".")
        inner = {
            "passed": "",
            "failed": '<failure message="x"/>',
            "skipped": '<skipped message="why"/>',
        }
        body.append(f'<testcase classname="{classname}" name="{name}">{inner[outcome]}</testcase>')
    path.write_text(
        f'<testsuites><testsuite name="pytest">{"".join(body)}</testsuite></testsuites>'
    )


@pytest.mark.parametrize(
    ("outcomes", "status", "line"),
    [
        ({"passed": 3, "skipped": 1}, 0, "gpu_check.sh: 3 GPU tests ran and passed (1 skipped)"),
        ({"passed": 2, "failed": 1}, 1, "gpu_check.sh: FAILED: 1 of 3 GPU tests that ran failed"),
    ],
)
def test_gpu_check_verdict_counts_what_ran(tmp_path, outcomes, status, line):
    ids = iter(
        [
            "tests/test_gpu_paths.py::test_ort_cuda_runs_tiled",
            "tests/test_gpu_paths.py::test_ort_cuda_matches_pytorch_on_the_gpu[masked]",
            "tests/test_runtime.py::test_cuda_backends_match_cpu",
            "tests/test_gpu_paths.py::test_rtx_plan_for_another_generation_is_invalid_here",
        ]
    )
    cases = {next(ids): outcome for outcome, n in outcomes.items() for _ in range(n)}
    _junit(tmp_path / "gpu-tests.xml", cases)
    (tmp_path / "rtx-probe.json").write_text(
        json.dumps({"compute_capability": "9.0", "stages": [{"stage": "validity m", "ok": False}]})
    )
    proc = _verdict(tmp_path)
    assert proc.returncode == status and proc.stdout.strip().splitlines()[-1] == line
    assert "| ORT CUDA EP | run | 3 GPU tests ran" in proc.stdout
    assert "probe on 9.0: failed at validity m" in proc.stdout


def test_gpu_check_without_a_test_report_says_nothing_ran(tmp_path):
    proc = _verdict(tmp_path)  # the gpu-tests step was killed before pytest wrote its report
    assert proc.returncode == 1 and "nothing ran on a GPU (no readable gpu-tests.xml" in proc.stdout
