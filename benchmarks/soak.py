"""Soak: one ONNX Runtime session, thousands of calls whose shape changes every call; resident
memory must level off.

    python benchmarks/soak.py                          # exports, then 5-10 minutes on 2 cores
    python benchmarks/soak.py --reuse --mem-pattern off

Exports masked-resnet18 (inputs up to 1024x1024) into benchmarks/artifacts/, or reuses it with
--reuse, and opens ONE session. The warm-up starts with the largest shape drawn (batch 4 at
160x160): ONNX Runtime's CPU memory arena grows to the largest request it has served and keeps
that memory, a plateau rather than a leak, so the baseline is taken once it has been reached.
Then --calls calls, each on a new random shape (batch 1..4, H and W 32..160), with VmRSS from
/proc/self/status sampled every --every calls. Target: RSS at the end within 10% of RSS after
the warm-up. Last, one call at twice the largest side shows the arena's step up, and that it
stays there. Writes benchmarks/results/soak.json (every sample, the settings, the machine).

--mem-pattern is ONNX Runtime's enable_mem_pattern (resfuse's default: on). With it, each new
input shape gets a memory plan that the session caches, keyed by the shapes, and never evicts:
the growth per distinct shape is what this script measures against the run with it off.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from resfuse.artifacts import read_manifest, write_json
from resfuse.errors import ResfuseError
from resfuse.export.pipeline import ExportOptions, artifact_name, export_artifact
from resfuse.models import ModelConfig
from resfuse.runtime import Session, load
from resfuse.runtime.machine import machine_info
from resfuse.runtime.report import markdown_table
from resfuse.shapes import format_shape

HERE = Path(__file__).parent
CONFIG = ModelConfig("masked")
TARGET = 0.10  # end RSS at most 10% above the RSS after warm-up
MAX_SIZE = 1024  # the export's largest H and W


def rss_mib() -> float:
    """Resident set size of this process, from the kernel's own accounting."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmRSS in /proc/self/status")


