"""Each artifact on an emulated aarch64 CPU against x86, through resfuse's own runtime.

    python benchmarks/edge_check.py artifacts/masked-resnet18.json more.json ...
    make edge-check ARTIFACTS="a.json b.json"      # the demo's float32, fp16 and INT8 by default
    python benchmarks/edge_check.py a.json --backends onnxruntime,openvino

Builds (once, cached in .edge/, git-ignored) an aarch64 Debian 12 root from Debian's arm64
packages (glibc, Python 3.11) and a folder of aarch64 wheels of the base install's dependencies
(and the [openvino] extra's with --backends openvino), each pinned to the version this venv
runs, so the two sides differ in the CPU only. Installs this checkout into it (`pip install
--no-deps --target`, the runtime install: no torch), runs every artifact on every backend at a
few shapes on deterministic inputs with `resfuse.runtime.load(...).run(...)` under qemu-user
and the same in this venv, and judges the aarch64 output against the x86 one by the
artifact's own gates, as resfuse-check judges it against PyTorch: the manifest's tolerance
(elementwise, or relative L2 for fp16 and INT8) and, for a model with a head, argmax agreement and
every class's Dice (ARM's int8 kernels round differently from x86's, so an INT8 mask is judged by
what a user sees). Then resfuse-predict, the command an edge box runs, reads a PNG and a NIfTI
volume on both sides (pillow's and nibabel's aarch64 code too) and its files are judged the same
way. Prints a table, writes --json, exits 1 on any miss.

Versions, and why: ONNX Runtime is the one this venv runs (1.32.0 when written), so the two sides
differ in the CPU, not the version; qemu is the system's (Debian 12: qemu-user-static 7.2), with
--cpu cortex-a76 (a Raspberry Pi 5's core: FP16 arithmetic, on which the runtime widens
float16 graphs to float32 unless --fp16-arithmetic native, and int8 dot products) or
cortex-a72 (a Pi 4's: neither). ONNX Runtime 1.28
and later segfault while their module loads under qemu 7.2, at every -cpu model (1.19.2 to 1.27.0
load): qemu 7.2's user mode hands the guest the host's x86 /proc/cpuinfo, in which the cpuinfo
library that ONNX Runtime uses to detect ARM cores finds no ARM processor, and a NULL it then
reads kills the import. qemu 10.0 (Debian 13) writes an aarch64 /proc/cpuinfo of its own and 1.32
imports there unchanged; under qemu 7.2 the root carries one, the --cpu core's as Linux writes
it, which qemu's -L prefix serves in place of the host's (a file claiming features the core
lacks gets kernels it cannot run: SIGILL).

--alter-arm REL adds noise of relative L2 REL to every aarch64 output of the runtime runs before
the comparison: how a test proves the comparison can fail (resfuse-predict's files are judged by
the same code, tested on files made to differ).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEBIAN = "bookworm"  # Debian 12: Python 3.11, glibc 2.36
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# What Python 3.11 and ONNX Runtime's shared libraries load, unpacked with `dpkg -x`
PACKAGES = (
    "libc6 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib zlib1g libexpat1 "
    "libssl3 libffi8 libstdc++6 libgcc-s1 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 "
    "libtinfo6 libuuid1 libcrypt1 libtirpc3 libnsl2"
).split()
# glibc 2.36 runs every manylinux wheel up to 2_36; pip takes only the tags named
PLATFORMS = [f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)]
# The cores -cpu may name, with the /proc/cpuinfo Linux writes on them (see the docstring for why
# the root carries one): a Raspberry Pi 5's Cortex-A76 has FP16 arithmetic (ONNX Runtime's
# float16 kernels run in it) and int8 dot products, a Pi 4's Cortex-A72 has neither.
CPUS = {
    "cortex-a76": (
        "0x4",
        "0xd0b",
        "1",
        "aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
    ),
    "cortex-a72": ("0x0", "0xd08", "3", "crc32 cpuid"),
}
# The CPU backends an edge box runs, with the pyproject extra each needs beyond the base install
BACKENDS = {"onnxruntime": None, "openvino": "openvino"}
ARM_TIMEOUT = 3600  # seconds for every aarch64 run together: a call took ~40x x86's here


# The worker: runs in this venv and in the aarch64 root alike (stdlib, numpy and resfuse.runtime)


def worker(request_path: str) -> None:
    """Run each job of the request through resfuse.runtime, save the outputs, print versions."""
    from importlib.metadata import version

    from resfuse import runtime  # before onnxruntime: it turns ONNX Runtime's telemetry off

    request = json.loads(Path(request_path).read_text())
    timings, arithmetic = [], {}
    for job in request["jobs"]:
        backend = _backend(job["backend"], request["fp16_arithmetic"])
        with runtime.load(job["artifact"], backend) as session:
            said = session.runner.describe().get("fp16_arithmetic")
            if said:  # a float16 graph: what this CPU computed it in
                arithmetic[session.manifest.path.stem] = said
            for case in job["cases"]:
                start = time.perf_counter()
                out = np.asarray(session.run(np.load(case["input"])))
                timings.append(time.perf_counter() - start)
                np.save(case["output"], _altered(out, request.get("alter", 0.0)))
        if "predict" in job:
            _predict(job["artifact"], job["predict"], backend)
    versions = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": version("onnxruntime"),  # installed, whether a job loaded it or not
        "openvino": _openvino_version(),
        "seconds_per_call": round(float(np.median(timings)), 3) if timings else None,
        "fp16_arithmetic": arithmetic,
    }
    print(json.dumps(versions))


def _openvino_version() -> str | None:
    """OpenVINO's version where a job loaded it, else None."""
    openvino = sys.modules.get("openvino")
    return None if openvino is None else str(openvino.__version__).split("-")[0]


