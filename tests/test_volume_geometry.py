"""Volume geometry held to the references radiology groups trust: dcm2niix's NIfTI and
SimpleITK's ImageSeriesReader, on series built from real slices (pydicom-data's 512^2 CT and
1024^2 oblique MR). Every voxel of resfuse's output lies where both place it, and a model sees
the same slices whether a scan comes as DICOM or as dcm2niix's NIfTI of it."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel", reason="needs nibabel")
pytest.importorskip("pydicom", reason="needs pydicom")
sitk = pytest.importorskip("SimpleITK", reason="needs SimpleITK (a reference reader)")

from dicom_series import (  # noqa: E402
    AXIAL,
    CORONAL,
    CT_SLICE,
    MR_SLICE,
    build_series,
    dcm2niix,
    sitk_series,
)
from nibabel.testing import data_path  # noqa: E402

from resfuse.errors import InputContractError  # noqa: E402
from resfuse.export.pipeline import ExportOptions, export_artifact  # noqa: E402
from resfuse.images import read_pixels  # noqa: E402
from resfuse.models import ModelConfig  # noqa: E402
from resfuse.runtime import load, predict_volume, read_volume  # noqa: E402
from resfuse.runtime.volumes import nifti_bytes, qform_misfit, slice_axis  # noqa: E402

pytestmark = pytest.mark.skipif(not CT_SLICE.is_file(), reason="needs pydicom-data's slices")
TOL_MM = 1e-3
MOSAIC = Path(data_path) / "0.dcm"  # Siemens MOSAIC: 36x36x48 tiled into one 256^2 image

# (name, source slice, orientation, crop): crops keep the tests short and stay real anatomy
SERIES = [
    ("axial CT", CT_SLICE, AXIAL, (160, 120, 128, 160)),
    ("oblique MR", MR_SLICE, None, (384, 320, 192, 256)),
    ("coronal CT", CT_SLICE, CORONAL, (160, 120, 128, 160)),
]


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small 1-channel model read under a fixed range in rescaled units (HU for CT), so the
    same scan gives the same inputs from DICOM (BitsStored) and from NIfTI (its int16 type)."""
    config = ModelConfig("upsample", stage=2, in_channels=1, features=8)
    options = ExportOptions(
        min_size=16, max_size=512, max_batch=4, intensity_range=(-1024.0, 3071.0)
    )
    return export_artifact(config, tmp_path_factory.mktemp("windowed"), options).manifest_path


