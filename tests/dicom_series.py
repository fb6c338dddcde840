"""DICOM series built from one real slice (pydicom-data's CT and MR), as scanners lay them out:
new UIDs, positions stepped along the slice normal (or sheared, for a tilted gantry), file
names shuffled; and the reference readers (dcm2niix, SimpleITK) the geometry is held to."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

DATA = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
DATA = DATA / "site-packages" / "data_store" / "data"  # where pydicom-data installs its files
CT_SLICE = DATA / "693_UNCI.dcm"  # 512^2 axial CT, 0.48 mm pixels
MR_SLICE = DATA / "MR2_UNCI.dcm"  # 1024^2 oblique MR (rows mostly posterior, columns inferior)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def build_series(
    source: Path,
    folder: Path,
    count: int = 4,
    *,
    step: float = 5.0,
    orientation: tuple[float, ...] | None = None,
    tilt: float = 0.0,
    crop: tuple[int, int, int, int] | None = None,
    seed: int = 0,
) -> Path:
    """`count` slices of `source` in `folder`, `step` mm apart along the normal (each slice's
    pixels rolled a little, so slices differ), under shuffled names. `orientation` replaces the
    slice's ImageOrientationPatient; `tilt` (degrees) shears the positions along the column
    direction as a tilted CT gantry does; `crop` (top, left, rows, columns) keeps that part,
    its position moved to its first pixel."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(source)
    if orientation is not None:
        base.ImageOrientationPatient = list(orientation)
    cosines = np.asarray([float(v) for v in base.ImageOrientationPatient])
    row, col = cosines[:3], cosines[3:]
    spacing = [float(v) for v in base.PixelSpacing]
    origin = np.asarray([float(v) for v in base.ImagePositionPatient])
    pixels = base.pixel_array
    if crop is not None:
        top, left, rows, columns = crop
        pixels = pixels[top : top + rows, left : left + columns]
        origin = origin + col * top * spacing[0] + row * left * spacing[1]
    normal = np.cross(row, col)
    shear = col * step * np.tan(np.radians(tilt))
    series = generate_uid()
    names = [f"IM{n:04d}" for n in random.Random(seed).sample(range(1000), count)]
    for k, name in enumerate(names):
        ds = pydicom.dcmread(source)
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in cosines]
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        position = origin + normal * step * k + shear * k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.SliceLocation = f"{float(normal @ position):.6f}"
        if tilt:
            ds.GantryDetectorTilt = f"{tilt:g}"
        ds.SpacingBetweenSlices = f"{step:g}"
        ds.SliceThickness = f"{step:g}"
        data = np.ascontiguousarray(np.roll(pixels, 7 * k, axis=1))
        ds.Rows, ds.Columns = data.shape
        ds.PixelData = data.astype(pixels.dtype).tobytes()
        ds.save_as(folder / name)
    return folder


def dcm2niix(series: Path, out: Path) -> list[Path]:
    """dcm2niix's NIfTI file(s) of `series` (its pip package ships the binary)."""
    out.mkdir(parents=True, exist_ok=True)
    binary = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or "dcm2niix"
    proc = subprocess.run(
        [binary, "-z", "n", "-b", "n", "-f", "%s", "-o", str(out), str(series)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(out.glob("*.nii"))


def world_points_nibabel(path: Path, voxels: np.ndarray) -> np.ndarray:
    """RAS+ millimetres of (n, 3) voxel indices, as nibabel places them (sform first)."""
    import nibabel

    affine = nibabel.load(path).affine
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def world_points_sitk(image: object, voxels: np.ndarray) -> np.ndarray:
    """RAS+ millimetres of (n, 3) voxel indices (i, j, k) as SimpleITK places them (LPS turned
    to RAS)."""
    points = np.asarray(
        [image.TransformIndexToPhysicalPoint([int(v) for v in voxel]) for voxel in voxels]
    )
    return points * np.asarray([-1.0, -1.0, 1.0])


def sitk_series(folder: Path) -> object:
    """SimpleITK's ImageSeriesReader on `folder` (it sorts the files itself)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def corners(shape: tuple[int, ...]) -> np.ndarray:
    """The 8 corner voxels of a 3-D grid (and its centre), (9, 3) indices."""
    i, j, k = (n - 1 for n in shape[:3])
    points = [(a, b, c) for a in (0, i) for b in (0, j) for c in (0, k)]
    return np.asarray([*points, (i // 2, j // 2, k // 2)], dtype=np.float64)
