import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resfuse import runtime
from resfuse.errors import (
    BackendUnavailableError,
    ConfigError,
    InputContractError,
    ManifestError,
)
from resfuse.runtime.backends.onnxrt import tensorrt_provider_options
from resfuse.runtime.cudart import cuda_device
from resfuse.runtime.machine import physical_cores

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def sessions(exported):
    path = exported["masked"].manifest_path
    with runtime.load(path) as ort_session, runtime.load(path, backend="torch") as torch_session:
        yield ort_session, torch_session


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 97, 131), (1, 3, 300, 77)])
def test_onnxruntime_matches_torch_backend(sessions, shape) -> None:
    ort_session, torch_session = sessions
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    out = ort_session.run(x)
    assert isinstance(out, np.ndarray) and out.shape == (shape[0], 67, *shape[2:])
    np.testing.assert_allclose(out, torch_session.run(x), atol=1e-4, rtol=1e-4)


def test_torch_tensor_in_tensor_out(sessions) -> None:
    ort_session, torch_session = sessions
    x = torch.randn(1, 3, 64, 80)
    for session in sessions:
        out = session.run(x)
        assert isinstance(out, torch.Tensor) and out.device == x.device
    torch.testing.assert_close(ort_session.run(x), torch_session.run(x), atol=1e-4, rtol=1e-4)


def test_load_by_onnx_path_and_session_settings(exported) -> None:
    path = exported["spp"].onnx_path
    with runtime.load(path, threads=1, optimization="basic", mem_pattern=False) as session:
        settings = session.runner.describe()
        assert settings["threads"] == 1 and settings["mem_pattern"] is False
        assert settings["optimization"] == "basic"
        assert session.run(np.zeros((1, 3, 40, 50), np.float32)).shape == (1, 67, 40, 50)
    with runtime.load(path) as session:
        assert session.runner.describe()["threads"] == physical_cores()
        assert session.runner.describe()["providers"] == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    "x,message",
    [
        (np.zeros((3, 64, 64), np.float32), "4-D NCHW"),
        (np.zeros((1, 1, 64, 64), np.float32), "expected 3 input channels, got 1"),
        (np.zeros((1, 3, 64, 64), np.float64), "expected dtype float32, got float64"),
        (np.zeros((1, 3, 64, 64), np.uint8), "expected dtype float32, got uint8"),
        (np.zeros((1, 3, 16, 64), np.float32), r"height 16 is outside .* 32\.\.1024"),
        (np.zeros((1, 3, 64, 1030), np.float32), r"width 1030 is outside .* 32\.\.1024"),
        (np.zeros((33, 3, 32, 32), np.float32), r"batch size 33 is outside .* 1\.\.32; split"),
        (np.full((1, 3, 32, 32), np.nan, np.float32), "3072 NaN/Inf values"),
        (torch.full((1, 3, 32, 32), float("inf")), "3072 NaN/Inf values"),
        (torch.zeros((1, 3, 64, 64), dtype=torch.float16), "expected dtype float32, got float16"),
    ],
)
def test_every_bad_input_is_named(sessions, x, message: str) -> None:
    for session in sessions:
        with pytest.raises(InputContractError, match=message):
            session.run(x)


def test_run_rejects_other_types(sessions) -> None:
    with pytest.raises(TypeError, match="not list"):
        sessions[0].run([[1.0]])


def _manual_preprocess(image: Image.Image, manifest: dict) -> np.ndarray:
    pre = manifest["preprocess"]
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    x = (x - np.float32(pre["mean"])) / np.float32(pre["std"])
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def test_image_files_and_pil_images(sessions, tmp_path: Path) -> None:
    ort_session, _ = sessions
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    expected = ort_session.run(_manual_preprocess(image, ort_session.manifest.data))
    np.testing.assert_allclose(ort_session.run(tmp_path / "a.png"), expected, atol=1e-5)
    np.testing.assert_allclose(ort_session.run(str(tmp_path / "a.png")), expected, atol=1e-5)
    np.testing.assert_allclose(
        ort_session.run(image.convert("L")),
        ort_session.run(image.convert("L").convert("RGB")),
        atol=1e-6,
    )  # grayscale file into an RGB model


def test_resize_policy(exported, tmp_path: Path) -> None:
    Image.new("RGB", (1500, 300)).save(tmp_path / "wide.png")  # W 1500 > max 1024
    Image.new("RGB", (20, 400)).save(tmp_path / "thin.png")  # W 20 < min 32
    path = exported["upsample"].manifest_path
    with runtime.load(path) as session:
        with pytest.raises(InputContractError, match="width 1500 is outside"):
            session.run(tmp_path / "wide.png")
    with runtime.load(path, resize="fit") as session:
        assert session.run(tmp_path / "wide.png").shape == (1, 67, 205, 1024)
        assert session.run(tmp_path / "thin.png").shape == (1, 67, 640, 32)
    (tmp_path / "junk.png").write_text("no image")
    with runtime.load(path) as session, pytest.raises(InputContractError, match="cannot read"):
        session.run(tmp_path / "junk.png")


def test_one_session_many_threads(sessions) -> None:
    ort_session, _ = sessions
    rng = np.random.default_rng(3)
    inputs = [
        rng.standard_normal((1 + i % 2, 3, 40 + 9 * i, 70 - 3 * i), dtype=np.float32)
        for i in range(8)
    ]
    expected = [ort_session.run(x) for x in inputs]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = ort_session.run(inputs[i])
                np.testing.assert_allclose(results[i], expected[i], atol=1e-6, rtol=1e-6)
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8