def _backend(name: str, fp16_arithmetic: str) -> str:
    """The backend spec the runtime takes: ONNX Runtime with the fp16 arithmetic asked for."""
    return f"{name}:fp16_arithmetic={fp16_arithmetic}" if name == "onnxruntime" else name


def _predict(artifact: str, folders: dict[str, str], backend: str) -> None:
    """resfuse-predict, the command an edge box runs, on the job's image and volume."""
    from resfuse.runtime.serve_cli import predict_main

    args = [artifact, folders["input"], "--output", folders["output"], "--backend", backend]
    try:
        predict_main.main(args, standalone_mode=False)
    except SystemExit as exc:  # resfuse-predict's failures exit 1, each input named above
        if exc.code:
            raise


def _altered(out: np.ndarray, rel: float) -> np.ndarray:
    """`out` plus fixed noise of relative L2 `rel` (0: unchanged)."""
    if not rel:
        return out
    noise = np.random.default_rng(29).standard_normal(out.shape).astype(out.dtype)
    scale = rel * np.linalg.norm(out) / max(float(np.linalg.norm(noise)), 1e-30)
    return out + (scale * noise).astype(out.dtype)


# The aarch64 side: root, wheels, the project


def _run(command: list[str], what: str, fix: str, **kwargs: Any) -> str:
    """Run `command`; a ConfigError naming `what` failed, its last line of output and `fix`."""
    from resfuse.errors import ConfigError

    proc = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise ConfigError(f"{what} failed ({last}); {fix}")
    return proc.stdout


def _apt(cache: Path) -> list[str]:
    """apt-get on a private state of its own in `cache`: Debian's arm64 archive, with no
    `dpkg --add-architecture` and nothing changed in the system's apt."""
    from resfuse.errors import ConfigError

    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise ConfigError(
            "apt-get and dpkg are needed to fetch Debian's arm64 packages; run the "
            "edge check on Debian or Ubuntu"
        )
    if not KEYRING.is_file():
        raise ConfigError(f"{KEYRING} is missing; apt-get install debian-archive-keyring")
    state = cache / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    sources = state / "sources.list"
    mirror = f"deb [signed-by={KEYRING}] http://deb.debian.org/debian"
    sources.write_text(
        f"{mirror} {DEBIAN} main\n{mirror} {DEBIAN}-updates main\n"
        f"{mirror}-security {DEBIAN}-security main\n"
    )
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    options = {
        "Dir::Etc::SourceList": sources,
        "Dir::Etc::SourceParts": state / "none",
        "Dir::State::Lists": state / "lists",
        "Dir::Cache": state / "cache",
        "APT::Architecture": "arm64",
        "APT::Architectures::": "arm64",
        "Debug::NoLocking": "1",
        "APT::Sandbox::User": user,
    }
    return ["apt-get", "-qq", *(f"-o{k}={v}" for k, v in options.items())]


