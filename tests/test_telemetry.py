"""ONNX Runtime 1.29+ uploads usage events from Linux too and keeps a device id and an event
cache under ~/.cache/Microsoft; resfuse turns that off before ONNX Runtime starts, unless the
environment says ORT_DISABLE_TELEMETRY=0 (docs/install.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = (
    "import numpy as np\n"
    "from resfuse import runtime\n"
    "with runtime.load({path!r}) as session:\n"
    "    session.run(np.zeros((1, 3, 32, 32), np.float32))\n"
)


def _run_in(home: Path, artifact: Path, **env: str) -> Path:
    """A session run with `home` as HOME and XDG cache; where ONNX Runtime keeps its cache."""
    clean = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    clean.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), **env)
    script = RUN.format(path=str(artifact))
    proc = subprocess.run([sys.executable, "-c", script], env=clean, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return home / ".cache" / "Microsoft"


@pytest.mark.parametrize(("env", "kept"), [({}, False), ({"ORT_DISABLE_TELEMETRY": "0"}, True)])
def test_onnxruntime_keeps_no_telemetry_unless_asked(
    exported, tmp_path: Path, env: dict[str, str], kept: bool
) -> None:
    """Nothing under ~/.cache/Microsoft (device id, event cache) after a session ran; with
    telemetry turned back on, ONNX Runtime makes it: the check can see it."""
    cache = _run_in(tmp_path, exported["masked"].manifest_path, **env)
    assert cache.exists() == kept
