"""A backend is one Runner class and one registry line: what it declares on its class (takes CPU
threads, runs the PyTorch original, options that quiet it, files it claims) reaches
resfuse.runtime.load, resfuse-check, resfuse-bench and resfuse-serve from the registry alone."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from resfuse import runtime
from resfuse.artifacts import Manifest, load_original
from resfuse.errors import ConfigError
from resfuse.runtime.backend_spec import with_threads
from resfuse.runtime.backends import BACKENDS, Claim, Runner
from resfuse.runtime.backends.base import Option, check_count, check_flag, validate_options
from resfuse.runtime.bench import timed_sessions
from resfuse.runtime.cli import bench_main, check_main
from resfuse.runtime.serve_cli import serve_main

SHAPE = ["--shapes", "1x3x64x64"]


class DummyRunner(Runner):
    """The PyTorch original, eager on the CPU: a whole backend in a few lines. A `.dummy` file
    that holds an artifact's manifest path is its 'engine'."""

    name = "dummy"
    threaded = True
    runs_original = True
    quiet = MappingProxyType({"quiet": True})

    @classmethod
    def claim(cls, path: str | Path) -> Claim | None:
        path = Path(path)
        if path.suffix != ".dummy":
            return None
        return Claim(cls.name, "a dummy engine", path, Path(path.read_text()))

    declared = MappingProxyType(
        {"threads": Option("torch's own count", check_count), "quiet": Option("", check_flag)}
    )

    def __init__(self, manifest: Manifest, device: str = "cpu", **options: Any) -> None:
        validate_options(self.name, options, self.declared)
        super().__init__(manifest, device, **options)
        self.model: torch.nn.Module | None = None

    def activate(self) -> None:
        self.model = load_original(self.manifest)

    def infer(self, x: np.ndarray) -> np.ndarray:
        assert self.model is not None
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).numpy()

    def deactivate(self) -> None:
        self.model = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.options}


@pytest.fixture
def dummy() -> Iterator[None]:
    """The registry line, taken out again after the test."""
    BACKENDS[DummyRunner.name] = DummyRunner
    try:
        yield
    finally:
        del BACKENDS[DummyRunner.name]


def test_load_runs_it_and_hands_it_the_files_it_claims(
    head_artifact: Path, tmp_path: Path, dummy: None
) -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
    with runtime.load(head_artifact, "torch") as reference:
        expected = reference.run(x)
    with runtime.load(head_artifact, "dummy:threads=1") as session:
        assert session.backend == "dummy" and session.runner.options == {"threads": 1}
        np.testing.assert_array_equal(session.run(x), expected)
    with pytest.raises(ConfigError, match="threads must be a whole number >= 1, got 0"):
        runtime.load(head_artifact, "dummy", threads=0)
    engine = tmp_path / "model.dummy"
    engine.write_text(str(head_artifact))
    with runtime.load(engine, "dummy") as session:
        assert session.manifest.path == Path(head_artifact)
    with pytest.raises(ConfigError, match="model.dummy is a dummy engine, which only backend"):
        runtime.load(engine, "onnxruntime")


def test_commands_read_its_declaration(head_artifact: Path, tmp_path: Path, dummy: None) -> None:
    assert with_threads("dummy", 2) == "dummy:threads=2"  # threaded
    # runs the original: timed once, not again for an --also artifact, and never served
    also = timed_sessions(head_artifact, ["dummy", "onnxruntime"], [tmp_path / "int8.json"])
    assert [spec for _, spec in also] == ["dummy", "onnxruntime", "onnxruntime"]
    served = CliRunner().invoke(serve_main, [str(head_artifact), "--backend", "dummy"])
    assert served.exit_code == 2 and "'dummy' is not one of" in served.output
    checked = CliRunner().invoke(
        check_main, [str(head_artifact), "--backend", "dummy", "--threads", "1", *SHAPE]
    )
    assert checked.exit_code == 0, checked.output
    out = tmp_path / "bench.json"
    args = [str(head_artifact), "--backends", "torch,dummy", "--threads", "1", *SHAPE]
    args += ["--warmup", "1", "--iters", "1", "--rounds", "1", "--json", str(out)]
    timed = CliRunner().invoke(bench_main, args)
    assert timed.exit_code == 0, timed.output
    records = {r["backend"]: r for r in json.loads(out.read_text())["records"]}
    # --threads reaches it, and so do its quiet options: two sessions were timed together
    assert records["dummy"]["settings"] == {
        "backend": "dummy",
        "device": "cpu",
        "threads": 1,
        "quiet": True,
    }


def _readme_options() -> dict[str, set[str]]:
    """The runtime page's table of backend options: backend -> the options its rows name."""
    lines = (Path(__file__).parents[1] / "docs" / "runtime.md").read_text().splitlines()
    start = lines.index("| backend | option | meaning | default |") + 2
    table: dict[str, set[str]] = {}
    for line in itertools.takewhile(lambda line: line.startswith("|"), lines[start:]):
        backends, options = (re.findall(r"`([^`]+)`", cell) for cell in line.split("|")[1:3])
        for backend in backends:
            table.setdefault(backend, set()).update(options)
    return table


def test_every_declared_option_is_in_the_readme_table_and_no_other() -> None:
    declared = {name: set(runner.declared) for name, runner in BACKENDS.items()}
    assert _readme_options() == declared
