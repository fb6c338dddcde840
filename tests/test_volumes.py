"""Volumes on real files: nibabel's NIfTI samples and pydicom's CT and MR series, run slice by
slice through real exports, written back on the input's grid with its affine."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel", reason="needs nibabel")
pydicom = pytest.importorskip("pydicom", reason="needs pydicom")

from nibabel.testing import data_path  # noqa: E402

from resfuse.errors import ConfigError, InputContractError  # noqa: E402
from resfuse.export.pipeline import ExportOptions, export_artifact  # noqa: E402
from resfuse.images import read_pixels  # noqa: E402
from resfuse.models import ModelConfig  # noqa: E402
from resfuse.runtime import load, predict_volume, read_volume, write_nifti  # noqa: E402
from resfuse.runtime.predict import predict, record_path  # noqa: E402
from resfuse.runtime.volumes import nifti_bytes, slice_axis, slice_plane  # noqa: E402

NIFTI = Path(data_path)
ANATOMICAL = NIFTI / "anatomical.nii"  # 33x41x25 int16, LAS
REORIENTED = NIFTI / "reoriented_anat_moved.nii"  # 21x26x22 float32, RAS, moved
FOUR_D = NIFTI / "example4d.nii.gz"  # 128x96x24x2
DICOMDIR_TESTS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
CT5N = DICOMDIR_TESTS / "98892001" / "CT5N"  # 5 axial CT slices, 2.5 mm apart, one series
CT2 = DICOMDIR_TESTS / "77654033" / "CT2"  # 4 CT slices, gaps 202.5 and 1.25 mm
MR700 = DICOMDIR_TESTS / "98892003" / "MR700"  # 7 MR slices, each rotated: a radial set
MR1 = DICOMDIR_TESTS / "98892003" / "MR1"  # 3 files, each of its own series
INT16 = (-32768.0, 32767.0)  # the "dtype" rule's range of anatomical.nii
CT_RANGE = (-32768.0 - 1024, 32767.0 - 1024)  # CT5N: signed 16 bits, rescaled by -1024


@pytest.fixture(scope="module")
def gray_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small 1-channel model without a head at stride 8, so 16-pixel DICOM slices fit; the
    default intensity rule, "dtype"."""
    folder = tmp_path_factory.mktemp("gray-artifact")
    config = ModelConfig("upsample", stage=2, in_channels=1, features=8)
    options = ExportOptions(min_size=16, max_size=128, max_batch=4)
    return export_artifact(config, folder, options).manifest_path


def slice_input(values: np.ndarray, value_range: tuple[float, float], manifest: dict) -> np.ndarray:
    """One 2D slice as the model input the manifest describes, computed here by hand: the
    range to [0, 1] (clipped), then (x - mean) / std; 1 x 1 x H x W."""
    assert manifest["preprocess"]["range"] == "dtype"
    low, high = value_range
    x = np.clip((values.astype(np.float64) - low) / (high - low), 0, 1).astype(np.float32)
    x = (x - np.float32(manifest["preprocess"]["mean"][0])) / np.float32(
        manifest["preprocess"]["std"][0]
    )
    return x[None, None]


def read_nifti(data: bytes) -> object:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


# NIfTI in, NIfTI out


def test_a_mask_keeps_the_affine_shape_and_header_codes(head_artifact: Path, tmp_path: Path):
    volume = read_volume(ANATOMICAL)
    with load(head_artifact) as session:
        mask = predict_volume(session, volume)
    assert mask.shape == (33, 41, 25) and mask.dtype == np.uint8
    write_nifti(tmp_path / "mask.nii.gz", volume, mask)
    source, written = nib.load(ANATOMICAL), nib.load(tmp_path / "mask.nii.gz")
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    for code in ("sform_code", "qform_code"):
        assert written.header[code] == source.header[code]
    assert written.get_data_dtype() == np.uint8
    assert written.dataobj.slope == 1 and written.dataobj.inter == 0  # classes, not rescaled
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), mask)