def artifact(folder: Path, reuse: bool) -> Path:
    """The manifest of masked-resnet18, exported here unless --reuse finds a valid one."""
    if reuse:
        try:
            return read_manifest(folder / f"{artifact_name(CONFIG)}.json").path
        except ResfuseError as exc:
            print(f"not reusing: {exc}", flush=True)
    print(f"exporting {artifact_name(CONFIG)} into {folder}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    return export_artifact(CONFIG, folder, ExportOptions(max_size=MAX_SIZE)).manifest_path


class Inputs:
    """Random float32 inputs, each of a new random shape; the shapes seen are counted."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = np.random.default_rng(args.seed)
        self.args = args
        self.seen: set[tuple[int, int, int, int]] = set()

    def largest(self) -> np.ndarray:
        a = self.args
        return self.make((a.max_batch, 3, a.max_side, a.max_side))

    def draw(self) -> np.ndarray:
        a = self.args
        h, w = (int(s) for s in self.rng.integers(a.min_side, a.max_side + 1, size=2))
        return self.make((int(self.rng.integers(1, a.max_batch + 1)), 3, h, w))

    def make(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        self.seen.add(shape)
        return self.rng.standard_normal(shape, dtype=np.float32)


def soak(manifest: Path, args: argparse.Namespace) -> dict[str, Any]:
    inputs = Inputs(args)
    options: dict[str, Any] = {"mem_pattern": args.mem_pattern == "on"}
    if args.threads:
        options["threads"] = args.threads
    with load(manifest, **options) as session:
        settings, loaded = session.runner.describe(), rss_mib()
        session.run(inputs.largest())
        for _ in range(args.warmup - 1):
            session.run(inputs.draw())
        samples = [{"calls": 0, "seconds": 0.0, "rss_mib": rss_mib()}]
        start = time.perf_counter()
        for done in range(1, args.calls + 1):
            session.run(inputs.draw())
            if done % args.every == 0:
                seconds, rss = time.perf_counter() - start, rss_mib()
                samples.append({"calls": done, "seconds": seconds, "rss_mib": rss})
                print(f"{done:>7} calls {seconds:7.0f} s  RSS {rss:.1f} MiB", flush=True)
        step = step_up(session, inputs, args)
    return {
        "settings": settings,
        "distinct_shapes": len(inputs.seen),
        "rss_loaded_mib": loaded,
        "samples": samples,
        "summary": summarise(samples),
        "step_up": step,
    }


def step_up(session: Session, inputs: Inputs, args: argparse.Namespace) -> dict[str, Any]:
    """After the soak, one input larger than any before, --every small calls, then the large one
    again: the arena takes memory for the new largest shape once, and keeps it."""
    side = min(2 * args.max_side, MAX_SIZE)
    big = inputs.make((args.max_batch, 3, side, side))
    step = {"shape": list(big.shape), "before_mib": rss_mib()}
    session.run(big)
    step["after_it_mib"] = rss_mib()
    for _ in range(args.every):
        session.run(inputs.draw())
    session.run(big)
    step["after_more_calls_and_it_again_mib"] = rss_mib()
    return step


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """RSS after warm-up, its maximum and its end; the slope over the second half of the run
    tells a plateau (about 0) from steady growth."""
    rss = np.array([s["rss_mib"] for s in samples])
    calls = np.array([s["calls"] for s in samples])
    half = len(samples) // 2
    slope = np.polyfit(calls[half:], rss[half:], 1)[0] * 1000 if len(samples) - half > 1 else 0.0
    ratio = rss[-1] / rss[0]
    return {
        "rss_after_warmup_mib": float(rss[0]),
        "rss_max_mib": float(rss.max()),
        "rss_end_mib": float(rss[-1]),
        "end_over_warmup": float(ratio),
        "second_half_mib_per_1000_calls": float(slope),
        "target": f"end within {TARGET:.0%} of after warm-up",
        "met": bool(ratio <= 1 + TARGET),
    }


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    headers = ["mem_pattern", "calls", "minutes", "RSS loaded MiB", "after warm-up MiB"]
    headers += ["max MiB", "end MiB", "end/warm-up", "2nd half MiB/1000 calls"]
    headers += [f"target <= {1 + TARGET:.2f}"]
    last = result["samples"][-1]
    row = [
        "on" if result["settings"]["mem_pattern"] else "off",
        last["calls"],
        f"{last['seconds'] / 60:.1f}",
        f"{result['rss_loaded_mib']:.1f}",
        f"{s['rss_after_warmup_mib']:.1f}",
        f"{s['rss_max_mib']:.1f}",
        f"{s['rss_end_mib']:.1f}",
        f"{s['end_over_warmup']:.3f}",
        f"{s['second_half_mib_per_1000_calls']:+.2f}",
        "met" if s["met"] else "MISSED",
    ]
    step = result["step_up"]
    grown = markdown_table(
        ["then one call at", "RSS before MiB", "after it MiB", "after more calls and it again"],
        [
            [
                format_shape(step["shape"]),
                f"{step['before_mib']:.1f}",
                f"{step['after_it_mib']:.1f}",
                f"{step['after_more_calls_and_it_again_mib']:.1f}",
            ]
        ],
    )
    return markdown_table(headers, [row]) + "\n\n" + grown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=12000, help="calls after the warm-up")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--every", type=int, default=200, help="sample RSS every N calls")
    parser.add_argument("--min-side", type=int, default=32)
    parser.add_argument("--max-side", type=int, default=160)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--mem-pattern", choices=["on", "off"], default="on")
    parser.add_argument("--threads", type=int, default=None, help="[default: the runtime's]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifacts", type=Path, default=HERE / "artifacts")
    parser.add_argument("--reuse", action="store_true", help="reuse an earlier export")
    parser.add_argument("--artifact", type=Path, default=None, help="soak this manifest instead")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    args = parser.parse_args()
    if args.warmup < 1 or args.calls < args.every or args.every < 1:
        parser.error("need --warmup >= 1 and --calls >= --every >= 1")
    manifest = args.artifact or artifact(args.artifacts, args.reuse)
    result = {
        "artifact": str(manifest),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **soak(manifest, args),
        "machine": machine_info(),
    }
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
