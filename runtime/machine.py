"""What a measurement ran on: CPU, cores, libraries, GPU. Benchmarks record it beside numbers.

A container sees the host's /proc/cpuinfo, so the CPUs this process may really use are the
fewest of three: the host's cores, its affinity mask (taskset, cpuset) and its cgroup's CPU
bandwidth quota (docker --cpus, Kubernetes limits). Every file is read under `root` ("/" in use)
so that tests can point the same code at a fake tree of real files.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

from resfuse.environment import library_versions
from resfuse.torch_extra import has_torch

ROOT = Path("/")
# Instruction sets that decide which kernels ONNX Runtime and PyTorch pick for inference:
# x86 from "flags", Arm from "Features" (also every amx_* flag, whatever Intel adds next).
_INFERENCE_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "asimd",
    "asimddp",
    "asimdhp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
)


@dataclass(frozen=True)
class CpuQuota:
    """A cgroup CPU bandwidth limit in CPUs (1.5 = 150 ms of CPU time every 100 ms)."""

    cpus: float | None  # None: no limit found
    source: str  # the file that set it, or "none"


NO_QUOTA = CpuQuota(None, "none")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _v2_limit(folder: Path) -> float | None:
    """cgroup v2 cpu.max: "<quota> <period>" in microseconds, or "max <period>"."""
    quota, _, period = (_read(folder / "cpu.max") or "max").partition(" ")
    return _ratio(quota, period)


def _v1_limit(folder: Path) -> float | None:
    """cgroup v1: cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us."""
    return _ratio(_read(folder / "cpu.cfs_quota_us") or "-1", _read(folder / "cpu.cfs_period_us"))


def _ratio(quota: str, period: str | None) -> float | None:
    try:
        q, p = int(quota), int(period or "0")
    except ValueError:  # "max", or a file this code does not understand: no limit
        return None
    return q / p if q > 0 and p > 0 else None


def _tightest(mount: Path, cgroup: str, version: str, root: Path) -> list[CpuQuota]:
    """The limits on `cgroup` and its ancestors under `mount`: a parent's limit binds its
    children too. Inside a cgroup namespace the mount's top is the container's own cgroup, and
    the path from /proc/self/cgroup may not exist under it; the walk up then ends there."""
    read, name = (_v2_limit, "cpu.max") if version == "v2" else (_v1_limit, "cpu.cfs_quota_us")
    found = []
    relative = PurePosixPath(cgroup.lstrip("/"))
    for folder in (mount / part for part in (relative, *relative.parents)):
        cpus = read(folder)
        if cpus is not None:
            where = PurePosixPath("/") / (folder / name).relative_to(root)
            found.append(CpuQuota(cpus, f"cgroup {version} {where}"))
    return found


def cpu_quota(root: Path = ROOT) -> CpuQuota:
    """The tightest CPU bandwidth limit on this process's cgroup (found in /proc/self/cgroup),
    cgroup v2 or v1, with the mounts where Docker, Kubernetes and systemd put them."""
    found: list[CpuQuota] = []
    base = root / "sys/fs/cgroup"
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        controllers, _, cgroup = line.partition(":")[2].partition(":")
        if not controllers:
            found += _tightest(base, cgroup, "v2", root)
        elif "cpu" in controllers.split(","):
            mount = base / controllers if (base / controllers).is_dir() else base / "cpu"
            found += _tightest(mount, cgroup, "v1", root)
    return min(found, key=lambda q: q.cpus or math.inf, default=NO_QUOTA)


def _affinity() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def usable_cpus(root: Path = ROOT) -> int:
    """Logical CPUs this process may keep busy: its affinity mask, capped by the cgroup quota.

    A fractional quota rounds up (1.5 CPUs: 2), as Go's GOMAXPROCS and the JVM do: the threads
    then use the whole quota, where rounding down would leave a third of it idle; the price is
    CFS throttling at saturation, so pass threads explicitly where tail latency matters more.
    """
    quota = cpu_quota(root).cpus
    cpus = len(_affinity())
    return min(cpus, math.ceil(quota)) if quota else cpus


def cores_of(cpuinfo: str, cpus: set[int]) -> int:
    """Distinct (physical id, core id) pairs among the logical `cpus`; 0 where /proc/cpuinfo
    names no cores (most Arm kernels, some VMs)."""
    cores, processor, physical = set(), -1, "0"
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor" and value.isdigit():
            processor, physical = int(value), "0"
        elif key == "physical id":
            physical = value
        elif key == "core id" and processor in cpus:
            cores.add((physical, value))
    return len(cores)


@cache
def physical_cores(root: Path = ROOT) -> int:
    """Physical cores this process may use (SMT siblings share one), within its affinity mask
    and cgroup quota: ONNX Runtime's best intra-op thread count."""
    cores = cores_of(_read(root / "proc/cpuinfo") or "", _affinity())
    usable = usable_cpus(root)
    return min(cores, usable) if cores else usable


def cpu_flags(root: Path = ROOT) -> list[str]:
    """The inference-relevant instruction sets of the first CPU in /proc/cpuinfo."""
    for line in (_read(root / "proc/cpuinfo") or "").splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("flags", "Features"):
            have = set(value.split())
            amx = sorted(f for f in have if f.startswith("amx_"))
            return [f for f in _INFERENCE_FLAGS if f in have] + amx
    return []


_AT_HWCAP, _HWCAP_ASIMDHP = 16, 1 << 10  # Linux arm64: getauxval's key, FP16 vector arithmetic


@cache
def fp16_arithmetic() -> bool:
    """Whether this CPU has float16 vector arithmetic that ONNX Runtime's CPU provider computes
    float16 nodes in: an ARM64 core with FEAT_FP16 (Armv8.2: Cortex-A55, A76, A78, Neoverse,
    Apple silicon). MLAS has float16 kernels for ARM64 only; elsewhere a float16 graph runs in
    float32 after casts. Read as ONNX Runtime reads it on Linux (the kernel's hwcaps, which an
    emulator sets from its -cpu model); off Linux an ARM64 core is taken to have it."""
    if platform.machine().lower() not in ("aarch64", "arm64"):
        return False
    if not sys.platform.startswith("linux"):
        return True
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):  # a libc without getauxval: the kernel's cpuinfo
        return "asimdhp" in cpu_flags()
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return bool(getauxval(_AT_HWCAP) & _HWCAP_ASIMDHP)


def cpu_model(root: Path = ROOT) -> str:
    for line in (_read(root / "proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    quota = cpu_quota()
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(_affinity()),
        "cpu_quota": quota.cpus,
        "cpu_quota_source": quota.source,
        "usable_cpus": usable_cpus(),
        "physical_cores": physical_cores(),
        "os": f"{platform.system()} {platform.release()}",
        "versions": library_versions(),
        "gpu": _gpu(),
    }


def _gpu() -> str | None:
    """The CUDA GPU torch sees; None without one, or without torch (the base install)."""
    if not has_torch():
        return None
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