def test_each_mask_slice_is_that_slice_run_alone(head_artifact: Path):
    """Each slice as the model sees it (LAS stored: transposed and flipped to the radiological
    display), its mask turned back onto the stored slice."""
    volume = read_volume(ANATOMICAL)
    plane = slice_plane(volume, 2)
    assert plane.transpose and plane.flip_rows and not plane.flip_columns
    with load(head_artifact) as session:
        mask = predict_volume(session, volume)
        for k in range(volume.data.shape[2]):
            x = plane.to_model(_three_channels(volume, k, session.manifest.data))
            alone = np.asarray(session.run(np.ascontiguousarray(x)))[0].argmax(axis=0)
            np.testing.assert_array_equal(mask[:, :, k], plane.to_stored(alone))


def _three_channels(volume, k: int, manifest: dict) -> np.ndarray:
    """Slice k of an int16 volume by the "dtype" rule (the int16 range), repeated to 3."""
    x = ((volume.data[:, :, k].astype(np.float64) + 32768) / 65535).astype(np.float32)
    mean = np.asarray(manifest["preprocess"]["mean"], np.float32)[:, None, None]
    std = np.asarray(manifest["preprocess"]["std"], np.float32)[:, None, None]
    return ((np.stack([x] * 3) - mean) / std)[None]


def test_each_fused_slice_is_that_slice_run_alone(gray_artifact: Path):
    volume = read_volume(ANATOMICAL)
    with load(gray_artifact) as session:
        fused = predict_volume(session, volume)
        assert fused.shape == (33, 41, 25, 9) and fused.dtype == np.float32
        plane = slice_plane(volume, 2)
        for k in range(volume.data.shape[2]):
            x = plane.to_model(slice_input(volume.data[:, :, k], INT16, session.manifest.data))
            alone = plane.to_stored(session.run(np.ascontiguousarray(x)))
            np.testing.assert_allclose(fused[:, :, k], alone[0].transpose(1, 2, 0), atol=1e-5)
        picked = predict_volume(session, volume, channels=[8, 0])
    np.testing.assert_array_equal(picked, fused[..., [8, 0]])


def test_the_slice_axis_follows_the_header_and_is_put_back(gray_artifact: Path, tmp_path: Path):
    """The same voxels stored superior-axis first, the header's slice_dim saying so: the model
    sees the same images (the same plane, the same display orientation), and the output comes
    back in the file's own axis order."""
    source = nib.load(ANATOMICAL)
    permuted = nib.Nifti1Image(
        np.asanyarray(source.dataobj).transpose(2, 0, 1), source.affine[:, [2, 0, 1, 3]]
    )
    permuted.header.set_dim_info(slice=0)
    nib.save(permuted, tmp_path / "s-first.nii.gz")
    original, moved = read_volume(ANATOMICAL), read_volume(tmp_path / "s-first.nii.gz")
    assert (slice_axis(original), slice_axis(moved)) == (2, 0)
    with load(gray_artifact) as session:
        expected = predict_volume(session, original)
        got = predict_volume(session, moved)
    assert got.shape == (25, 33, 41, 9)
    np.testing.assert_allclose(got, expected.transpose(2, 0, 1, 3), atol=1e-5)
    written = read_nifti(nifti_bytes(moved, got))
    np.testing.assert_array_equal(written.affine, permuted.affine)


def test_the_reoriented_sample_keeps_its_orientation(gray_artifact: Path, tmp_path: Path):
    volume = read_volume(REORIENTED)
    assert slice_axis(volume) == 2 and volume.full_range is None  # float32 values
    with load(gray_artifact) as session:
        with pytest.raises(InputContractError, match="outside the 0..1"):  # "dtype" on floats
            predict_volume(session, volume)
        volume = replace(volume, data=volume.data / volume.data.max())
        fused = predict_volume(session, volume, channels=[1])
    assert fused.shape == (21, 26, 22, 1)
    write_nifti(tmp_path / "out.nii.gz", volume, fused)
    source, written = nib.load(REORIENTED), nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(written.affine, source.affine)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine) == ("R", "A", "S")
    assert written.header["sform_code"] == source.header["sform_code"]
    np.testing.assert_array_equal(written.get_fdata(dtype=np.float32), fused)


