"""DICOM SEG output (resfuse-predict --format seg) from a CT series of real slices and from one
DICOM file: valid by David Clunie's dciodvfy, read back by highdicom, by pydicom-seg (in a venv
of its own: it pins jsonschema < 4, which the dev set-up cannot take) and by plain pydicom +
numpy, its label map equal to resfuse's own mask (the NIfTI and PNG outputs) frame by frame at the
same ImagePositionPatient, its references resolving to the source instances."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom", reason="needs highdicom: pip install 'resfuse[dicom]'")
nib = pytest.importorskip("nibabel", reason="needs nibabel")
pydicom = pytest.importorskip("pydicom", reason="needs pydicom")

import pacs  # noqa: E402
from clirun import invoke  # noqa: E402
from dicom_series import CT_SLICE  # noqa: E402
from nibabel.testing import data_path  # noqa: E402

from resfuse.export.cli import main as export_main  # noqa: E402
from resfuse.runtime.serve_cli import predict_main  # noqa: E402

pytestmark = [
    pytest.mark.slow,  # a model export and several runs
    pytest.mark.skipif(not CT_SLICE.is_file(), reason="needs pydicom-data's slices"),
]
TOL_MM = 1e-3
_ARTIFACT: dict[str, Path] = {}


def varied_artifact(factory: pytest.TempPathFactory) -> Path:
    """tests/pacs.py's model with a varied mask, exported once for this module and
    tests/test_dicomweb.py (a module-level cache: both import this one module)."""
    if "head" not in _ARTIFACT:
        _ARTIFACT["head"] = pacs.varied_head(factory.mktemp("varied-head"))
    return _ARTIFACT["head"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return varied_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def outputs(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One series run three ways: BINARY SEG, FRACTIONAL SEG and the NIfTI mask."""
    root = tmp_path_factory.mktemp("seg")
    series = pacs.ct_series(root / "in" / "ct")
    made = {"series": series}
    for kind, args in {
        "binary": ["--format", "seg"],
        "fractional": ["--format", "seg", "--seg-type", "fractional"],
        "nifti": [],
    }.items():
        out = root / kind
        proc = invoke(predict_main, str(artifact), str(root / "in"), "--output", str(out),
                      "--series", *args)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (made[kind],) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return made


def sources(folder: Path) -> dict[str, object]:
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, sorted(folder.iterdir()))}


def frames_by_hand(path: Path) -> tuple[object, list[tuple[int, str, np.ndarray, np.ndarray]]]:
    """The SEG decoded with pydicom and numpy alone: per frame (segment number, referenced
    SOP Instance UID, ImagePositionPatient, pixels (0..1 for BINARY, stored values else))."""
    seg = pydicom.dcmread(path)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    frames = []
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, pixels, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        frames.append((number, str(ref), position, frame))
    return seg, frames


