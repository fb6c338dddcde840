"""The tensorrt backend: options, engine manifests and the missing-TensorRT path here; engines
built and run on a GPU where TensorRT and CUDA are present (marked gpu and tensorrt)."""

import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from resfuse import runtime, tensorrt_env
from resfuse.artifacts import named_files, read_manifest
from resfuse.engine_manifest import BuildSettings
from resfuse.errors import (
    ArtifactWriteError,
    BackendUnavailableError,
    ConfigError,
    EngineError,
    InputContractError,
    ManifestError,
)
from resfuse.export import engines
from resfuse.profiles import default_profiles
from resfuse.runtime.backends.tensorrt import (
    ALIGNMENT,
    GraphSlots,
    bindable,
    engine_artifact,
    require_user_memory,
    runtime_cache_name,
)
from resfuse.runtime.check import check_artifact

BIN = Path(sys.executable).parent
ROOT = Path(__file__).parent.parent
ODD_SHAPES = [(1, 3, 97, 131), (2, 3, 129, 65), (1, 3, 257, 311)]
FAST_BUILD = {"builder_level": 1}  # parity does not depend on how long tactics were searched


def _without(name: str | None) -> str | None:
    """Why this flavour (None: the default one) cannot be imported here, or None."""
    try:
        tensorrt_env.import_flavour(tensorrt_env.resolve(name))
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def _no_gpu() -> str | None:
    """Why the default flavour cannot run engines here, or None."""
    if _without(None):
        return _without(None)
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    entry = tensorrt_env.default_flavour()
    capability = "{}.{}".format(*torch.cuda.get_device_capability())
    if entry.targets and capability not in entry.targets:
        return f"{entry.label} does not run on compute capability {capability}"
    return None


NO_TENSORRT = _without("tensorrt")
NO_FLAVOUR = _without(None)  # neither flavour
NO_GPU = _no_gpu()


def on_gpu(test):
    """Marks a test that builds and runs engines: gpu, tensorrt, skipped with the reason."""
    skip = pytest.mark.skipif(NO_GPU is not None, reason=f"needs TensorRT on a GPU: {NO_GPU}")
    return pytest.mark.gpu(pytest.mark.tensorrt(skip(test)))


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


# --- here: no TensorRT needed ------------------------------------------------------------------


@pytest.mark.parametrize(
    "device,options,message",
    [
        ("cpu", {}, "runs on device 'cuda' .* not 'cpu'; pass device='cuda'"),
        ("tensorrt", {}, "not 'tensorrt'"),
        ("cuda", {"workspace": 4}, r"unknown tensorrt options \['workspace'\]"),
        ("cuda", {"cuda_graphs": "yes"}, "cuda_graphs must be True or False, not 'yes'"),
        ("cuda", {"cuda_graphs": True, "max_graphs": 0}, "max_graphs must be a whole number"),
        (
            "cuda",
            {"max_graphs": 4},
            "max_graphs bounds the CUDA graphs kept, and cuda_graphs is off",
        ),
        ("cuda", {"rebuild": 1}, "rebuild must be True or False"),
        ("cuda", {"cache_dir": 3}, "cache_dir must be a path, not 3"),
        ("cuda", {"builder_level": 7}, "builder-level 7 is outside 0..5"),
        ("cuda", {"profiles": "1x3x64x64:1x3x64x64:1x3x64x64"}, "must be a list of Profile"),
        ("cuda", {"profiles": ["1x3x64x64"]}, "is not MIN:OPT:MAX"),
        ("cuda", {"profiles": [(1, 3, 64, 64)]}, r"holds \(1, 3, 64, 64\)"),
        (
            "cuda",
            {"profiles": ["1x3x64x64:1x3x512x512:1x3x2048x2048"]},
            "max height 2048 is outside masked-resnet18.json's height range 32..1024",
        ),
        ("cuda", {"profiles": ["1x3x64x64:1x3x32x32:1x3x128x128"]}, "min <= opt <= max"),
        (
            "cuda",
            {"engine": "e.json", "builder_level": 1},
            r"options \['builder_level'\] choose how an engine is built",
        ),
    ],
)
def test_options_are_refused_in_one_line(exported, device, options, message) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        runtime.load(exported["masked"].manifest_path, "tensorrt", device, **options)
    assert "\n" not in str(caught.value)


