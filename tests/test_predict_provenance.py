"""resfuse-predict redoes stale outputs: a replaced input or another artifact is never resumed.

Each output's record names the artifact (ONNX sha256, preprocessing) and the input (size,
sha256) that made it; a rerun keeps only outputs whose record matches both as they are now.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image", reason="needs Pillow")

from resfuse.runtime import load  # noqa: E402
from resfuse.runtime.predict import predict, record_path  # noqa: E402

pytestmark = pytest.mark.slow  # Ray Data pipelines

SIZES = {"a.png": (40, 48), "b.png": (40, 48), "sub/c.tif": (36, 56), "sub/d.tif": (36, 56)}


def save_image(path: Path, size: tuple[int, int], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)  # TIFF uncompressed: same size, same byte count


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    for seed, (name, size) in enumerate(SIZES.items()):
        save_image(folder / name, size, seed)
    return folder


def assert_outputs_of(artifact: Path, folder: Path, out: Path) -> None:
    """Every output is what `artifact` gives for the image in `folder` now."""
    with load(artifact) as session:
        tolerance = session.manifest.tolerance
        for name in SIZES:
            got = np.load(out / f"{name}.npy", allow_pickle=False)
            expected = session.run(folder / name)
            np.testing.assert_allclose(got, expected, atol=tolerance.atol, rtol=tolerance.rtol)


def test_a_replaced_input_is_redone_even_with_its_size_and_mtime(
    exported, images: Path, tmp_path: Path
) -> None:
    artifact = exported["masked"].manifest_path
    out = tmp_path / "out"
    assert predict(artifact, images, out).done == 4

    replaced = images / "sub/d.tif"
    before = replaced.stat()
    save_image(replaced, SIZES["sub/d.tif"], seed=99)  # new pixels, same byte count
    os.utime(replaced, ns=(before.st_atime_ns, before.st_mtime_ns))  # as a copy with -p would
    assert replaced.stat().st_size == before.st_size
    kept = (out / "a.png.npy").stat().st_mtime_ns

    again = predict(artifact, images, out)
    assert (again.done, again.stale, again.skipped) == (1, 1, 3)
    assert again.describe().startswith("1 written (1 stale redone), 3 already done, 0 failed")
    assert (out / "a.png.npy").stat().st_mtime_ns == kept  # current outputs untouched
    assert_outputs_of(artifact, images, out)

    third = predict(artifact, images, out)
    assert (third.done, third.skipped) == (0, 4)
    assert third.describe().startswith("0 written, 4 already done")


def test_another_artifact_redoes_every_output(exported, images: Path, tmp_path: Path) -> None:
    first = exported["masked"].manifest_path
    other = next(result for method, result in exported.items() if method != "masked")
    out = tmp_path / "out"
    predict(first, images, out)

    switched = predict(other.manifest_path, images, out)
    assert (switched.done, switched.stale, switched.skipped) == (4, 4, 0)
    assert_outputs_of(other.manifest_path, images, out)
    record = json.loads(record_path(out / "a.png.npy").read_text())
    assert record["artifact"]["onnx_sha256"] == other.files["onnx"]["sha256"]

    back = predict(first, images, out)  # and back again: the records follow
    assert (back.done, back.stale) == (4, 4)
    assert_outputs_of(first, images, out)


def test_an_output_without_its_record_is_stale(exported, images: Path, tmp_path: Path) -> None:
    """An output of an older resfuse (no record), or one whose record is damaged, is redone;
    a missing output is written, not counted as stale."""
    artifact = exported["masked"].manifest_path
    out = tmp_path / "out"
    predict(artifact, images, out)
    record_path(out / "a.png.npy").unlink()
    record_path(out / "b.png.npy").write_text("{not json")
    (out / "sub/c.tif.npy").unlink()

    again = predict(artifact, images, out)
    assert (again.done, again.stale, again.skipped) == (3, 2, 1)
    assert sorted(p.name for p in out.rglob(".*.json")) == sorted(
        f".{Path(name).name}.npy.json" for name in SIZES
    )


def test_the_ray_pipeline_uses_the_same_records(exported, images: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray.data", reason="needs Ray Data: pip install 'resfuse[serve]'")
    import ray

    artifact = exported["masked"].manifest_path
    out = tmp_path / "out"
    predict(artifact, images, out)
    save_image(images / "b.png", SIZES["b.png"], seed=98)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        redone = predict(artifact, images, out, batch_size=2, use_ray=True)
    finally:
        ray.shutdown()
    assert (redone.done, redone.stale, redone.skipped) == (1, 1, 3)
    assert_outputs_of(artifact, images, out)
    assert predict(artifact, images, out).skipped == 4  # the actors wrote the records too