def test_artifact_integrity_is_checked_before_loading(exported, tmp_path: Path) -> None:
    src = exported["masked"]
    for path in (src.manifest_path, src.onnx_path, src.weights_path):
        shutil.copy(path, tmp_path)
    onnx_file = tmp_path / src.onnx_path.name
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="does not match the size and sha256"):
        runtime.load(tmp_path / src.manifest_path.name)
    manifest = json.loads((tmp_path / src.manifest_path.name).read_text())
    manifest["format_version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="format version 99"):
        runtime.load(tmp_path / "future.json")


def test_backend_and_option_errors(exported) -> None:
    path = exported["masked"].manifest_path
    with pytest.raises(ConfigError, match="unknown backend 'tflite'"):
        runtime.load(path, backend="tflite")
    with pytest.raises(ConfigError, match="runs on device 'cuda'"):
        runtime.load(path, backend="tensorrt")
    with pytest.raises(ConfigError, match="unknown onnxruntime options \\['thread'\\]"):
        runtime.load(path, thread=2)
    with pytest.raises(ConfigError, match="device must be one of"):
        runtime.load(path, device="npu")
    with pytest.raises(ConfigError, match="optimization must be one of"):
        runtime.load(path, optimization="max")


def test_missing_gpu_provider_names_the_package(exported) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendUnavailableError, match="pip install onnxruntime-gpu"):
        runtime.load(exported["masked"].manifest_path, device="cuda")


def test_torch_backend_without_cuda(exported) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        runtime.load(exported["masked"].manifest_path, backend="torch", device="cuda")


def test_tensorrt_ep_profile_and_cache_key(exported, tmp_path: Path) -> None:
    manifest = json.loads(exported["masked"].manifest_path.read_text())
    from resfuse.artifacts import read_manifest

    contract = read_manifest(exported["masked"].manifest_path).contract
    sha = manifest["files"]["onnx"]["sha256"]
    opts = tensorrt_provider_options(contract, "image", sha, tmp_path, fp16=True)
    assert opts["trt_profile_min_shapes"] == "image:1x3x32x32"
    assert opts["trt_profile_opt_shapes"] == "image:1x3x512x512"
    assert opts["trt_profile_max_shapes"] == "image:32x3x1024x1024"
    assert opts["trt_fp16_enable"] == "True" and opts["trt_engine_cache_enable"] == "True"
    folder = Path(opts["trt_engine_cache_path"]).parent
    assert folder.parent == tmp_path / sha[:16] and folder.name.startswith("ort")
    assert opts["trt_timing_cache_path"] == str(folder / "timing")
    other = tensorrt_provider_options(contract, "image", "0" * 64, tmp_path)
    assert other["trt_engine_cache_path"] != opts["trt_engine_cache_path"]
    with pytest.raises(ConfigError, match="outside the profile"):
        tensorrt_provider_options(contract, "image", sha, tmp_path, opt_shape=(1, 3, 2048, 64))


def test_the_tensorrt_ep_cache_is_keyed_by_versions_and_gpu(exported, tmp_path: Path) -> None:
    """An ONNX Runtime or TensorRT upgrade, or another GPU, never meets an engine built for
    the old one (the EP's own file names carry only precision and SM): issue 27, item 3."""
    from resfuse.artifacts import read_manifest
    from resfuse.runtime.backends.onnxrt import ep_environment

    manifest = read_manifest(exported["masked"].manifest_path)
    sha = manifest.record("onnx")["sha256"]
    base = {"onnxruntime": "1.32.0", "tensorrt": "10.13.0", "gpu": "NVIDIA H100", "cc": "9.0"}

    def path(**changed: str) -> str:
        env = {**base, **changed}
        options = tensorrt_provider_options(
            manifest.contract, "image", sha, tmp_path, environment=env
        )
        return options["trt_engine_cache_path"]

    assert path() == path() and "sm90" in path()
    others = [path(onnxruntime="1.33.0"), path(tensorrt="11.1.0"), path(gpu="NVIDIA H200")]
    assert len({path(), *others, path(cc="8.9")}) == 5
    here = ep_environment()  # this machine: ONNX Runtime's version, the rest unknown or found
    assert set(here) == set(base) and here["onnxruntime"]
    gpu = cuda_device(0)  # from the CUDA driver (test_gpu_paths.py checks it against torch's)
    assert (here["gpu"], here["cc"]) == (gpu or ("unknown", "unknown"))


def test_the_tensorrt_ep_environment_imports_no_torch() -> None:
    """The GPU's name and capability come from the CUDA driver: the base install has no torch,
    and in the full install importing it would cost seconds at every session's start."""
    script = (
        "import sys\n"
        "from resfuse.runtime.backends.onnxrt import ep_environment\n"
        "ep_environment()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.gpu
@needs_cuda
def test_cuda_backends_match_cpu(exported) -> None:
    import onnxruntime as ort

    path = exported["masked"].manifest_path
    x = torch.randn(2, 3, 97, 131)
    with runtime.load(path, backend="torch") as cpu:
        expected = cpu.run(x)
    with runtime.load(path, backend="torch", device="cuda") as gpu:
        out = gpu.run(x.cuda())
        assert out.is_cuda
        torch.testing.assert_close(out.cpu(), expected, atol=1e-3, rtol=1e-3)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    with runtime.load(path, device="cuda") as session:
        np.testing.assert_allclose(session.run(x.numpy()), expected.numpy(), atol=1e-3, rtol=1e-3)
        out, phases = session.runner.infer_timed(x.numpy())
        assert out.shape == (2, 67, 97, 131) and min(phases.h2d_ms, phases.d2h_ms) > 0