def test_options_and_artifact_are_checked_before_tensorrt_is_imported(exported) -> None:
    path = exported["masked"].manifest_path
    script = (
        "import sys\n"
        "from resfuse import runtime\n"
        "from resfuse.errors import ConfigError\n"
        "try:\n"
        f"    runtime.load({str(path)!r}, 'tensorrt', 'cuda', builder_level=1,\n"
        "                 profiles=['1x3x8x8:1x3x8x8:2x3x8x8'], cache_dir='unused')\n"
        "except ConfigError:\n"
        "    print('tensorrt' in sys.modules or 'tensorrt_rtx' in sys.modules)\n"
    )
    proc = run(sys.executable, "-c", script)
    assert proc.stdout.strip() == "False", proc.stderr


@pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT is installed here")
def test_missing_tensorrt_through_load(exported) -> None:
    path = exported["spp"].manifest_path
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed") as caught:
        runtime.load(path, "tensorrt", "cuda", flavour="tensorrt")
    assert "pip install 'resfuse[gpu]'" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.skipif(NO_FLAVOUR is not None, reason=f"{NO_FLAVOUR}")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_no_gpu_through_resfuse_check(exported) -> None:
    """TensorRT-RTX builds here; running its engine needs a GPU, and says so in one line."""
    path = str(exported["spp"].manifest_path)
    proc = run(str(BIN / "resfuse-check"), path, "--backend", "tensorrt", "--device", "cuda")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], lines


