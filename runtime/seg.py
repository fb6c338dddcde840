"""DICOM Segmentation (SEG) output: a model's class mask as the object a PACS stores beside the
study, referencing the very instances it was computed from (highdicom writes it).

What is copied from the source instances and what is new:
- copied (highdicom takes them from the source datasets): the Patient and Study modules (so the
  SEG files into the same study), the Frame of Reference, the pixel spacing and orientation, each
  frame's ImagePositionPatient, and the Referenced Series / Source Image SOP Instance UIDs;
- new: the SEG's SeriesInstanceUID and SOPInstanceUID, its series number, and the segments: one
  per class of the model's head (background excluded), named by the manifest's class_names
  (`resfuse-export --class-names`, else "class 1", "class 2", ...) and coded in a local coding
  scheme (99RESFUSE) under the category "Tissue": resfuse knows names, not anatomy.
- the artifact's identity (its name and the first 16 hex digits of its ONNX sha256) in the SEG's
  SeriesDescription and ContentDescription: a PACS query finds what this artifact already wrote.

BINARY holds the argmax class of each pixel, the very mask the NIfTI and PNG outputs hold, at the
same positions (the output turned back onto each source image's own pixels); FRACTIONAL holds each
class's softmax probability. Frames where a segment is empty are left out.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resfuse.artifacts import Manifest
from resfuse.errors import ConfigError, InputContractError
from resfuse.images import _is_dicom, pydicom
from resfuse.optional import optional_module
from resfuse.runtime.session import Session
from resfuse.runtime.volumes import (
    _batches,
    _run,
    _series_datasets,
    predict_volume,
    read_series,
    slice_plane,
)

SEG_TYPES = ("binary", "fractional")
SEG_SUFFIX = ".seg.dcm"
SEG_MODALITY = "SEG"
_SERIES_NUMBER = 9901  # a SEG's series number: far above the scanner's own series
_LOCAL_SCHEME = "99RESFUSE"  # a local coding scheme (PS3.16 8.2: 99 prefix) for class codes
_SHA_DIGITS = 16  # of the ONNX sha256 in the SEG's description: enough to tell artifacts apart


def highdicom() -> Any:
    return optional_module("highdicom", "DICOM SEG output", "dicom")


def check_seg_type(seg_type: str) -> str:
    if seg_type not in SEG_TYPES:
        raise ConfigError(f"--seg-type {seg_type!r} is unknown; use one of {', '.join(SEG_TYPES)}")
    return seg_type


def check_head(manifest: Manifest) -> int:
    """The number of classes of the artifact's head; a model without one gives no segments."""
    classes = manifest.config.num_classes
    if classes is None or classes < 2:
        raise ConfigError(
            f"{manifest.path.name} has no segmentation head of 2 or more classes, so there is "
            f"no class mask to store as DICOM SEG; export with --num-classes N (N >= 2)"
        )
    return classes


def class_names(manifest: Manifest) -> list[str]:
    """Every class's name, background (class 0) first: the manifest's, else numbered."""
    classes = check_head(manifest)
    names = manifest.data.get("class_names")
    return list(names) if names else ["background", *(f"class {k}" for k in range(1, classes))]


def identity(manifest: Manifest, seg_type: str) -> str:
    """What a SEG says of the artifact and type that made it (SeriesDescription, at most 64
    characters): found again by a query, so a rerun skips what this artifact already stored."""
    sha = manifest.record("onnx")["sha256"][:_SHA_DIGITS]
    name = str(manifest.data.get("name", manifest.path.stem))
    return f"resfuse {sha} {seg_type} {name}"[:64]


# The label maps, on each source image's own pixels


def series_sources(folder: Path) -> list[Any]:
    """The series' datasets in the order read_series stacks them (by position along the slice
    normal), so frame k of a SEG is slice k of the volume."""
    datasets = _series_datasets(folder)
    cosines = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(cosines[:3], cosines[3:])
    keys = [
        float(normal @ np.asarray([float(v) for v in ds.ImagePositionPatient])) for ds in datasets
    ]
    return [datasets[i] for i in np.argsort(keys, kind="stable")]


