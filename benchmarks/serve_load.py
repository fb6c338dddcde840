"""Load on resfuse-serve over loopback against the same runtime called in-process.

    python benchmarks/serve_load.py                                  # exports masked-resnet18
    python benchmarks/serve_load.py --artifact A.json --size 512 --requests 100
    python benchmarks/serve_load.py --requests 4 --concurrency 1,2   # a smoke run

For each concurrency (clients sending one request after another, each on its own keep-alive
connection) it reports requests/s and p50/p99 latency, once over HTTP to Ray Serve (.npy bodies,
dynamic batching on) and as threads calling one in-process Session, before Ray starts and after it
stops. The gap is the cost of HTTP, serialisation and Ray's routing, less what batching wins.
--requests requests per concurrency level (split over its clients); p99 only from 500 or more.
Every client sends the same H x W, so batches fill. Writes benchmarks/results/serve.json and
prints a table.
"""

from __future__ import annotations

import argparse
import http.client
import io
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from resfuse.artifacts import write_json
from resfuse.runtime import load
from resfuse.runtime.bench import tail_percentile
from resfuse.runtime.machine import machine_info
from resfuse.runtime.report import markdown_table
from resfuse.runtime.serve import ServeOptions, start, stop

HERE = Path(__file__).parent
HEADERS = ["path", "clients", "requests", "req/s", "p50 ms", "p99 ms"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_test(call: Callable[[], Callable[[], None]], clients: int, requests: int) -> dict:
    """`call()` makes one client's request function; each of `clients` threads sends
    `requests` requests after one untimed warm-up request."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        send = call()
        send()  # warm-up: connection, first batch
        barrier.wait()
        for _ in range(requests):
            start_ = time.perf_counter()
            send()
            latencies[i].append(time.perf_counter() - start_)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    flat = np.array([x for per_client in latencies for x in per_client]) * 1000
    return {
        "clients": clients,
        "requests": int(flat.size),
        "requests_per_s": flat.size / wall,
        "p50_ms": float(np.percentile(flat, 50)),
        "p99_ms": tail_percentile(flat, 99),  # None below 500 requests: 5 must lie above it
    }


def in_process_rows(
    artifact: Path, x: np.ndarray, levels: list[int], requests: int, when: str
) -> list[dict[str, Any]]:
    rows = []
    with load(artifact) as session:
        for clients in levels:
            result = load_test(in_process(session, x), clients, -(-requests // clients))
            rows.append({"path": f"in-process ({when})", **result})
    return rows


def http_client(port: int, body: bytes) -> Callable[[], Callable[[], None]]:
    def make() -> Callable[[], None]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"Content-Type": "application/octet-stream"}

        def send() -> None:
            connection.request("POST", "/predict", body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")

        return send

    return make


def in_process(session: Any, x: np.ndarray) -> Callable[[], Callable[[], None]]:
    return lambda: lambda: session.run(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, default=None, help="[default: export one]")
    parser.add_argument("--size", type=int, default=224, help="H = W of every request")
    parser.add_argument(
        "--requests", type=int, default=500, help="per concurrency level, split over its clients"
    )
    parser.add_argument("--concurrency", default="1,8,16")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "serve.json")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import ray

    with tempfile.TemporaryDirectory() as scratch:
        artifact = args.artifact or export_default(Path(scratch))
        x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size), np.float32)
        buffer = io.BytesIO()
        np.save(buffer, x)
        rows = in_process_rows(artifact, x, levels, args.requests, "before")
        ray.init(include_dashboard=False, log_to_driver=False)
        options = ServeOptions(
            artifact,
            replicas=args.replicas,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            port=free_port(),
        )
        started = start(options)
        try:
            for clients in levels:
                per_client = -(-args.requests // clients)
                result = load_test(
                    http_client(options.port, buffer.getvalue()), clients, per_client
                )
                rows.append({"path": "ray-serve", **result})
        finally:
            stop(started)
        # In-process again once Ray has stopped: the two in-process runs bracket the Serve run,
        # and their difference is the machine's drift over the benchmark.
        rows += in_process_rows(artifact, x, levels, args.requests, "after")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_json(args.json, {"settings": settings, "machine": machine_info(), "results": rows})
    table = [
        [r["path"], r["clients"], r["requests"], f"{r['requests_per_s']:.1f}",
         f"{r['p50_ms']:.1f}", "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"]
        for r in rows
    ]  # fmt: skip
    print(markdown_table(HEADERS, table))
    print(f"\nwrote {args.json}")


def export_default(folder: Path) -> Path:
    from resfuse.export.pipeline import ExportOptions, export_artifact
    from resfuse.models import ModelConfig

    print("exporting masked-resnet18 (float32) for the benchmark ...")
    return export_artifact(
        ModelConfig("masked"), folder, ExportOptions(max_size=1024)
    ).manifest_path


if __name__ == "__main__":
    main()