@pytest.mark.parametrize(
    "options,message",
    [
        (
            {"flavour": "tensorrt-llm"},
            "--engine 'tensorrt-llm' is not one of tensorrt, tensorrt-rtx",
        ),
        (
            {"flavour": "tensorrt-rtx", "trust_host_code": True},
            "--trust-host-code is not available with --engine tensorrt-rtx",
        ),
        ({"compute_capabilities": "sm_86"}, "is not a list of MAJOR.MINOR capabilities"),
        ({"compute_capabilities": 8.6}, "compute_capabilities must be a string"),
    ],
)
def test_flavour_options_are_refused_before_import(exported, options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        runtime.load(exported["masked"].manifest_path, "tensorrt", "cuda", **options)


def test_the_tensorrt_runner_needs_export_only_to_build() -> None:
    """Engines that are already built load without resfuse.export (and without torch.onnx's
    exporter behind it): it is imported when a build is needed, not before."""
    code = (
        "import sys\n"
        "from resfuse.runtime.backends import tensorrt\n"
        "print(sorted(m for m in sys.modules if m.startswith('resfuse.export')))\n"
    )
    proc = run(sys.executable, "-c", code)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_inputs_are_made_bindable_once() -> None:
    """TensorRT refuses addresses that are not 256-byte aligned and reads memory as contiguous
    float32: a view into a batch is copied, a tensor that already fits is bound as it is."""
    batch = torch.randn(4, 3, 5, 7)
    view = batch[1:2]  # 105 floats in: 420 bytes past the start of the batch
    assert view.data_ptr() % ALIGNMENT
    fixed = bindable(view, torch.device("cpu"))
    assert fixed.data_ptr() % ALIGNMENT == 0 and torch.equal(fixed, view)
    aligned = bindable(fixed, torch.device("cpu"))
    assert aligned is fixed  # no copy
    doubles = bindable(batch.double(), torch.device("cpu"))
    assert doubles.dtype == torch.float32 and doubles.is_contiguous()
    strided = bindable(batch.transpose(2, 3), torch.device("cpu"))
    assert strided.is_contiguous() and torch.equal(strided, batch.transpose(2, 3))


def test_graph_slots_keep_the_most_recently_used_up_to_the_limit() -> None:
    """A server that sees a new H x W on every call keeps at most `limit` captured shapes: the
    least recently used is handed back to be freed, one used again is kept (issue 27, item 2)."""
    made: list[str] = []

    def make(key: str):
        return lambda: made.append(key) or f"slot {key} #{len(made)}"

    slots: GraphSlots[str] = GraphSlots(limit=2)
    assert slots.get("a", make("a")) == ("slot a #1", [])
    assert slots.get("b", make("b")) == ("slot b #2", [])
    assert slots.get("a", make("a")) == ("slot a #1", [])  # found: nothing made, now the newest
    assert slots.get("c", make("c")) == ("slot c #3", ["slot b #2"])  # b was the oldest
    assert slots.keys() == ["a", "c"]
    for k in range(100):  # every call a new shape: the bound holds
        _, evicted = slots.get(f"shape {k}", make(f"shape {k}"))
        assert len(evicted) == 1 and len(slots.keys()) == 2
    assert slots.get("b", make("b"))[0] == "slot b #104"  # freed before: made again
    assert len(made) == 104 and len(slots.pop_all()) == 2 and slots.keys() == []


def test_runtime_caches_are_kept_per_gpu_driver_and_version() -> None:
    """IRuntimeCache.deserialize refuses a cache from another GPU SKU, driver or TensorRT-RTX
    version: two GPUs of one compute capability must not share (and overwrite) one file."""
    rtx4090 = tensorrt_env.BuildEnvironment(
        "tensorrt-rtx", "1.7.1.116", "12", "linux-x86_64", "NVIDIA GeForce RTX 4090", "8.9"
    )
    rtx4060 = replace(rtx4090, gpu_name="NVIDIA GeForce RTX 4060")
    name = runtime_cache_name("masked.0123456789abcdef", rtx4090, 12080)
    assert name.startswith("masked.0123456789abcdef.sm89.") and name.endswith(".runtime-cache")
    assert name == runtime_cache_name("masked.0123456789abcdef", rtx4090, 12080)
    others = {
        runtime_cache_name("masked.0123456789abcdef", rtx4060, 12080),
        runtime_cache_name("masked.0123456789abcdef", rtx4090, 12090),  # a driver update
        runtime_cache_name(
            "masked.0123456789abcdef", replace(rtx4090, tensorrt_version="1.8"), 12080
        ),
    }
    assert name not in others and len(others) == 3


def test_tensorrt_without_set_device_memory_is_refused_in_one_line() -> None:
    """set_device_memory(memory, size) exists from TensorRT 10.1, and the runner gives every
    context its memory with it: 10.0 is refused as an EngineError, not an AttributeError."""

    class IExecutionContext:  # TensorRT 10.0's: a device_memory property, no setter method
        device_memory = 0

    old = SimpleNamespace(__version__="10.0.1", IExecutionContext=IExecutionContext)
    with pytest.raises(
        EngineError, match=r"^TensorRT 10\.0\.1 has no .*'tensorrt>=10\.1'$"
    ) as caught:
        require_user_memory(old)
    assert "\n" not in str(caught.value)
    rtx = tensorrt_env.import_flavour(tensorrt_env.FLAVOURS["tensorrt-rtx"])
    require_user_memory(rtx)  # the real bindings installed here have it


def test_zero_memory_for_a_graph_shape_is_an_error(exported) -> None:
    """update_device_memory_size_for_shapes returns 0 on error (NvInferRuntime.h): the graph
    slot stops there in one line, before any memory is allocated or given to the context."""
    from resfuse.artifacts import read_manifest as read
    from resfuse.runtime.backends.tensorrt import TensorRTRunner

    calls: list[str] = []
    context = SimpleNamespace(
        set_input_shape=lambda name, shape: calls.append("set_input_shape") or True,
        update_device_memory_size_for_shapes=lambda: calls.append("size") or 0,
        set_device_memory=lambda memory, size: calls.append("set_device_memory"),
    )
    runner = TensorRTRunner(read(exported["masked"].manifest_path), "cuda", cuda_graphs=True)
    with pytest.raises(EngineError, match=r"returned 0; .*cuda_graphs=False$") as caught:
        runner._prepare_graph(SimpleNamespace(), context, (1, 3, 64, 64))
    assert "\n" not in str(caught.value) and calls == ["set_input_shape", "size"]


@pytest.fixture
def artifact_copy(exported, tmp_path: Path) -> Path:
    """The masked artifact copied into tmp_path (its manifest there)."""
    source = exported["masked"].manifest_path
    for name in [source.name, *named_files(source)]:
        shutil.copy(source.parent / name, tmp_path / name)
    return tmp_path / source.name


@pytest.mark.parametrize("targets", [None, ["cpu"]])
def test_an_int8_artifact_for_the_cpu_is_refused(artifact_copy: Path, targets) -> None:
    """INT8 with uint8 activations (resfuse-export --int8, whose older manifests name no
    targets) is not for TensorRT: refused before anything is imported or built."""
    data = json.loads(artifact_copy.read_text())
    data["precision"] = "int8"
    data.pop("targets", None)
    if targets:
        data["targets"] = targets
    artifact_copy.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"made for .* not TensorRT.*--target tensorrt"):
        runtime.load(artifact_copy, "tensorrt", "cuda")