def test_a_scaled_file_gives_scaled_values_and_an_unscaled_mask(tmp_path: Path):
    """anatomical.nii with scl_slope 2 and scl_inter 10 written into its (big-endian) header."""
    header = bytearray(ANATOMICAL.read_bytes())
    struct.pack_into(">ff", header, 112, 2.0, 10.0)
    (tmp_path / "scaled.nii").write_bytes(header)
    volume = read_volume(tmp_path / "scaled.nii")
    raw = np.asanyarray(nib.load(ANATOMICAL).dataobj)
    np.testing.assert_array_equal(volume.data, raw * 2.0 + 10.0)
    assert volume.full_range == (-32768 * 2 + 10, 32767 * 2 + 10)
    mask = np.arange(volume.data.size, dtype=np.uint8).reshape(volume.data.shape)
    written = read_nifti(nifti_bytes(volume, mask))
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), mask)  # not rescaled


def test_a_4d_file_is_refused_unless_an_index_picks_a_volume():
    with pytest.raises(InputContractError, match=r"4-D 128x96x24x2: 2 volumes.*--volume-index"):
        read_volume(FOUR_D)
    with pytest.raises(InputContractError, match="volume index 2 is outside"):
        read_volume(FOUR_D, index=2)
    second = read_volume(FOUR_D, index=1)
    np.testing.assert_array_equal(second.data, np.asanyarray(nib.load(FOUR_D).dataobj)[..., 1])
    np.testing.assert_array_equal(second.affine, nib.load(FOUR_D).affine)


def test_missing_nibabel_is_one_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'resfuse\[medical\]'"):
        read_volume(ANATOMICAL)


# DICOM series