def series_frames(
    session: Session, folder: Path, seg_type: str, batch_size: int | None, **tiling: Any
) -> tuple[list[Any], np.ndarray]:
    """The sorted source datasets and one frame per slice: (slices, rows, columns) classes for
    BINARY, (slices, rows, columns, classes) probabilities for FRACTIONAL. BINARY is the
    mask predict_volume gives the NIfTI output, read on the series' own grid."""
    volume = read_series(folder)
    sources = series_sources(folder)
    if seg_type == "binary":
        mask = predict_volume(session, volume, axis=2, batch_size=batch_size, **tiling)
        return sources, np.moveaxis(mask, 2, 0)
    return sources, _volume_probabilities(session, volume, batch_size, tiling)


def _volume_probabilities(
    session: Session, volume: Any, batch_size: int | None, tiling: dict[str, Any]
) -> np.ndarray:
    """Softmax over classes of every slice (stacking axis 2), turned back onto the stored
    pixels as predict_volume turns its mask: (slices, rows, columns, classes)."""
    plane = slice_plane(volume, 2)
    slices = np.moveaxis(volume.data, 2, 0)
    parts = []
    for batch in _batches(session, volume, slices, 2, plane, batch_size, None):
        parts.append(plane.to_stored(softmax(_run(session, batch, volume, 2, tiling))))
    return np.concatenate(parts).transpose(0, 2, 3, 1)


def dicom_source(source: Path) -> Any:
    """A single DICOM image to reference; any other file is refused in one line."""
    if not _is_dicom(source):
        raise InputContractError(
            f"{source} is not DICOM, and a DICOM SEG must reference DICOM images; pass DICOM "
            f"files or series, or drop --format seg"
        )
    return pydicom().dcmread(source)


def image_frames(stored: np.ndarray, seg_type: str) -> np.ndarray:
    """The one frame of a single image from its (1, classes, H, W) output already turned back
    onto the image's own pixels (the PNG mask's path): classes, or probabilities per class."""
    if seg_type == "binary":
        return stored.argmax(axis=1)
    return softmax(stored).transpose(0, 2, 3, 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 (classes) of (n, classes, H, W) logits, float32."""
    shifted = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


# Writing


def seg_bytes(
    manifest: Manifest, sources: Sequence[Any], frames: np.ndarray, seg_type: str
) -> bytes:
    """The SEG of `frames` (one per source, in order) as DICOM file bytes. BINARY frames hold
    class indices; FRACTIONAL frames a probability per class (background's left out)."""
    hd = highdicom()
    _check_frame_of_reference(sources)
    names = class_names(manifest)
    if seg_type == "binary":
        pixels = np.stack([frames == k for k in range(1, len(names))], axis=-1).astype(np.uint8)
    else:
        pixels = np.asarray(frames[..., 1:], dtype=np.float32)
    with warnings.catch_warnings():  # the source's own names, copied as they are
        warnings.filterwarnings("ignore", "The string .* person name", UserWarning)
        seg = hd.seg.Segmentation(
            source_images=list(sources),
            pixel_array=pixels,
            segmentation_type=seg_type.upper(),
            segment_descriptions=_segments(hd, manifest, names),
            series_instance_uid=hd.UID(),
            series_number=_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="resfuse",
            manufacturer_model_name=str(manifest.data.get("name", manifest.path.stem))[:64],
            software_versions=_version(),
            device_serial_number="none",
            content_description=identity(manifest, seg_type),
            content_label="RESFUSE",
            series_description=identity(manifest, seg_type),
            omit_empty_frames=True,
        )
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _check_frame_of_reference(sources: Sequence[Any]) -> None:
    if not all(ds.get("FrameOfReferenceUID") for ds in sources):
        name = getattr(sources[0], "filename", None) or "the source series"
        raise InputContractError(
            f"{name} has no FrameOfReferenceUID, so no SEG can share its frame of reference; "
            f"pass images as the scanner or PACS wrote them (with their Frame of Reference)"
        )


def _segments(hd: Any, manifest: Manifest, names: list[str]) -> list[Any]:
    """One segment per class but background, named and locally coded."""
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=str(manifest.data.get("name", manifest.path.stem))[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=manifest.record("onnx")["sha256"][:_SHA_DIGITS],
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=hd.sr.CodedConcept(f"class{k}", _LOCAL_SCHEME, name[:64]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for k, name in enumerate(names)
        if k > 0
    ]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("resfuse")
    except PackageNotFoundError:
        return "unknown"