def _elsewhere() -> tensorrt_env.BuildEnvironment:
    """This machine's environment with only the GPU changed (where there is one), so the first
    field that differs is the GPU whatever TensorRT and CUDA are installed."""
    if NO_GPU is None:
        here = tensorrt_env.current_environment()
        return replace(here, gpu_name="NVIDIA Imaginary GPU", compute_capability="8.6")
    return tensorrt_env.BuildEnvironment(
        "tensorrt", "10.13.0", "12", "linux-x86_64", "NVIDIA Imaginary GPU", "8.6"
    )


@pytest.fixture
def engine_beside_artifact(artifact_copy: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the masked artifact and, beside it, an engine entry of it written by
    resfuse.export.engines for another machine (its plan bytes are no plan: nothing may
    deserialise them, since the recorded GPU is not this one)."""
    manifest = read_manifest(artifact_copy)
    sidecar = engines.store_engine(
        tmp_path, manifest, default_profiles(manifest), BuildSettings(), _elsewhere(),
        b"not a plan", 1.0,
    )  # fmt: skip
    return sidecar, manifest.path


def test_an_engine_loads_with_the_artifact_beside_it(engine_beside_artifact) -> None:
    sidecar, artifact = engine_beside_artifact
    plan = next(sidecar.parent.glob("*.plan"))
    assert engine_artifact(sidecar) == engine_artifact(plan) == (sidecar, artifact)
    assert engine_artifact(artifact) is None
    with pytest.raises(ConfigError, match="is a TensorRT engine, which only backend 'tensorrt'"):
        runtime.load(sidecar, "onnxruntime")
    with pytest.raises(ConfigError, match=r"options \['profiles'\] choose how an engine is built"):
        runtime.load(sidecar, "tensorrt", "cuda", profiles=["1x3x64x64:1x3x64x64:1x3x64x64"])
    # Routed to the tensorrt runner with the artifact's contract: without TensorRT it stops at
    # the import; with it, at the recorded GPU, before the plan is deserialised.
    expected, text = (
        (BackendUnavailableError, "not installed|needs a CUDA GPU")
        if NO_GPU
        else (EngineError, "engine built for GPU NVIDIA Imaginary GPU")
    )
    with pytest.raises(expected, match=text):
        runtime.load(plan, "tensorrt", "cuda")


def test_a_failed_runtime_cache_save_still_deactivates(engine_beside_artifact, monkeypatch):
    """deactivate() saves a TensorRT-RTX runtime cache; when that fails (here: its lock path
    is a folder) the error says so in one line, and the runner is left inactive all the same,
    not holding its engine (issue 27, item 6). This machine has no GPU: the GPU it would run
    on is given as the environment resfuse reads."""
    from resfuse.engine_manifest import read_record
    from resfuse.runtime.backends.tensorrt import TensorRTRunner
    from resfuse.runtime.cudart import cuda_driver_version

    sidecar, artifact = engine_beside_artifact
    record = read_record(sidecar)
    here = replace(record.environment, flavour="tensorrt-rtx", gpu_name="NVIDIA RTX 4090")
    monkeypatch.setattr(tensorrt_env, "current_environment", lambda name=None: here)
    name = runtime_cache_name(record.path.stem, here, cuda_driver_version())
    blocked = record.path.with_name(f".{name}.lock")
    blocked.mkdir()

    def active() -> TensorRTRunner:
        runner = TensorRTRunner(read_manifest(artifact), "cuda")
        runner.record, runner.engine, runner._runtime = record, object(), object()
        runner._runtime_cache = SimpleNamespace(serialize=lambda: b"kernels compiled here")
        return runner

    runner = active()
    with pytest.raises(ArtifactWriteError, match="runtime cache .* could not be written") as caught:
        runner.deactivate()
    assert "\n" not in str(caught.value)
    assert runner.record is runner.engine is runner._runtime is runner._runtime_cache is None
    blocked.rmdir()
    active().deactivate()
    assert (record.path.parent / name).read_bytes() == b"kernels compiled here"


def test_an_engine_without_its_artifact_is_refused(engine_beside_artifact, tmp_path) -> None:
    sidecar, artifact = engine_beside_artifact
    artifact.unlink()
    with pytest.raises(ManifestError, match=f"built from {artifact.name}, which is not beside it"):
        runtime.load(sidecar, "tensorrt", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_benchmark_without_cuda_says_why_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = run(sys.executable, "benchmarks/gpu_latency.py", "--output", str(out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "sees no CUDA device" in proc.stderr
    assert not out.exists() and proc.stdout == ""


# --- on a GPU with TensorRT --------------------------------------------------------------------

# Random calibration puts INT8 at 0.09-0.14 relative L2 on ONNX Runtime (spp, 64-311 px): the
# bound is widened as benchmarks/cpu_latency.py does, and the engine is judged by the same one.
VARIANTS = {
    "fp32": [],
    "fp16": ["--precision", "fp16"],
    "int8": ["--precision", "int8", "--target", "tensorrt", "--calib-random", "--calib-count", "8",
             "--calib-size", "256", "--max-rel-l2", "0.2"],
}  # fmt: skip


def _export(folder: Path, method: str, variant: str, *extra: str) -> Path:
    name = f"{method}-{variant}"
    proc = run(
        str(BIN / "resfuse-export"), "--method", method, "--output", str(folder), "--name", name,
        "--max-size", "512", "--max-batch", "4", *VARIANTS[variant], *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return folder / f"{name}.json"


@pytest.fixture(scope="module")
def trt_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Each method's float32, float16 and int8-for-TensorRT artifacts, by resfuse-export."""
    folder = tmp_path_factory.mktemp("trt-artifacts")
    return {
        (method, variant): _export(folder, method, variant)
        for method in ("upsample", "spp", "masked")
        for variant in VARIANTS
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@on_gpu
@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", ["upsample", "spp", "masked"])
def test_engine_matches_pytorch_at_odd_sizes(trt_exports, cache, method, variant) -> None:
    """float32 elementwise by the manifest's tolerance, float16 and int8 by their recorded
    relative L2 bound; the image channels as resfuse-check requires."""
    path = trt_exports[(method, variant)]
    report = check_artifact(path, "tensorrt", "cuda", ODD_SHAPES, cache_dir=cache, **FAST_BUILD)
    assert report.tolerance == read_manifest(path).tolerance
    assert report.passed, report.markdown()


@on_gpu
def test_profiles_pick_a_context_each_and_name_all_ranges(trt_exports, cache) -> None:
    path = trt_exports[("masked", "fp32")]
    buckets = ["1x3x64x64:1x3x128x128:2x3x256x256", "1x3x257x257:1x3x384x384:1x3x512x512"]
    with (
        runtime.load(
            path, "tensorrt", "cuda", cache_dir=cache, profiles=buckets, **FAST_BUILD
        ) as engine,
        runtime.load(path, "torch", "cpu") as original,
    ):
        for shape in [(2, 3, 97, 131), (1, 3, 300, 511), (1, 3, 64, 256)]:
            x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
            np.testing.assert_allclose(engine.run(x), original.run(x), atol=1e-4, rtol=1e-4)
        message = r"2x3x300x300 .* \(0: 1x3x64x64\.\.2x3x256x256, 1: 1x3x257x257\.\.1x3x512x512\)"
        with pytest.raises(InputContractError, match=message):
            engine.run(np.ones((2, 3, 300, 300), np.float32))
        assert engine.runner.describe()["profiles"] == buckets


@on_gpu
def test_cached_engine_is_found_fast_and_loads_by_its_manifest(trt_exports, cache) -> None:
    path = trt_exports[("spp", "fp32")]
    settings = BuildSettings(**FAST_BUILD)
    built = engines.find_or_build(path, settings=settings, cache_dir=cache)
    sidecar = built.record.path
    start = time.perf_counter()
    assert engines.find_or_build(path, settings=settings, cache_dir=cache).record == built.record
    assert time.perf_counter() - start < 1.0
    beside = engines.export_engine(built, path.parent)  # as resfuse-build --output does
    x = np.random.default_rng(1).standard_normal((1, 3, 97, 131), dtype=np.float32)
    with (
        runtime.load(beside, "tensorrt", "cuda") as by_engine,
        runtime.load(path, "tensorrt", "cuda", cache_dir=cache, **FAST_BUILD) as by_artifact,
    ):
        assert by_engine.runner.describe()["engine"] == beside.name == sidecar.name
        assert by_engine.manifest.path == path
        np.testing.assert_allclose(by_engine.run(x), by_artifact.run(x), atol=1e-6, rtol=1e-6)


@on_gpu
@pytest.mark.slow
def test_a_changed_onnx_builds_a_new_engine(tmp_path: Path, cache) -> None:
    first = _export(tmp_path, "upsample", "fp32")
    old = engines.find_or_build(first, cache_dir=cache, settings=BuildSettings(**FAST_BUILD))
    second = _export(tmp_path, "upsample", "fp32", "--seed", "1")  # same name, new weights
    assert second == first
    with (
        runtime.load(second, "tensorrt", "cuda", cache_dir=cache, **FAST_BUILD) as engine,
        runtime.load(second, "torch", "cpu") as original,
    ):
        assert engine.runner.describe()["engine"] != old.record.path.name
        x = np.random.default_rng(2).standard_normal((1, 3, 97, 131), dtype=np.float32)
        np.testing.assert_allclose(engine.run(x), original.run(x), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def masked_engine(trt_exports, cache):
    path = trt_exports[("masked", "fp32")]
    with runtime.load(
        path, "tensorrt", "cuda", cache_dir=cache, finite_check=False, **FAST_BUILD
    ) as s:
        yield s


@on_gpu
def test_cuda_tensors_stay_on_the_gpu_without_copies(masked_engine) -> None:
    x = torch.randn(2, 3, 97, 131, device="cuda")
    masked_engine.run(x)  # the context is made on the first call
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = masked_engine.run(x)
    copies = [e.name for e in profile.events() if "copy" in e.name]  # aten::copy_, _to_copy
    assert copies == [] and out.device == x.device and out.shape == (2, 67, 97, 131)
    expected = masked_engine.run(x.cpu().numpy())
    np.testing.assert_allclose(out.cpu().numpy(), expected, atol=1e-6, rtol=1e-6)


@on_gpu
def test_calls_from_many_threads_get_their_own_results(masked_engine) -> None:
    inputs = [torch.randn(1, 3, 64 + 32 * k, 96, device="cuda") for k in range(4)]
    expected = [masked_engine.run(x).cpu() for x in inputs]
    results: dict[int, torch.Tensor] = {}

    def call(k: int) -> None:
        for _ in range(3):
            results[k] = masked_engine.run(inputs[k]).cpu()

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, want in enumerate(expected):
        torch.testing.assert_close(results[k], want, atol=1e-5, rtol=1e-5)


@on_gpu
def test_cuda_graphs_give_the_same_output(trt_exports, cache, masked_engine) -> None:
    path = trt_exports[("masked", "fp32")]
    with runtime.load(
        path, "tensorrt", "cuda", cache_dir=cache, cuda_graphs=True, **FAST_BUILD
    ) as graphs:
        assert graphs.runner.describe()["cuda_graphs"] is True
        for shape in [(1, 3, 97, 131), (2, 3, 64, 64)]:
            for seed in range(3):  # new data each call: the graph reads the input every replay
                x = torch.randn(
                    shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)
                )
                torch.testing.assert_close(
                    graphs.run(x), masked_engine.run(x), atol=1e-5, rtol=1e-5
                )


@on_gpu
def test_graph_slots_of_one_profile_run_one_at_a_time(trt_exports, cache, masked_engine) -> None:
    """CUDA-graph contexts for two shapes of one profile share that profile: TensorRT allows
    one context per profile in flight, so calls from many threads must still be right."""
    path = trt_exports[("masked", "fp32")]
    shapes = [(1, 3, 97, 131), (1, 3, 64, 64)]  # both in the default profile
    inputs = [torch.randn(shapes[k % 2], device="cuda") for k in range(8)]
    expected = [masked_engine.run(x).cpu() for x in inputs]
    with runtime.load(
        path, "tensorrt", "cuda", cache_dir=cache, cuda_graphs=True, **FAST_BUILD
    ) as graphs:
        results: dict[int, torch.Tensor] = {}

        def call(k: int) -> None:
            results[k] = graphs.run(inputs[k]).cpu()

        threads = [threading.Thread(target=call, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        slots = graphs.runner._graphs.values()
        assert len(slots) == 2 and len({id(slot.lock) for slot in slots}) == 1
    for k in range(8):
        torch.testing.assert_close(results[k], expected[k], atol=1e-5, rtol=1e-5)


@on_gpu
def test_deactivate_waits_for_queued_work(trt_exports, cache) -> None:
    """Leaving the session right after a call queued on the GPU: the output is complete."""
    path = trt_exports[("masked", "fp32")]
    x = torch.randn(4, 3, 512, 512, device="cuda")
    with runtime.load(path, "tensorrt", "cuda", cache_dir=cache, **FAST_BUILD) as s:
        reference = s.run(x).clone()
        out = s.run(x)  # queued; the with-block ends before the host waits for it
    torch.cuda.synchronize()
    torch.testing.assert_close(out, reference)


@on_gpu
def test_polygraphy_runs_the_verified_plan_to_the_same_output(masked_engine) -> None:
    """A runner resfuse did not write, Polygraphy's TrtRunner, on the same verified plan bytes:
    binding, profile choice and copies in resfuse's runner change nothing in the result. CUDA 13
    wheels keep libcudart where Polygraphy 0.53 does not look: expose_cudart shows it the way;
    a TensorRT-RTX plan needs Polygraphy's RTX mode, chosen before its first import."""
    import os

    from resfuse.runtime.cudart import expose_cudart

    expose_cudart()
    if masked_engine.runner.record.environment.flavour == "tensorrt-rtx":
        os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    record = masked_engine.runner.record
    plan = engines.read_engine(record.path).plan
    x = np.random.default_rng(3).standard_normal((1, 3, 97, 131), dtype=np.float32)
    with TrtRunner(EngineFromBytes(plan)) as runner:
        [theirs] = runner.infer({"image": x}).values()
    np.testing.assert_allclose(masked_engine.run(x), np.asarray(theirs), atol=1e-6, rtol=1e-6)


@on_gpu
def test_graph_slots_stay_within_max_graphs(trt_exports, cache, masked_engine) -> None:
    """Three shapes through max_graphs=2: the least recently used is freed and made again
    when it comes back, with the same output (issue 27, item 2)."""
    path = trt_exports[("masked", "fp32")]
    shapes = [(1, 3, 64, 64), (1, 3, 96, 96), (1, 3, 64, 64), (1, 3, 128, 128), (1, 3, 96, 96)]
    with runtime.load(
        path, "tensorrt", "cuda", cache_dir=cache, cuda_graphs=True, max_graphs=2, **FAST_BUILD
    ) as graphs:
        for shape in shapes:
            x = torch.randn(shape, device="cuda")
            torch.testing.assert_close(graphs.run(x), masked_engine.run(x), atol=1e-5, rtol=1e-5)
            assert len(graphs.runner._graphs.keys()) <= 2
        assert [key[1] for key in graphs.runner._graphs.keys()] == [shapes[3], shapes[4]]


@on_gpu
def test_first_capture_waits_for_the_callers_stream(trt_exports, cache, masked_engine) -> None:
    """The input is written on a busy side stream and the first call (set-up, warm call and
    capture) is made from that stream: the slot's stream must wait for it (issue 27, item 5)."""
    path = trt_exports[("masked", "fp32")]
    x = torch.randn(1, 3, 97, 131, device="cuda")
    expected = masked_engine.run(x)
    side = torch.cuda.Stream()
    with runtime.load(
        path, "tensorrt", "cuda", cache_dir=cache, cuda_graphs=True, **FAST_BUILD
    ) as graphs:
        with torch.cuda.stream(side):
            late = torch.zeros_like(x)
            torch.cuda._sleep(50_000_000)  # cycles: the copy below lands well after the call
            late.copy_(x)
            out = graphs.run(late)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@on_gpu
def test_rtx_runtime_cache_is_saved_under_this_gpus_key(trt_exports, cache) -> None:
    """TensorRT-RTX keeps the kernels it compiled here in a cache named for this GPU, driver
    and version, written when the session closes (issue 27, item 6)."""
    from resfuse.runtime.backends.tensorrt import runtime_cache_name
    from resfuse.runtime.cudart import cuda_driver_version

    if tensorrt_env.default_flavour().name != "tensorrt-rtx":
        pytest.skip("the runtime cache is TensorRT-RTX's")
    path = trt_exports[("masked", "fp32")]
    with runtime.load(path, "tensorrt", "cuda", cache_dir=cache, **FAST_BUILD) as s:
        s.run(torch.randn(1, 3, 64, 64, device="cuda"))
        record = s.runner.record
    here = tensorrt_env.current_environment("tensorrt-rtx")
    name = runtime_cache_name(record.path.stem, here, cuda_driver_version())
    assert (record.path.parent / name).stat().st_size > 0
