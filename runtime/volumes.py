"""Volumes: NIfTI files and DICOM series, run slice by slice through a 2D model, geometry kept.

A volume is its values on a voxel grid (i, j, k) and the affine that places that grid in the
patient's RAS+ world (millimetres), as NIfTI stores it. The model sees one slice at a time along
one voxel axis: by default the acquisition's stacking axis (a DICOM series' slices; for NIfTI,
the header's slice_dim, else a distinctly coarser axis, else the third, where every converter
stacks slices). Each slice is turned to the radiological display (resfuse.orientation: only
transposes and flips), then into a model input by the very rule that image files follow
(resfuse.images.to_input), so a series read from DICOM and the same series converted to NIfTI
reach the model alike. The output volume keeps the input's grid: same voxel axes, same affine
(and, for a NIfTI input, its header), so it overlays the input in any viewer. Nothing is ever
resampled.

A DICOM series is read into voxel axes (row, column, slice). A grid that is not orthogonal (a
tilted CT gantry shears it) is written with its exact sform only: a qform cannot hold a shear,
and ITK-based readers trust the qform, so they refuse such a file rather than misplace it.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resfuse.artifacts import replace_file
from resfuse.errors import ConfigError, InputContractError
from resfuse.images import (
    LOAD_FIX,
    Pixels,
    _check_dicom,
    _from_dicom,
    _is_dicom,
    check_preprocess,
    clip_note,
    pydicom,
    to_input,
)
from resfuse.orientation import RAS_TO_LPS, InPlane, in_plane
from resfuse.runtime.session import Session
from resfuse.shapes import format_shape

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DEFAULT_BATCH = 16  # slices per call when the artifact sets no batch limit
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM's patient axes are L, P, S; NIfTI's R, A, S
_ORIENTATION_TOL = 1e-4  # direction cosines as scanners write them (6 decimals, some rounding)
_SPACING_TOL = 0.01  # relative: slice gaps differing by more are not one regular grid
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index, not an image
_QFORM_TOL = 1e-3  # mm: a qform placing any voxel farther from the sform than this is not written
_COARSER = 1.5  # an axis this much coarser than both others is the one slices were stacked on


@dataclass(frozen=True)
class Volume:
    """One 3-D volume's raw values, where they lie in the world, and what "dtype" means for them."""

    data: np.ndarray  # (i, j, k) raw values: NIfTI scaled by scl_slope/inter, DICOM rescaled
    affine: np.ndarray  # 4x4, voxel (i, j, k) -> RAS+ world in mm
    header: Any | None  # the NIfTI input's header, kept for the output; None for DICOM
    full_range: tuple[float, float] | None  # the "dtype" rule's range; None: float, as 0..1
    name: str  # for messages
    stacking: int | None = None  # the axis the source says slices were acquired along
    notes: tuple[str, ...] = ()  # what a user should know of its geometry (a sheared grid)


# Reading


def read_volume(source: str | Path, *, index: int | None = None) -> Volume:
    """A .nii / .nii.gz file, or a folder holding one DICOM series. `index` picks one volume of
    a 4-D NIfTI file (3-D files and series have one, and ignore it)."""
    path = Path(source)
    if path.is_dir():
        return read_series(path)
    if is_nifti(path):
        return _read_nifti(path, index)
    raise InputContractError(
        f"{path} is neither a NIfTI file ({'/'.join(NIFTI_SUFFIXES)}) nor a folder holding a "
        f"DICOM series; pass one of those"
    )


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nibabel() -> Any:
    """The nibabel module, or an error naming the extra that installs it."""
    try:
        import nibabel as module
    except ImportError as exc:
        raise ConfigError("NIfTI volumes need nibabel: pip install 'resfuse[medical]'") from exc
    return module


