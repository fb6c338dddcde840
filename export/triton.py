"""A Triton Inference Server model repository from an artifact, checked against Triton's own schema.

Layout (what a stock server loads): REPO/<model>/config.pbtxt and REPO/<model>/1/model.onnx.
The config is parsed back into Triton's `ModelConfig` protobuf message (shipped by
`tritonclient[grpc]`) before anything is written, so a field Triton does not know fails here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resfuse.artifacts import Manifest, check_name, read_manifest
from resfuse.errors import ArtifactWriteError, BackendUnavailableError, ConfigError

KINDS = ("cpu", "gpu")


@dataclass(frozen=True)
class TritonOptions:
    kind: str = "cpu"  # instance group: KIND_CPU or KIND_GPU
    instances: int = 1  # model instances per device
    max_queue_delay_us: int = 2000  # dynamic batching: how long a request waits for others
    tensorrt: bool = False  # GPU only: ONNX Runtime's TensorRT accelerator inside Triton
    tensorrt_fp16: bool = False

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"Triton instance kind must be one of {KINDS}, not {self.kind!r}")
        if self.instances < 1:
            raise ConfigError(f"Triton instances must be >= 1, got {self.instances}")
        if self.max_queue_delay_us < 0:
            raise ConfigError(
                f"Triton max queue delay must be >= 0 microseconds, got {self.max_queue_delay_us}"
            )
        if (self.tensorrt or self.tensorrt_fp16) and self.kind != "gpu":
            raise ConfigError(
                "the TensorRT accelerator runs on GPU instances only; add --triton-kind gpu"
            )
        if self.tensorrt_fp16 and not self.tensorrt:
            raise ConfigError("TensorRT fp16 is an option of the TensorRT accelerator; add it")


def model_config(manifest: Manifest, name: str, options: TritonOptions) -> str:
    """config.pbtxt for the artifact's ONNX graph: batch from the manifest, H and W dynamic."""
    data = manifest.data
    contract = data["input"]["contract"]
    batch_max = contract["batch"]["max"]
    dynamic_batch = batch_max > 1  # a batch range of 1..1 is exported static: Triton sees it
    lead = [] if dynamic_batch else [1]
    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {batch_max if dynamic_batch else 0}",
        _tensor("input", data["input"]["name"], [*lead, contract["channels"], -1, -1]),
        _tensor("output", data["output"]["name"], [*lead, data["output"]["channels"], -1, -1]),
        f"instance_group [ {{ count: {options.instances} kind: KIND_{options.kind.upper()} }} ]",
    ]
    if dynamic_batch:
        lines.append(
            f"dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}"
        )
    if options.tensorrt:
        precision = "FP16" if options.tensorrt_fp16 else "FP32"
        lines.append(
            "optimization { execution_accelerators { gpu_execution_accelerator: [ "
            f'{{ name: "tensorrt" parameters {{ key: "precision_mode" value: "{precision}" }} }} '
            "] } }"
        )
    return "\n".join(lines) + "\n"


def _tensor(kind: str, name: str, dims: list[int]) -> str:
    shape = ", ".join(str(d) for d in dims)
    return f'{kind} [ {{ name: "{name}" data_type: TYPE_FP32 dims: [ {shape} ] }} ]'


def parse_config(text: str) -> Any:
    """The config as Triton's ModelConfig message; a field or value Triton rejects raises."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise BackendUnavailableError(
            f"checking a Triton config needs tritonclient ({exc.name} is missing): "
            "pip install 'resfuse[triton]'"
        ) from exc
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"Triton would reject this config.pbtxt: {exc}") from exc


def write_triton_repo(
    path: str | Path, repo: str | Path, options: TritonOptions = TritonOptions(), name: str = ""
) -> Path:
    """REPO/<name>/ for the artifact at `path` (name: the manifest's), written whole or not at
    all: built in a temporary folder beside it, then renamed over any earlier version."""
    options.validate()
    manifest = read_manifest(path)
    name = check_name(name or manifest.path.stem)
    text = model_config(manifest, name, options)
    parse_config(text)
    onnx_bytes = manifest.read("onnx")  # size and sha256 verified
    repo = Path(repo)
    target = repo / name
    try:
        repo.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
        try:
            (staging / "1").mkdir()
            (staging / "1" / "model.onnx").write_bytes(onnx_bytes)
            (staging / "config.pbtxt").write_text(text)
            _replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise ArtifactWriteError(
            f"cannot write the Triton model {target}: {exc.strerror or exc}; check that {repo} "
            f"is a writable folder"
        ) from exc
    return target


def _replace(staging: Path, target: Path) -> None:
    """Swap the new model folder in: a reader sees the old folder or the new one, never a half
    written one (between the two renames, for an instant, neither)."""
    if target.is_dir():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)
