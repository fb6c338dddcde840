"""How the layers stand on each other: the runtime on the core alone (loading, checking, timing and
serving an artifact import nothing of the export code, which only builds a TensorRT engine on
first use), and no module of resfuse importing back a module that imports it."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

# Every runtime module, imported in a fresh interpreter (this one has export loaded already), then
# the resfuse.export modules that came with them are printed one a line.
_IMPORT_RUNTIME = """
import importlib, pkgutil, sys
import resfuse.runtime as runtime
for module in pkgutil.walk_packages(runtime.__path__, "resfuse.runtime."):
    importlib.import_module(module.name)
print("\\n".join(sorted(m for m in sys.modules if m.startswith("resfuse.export"))))
"""


def test_runtime_imports_nothing_from_export() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_RUNTIME], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []


# The base install has no torch (issue 29): the runtime, the package and its model declarations
# import none of the export extra's libraries, here where they are installed but not imported.
_IMPORT_BASE = """
import importlib, pkgutil, sys
import resfuse, resfuse.artifacts, resfuse.models, resfuse.schema
import resfuse.runtime as runtime
for module in pkgutil.walk_packages(runtime.__path__, "resfuse.runtime."):
    importlib.import_module(module.name)
extra = {
    "torch", "torchvision", "onnx", "onnxscript", "onnxslim", "onnxconverter_common", "safetensors"
}
print("\\n".join(sorted(m for m in sys.modules if m.partition(".")[0] in extra)))
"""


def test_the_runtime_imports_nothing_of_the_export_extra() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_BASE], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []


def _sources() -> dict[str, Path]:
    """Module name -> file for every module of the installed packages (export and runtime live
    in folders of their own, so each package's folder is asked of the import system)."""
    sources = {}
    for package in ("resfuse", "resfuse.export", "resfuse.runtime"):
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations is not None
        folder = Path(next(iter(spec.submodule_search_locations)))
        for path in folder.rglob("*.py"):
            parts = (*package.split("."), *path.relative_to(folder).with_suffix("").parts)
            sources[".".join(parts).removesuffix(".__init__")] = path
    return sources


def _imports(path: Path, known: set[str]) -> set[str]:
    """The resfuse modules a file imports anywhere, inside functions too: an import hidden in a
    function still ties the two modules together."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & known


def _path_back(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest chain of imports that leads from `start` back to it; None when none does."""
    trail, todo = {start: [start]}, [start]
    while todo:
        here = todo.pop(0)
        if start in graph[here]:
            return [*trail[here], start]
        for nxt in sorted(graph[here] - trail.keys()):
            trail[nxt] = [*trail[here], nxt]
            todo.append(nxt)
    return None


def test_no_import_circles() -> None:
    sources = _sources()
    graph = {name: _imports(path, set(sources)) - {name} for name, path in sources.items()}
    circles = [chain for name in sorted(graph) if (chain := _path_back(graph, name))]
    assert circles == []
