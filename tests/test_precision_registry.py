"""A precision is one entry of resfuse.precisions and its converter: the bfloat16 variant below is
defined here, in no module of resfuse, and it exports under its own suffix with its own bound,
targets and hint, passes manifest validation, runs and is checked like the precisions resfuse
ships, and is ranked in its accuracy class."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from resfuse import runtime
from resfuse.artifacts import read_manifest
from resfuse.errors import ConfigError, ParityError
from resfuse.export.pipeline import ExportOptions, Source, export_artifact
from resfuse.export.sensitivity import Conversion
from resfuse.models import ModelConfig
from resfuse.precisions import PRECISIONS, Precision, accuracy_class, dtypes, precision
from resfuse.runtime.check import check_artifact

BFLOAT16 = Precision(
    dtype="bfloat16",
    option="bf16",
    target=None,
    suffix="-bf16",
    targets=("cpu",),
    max_rel_l2=0.05,
    accuracy_class="16-bit float",
    calibrated=False,
    symmetric=False,
    converter=f"{__name__}:bfloat16_graph",
    hint="keep the float32 artifact",
)


def bfloat16_graph(source: Source) -> Conversion:
    """Weights rounded to bfloat16 and stored as float32: any runtime reads the graph."""
    source.progress("rounding the weights to bfloat16")
    graph = onnx.ModelProto()
    graph.CopyFrom(source.graph)
    for init in graph.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            values = torch.from_numpy(numpy_helper.to_array(init).copy())
            rounded = values.to(torch.bfloat16).to(torch.float32).numpy()
            init.CopyFrom(numpy_helper.from_array(rounded, init.name))
    return Conversion.fixed(graph)


@pytest.fixture
def bf16() -> Iterator[None]:
    """The registry line, taken out again after the test."""
    PRECISIONS.append(BFLOAT16)
    try:
        yield
    finally:
        PRECISIONS.remove(BFLOAT16)


OPTIONS = ExportOptions(max_size=64, max_batch=1, precision="bfloat16")


def test_it_exports_runs_and_is_checked(bf16: None, tmp_path: Path) -> None:
    result = export_artifact(ModelConfig("masked", stage=2), tmp_path, OPTIONS)
    manifest = read_manifest(result.manifest_path)  # the schema takes its dtype
    assert result.name == "masked-resnet18-bf16"
    assert (manifest.precision, manifest.targets) == ("bfloat16", ["cpu"])
    assert manifest.data["source"]["name"] == "masked-resnet18"
    assert manifest.tolerance.max_rel_l2 == 0.05
    assert 0 < result.worst.stats.rel_l2 <= 0.05  # rounded, so not exact, yet within its bound
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
    with runtime.load(result.manifest_path, "onnxruntime") as session:
        assert session.run(x).shape == (1, 3 + 64, 64, 64)
    report = check_artifact(result.manifest_path, "onnxruntime", shapes=[(1, 3, 64, 64)])
    assert report.passed and report.precision == "bfloat16"
    with pytest.raises(ConfigError, match="made for cpu, not 'cuda'"):
        runtime.load(result.manifest_path, "onnxruntime", "cuda")
    assert accuracy_class("bfloat16") == "16-bit float"


def test_its_bound_and_hint_judge_the_export(bf16: None, tmp_path: Path) -> None:
    strict = ExportOptions(max_size=64, max_batch=1, precision="bfloat16", max_rel_l2=1e-9)
    with pytest.raises(ParityError, match=r"rel L2 <= 1e-09\).*; keep the float32 artifact"):
        export_artifact(ModelConfig("masked", stage=2), tmp_path, strict)
    assert list(tmp_path.iterdir()) == []


def test_it_is_gone_once_removed() -> None:
    assert "bfloat16" not in dtypes()
    with pytest.raises(ConfigError, match="precision 'bfloat16' is not one of float32"):
        precision("bfloat16")
    with pytest.raises(ConfigError, match="precision 'bfloat16' is not one of"):
        OPTIONS.contract(ModelConfig("masked"))
