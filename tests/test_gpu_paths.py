"""The GPU paths a data-centre GPU (an H100 or H200, compute capability 9.0) can run without
TensorRT's libraries, which cannot be installed offline: ONNX Runtime's CUDA execution provider
against PyTorch on the same GPU, whole and tiled; ONNX Runtime's TensorRT execution provider
where TensorRT is there; and TensorRT-RTX's refusal of a plan built for another GPU generation.
All marked gpu, each skipped with its reason elsewhere; benchmarks/gpu_check.sh runs them and
names each path run or not run (benchmarks/gpu_verdict.py reads their JUnit report)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resfuse import runtime
from resfuse.compare import Tolerance, compare
from resfuse.engine_manifest import BuildSettings
from resfuse.errors import BackendUnavailableError
from resfuse.profiles import Profile
from resfuse.tensorrt_env import FLAVOURS

# TF32 is off in PyTorch for these comparisons; ONNX Runtime's CUDA EP may use TF32 tensor cores
# for float32 convolutions on Ampere and later, hence 1e-3 (as tests/test_runtime.py's CUDA test).
CLOSE = Tolerance(atol=1e-3, rtol=1e-3)


def _no_provider(name: str) -> str | None:
    """Why ONNX Runtime cannot offer `name` on a GPU here, or None."""
    import onnxruntime as ort

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    if name not in ort.get_available_providers():
        return f"ONNX Runtime {ort.__version__} has no {name} (pip install onnxruntime-gpu)"
    return None


def _rtx_refusal_skip() -> str | None:
    """Why the RTX refusal cannot be checked here: it needs a GPU TensorRT-RTX has no target
    for (9.0) and TensorRT-RTX itself."""
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    capability = "{}.{}".format(*torch.cuda.get_device_capability())
    rtx = FLAVOURS["tensorrt-rtx"]
    if capability in rtx.targets:
        return f"TensorRT-RTX supports this GPU ({capability}); the refusal is checked on 9.0"
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError as exc:
        return f"TensorRT-RTX is not installed ({exc})"
    return None


NO_CUDA_EP = _no_provider("CUDAExecutionProvider")
NO_TENSORRT_EP = _no_provider("TensorrtExecutionProvider")
NO_RTX_REFUSAL = _rtx_refusal_skip()
cuda_ep = pytest.mark.skipif(NO_CUDA_EP is not None, reason=f"ORT CUDA EP: {NO_CUDA_EP}")


def _ort_or_skip(path: Path, device: str, **options: object) -> runtime.Session:
    """An ONNX Runtime session on `device`'s provider; a provider that cannot load here (its
    CUDA or TensorRT libraries missing: onnxruntime-gpu for CUDA 12 beside torch's CUDA 13)
    makes resfuse refuse the fallback, and the path is then not run, with that reason."""
    try:
        return runtime.load(path, "onnxruntime", device, **options)
    except BackendUnavailableError as exc:
        pytest.skip(f"ORT {device} EP: {exc}")


@pytest.fixture(autouse=True)
def _no_tf32():
    """PyTorch's reference in float32 (its default uses TF32 convolutions on Ampere and later)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_the_cuda_driver_names_the_gpu_torch_sees() -> None:
    """The TensorRT EP's cache key reads the GPU from libcuda, not torch: the same GPU."""
    from resfuse.runtime.cudart import cuda_device

    capability = "{}.{}".format(*torch.cuda.get_device_capability(0))
    assert cuda_device(0) == (torch.cuda.get_device_name(0), capability)


