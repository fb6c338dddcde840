"""CPU budget: affinity and cgroup quotas, read by the real code from fake trees of real files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from resfuse.runtime.machine import (
    NO_QUOTA,
    CpuQuota,
    cores_of,
    cpu_flags,
    cpu_quota,
    machine_info,
    physical_cores,
    usable_cpus,
)

AFFINITY = len(os.sched_getaffinity(0))


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


V2 = "sys/fs/cgroup"


@pytest.mark.parametrize(
    "files,expected",
    [
        pytest.param(
            {
                "proc/self/cgroup": "0::/kubepods/pod1/c1\n",
                f"{V2}/kubepods/pod1/c1/cpu.max": "150000 100000\n",
            },
            CpuQuota(1.5, "cgroup v2 /sys/fs/cgroup/kubepods/pod1/c1/cpu.max"),
            id="v2",
        ),
        pytest.param(
            {
                "proc/self/cgroup": "0::/kubepods/pod1/c1\n",
                f"{V2}/kubepods/pod1/cpu.max": "50000 100000\n",
                f"{V2}/kubepods/pod1/c1/cpu.max": "150000 100000\n",
            },
            CpuQuota(0.5, "cgroup v2 /sys/fs/cgroup/kubepods/pod1/cpu.max"),
            id="v2-parent-tighter",
        ),
        pytest.param(
            {
                "proc/self/cgroup": "0::/kubepods/pod1/c1\n",
                f"{V2}/kubepods/cpu.max": "max 100000\n",
                f"{V2}/kubepods/pod1/cpu.max": "150000 100000\n",
                f"{V2}/kubepods/pod1/c1/cpu.max": "50000 100000\n",
            },
            CpuQuota(0.5, "cgroup v2 /sys/fs/cgroup/kubepods/pod1/c1/cpu.max"),
            id="v2-child-tighter",
        ),
        pytest.param(
            # A cgroup namespace: the mount's top is the container's own cgroup.
            {"proc/self/cgroup": "0::/docker/abc\n", f"{V2}/cpu.max": "200000 100000\n"},
            CpuQuota(2.0, "cgroup v2 /sys/fs/cgroup/cpu.max"),
            id="v2-namespace",
        ),
        pytest.param(
            {"proc/self/cgroup": "0::/\n", f"{V2}/cpu.max": "max 100000\n"},
            NO_QUOTA,
            id="v2-max",
        ),
        pytest.param(
            {
                "proc/self/cgroup": "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
                f"{V2}/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
                f"{V2}/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            },
            CpuQuota(2.5, "cgroup v1 /sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us"),
            id="v1",
        ),
        pytest.param(
            {
                "proc/self/cgroup": "4:cpuacct,cpu:/job\n",
                f"{V2}/cpu/job/cpu.cfs_quota_us": "-1\n",
                f"{V2}/cpu/job/cpu.cfs_period_us": "100000\n",
                f"{V2}/cpu/cpu.cfs_quota_us": "75000\n",
                f"{V2}/cpu/cpu.cfs_period_us": "50000\n",
            },
            CpuQuota(1.5, "cgroup v1 /sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
            id="v1-mounted-as-cpu",
        ),
        pytest.param(
            {"proc/self/cgroup": "1:cpu:/\n", f"{V2}/cpu/cpu.cfs_quota_us": "-1\n"},
            NO_QUOTA,
            id="v1-unlimited",
        ),
        pytest.param({}, NO_QUOTA, id="no-cgroups"),
    ],
)
def test_cpu_quota_from_cgroup_files(tmp_path: Path, files: dict[str, str], expected) -> None:
    assert cpu_quota(tree(tmp_path, files)) == expected


@pytest.mark.parametrize("quota,expected", [(0.5, 1), (1.0, 1), (1.5, 2), (64.0, AFFINITY)])
def test_usable_cpus_round_a_fraction_up_and_stay_within_affinity(
    tmp_path: Path, quota: float, expected: int
) -> None:
    root = tree(
        tmp_path,
        {"proc/self/cgroup": "0::/\n", f"{V2}/cpu.max": f"{int(quota * 100000)} 100000\n"},
    )
    assert usable_cpus(root) == min(expected, AFFINITY)


def test_physical_cores_follow_the_quota(tmp_path: Path) -> None:
    cpuinfo = "".join(f"processor\t: {i}\ncore id\t\t: {i}\n\n" for i in range(AFFINITY))
    limited = {"proc/self/cgroup": "0::/\n", f"{V2}/cpu.max": "50000 100000\n"}
    assert physical_cores(tree(tmp_path / "limited", {"proc/cpuinfo": cpuinfo, **limited})) == 1
    assert physical_cores(tree(tmp_path / "free", {"proc/cpuinfo": cpuinfo})) == AFFINITY


SMT = "".join(
    f"processor\t: {cpu}\nphysical id\t: 0\ncore id\t\t: {cpu % 2}\n\n" for cpu in range(4)
)


@pytest.mark.parametrize(
    "cpus,cores", [({0, 2}, 1), ({0, 1}, 2), ({0, 1, 2, 3}, 2), ({3}, 1), (set(), 0)]
)
def test_cores_of_counts_smt_siblings_once(cpus: set[int], cores: int) -> None:
    assert cores_of(SMT, cpus) == cores


def test_cores_of_without_core_ids() -> None:
    assert cores_of("processor\t: 0\nprocessor\t: 1\n", {0, 1}) == 0


@pytest.mark.skipif(AFFINITY < 2, reason="needs 2 CPUs to restrict the affinity to 1")
def test_one_cpu_affinity_gives_one_thread() -> None:
    cpu = min(os.sched_getaffinity(0))
    code = "from resfuse.runtime import machine as m; print(m.usable_cpus(), m.physical_cores())"
    child = subprocess.run(  # as under `taskset -c <cpu>`: one CPU from the start
        [sys.executable, "-c", code],
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.split() == ["1", "1"]


@pytest.mark.parametrize(
    "line,flags",
    [
        (
            "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile "
            "amx_int8 amx_bf16",
            ["avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
            + ["amx_bf16", "amx_int8", "amx_tile"],
        ),
        (
            "Features\t: fp asimd asimddp sve i8mm bf16 cpuid",
            ["asimd", "asimddp", "i8mm"] + ["bf16", "sve"],
        ),
        ("flags\t\t: fpu sse2", []),
    ],
)
def test_cpu_flags_keep_the_inference_instruction_sets(
    tmp_path: Path, line: str, flags: list[str]
) -> None:
    cpuinfo = f"processor\t: 0\nmodel name\t: Test CPU\n{line}\n\nprocessor\t: 1\nflags\t: fpu\n"
    assert cpu_flags(tree(tmp_path, {"proc/cpuinfo": cpuinfo})) == flags


def test_machine_info_records_the_cpu_budget() -> None:
    info = machine_info()
    assert 1 <= info["usable_cpus"] <= info["affinity_cpus"] <= info["logical_cpus"]
    assert info["physical_cores"] <= info["usable_cpus"]
    assert info["cpu_quota_source"] == cpu_quota().source
    assert isinstance(info["cpu_flags"], list)
