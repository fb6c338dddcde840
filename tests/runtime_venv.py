"""A venv holding resfuse's base install and nothing else: no torch, no extras. Made from this
checkout's files with pip, which takes the base requirements from pyproject.toml (from pip's
cache or the index), so a dependency the runtime imports but the base install lacks shows up as
an ImportError there. Shared by tests/test_torch_free.py and benchmarks/runtime_install.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
# What setuptools needs to build the package (pyproject's package-dir and readme), nothing else
SOURCES = ("pyproject.toml", "README.md", "resfuse", "export", "runtime")


def make_runtime_venv(folder: Path, extras: str = "") -> Path:
    """Create a venv in `folder` with this checkout installed (`extras`: e.g. "[serve]") and
    return its bin folder. The sources are copied first, so the build leaves nothing behind in
    the checkout."""
    source = folder / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    proc = subprocess.run([*pip, f"{source}{extras}"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"pip could not install the base install: {proc.stderr[-3000:]}")
    shutil.rmtree(source)
    return venv / "bin"