@pytest.mark.gpu
@cuda_ep
@pytest.mark.parametrize("method", ["upsample", "spp", "masked"])
def test_ort_cuda_matches_pytorch_on_the_gpu(exported, method: str) -> None:
    """A CUDA tensor in, a CUDA tensor out, on the CUDA EP itself (no silent CPU fallback)."""
    path = exported[method].manifest_path
    x = torch.randn(2, 3, 97, 131, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with (
        _ort_or_skip(path, "cuda") as ort_gpu,
        runtime.load(path, "torch", "cuda") as ref,
    ):
        assert ort_gpu.runner.session.get_providers()[0] == "CUDAExecutionProvider"
        out, expected = ort_gpu.run(x), ref.run(x)
    assert out.is_cuda and out.shape == expected.shape
    stats = compare(expected.cpu().numpy(), out.cpu().numpy(), CLOSE)
    assert stats.passed, stats


@pytest.mark.gpu
@cuda_ep
def test_ort_cuda_runs_tiled(head_artifact: Path) -> None:
    """512x512 through an artifact whose range stops at 256: tiled through the CUDA EP, as
    through PyTorch on the GPU, and the two agree."""
    x = np.random.default_rng(0).standard_normal((1, 3, 512, 512), dtype=np.float32)
    with (
        _ort_or_skip(head_artifact, "cuda") as ort_gpu,
        runtime.load(head_artifact, "torch", "cuda") as ref,
    ):
        out = np.asarray(ort_gpu.run(x, tile="auto"))
        expected = np.asarray(ref.run(x, tile="auto"))
    assert out.shape == (1, 3, 512, 512)
    stats = compare(expected, out, CLOSE)
    assert stats.passed, stats


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(NO_TENSORRT_EP is not None, reason=f"ORT TensorRT EP: {NO_TENSORRT_EP}")
def test_ort_tensorrt_ep_matches_pytorch_on_the_gpu(exported, tmp_path: Path) -> None:
    """The TensorRT EP needs TensorRT's libraries (libnvinfer) beside onnxruntime-gpu: where
    they cannot be loaded the session would fall back, which resfuse refuses; that is a skip."""
    path = exported["masked"].manifest_path
    x = torch.randn(1, 3, 128, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with (
        _ort_or_skip(path, "tensorrt", cache_dir=tmp_path) as session,
        runtime.load(path, "torch", "cuda") as ref,
    ):
        assert session.runner.session.get_providers()[0] == "TensorrtExecutionProvider"
        out, expected = session.run(x), ref.run(x)
    stats = compare(expected.cpu().numpy(), out.cpu().numpy(), CLOSE)
    assert stats.passed, stats


@pytest.mark.gpu
@pytest.mark.skipif(NO_RTX_REFUSAL is not None, reason=f"TensorRT-RTX: {NO_RTX_REFUSAL}")
def test_rtx_plan_for_another_generation_is_invalid_here(exported, tmp_path: Path) -> None:
    """A real TensorRT-RTX plan built for 8.9 (an RTX 40xx), asked on this GPU (an H100 or
    H200: 9.0, which TensorRT-RTX has no target for): INVALID, UNSUPPORTED_CC among its
    diagnostics, and the runner's message asks for a build for this GPU."""
    from resfuse.export import engines
    from resfuse.runtime.backends.tensorrt import invalid_engine_message, invalidity_reasons
    from resfuse.tensorrt_env import import_flavour

    trt = import_flavour(FLAVOURS["tensorrt-rtx"])
    profile = Profile((1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 128, 128))
    built = engines.find_or_build(
        exported["masked"].manifest_path, [profile], BuildSettings(builder_level=0), tmp_path,
        engine="tensorrt-rtx", targets=("8.9",),
    )  # fmt: skip
    validity, diagnostics = trt.Runtime(trt.Logger(trt.Logger.WARNING)).get_engine_validity(
        built.plan
    )
    reasons = invalidity_reasons(trt, diagnostics)
    assert validity == trt.EngineValidity.INVALID, (validity, reasons)
    assert "UNSUPPORTED_CC" in reasons, reasons
    message = invalid_engine_message("m", "8.9", reasons, int(diagnostics))
    assert "--compute-capability of this GPU" in message and "\n" not in message
