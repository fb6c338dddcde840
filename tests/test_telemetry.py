"""ONNX Runtime 1.29+ uploads usage events from Linux too and keeps a device id and an event
cache under ~/.cache/Microsoft; resfuse turns that off before ONNX Runtime starts, unless the
environment says ORT_DISABLE_TELEMETRY=0 (docs/install.md, SECURITY.md)."""

from __future__ import annotations

import os
import shutil
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
# ONNX Runtime collects nothing where these say it runs in CI or its own tests (strings in its
# library): removed, so that the run is a user's and the check below can fail
CI_MARKERS = (
    "CI",
    "APPVEYOR",
    "AZURE",
    "BITBUCKET_BUILD_NUMBER",
    "BUILDKITE",
    "CIRCLECI",
    "CODEBUILD_BUILD_ID",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "JENKINS_URL",
    "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI",
    "TEAMCITY_VERSION",
    "TF_BUILD",
    "TRAVIS",
    "ORT_RUNNING_UNIT_TESTS",
)


def _offline() -> list[str]:
    """A network namespace of its own (root: CI's .ci/run), so the control run with telemetry on
    cannot upload anything; elsewhere the plain command."""
    if shutil.which("unshare") and os.geteuid() == 0:
        if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
            return ["unshare", "-n"]
    return []


def _run_in(home: Path, artifact: Path, **env: str) -> Path:
    """A session run with `home` as HOME and XDG cache; where ONNX Runtime keeps its cache."""
    drop = {"ORT_DISABLE_TELEMETRY", *CI_MARKERS}
    clean = {k: v for k, v in os.environ.items() if k not in drop}
    clean.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), **env)
    command = [*_offline(), sys.executable, "-c", RUN.format(path=str(artifact))]
    proc = subprocess.run(command, env=clean, capture_output=True, text=True)
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
