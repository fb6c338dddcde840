"""Issue 18: a broken INT8 artifact must still fail resfuse-check.

A real INT8 export (upsample-resnet18, calibrated and swept on real photographs), copied with one
activation scale early in the network (the first convolution's output) changed 100x, the ONNX
re-written with the onnx library and the manifest's sha256 fixed so that the artifact loads, then
judged by resfuse-check as the export did (no options: on its calibration images, by the bound
the manifest records).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from PIL import Image

from resfuse import runtime
from resfuse.artifacts import sha256_of
from resfuse.compare import compare
from resfuse.export.pipeline import ExportOptions, export_artifact
from resfuse.export.quantize import Calibration
from resfuse.images import image_files
from resfuse.models import ModelConfig
from resfuse.runtime.cli import check_main

pytestmark = pytest.mark.slow  # an INT8 export on photographs

PHOTOS = ("astronaut", "coffee", "chelsea")  # scikit-image's photographs
BOUND = "rel L2 <= 0.1"  # the INT8 bound the export met and the manifest records


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest INT8 export that judges like a user's: three photographs at 96x96."""
    import skimage.data

    root = tmp_path_factory.mktemp("must-fail")
    photos = root / "photos"
    photos.mkdir()
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).resize((96, 96))
        image.save(photos / f"{name}.png")
    options = ExportOptions(
        max_size=128, precision="int8", calibration=Calibration(photos, count=3, size=96)
    )
    return export_artifact(ModelConfig("upsample"), root / "artifact", options).manifest_path


def early_activation_scale(model: onnx.ModelProto) -> str:
    """The scale of the first QuantizeLinear on an activation (not the graph input, not a
    weight): the first convolution's output, which every later layer reads."""
    constants = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            return node.input[1]
    raise AssertionError("the INT8 graph has no QuantizeLinear on an activation")


def copy_with_scale(manifest_path: Path, folder: Path, factor: float) -> tuple[Path, str]:
    """The artifact copied into `folder`, its early activation scale times `factor` (shared by
    that QuantizeLinear and its DequantizeLinear), the manifest's ONNX sha256 and size fixed."""
    shutil.copytree(manifest_path.parent, folder)
    manifest = json.loads(manifest_path.read_text())
    onnx_path = folder / manifest["files"]["onnx"]["path"]
    model = onnx.load(onnx_path)
    name = early_activation_scale(model)
    scale = next(i for i in model.graph.initializer if i.name == name)
    scaled = numpy_helper.to_array(scale) * np.float32(factor)
    scale.CopyFrom(numpy_helper.from_array(scaled, name))
    onnx.save(model, onnx_path)
    manifest["files"]["onnx"].update(sha256=sha256_of(onnx_path), bytes=onnx_path.stat().st_size)
    copied = folder / manifest_path.name
    copied.write_text(json.dumps(manifest))
    return copied, name


def check(manifest_path: Path) -> tuple[int, str, str]:
    """resfuse-check with no options, judged as the export did: exit code, stdout (its lines
    joined: the console wraps the header at a long path) and stderr."""
    result = CliRunner().invoke(check_main, [str(manifest_path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, " ".join(result.stdout.split()), result.stderr


def feature_errors(manifest_path: Path) -> list[float]:
    """Relative L2 of the fused output's feature channels (the image channels pass through in
    float32) against PyTorch, on each calibration photograph."""
    folder = Path(json.loads(manifest_path.read_text())["parity"]["inputs"]["folder"])
    with runtime.load(manifest_path) as deployed, runtime.load(manifest_path, "torch") as eager:
        c = deployed.contract.channels
        errors = []
        for file in image_files(folder):
            x = deployed.preprocess(file)
            ref, out = eager.run(x), deployed.run(x)
            errors.append(compare(ref[:, c:], out[:, c:], deployed.manifest.tolerance).rel_l2)
    return errors


def test_the_unbroken_copy_passes(int8_artifact: Path, tmp_path: Path) -> None:
    """The copy, re-written by the onnx library with its sha256 fixed, loads and passes: what
    fails below is the changed scale, not the copying."""
    copied, name = copy_with_scale(int8_artifact, tmp_path / "same", 1.0)
    assert name.endswith("_scale")
    code, stdout, stderr = check(copied)
    assert code == 0, stderr
    assert BOUND in stdout and "all 3 inputs pass" in stdout
    assert all(photo in stdout for photo in PHOTOS)  # judged on the photographs, not noise


def test_the_changed_scale_really_breaks_the_model(int8_artifact: Path, tmp_path: Path) -> None:
    """The premise of the must-fail test: 100x on that scale takes the features the model
    computes well outside the bound (while the unbroken graph's stay within it)."""
    broken, _ = copy_with_scale(int8_artifact, tmp_path / "broken", 100.0)
    assert max(feature_errors(int8_artifact)) < 0.1
    assert min(feature_errors(broken)) > 0.15


def test_a_broken_int8_artifact_fails_the_check(int8_artifact: Path, tmp_path: Path) -> None:
    broken, name = copy_with_scale(int8_artifact, tmp_path / "broken", 100.0)
    code, stdout, stderr = check(broken)
    assert code == 1, f"{name} x100 passed the check:\n{stdout}"
    assert BOUND in stdout and "FAIL" in stdout
    assert "3 of 3 inputs failed the check" in stderr
