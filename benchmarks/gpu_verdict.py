"""The verdict of benchmarks/gpu_check.sh, from what its steps left in LOG_DIR: per GPU path,
run or not run and why, and whether anything ran on a GPU at all.

    python benchmarks/gpu_verdict.py LOG_DIR

Reads LOG_DIR/gpu-tests.xml (pytest's JUnit report of `pytest -m "gpu or tensorrt"`) and, when
they are there, LOG_DIR/rtx-probe.json (benchmarks/gpu_probe.py) and LOG_DIR/gpu-latency/gpu.json
(benchmarks/gpu_latency.py). Prints a markdown table, one row per path (ORT CUDA EP, ORT TensorRT
EP, resfuse TensorRT runner, TensorRT-RTX), then one verdict line. Exit status: 0 when some GPU
test ran and none failed; 1 when a GPU test failed, or when nothing ran on a GPU (every GPU test
skipped, or no report): a check that tested nothing must not read as passed.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Which tests belong to which path: pytest ids (file::name) that start with these.
PATHS = {
    "ORT CUDA EP": (
        "tests/test_gpu_paths.py::test_ort_cuda",
        "tests/test_runtime.py::test_cuda_backends",
    ),
    "ORT TensorRT EP": ("tests/test_gpu_paths.py::test_ort_tensorrt_ep",),
    "resfuse TensorRT runner": ("tests/test_tensorrt_runtime.py", "tests/test_engines.py"),
    "TensorRT-RTX": ("tests/test_gpu_paths.py::test_rtx",),
}
# Rows of gpu_latency.py that belong to a path
LATENCY = {"ORT CUDA EP": "onnxruntime (cuda)", "resfuse TensorRT runner": "tensorrt"}


@dataclass(frozen=True)
class Case:
    """One test of the JUnit report: its pytest id, outcome and (for a skip) its reason."""

    id: str
    outcome: str  # passed, failed, skipped
    reason: str = ""


def read_cases(report: Path) -> list[Case]:
    """The test cases of a pytest JUnit report (an error counts as a failure)."""
    cases = []
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        file = case.get("classname", "").replace(".", "/") + ".py"
        outcome, reason = "passed", ""
        for child in case:
            if child.tag == "skipped":
                outcome, reason = "skipped", child.get("message", "")
            elif child.tag in ("failure", "error"):
                outcome = "failed"
        cases.append(Case(f"{file}::{case.get('name', '')}", outcome, reason))
    return cases


def _path_of(case: Case) -> str | None:
    return next((p for p, ids in PATHS.items() if case.id.startswith(ids)), None)


def path_rows(
    cases: list[Case], probe: dict[str, Any] | None, latency: dict[str, Any] | None
) -> list[tuple[str, str, str]]:
    """(path, "run" or "not run", what ran or why not) for each path."""
    rows = []
    for path in PATHS:
        mine = [c for c in cases if _path_of(c) == path]
        counts = Counter(c.outcome for c in mine)
        ran = counts["passed"] + counts["failed"]
        said = [f"{ran} GPU tests ran: {counts['passed']} passed, {counts['failed']} failed"]
        if not ran:
            why = next((c.reason for c in mine if c.reason), "")
            said = [f"no GPU test ran ({why or 'none of its tests was collected'})"]
        rows_of = [
            r for r in (latency or {}).get("records", []) if r["backend"] == LATENCY.get(path)
        ]
        if rows_of:
            said.append(f"{len(rows_of)} latency rows (gpu-latency)")
        if path == "TensorRT-RTX" and probe is not None:
            said.append(_probe_summary(probe))
        rows.append((path, "run" if ran else "not run", "; ".join(said)))
    return rows


def _probe_summary(probe: dict[str, Any]) -> str:
    stages = probe.get("stages", [])
    failed = [s["stage"] for s in stages if not s["ok"]]
    state = f"failed at {', '.join(failed)}" if failed else "every stage passed"
    return f"probe on {probe.get('compute_capability', '?')}: {state}"


def verdict(cases: list[Case]) -> tuple[int, str]:
    """(exit status, the one line that says it)."""
    counts = Counter(c.outcome for c in cases)
    ran = counts["passed"] + counts["failed"]
    if not ran:
        reasons = Counter(c.reason for c in cases if c.reason)
        why = f"; most often: {reasons.most_common(1)[0][0]}" if reasons else ""
        return 1, (
            f"gpu_check.sh: FAILED: nothing ran on a GPU (all {len(cases)} GPU tests were "
            f"skipped{why})"
        )
    if counts["failed"]:
        return 1, f"gpu_check.sh: FAILED: {counts['failed']} of {ran} GPU tests that ran failed"
    return 0, f"gpu_check.sh: {ran} GPU tests ran and passed ({counts['skipped']} skipped)"


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the step did not run, or was killed before it wrote


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print(
            "usage: python benchmarks/gpu_verdict.py LOG_DIR (gpu_check.sh's logs)", file=sys.stderr
        )
        return 2
    logs = Path(argv[0])
    report = logs / "gpu-tests.xml"
    try:
        cases = read_cases(report)
    except (OSError, ElementTree.ParseError) as exc:
        print(f"gpu_check.sh: FAILED: nothing ran on a GPU (no readable {report.name}: {exc})")
        return 1
    print("| path | GPU | what ran, or why not |")
    print("| --- | --- | --- |")
    for path, state, detail in path_rows(
        cases, _json(logs / "rtx-probe.json"), _json(logs / "gpu-latency" / "gpu.json")
    ):
        print(f"| {path} | {state} | {detail.replace('|', '/')} |")
    status, line = verdict(cases)
    print()
    print(line)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
