"""The README is a front door and the docs a site that builds: short, linked, strict, and every
command line they show names a real command and real options."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import tomllib

ROOT = Path(__file__).parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
README_LINES = 250


def _scripts() -> dict[str, click.Command]:
    """The console scripts pyproject declares, as their click commands."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    found = {}
    for name, target in table.items():
        module, attribute = target.split(":")
        found[name] = getattr(importlib.import_module(module), attribute)
    return found


def _command_lines(path: Path) -> list[str]:
    """The resfuse-* lines of a file's sh code blocks, continued lines joined, comments
    dropped."""
    lines, inside, pending = [], False, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            inside, pending = line.strip() in ("```sh", "```bash"), ""
            continue
        text = pending + line.split(" #", 1)[0].strip().removeprefix("$ ")
        pending = text[:-1] + " " if text.endswith("\\") else ""
        if inside and not pending and text.startswith("resfuse-"):
            lines.append(text)
    return lines


def test_the_readme_is_a_front_door_that_links_real_pages() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_LINES
    assert "make demo" in readme.split("\n## ", 2)[1]  # the set-up comes first
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and all((ROOT / link).is_file() for link in links), links
    assert {f"docs/{p.name}" for p in PAGES} - {"docs/index.md"} <= {*links, "docs/setup.md"}


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_every_command_line_shown_names_real_options(path: Path) -> None:
    """Each example's command is a console script and each --option one of its options, so a
    renamed option cannot leave a page behind."""
    scripts = _scripts()
    for line in _command_lines(path):
        words = shlex.split(line)
        command = scripts.get(words[0])
        assert command is not None, f"{path.name}: {words[0]} is no resfuse command"
        known = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
        used = {w.split("=", 1)[0] for w in words[1:] if w.startswith("--")}
        assert used <= known, f"{path.name}: {line!r} uses {sorted(used - known)}"


def test_the_site_builds_strict(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[dev]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [mkdocs, "build", "--strict", "-d", str(tmp_path / "site")],  # -q hides warnings
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "volumes" / "index.html").is_file()
