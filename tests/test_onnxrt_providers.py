"""ONNX Runtime's execution providers: no silent fallback, int8 and fp16 on the TensorRT EP."""

from __future__ import annotations

from pathlib import Path

import pytest

from resfuse.artifacts import read_manifest
from resfuse.errors import BackendUnavailableError
from resfuse.runtime.backends import onnxrt
from resfuse.runtime.backends.onnxrt import (
    OnnxRuntimeRunner,
    require_provider,
    tensorrt_major,
    tensorrt_provider_options,
)

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.mark.parametrize("got", [[CPU], [CUDA, CPU], [TRT, CUDA, CPU]])
def test_require_provider_passes_the_provider_asked_for(got: list[str]) -> None:
    require_provider(got[0], got)


@pytest.mark.parametrize(
    ("wanted", "got", "libraries"),
    [
        (TRT, [CUDA, CPU], "CUDA, cuDNN and TensorRT"),  # TensorRT's libraries missing
        (TRT, [CPU], "CUDA, cuDNN and TensorRT"),  # both GPU providers fell back
        (CUDA, [CPU], "CUDA and cuDNN"),
        (CUDA, [], "CUDA and cuDNN"),
        (TRT, [CUDA, TRT, CPU], "CUDA, cuDNN and TensorRT"),  # CUDA would take the nodes first
    ],
)
def test_require_provider_refuses_a_fallback(wanted: str, got: list[str], libraries: str) -> None:
    with pytest.raises(BackendUnavailableError) as info:
        require_provider(wanted, got)
    message = str(info.value)
    assert "\n" not in message and f"could not start {wanted}:" in message
    assert f"the session got {', '.join(got) or 'no provider'};" in message
    assert f"the {libraries} libraries" in message and "another --device" in message


@pytest.mark.filterwarnings("ignore:Specified provider")  # ONNX Runtime's one notice
@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_a_real_session_that_falls_back_is_refused(exported, tmp_path: Path, device: str) -> None:
    """The CPU build of ONNX Runtime drops the GPU providers asked for and builds a CPU session:
    a real fallback, which open_session must refuse."""
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: its providers do not fall back here")
    manifest = read_manifest(exported["masked"].manifest_path)
    runner = OnnxRuntimeRunner(manifest, device, cache_dir=str(tmp_path))
    with pytest.raises(BackendUnavailableError, match=f"the session got {CPU};"):
        runner.open_session(manifest.read("onnx"))


def test_cpu_session_leads_with_the_cpu_provider_and_keeps_it(exported) -> None:
    runner = OnnxRuntimeRunner(read_manifest(exported["masked"].manifest_path), "cpu")
    runner.activate()
    try:
        assert runner.session.get_providers() == [CPU]
        # The flag run() reads before moving a failing session to the fallback providers;
        # ONNX Runtime has no public getter for it.
        assert runner.session._enable_fallback is False
    finally:
        runner.deactivate()


def test_tensorrt_options_enable_int8_only_when_asked(exported, tmp_path: Path) -> None:
    contract = read_manifest(exported["masked"].manifest_path).contract
    sha = "ab" * 32
    assert tensorrt_provider_options(contract, "image", sha, tmp_path)["trt_int8_enable"] == "False"
    opts = tensorrt_provider_options(contract, "image", sha, tmp_path, int8=True)
    assert opts["trt_int8_enable"] == "True" and opts["trt_fp16_enable"] == "False"


def test_int8_artifact_asks_the_tensorrt_ep_for_int8(
    int8_trt: Path, exported, tmp_path: Path
) -> None:
    for path, expected in ((int8_trt, "True"), (exported["masked"].manifest_path, "False")):
        manifest = read_manifest(path)
        runner = OnnxRuntimeRunner(manifest, "tensorrt", cache_dir=str(tmp_path))
        name, trt = runner.providers()[0]
        assert name == TRT and trt["trt_int8_enable"] == expected, manifest.precision


def test_tensorrt_major_reads_a_real_tensorrt_only() -> None:
    try:
        import tensorrt
    except ImportError:
        tensorrt = None
    if hasattr(tensorrt, "Builder"):  # a GPU machine with pip's tensorrt
        assert tensorrt_major() == int(tensorrt.__version__.split(".")[0]) >= 10
    else:  # absent, or tensorrt-stubs' empty namespace package
        assert tensorrt_major() is None


@pytest.mark.parametrize(
    ("major", "expected"), [(10, "float16"), (11, "float32"), (None, "float32")]
)
def test_fp16_option_claims_float16_on_tensorrt_10_only(
    exported, monkeypatch: pytest.MonkeyPatch, major: int | None, expected: str
) -> None:
    monkeypatch.setattr(onnxrt, "tensorrt_major", lambda: major)
    manifest = read_manifest(exported["masked"].manifest_path)
    assert OnnxRuntimeRunner(manifest, "tensorrt", fp16=True).precision == expected
    assert OnnxRuntimeRunner(manifest, "tensorrt").precision == "float32"
