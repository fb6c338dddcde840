from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from resfuse.export.pipeline import ExportOptions, ExportResult, export_artifact
from resfuse.models import METHODS, ModelConfig

settings.register_profile("resfuse", max_examples=12, deadline=None, derandomize=True)
settings.load_profile("resfuse")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportResult]:
    """The three methods on resnet18 stage 4, exported once for the whole run (real files)."""
    out = tmp_path_factory.mktemp("artifacts")
    return {m: export_artifact(ModelConfig(m), out, ExportOptions(max_size=1024)) for m in METHODS}


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path
