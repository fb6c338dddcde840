"""resfuse-predict on real folders: local and as a Ray Data pipeline, resumable, failures kept."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image", reason="needs Pillow")

from resfuse.errors import ConfigError  # noqa: E402
from resfuse.runtime import load  # noqa: E402
from resfuse.runtime.predict import MASK_SUFFIX, Summary, predict  # noqa: E402

pytestmark = pytest.mark.slow  # Ray Data pipelines

SIZES = {"a.png": (48, 64), "b.jpg": (48, 64), "sub/c.png": (40, 72), "sub/deep/d.tif": (40, 72)}
CORRUPT = "sub/broken.png"
TOO_SMALL = "sub/small.png"  # below the contract's 32 pixels: fails alone, not its batch


def write_images(folder: Path) -> list[str]:
    """Two sizes, three formats, nested folders, a corrupt file and one too small; returns
    the good ones."""
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    (folder / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(np.zeros((20, 72, 3), np.uint8)).save(folder / TOO_SMALL)
    (folder / "notes.txt").write_text("not an image: ignored")
    return list(SIZES)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    write_images(folder)
    return folder


def assert_two_failures(summary: Summary) -> None:
    reasons = {Path(source).name: reason for source, reason in summary.failures}
    assert sorted(reasons) == ["broken.png", "small.png"]
    assert "cannot read" in reasons["broken.png"]
    assert "height 20 is outside the allowed range" in reasons["small.png"]


def assert_matches_runtime(artifact: Path, folder: Path, out: Path) -> None:
    with load(artifact) as session:
        tolerance = session.manifest.tolerance
        for name in SIZES:
            got = np.load(out / f"{name}.npy", allow_pickle=False)
            expected = session.run(folder / name)
            np.testing.assert_allclose(got, expected, atol=tolerance.atol, rtol=tolerance.rtol)


def test_local_run_resumes_and_reports_the_corrupt_file(exported, images: Path, tmp_path: Path):
    artifact = exported["masked"].manifest_path
    out = tmp_path / "out"
    summary = predict(artifact, images, out, batch_size=2)
    assert (summary.total, summary.done, summary.skipped) == (6, 4, 0)
    assert_two_failures(summary)
    assert_matches_runtime(artifact, images, out)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    outputs = [Path(f"{name}.npy") for name in SIZES]
    records = [p.with_name(f".{p.name}.json") for p in outputs]  # what made each output
    assert written == sorted(str(p) for p in outputs + records)  # no temporaries left

    again = predict(artifact, images, out, batch_size=2)
    assert (again.done, again.skipped, len(again.failures)) == (0, 4, 2)

    (out / "sub/c.png.npy").unlink()
    before = (out / "a.png.npy").stat().st_mtime_ns
    third = predict(artifact, images, out, batch_size=2)
    assert (third.done, third.skipped) == (1, 3)
    assert (out / "a.png.npy").stat().st_mtime_ns == before  # complete outputs untouched
    assert_matches_runtime(artifact, images, out)


def test_ray_data_pipeline_matches_the_runtime(exported, images: Path, tmp_path: Path):
    pytest.importorskip("ray.data", reason="needs Ray Data: pip install 'resfuse[serve]'")
    nib = pytest.importorskip("nibabel", reason="needs nibabel")
    import ray
    from nibabel.testing import data_path

    from resfuse.runtime import predict_volume, read_volume

    artifact = exported["masked"].manifest_path
    out = tmp_path / "out"
    volume = images / "mr" / "anat.nii"  # a volume among the images: the actors run it too
    volume.parent.mkdir()
    volume.write_bytes(Path(data_path, "anatomical.nii").read_bytes())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = predict(artifact, images, out, batch_size=3, use_ray=True)
        assert (summary.total, summary.done, summary.skipped) == (7, 5, 0)
        assert_two_failures(summary)
        assert_matches_runtime(artifact, images, out)
        (out / "b.jpg.npy").unlink()
        again = predict(artifact, images, out, batch_size=3, use_ray=True)
        assert (again.done, again.skipped, len(again.failures)) == (1, 4, 2)
    finally:
        ray.shutdown()
    assert_matches_runtime(artifact, images, out)
    with load(artifact) as session:
        expected = predict_volume(session, read_volume(volume))
        tolerance = session.manifest.tolerance
    got = np.asarray(nib.load(out / "mr" / "anat.nii.nii.gz").dataobj)
    np.testing.assert_allclose(got, expected, atol=tolerance.atol, rtol=tolerance.rtol)


def test_a_head_writes_masks_through_the_command(head_artifact: Path, images: Path, tmp_path: Path):
    artifact = head_artifact
    out = tmp_path / "masks"
    exe = Path(sys.executable).with_name("resfuse-predict")
    args = [str(exe), str(artifact), str(images), "--output", str(out), "--batch-size", "4"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # one image failed; the rest are written
    assert "Traceback" not in proc.stderr
    assert CORRUPT in proc.stderr and TOO_SMALL in proc.stderr
    assert "2 of 6 images failed" in proc.stderr
    assert "4 written, 0 already done, 2 failed, of 6 images" in proc.stdout
    with load(artifact) as session:
        for name, (h, w) in SIZES.items():
            mask = np.asarray(Image.open(out / f"{name}{MASK_SUFFIX}"))
            assert mask.shape == (h, w)
            expected = session.run(images / name)[0].argmax(axis=0)
            np.testing.assert_array_equal(mask, expected)


def test_bad_options_fail_before_any_work(exported, images: Path, tmp_path: Path):
    artifact = exported["masked"].manifest_path
    with pytest.raises(ConfigError, match="--batch-size 64 is outside"):
        predict(artifact, images, tmp_path / "out", batch_size=64)
    with pytest.raises(ConfigError, match="is inside INPUT_DIR"):
        predict(artifact, images, images / "out")
    with pytest.raises(ConfigError, match="is not a folder"):
        predict(artifact, tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ConfigError, match="--address needs --ray"):
        predict(artifact, images, tmp_path / "out", address="auto")
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_is_a_failure_not_an_abort(exported, images: Path, tmp_path: Path):
    """A file where an output folder must go: that image fails, the others are written."""
    artifact = exported["masked"].manifest_path
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub/deep").write_bytes(b"a file where a folder must go")
    summary = predict(artifact, images, out)
    assert (summary.done, summary.skipped) == (3, 0)
    blocked = [reason for source, reason in summary.failures if source.endswith("d.tif")]
    assert len(blocked) == 1 and "cannot write" in blocked[0]
    assert np.load(io.BytesIO((out / "sub/c.png.npy").read_bytes())).shape[-2:] == (40, 72)
