from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import invoke
from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase
from PIL import Image

from resfuse.export.cli import main as export_main
from resfuse.export.pipeline import ExportOptions, ExportResult, export_artifact
from resfuse.export.quantize import Calibration
from resfuse.models import METHODS, ModelConfig

# Property tests draw new examples on every run (Hypothesis' built-in "ci" profile would fix
# them); a failure prints the @reproduce_failure line. Hypothesis' files (its constants cache,
# the local example database) go to a temp folder, never into the working directory. Locally
# the database replays a failure on the next run; CI machines start fresh, so CI keeps none.
_STORAGE = os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir(), "resfuse-hypothesis"))
)
_EXPLORE = settings(max_examples=8, deadline=None, derandomize=False, print_blob=True)
_LOCAL_DB = DirectoryBasedExampleDatabase(Path(_STORAGE, "examples"))
settings.register_profile("resfuse", _EXPLORE, database=_LOCAL_DB)
settings.register_profile("ci", _EXPLORE, database=None)
settings.load_profile("ci" if os.environ.get("CI") else "resfuse")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportResult]:
    """The three methods on resnet18 stage 4, exported once for the whole run (real files)."""
    out = tmp_path_factory.mktemp("artifacts")
    return {m: export_artifact(ModelConfig(m), out, ExportOptions(max_size=1024)) for m in METHODS}


@pytest.fixture(scope="session")
def head_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A masked resnet18 with a 3-class head, so masks have classes to give; exported once for
    the whole run (serve, predict)."""
    folder = tmp_path_factory.mktemp("head-artifact")
    config = ModelConfig("masked", num_classes=3)
    return export_artifact(config, folder, ExportOptions(max_size=256, max_batch=4)).manifest_path


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def fp16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp16 artifacts, masked through the CLI and spp through the library, with the options of
    `exported`, so that their float32 sources are those artifacts; exported once for the run."""
    out = tmp_path_factory.mktemp("fp16")
    proc = invoke(
        export_main,
        "--method",
        "masked",
        "--precision",
        "fp16",
        "--max-size",
        "1024",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    spp = export_artifact(
        ModelConfig("spp"), out, ExportOptions(max_size=1024, precision="float16")
    )
    return {"masked": out / "masked-resnet18-fp16.json", "spp": spp.manifest_path}


@pytest.fixture(scope="session")
def int8_trt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """masked's TensorRT INT8 artifact, through the CLI with the --int8 alias, calibrated small to
    keep the export short; exported once for the run."""
    out = tmp_path_factory.mktemp("int8-trt")
    args = ["--method", "masked", "--int8", "--target", "tensorrt", "--calib-random"]
    args += ["--calib-count", "4", "--calib-size", "128", "--max-size", "512", "-o", str(out)]
    proc = invoke(export_main, *args)
    assert proc.returncode == 0, proc.stderr
    assert "masked-resnet18-int8-trt (int8)" in proc.stdout and "rel L2 <= 0.1" in proc.stdout
    return out / "masked-resnet18-int8-trt.json"


def _photos(folder: Path, count: int = 3) -> Path:
    """Smooth images with texture, as photographs are (not white noise)."""
    folder.mkdir()
    y, x = np.mgrid[0:96, 0:96] / 96.0
    rng = np.random.default_rng(0)
    for i in range(count):
        base = np.stack([np.sin(3 * x + i), np.cos(2 * y - i), x * y], axis=-1)
        pixels = (base - base.min()) / np.ptp(base) * 200 + rng.integers(0, 40, base.shape)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="session")
def int8_on_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A head model's INT8 artifact calibrated (and so swept) on a folder of images, and that
    folder; exported once for the run (check verdicts, the edge check)."""
    root = tmp_path_factory.mktemp("verdicts")
    photos = _photos(root / "photos")
    options = ExportOptions(
        max_size=128,
        precision="int8",
        calibration=Calibration(images=photos, count=3, size=96),
        max_rel_l2=0.5,
    )
    config = ModelConfig("masked", num_classes=3)
    return export_artifact(config, root / "a", options).manifest_path, photos
