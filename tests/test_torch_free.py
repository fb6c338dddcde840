"""The base install runs artifacts without PyTorch (issue 29): in a venv that has resfuse's base
install alone (tests/runtime_venv.py), resfuse.runtime imports without torch, and
resfuse-predict and Session.run (tiled) on an artifact the full install made write what the full
install writes; resfuse-bench times the deployed backend with its accuracy not measured; a
command that needs torch says, in one line, which extra brings it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest
from clirun import invoke
from nibabel.testing import data_path
from PIL import Image
from runtime_venv import make_runtime_venv

from resfuse.onnx_wire import WireError, external_tensors
from resfuse.runtime import load
from resfuse.runtime.serve_cli import predict_main

# The venv's tests are slow: a venv built with pip (about 30 s), subprocesses.

EXTRA = "pip install 'resfuse[export]'"


@pytest.fixture(scope="session")
def runtime_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a venv with the base install alone, made once for the run."""
    return make_runtime_venv(tmp_path_factory.mktemp("runtime-venv"))


def _run(bin_: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A program of the venv, run outside the checkout (whose resfuse/ would shadow the
    installed package on `python -c`'s path)."""
    command = [str(bin_ / args[0]), *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=bin_.parent)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images of different sizes and a NIfTI volume: image and volume preprocessing."""
    folder = tmp_path_factory.mktemp("torch-free-inputs")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (48, 64), "sub/b.jpg": (40, 72)}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "anat.nii").write_bytes(Path(data_path, "anatomical.nii").read_bytes())
    return folder


@pytest.mark.slow
def test_the_base_install_has_no_torch_and_the_runtime_imports(runtime_bin: Path) -> None:
    script = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is installed'\n"
        "assert importlib.util.find_spec('onnx') is None, 'onnx is installed'\n"
        "import resfuse, resfuse.runtime, resfuse.runtime.serve_cli, resfuse.runtime.cli\n"
        "assert 'torch' not in sys.modules\n"
        "print(resfuse.ModelConfig('spp').stride)\n"
    )
    proc = _run(runtime_bin, "python", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["32"]


def _outputs(folder: Path) -> dict[str, np.ndarray]:
    """Every output file under `folder` by relative name, decoded (PNG masks, NIfTI volumes)."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name[0] != "."):
        name = str(path.relative_to(folder))
        if name.endswith(".png"):
            found[name] = np.asarray(Image.open(path))
        elif name.endswith(".nii.gz"):
            found[name] = np.asarray(nib.load(path).dataobj)
        else:
            found[name] = np.load(path)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fused", "head"])
def test_predict_writes_what_the_full_install_writes(
    runtime_bin: Path, exported, head_artifact: Path, inputs: Path, tmp_path: Path, which: str
) -> None:
    artifact = exported["masked"].manifest_path if which == "fused" else head_artifact
    base, full = tmp_path / "base", tmp_path / "full"
    args = (str(artifact), str(inputs), "--batch-size", "4", "--output")
    proc = _run(runtime_bin, "resfuse-predict", *args, str(base))
    assert proc.returncode == 0, proc.stderr
    done = invoke(predict_main, *args, str(full))
    assert done.returncode == 0, done.stderr
    expected = _outputs(full)
    got = _outputs(base)
    assert sorted(got) == sorted(expected) and len(got) == 3
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


@pytest.mark.slow
def test_a_tiled_session_run_gives_the_full_installs_output(
    runtime_bin: Path, exported, tmp_path: Path
) -> None:
    artifact = exported["spp"].manifest_path
    x = np.random.default_rng(1).standard_normal((1, 3, 100, 90), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np\n"
        "from resfuse.runtime import load\n"
        f"with load({str(artifact)!r}) as session:\n"
        f"    out = session.run(np.load({str(tmp_path / 'x.npy')!r}), tile=64, overlap=0.5)\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, out)\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = _run(runtime_bin, "python", "-c", script)
    assert proc.returncode == 0, proc.stderr
    with load(artifact) as session:
        expected = session.run(x, tile=64, overlap=0.5)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "needs"),
    [
        (["resfuse-export", "--method", "masked", "--output", "OUT"], "resfuse-export needs"),
        (["resfuse-optimize", "ARTIFACT", "--output", "OUT"], "resfuse-optimize needs"),
        (["resfuse-check", "ARTIFACT"], "backend 'torch', which runs the PyTorch original,"),
        (["resfuse-bench", "ARTIFACT", "--backends", "torch,onnxruntime"], "backend 'torch'"),
        (["resfuse-bench", "ARTIFACT", "--backends", "torch-compile"], "backend 'torch-compile'"),
        (["resfuse-bench", "ARTIFACT", "--images", "INPUTS"], "--images, which judges"),
    ],
)
def test_a_command_that_needs_torch_names_the_extra_in_one_line(
    runtime_bin: Path, exported, inputs: Path, tmp_path: Path, command: list[str], needs: str
) -> None:
    artifact = str(exported["masked"].manifest_path)
    given = {"ARTIFACT": artifact, "OUT": str(tmp_path / "out"), "INPUTS": str(inputs)}
    proc = _run(runtime_bin, *(given.get(a, a) for a in command))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needs in lines[0] and EXTRA in lines[0], proc.stderr


@pytest.mark.slow
def test_bench_times_the_deployed_backend_and_says_accuracy_is_not_measured(
    runtime_bin: Path, exported, tmp_path: Path
) -> None:
    """An edge box's latency: onnxruntime in rotated blocks as with torch, no reference to
    judge it against, so its accuracy is null with the reason, never a number made up."""
    out = tmp_path / "bench.json"
    artifact = str(exported["masked"].manifest_path)
    args = ("--shapes", "1x3x64x64", "--rounds", "2", "--iters", "3", "--json", str(out))
    proc = _run(runtime_bin, "resfuse-bench", artifact, *args)
    assert proc.returncode == 0, proc.stderr
    assert "torch left out of the default --backends" in proc.stderr
    assert "accuracy not measured: no PyTorch here" in proc.stdout and EXTRA in proc.stdout
    assert re.search(r"\| masked-resnet18 \| +onnxruntime \|", proc.stdout), proc.stdout
    result = json.loads(out.read_text())
    assert result["reference"] is None and EXTRA in result["accuracy"]["reason"]
    [record] = result["records"]
    assert (record["backend"], record["n"], record["rounds"], record["iters"]) == (
        "onnxruntime",
        6,
        2,
        3,
    )
    assert all(record[f"{key}_ms"] > 0 for key in ("p50", "mean", "min", "first_call"))
    unmeasured = ("rel_l2", "max_abs", "agreement", "within_tolerance", "speedup_vs_torch")
    assert all(record[key] is None for key in unmeasured), record


@pytest.mark.slow
def test_the_python_api_that_needs_torch_names_the_extra(runtime_bin: Path, exported) -> None:
    script = (
        "import resfuse\n"
        "for call in (lambda: resfuse.build_model('masked'),\n"
        f"             lambda: resfuse.load_original({str(exported['masked'].manifest_path)!r})):\n"
        "    try:\n"
        "        call()\n"
        "    except resfuse.ResfuseError as exc:\n"
        "        print(exc)\n"
    )
    proc = _run(runtime_bin, "python", "-c", script)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(EXTRA in line for line in lines), proc.stdout


def _reference(graph: onnx.GraphProto) -> list[str]:
    """onnx's own walk over every tensor a graph holds: the external ones' names."""
    tensors = [
        *graph.initializer,
        *(t for s in graph.sparse_initializer for t in (s.values, s.indices)),
    ]
    found = [t.name for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]
    for node in graph.node:
        for attr in node.attribute:
            held = [attr.t] * attr.HasField("t") + list(attr.tensors)
            found += [t.name for t in held if t.data_location == onnx.TensorProto.EXTERNAL]
            for sub in [attr.g] * attr.HasField("g") + list(attr.graphs):
                found += _reference(sub)
    return found


def _external(name: str) -> onnx.TensorProto:
    tensor = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [2], [1.0, 2.0])
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights.bin")
    return tensor


