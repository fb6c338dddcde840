"""resfuse-optimize: the choice and the Pareto front on made-up measurements with a known answer,
then the whole command on a small model and real photographs, its report in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from clirun import invoke

from resfuse.export.optimize import Candidate, Constraints, _choose, _judge
from resfuse.export.optimize_cli import main as optimize_main
from resfuse.export.pipeline import ExportOptions, export_artifact
from resfuse.export.report import pareto, serving_ms
from resfuse.models import ModelConfig

SERVING = ["1x1x64x64", "1x1x128x128"]


def _candidate(name: str, ms: tuple[float, float], passed: bool, **check: object) -> Candidate:
    c = Candidate(f"/a/{name}.json", name, "onnxruntime", "float32")
    c.latency_ms = dict(zip(SERVING, ms, strict=True))
    c.check = {"passed": passed, "rel_l2": 0.01, **check}
    return c


def test_the_choice_is_the_fastest_candidate_that_passes_every_gate_and_constraint() -> None:
    fast_failing = _candidate("int8-bad", (1.0, 2.0), False)
    fast = _candidate("int8", (2.0, 4.0), True, agreement=0.995, dice={"0": 0.99, "1": 0.97})
    slow = _candidate("fp32", (5.0, 9.0), True, agreement=1.0, dice={"0": 1.0, "1": 1.0})
    for c in (fast_failing, fast, slow):
        _judge(c, Constraints(), SERVING)
    assert _choose([fast_failing, fast, slow], SERVING) is fast
    assert serving_ms(fast, SERVING) == 3.0 and fast_failing.reasons

    for c in (fast, slow):  # a Dice drop of 0.03 is over 0.02: the slower one is chosen
        _judge(c, Constraints(max_dice_drop=0.02), SERVING)
    assert _choose([fast, slow], SERVING) is slow and "Dice drop 0.0300 > 0.02" in fast.reasons

    for c in (fast, slow):  # 9 ms at the largest shape is over an 8 ms budget
        _judge(c, Constraints(latency_budget_ms=8.0), SERVING)
    assert _choose([fast, slow], SERVING) is fast and "budget 8" in slow.reasons[0]
    _judge(fast, Constraints(min_agreement=0.999), SERVING)
    assert not fast.passed and _choose([fast_failing, fast], SERVING) is None


def test_untimed_engine_candidates_choose_the_narrowest_precision_that_passes() -> None:
    from resfuse.export.optimize import split_targets

    assert split_targets("cpu,tensorrt-rtx:8.9,12.0,openvino") == [
        "cpu", "tensorrt-rtx:8.9,12.0", "openvino"
    ]  # fmt: skip
    wide, narrow = (Candidate(f"/a/{n}.json", n, "tensorrt-rtx", p, judged_on="onnxruntime")
                    for n, p in (("fp32", "float32"), ("fp16", "float16")))  # fmt: skip
    for c, passed in ((wide, True), (narrow, True)):
        c.check = {"passed": passed, "rel_l2": 0.0}
        _judge(c, Constraints(latency_budget_ms=1.0), SERVING)  # untimed: no budget to judge
    assert wide.passed and _choose([wide, narrow], SERVING) is narrow
    narrow.check["passed"] = False
    _judge(narrow, Constraints(), SERVING)
    assert _choose([wide, narrow], SERVING) is wide


def test_a_dice_drop_against_ground_truth_is_judged_from_the_originals() -> None:
    original = _candidate("torch", (9.0, 9.0), True, truth_dice={"0": 0.9, "1": 0.6})
    fine = _candidate("int8", (1.0, 1.0), True, truth_dice={"0": 0.89, "1": 0.595})
    worse = _candidate("int8b", (1.0, 1.0), True, truth_dice={"0": 0.9, "1": 0.55})
    for c in (fine, worse):
        _judge(c, Constraints(max_dice_drop=0.02), SERVING, original)
    assert fine.passed and not worse.passed
    assert "Dice against the masks drops 0.0500 > 0.02" in worse.reasons[0]


def test_an_image_without_its_mask_is_one_line(tmp_path: Path) -> None:
    from resfuse.errors import ConfigError
    from resfuse.export.optimize import _truths

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no mask for .*a.png under --masks .*expected a.png"):
        _truths([tmp_path / "images" / "a.png"], tmp_path / "images", tmp_path / "masks")


def test_the_pareto_front_keeps_what_nothing_beats_on_both() -> None:
    points = [(10.0, 0.0), (5.0, 0.02), (6.0, 0.03), (2.0, 0.2), (2.5, 0.2), (20.0, 0.0)]
    assert pareto(points) == [3, 1, 0]  # by latency: 2 ms, 5 ms, 10 ms
    assert pareto([(1.0, 1.0)]) == [0]


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, object]:
    """A small 1-channel model with a 3-class head and five real grayscale photographs, run
    through the command once (and a second time, reusing everything)."""
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("optimize")
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("camera", "coins", "moon", "page", "text"):
        photo = getattr(data, name)()
        Image.fromarray(photo).save(images / f"{name}.png")
        # a ground truth of three intensity bands: dark, middle, bright
        Image.fromarray(np.digitize(photo, [85, 170]).astype(np.uint8)).save(masks / f"{name}.png")
    config = ModelConfig("masked", stage=3, in_channels=1, num_classes=3, features=16)
    source = export_artifact(config, root / "art", ExportOptions(max_size=256, max_batch=2))
    args = [str(source.manifest_path), "--images", str(images), "--masks", str(masks)]
    args += ["--shapes", "1x1x128x128", "--targets", "cpu,tensorrt-rtx:8.9,12.0"]
    args += ["--sweep", "64,128", "--rounds", "2", "--iters", "2", "-o", str(root / "out")]
    first = invoke(optimize_main, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    again = invoke(optimize_main, *args)
    assert again.returncode == 0, again.stderr
    return root / "out", json.loads((root / "out" / "report.json").read_text()), again


@pytest.mark.slow
def test_the_command_chooses_the_fastest_passing_candidate_by_its_own_numbers(optimized) -> None:
    out, report, _ = optimized
    candidates = [c for c in report["candidates"] if "cpu" in c["targets"]]
    assert {c["precision"] for c in candidates} == {"float32", "int8"}
    passing = [c for c in candidates if c["passed"]]
    expected = min(passing, key=lambda c: serving_ms(c, report["shapes"]))
    assert report["chosen"]["cpu"]["candidate"] == expected["candidate"]
    for c in candidates:
        assert c["passed"] == (not c["reasons"]) and c["check"]["inputs"] == 5  # the images
        if c["candidate"] != expected["candidate"]:
            assert c["candidate"] in report["why_not"]["cpu"]
    deployed = out / "deploy" / "cpu"
    manifest = Path(expected["artifact"]).name
    assert (deployed / manifest).is_file() and (deployed / "run.py").is_file()
    assert (deployed / "triton" / Path(manifest).stem / "config.pbtxt").is_file()
    assert report["machine"]["cpu_flags"]
    # Dice against the ground-truth masks, for the original and every candidate
    assert set(report["original_truth_dice"]) <= {"0", "1", "2"} and report["original_truth_dice"]
    assert all(0 <= d <= 1 for c in report["candidates"] for d in c["check"]["truth_dice"].values())
    page = (out / "report.html").read_text()
    assert "min Dice vs masks" in page


@pytest.mark.slow
def test_an_rtx_target_gets_engines_for_its_gpus_judged_on_their_graphs(optimized) -> None:
    """TensorRT-RTX engines are built here for the named GPUs; no RTX GPU runs them here, so
    each variant is judged on its ONNX graph, untimed, and the narrowest that passes is chosen
    and deployed with its engine."""
    out, report, _ = optimized
    target = "tensorrt-rtx:8.9,12.0"
    rtx = [c for c in report["candidates"] if target in c["targets"]]
    assert {c["precision"] for c in rtx} == {"float32", "float16"}
    for c in rtx:
        assert c["judged_on"] == "onnxruntime" and not c["latency_ms"]
        engine = json.loads(Path(c["engine"]).read_text())
        assert engine["environment"]["compute_capability"] == "8.9,12.0"
    passing = [c for c in rtx if c["passed"]]
    narrowest = next((c for c in passing if c["precision"] == "float16"), passing[0])
    assert report["chosen"][target]["candidate"] == narrowest["candidate"]
    deployed = out / "deploy" / "tensorrt-rtx"
    assert list((deployed / "engines").glob("*.plan"))
    assert "flavour='tensorrt-rtx'" in (deployed / "run.py").read_text()
    assert not (deployed / "triton").exists()  # Triton runs TensorRT plans, not RTX's
    assert "not timed" in (out / "report.html").read_text()


@pytest.mark.slow
def test_a_rerun_reuses_every_variant_check_engine_and_timing(optimized) -> None:
    out, report, again = optimized
    assert "reused" in again.stdout
    engines = [r for r in report["reused"] if r.startswith("engine:")]
    assert len(engines) == 2
    # every check, every score against the masks, the one timing and each timed one's memory
    checks = len(report["reused"]) - len(engines)
    timed = [c for c in report["candidates"] if c["latency_ms"]]
    assert checks == 2 * len(report["candidates"]) + 2 + len(timed)
    assert len(list((out / "cache").glob("*.json"))) < checks  # the RTX fp32 check is cpu's


@pytest.mark.slow
def test_the_report_is_self_contained_and_shows_the_reports_numbers(optimized) -> None:
    out, report, _ = optimized
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 4 and "<script" not in page
    # nothing fetched: no remote src/href, no CSS url() but the SVG's own #clip-paths
    assert not re.findall(r"(?:src|href)=['\"]https?://|url\((?!#)|@import", page)
    # and nothing can be, wherever it is opened: the page forbids every fetch
    assert "http-equiv='Content-Security-Policy' content=\"default-src 'none';" in page
    for c in report["candidates"]:  # the table is the report's numbers
        for ms in c["latency_ms"].values():
            assert f"<td>{ms:.2f}</td>" in page
        assert re.search(rf"id=\"c-{re.escape(_gid(c))}", page)  # each plotted by its id


def _gid(candidate: dict) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in candidate["candidate"])


@pytest.mark.slow
def test_the_plots_read_back_the_reports_numbers(optimized) -> None:
    """Every marker and bar, read back through its axis' tick labels, is report.json's value:
    latency against size, accuracy against latency (for what was timed), Dice per class."""
    from svgplot import Axes, figures

    out, report, _ = optimized
    plots = figures((out / "report.html").read_text())
    latency, accuracy = plots["Latency against input size"], plots["Accuracy against latency"]
    dice = plots["Per-class Dice against the PyTorch original"]
    memory = next(plot for title, plot in plots.items() if title.startswith("Peak memory"))
    for c in report["candidates"]:
        series = f"c-{_gid(c)}"
        classes = sorted(c["check"]["dice"], key=int)
        heights = Axes(dice).bars(dice, series)
        assert heights == pytest.approx([c["check"]["dice"][k] for k in classes], abs=2e-3)
        if not c["latency_ms"]:
            continue  # an RTX engine's candidate: untimed here, plotted only by its Dice
        want = [(_pixels(s), c["latency_ms"][s]) for s in report["sweep"]]
        _close(Axes(latency).points(latency, series), want)
        agreement = c["check"]["agreement"]
        _close(Axes(accuracy).points(accuracy, series),
               [(serving_ms(c, report["shapes"]), 1 - agreement)])  # fmt: skip
        bars = Axes(memory).bars(memory, series)
        assert bars == pytest.approx([c["memory_mib"]["process"], c["memory_mib"]["model"]],
                                     rel=1e-3)  # fmt: skip
        assert 0 <= c["memory_mib"]["model"] < c["memory_mib"]["process"]


def _pixels(shape: str) -> int:
    return int(shape.split("x")[2]) * int(shape.split("x")[3])


def _close(read: list[tuple[float, float]], want: list[tuple[float, float]]) -> None:
    """Equal within what an SVG's 1e-6 px precision and a ~300 px axis can tell apart."""
    assert len(read) == len(want), (read, want)
    for (x, y), (wx, wy) in zip(read, want, strict=True):
        assert x == pytest.approx(wx, rel=1e-3, abs=1e-6)
        assert y == pytest.approx(wy, rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_the_report_renders_in_a_real_browser_without_the_network(optimized, tmp_path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    out, _, _ = optimized
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,2400",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
         f"--screenshot={shot}", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file(), proc.stderr
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert len(np.unique(pixels)) > 20 and pixels.std() > 5  # text and plots, not a blank page


@pytest.mark.slow
def test_a_variant_is_reused_only_when_made_from_the_same_weights_and_images(optimized) -> None:
    from resfuse.export.optimize import _made_from_path, _reusable

    out, report, _ = optimized
    int8 = next(Path(c["artifact"]) for c in report["candidates"] if c["precision"] == "int8")
    recorded = _made_from_path(int8).read_text()
    name = int8.stem.removesuffix("-mixed")
    assert _reusable(out / "artifacts", name, recorded) == int8
    weights, images = recorded.split(" ")
    assert _reusable(out / "artifacts", name, f"{weights} {'0' * len(images)}") is None
    assert report["failed_variants"] == {}


@pytest.mark.slow  # the fp16 fixture is an export of its own
def test_bad_inputs_are_refused_in_one_line(exported, fp16, tmp_path: Path) -> None:
    """Before any work: a target it cannot time, a folder that is not there, a variant given
    where the float32 artifact is wanted."""
    path = str(exported["masked"].manifest_path)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    cases = [
        ([path, "--images", str(tmp_path / "none")], "--images"),
        ([path, "--images", str(images), "--targets", "tensorrt"], "target tensorrt needs"),
        ([path, "--images", str(images), "--targets", "tensorrt-rtx:9.0"], "capability 9.0"),
        ([path, "--images", str(images), "--targets", "cpu:8.9"], "takes no GPUs"),
        ([path, "--images", str(images), "--sweep", "a,b"], "--sweep takes square sides"),
        ([str(fp16["masked"]), "--images", str(images)], "pass the float32 manifest"),
    ]
    for args, text in cases:
        proc = invoke(optimize_main, *args, "-o", str(tmp_path / "out"))
        assert proc.returncode != 0 and text in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow  # one small export, then found again
def test_it_starts_from_a_checkpoint_and_reuses_that_export(tmp_path: Path) -> None:
    import torch

    from resfuse.export.optimize import from_checkpoint
    from resfuse.models import build_model
    from resfuse.weights import save_weights

    config = ModelConfig("masked", stage=2, in_channels=1, num_classes=2, features=8)
    torch.manual_seed(1)
    save_weights(build_model(**config.to_dict(), pretrained=False), tmp_path / "w.safetensors")
    heard: list[str] = []
    made = from_checkpoint(config, tmp_path / "art", tmp_path / "w.safetensors",
                           ("background", "lesion"), heard.append)  # fmt: skip
    manifest = json.loads(made.read_text())
    assert (
        manifest["class_names"] == ["background", "lesion"] and manifest["precision"] == "float32"
    )
    again = from_checkpoint(config, tmp_path / "art", tmp_path / "w.safetensors",
                            ("background", "lesion"), heard.append)  # fmt: skip
    assert again == made and heard[-1] == f"reusing {made.name}"
    other = from_checkpoint(config, tmp_path / "art", tmp_path / "w.safetensors",
                            ("background", "tumour"), heard.append)  # fmt: skip
    assert heard[-1] != f"reusing {made.name}"  # other names: exported again
    assert json.loads(other.read_text())["class_names"] == ["background", "tumour"]


def test_a_checkpoint_or_an_artifact_not_both_nor_neither(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    cases = [
        (["--images", str(images)], "give a float32 ARTIFACT, or --method"),
        (["a.json", "--backbone", "resnet34", "--images", str(images)], "--backbone defines"),
        (["a.json", "--method", "masked", "--images", str(images)], "--method defines"),
        (["--method", "masked", "--weights", str(tmp_path / "no.pt"), "--images", str(images)],
         "is not a file"),
    ]  # fmt: skip
    for args, text in cases:
        proc = invoke(optimize_main, *args, "-o", str(tmp_path / "out"))
        assert proc.returncode != 0 and text in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