@pytest.fixture(scope="module", params=SERIES, ids=[s[0] for s in SERIES])
def series(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, source, orientation, crop = request.param
    folder = tmp_path_factory.mktemp("series") / "dicom"
    return build_series(source, folder, 4, orientation=orientation, crop=crop)


def voxel_grid(shape: tuple[int, ...]) -> np.ndarray:
    """Every voxel index of a 3-D grid, (n, 3)."""
    return np.indices(shape[:3]).reshape(3, -1).T.astype(np.float64)


def to_world(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def to_voxels(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    inverse = np.linalg.inv(affine)
    return points @ inverse[:3, :3].T + inverse[:3, 3]


def sitk_affine(image: object) -> np.ndarray:
    """SimpleITK's index -> LPS geometry as a RAS+ affine."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def matched(ours: np.ndarray, theirs: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The voxel of `theirs` (affine) at each voxel of `ours`' grid: checked to be a whole
    voxel within TOL_MM, and inside their grid."""
    voxels = voxel_grid(shape)
    found = to_voxels(theirs, to_world(ours, voxels))
    index = np.rint(found)
    miss = np.linalg.norm(to_world(theirs, index) - to_world(ours, voxels), axis=1).max()
    assert miss <= TOL_MM, f"voxels {miss:.4g} mm apart"
    return index.astype(int)


def test_every_voxel_lies_where_dcm2niix_and_simpleitk_place_it(
    series: Path, windowed: Path, tmp_path: Path
) -> None:
    volume = read_volume(series)
    assert slice_axis(volume) == 2  # the series' own slices, whatever their plane
    with load(windowed) as session:
        fused = predict_volume(session, volume, channels=[1])
    written = nib.Nifti1Image.from_bytes(gzip.decompress(nifti_bytes(volume, fused)))
    assert written.header.get_xyzt_units()[0] == "mm"
    assert written.header["qform_code"] == written.header["sform_code"] == 1
    (tmp_path / "ours.nii").write_bytes(written.to_bytes())
    by_sitk = sitk.ReadImage(str(tmp_path / "ours.nii"))  # reads the qform
    np.testing.assert_allclose(sitk_affine(by_sitk), written.affine, atol=1e-4)

    reference = sitk_series(series)  # SimpleITK on the DICOM files themselves
    index = matched(written.affine, sitk_affine(reference), volume.data.shape)
    values = sitk.GetArrayFromImage(reference)  # (k, j, i)
    theirs = values[index[:, 2], index[:, 1], index[:, 0]]
    np.testing.assert_array_equal(volume.data.reshape(-1), theirs.reshape(-1))

    (converted,) = dcm2niix(series, tmp_path / "dcm2niix")
    other = nib.load(converted)
    index = matched(written.affine, other.affine, volume.data.shape)
    theirs = np.asarray(other.get_fdata())[index[:, 0], index[:, 1], index[:, 2]]
    np.testing.assert_allclose(volume.data.reshape(-1), theirs, atol=1e-3)


def test_the_same_scan_gives_the_same_prediction_as_dicom_and_as_nifti(
    series: Path, windowed: Path, tmp_path: Path
) -> None:
    """dcm2niix stores the series (column, row, slice) with rows reversed; the model sees both
    in the radiological display, so the outputs agree at the same physical voxels."""
    dicom = read_volume(series)
    (converted,) = dcm2niix(series, tmp_path / "dcm2niix")
    nifti = read_volume(converted)
    assert slice_axis(nifti) == 2
    with load(windowed) as session:
        ours = predict_volume(session, dicom)
        theirs = predict_volume(session, nifti)
    index = matched(dicom.affine, nifti.affine, dicom.data.shape)
    at_ours = theirs[index[:, 0], index[:, 1], index[:, 2]]
    np.testing.assert_allclose(ours.reshape(-1, ours.shape[-1]), at_ours, atol=2e-5)


def test_a_tilted_gantry_is_written_exactly_and_never_misplaced(
    windowed: Path, tmp_path: Path
) -> None:
    """20 degrees of tilt shear the grid: nibabel places every voxel where the DICOM files
    put it; the qform, which cannot hold a shear, is not written, so SimpleITK refuses the file
    rather than put it 40 mm off. dcm2niix's resampled _Tilt_ file is an orthogonal grid,
    written with both forms, on which SimpleITK and nibabel agree."""
    series = build_series(CT_SLICE, tmp_path / "tilt", 5, tilt=20.0, crop=(160, 120, 128, 160))
    volume = read_volume(series)
    assert volume.notes and "sheared" in volume.notes[0] and "dcm2niix" in volume.notes[0]
    assert qform_misfit(volume.affine, volume.data.shape) > 10  # mm
    with load(windowed) as session:
        mask = predict_volume(session, volume, channels=[1])
    written = nib.Nifti1Image.from_bytes(gzip.decompress(nifti_bytes(volume, mask)))
    assert written.header["qform_code"] == 0 and written.header["sform_code"] == 1
    positions = np.asarray(
        [[float(v) for v in _dataset(p).ImagePositionPatient] for p in sorted(series.iterdir())]
    )
    corners = to_world(written.affine, np.asarray([[0.0, 0.0, k] for k in range(5)]))
    expected = positions[np.argsort(positions[:, 2])] * np.asarray([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(corners, expected, atol=TOL_MM)
    (tmp_path / "ours.nii").write_bytes(written.to_bytes())
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(tmp_path / "ours.nii"))

    resampled = [p for p in dcm2niix(series, tmp_path / "dcm2niix") if "_Tilt_" in p.name]
    (tilt_file,) = resampled
    flat = read_volume(tilt_file)
    assert not flat.notes
    with load(windowed) as session:
        out = predict_volume(session, flat, channels=[1])
    (tmp_path / "flat.nii").write_bytes(gzip.decompress(nifti_bytes(flat, out)))
    again = nib.load(tmp_path / "flat.nii")
    np.testing.assert_allclose(
        sitk_affine(sitk.ReadImage(str(tmp_path / "flat.nii"))), again.affine, atol=1e-4
    )


def _dataset(path: Path) -> object:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def test_a_siemens_mosaic_is_refused_naming_dcm2niix(tmp_path: Path) -> None:
    with pytest.raises(InputContractError, match="Siemens MOSAIC.*dcm2niix"):
        read_pixels(MOSAIC, 1)
    folder = tmp_path / "mosaic"
    folder.mkdir()
    (folder / "0.dcm").write_bytes(MOSAIC.read_bytes())
    with pytest.raises(InputContractError, match="Siemens MOSAIC"):
        read_volume(folder)


def test_slices_across_the_acquisition_plane_are_refused_naming_axis(
    windowed: Path, tmp_path: Path
) -> None:
    """The oblique MR series, 4 slices: slicing along an in-plane axis gives 4-pixel strips."""
    series = build_series(MR_SLICE, tmp_path / "mr", 4, crop=(384, 320, 192, 256))
    volume = read_volume(series)
    with load(windowed) as session:
        with pytest.raises(InputContractError, match=r"thinner than .* --axis"):
            predict_volume(session, volume, axis=0, tile="auto")


def test_a_dicom_file_stored_mirrored_reaches_the_model_as_the_original(
    windowed: Path, tmp_path: Path
) -> None:
    """The same CT slice stored with its columns reversed (and ImageOrientationPatient saying
    so): the model sees one image, and each output goes back onto its own file's pixels."""
    import pydicom

    original = pydicom.dcmread(CT_SLICE)
    mirrored = pydicom.dcmread(CT_SLICE)
    mirrored.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    mirrored.PixelData = np.ascontiguousarray(original.pixel_array[:, ::-1]).tobytes()
    original.save_as(tmp_path / "a.dcm")
    mirrored.save_as(tmp_path / "b.dcm")
    with load(windowed) as session:
        a = np.asarray(session.run(tmp_path / "a.dcm", tile="auto"))
        b = np.asarray(session.run(tmp_path / "b.dcm", tile="auto"))
    np.testing.assert_allclose(b, a[..., ::-1], atol=1e-5)
