"""Image files read without loss: real 8/16-bit PNG and TIFF written by Pillow, and pydicom's own
CT and MR samples, against the values the libraries themselves read."""

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from resfuse.contract import InputContract, Range
from resfuse.errors import ConfigError, InputContractError
from resfuse.export.pipeline import ExportOptions
from resfuse.export.quantize import Calibration
from resfuse.images import PreprocessError, check_preprocess, load_image, preprocess_record
from resfuse.models import ModelConfig
from resfuse.runtime.inputs import IMAGE_SUFFIXES, image_files

GRAY = InputContract(1, Range(1, 4096), Range(1, 4096))
RGB = InputContract(3, Range(1, 4096), Range(1, 4096))
LEGACY = {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3, "resize": "none"}
CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")


def _ramp12() -> np.ndarray:
    """Every 12-bit value once, 64 x 64."""
    return np.arange(4096, dtype=np.uint16).reshape(64, 64)


def _written(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    with Image.open(path) as image:  # the round trip through the file is exact
        np.testing.assert_array_equal(np.asarray(image), pixels)
    return path


def _png16(path: Path, pixels: np.ndarray, color_type: int) -> Path:
    """A 16-bit colour PNG (IHDR, zlib IDAT, IEND), which Pillow cannot write but reads."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    h, w = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(signature + body)
    return path


def _exact(values: np.ndarray) -> np.ndarray:
    """float64 values rounded once to float32, as a (1, 1, H, W) input."""
    return values.astype(np.float32)[None, None]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_twelve_bit_ramp_loads_exactly(tmp_path: Path, suffix: str) -> None:
    ramp = _ramp12()
    path = _written(tmp_path / f"ramp{suffix}", ramp)
    with Image.open(path) as image:
        assert image.mode == "I;16"
    twelve = load_image(path, {"range": [0, 4095]}, GRAY)
    np.testing.assert_array_equal(twelve, _exact(ramp / 4095))
    assert np.count_nonzero(twelve == 1.0) == 1  # only 4095 saturates, not 94% of the ramp
    np.testing.assert_array_equal(load_image(path, {}, GRAY), _exact(ramp / 65535))
    rgb = load_image(path, {"range": "dtype"}, RGB)
    assert rgb.shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(rgb[:, 2:], _exact(ramp / 65535))  # grey in every channel


def test_sixteen_bit_file_that_pillow_opens_as_mode_i(tmp_path: Path) -> None:
    ramp = _ramp12()
    Image.fromarray(ramp).save(tmp_path / "ramp.pgm")  # Pillow reads it back as mode I
    with Image.open(tmp_path / "ramp.pgm") as image:
        assert image.mode == "I"
    out = load_image(tmp_path / "ramp.pgm", {"range": [0, 4095]}, GRAY)
    np.testing.assert_array_equal(out, _exact(ramp / 4095))


def test_eight_bit_png_reads_as_before(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = _written(tmp_path / "rgb.png", pixels)
    mean, std = np.float32(LEGACY["mean"]), np.float32(LEGACY["std"])
    before = (pixels.astype(np.float32) * np.float32(1 / 255) - mean) / std  # the old reader
    np.testing.assert_array_equal(load_image(path, LEGACY, RGB)[0], before.transpose(2, 0, 1))
    new = {k: v for k, v in LEGACY.items() if k != "scale"}  # a new manifest: range "dtype"
    dtype = (pixels / 255).astype(np.float32)
    np.testing.assert_array_equal(
        load_image(path, new, RGB)[0], ((dtype - mean) / std).transpose(2, 0, 1)
    )
    # the two rules round x / 255 differently, by at most one float32 step
    np.testing.assert_allclose(load_image(path, new, RGB), load_image(path, LEGACY, RGB), atol=3e-7)
    gray = np.asarray(Image.fromarray(pixels).convert("L"), np.float32) * np.float32(1 / 255)
    legacy_gray = {"scale": 1 / 255}
    np.testing.assert_array_equal(load_image(path, legacy_gray, GRAY)[0, 0], gray)


def test_eight_bit_resize_matches_pillow_as_before(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    path = _written(tmp_path / "rgb.png", pixels)
    with Image.open(path) as image:
        resized = image.resize((33, 21), Image.Resampling.BILINEAR)  # the old calibration path
    np.testing.assert_array_equal(
        load_image(path, LEGACY, RGB, size=(21, 33)), load_image(resized, LEGACY, RGB)
    )


def test_sixteen_bit_resize_is_not_rounded(tmp_path: Path) -> None:
    pixels = np.array([[0, 1], [2, 3]], np.uint16)
    path = _written(tmp_path / "tiny.png", pixels)
    out = load_image(path, {"range": [0, 4]}, GRAY, size=(4, 4))
    assert out.shape == (1, 1, 4, 4)
    assert np.count_nonzero(out * 4 != np.round(out * 4)) > 0  # between integer values
    ramp = _written(tmp_path / "ramp.png", _ramp12())
    image_rule = load_image(ramp, {"range": "image"}, GRAY, size=(32, 32))  # the file's range,
    twelve = load_image(ramp, {"range": [0, 4095]}, GRAY, size=(32, 32))  # not the resized one
    np.testing.assert_array_equal(image_rule, twelve)
    fit = InputContract(1, Range(8, 16), Range(8, 16))
    assert load_image(path, {}, fit, resize="fit").shape == (1, 1, 8, 8)


def test_float_tiff(tmp_path: Path) -> None:
    unit = np.linspace(0, 1, 48 * 32, dtype=np.float32).reshape(48, 32)
    path = _written(tmp_path / "unit.tif", unit)
    with Image.open(path) as image:
        assert image.mode == "F"
    np.testing.assert_array_equal(load_image(path, {}, GRAY), unit[None, None])
    hounsfield = unit * 3000 - 1000
    path = _written(tmp_path / "hu.tif", hounsfield)
    with pytest.raises(InputContractError, match=r"hu.tif is a float image with values -1000"):
        load_image(path, {}, GRAY)
    image_rule = load_image(path, {"range": "image"}, GRAY)
    hounsfield64 = hounsfield.astype(np.float64)
    np.testing.assert_array_equal(image_rule, _exact((hounsfield64 + 1000) / 3000))
    clipped = load_image(path, {"range": [0, 1000]}, GRAY)
    np.testing.assert_array_equal(clipped, _exact(np.clip(hounsfield64 / 1000, 0, 1)))


def test_flat_image_under_image_rule_is_zero(tmp_path: Path) -> None:
    path = _written(tmp_path / "flat.png", np.full((8, 8), 700, np.uint16))
    np.testing.assert_array_equal(load_image(path, {"range": "image"}, GRAY), 0)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: _png16(p / "rgb16.png", np.ones((4, 5, 3)) * 1000, 2), "is 16-bit RGB, which"),
        (lambda p: _png16(p / "la16.png", np.ones((4, 5, 2)) * 1000, 4), "is 16-bit RGBA, which"),
        (
            lambda p: _written(p / "i32.tif", np.arange(16, dtype=np.int32).reshape(4, 4)),
            r"holds 32-bit integers \(Pillow mode I\)",
        ),
        (
            lambda p: (
                Image.fromarray(_ramp12()).save(
                    p / "stack.tif", save_all=True, append_images=[Image.fromarray(_ramp12())]
                )
                or p / "stack.tif"
            ),
            "stack.tif holds 2 frames",
        ),
    ],
)
def test_images_read_with_loss_are_refused(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InputContractError, match=message):
        load_image(path, {}, RGB)


def test_legacy_scale_refuses_what_it_never_read(tmp_path: Path) -> None:
    path = _written(tmp_path / "ramp.png", _ramp12())
    with pytest.raises(InputContractError, match="ramp.png is not an 8-bit image.*re-export"):
        load_image(path, {"scale": 1 / 255}, GRAY)
    with pytest.raises(InputContractError, match="CT_small.dcm is not an 8-bit image"):
        load_image(CT, {"scale": 1 / 255}, GRAY)


def _hounsfield(path: str) -> tuple[pydicom.Dataset, np.ndarray]:
    dataset = pydicom.dcmread(path)
    slope = float(dataset.get("RescaleSlope", 1))
    intercept = float(dataset.get("RescaleIntercept", 0))
    return dataset, dataset.pixel_array.astype(np.float64) * slope + intercept


def test_ct_rescaled_and_windowed_as_pydicom_reads_it() -> None:
    dataset, hu = _hounsfield(CT)
    assert dataset.RescaleIntercept == -1024 and hu.min() < 0  # really rescaled, to HU
    soft_tissue = {"window": {"center": 40, "width": 400}}
    np.testing.assert_array_equal(
        load_image(CT, soft_tissue, GRAY), _exact(np.clip((hu + 160) / 400, 0, 1))
    )
    np.testing.assert_array_equal(
        load_image(CT, {"range": [-1000, 1000]}, GRAY), _exact(np.clip((hu + 1000) / 2000, 0, 1))
    )
    stored = (-(2**15) - 1024, 2**15 - 1 - 1024)  # int16 BitsStored 16, rescaled
    unwindowed = load_image(CT, {}, GRAY)
    np.testing.assert_array_equal(unwindowed, _exact((hu - stored[0]) / (stored[1] - stored[0])))
    assert np.ptp(unwindowed) < np.ptp(load_image(CT, soft_tissue, GRAY)) / 10


def test_mr_by_its_own_range_and_by_a_window() -> None:
    _, values = _hounsfield(MR)
    low, high = values.min(), values.max()
    np.testing.assert_array_equal(
        load_image(MR, {"range": "image"}, GRAY), _exact((values - low) / (high - low))
    )
    window = {"window": {"center": 600, "width": 1600}}
    np.testing.assert_array_equal(
        load_image(MR, window, RGB)[:, 1:2], _exact(np.clip((values + 200) / 1600, 0, 1))
    )


def test_dicom_dataset_and_file_without_suffix(tmp_path: Path) -> None:
    expected = load_image(CT, {"range": [-1000, 1000]}, GRAY)
    shutil.copy(CT, tmp_path / "IM0001")  # as PACS exports name them
    np.testing.assert_array_equal(
        load_image(tmp_path / "IM0001", {"range": [-1000, 1000]}, GRAY), expected
    )
    dataset = pydicom.dcmread(CT)
    np.testing.assert_array_equal(load_image(dataset, {"range": [-1000, 1000]}, GRAY), expected)


def _ct_copy(folder: Path, name: str, **changes: object) -> str:
    """pydicom's CT sample with some attributes changed (None: removed), saved as `name`."""
    dataset = pydicom.dcmread(CT)
    for key, value in changes.items():
        if value is None:
            delattr(dataset, key)
        else:
            setattr(dataset, key, value)
    dataset.save_as(folder / name)
    return str(folder / name)


@pytest.mark.parametrize(
    "name,changes,message",
    [
        ("examples_rgb_color.dcm", None, "is RGB; resfuse reads grayscale"),
        ("examples_palette.dcm", None, "is PALETTE COLOR; resfuse reads grayscale"),
        ("rtdose.dcm", None, r"is an RT Dose grid \(SOP Class 1.2.840.10008.5.1.4.1.1.481.2\)"),
        ("rtplan.dcm", None, "is an RT Plan"),
        ("MR_truncated.dcm", None, "cannot decode the pixel data of .*MR_truncated.dcm"),
        ("frames.dcm", {"NumberOfFrames": 2}, "frames.dcm holds 2 frames"),
        ("bare.dcm", {"PixelData": None}, "bare.dcm holds no integer Pixel Data"),
        (
            "inverted.dcm",
            {"PhotometricInterpretation": "MONOCHROME1"},
            "is MONOCHROME1 .*set PhotometricInterpretation to MONOCHROME2",
        ),
    ],
)
def test_dicom_that_cannot_be_read_faithfully_is_refused(tmp_path, name, changes, message) -> None:
    path = get_testdata_file(name) if changes is None else _ct_copy(tmp_path, name, **changes)
    with pytest.raises(InputContractError, match=message):
        load_image(path, {}, GRAY)


def test_missing_pydicom_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'resfuse\[dicom\]'"):
        load_image(CT, {}, GRAY)


def test_image_files_include_dicom(tmp_path: Path) -> None:
    assert ".dcm" in IMAGE_SUFFIXES
    for name in ("b.dcm", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "b.dcm"]


def test_calibration_reads_sixteen_bit_images(tmp_path: Path) -> None:
    _written(tmp_path / "ramp.png", _ramp12())
    preprocess = {"range": [0, 4095], "mean": [0.5], "std": [0.5]}
    contract = InputContract(1, Range(8, 512), Range(8, 512))
    batches = Calibration(tmp_path, count=1, size=32).inputs(contract, preprocess, seed=0)
    expected = load_image(tmp_path / "ramp.png", preprocess, contract, size=(32, 32))
    np.testing.assert_array_equal(batches[0], expected)
    assert batches[0].max() > 0.9  # not squeezed through 8 bits
    _png16(tmp_path / "rgb16.png", np.ones((4, 5, 3)) * 1000, 2)
    notes: list[str] = []
    calibration = Calibration(tmp_path, count=2, size=32)
    assert len(calibration.inputs(contract, preprocess, seed=0, warn=notes.append)) == 1
    [note] = notes  # skipped, with the reason, not fatal
    assert note.startswith("skipped a calibration image: ") and "rgb16.png is 16-bit RGB" in note


def test_export_records_the_full_range_rule_or_the_one_asked_for() -> None:
    record = ExportOptions().preprocess(ModelConfig("masked"))
    assert record["range"] == "dtype" and "scale" not in record
    check_preprocess(record, 3)
    ct = ExportOptions(window=(40, 400)).preprocess(ModelConfig("masked", in_channels=1))
    assert ct["window"] == {"center": 40, "width": 400} and "range" not in ct
    twelve_bit = ExportOptions(intensity_range=(0, 4095)).preprocess(ModelConfig("masked"))
    assert twelve_bit["range"] == [0, 4095]
    with pytest.raises(ConfigError, match="not both"):
        ExportOptions(window=(40, 400), intensity_range="image").contract(ModelConfig("masked"))
    with pytest.raises(ConfigError, match="window"):
        ExportOptions(window=(40, -1)).contract(ModelConfig("masked"))


def test_preprocess_record() -> None:
    assert preprocess_record(1, mean=[0.5], std=[0.5]) == {
        "range": "dtype",
        "mean": [0.5],
        "std": [0.5],
        "resize": "none",
        "slice_orientation": "radiological",
    }
    with pytest.raises(ConfigError, match="slice_orientation 'neurological' is unknown"):
        check_preprocess({"slice_orientation": "neurological"}, 1)
    twelve = preprocess_record(1, mean=[0], std=[1], value_range=(0, 4095))
    assert twelve["range"] == [0, 4095]
    ct = preprocess_record(1, mean=[0], std=[1], window={"center": 40, "width": 400})
    assert ct["window"] == {"center": 40, "width": 400} and "range" not in ct
    with pytest.raises(ConfigError, match="a window or a range .* not both"):
        preprocess_record(1, mean=[0], std=[1], value_range="image", window=ct["window"])
    with pytest.raises(ConfigError, match=r"preprocess.range must have low < high, got \[5, 5\]"):
        preprocess_record(1, mean=[0], std=[1], value_range=(5, 5))


@pytest.mark.parametrize(
    "preprocess",
    [
        {},
        LEGACY,
        {"range": "image", "mean": [0.1] * 3, "std": [2] * 3, "resize": "fit"},
        {"range": [-1024, 3071.5]},
        {"range": (0, 4095), "mean": (0.5, 0.5, 0.5)},  # tuples, from Python callers
        {"window": {"center": -600, "width": 1500}, "mean": [0, 0, 0], "std": [1, 1, 1]},
    ],
)
def test_check_preprocess_accepts(preprocess) -> None:
    check_preprocess(preprocess, 3)


@pytest.mark.parametrize(
    "preprocess,message",
    [
        ([], "preprocess must be an object, got []"),
        ({"windows": {}}, "preprocess.windows is not a known field; allowed: range, window,"),
        ({"scale": 1 / 255, "range": "dtype"}, "preprocess has both range and scale"),
        ({"range": "dtype", "window": {"center": 0, "width": 1}}, "preprocess has both range and"),
        ({"range": "full"}, "preprocess.range must be 'dtype', 'image' or [low, high], got 'full'"),
        ({"range": [0, 1, 2]}, "preprocess.range must be 'dtype', 'image' or [low, high]"),
        ({"range": [0, "4095"]}, "preprocess.range[1] must be a number, got '4095'"),
        ({"range": [0, float("nan")]}, "preprocess.range[1] must be a number, got nan"),
        ({"range": [4095, 0]}, "preprocess.range must have low < high, got [4095, 0]"),
        ({"window": {"center": 40}}, 'preprocess.window must be {"center": c, "width": w}'),
        ({"window": {"center": True, "width": 4}}, "preprocess.window.center must be a number"),
        ({"window": {"center": 40, "width": 0}}, "preprocess.window.width must be a positive"),
        ({"scale": -1}, "preprocess.scale must be a positive number, got -1"),
        ({"mean": [0.5, 0.5]}, "preprocess.mean must be a list of 3 numbers, got [0.5, 0.5]"),
        ({"mean": [0.5, None, 0.5]}, "preprocess.mean[1] must be a number, got None"),
        ({"std": [1, 0, 1]}, "preprocess.std[1] must be a positive number, got 0"),
        ({"std": "1"}, "preprocess.std must be a list of 3 numbers, got '1'"),
        ({"resize": "crop"}, "preprocess.resize must be one of none, fit, got 'crop'"),
    ],
)
def test_check_preprocess_names_the_field(preprocess, message: str) -> None:
    with pytest.raises(PreprocessError) as found:
        check_preprocess(preprocess, 3)
    assert found.value.problem.startswith(message), found.value.problem
    assert "\n" not in str(found.value)


def test_load_image_refuses_a_bad_preprocess_section(tmp_path: Path) -> None:
    path = _written(tmp_path / "ramp.png", _ramp12())
    with pytest.raises(ConfigError, match=r"preprocess.std\[0\] must be a positive number"):
        load_image(path, {"std": [0]}, GRAY)
