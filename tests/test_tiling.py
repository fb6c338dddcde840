"""Tiled (sliding-window) inference: MONAI's scheme, on real photographs, through real backends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from skimage import data

from resfuse.compare import compare
from resfuse.errors import ConfigError, InputContractError
from resfuse.export.pipeline import ExportResult
from resfuse.images import pil
from resfuse.runtime import load
from resfuse.runtime.session import Session
from resfuse.runtime.tiling import Tiling, parse_tile, sliding_window, window_starts


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 512 x 512 RGB photograph, larger than the 3-class head artifact's 256 x 256."""
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    pil().fromarray(data.astronaut()).save(path)
    return path


@pytest.fixture(scope="module")
def head_session(head_artifact: Path) -> Session:
    return load(head_artifact, "onnxruntime")


def monai_reference(session: Session, x: np.ndarray, tiling: Tiling) -> np.ndarray:
    """MONAI's sliding window over the same predictor (the session, one call per tile batch)."""

    def predictor(tiles: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(session.run(tiles.numpy())))

    with torch.inference_mode():
        out = sliding_window_inference(
            torch.from_numpy(x),
            tiling.roi,
            tiling.batch,
            predictor,
            overlap=tiling.overlap,
            mode=tiling.blend,
            sigma_scale=tiling.sigma_scale,
        )
    return np.asarray(out)


@pytest.mark.parametrize(
    "tile,overlap,blend", [("auto", 0.25, "gaussian"), ((160, 224), 0.5, "constant")]
)
def test_tiled_output_equals_monai_on_the_same_predictor(
    head_session: Session, astronaut: Path, tile: str | tuple[int, int], overlap: float, blend: str
) -> None:
    x = head_session.preprocess(astronaut)
    tiling = head_session.tiling(tile, overlap, blend, align=1)
    ours = np.asarray(head_session.run(astronaut, tile=tile, overlap=overlap, blend=blend, align=1))
    assert ours.shape == (1, 3, 512, 512)
    np.testing.assert_allclose(ours, monai_reference(head_session, x, tiling), rtol=0, atol=1e-5)


def test_an_image_larger_than_the_range_runs_tiled_and_agrees_with_the_torch_original(
    head_artifact: Path, head_session: Session, astronaut: Path
) -> None:
    with pytest.raises(InputContractError, match="outside the allowed range.*tile"):
        head_session.run(astronaut)  # 512 > 256: whole, it has no path
    deployed = np.asarray(head_session.run(astronaut, tile="auto"))
    with load(head_artifact, "torch") as original:
        reference = np.asarray(original.run(astronaut, tile="auto"))
    stats = compare(reference, deployed, head_session.manifest.tolerance)
    assert stats.passed, stats
    agreement = (reference.argmax(1) == deployed.argmax(1)).mean()
    assert agreement > 0.99


def test_tiles_go_to_the_backend_in_batches_of_the_backend_limit(
    head_session: Session, astronaut: Path
) -> None:
    shapes: list[tuple[int, ...]] = []
    infer = head_session.runner.infer

    def recording(x: np.ndarray) -> np.ndarray:
        shapes.append(x.shape)
        return infer(x)

    head_session.runner.infer = recording  # type: ignore[method-assign]
    try:
        head_session.run(astronaut, tile="auto", overlap=0.25)
    finally:
        del head_session.runner.infer
    # 512 in 256 tiles at a 192 step: 3 x 3 = 9 tiles, at most 4 (the artifact's batch) a call
    assert [s[0] for s in shapes] == [4, 4, 1]
    assert all(s[2:] == (256, 256) for s in shapes)


@pytest.mark.parametrize("method", ["upsample", "spp"])
def test_tiled_fused_output_carries_the_exact_image_channels(
    exported: dict[str, ExportResult], method: str
) -> None:
    x = pil().fromarray(data.chelsea())  # a real 300 x 451 photograph
    with load(exported[method].manifest_path, "onnxruntime") as session:
        image = session.preprocess(x)
        out = np.asarray(session.run(image, tile=128, overlap=0.5))
    assert out.shape[2:] == image.shape[2:]
    assert np.array_equal(out[:, :3], image)


def test_an_image_below_the_minimum_is_padded_and_cropped_back(head_session: Session) -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 20, 45)).astype(np.float32)
    with pytest.raises(InputContractError, match="height 20"):
        head_session.run(x)
    assert np.asarray(head_session.run(x, tile=64)).shape == (1, 3, 20, 45)  # padded at the end
    tiling = head_session.tiling(64, align=1)
    out = np.asarray(head_session.run(x, tile=64, align=1))  # padded around, as MONAI pads
    np.testing.assert_allclose(out, monai_reference(head_session, x, tiling), rtol=0, atol=1e-5)