def _read_nifti(path: Path, index: int | None) -> Volume:
    nib = nibabel()
    try:
        image = nib.load(path)
    except Exception as exc:  # noqa: BLE001 - nibabel, gzip and zlib each raise their own
        raise InputContractError(f"cannot read {path} as NIfTI: {_one_line(exc)}") from exc
    if isinstance(image, nib.Cifti2Image):
        raise InputContractError(
            f"{path} is a CIFTI-2 file (surface vertices and grayordinates), which has no voxel "
            f"grid to slice; pass a 3-D NIfTI volume"
        )
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputContractError(
            f"{path} is a {type(image).__name__}, not NIfTI; convert it to a 3-D NIfTI volume "
            f"(.nii or .nii.gz)"
        )
    header = image.header
    stored = np.dtype(header.get_data_dtype())
    if stored.kind not in "iuf":  # complex, RGB: no grayscale values to give a 2D model
        raise InputContractError(
            f"{path} holds {stored} values; resfuse reads real-valued grayscale volumes: "
            f"convert it to integers or float32"
        )
    shape = _spatial_shape(path, tuple(image.shape), index)
    try:
        data = np.asarray(_pick(image.dataobj, len(image.shape), index))
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file shows only now
        raise InputContractError(f"cannot read the values of {path}: {_one_line(exc)}") from exc
    data = data.reshape(shape)  # drops the trailing 1s _spatial_shape found
    # nibabel moves the file's scl_slope/inter into the proxy and clears them in the header
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    affine = np.asarray(image.affine, dtype=np.float64)
    slice_dim = header.get_dim_info()[2]  # 0-based, or None where the writer did not say
    return Volume(
        data.astype(data.dtype.newbyteorder("="), copy=False),  # native order: numpy's fast paths
        affine,
        header.copy(),
        _scaled_range(stored, slope, inter),
        str(path),
        slice_dim if slice_dim in (0, 1, 2) else None,
        _shear_notes(affine, shape, str(path)),
    )


def _spatial_shape(path: Path, shape: tuple[int, ...], index: int | None) -> tuple[int, int, int]:
    """The (i, j, k) shape of the volume to read: a 4-D file needs `index` (unless it holds one
    volume); trailing dimensions of 1 are ignored."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise InputContractError(
            f"{path} holds a {len(shape)}-D image {format_shape(shape)}; resfuse reads 3-D "
            f"volumes: save it as a volume of one slice, or as a PNG/TIFF image"
        )
    if len(shape) > 4:
        raise InputContractError(
            f"{path} is {len(shape)}-D {format_shape(shape)}; resfuse reads 3-D volumes, or one "
            f"volume of a 4-D file: split it into 3-D files"
        )
    if len(shape) == 4:
        count = shape[3]
        if index is None:
            raise InputContractError(
                f"{path} is 4-D {format_shape(shape)}: {count} volumes; pick one with "
                f"--volume-index 0..{count - 1} (index= in Python)"
            )
        if not 0 <= index < count:
            raise InputContractError(
                f"volume index {index} is outside {path}'s {count} volumes; use 0..{count - 1}"
            )
    return shape[0], shape[1], shape[2]


def _pick(proxy: Any, ndim: int, index: int | None) -> Any:
    """The one 3-D volume of a file's array proxy: read alone, never the whole 4-D file."""
    if ndim == 3:
        return proxy
    return proxy[(slice(None),) * 3 + (index or 0,) + (0,) * (ndim - 4)]


def _scaled_range(stored: np.dtype, slope: float, inter: float) -> tuple[float, float] | None:
    """What the stored integer type can hold, after the header's scaling; None for floats
    (taken as 0..1, as float images are)."""
    if stored.kind == "f":
        return None
    info = np.iinfo(stored)
    a, b = float(info.min) * slope + inter, float(info.max) * slope + inter
    return (min(a, b), max(a, b))  # a negative slope swaps the ends


