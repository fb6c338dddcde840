"""benchmarks/accuracy.py --quick end to end: train, export float32 and INT8, measure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "accuracy.py"


@pytest.mark.slow  # two real exports: about 35 s on 2 idle cores
def test_quick_run_writes_results(tmp_path: Path) -> None:
    output = tmp_path / "accuracy.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(output)],
        check=True,
        capture_output=True,
        timeout=600,  # a hung run fails instead of blocking the suite; no timing is judged
    )
    summary = json.loads(output.read_text())
    assert summary["format"] == "resfuse-accuracy"
    assert summary["machine"]["cpu"]
    assert (tmp_path / "accuracy.md").read_text().startswith("Command:")
    (model,) = summary["models"]
    assert set(model["latency"]) == {"torch", "float32", "int8"}
    assert {"int8_agreement_met", "int8_miou_met"} <= set(model["targets"])
    rows = {(r["size"], r["backend"]): r for r in model["accuracy"]}
    assert {size for size, _ in rows} == set(summary["plan"]["heldout"])
    for size in summary["plan"]["heldout"]:
        # float32 ONNX Runtime is the PyTorch original to float rounding: a failure here means
        # the export or the metrics broke, not the quantization
        assert rows[size, "float32"]["rel_l2"] < 1e-4
        assert rows[size, "float32"]["agreement"] > 0.999
        assert rows[size, "torch"]["agreement"] == 1.0
        assert 0.0 <= rows[size, "int8"]["miou"] <= 1.0