def test_a_torch_tensor_comes_back_as_a_tensor(head_session: Session) -> None:
    x = torch.rand(2, 3, 300, 270)
    out = head_session.run(x, tile=256)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 300, 270)
    alone = np.asarray(head_session.run(x[1:].numpy(), tile=256))
    np.testing.assert_array_equal(out[1:].numpy(), alone)  # images in a batch tile alone


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tile": 512}, r"tile 512x512 is outside the backend's H x W range 32\.\.256"),
        ({"tile": "auto", "overlap": 1.0}, r"overlap must be in \[0, 1\)"),
        ({"tile": "auto", "blend": "linear"}, "blend must be one of constant, gaussian"),
        ({"tile": "auto", "tile_batch": 9}, "9 tiles per call is outside"),
        ({"tile": (1, 2, 3)}, "tile must be 'auto', a size N or"),
    ],
)
def test_bad_tiling_is_one_line_naming_the_fix(
    head_session: Session, kwargs: dict[str, object], match: str
) -> None:
    x = np.zeros((1, 3, 300, 300), np.float32)
    with pytest.raises(ConfigError, match=match) as info:
        head_session.run(x, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_parse_tile() -> None:
    assert parse_tile("auto") == "auto"
    assert parse_tile("512") == (512, 512)
    assert parse_tile("512x768") == (512, 768)
    for bad in ("0", "512x", "big", "1x2x3"):
        with pytest.raises(ConfigError, match="--tile must be"):
            parse_tile(bad)


@given(size=st.integers(1, 700), roi=st.integers(1, 300), overlap=st.floats(0, 0.95))
def test_window_positions_are_monais(size: int, roi: int, overlap: float) -> None:
    size = max(size, roi)  # the image is padded to the ROI first
    slices = dense_patch_slices((size,), (roi,), (_step(size, roi, overlap),))
    expected = [s[0].start for s in slices]
    assert window_starts(size, roi, overlap) == sorted(set(expected))


@given(
    size=st.integers(1, 700),
    roi=st.integers(32, 300),
    overlap=st.floats(0, 0.95),
    align=st.sampled_from([8, 16, 32]),
)
def test_aligned_windows_start_on_the_grid_and_cover_the_image(
    size: int, roi: int, overlap: float, align: int
) -> None:
    size = max(size, roi)
    starts = window_starts(size, roi, overlap, align)
    assert all(s % align == 0 for s in starts) and starts[0] == 0
    assert all(b - a <= roi for a, b in zip(starts, starts[1:], strict=False))  # no gap
    assert size <= starts[-1] + roi < size + align  # reaches the end, past it by < align


def test_stride_aligned_tiles_stay_closer_to_the_whole_image_than_monais(
    exported: dict[str, ExportResult],
) -> None:
    """coffee is 400 x 600: MONAI's last windows start at 144 and 344, off resnet18's stride-32
    grid, and the features under them shift."""
    with load(exported["upsample"].manifest_path, "onnxruntime") as session:
        x = session.preprocess(pil().fromarray(data.coffee()))
        whole = np.asarray(session.run(x))[:, 3:]

        def distance(align: int | None) -> float:
            tiled = np.asarray(session.run(x, tile=256, align=align))[:, 3:]
            return float(np.linalg.norm(tiled - whole) / np.linalg.norm(whole))

        assert distance(None) < 0.5 * distance(1)


def _step(size: int, roi: int, overlap: float) -> int:
    return roi if roi == size else max(int(roi * (1 - overlap)), 1)


def test_every_pixel_is_covered_and_weights_blend_a_constant_to_itself() -> None:
    x = np.full((1, 1, 97, 131), 3.0, np.float32)
    out = sliding_window(lambda t: t * 2, x, Tiling((40, 50), 0.3, "gaussian", batch=5))
    np.testing.assert_allclose(out, 6.0, rtol=1e-6)


def test_resfuse_check_tiles_what_the_backend_cannot_take_whole(
    head_artifact: Path, astronaut: Path
) -> None:
    from click.testing import CliRunner

    from resfuse.runtime.cli import check_main

    folder = astronaut.parent
    whole = CliRunner().invoke(check_main, [str(head_artifact), "--images", str(folder)])
    assert whole.exit_code != 0 and "outside the allowed range" in whole.output
    args = [str(head_artifact), "--images", str(folder), "--shapes", "1x3x64x300"]
    tiled = CliRunner().invoke(check_main, [*args, "--tile", "auto", "--blend", "constant"])
    assert tiled.exit_code == 0, tiled.output
    assert "astronaut.png" in tiled.output and "1x3x64x300" in tiled.output
    bad = CliRunner().invoke(check_main, [*args, "--tile", "0"])
    assert bad.exit_code == 2 and "must be 'auto', a size N or HxW" in bad.output


def test_resfuse_predict_tiles_large_images_records_it_and_warns_of_clipping(
    head_artifact: Path, astronaut: Path, tmp_path: Path
) -> None:
    """A copy of the artifact whose manifest reads 8-bit images in [0, 100]: most of a photo
    clips, which predict says once per file."""
    import json
    import shutil

    from click.testing import CliRunner

    from resfuse.runtime.serve_cli import predict_main

    artifact = (
        Path(shutil.copytree(head_artifact.parent, tmp_path / "artifact")) / head_artifact.name
    )
    manifest = json.loads(artifact.read_text())
    manifest["preprocess"] = {**manifest["preprocess"], "range": [0, 100], "units": "rescaled"}
    artifact.write_text(json.dumps(manifest))
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(astronaut, images / "large.png")
    pil().fromarray(data.camera()[:64, :80]).save(images / "small.png")
    args = [str(artifact), str(images), "--output", str(tmp_path / "out"), "--batch-size", "4"]

    untiled = CliRunner().invoke(predict_main, args)
    assert untiled.exit_code == 1 and "512 is outside" in untiled.output
    tiled = CliRunner().invoke(predict_main, [*args, "--tile", "auto"])
    assert tiled.exit_code == 0, tiled.output
    assert "2 written" in tiled.output
    assert tiled.output.count("of pixels fall outside the intensity range") == 2
    mask = np.asarray(pil().open(tmp_path / "out" / "large.png.mask.png"))
    with load(artifact) as session:
        expected = np.asarray(session.run(images / "large.png", tile="auto"))
    np.testing.assert_array_equal(mask, expected[0].argmax(0))
    again = CliRunner().invoke(predict_main, [*args, "--tile", "auto"])
    assert "0 written" in again.output and "2 already done" in again.output
    other = CliRunner().invoke(predict_main, [*args, "--tile", "128"])
    assert "2 written (2 stale redone)" in other.output  # another tiling: another output


def test_resfuse_predict_refuses_volume_slices_thinner_than_the_model(
    head_artifact: Path, tmp_path: Path
) -> None:
    """anatomical.nii sliced along axis 0 gives 41 x 25 slices, across its acquisition plane
    and below the artifact's 32: refused naming --axis, tiles or not (padding them would feed
    the model mostly zeros); its own axis runs."""
    import shutil

    import nibabel
    from click.testing import CliRunner
    from nibabel.testing import data_path

    from resfuse.runtime.serve_cli import predict_main

    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(Path(data_path, "anatomical.nii"), scans / "a.nii")
    out = tmp_path / "out"
    args = [str(head_artifact), str(scans), "--output", str(out), "--batch-size", "4"]
    for tiling in ([], ["--tile", "auto"]):
        thin = CliRunner().invoke(predict_main, [*args, "--axis", "0", *tiling])
        assert thin.exit_code == 1 and "thinner than" in thin.output and "--axis" in thin.output
    tiled = CliRunner().invoke(predict_main, [*args, "--tile", "auto"])
    assert tiled.exit_code == 0, tiled.output
    mask = nibabel.load(out / "a.nii.mask.nii.gz")
    assert mask.shape == nibabel.load(scans / "a.nii").shape == (33, 41, 25)


def test_an_absurd_tile_count_is_refused_with_the_count(head_session: Session) -> None:
    """An overlap near 1 would run for hours: refused before the first tile, the count said
    with what a usual overlap would take."""
    calls: list[int] = []
    x = np.zeros((1, 3, 600, 600), np.float32)
    tiling = Tiling((32, 32), overlap=0.99)
    with pytest.raises(ConfigError, match=r"takes 323,761 tiles, over the limit of 10,000"):
        sliding_window(lambda tiles: calls.append(len(tiles)) or tiles, x, tiling)
    assert calls == []
    with pytest.raises(ConfigError, match="lower the overlap"):
        head_session.run(x, tile=32, overlap=0.99, align=1)