def read_series(folder: Path) -> Volume:
    """The DICOM files directly in `folder` as one volume, slices sorted by position along the
    slice normal (file names and InstanceNumber say nothing reliable about position)."""
    datasets = _series_datasets(folder)
    orientation = _common(datasets, folder, "ImageOrientationPatient", _same_orientation)
    _common(datasets, folder, "PixelSpacing", _same_numbers)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    positions = [_numbers(ds, "ImagePositionPatient", folder) for ds in datasets]
    order = np.argsort([float(normal @ p) for p in positions], kind="stable")
    datasets = [datasets[i] for i in order]
    positions = [positions[i] for i in order]
    step = _slice_step(datasets, positions, normal, folder)
    slices = [_from_dicom(ds, _dicom_name(ds, folder)) for ds in datasets]
    shapes = {s.values.shape for s in slices}
    if len(shapes) > 1:
        raise InputContractError(
            f"the DICOM series in {folder} mixes slice sizes {sorted(s[:2] for s in shapes)}; "
            f"pass a folder holding one series of equal slices"
        )
    data = np.stack([s.values[..., 0] for s in slices], axis=-1)  # (rows, columns, slices)
    ranges = [s.full_range for s in slices if s.full_range is not None]
    spacing = _numbers(datasets[0], "PixelSpacing", folder)  # (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = col * spacing[0]  # down the rows: along the column direction
    lps[:3, 1] = row * spacing[1]  # along a row
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    # one range for the volume (slices may rescale differently): the union of theirs
    full_range = (min(r[0] for r in ranges), max(r[1] for r in ranges))
    affine = _LPS_TO_RAS @ lps
    notes = _shear_notes(affine, data.shape, str(folder))
    return Volume(data, affine, None, full_range, str(folder), 2, notes)


def series_files(folder: Path) -> list[Path]:
    """The DICOM files directly in `folder` (by suffix or preamble), hidden ones skipped."""
    files = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and p.is_file()]
    return [p for p in files if _is_dicom(p)]


def _series_datasets(folder: Path) -> list[Any]:
    """Every image of the one series in `folder`: several series are refused, not mixed."""
    module = pydicom()
    from pydicom.errors import InvalidDicomError

    by_series: dict[str, list[Any]] = {}
    for path in series_files(folder):
        try:
            dataset = module.dcmread(path)
        except (OSError, InvalidDicomError) as exc:
            raise InputContractError(f"cannot read {path} as DICOM: {_one_line(exc)}") from exc
        if _is_directory(dataset):
            continue  # a DICOMDIR indexes files; it holds no slice
        uid = str(dataset.get("SeriesInstanceUID", "") or "")
        by_series.setdefault(uid, []).append(dataset)
    if not by_series:
        raise InputContractError(
            f"{folder} holds no DICOM image files; pass a folder of one series"
        )
    if len(by_series) > 1:
        raise InputContractError(
            f"{folder} holds {len(by_series)} DICOM series "
            f"({', '.join(uid or '(no SeriesInstanceUID)' for uid in sorted(by_series))}); "
            f"put each series in a folder of its own"
        )
    datasets = next(iter(by_series.values()))
    for dataset in datasets:
        _check_dicom(dataset, _dicom_name(dataset, folder))  # before any geometry is trusted
    return datasets


def _is_directory(dataset: Any) -> bool:
    meta = getattr(dataset, "file_meta", None)
    return str(getattr(meta, "MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS


def _dicom_name(dataset: Any, folder: Path) -> str:
    return str(getattr(dataset, "filename", None) or folder)


def _numbers(dataset: Any, keyword: str, folder: Path) -> np.ndarray:
    value = dataset.get(keyword, None)
    if value is None:
        raise InputContractError(
            f"{_dicom_name(dataset, folder)} has no {keyword}, so its place in a volume is "
            f"unknown; read its files as 2-D images instead (without --series)"
        )
    return np.asarray([float(v) for v in value], dtype=np.float64)


def _same_orientation(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, atol=_ORIENTATION_TOL))


def _same_numbers(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-6, atol=1e-6))


def _common(datasets: list[Any], folder: Path, keyword: str, same: Any) -> np.ndarray:
    """The value of `keyword` that every slice shares; slices that differ are no one grid."""
    values = [_numbers(ds, keyword, folder) for ds in datasets]
    for dataset, value in zip(datasets, values, strict=True):
        if not same(values[0], value):
            raise InputContractError(
                f"the DICOM series in {folder} is no regular volume: {keyword} of "
                f"{_dicom_name(dataset, folder)} is {_listed(value)}, of "
                f"{_dicom_name(datasets[0], folder)} {_listed(values[0])}; pass a series "
                f"of parallel, equal slices"
            )
    return values[0]


