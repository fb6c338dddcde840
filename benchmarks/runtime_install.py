"""What the base install (no torch) saves an edge box: import time, memory after the first call and
installed size, against the full install (issue 29).

    python benchmarks/runtime_install.py           # builds the base-install venv, measures
    python benchmarks/runtime_install.py --reuse   # reuse the venv and artifact of a last run

The base install is a venv of its own (tests/runtime_venv.py: `pip install .`, nothing else) under
benchmarks/artifacts/; the full install is the environment running this script (make's set-up:
torch and every extra). Each row is measured in fresh interpreters, --repeats times (the median
is reported): the import of resfuse.runtime, then resfuse.runtime.load() of a masked-resnet18
artifact and its first Session.run at 1x3x512x512 on ONNX Runtime; memory is the process's
resident set (VmRSS) after the import and after that call, and its peak (VmHWM). A third row
imports torch before resfuse.runtime: what every runtime user paid before the split. Installed
size: the files (pip's RECORD sizes) of the distributions each install's requirements pull in,
walked through the installed metadata: the base requirements in the venv, base + the `export`
extra here (this environment's torch build; a CUDA torch brings its nvidia-* wheels), and du of
each site-packages folder (the full one holds every dev extra too).

Writes benchmarks/results/runtime_install.json (every sample, the machine, CPU flags included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomllib

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from runtime_venv import make_runtime_venv  # noqa: E402

from resfuse.artifacts import write_json  # noqa: E402
from resfuse.runtime.machine import machine_info  # noqa: E402
from resfuse.runtime.report import markdown_table  # noqa: E402

WORK = HERE / "artifacts" / "runtime-install"
RESULT = HERE / "results" / "runtime_install.json"

# One sample, in a fresh interpreter: argv = artifact, "torch" to import torch first.
_SAMPLE = """
import json, sys, time
def rss():
    status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
    return {k: int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
t0 = time.perf_counter()
if sys.argv[2] == "torch":
    import torch
import resfuse.runtime
t1 = time.perf_counter()
imported = rss()
import numpy as np
x = np.random.default_rng(0).standard_normal((1, 3, 512, 512), dtype=np.float32)
with resfuse.runtime.load(sys.argv[1], threads=2) as session:
    t2 = time.perf_counter()
    session.run(x)
    t3 = time.perf_counter()
    ran = rss()
print(json.dumps({"import_s": t1 - t0, "rss_import_mb": imported["VmRSS"],
    "load_s": t2 - t1, "first_run_ms": (t3 - t2) * 1e3, "rss_run_mb": ran["VmRSS"],
    "peak_mb": ran["VmHWM"], "torch_loaded": "torch" in sys.modules}))
"""

# Installed size of a requirement list's closure, by the installed metadata: argv = JSON list.
_SIZE = """
import json, sys
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
todo, seen, dists = [(Requirement(r), "") for r in json.loads(sys.argv[1])], set(), {}
while todo:
    req, _ = todo.pop()
    key = (canonicalize_name(req.name), frozenset(req.extras))
    if key in seen:
        continue
    seen.add(key)
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        continue
    dists[key[0]] = sum(f.size or 0 for f in dist.files or [])
    for text in dist.requires or []:
        sub = Requirement(text)
        extras = req.extras or {""}
        if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
            todo.append((sub, ""))
print(json.dumps(dists))
"""


def python_of(install: str, venv_bin: Path) -> str:
    return str(venv_bin / "python") if install == "base" else sys.executable


def sample(python: str, artifact: Path, torch_first: bool) -> dict[str, Any]:
    args = [python, "-c", _SAMPLE, str(artifact), "torch" if torch_first else "-"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=WORK)
    if proc.returncode != 0:
        raise SystemExit(f"a sample failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def requirements(extras: tuple[str, ...]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = list(project["dependencies"])
    for extra in extras:
        found += [r for r in project["optional-dependencies"][extra] if "resfuse" not in r]
    return found


def closure_mb(python: str, reqs: list[str]) -> tuple[float, dict[str, float]]:
    proc = subprocess.run(
        [python, "-c", _SIZE, json.dumps(reqs)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise SystemExit(f"cannot size the requirements: {proc.stderr[-2000:]}")
    dists = {name: size / 2**20 for name, size in json.loads(proc.stdout).items()}
    return sum(dists.values()), dists


def du_mb(python: str) -> float:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    folder = Path(
        subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()
    )
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def artifact(reuse: bool) -> Path:
    """A masked-resnet18 float32 artifact, made by the full install."""
    from resfuse.export.pipeline import ExportOptions, export_artifact
    from resfuse.models import ModelConfig

    manifest = WORK / "masked-resnet18.json"
    if not (reuse and manifest.is_file()):
        export_artifact(ModelConfig("masked"), WORK, ExportOptions(max_size=1024))
    return manifest


def base_venv(reuse: bool) -> Path:
    venv_bin = WORK / "venv" / "venv" / "bin"
    if not (reuse and (venv_bin / "python").is_file()):
        import shutil

        shutil.rmtree(WORK / "venv", ignore_errors=True)
        venv_bin = make_runtime_venv(WORK / "venv")
    return venv_bin


ROWS = {  # name: (install, torch imported first, requirement extras)
    "base install (no torch)": ("base", False, ()),
    "full install": ("full", False, ("export",)),
    "full install, torch imported (before issue 29)": ("full", True, ("export",)),
}
COLUMNS = ("import_s", "rss_import_mb", "first_run_ms", "rss_run_mb", "peak_mb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    manifest, venv_bin = artifact(args.reuse), base_venv(args.reuse)
    rows: dict[str, dict[str, Any]] = {}
    for name, (install, torch_first, extras) in ROWS.items():
        python = python_of(install, venv_bin)
        samples = [sample(python, manifest, torch_first) for _ in range(args.repeats)]
        installed, dists = closure_mb(python, requirements(extras))
        rows[name] = {
            **{key: statistics.median(s[key] for s in samples) for key in COLUMNS},
            "torch_loaded": samples[0]["torch_loaded"],
            "installed_mb": installed,
            "site_packages_mb": du_mb(python),
            "distributions_mb": dists,
            "samples": samples,
        }
    table = [
        [
            name,
            f"{r['import_s']:.2f}",
            f"{r['rss_import_mb']:.0f}",
            f"{r['first_run_ms']:.0f}",
            f"{r['rss_run_mb']:.0f}",
            f"{r['peak_mb']:.0f}",
            f"{r['installed_mb']:.0f}",
            f"{r['site_packages_mb']:.0f}",
        ]
        for name, r in rows.items()
    ]
    header = [
        "install",
        "import s",
        "RSS after import MB",
        "first run ms",
        "RSS after first run MB",
        "peak RSS MB",
        "installed MB",
        "site-packages MB",
    ]
    print(markdown_table(header, table))
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    # the machine is shared: the load beside the run says how quiet it was
    load = dict(zip(("1min", "5min", "15min"), os.getloadavg(), strict=True))
    result = {"machine": machine_info(), "load": load, "shape": [1, 3, 512, 512], "rows": rows}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    write_json(RESULT, result)
    print(f"wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