def test_external_data_is_found_without_onnx_where_onnx_finds_it(exported, tmp_path: Path):
    """The wire-format reader (the base install's) against onnx's parse, on an artifact, on the
    same artifact saved with external data, and on tensors hidden in a subgraph's node attribute
    and a sparse initializer."""
    path = exported["masked"].onnx_path
    model = onnx.load(path)
    assert external_tensors(path.read_bytes()) == [] == _reference(model.graph)
    onnx.save_model(model, tmp_path / "x.onnx", save_as_external_data=True, size_threshold=0)
    saved = (tmp_path / "x.onnx").read_bytes()
    names = _reference(onnx.load_model_from_string(saved).graph)
    assert len(names) == len(model.graph.initializer) and external_tensors(saved) == names

    constant = onnx.helper.make_node("Constant", [], ["c"], value=_external("deep"))
    branch = onnx.helper.make_graph(
        [constant], "branch", [], [onnx.helper.make_tensor_value_info("c", 1, [2])]
    )
    cond = onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])
    out = onnx.helper.make_tensor_value_info("y", 1, [2])
    node = onnx.helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    sparse = onnx.helper.make_sparse_tensor(
        _external("values"), onnx.helper.make_tensor("i", 7, [2], [0, 1]), [4]
    )
    graph = onnx.helper.make_graph([node], "g", [cond], [out], sparse_initializer=[sparse])
    hidden = onnx.helper.make_model(graph)
    expected = _reference(hidden.graph)
    assert sorted(expected) == ["deep", "deep", "values"]
    assert sorted(external_tensors(hidden.SerializeToString())) == sorted(expected)


@pytest.mark.parametrize("cut", [1, 7, 1000])
def test_bytes_that_are_no_protobuf_are_refused(exported, cut: int) -> None:
    data = exported["masked"].onnx_path.read_bytes()
    for broken in (data[:cut], b"\xff" * 12, b"\x0f\x01"):
        with pytest.raises(WireError):
            external_tensors(broken)
