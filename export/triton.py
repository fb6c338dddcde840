"""A Triton Inference Server model repository from an artifact, checked against Triton's own schema.

Layout (what a stock server loads): REPO/<model>/config.pbtxt and REPO/<model>/1/model.onnx, or
1/model.plan for a TensorRT engine that resfuse-build made from the artifact.
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
from resfuse.engine_manifest import EngineRecord
from resfuse.errors import ArtifactWriteError, BackendUnavailableError, ConfigError
from resfuse.export.engines import read_engine

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

    @property
    def device(self) -> str:
        """The manifest target these instances run an ONNX model on."""
        if self.tensorrt:
            return "tensorrt"
        return "cuda" if self.kind == "gpu" else "cpu"

    def check_targets(self, targets: list[str], artifact: str) -> None:
        """Refuse instances on a device the artifact is not made for: Triton would run the
        CPU's INT8 graph (uint8 activations) on a GPU without a word."""
        if self.device not in targets:
            kind = "cpu" if "cpu" in targets else "gpu"
            raise ConfigError(
                f"{artifact} is made for {', '.join(targets)}, not {self.device}, where "
                f"--triton-kind {self.kind} runs it; use --triton-kind {kind}, or export for "
                f"GPUs (float32, --precision fp16, or --precision int8 --target tensorrt)"
            )


def model_config(
    manifest: Manifest, name: str, options: TritonOptions, engine: EngineRecord | None = None
) -> str:
    """config.pbtxt for the artifact's ONNX graph, or for its TensorRT engine: batch from the
    manifest (the engine: its profiles' largest batch), H and W dynamic."""
    data = manifest.data
    contract = data["input"]["contract"]
    batch_max = contract["batch"]["max"]
    if engine is not None:
        batch_max = max(profile.max[0] for profile in engine.profiles)
    dynamic_batch = batch_max > 1  # a batch range of 1..1 is exported static: Triton sees it
    lead = [] if dynamic_batch else [1]
    platform = "onnxruntime_onnx" if engine is None else "tensorrt_plan"
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
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


def require_schema() -> Any:
    """Triton's ModelConfig message class, or a one-line error naming the extra to install."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise BackendUnavailableError(
            f"checking a Triton config needs tritonclient ({exc.name} is missing): "
            "pip install 'resfuse[triton]'"
        ) from exc
    return model_config_pb2.ModelConfig


def parse_config(text: str) -> Any:
    """The config as Triton's ModelConfig message; a field or value Triton rejects raises."""
    from google.protobuf import text_format

    model_config_class = require_schema()
    try:
        return text_format.Parse(text, model_config_class())
    except text_format.ParseError as exc:
        raise ConfigError(f"Triton would reject this config.pbtxt: {exc}") from exc


def write_triton_repo(
    path: str | Path,
    repo: str | Path,
    options: TritonOptions = TritonOptions(),
    name: str = "",
    engine: str | Path | None = None,
) -> Path:
    """REPO/<name>/ for the artifact at `path` (name: the manifest's), serving its ONNX model or,
    given `engine` (an engine sidecar resfuse-build wrote for this artifact), that plan. Written
    whole or not at all: built in a temporary folder beside it, then renamed over any earlier
    version."""
    options.validate()
    manifest = read_manifest(path)
    name = check_name(name or manifest.path.stem)
    record, model, filename = None, b"", "model.onnx"
    if engine is None:
        options.check_targets(manifest.targets, manifest.path.name)
        model = manifest.read("onnx")  # size and sha256 verified
    else:
        record, model = _plan_for(manifest, engine, options)
        filename = "model.plan"
    text = model_config(manifest, name, options, record)
    parse_config(text)
    repo = Path(repo)
    target = repo / name
    try:
        repo.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
        try:
            (staging / "1").mkdir()
            (staging / "1" / filename).write_bytes(model)
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


def _plan_for(
    manifest: Manifest, engine: str | Path, options: TritonOptions
) -> tuple[EngineRecord, bytes]:
    """The engine's verified plan, if it was built from this artifact and Triton can load it:
    GPU instances, no accelerator on top, no host code (Triton would run it unasked)."""
    if options.kind != "gpu":
        raise ConfigError("a TensorRT engine runs on GPU instances only; use --triton-kind gpu")
    if options.tensorrt:
        raise ConfigError("the TensorRT accelerator applies to ONNX models, not to an engine")
    verified = read_engine(engine)
    record, plan = verified.record, verified.plan
    if record.environment.flavour != "tensorrt":
        raise ConfigError(
            f"{record.path.name} is a {record.environment.flavour} plan, and Triton's "
            f"tensorrt_plan backend runs TensorRT plans only; build with --engine tensorrt"
        )
    if record.onnx_sha256 != manifest.record("onnx")["sha256"]:
        raise ConfigError(
            f"{record.path.name} was built from another ONNX model than {manifest.path.name}; "
            f"pass the artifact it was built from ({record.source_manifest})"
        )
    return record, plan


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