def _slice_step(
    datasets: list[Any], positions: list[np.ndarray], normal: np.ndarray, folder: Path
) -> np.ndarray:
    """The world vector from one slice to the next: the actual step (a tilted gantry's slices
    are sheared, not stacked on the normal), which must be the same for every pair."""
    if len(positions) == 1:  # one slice: its thickness, along the normal
        thickness = datasets[0].get("SpacingBetweenSlices", None) or datasets[0].get(
            "SliceThickness", None
        )
        return normal * float(thickness or 1.0)
    gaps = np.diff([float(normal @ p) for p in positions])
    if gaps.min() <= 1e-6 * max(1.0, float(abs(gaps).max())):
        raise InputContractError(
            f"the DICOM series in {folder} has several slices at one position (echoes, phases "
            f"or repeats); put each volume's slices in a folder of its own"
        )
    if gaps.max() - gaps.min() > _SPACING_TOL * gaps.mean():
        raise InputContractError(
            f"the DICOM series in {folder} is not evenly spaced (slice gaps "
            f"{gaps.min():.4g}..{gaps.max():.4g} mm), so no affine describes it; resample it "
            f"to a regular grid, or leave out the slices that break it"
        )
    return np.asarray((positions[-1] - positions[0]) / (len(positions) - 1))


def qform_misfit(affine: np.ndarray, shape: Sequence[int]) -> float:
    """How far (mm) a NIfTI qform of `affine` would place the grid's farthest voxel from the
    affine itself: 0 for an orthogonal grid, tens of mm for a tilted gantry's sheared one. The
    qform is a rotation times zooms: the nearest orthonormal matrix, as nibabel writes it."""
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    zooms = np.linalg.norm(matrix, axis=0)
    u, _, vt = np.linalg.svd(matrix / zooms)
    difference = matrix - (u @ vt) * zooms  # linear in the voxel: largest at a corner
    ends = [(0, max(n - 1, 0)) for n in shape[:3]]
    corners = np.asarray([(a, b, c) for a in ends[0] for b in ends[1] for c in ends[2]], float)
    return float(np.linalg.norm(corners @ difference.T, axis=1).max())


def _shear_notes(affine: np.ndarray, shape: Sequence[int], name: str) -> tuple[str, ...]:
    misfit = qform_misfit(affine, shape)
    if misfit <= _QFORM_TOL:
        return ()
    return (
        f"{name} has a sheared voxel grid (as a tilted CT gantry makes): a NIfTI qform would "
        f"misplace voxels by up to {misfit:.1f} mm, so its output carries the exact sform only "
        f"(qform_code 0); nibabel places it exactly, ITK-based tools (SimpleITK, ITK-SNAP, "
        f"3D Slicer) refuse it: for those, convert the series with dcm2niix (its resampled "
        f"_Tilt_ file) and run on that NIfTI",
    )


# Running


def slice_axis(volume: Volume) -> int:
    """The acquisition's stacking axis: what the source says (a DICOM series' slices, a NIfTI
    header's slice_dim), else an axis distinctly coarser than both others (thick slices),
    else the third axis, along which every DICOM-to-NIfTI converter stacks slices."""
    if volume.stacking is not None:
        return volume.stacking
    spacing = np.linalg.norm(np.asarray(volume.affine, dtype=np.float64)[:3, :3], axis=0)
    coarsest = int(np.argmax(spacing))
    others = np.delete(spacing, coarsest)
    return coarsest if spacing[coarsest] >= _COARSER * others.max() else 2


def slice_size(volume: Volume, axis: int) -> tuple[int, int]:
    """The (H, W) the model sees of a slice along `axis`."""
    first, second = (n for a, n in enumerate(volume.data.shape) if a != axis)
    return slice_plane(volume, axis).model_size((first, second))