def copy_series(source: Path, folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(source.iterdir())
    for file, name in zip(files, names, strict=True):
        shutil.copyfile(file, folder / name)
    return files


def test_a_series_is_sorted_by_position_whatever_its_file_names(tmp_path: Path):
    """CT5N's files sort by name from the top slice down; copies named in reverse and in a
    shuffled order give the same volume, stacked from the lowest slice up."""
    reference = read_volume(CT5N)
    for label, names in (("reversed", ["e", "d", "c", "b", "a"]), ("shuffled", list("cadeb"))):
        copy = read_volume(_copied(CT5N, tmp_path / label, names))
        np.testing.assert_array_equal(copy.data, reference.data)
        np.testing.assert_array_equal(copy.affine, reference.affine)
    by_height = sorted(CT5N.iterdir(), key=lambda p: float(pydicom.dcmread(p).SliceLocation))
    for k, file in enumerate(by_height):  # each slice is its file read as a 2D image
        np.testing.assert_array_equal(reference.data[:, :, k], read_pixels(file, 1).values[..., 0])
    expected = [  # rows run along +y (LPS: P), columns along +x (L); RAS flips both
        [0.0, -0.488281, 0.0, 72.199997],
        [-0.488281, 0.0, 0.0, 143.0],
        [0.0, 0.0, 2.5, -1.2375],
        [0.0, 0.0, 0.0, 1.0],
    ]
    np.testing.assert_allclose(reference.affine, expected, atol=1e-5)
    assert reference.full_range == CT_RANGE


def _copied(source: Path, folder: Path, names: list[str]) -> Path:
    copy_series(source, folder, names)
    return folder


def test_two_series_in_one_folder_are_refused_with_their_uids(tmp_path: Path):
    copy_series(CT5N, tmp_path, [f"a{i}" for i in range(5)])
    copy_series(CT2, tmp_path, [f"b{i}.dcm" for i in range(4)])
    uids = {str(pydicom.dcmread(next(s.iterdir())).SeriesInstanceUID) for s in (CT5N, CT2)}
    with pytest.raises(InputContractError, match="holds 2 DICOM series") as caught:
        read_volume(tmp_path)
    assert all(uid in str(caught.value) for uid in uids) and "\n" not in str(caught.value)
    with pytest.raises(InputContractError, match="holds 3 DICOM series"):
        read_volume(MR1)


@pytest.mark.parametrize(
    ("series", "problem"),
    [(MR700, "ImageOrientationPatient of"), (CT2, r"not evenly spaced \(slice gaps 1.25..202.5")],
)
def test_a_series_that_is_no_regular_grid_is_refused(series: Path, problem: str):
    with pytest.raises(InputContractError, match=problem) as caught:
        read_volume(series)
    assert "\n" not in str(caught.value)


def test_a_series_runs_and_writes_the_scanner_affine(gray_artifact: Path):
    volume = read_volume(CT5N)
    with load(gray_artifact) as session:
        fused = predict_volume(session, volume, channels=[0])
        alone = session.run(slice_input(volume.data[:, :, 3], CT_RANGE, session.manifest.data))
    np.testing.assert_allclose(fused[:, :, 3, 0], alone[0, 0], atol=1e-5)
    written = read_nifti(nifti_bytes(volume, fused))
    np.testing.assert_allclose(written.affine, volume.affine, rtol=1e-7)  # NIfTI: float32
    assert (written.header["sform_code"], written.header["qform_code"]) == (1, 1)


# resfuse-predict


def test_predict_writes_volumes_beside_images_and_resumes(gray_artifact: Path, tmp_path: Path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    (inputs / "mr").mkdir(parents=True)
    shutil.copyfile(ANATOMICAL, inputs / "mr" / "anat.nii")
    shutil.copyfile(FOUR_D, inputs / "4d.nii.gz")  # needs --volume-index: reported, skipped
    copy_series(CT5N, inputs / "ct", [f"{i}.dcm" for i in range(5)])
    as_images = predict(gray_artifact, inputs, out, batch_size=4)  # DICOM files: 2D images
    assert (as_images.total, as_images.done, len(as_images.failures)) == (7, 6, 1)
    assert (out / "ct" / "0.dcm.npy").is_file()
    assert "--volume-index" in as_images.failures[0][1]

    summary = predict(gray_artifact, inputs, out, batch_size=4, series=True)
    assert (summary.total, summary.done, len(summary.failures)) == (3, 1, 1)  # anat: current
    fused = nib.load(out / "ct.nii.gz")
    assert fused.shape == (16, 16, 5, 9)
    np.testing.assert_allclose(fused.affine, read_volume(CT5N).affine, rtol=1e-7)
    record = json.loads(record_path(out / "ct.nii.gz").read_text())
    assert record["artifact"]["volume"] == {"axis": None, "volume_index": None}

    again = predict(gray_artifact, inputs, out, batch_size=4, series=True, volume_index=1)
    assert (again.done, again.skipped, again.failures) == (1, 2, [])  # 3-D volumes: current
    assert nib.load(out / "4d.nii.gz.vol1.nii.gz").shape == (128, 96, 24, 9)
    changed = pydicom.dcmread(inputs / "ct" / "2.dcm")  # one pixel of one slice changes
    pixels = changed.pixel_array.copy()
    pixels[0, 0] += 1
    changed.PixelData = pixels.tobytes()
    changed.save_as(inputs / "ct" / "2.dcm")
    redone = predict(gray_artifact, inputs, out, batch_size=4, series=True, volume_index=1)
    assert (redone.done, redone.skipped) == (1, 2)
    first = predict(gray_artifact, inputs, out, batch_size=4, series=True, volume_index=0)
    assert (first.done, first.skipped) == (1, 2)  # its own output: index 1's stays
    assert (out / "4d.nii.gz.vol0.nii.gz").is_file() and (out / "4d.nii.gz.vol1.nii.gz").is_file()


def test_an_input_that_no_longer_reads_sets_its_old_output_aside(
    gray_artifact: Path, tmp_path: Path
):
    """anat.nii replaced by a truncated copy: the run fails for it, and the output of the
    earlier file is moved to .stale (kept, but no longer taken for this input's answer)."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copyfile(ANATOMICAL, inputs / "anat.nii")
    assert predict(gray_artifact, inputs, out, batch_size=4).done == 1
    (inputs / "anat.nii").write_bytes(ANATOMICAL.read_bytes()[:5000])
    summary = predict(gray_artifact, inputs, out, batch_size=4)
    assert len(summary.failures) == 1 and "moved to" in summary.failures[0][1]
    assert not (out / "anat.nii.nii.gz").exists() and (out / "anat.nii.nii.gz.stale").is_file()
    assert not record_path(out / "anat.nii.nii.gz").exists()


def test_a_bad_tile_is_refused_once_before_any_input(gray_artifact: Path, tmp_path: Path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copyfile(ANATOMICAL, inputs / "anat.nii")
    tiling = {"tile": (4000, 4000), "overlap": 0.25, "blend": "gaussian"}
    with pytest.raises(ConfigError, match="tile 4000x4000 is outside"):
        predict(gray_artifact, inputs, tmp_path / "out", batch_size=4, tiling=tiling)
    assert not (tmp_path / "out").exists()


def test_overlap_without_tile_is_a_usage_error(gray_artifact: Path, tmp_path: Path):
    from clirun import invoke

    from resfuse.runtime.serve_cli import predict_main

    inputs = tmp_path / "in"
    inputs.mkdir()
    args = [str(gray_artifact), str(inputs), "--output", str(tmp_path / "o"), "--batch-size", "4"]
    proc = invoke(predict_main, *args)
    assert proc.returncode == 0, proc.stderr
    proc = invoke(predict_main, *args, "--overlap", "0.5")
    assert proc.returncode == 2 and "--overlap only shape tiles" in proc.stderr


def test_nan_voxels_are_counted_over_the_whole_volume(gray_artifact: Path):
    volume = read_volume(REORIENTED)
    data = volume.data / volume.data.max()
    data[3, 4, 5] = np.nan
    data[:, :, 9] = np.inf  # a whole slice
    with load(gray_artifact) as session, pytest.raises(InputContractError) as caught:
        predict_volume(session, replace(volume, data=data))
    message = str(caught.value)
    assert f"{1 + 21 * 26} NaN or infinite voxels" in message and "axis" not in message


def test_a_cifti_file_is_told_it_has_no_voxel_grid():
    with pytest.raises(InputContractError, match="CIFTI-2 .* no voxel grid") as caught:
        read_volume(NIFTI / "row_major.dconn.nii")
    assert "convert it to .nii" not in str(caught.value)


def test_the_command_takes_a_volume_index(head_artifact: Path, tmp_path: Path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copyfile(FOUR_D, inputs / "run.nii.gz")
    exe = Path(sys.executable).with_name("resfuse-predict")
    proc = subprocess.run(
        [str(exe), str(head_artifact), str(inputs), "--output", str(out), "--batch-size", "4"]
        + ["--volume-index", "0", "--axis", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    mask = nib.load(out / "run.nii.gz.vol0.mask.nii.gz")
    assert mask.shape == (128, 96, 24) and mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(mask.affine, nib.load(FOUR_D).affine)


def test_a_range_that_clips_most_of_a_volume_says_so_once(
    gray_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A [low, high] rule is judged on the whole volume, not slice by slice: one note for the
    volume, from the library and from resfuse-predict."""
    folder = tmp_path / "artifact"
    shutil.copytree(gray_artifact.parent, folder)
    manifest = folder / gray_artifact.name
    data = json.loads(manifest.read_text())
    data["preprocess"].update(range=[-10, -1], units="rescaled")  # below every MR value
    manifest.write_text(json.dumps(data))
    notes: list[str] = []
    with load(manifest) as session:
        predict_volume(session, read_volume(ANATOMICAL), on_clip=notes.append)
    assert len(notes) == 1 and notes[0].startswith(f"{ANATOMICAL}: 100% of pixels fall outside")
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copyfile(ANATOMICAL, inputs / "anat.nii")
    capsys.readouterr()
    assert predict(manifest, inputs, tmp_path / "out", batch_size=4).done == 1
    assert (
        capsys.readouterr().err.count("of pixels fall outside the intensity range [-10, -1]") == 1
    )
