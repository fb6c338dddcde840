"""What listens where: the Ray that resfuse-serve starts, and its HTTP proxy, on loopback only.

The listening sockets of this process tree (Ray's gcs_server, raylet, agents and workers are its
children) come from /proc/net/tcp and /proc/net/tcp6, matched to the processes by the socket
inodes in /proc/<pid>/fd: no psutil needed. Only loopback addresses are used.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'resfuse[serve]'")
if not sys.platform.startswith("linux"):
    pytest.skip("reads listening sockets from /proc (Linux)", allow_module_level=True)

from resfuse.runtime.serve import ServeOptions, connect, deploy, stop  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster and a server

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(root: int) -> dict[int, str]:
    """pid -> command name of `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # exited meanwhile
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces
            children.setdefault(parent, []).append(int(entry))
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:
            tree[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        todo += children.get(pid, [])
    return tree


def socket_owners(pids: dict[int, str]) -> dict[int, str]:
    """socket inode -> command name of the process holding it."""
    owners = {}
    for pid, name in pids.items():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[int(target[8:-1])] = name
    return owners


def listening() -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
    """(address, port, inode) of every listening TCP socket in this network namespace."""
    found = []
    for table, width in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != LISTEN:
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            found.append((ipaddress.ip_address(raw), int(hex_port, 16), int(fields[9])))
    return found


def wait_healthy(port: int, seconds: float) -> None:
    """Until GET /healthz answers 200 through Serve's proxy and the replica: the proxy starts,
    and the replica opens its own servers, after deploy returns."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.5)
    raise TimeoutError(f"http://127.0.0.1:{port}/healthz not 200 after {seconds} s")


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return (mapped or address).is_loopback


def test_a_local_server_listens_on_loopback_only(
    head_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # a Ray left by another test is not the one resfuse starts
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a Ray of its own, not a cluster's
    options = ServeOptions(head_artifact, port=free_port(), max_batch=2)
    started = connect(options)
    try:
        assert started
        deploy(options)
        wait_healthy(options.port, 60)
        owners = socket_owners(process_tree(os.getpid()))
        ours = [(a, p, n) for a, p, i in listening() if (n := owners.get(i)) is not None]
    finally:
        stop(started)
    names = {name for _, _, name in ours}
    assert {"gcs_server", "raylet"} <= names, ours  # the tree was seen, not an empty list
    assert (ipaddress.ip_address("127.0.0.1"), options.port) in {(a, p) for a, p, _ in ours}
    exposed = [(str(a), p, n) for a, p, n in ours if not is_loopback(a)]
    assert not exposed, f"listening beyond loopback: {exposed}"