def _update(apt: list[str], lists: Path, fix: str) -> None:
    """apt-get update, which exits 0 when it fetched nothing: judged by the lists it left."""
    from resfuse.errors import ConfigError

    proc = subprocess.run([*apt, "update"], capture_output=True, text=True)
    if proc.returncode != 0 or not any(lists.glob(f"*_{DEBIAN}_main_binary-arm64_Packages*")):
        said = [line for line in proc.stderr.splitlines() if line.startswith(("E:", "W:"))]
        reason = " ".join(said[0].split()) if said else f"exit status {proc.returncode}"
        raise ConfigError(f"cannot fetch Debian's arm64 package lists ({reason}); {fix}")


def ensure_root(cache: Path) -> Path:
    """The aarch64 root (Debian's packages unpacked), built once; a half-built one is never used."""
    root = cache / f"debian-{DEBIAN}-arm64"
    if (root / "usr/bin/python3.11").exists():
        return root
    apt = _apt(cache)
    offline = "check that deb.debian.org can be reached (network, proxy)"
    _update(apt, cache / "apt/lists", offline)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        debs, unpacked = Path(tmp, "debs"), Path(tmp, "root")
        debs.mkdir()
        _run([*apt, "download", *PACKAGES], "apt-get download of arm64 packages", offline, cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(unpacked)], f"dpkg -x {deb.name}", "remove .edge/")
        unpacked.rename(root)
    return root


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One run at a time builds in `cache`: two apt-gets on one private state break each other."""
    with open(cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def cpu_root(root: Path, cpu: str) -> Path:
    """The root as seen by `cpu`: hard links to its files, and that core's /proc/cpuinfo."""
    view = root.with_name(f"{root.name}-{cpu}")
    if not view.is_dir():
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            linked = Path(tmp, "root")
            shutil.copytree(root, linked, symlinks=True, copy_function=os.link)
            (linked / "proc").mkdir()
            (linked / "proc/cpuinfo").write_text("".join(_cpuinfo(cpu, n) for n in range(4)))
            linked.rename(view)
    return view


def _cpuinfo(cpu: str, n: int) -> str:
    variant, part, revision, features = CPUS[cpu]
    return (
        f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm {features}\n"
        f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: {variant}\n"
        f"CPU part\t: {part}\nCPU revision\t: {revision}\n\n"
    )


def runtime_requirements(extras: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The base install's dependencies (pyproject.toml) and those of `extras`, each pinned to
    this venv's version."""
    from importlib.metadata import PackageNotFoundError, version

    import tomllib
    from packaging.requirements import Requirement

    from resfuse.errors import ConfigError

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"]]
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    pins = []
    for text in wanted:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            pins.append(f"{requirement.name}=={version(requirement.name)}")
        except PackageNotFoundError as exc:
            raise ConfigError(
                f"{requirement.name} is not installed here, so its version cannot be matched on "
                f"aarch64; run make (the venv's set-up) first"
            ) from exc
    heavy = [pin for pin in pins if pin.split("==")[0] in ("torch", "torchvision")]
    if heavy:  # an edge box runs the ONNX artifact and nothing of PyTorch (issue 29)
        raise ConfigError(
            f"pyproject.toml's base install requires {', '.join(heavy)}; the edge check runs the "
            f"runtime install, which must not: move them to the `export` extra"
        )
    return sorted(set(pins))


def ensure_wheels(cache: Path, pins: list[str]) -> Path:
    """aarch64 wheels of `pins` and what they need, installed into a folder keyed by the pins;
    the packages they pull in are held to this venv's versions too (a constraints file)."""
    key = hashlib.sha256(" ".join([*PLATFORMS, *pins]).encode()).hexdigest()[:12]
    site = cache / f"wheels-{key}"
    if site.is_dir():
        return site
    from importlib.metadata import distributions

    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        constraints = Path(tmp, "constraints.txt")
        constraints.write_text(
            "".join(f"{d.metadata['Name']}=={d.version}\n" for d in distributions())
        )
        target = Path(tmp, "site")
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target)]
        command += [arg for tag in PLATFORMS for arg in ("--platform", tag)]
        command += ["--only-binary=:all:", "--python-version", "3.11"]
        command += ["--implementation", "cp", "-c", str(constraints), *pins]
        fix = "check that PyPI can be reached and has aarch64 wheels of these versions"
        _run(command, f"pip install of aarch64 wheels of {' '.join(pins)}", fix)
        target.rename(site)
    return site