def slice_plane(volume: Volume, axis: int) -> InPlane:
    """How slices along `axis` turn to the model's orientation (resfuse.orientation)."""
    first, second = (a for a in range(3) if a != axis)
    directions = np.asarray(volume.affine, dtype=np.float64)[:3, :3] * RAS_TO_LPS[:, None]
    return in_plane(directions[:, first], directions[:, second])


def predict_volume(
    session: Session,
    volume: Volume,
    *,
    axis: int | None = None,
    channels: Sequence[int] | None = None,
    batch_size: int | None = None,
    on_clip: Callable[[str], None] | None = None,
    **tiling: Any,
) -> np.ndarray:
    """Run each slice along `axis` (default: slice_axis) through the session, turned to the
    model's slice orientation and back; the output has the volume's voxel axes: the argmax
    class per voxel for a model with a head (uint8, uint16 above 256 classes), else the fused
    channels (or those in `channels`) as a last axis, float32. Slices go `batch_size` at a time
    (default and at most the artifact's batch limit); `tiling` is passed to every session.run.
    `on_clip` hears once, of the whole volume, when a [low, high] rule clips a large share of
    its voxels."""
    axis = slice_axis(volume) if axis is None else axis
    if axis not in (0, 1, 2):
        raise ConfigError(f"slice axis {axis} is not a voxel axis of a volume; use 0, 1 or 2")
    head = session.manifest.config.num_classes
    if head is not None and channels is not None:
        raise ConfigError(
            "channels= selects fused output channels, but this model has a head and gives a "
            "class mask; drop channels="
        )
    plane = slice_plane(volume, axis)
    _check_slices(session, volume, axis)
    _check_finite(volume)
    slices = np.moveaxis(volume.data, axis, 0)
    parts = []
    for batch in _batches(session, volume, slices, axis, plane, batch_size, on_clip):
        output = _run(session, batch, volume, axis, tiling)
        if head is not None:
            mask = output.argmax(axis=1).astype(np.uint8 if head <= 256 else np.uint16)
            parts.append(plane.to_stored(mask))
        else:
            parts.append(plane.to_stored(_select(output, channels)).transpose(0, 2, 3, 1))
    return np.ascontiguousarray(np.moveaxis(np.concatenate(parts), 0, axis))


def _check_slices(session: Session, volume: Volume, axis: int) -> None:
    """Slices thinner than the model's minimum are no images it knows (a volume cut across its
    acquisition plane gives 1024 x 4 strips): refused, naming the axes that give what."""
    contract = session.contract
    h, w = slice_size(volume, axis)
    if h >= contract.height.min and w >= contract.width.min:
        return
    sizes = ", ".join(
        f"{a}: " + "x".join(str(n) for b, n in enumerate(volume.data.shape) if b != a)
        for a in range(3)
    )
    raise InputContractError(
        f"{volume.name}: slices along voxel axis {axis} are {h}x{w}, thinner than this "
        f"model's minimum {contract.height.min}x{contract.width.min}; slice along another axis "
        f"with --axis (axis= in Python; slices per axis {sizes}), or pass a larger volume"
    )


def _check_finite(volume: Volume) -> None:
    """NaN or infinite voxels, counted over the whole volume, once."""
    if volume.data.dtype.kind != "f":
        return
    bad = ~np.isfinite(volume.data)
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputContractError(
            f"{volume.name} has {count} NaN or infinite voxels (the first at voxel {first}); "
            f"replace them (e.g. with the background value) before running it"
        )