def label_map(frames: list, uids: list[str], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Class per pixel of each source instance from BINARY frames (absent frames: class 0)."""
    maps = {uid: np.zeros(shape, np.uint8) for uid in uids}
    for number, uid, _, pixels in frames:
        maps[uid][pixels > 0] = number
    return maps


def nifti_slices(path: Path, by_uid: dict[str, object]) -> dict[str, np.ndarray]:
    """resfuse's NIfTI mask, slice by slice, each matched to the source instance at the same
    ImagePositionPatient (the affine's voxel (0, 0, k), RAS turned to DICOM's LPS)."""
    image = nib.load(path)
    mask = np.asarray(image.dataobj)
    found = {}
    for k in range(mask.shape[2]):
        lps = (image.affine @ [0, 0, k, 1])[:3] * [-1, -1, 1]
        (uid,) = [
            u
            for u, ds in by_uid.items()
            if np.linalg.norm(np.asarray(ds.ImagePositionPatient, float) - lps) < TOL_MM
        ]
        found[uid] = mask[:, :, k]
    return found


def test_binary_seg_holds_resfuse_mask_at_the_same_positions(outputs: dict[str, Path]) -> None:
    by_uid = sources(outputs["series"])
    first = next(iter(by_uid.values()))
    seg, frames = frames_by_hand(outputs["binary"])
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    # references resolve to the source instances, each frame at its source's position
    for _, uid, position, _ in frames:
        np.testing.assert_allclose(position, by_uid[uid].ImagePositionPatient, atol=TOL_MM)
    (series_ref,) = seg.ReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == first.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in series_ref.ReferencedInstanceSequence} == set(
        by_uid
    )
    # copied: patient, study, frame of reference; new: series and instance
    for keyword in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "PatientName"):
        assert seg[keyword].value == first[keyword].value, keyword
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID and seg.SOPInstanceUID not in by_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["bone", "soft tissue"]
    assert seg.SeriesDescription.startswith("resfuse ") and "binary" in seg.SeriesDescription

    expected = nifti_slices(outputs["nifti"], by_uid)
    assert len({int(v) for m in expected.values() for v in np.unique(m)}) >= 2  # not constant
    ours = label_map(frames, list(by_uid), (int(seg.Rows), int(seg.Columns)))
    for uid in by_uid:
        np.testing.assert_array_equal(ours[uid], expected[uid])
    # empty frames left out: exactly one frame per (segment, slice) that holds it
    present = {(int(c), u) for u, m in expected.items() for c in np.unique(m) if c > 0}
    assert sorted((n, u) for n, u, _, _ in frames) == sorted(present)


def test_highdicom_reads_the_same_label_map(outputs: dict[str, Path]) -> None:
    import highdicom as hd

    by_uid = sources(outputs["series"])
    expected = nifti_slices(outputs["nifti"], by_uid)
    seg = hd.seg.segread(outputs["binary"])
    uids = list(by_uid)
    labels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True
    )
    for k, uid in enumerate(uids):
        np.testing.assert_array_equal(labels[k], expected[uid])


# pydicom-seg's reader, run in its own venv: the label volume, and where SimpleITK puts it
_PYDICOM_SEG = """
import json, sys
import numpy as np, pydicom, pydicom_seg
result = pydicom_seg.MultiClassReader().read(pydicom.dcmread(sys.argv[1]))
np.save(sys.argv[2], result.data)
image = result.image
print(json.dumps({"origin": image.GetOrigin(), "spacing": image.GetSpacing(),
                  "direction": image.GetDirection()}))
"""


@pytest.fixture(scope="module")
def pydicom_seg_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("pydicom-seg") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # 0.4.1, its last release, imports a module pydicom 3 no longer has
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "pydicom-seg==0.4.1",
                           "pydicom<3"], capture_output=True, text=True, timeout=900)  # fmt: skip
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"pydicom-seg could not be installed here: {last}")
    return python


def test_pydicom_seg_reads_the_same_label_map_at_the_same_positions(
    outputs: dict[str, Path], pydicom_seg_python: Path, tmp_path: Path
) -> None:
    """An independent reader (pydicom-seg, SimpleITK geometry): each plane of its label volume,
    placed by its origin, direction and spacing, is resfuse's mask of the source slice there;
    slices it leaves out (empty frames are omitted) are all background."""
    by_uid = sources(outputs["series"])
    expected = nifti_slices(outputs["nifti"], by_uid)
    labels_path = tmp_path / "labels.npy"
    proc = subprocess.run(
        [str(pydicom_seg_python), "-c", _PYDICOM_SEG, str(outputs["binary"]), str(labels_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    geometry = json.loads(proc.stdout.strip().splitlines()[-1])
    origin = np.asarray(geometry["origin"])
    normal = np.asarray(geometry["direction"]).reshape(3, 3)[:, 2]
    seen = set()
    for z, plane in enumerate(np.load(labels_path)):
        position = origin + normal * geometry["spacing"][2] * z
        (uid,) = [u for u, ds in by_uid.items() if _distance(ds, position) < 1e-2]
        np.testing.assert_array_equal(plane, expected[uid])
        seen.add(uid)
    assert seen and all(not expected[u].any() for u in set(by_uid) - seen)


def _distance(source: object, position: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(source.ImagePositionPatient, float) - position))  # type: ignore[attr-defined]


def test_fractional_seg_holds_each_class_probability(outputs: dict[str, Path]) -> None:
    by_uid = sources(outputs["series"])
    expected = nifti_slices(outputs["nifti"], by_uid)
    seg, frames = frames_by_hand(outputs["fractional"])
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    scale = float(seg.MaximumFractionalValue)
    shape = (int(seg.Rows), int(seg.Columns))
    probabilities = {uid: np.zeros((3, *shape)) for uid in by_uid}
    for number, uid, _, pixels in frames:
        probabilities[uid][number] = pixels / scale
    for uid, p in probabilities.items():
        assert p.min() >= 0 and p[1:].sum(axis=0).max() <= 1 + 2 / scale
        p[0] = 1 - p[1:].sum(axis=0)  # background's share: what the other classes leave
        agree = (p.argmax(axis=0) == expected[uid]).mean()
        assert agree > 0.99, f"{uid}: argmax of the probabilities agrees on {agree:.4f}"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dciodvfy (dicom3tools)")
@pytest.mark.parametrize("kind", ["binary", "fractional"])
def test_dciodvfy_finds_no_error(outputs: dict[str, Path], kind: str) -> None:
    proc = subprocess.run(
        ["dciodvfy", str(outputs[kind])], capture_output=True, text=True, timeout=60
    )
    report = proc.stdout + proc.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report
    assert "Segmentation" in report  # it recognised the IOD it checked


def test_single_dicom_file_seg_matches_its_png_mask(artifact: Path, tmp_path: Path) -> None:
    from PIL import Image

    series = pacs.ct_series(tmp_path / "ct", 1)
    (path,) = series.iterdir()
    source = path.rename(path.with_suffix(".dcm"))  # a file, not a series: found by its suffix
    made = {}
    fractional = ["--format", "seg", "--seg-type", "fractional"]
    for kind, args in {"seg": ["--format", "seg"], "fractional": fractional, "png": []}.items():
        proc = invoke(predict_main, str(artifact), str(series), "--output", str(tmp_path / kind),
                      *args)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (made[kind],) = [p for p in (tmp_path / kind).iterdir() if not p.name.startswith(".")]
    assert made["seg"].name == f"{source.name}.seg.dcm"
    seg, frames = frames_by_hand(made["seg"])
    uid = str(pydicom.dcmread(source).SOPInstanceUID)
    ours = label_map(frames, [uid], (int(seg.Rows), int(seg.Columns)))[uid]
    expected = np.asarray(Image.open(made["png"]))
    assert len(np.unique(expected)) >= 2
    np.testing.assert_array_equal(ours, expected)
    seg, frames = frames_by_hand(made["fractional"])
    p = np.zeros((3, *expected.shape))
    for number, _, _, pixels in frames:
        p[number] = pixels / float(seg.MaximumFractionalValue)
    p[0] = 1 - p[1:].sum(axis=0)
    assert (p.argmax(axis=0) == expected).mean() > 0.99


def test_what_cannot_become_a_seg_fails_in_one_line(artifact: Path, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "in"
    series = pacs.ct_series(folder / "noframe", 1)
    (path,) = series.iterdir()
    dataset = pydicom.dcmread(path)
    del dataset.FrameOfReferenceUID
    dataset.save_as(path.with_suffix(".dcm"))
    path.unlink()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "photo.png")
    shutil.copy(Path(data_path) / "anatomical.nii", folder / "head.nii")
    proc = invoke(predict_main, str(artifact), str(folder), "--output", str(tmp_path / "out"),
                  "--format", "seg")  # fmt: skip
    assert proc.returncode == 1
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 3, proc.stderr
    text = " ".join(proc.stderr.split())
    assert "photo.png is not DICOM, and a DICOM SEG must reference DICOM images" in text
    assert "head.nii is NIfTI, and a DICOM SEG must reference DICOM images" in text
    assert "has no FrameOfReferenceUID" in text
    assert "Traceback" not in proc.stderr


def test_a_rerun_skips_a_seg_and_redoes_it_for_another_type(artifact: Path, tmp_path: Path) -> None:
    pacs.ct_series(tmp_path / "in" / "ct", 2)
    out = tmp_path / "out"
    said = []
    for args in ([], [], ["--seg-type", "fractional"]):
        proc = invoke(predict_main, str(artifact), str(tmp_path / "in"), "--output", str(out),
                      "--series", "--format", "seg", *args)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        said.append(" ".join(proc.stdout.split()))
    assert said[0].startswith("1 written, 0 already done")
    assert said[1].startswith("0 written, 1 already done")
    assert said[2].startswith("1 written (1 stale redone), 0 already done")
    assert pydicom.dcmread(out / "ct.seg.dcm").SegmentationType == "FRACTIONAL"


def test_predict_options_that_do_not_fit_are_usage_errors(artifact: Path) -> None:
    cases = {
        ("in", "--output", "o", "--seg-type", "fractional"): "--seg-type shapes a DICOM SEG",
        (): "give INPUT_DIR and --output OUT_DIR, or --dicomweb URL --study UID",
        ("--study", "1.2"): "--dicomweb URL and --study UID go together",
        ("--dicomweb", "http://x/", "--study", "1.2", "in"): "drop INPUT_DIR and --output",
        ("in", "--output", "o", "--series-uid", "1.2"): "--series-uid picks series",
    }
    for args, message in cases.items():
        proc = invoke(predict_main, str(artifact), *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_class_names_must_name_each_class_once(tmp_path: Path) -> None:
    proc = invoke(export_main, "--method", "masked", "--num-classes", "3", "--class-names",
                  "background,tumour", "-o", str(tmp_path))  # fmt: skip
    assert proc.returncode == 1
    assert "--class-names gives 2 names and the model has 3 classes" in " ".join(
        proc.stderr.split()
    )
    assert not list(tmp_path.iterdir())


def test_the_server_answers_format_seg_with_the_same_seg(artifact: Path, tmp_path: Path) -> None:
    """resfuse-serve on Ray Serve: ?format=seg answers a DICOM body with its SEG
    (application/dicom), holding the mask resfuse-predict writes for the same file."""
    ray = pytest.importorskip("ray", reason="needs Ray Serve: pip install 'resfuse[serve]'")
    from test_serve import free_port, request, wait_healthy

    from resfuse.runtime.serve import ServeOptions, start, stop

    series = pacs.ct_series(tmp_path / "ct", 1)
    (path,) = series.iterdir()
    source = path.rename(path.with_suffix(".dcm"))
    proc = invoke(predict_main, str(artifact), str(series), "--output", str(tmp_path / "out"),
                  "--format", "seg")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _, expected = frames_by_hand(tmp_path / "out" / f"{source.name}.seg.dcm")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        options = ServeOptions(artifact, port=free_port())
        started = start(options)
        try:
            wait_healthy(options.url, 120)
            url = f"{options.url}/predict?format=seg"
            status, body = request(url, source.read_bytes(), "application/dicom")
            assert status == 200, body
            (tmp_path / "answer.dcm").write_bytes(body)
            seg, frames = frames_by_hand(tmp_path / "answer.dcm")
            assert seg.SegmentationType == "BINARY"
            assert [(n, u) for n, u, _, _ in frames] == [(n, u) for n, u, _, _ in expected]
            for (*_, ours), (*_, theirs) in zip(frames, expected, strict=True):
                np.testing.assert_array_equal(ours, theirs)
            status, body = request(url, b"\x89PNG\r\n\x1a\n" + b"x" * 64, "image/png")
            assert status == 415 and b"format=seg answers a DICOM image" in body
        finally:
            stop(started)
    finally:
        ray.shutdown()


def test_a_manifest_with_bad_class_names_is_refused(artifact: Path) -> None:
    import json

    from resfuse.errors import ManifestError
    from resfuse.schema import validate_manifest

    data = json.loads(artifact.read_text())
    assert data["class_names"] == ["background", "bone", "soft tissue"]
    validate_manifest(data, artifact)
    for bad in (["background", "bone"], ["a", "a", "b"], ["a", "", "b"], "a,b,c"):
        with pytest.raises(ManifestError, match="field 'class_names' must be 3 distinct names"):
            validate_manifest({**data, "class_names": bad}, artifact)