def install_project(folder: Path) -> Path:
    """This checkout as the runtime install, without its dependencies (they are in the wheels)."""
    target = folder / "project"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    command += ["--no-build-isolation", "--target", str(target), str(REPO)]
    _run(command, "pip install --no-deps of this checkout", "run make (the venv's set-up) first")
    return target


# Both sides


def run_x86(request: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", str(request)]
    fix = "run resfuse-check on these artifacts here first"
    return _versions(_run(command, "the x86 run", fix))


def run_arm(request: Path, qemu: str, cpu: str, root: Path, path: list[Path]) -> dict[str, Any]:
    """The worker under qemu-user, with only the root, the wheels and the project on its path."""
    env = {
        "PYTHONPATH": os.pathsep.join(str(p) for p in path),
        "PYTHONNOUSERSITE": "1",
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
    }
    python = str(root / "usr/bin/python3.11")
    command = [qemu, "-cpu", cpu, "-L", str(root), python, __file__, "--worker", str(request)]
    what = f"the aarch64 run under {Path(qemu).name} -cpu {cpu}"
    fix = "a SIGILL or SIGSEGV is the emulator's or the core's (docs/edge.md), else the runtime's"
    return _versions(_run(command, what, fix, env=env, timeout=ARM_TIMEOUT))


def _versions(stdout: str) -> dict[str, Any]:
    return dict(json.loads(stdout.strip().splitlines()[-1]))


def default_shapes(manifest: Any) -> list[tuple[int, int, int, int]]:
    """The first two shapes of the export's parity grid: the smallest input, and batch 2 at a
    size that is no multiple of the stride."""
    from resfuse.shapes import parity_shapes

    return parity_shapes(manifest.contract)[:2]


def plan(
    artifacts: list[Path], shapes: list[Any] | None, folder: Path, backends: list[str]
) -> list[dict[str, Any]]:
    """One job per artifact and backend: its inputs (seeded by the shape, so reruns match) saved
    as .npy, and resfuse-predict's files."""
    from resfuse.artifacts import read_manifest

    jobs = []
    for i, path in enumerate(artifacts):
        manifest = read_manifest(path)
        grid = shapes or default_shapes(manifest)
        inputs = []
        for j, shape in enumerate(grid):
            manifest.contract.check(shape, "float32")
            x = np.random.default_rng(list(shape)).standard_normal(shape, dtype=np.float32)
            np.save(folder / f"{i}-{j}-in.npy", x)
            inputs.append((j, shape))
        readable = manifest.contract.channels in (1, 3)  # what a PNG and a NIfTI volume hold
        if readable:
            _predict_inputs(folder / f"{i}-predict-in", grid[-1], manifest)
        for backend in backends:
            cases = [
                {
                    "shape": list(shape),
                    "input": str(folder / f"{i}-{j}-in.npy"),
                    "stem": str(folder / f"{i}-{j}-{backend}"),
                }
                for j, shape in inputs
            ]
            job: dict[str, Any] = {"artifact": str(path.resolve()), "backend": backend}
            job["cases"] = cases
            if readable:
                stem = folder / f"{i}-predict-{backend}"
                job["predict"] = {"stem": str(stem), "input": str(folder / f"{i}-predict-in")}
            jobs.append(job)
    return jobs


def _predict_inputs(folder: Path, shape: tuple[int, ...], manifest: Any) -> None:
    """A PNG of the artifact's channels and a 3-slice uint8 NIfTI volume at the largest shape's
    H x W: the files resfuse-predict reads on an edge box, with pillow's and nibabel's code."""
    import nibabel as nib
    from PIL import Image

    folder.mkdir()
    height, width = shape[-2:]
    rng = np.random.default_rng([height, width])
    pixels = rng.integers(0, 256, (height, width, manifest.contract.channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(
        folder / "image.png"
    )
    voxels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    nib.save(nib.Nifti1Image(voxels, np.eye(4)), folder / "volume.nii.gz")


def _request(
    folder: Path, side: str, jobs: list[dict[str, Any]], alter: float, fp16_arithmetic: str
) -> Path:
    sided = []
    for job in jobs:
        cases = [{**c, "output": f"{c['stem']}-{side}.npy"} for c in job["cases"]]
        sided.append({**job, "cases": cases})
        if "predict" in job:
            predict = job["predict"]
            sided[-1]["predict"] = {
                "input": predict["input"],
                "output": f"{predict['stem']}-{side}",
            }
    path = folder / f"{side}.json"
    request = {"jobs": sided, "alter": alter, "fp16_arithmetic": fp16_arithmetic}
    path.write_text(json.dumps(request))
    return path


# The judgement


def judge(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (artifact, backend, input, metric, value, tolerance, passed): aarch64 against x86,
    by each artifact's own tolerance and, with a head, its mask gates over every shape pooled
    (as the export's sweep pools them: a class of a few pixels at one small shape has a Dice of
    0 or 1); then resfuse-predict's files."""
    from resfuse.artifacts import read_manifest
    from resfuse.compare import mask_agreement
    from resfuse.shapes import format_shape

    rows = []
    for job in jobs:
        manifest = read_manifest(job["artifact"])
        masks = []
        for case in job["cases"]:
            x86, arm = np.load(f"{case['stem']}-x86.npy"), np.load(f"{case['stem']}-arm.npy")
            base = _base(manifest, job["backend"], format_shape(case["shape"]))
            rows.append(_output_row(base, manifest, x86, arm))
            if manifest.config.num_classes is not None:
                masks.append(mask_agreement(x86, arm, manifest.mask_gates))
        rows += _pooled_rows(manifest, job["backend"], "shapes", masks)
        if "predict" in job:
            rows += predict_rows(manifest, Path(job["predict"]["stem"]), job["backend"])
    return rows


def _base(manifest: Any, backend: str, what: str) -> dict[str, Any]:
    artifact = f"{manifest.path.stem} ({manifest.precision_label})"
    return {"artifact": artifact, "backend": backend, "input": what}


def _output_row(base: dict[str, Any], manifest: Any, x86: Any, arm: Any) -> dict[str, Any]:
    """Logits by the artifact's tolerance: elementwise (float32) or relative L2."""
    from resfuse.compare import compare_output

    tol = manifest.tolerance
    stats = compare_output(x86, arm, tol, manifest.config.image_channels)
    elementwise = tol.max_rel_l2 is None
    return {
        **base,
        "metric": "min atol" if elementwise else "rel L2",
        "value": stats.required_atol if elementwise else stats.rel_l2,
        "tolerance": tol.describe(),
        "passed": stats.passed,
        "nonfinite": stats.nonfinite,
    }


def predict_rows(manifest: Any, stem: Path, backend: str) -> list[dict[str, Any]]:
    """resfuse-predict's files under STEM-arm against those under STEM-x86: logits (.npy, a
    volume's .nii.gz) by the artifact's tolerance, masks (.mask.png, .mask.nii.gz) by its mask
    gates (pooled over the files), and a file x86 wrote that aarch64 did not, a failure."""
    from resfuse.compare import label_agreement
    from resfuse.errors import ConfigError

    x86_dir, arm_dir = stem.with_name(f"{stem.name}-x86"), stem.with_name(f"{stem.name}-arm")
    written = sorted(p for p in x86_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not written:  # resfuse-predict exits 1 when an input fails: nothing written is a bug
        raise ConfigError(f"resfuse-predict wrote nothing in {x86_dir}; run it there by hand")
    rows, masks = [], []
    for x86_file in written:
        relative = x86_file.relative_to(x86_dir)
        base = _base(manifest, backend, f"resfuse-predict: {relative}")
        arm_file = arm_dir / relative
        if not arm_file.is_file():
            rows.append({**base, "metric": "written", "value": 0.0, "tolerance": "written"})
            rows[-1].update(passed=False, nonfinite=0)
            continue
        x86, arm = _read_output(x86_file), _read_output(arm_file)
        if ".mask." in relative.name:
            masks.append(label_agreement(x86, arm, manifest.mask_gates))
        else:
            rows.append(_output_row(base, manifest, x86, arm))
    return rows + _pooled_rows(manifest, backend, "resfuse-predict masks", masks)


def _pooled_rows(manifest: Any, backend: str, what: str, masks: list[Any]) -> list[dict[str, Any]]:
    """The mask gates' rows over `masks` pooled (none without masks)."""
    from resfuse.compare import pooled

    if not masks:
        return []
    label = what[:-1] if len(masks) == 1 else what  # "1 shape", "2 shapes"
    base = _base(manifest, backend, f"{len(masks)} {label}, pooled")
    return _mask_rows(base, pooled(masks, manifest.mask_gates), manifest.mask_gates)


def _read_output(path: Path) -> np.ndarray:
    """A resfuse-predict output as an array: logits as NCHW (a volume's slices as N)."""
    if path.name.endswith(".npy"):
        return np.load(path)
    if path.name.endswith(".png"):
        from PIL import Image

        return np.asarray(Image.open(path))
    import nibabel as nib

    data = np.asarray(nib.load(path).dataobj)
    return data if ".mask." in path.name else data.transpose(2, 3, 0, 1)  # H W S C -> S C H W


def _mask_rows(base: dict[str, Any], mask: Any, gates: Any) -> list[dict[str, Any]]:
    """Argmax agreement and the lowest gated class Dice, each against its own gate."""
    dice = mask.gated_dice
    low = min(dice.values(), default=1.0)
    agree_ok = gates.min_agreement is None or mask.agreement >= gates.min_agreement
    dice_ok = gates.min_dice is None or low >= gates.min_dice
    agree_tol = f">= {gates.min_agreement:.2%}" if gates.min_agreement is not None else "reported"
    dice_tol = f">= {gates.min_dice:g}" if gates.min_dice is not None else "reported"
    return [
        {
            **base,
            "metric": "argmax agreement",
            "value": mask.agreement,
            "tolerance": agree_tol,
            "passed": agree_ok,
        },
        {
            **base,
            "metric": "min class Dice",
            "value": low,
            "tolerance": dice_tol,
            "passed": dice_ok,
        },
    ]


def table(rows: list[dict[str, Any]]) -> str:
    from resfuse.runtime.report import markdown_table

    headers = ["artifact", "backend", "input", "metric", "value", "tolerance", "verdict"]
    cells = [
        [
            r["artifact"],
            r["backend"],
            r["input"],
            r["metric"],
            _value(r),
            r["tolerance"],
            "pass" if r["passed"] else "FAIL",
        ]
        for r in rows
    ]
    return markdown_table(headers, cells)


def _value(row: dict[str, Any]) -> str:
    if row["metric"] == "written":
        return "missing"
    if row["metric"] == "argmax agreement":
        return f"{row['value']:.4%}"
    if row["metric"] == "min class Dice":
        return f"{row['value']:.4f}"
    return f"{row['value']:.2e}" + (f", {row['nonfinite']} NaN/Inf" if row["nonfinite"] else "")


# The command


def find_qemu(name: str) -> str:
    from resfuse.errors import ConfigError

    found = shutil.which(name)
    if found is None:
        raise ConfigError(
            f"{name} is not installed: apt-get install qemu-user-static (Debian, Ubuntu), or "
            f"give --qemu PATH of a qemu-aarch64 user-mode emulator"
        )
    return found


def check_artifacts(paths: list[str]) -> list[Path]:
    from resfuse.errors import ConfigError

    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError(
            f"no artifact manifest at {', '.join(missing)}; `make demo` makes the default ones "
            f'(and `make edge-check` their fp16 variant), or give ARTIFACTS="a.json b.json"'
        )
    return [Path(p) for p in paths]


def edge_check(args: argparse.Namespace) -> dict[str, Any]:
    from resfuse.shapes import parse_shapes

    artifacts = check_artifacts(args.artifacts)
    shapes = parse_shapes(args.shapes) if args.shapes else None
    qemu = find_qemu(args.qemu)
    args.cache.mkdir(parents=True, exist_ok=True)
    with _locked(args.cache):
        root = cpu_root(ensure_root(args.cache), args.cpu)
        extras = [BACKENDS[b] for b in args.backends if BACKENDS[b]]
        wheels = ensure_wheels(args.cache, runtime_requirements(extras))
    with tempfile.TemporaryDirectory(prefix="resfuse-edge-") as tmp:
        folder = Path(tmp)
        project = install_project(folder)
        jobs = plan(artifacts, shapes, folder, args.backends)
        x86 = run_x86(_request(folder, "x86", jobs, 0.0, args.fp16_arithmetic))
        request = _request(folder, "arm", jobs, args.alter_arm, args.fp16_arithmetic)
        arm = run_arm(request, qemu, args.cpu, root, [project, wheels])
        rows = judge(jobs)
    qemu_version = _run([qemu, "--version"], "qemu --version", "reinstall qemu").splitlines()[0]
    return {
        "x86": x86,
        "aarch64": {**arm, "cpu": args.cpu, "qemu": qemu_version, "debian": DEBIAN},
        "altered": args.alter_arm,
        "passed": all(r["passed"] for r in rows),
        "rows": rows,
    }


def _libraries(side: dict[str, Any]) -> str:
    openvino = f", OpenVINO {side['openvino']}" if side.get("openvino") else ""
    return f"ONNX Runtime {side['onnxruntime']}{openvino}, numpy {side['numpy']}"


def _backends(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'none'}: the edge check runs {', '.join(BACKENDS)}"
        )
    return list(dict.fromkeys(names))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":  # inside either interpreter
        worker(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="artifact manifests (.json)")
    parser.add_argument(
        "--shapes",
        help="BxCxHxW,... for every artifact [default: the first "
        "two of each artifact's parity grid]",
    )
    parser.add_argument(
        "--backends",
        type=_backends,
        default=["onnxruntime"],
        help=f"comma-separated, of {', '.join(BACKENDS)} [default: onnxruntime]",
    )
    parser.add_argument("--qemu", default="qemu-aarch64-static", help="qemu-user for aarch64")
    parser.add_argument("--cpu", choices=sorted(CPUS), default="cortex-a76", help="the ARM core")
    parser.add_argument(
        "--cache",
        type=Path,
        default=REPO / ".edge",
        help="where the aarch64 root and wheels are kept [default: .edge/]",
    )
    parser.add_argument(
        "--fp16-arithmetic",
        choices=("auto", "float32", "native"),
        default="auto",
        help="the onnxruntime backend's fp16_arithmetic on both sides [default: auto: float16 "
        "graphs widened to float32 on a core with FP16 arithmetic; native: its float16 kernels]",
    )
    parser.add_argument("--json", type=Path, help="write the table and versions here")
    parser.add_argument(
        "--alter-arm",
        type=float,
        default=0.0,
        metavar="REL",
        help="add noise of relative L2 REL to the aarch64 outputs (tests)",
    )
    args = parser.parse_args()

    from resfuse.console import fail, out
    from resfuse.errors import ResfuseError

    try:
        result = edge_check(args)
    except ResfuseError as exc:
        fail(str(exc))
    except subprocess.TimeoutExpired:
        fail(f"the aarch64 run took over {ARM_TIMEOUT} s; check fewer artifacts or --shapes")
    arm, x86 = result["aarch64"], result["x86"]
    out.print(
        f"aarch64 ({arm['cpu']}, {arm['qemu']}, Debian {DEBIAN}, Python {arm['python']}, "
        f"{_libraries(arm)}, {arm['seconds_per_call']} s a call) against x86 (Python "
        f"{x86['python']}, {_libraries(x86)})",
        highlight=False,
    )
    for name, said in arm["fp16_arithmetic"].items():
        out.print(
            f"{name} computed in {said} on aarch64, in {x86['fp16_arithmetic'][name]} on x86",
            highlight=False,
        )
    out.print(table(result["rows"]), highlight=False, soft_wrap=True)
    if args.json:
        from resfuse.artifacts import write_json

        write_json(args.json, result)
    if not result["passed"]:
        fail("an aarch64 output misses its artifact's tolerance (FAIL rows above)")


if __name__ == "__main__":
    main()