def _batches(
    session: Session,
    volume: Volume,
    slices: np.ndarray,
    axis: int,
    plane: InPlane,
    batch_size: int | None,
    on_clip: Callable[[str], None] | None,
) -> Iterator[np.ndarray]:
    """(n, C, H, W) inputs, slice by slice by the manifest's intensity rule.
    Never resized (the output must keep the input's grid): a slice outside the artifact's size
    range fails with the contract's message."""
    contract = session.contract
    preprocess = session.manifest.data.get("preprocess", {})
    if contract.channels not in (1, 3):
        raise ConfigError(
            f"volumes give 1 channel (3 repeated); this model takes {contract.channels}: pass "
            f"arrays to session.run"
        )
    check_preprocess(preprocess, contract.channels, LOAD_FIX)
    if on_clip is not None:  # judging the whole volume is a pass over it: only when heard
        note = clip_note(Pixels(volume.data, volume.full_range, volume.name), preprocess)
        if note is not None:
            on_clip(note)
    limit = _batch_limit(contract.batch.max, batch_size)
    for start in range(0, slices.shape[0], limit):
        inputs = []
        for k in range(start, min(start + limit, slices.shape[0])):
            values = np.repeat(slices[k][..., None], contract.channels, axis=2)
            name = f"{volume.name} slice {k} (axis {axis})"
            pixels = Pixels(values, volume.full_range, name, in_plane=plane)
            inputs.append(to_input(pixels, preprocess, contract, "none"))
        yield np.concatenate(inputs)


def _batch_limit(contract_max: int | None, batch_size: int | None) -> int:
    limit = batch_size or contract_max or _DEFAULT_BATCH
    return min(limit, contract_max) if contract_max is not None else limit


def _run(
    session: Session, batch: np.ndarray, volume: Volume, axis: int, tiling: dict[str, Any]
) -> np.ndarray:
    try:
        return np.asarray(session.run(batch, **tiling))
    except InputContractError as exc:  # name the volume and axis: the slice size alone is vague
        h, w = batch.shape[2:]
        raise InputContractError(
            f"{volume.name}: slices along axis {axis} are {h}x{w}: {_one_line(exc)}"
        ) from exc


def _select(output: np.ndarray, channels: Sequence[int] | None) -> np.ndarray:
    if channels is None:
        return output.astype(np.float32, copy=False)
    wanted = list(channels)
    count = output.shape[1]
    bad = [c for c in wanted if not 0 <= c < count]
    if not wanted or bad:
        raise ConfigError(
            f"channels {wanted} must be a non-empty list of output channels 0..{count - 1} "
            f"(the fused output has {count}); fix channels="
        )
    return output[:, wanted].astype(np.float32, copy=False)


# Writing


def nifti_bytes(volume: Volume, output: np.ndarray) -> bytes:
    """`output` (the volume's voxel axes first) as .nii.gz bytes with the input's affine, and
    for a NIfTI input a copy of its header (its sform/qform codes, units, description) set to
    the output's shape and type, unscaled."""
    nib = nibabel()
    if output.shape[:3] != volume.data.shape:
        raise ConfigError(
            f"an output of shape {output.shape} does not lie on {volume.name}'s grid "
            f"{volume.data.shape}; give one value (or channel vector) per voxel"
        )
    header = volume.header.copy() if volume.header is not None else None
    kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # nibabel writes an array as it is: scl_slope/inter cleared whatever the copied header said,
    # so a class stays a class
    image = kind(output, volume.affine, header=header)
    image.header.set_data_dtype(output.dtype)
    image.header["cal_min"], image.header["cal_max"] = 0.0, 0.0  # the input's window fits no mask
    if header is None:  # DICOM positions are the scanner's own coordinates, in mm
        image.set_sform(volume.affine, code="scanner")
        image.set_qform(volume.affine, code="scanner")
        image.header.set_xyzt_units("mm")
    if qform_misfit(volume.affine, output.shape) > _QFORM_TOL:  # a shear: no valid qform
        image.set_qform(None, code=0)
    # mtime 0: the same output is the same bytes
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def write_nifti(path: str | Path, volume: Volume, output: np.ndarray) -> None:
    """nifti_bytes written atomically (a hidden temporary renamed over `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, nifti_bytes(volume, output))


# Finding volumes in a folder


def find_volumes(folder: Path, series: bool) -> list[Path]:
    """NIfTI files under `folder` (recursively, hidden ones skipped), and with `series` every
    folder (`folder` included) that holds DICOM files; sorted."""
    found = []
    for path in [folder, *folder.rglob("*")]:
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_file() and is_nifti(path):
            found.append(path)
        elif series and path.is_dir() and series_files(path):
            found.append(path)
    return sorted(found)


def _listed(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
