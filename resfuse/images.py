"""Image files as model inputs, without loss: 8- and 16-bit PNG/TIFF, float32 TIFF and DICOM.

Medical images are 12- and 16-bit grayscale, so pixels are never squeezed through 8 bits. The
manifest's `preprocess` section says how raw values become [0, 1] (one intensity rule), then
`(x - mean) / std` per channel:

- "range": "dtype" (default): the full range of the file's type, 8-bit /255, 16-bit /65535,
  DICOM the range its BitsStored can hold; float images are taken as [0, 1] already.
- "range": [low, high]: fixed numbers (e.g. [0, 4095] for 12-bit data); values outside clip.
- "range": "image": each image's own min..max; contrast is stretched, but absolute intensity is
  lost and one bright pixel changes the whole image.
- "window": {"center": c, "width": w}: the range [c - w/2, c + w/2], as radiologists write it.
- "units": "rescaled" (default) or "stored": what a window or [low, high] is written in. DICOM
  values are rescaled (RescaleSlope/Intercept, e.g. Hounsfield units) or stored (the integers
  in the file); other files have no rescale, so both mean their raw values.
- "scale": s (manifests from before this module): 8-bit values times s, as they were read then.

Signed 16-bit TIFFs (Hounsfield units, say) are read under a window or [low, high] only: their
values mean something absolute, which "dtype" has no agreed range for and "image" would stretch
differently in every file. DICOM objects that are not images (SEG, RTSTRUCT, reports, 1-bit
masks) are refused by their SOP class, and every refusal is one line naming the fix.

Export (INT8 calibration) and runtime both read images here, so they cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn, TypeGuard

import numpy as np

from resfuse.contract import InputContract
from resfuse.errors import ConfigError, InputContractError
from resfuse.optional import optional_module
from resfuse.orientation import ORIENTATIONS, RADIOLOGICAL, InPlane, dicom_in_plane

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *DICOM_SUFFIXES)
RESIZE_POLICIES = ("none", "fit")
RANGE_RULES = ("dtype", "image")
UNITS = ("rescaled", "stored")  # what a window or [low, high] is written in (DICOM)
CLIP_NOTE_SHARE = 0.25  # a [low, high] range clipping more of an image than this is noted
# what a reader of an artifact does about a bad preprocess section
LOAD_FIX = "fix the preprocess section or re-export the artifact"
_FIELDS = ("range", "window", "units", "scale", "mean", "std", "resize", "slice_orientation")
_INTENSITY_FIELDS = ("range", "window", "scale")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")  # Pillow modes and raw modes of uint16
_SIGNED_SIXTEEN = ("I;16S", "I;16BS", "I;16LS", "I;16NS")  # int16, which Pillow loads as "I"
_GRAY_MODES = ("1", "L", "LA", "La", "I", "F", *_SIXTEEN_BIT)  # one channel (and alpha)


@dataclass(frozen=True)
class Pixels:
    """One image's raw values, (H, W, C) in the model's channel count, as the file holds them."""

    values: np.ndarray  # uint8, uint16, int16, float32 (Pillow) or float64 (DICOM, rescaled)
    # the "dtype" rule's range; None: float values, taken as 0..1, or signed integers, which
    # only a window or [low, high] places
    full_range: tuple[float, float] | None
    name: str  # for messages
    # (slope, intercept) that turned the file's stored integers into `values` (DICOM's
    # RescaleSlope/Intercept): a window or range in stored units goes through it too
    rescale: tuple[float, float] = (1.0, 0.0)
    # how the stored (H, W) turn to what the model sees (resfuse.orientation): DICOM images
    # and volume slices, whose place in the patient is known; other images as they are
    in_plane: InPlane = InPlane()


def find_images(folder: str | Path, option: str = "--images") -> list[Path]:
    """Every image file under `folder`, recursively, sorted; hidden files and folders skipped.
    `option` names the folder in errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{option} {folder} is not a folder of image files; pass a folder")
    found = [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(found)


def image_files(folder: str | Path, option: str = "--images") -> list[Path]:
    """find_images(folder), refusing a folder that holds none."""
    files = find_images(folder, option)
    if not files:
        raise ConfigError(f"{option} {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def grayscale_note(files: Sequence[Path], channels: int) -> str | None:
    """One line for a run that feeds grayscale files to a 3-channel model, else None: each is
    repeated to 3 channels, which is right for a grayscale-trained model and wrong for a colour
    one, so the user is told once rather than per image."""
    gray = [f for f in files if is_grayscale(f)] if channels == 3 else []
    if not gray:
        return None
    return (
        f"{len(gray)} of {len(files)} images are grayscale (first: {gray[0]}); each is repeated "
        f"to the model's 3 channels: pass colour images if the model was trained on colour"
    )


def is_grayscale(path: Path) -> bool:
    """Whether an image file holds one channel, from its header (DICOM: resfuse reads grayscale
    only). An unreadable file is not: reading it for inference reports its problem."""
    if _is_dicom(path):
        return True
    try:
        with pil().open(path) as image:
            return bool(image.mode in _GRAY_MODES)
    except Exception:  # noqa: BLE001 - any unreadable file, as above
        return False


def pil() -> Any:
    """PIL.Image, or an error naming the extra that installs it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError("image inputs need Pillow: pip install 'resfuse[images]'") from exc
    return Image


def pydicom() -> Any:
    return optional_module("pydicom", "DICOM input", "dicom")


def is_image(x: object) -> bool:
    """A path, a PIL image or a pydicom dataset: something load_image reads."""
    if isinstance(x, (str, Path)):
        return True
    return type(x).__module__.startswith(("PIL.", "pydicom."))


def preprocess_record(
    channels: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    value_range: str | Sequence[float] | None = None,
    window: Mapping[str, float] | None = None,
    resize: str = "none",
    units: str | None = None,
) -> dict[str, Any]:
    """The manifest's preprocess section: a window or a range (default "dtype"), with the
    units it is written in (a window or [low, high] only: "rescaled" unless `units` says
    "stored"), mean, std."""
    if window is not None and value_range is not None:
        raise ConfigError("give a window or a range for image intensities, not both; drop one")
    if window is not None:
        intensity: dict[str, Any] = {"window": dict(window)}
    elif value_range is None or isinstance(value_range, str):
        intensity = {"range": value_range or "dtype"}
    else:
        intensity = {"range": list(value_range)}
    if _is_fixed(intensity):
        intensity["units"] = units or "rescaled"
    elif units is not None:
        raise ConfigError(
            f"intensity units say what a window or a LOW,HIGH range is written in, and the "
            f"{intensity['range']!r} rule has neither: add --window or --intensity-range "
            f"LOW,HIGH, or drop --intensity-units"
        )
    record = {
        **intensity,
        "mean": list(mean),
        "std": list(std),
        "resize": resize,
        "slice_orientation": RADIOLOGICAL,
    }
    check_preprocess(record, channels, "fix the preprocessing options")
    return record


class PreprocessError(ConfigError):
    """A preprocess section or policy that does not fit: `problem` names the field in one line,
    and the message adds what to do where it was met (`fix`)."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem if fix is None else f"{problem}; {fix}")
        self.problem = problem


def _bad(problem: str) -> NoReturn:
    raise PreprocessError(problem)


def check_preprocess(preprocess: object, channels: int, fix: str | None = None) -> None:
    """Raise PreprocessError naming the first bad field of a preprocess section for `channels`
    inputs, with `fix` after it. Every field is optional: range "dtype", mean 0, std 1, resize
    "none"."""
    try:
        _check_fields(preprocess, channels)
    except PreprocessError as exc:
        raise PreprocessError(exc.problem, fix) from None


def _check_fields(preprocess: object, channels: int) -> None:
    if not isinstance(preprocess, dict):
        _bad(f"preprocess must be an object, got {_shown(preprocess)}")
    unknown = [key for key in preprocess if key not in _FIELDS]
    if unknown:
        _bad(f"preprocess.{unknown[0]} is not a known field; allowed: {', '.join(_FIELDS)}")
    rules = [key for key in _INTENSITY_FIELDS if key in preprocess]
    if len(rules) > 1:
        _bad(f"preprocess has both {rules[0]} and {rules[1]}; keep one intensity rule")
    if "range" in preprocess:
        _check_range(preprocess["range"])
    if "window" in preprocess:
        _check_window(preprocess["window"])
    _check_units(preprocess)
    if "scale" in preprocess:
        _check_positive(preprocess["scale"], "scale")
    _check_list(preprocess.get("mean", [0.0] * channels), "mean", channels, positive=False)
    _check_list(preprocess.get("std", [1.0] * channels), "std", channels, positive=True)
    check_resize(preprocess.get("resize", "none"), "preprocess.resize")
    orientation = preprocess.get("slice_orientation", RADIOLOGICAL)
    if orientation not in ORIENTATIONS:
        _bad(
            f"preprocess.slice_orientation {_shown(orientation)} is unknown; "
            f"allowed: {', '.join(ORIENTATIONS)}"
        )


def load_image(
    source: str | Path | Any,
    preprocess: dict[str, Any],
    contract: InputContract,
    resize: str | None = None,
    *,
    size: tuple[int, int] | None = None,
    on_clip: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Read an image file, PIL image or pydicom dataset as (1, C, H, W) float32: C from the
    contract, resized by `resize` (default: the manifest's policy) or to `size` (H, W) exactly,
    intensities to [0, 1] by the preprocess rule, then (x - mean) / std. `on_clip` is called
    once, with a one-line note, when a [low, high] range clips more than CLIP_NOTE_SHARE of the
    image's pixels."""
    if contract.channels not in (1, 3):
        raise ConfigError(
            f"image files give 1 or 3 channels; this model takes {contract.channels}: pass arrays"
        )
    check_preprocess(preprocess, contract.channels, LOAD_FIX)
    pixels = read_pixels(source, contract.channels)
    return to_input(pixels, preprocess, contract, resize, size=size, on_clip=on_clip)


def to_input(
    pixels: Pixels,
    preprocess: dict[str, Any],
    contract: InputContract,
    resize: str | None = None,
    *,
    size: tuple[int, int] | None = None,
    on_clip: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Raw values (an image file's, or one slice of a volume's) as the model's (1, C, H, W)
    float32 input, by the same rule load_image applies; `preprocess` is already validated.
    `on_clip`: called once with a one-line note when the rule clips a large share of these
    pixels (see load_image)."""
    policy = resize or preprocess.get("resize", "none")
    check_resize(policy, "resize policy")
    to_unit = _intensity(pixels, preprocess, on_clip)  # from the whole image, before any resize
    values = pixels.in_plane.to_model(pixels.values, (0, 1))
    if size is None and policy == "fit":
        size = _fit_size(values.shape[0], values.shape[1], contract)
    values = values if size is None else _resize(values, size)
    x = to_unit(values)
    mean = np.asarray(preprocess.get("mean", [0.0] * contract.channels), dtype=np.float32)
    std = np.asarray(preprocess.get("std", [1.0] * contract.channels), dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def read_pixels(source: str | Path | Any, channels: int) -> Pixels:
    """The raw values of an image file, PIL image or pydicom dataset, refusing what Pillow or
    pydicom cannot give faithfully; grayscale is repeated for a 3-channel model."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        pixels = _read_dicom(path) if _is_dicom(path) else _read_pil_file(path, channels)
    elif type(source).__module__.startswith("pydicom."):
        pixels = _from_dicom(source, str(getattr(source, "filename", None) or "DICOM dataset"))
    else:
        pixels = _from_pil(source, channels, "the PIL image")
    if pixels.values.shape[2] != channels:
        return replace(pixels, values=np.repeat(pixels.values, channels, axis=2))
    return pixels


def _read_pil_file(path: Path, channels: int) -> Pixels:
    image_mod = pil()
    try:
        with image_mod.open(path) as opened:
            frames = getattr(opened, "n_frames", 1)
            if frames > 1:
                raise InputContractError(
                    f"{path} holds {frames} frames; resfuse reads one 2-D image per file: "
                    f"save each frame as its own file"
                )
            rawmode = _rawmode(opened)  # the file's sample format; gone once loaded
            signed = _signed_tiff(opened)
            image = opened.copy()
    except OSError as exc:  # PIL's UnidentifiedImageError included
        raise InputContractError(f"cannot read {path} as an image: {exc}") from exc
    return _from_pil(image, channels, str(path), rawmode, signed)


def _signed_tiff(image: Any) -> bool:
    """A TIFF whose SampleFormat (tag 339) says signed integers: Pillow's rawmode says so for
    16-bit samples, but it reads 8-bit ones as unsigned mode L without a word."""
    tags = getattr(image, "tag_v2", None)
    value = tags.get(339) if tags is not None else None
    formats = value if isinstance(value, tuple) else (value,)
    return 2 in formats


def _rawmode(image: Any) -> str | None:
    """How the file stores samples (e.g. "I;16B", "RGB;16B"), while Pillow has not loaded it."""
    tile = getattr(image, "tile", None)
    if not tile:
        return None
    args = tile[0].args
    return args if isinstance(args, str) else str(args[0])


def _from_pil(
    image: Any, channels: int, name: str, rawmode: str | None = None, signed: bool = False
) -> Pixels:
    """Pillow keeps 16-bit grayscale (mode I;16, or I from an I;16 or I;16S file) and float32
    (mode F); it reads 16-bit colour as 8-bit, so that and 32-bit integers are refused. `signed`:
    a TIFF of signed samples, whose 8-bit grayscale Pillow reads as unsigned."""
    mode = image.mode
    if signed and mode == "L":  # the bytes are int8: reinterpret, as the file means them
        return Pixels(np.asarray(image).view(np.int8)[..., None], None, name)
    if mode in _SIXTEEN_BIT or (mode == "I" and rawmode in _SIXTEEN_BIT):
        return Pixels(np.asarray(image).astype(np.uint16)[..., None], (0.0, 65535.0), name)
    if mode in _SIGNED_SIXTEEN or (mode == "I" and rawmode in _SIGNED_SIXTEEN):
        # no full range: only a window or [low, high] places signed values (_range)
        return Pixels(np.asarray(image).astype(np.int16)[..., None], None, name)
    if mode == "F":
        return Pixels(np.asarray(image, dtype=np.float32)[..., None], None, name)
    if mode == "I":
        raise InputContractError(
            f"{name} holds 32-bit integers (Pillow mode I), which have no fixed range; save it "
            f"as 16-bit PNG/TIFF (signed values need a window or range) or float32 TIFF"
        )
    if rawmode is not None and ";16" in rawmode:
        raise InputContractError(
            f"{name} is 16-bit {mode}, which Pillow reads only as 8-bit; save it as 16-bit "
            f"grayscale or as one 16-bit file per channel"
        )
    converted = image.convert("L" if channels == 1 else "RGB")
    eight_bit = np.asarray(converted, dtype=np.uint8).reshape(image.height, image.width, -1)
    return Pixels(eight_bit, (0.0, 255.0), name)


def _is_dicom(path: Path) -> bool:
    """A .dcm/.dicom name, or the DICOM preamble ("DICM" at byte 128) in a file named otherwise."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as file:
            file.seek(128)
            return file.read(4) == b"DICM"
    except OSError:
        return False  # Pillow names the problem


def _read_dicom(path: Path) -> Pixels:
    module = pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        dataset = module.dcmread(path)
    except (OSError, EOFError, InvalidDicomError) as exc:
        raise InputContractError(f"cannot read {path} as DICOM: {_one_line(exc)}") from exc
    return _from_dicom(dataset, str(path))


def _from_dicom(dataset: Any, name: str) -> Pixels:
    """Stored values times RescaleSlope plus RescaleIntercept (e.g. Hounsfield units for CT)."""
    _check_dicom(dataset, name)
    try:
        stored = dataset.pixel_array
    except (AttributeError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise InputContractError(_decode_problem(dataset, name, exc)) from exc
    slope = float(dataset.get("RescaleSlope", None) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", None) or 0.0)
    values = stored.astype(np.float64) * slope + intercept
    bits = int(dataset.BitsStored)
    signed = int(dataset.PixelRepresentation) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ends = sorted((low * slope + intercept, high * slope + intercept))  # a slope may be negative
    plane = dicom_plane(dataset)
    return Pixels(values[..., None], (ends[0], ends[1]), name, (slope, intercept), plane)


def dicom_plane(dataset: Any) -> InPlane:
    """How a DICOM image turns to the model's slice orientation: from its
    ImageOrientationPatient; as stored when it has none (projection X-rays) or a broken one."""
    try:
        cosines = np.asarray([float(v) for v in dataset.ImageOrientationPatient])
    except (AttributeError, TypeError, ValueError):
        return InPlane()
    if cosines.shape != (6,) or not np.all(np.isfinite(cosines)):
        return InPlane()
    if min(np.linalg.norm(cosines[:3]), np.linalg.norm(cosines[3:])) < 0.5:
        return InPlane()
    return dicom_in_plane(cosines)


def output_plane(source: str | Path | Any) -> InPlane:
    """How a model output for `source` (a path or opened image) turns back onto its pixels:
    read from a DICOM file's header only; images other than DICOM are as stored."""
    if isinstance(source, (str, Path)):
        if not _is_dicom(Path(source)):
            return InPlane()
        try:
            source = pydicom().dcmread(source, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - it was read whole before this; now it is gone
            return InPlane()
    if type(source).__module__.startswith("pydicom."):
        return dicom_plane(source)
    return InPlane()


# What pip installs a decoder for each compressed transfer syntax (pydicom's pixel plugins).
_LIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
_JPEG_LS = "pip install pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)"
_OPENJPEG = "pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
_HTJ2K = "pip install pylibjpeg pylibjpeg-openjpeg"
_DECODERS = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG,  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG Extended (12-bit), which Pillow cannot read
    "1.2.840.10008.1.2.4.57": _LIBJPEG,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": _JPEG_LS,
    "1.2.840.10008.1.2.4.81": _JPEG_LS,
    "1.2.840.10008.1.2.4.90": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.91": _OPENJPEG,
    "1.2.840.10008.1.2.4.201": _HTJ2K,  # High-Throughput JPEG 2000
    "1.2.840.10008.1.2.4.202": _HTJ2K,
    "1.2.840.10008.1.2.4.203": _HTJ2K,
}


def _decode_problem(dataset: Any, name: str, exc: Exception) -> str:
    """One line for pixel data pydicom could not decode: for a compressed transfer syntax, the
    syntax and the package that decodes it (pydicom's own message spans several lines)."""
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return f"cannot decode the pixel data of {name}: {_one_line(exc)}"
    # pydicom lists every plugin's missing dependencies, which the install line below names;
    # a plugin that is installed but failed (Pillow on 12-bit JPEG) says why.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = "; ".join(lines[1:]) or " ".join(lines)  # below pydicom's heading, if any
    detail = "" if "missing dependencies" in str(exc) else f" ({reasons})"
    install = _DECODERS.get(str(syntax), "pip install pylibjpeg with its plugins, or python-gdcm")
    return (
        f"cannot decode {name}: its pixel data are compressed as {syntax.name} ({syntax}), "
        f"which no decoder installed here reads{detail}; {install}"
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# DICOM objects that are not images, by SOP Class UID, and the families of such classes.
_NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a Segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.66.5": "a Surface Segmentation",
    "1.2.840.10008.5.1.4.1.1.66": "Raw Data",
    "1.2.840.10008.5.1.4.1.1.66.1": "a Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.66.3": "a Deformable Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT Dose grid",  # DoseGridScaling, not a rescale
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT Structure Set (RTSTRUCT)",
    "1.2.840.10008.5.1.4.1.1.481.5": "an RT Plan",
    "1.2.840.10008.5.1.4.1.1.481.8": "an RT Ion Plan",
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "an encapsulated CDA document",
    "1.2.840.10008.5.1.4.1.1.104.3": "an encapsulated STL model",
}
_NOT_IMAGE_FAMILIES = {
    "1.2.840.10008.5.1.4.1.1.88.": "a Structured Report",
    "1.2.840.10008.5.1.4.1.1.9.": "a waveform",
    "1.2.840.10008.5.1.4.1.1.11.": "a Presentation State",
}


def _not_an_image(dataset: Any) -> str | None:
    """What a DICOM object is, by its SOP class, when that is not an image; else None."""
    meta = getattr(dataset, "file_meta", None)
    uid = str(dataset.get("SOPClassUID", None) or getattr(meta, "MediaStorageSOPClassUID", ""))
    kind = _NOT_IMAGES.get(uid) or next(
        (what for prefix, what in _NOT_IMAGE_FAMILIES.items() if uid.startswith(prefix)), None
    )
    return None if kind is None else f"{kind} (SOP Class {uid})"


def _check_dicom(dataset: Any, name: str) -> None:
    """An image (not a segmentation, structure set or document) of one grayscale frame of
    integers, which a linear rescale maps to their meaning."""
    kind = _not_an_image(dataset)
    if kind is not None:
        raise InputContractError(
            f"{name} is {kind}, not an image; pass the image files (CT, MR, X-ray, ...)"
        )
    if int(dataset.get("BitsAllocated", None) or 0) == 1:
        raise InputContractError(
            f"{name} holds a 1-bit mask (BitsAllocated 1), not an image; pass the image files"
        )
    if "PixelData" not in dataset:
        raise InputContractError(
            f"{name} holds no integer Pixel Data (a report or plan, or float pixel data); "
            f"pass DICOM images"
        )
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    if photometric == "MONOCHROME1":
        raise InputContractError(
            f"{name} is MONOCHROME1 (white is low values); resfuse reads MONOCHROME2 only: "
            f"invert it and set PhotometricInterpretation to MONOCHROME2"
        )
    if photometric != "MONOCHROME2":
        raise InputContractError(
            f"{name} is {photometric or 'of unknown colour'}; resfuse reads grayscale "
            f"(MONOCHROME2) DICOM only: convert it to grayscale"
        )
    image_type = dataset.get("ImageType", None) or []
    kinds = [image_type] if isinstance(image_type, str) else list(image_type)
    if "MOSAIC" in [str(kind).strip().upper() for kind in kinds]:
        raise InputContractError(
            f"{name} is a Siemens MOSAIC: one file tiles a whole volume's slices in a grid, "
            f"which resfuse does not take apart; convert it with dcm2niix and pass the NIfTI"
        )
    frames = int(dataset.get("NumberOfFrames", None) or 1)
    if frames > 1:
        raise InputContractError(
            f"{name} holds {frames} frames; resfuse reads one 2-D image per file: save each "
            f"frame as its own file"
        )
    if "ModalityLUTSequence" in dataset:
        raise InputContractError(
            f"{name} maps stored values by a Modality LUT; resfuse applies RescaleSlope and "
            f"RescaleIntercept only: convert it to a rescaled image"
        )


def _intensity(
    pixels: Pixels, preprocess: dict[str, Any], on_clip: Callable[[str], None] | None
) -> Callable[[np.ndarray], np.ndarray]:
    """The map from raw values to [0, 1] that the preprocess rule gives for this image; a
    [low, high] range that clips much of it is told to `on_clip`."""
    if "scale" in preprocess:
        return _legacy_scale(pixels, float(preprocess["scale"]))
    ends = _fixed_ends(pixels, preprocess)
    if ends is None:
        low, high = _range(pixels, preprocess.get("range", "dtype"))
    else:
        low, high = ends
        note = _clip_note(pixels, preprocess, low, high)
        if note is not None and on_clip is not None:
            on_clip(note)
    return lambda values: _to_unit(values, low, high)


def clip_note(pixels: Pixels, preprocess: dict[str, Any]) -> str | None:
    """The note load_image tells `on_clip` for these values, or None: for values read in parts
    (a volume's slices), so that the whole is judged, and told, once."""
    ends = _fixed_ends(pixels, preprocess)
    return None if ends is None else _clip_note(pixels, preprocess, *ends)


def _fixed_ends(pixels: Pixels, preprocess: dict[str, Any]) -> tuple[float, float] | None:
    """A window's or [low, high]'s ends in the units of these values; None for the rules
    that take their range from the values (dtype, image) and for the legacy scale."""
    fixed = None if "scale" in preprocess else _fixed_range(preprocess)
    if fixed is None:
        return None
    return _in_value_units(fixed, pixels, preprocess.get("units", "rescaled"))


def _is_fixed(preprocess: dict[str, Any]) -> bool:
    """A window or [low, high]: the rules that are written in units (preprocess.units)."""
    return "window" in preprocess or not isinstance(preprocess.get("range", "dtype"), str)


def _fixed_range(preprocess: dict[str, Any]) -> tuple[float, float] | None:
    """The window's or [low, high]'s ends as the manifest writes them, else None."""
    if "window" in preprocess:
        center, width = float(preprocess["window"]["center"]), float(preprocess["window"]["width"])
        return center - width / 2, center + width / 2
    if _is_fixed(preprocess):
        return float(preprocess["range"][0]), float(preprocess["range"][1])
    return None


def _in_value_units(ends: tuple[float, float], pixels: Pixels, units: str) -> tuple[float, float]:
    """A range in stored units mapped, as the values were, through the rescale: (x - low) /
    (high - low) is then the same number on stored or rescaled values (a negative slope swaps
    the ends, which _to_unit takes as they come)."""
    if units == "rescaled":
        return ends
    slope, intercept = pixels.rescale
    return ends[0] * slope + intercept, ends[1] * slope + intercept


def _clip_note(pixels: Pixels, preprocess: dict[str, Any], low: float, high: float) -> str | None:
    """One line when a [low, high] range clips more than CLIP_NOTE_SHARE of the image, else
    None. A window is left alone: clipping what lies outside it is what a window is for (a
    soft-tissue window clips 32% of pydicom's CT_small.dcm)."""
    if "window" in preprocess:
        return None
    bottom, top = min(low, high), max(low, high)
    values = pixels.values
    share = np.count_nonzero((values < bottom) | (values > top)) / values.size
    if share <= CLIP_NOTE_SHARE:
        return None
    written = preprocess["range"]
    units = ""  # without a rescale, stored and rescaled are the same numbers
    if pixels.rescale != (1.0, 0.0):
        units = {
            "rescaled": " (rescaled units, after RescaleSlope/Intercept)",
            "stored": " (stored values, before RescaleSlope/Intercept)",
        }[preprocess.get("units", "rescaled")]
    return (
        f"{pixels.name}: {share:.0%} of pixels fall outside the intensity range "
        f"[{written[0]:g}, {written[1]:g}]{units} and are clipped; if the artifact's range "
        f"does not fit these images (CT in Hounsfield units needs a window or a range in HU: "
        f"--window 40,400, --intensity-range -1024,3071), re-export with one that does"
    )


def _legacy_scale(pixels: Pixels, scale: float) -> Callable[[np.ndarray], np.ndarray]:
    """Old manifests' `scale`: 8-bit values times it, exactly as read before 16-bit support."""
    if pixels.values.dtype != np.uint8:
        raise InputContractError(
            f"{pixels.name} is not an 8-bit image, and this artifact's preprocess.scale (from "
            f"before 16-bit support) reads 8-bit images only; re-export the artifact"
        )
    return lambda values: values.astype(np.float32) * np.float32(scale)


def _range(pixels: Pixels, rule: str) -> tuple[float, float]:
    """The "dtype" or "image" rule's range for this image."""
    if pixels.full_range is None and pixels.values.dtype.kind == "i":
        bits = pixels.values.dtype.itemsize * 8
        raise InputContractError(
            f"{pixels.name} holds signed {bits}-bit values, which the {rule!r} rule cannot "
            f"place; export with --window C,W or --intensity-range LOW,HIGH"
        )
    if rule == "image":
        return float(pixels.values.min()), float(pixels.values.max())
    if pixels.full_range is not None:
        return pixels.full_range
    low, high = float(pixels.values.min()), float(pixels.values.max())
    if not (low >= 0.0 and high <= 1.0):  # NaN fails too
        raise InputContractError(
            f"{pixels.name} is a float image with values {low:g}..{high:g}, outside the 0..1 "
            f'that preprocess.range "dtype" assumes for float images; record a range '
            f'([low, high] or "image") in the preprocess section'
        )
    return 0.0, 1.0


def _to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """(values - low) / (high - low) clipped to [0, 1], rounded to float32 once."""
    if high == low:  # only "image" on a flat image: no contrast to stretch
        return np.zeros(values.shape, np.float32)
    x = (values.astype(np.float64) - low) / (high - low)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _fit_size(h: int, w: int, contract: InputContract) -> tuple[int, int]:
    """(H, W) scaled, keeping the aspect ratio, into the contract's H and W range."""
    factor = 1.0
    hmax, wmax = contract.height.max, contract.width.max
    if hmax is not None and wmax is not None and (h > hmax or w > wmax):
        factor = min(hmax / h, wmax / w)
    if h * factor < contract.height.min or w * factor < contract.width.min:
        factor = max(contract.height.min / h, contract.width.min / w)
    return max(1, round(h * factor)), max(1, round(w * factor))


def _resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear to (H, W) with Pillow: 8-bit in Pillow's 8-bit modes, as resfuse always has
    (INT8 calibrations stay reproducible); anything else per channel in float32, unrounded."""
    h, w = size
    if values.shape[:2] == (h, w):
        return values
    image_mod = pil()
    bilinear = image_mod.Resampling.BILINEAR
    if values.dtype == np.uint8:
        image = image_mod.fromarray(values if values.shape[2] == 3 else values[..., 0])
        return np.asarray(image.resize((w, h), bilinear)).reshape(h, w, -1)
    planes = [
        np.asarray(image_mod.fromarray(values[..., c].astype(np.float32)).resize((w, h), bilinear))
        for c in range(values.shape[2])
    ]
    return np.stack(planes, axis=-1)


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_range(rule: object) -> None:
    if isinstance(rule, str):
        if rule not in RANGE_RULES:
            _bad(f"preprocess.range must be 'dtype', 'image' or [low, high], got {_shown(rule)}")
        return
    if not isinstance(rule, (list, tuple)) or len(rule) != 2:
        _bad(f"preprocess.range must be 'dtype', 'image' or [low, high], got {_shown(rule)}")
    for i, value in enumerate(rule):
        if not _number(value):
            _bad(f"preprocess.range[{i}] must be a number, got {_shown(value)}")
    if not rule[0] < rule[1]:
        _bad(f"preprocess.range must have low < high, got {_shown(rule)}")


def _check_units(preprocess: dict[str, Any]) -> None:
    if "units" not in preprocess:
        return
    units = preprocess["units"]
    if not isinstance(units, str) or units not in UNITS:
        _bad(f"preprocess.units must be one of {', '.join(UNITS)}, got {_shown(units)}")
    if not _is_fixed(preprocess):
        _bad("preprocess.units applies to a window or a [low, high] range only; drop it")


def _check_window(window: object) -> None:
    if not isinstance(window, dict) or set(window) != {"center", "width"}:
        _bad(f'preprocess.window must be {{"center": c, "width": w}}, got {_shown(window)}')
    if not _number(window["center"]):
        _bad(f"preprocess.window.center must be a number, got {_shown(window['center'])}")
    _check_positive(window["width"], "window.width")


def _check_positive(value: object, field: str) -> None:
    if not (_number(value) and value > 0):
        _bad(f"preprocess.{field} must be a positive number, got {_shown(value)}")


def _check_list(values: object, field: str, channels: int, positive: bool) -> None:
    if not isinstance(values, (list, tuple)) or len(values) != channels:
        _bad(f"preprocess.{field} must be a list of {channels} numbers, got {_shown(values)}")
    for i, value in enumerate(values):
        if positive:
            _check_positive(value, f"{field}[{i}]")
        elif not _number(value):
            _bad(f"preprocess.{field}[{i}] must be a number, got {_shown(value)}")


def check_resize(policy: object, field: str) -> None:
    """Refuse a resize policy other than RESIZE_POLICIES, naming `field`."""
    if not (isinstance(policy, str) and policy in RESIZE_POLICIES):
        _bad(f"{field} must be one of {', '.join(RESIZE_POLICIES)}, got {_shown(policy)}")
