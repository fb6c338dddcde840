"""Intensities as scanners write them (issue 19, part 3): signed 16-bit TIFFs of Hounsfield
units, windows and ranges in stored or rescaled DICOM units, a note when a range clips much of
an image, DICOM objects that are not images, compressed DICOM without a decoder, and INT8
calibration that skips an unreadable file. Real files: TIFFs written by tifffile (the int16
layout scanners' converters write), pydicom's own samples, and real exports through the CLIs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image
from pydicom.data import get_testdata_file

from resfuse.compare import Tolerance
from resfuse.contract import InputContract, Range
from resfuse.errors import ConfigError, InputContractError
from resfuse.export.cli import main as export_main
from resfuse.export.pipeline import ExportOptions
from resfuse.export.quantize import Calibration
from resfuse.images import (
    Pixels,
    PreprocessError,
    check_preprocess,
    load_image,
    preprocess_record,
    to_input,
)
from resfuse.models import ModelConfig
from resfuse.runtime.check import CheckRecord, CheckReport
from resfuse.runtime.cli import check_main

GRAY = InputContract(1, Range(1, 4096), Range(1, 4096))
RGB = InputContract(3, Range(1, 4096), Range(1, 4096))
CT = get_testdata_file("CT_small.dcm")  # int16, RescaleIntercept -1024: Hounsfield units
SOFT_TISSUE = {"window": {"center": 40, "width": 400}}
SIGNED = "holds signed 16-bit values, which the '{}' rule cannot place; export with --window"


def _hounsfield() -> np.ndarray:
    dataset = pydicom.dcmread(CT)
    return dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(
        dataset.RescaleIntercept
    )


def _hu_tiff(path: Path, byteorder: str = "<") -> Path:
    """CT_small's Hounsfield units as a signed 16-bit TIFF, as converters write them."""
    tifffile.imwrite(path, _hounsfield().astype(np.int16), byteorder=byteorder)
    return path


def _exact(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)[None, None]


# 1. signed 16-bit images


@pytest.mark.parametrize("byteorder,rawmode", [("<", "I;16S"), (">", "I;16BS")])
def test_signed_tiff_of_hounsfield_units_reads_under_a_window(
    tmp_path: Path, byteorder: str, rawmode: str
) -> None:
    path = _hu_tiff(tmp_path / "hu.tif", byteorder)
    with Image.open(path) as image:  # what Pillow makes of it: 32-bit mode, int16 samples
        assert image.mode == "I" and image.tile[0].args[0] == rawmode
    hu = _hounsfield()
    assert hu.min() < -800  # air and lung: the values "dtype" on unsigned data would lose
    windowed = load_image(path, SOFT_TISSUE, GRAY)
    np.testing.assert_array_equal(windowed, _exact(np.clip((hu + 160) / 400, 0, 1)))
    np.testing.assert_array_equal(windowed, load_image(CT, SOFT_TISSUE, GRAY))  # as the DICOM
    full = load_image(path, {"range": [-1024, 3071]}, RGB)
    np.testing.assert_array_equal(full[:, 1:2], _exact(np.clip((hu + 1024) / 4095, 0, 1)))


@pytest.mark.parametrize("rule", ["dtype", "image"])
def test_signed_tiff_is_refused_by_a_rule_without_a_fixed_range(tmp_path: Path, rule) -> None:
    path = _hu_tiff(tmp_path / "hu.tif")
    with pytest.raises(InputContractError, match=SIGNED.format(rule)) as caught:
        load_image(path, {"range": rule}, GRAY)
    assert str(caught.value).startswith(f"{path} ") and "\n" not in str(caught.value)


def test_signed_8_bit_tiff_is_read_signed(tmp_path: Path) -> None:
    """Pillow opens an int8 TIFF as unsigned mode L (-100 reads as 156); SampleFormat says
    signed, and the values are read as the file means them."""
    path = tmp_path / "s8.tif"
    values = np.array([[-100, -1, 0], [50, 100, 127]], dtype=np.int8)
    tifffile.imwrite(path, values)
    x = load_image(path, {"range": [-128, 127]}, InputContract(1, Range(1), Range(1)))
    np.testing.assert_array_equal(x, _exact((values.astype(np.float64) + 128) / 255))
    with pytest.raises(InputContractError, match=SIGNED.format("dtype").replace("16", "8")):
        load_image(path, {}, InputContract(1, Range(1), Range(1)))


def test_signed_slice_of_a_volume_by_to_input() -> None:
    """What a volume's slice gives to_input: int16 values, no full range."""
    hu = _hounsfield()
    pixels = Pixels(hu.astype(np.int16)[..., None], None, "slice 3")
    np.testing.assert_array_equal(
        to_input(pixels, SOFT_TISSUE, GRAY), _exact(np.clip((hu + 160) / 400, 0, 1))
    )
    with pytest.raises(InputContractError, match="slice 3 " + SIGNED.format("dtype")):
        to_input(pixels, {}, GRAY)


# 2. units: stored or rescaled


def test_a_window_in_stored_units_applies_before_the_rescale() -> None:
    stored = pydicom.dcmread(CT).pixel_array.astype(np.float64)  # HU + 1024
    in_stored = {"window": {"center": 1064, "width": 400}, "units": "stored"}
    expected = _exact(np.clip((stored - 864) / 400, 0, 1))
    np.testing.assert_array_equal(load_image(CT, in_stored, GRAY), expected)
    # the same window in rescaled units (Hounsfield), written both ways and as old manifests
    # wrote it (no units: rescaled)
    rescaled = load_image(CT, {**SOFT_TISSUE, "units": "rescaled"}, GRAY)
    np.testing.assert_array_equal(rescaled, expected)
    np.testing.assert_array_equal(load_image(CT, SOFT_TISSUE, GRAY), expected)
    twelve = {"range": [0, 4095], "units": "stored"}
    np.testing.assert_array_equal(load_image(CT, twelve, GRAY), _exact(stored / 4095))


def test_stored_units_follow_a_slope_and_a_negative_one(tmp_path: Path) -> None:
    stored = pydicom.dcmread(CT).pixel_array.astype(np.float64)
    rule = {"range": [800, 1400], "units": "stored"}
    expected = np.clip((stored - 800) / 600, 0, 1)
    for slope in (2.5, -0.5):
        dataset = pydicom.dcmread(CT)
        dataset.RescaleSlope = slope
        dataset.save_as(tmp_path / "sloped.dcm")
        out = load_image(tmp_path / "sloped.dcm", rule, GRAY)[0, 0]
        np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)


def test_units_mean_nothing_without_a_rescale(tmp_path: Path) -> None:
    path = _hu_tiff(tmp_path / "hu.tif")
    np.testing.assert_array_equal(
        load_image(path, {**SOFT_TISSUE, "units": "stored"}, GRAY),
        load_image(path, SOFT_TISSUE, GRAY),
    )


def test_units_are_recorded_and_validated() -> None:
    window = {"center": 40, "width": 400}
    record = preprocess_record(1, mean=[0], std=[1], window=window)
    assert record["units"] == "rescaled"
    stored = preprocess_record(1, mean=[0], std=[1], value_range=(0, 4095), units="stored")
    assert stored["range"] == [0, 4095] and stored["units"] == "stored"
    assert "units" not in preprocess_record(1, mean=[0], std=[1])  # "dtype" has no units
    with pytest.raises(ConfigError, match="drop --intensity-units"):
        preprocess_record(1, mean=[0], std=[1], value_range="image", units="stored")
    config = ModelConfig("upsample", in_channels=1)
    options = ExportOptions(window=(40, 400), intensity_units="stored")
    assert options.preprocess(config)["units"] == "stored"
    check_preprocess({"window": window, "units": "stored"}, 1)
    check_preprocess({"window": window}, 1)  # older manifests: rescaled
    for bad, message in [
        ({"window": window, "units": "HU"}, "preprocess.units must be one of rescaled, stored"),
        ({"range": "dtype", "units": "stored"}, "preprocess.units applies to a window or"),
        ({"units": "rescaled"}, "preprocess.units applies to a window or"),
    ]:
        with pytest.raises(PreprocessError) as found:
            check_preprocess(bad, 1)
        assert found.value.problem.startswith(message)


# 3. clipping notes


def test_a_range_that_clips_most_of_an_image_says_so_once(tmp_path: Path) -> None:
    notes: list[str] = []
    twelve = {"range": [0, 4095]}  # the 12-bit radiograph rule, on CT: every negative HU
    load_image(CT, twelve, RGB, on_clip=notes.append)
    share = np.mean(_hounsfield() < 0)
    assert share > 0.25
    assert notes == [
        f"{CT}: {share:.0%} of pixels fall outside the intensity range [0, 4095] (rescaled "
        f"units, after RescaleSlope/Intercept) and are clipped; if the artifact's range does "
        f"not fit these images (CT in Hounsfield units needs a window or a range in HU: "
        f"--window 40,400, --intensity-range -1024,3071), re-export with one that does"
    ]
    load_image(CT, {"range": [0, 4095], "units": "stored"}, GRAY, on_clip=notes.append)
    load_image(CT, {"range": [-1024, 3071]}, GRAY, on_clip=notes.append)  # nothing clipped
    load_image(CT, SOFT_TISSUE, GRAY, on_clip=notes.append)  # a window clips by design
    load_image(_hu_tiff(tmp_path / "hu.tif"), twelve, GRAY, on_clip=notes.append)
    assert len(notes) == 2 and notes[1].startswith(f"{tmp_path / 'hu.tif'}: {share:.0%} of")
    assert "RescaleSlope" not in notes[1]  # a TIFF has no rescale to name
    load_image(CT, twelve, GRAY)  # no listener: read all the same


# 4. DICOM objects that are not images, and compressed ones without a decoder


def _relabelled(folder: Path, source: str, sop_class: str, name: str) -> Path:
    dataset = pydicom.dcmread(source)
    dataset.SOPClassUID = sop_class
    dataset.file_meta.MediaStorageSOPClassUID = sop_class
    dataset.save_as(folder / name)
    return folder / name


@pytest.mark.parametrize(
    "make,message",
    [
        (
            lambda d: get_testdata_file("liver_1frame.dcm"),  # a real SEG, 1-bit
            r"is a Segmentation \(SEG\) \(SOP Class 1.2.840.10008.5.1.4.1.1.66.4\), not an image",
        ),
        (
            lambda d: _relabelled(d, CT, "1.2.840.10008.5.1.4.1.1.481.3", "rs.dcm"),
            r"is an RT Structure Set \(RTSTRUCT\) \(SOP Class 1.2.840.10008.5.1.4.1.1.481.3\)",
        ),
        (
            lambda d: _relabelled(d, CT, "1.2.840.10008.5.1.4.1.1.104.1", "doc.dcm"),
            "is an encapsulated PDF",
        ),
        (
            lambda d: _relabelled(d, CT, "1.2.840.10008.5.1.4.1.1.104.2", "cda.dcm"),
            "is an encapsulated CDA document",
        ),
        (
            lambda d: _relabelled(d, CT, "1.2.840.10008.5.1.4.1.1.88.33", "sr.dcm"),
            "is a Structured Report",
        ),
        (  # the SEG's 1-bit mask under an image's SOP class: refused by its bits
            lambda d: _relabelled(
                d, get_testdata_file("liver_1frame.dcm"), "1.2.840.10008.5.1.4.1.1.2", "m.dcm"
            ),
            r"holds a 1-bit mask \(BitsAllocated 1\), not an image",
        ),
    ],
)
def test_dicom_objects_that_are_not_images_are_refused(tmp_path: Path, make, message) -> None:
    path = make(tmp_path)
    with pytest.raises(InputContractError, match=message) as caught:
        load_image(path, SOFT_TISSUE, GRAY)
    assert "\n" not in str(caught.value)


def test_pydicoms_real_rtstruct_is_refused_by_its_sop_class() -> None:
    dataset = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)  # no preamble
    with pytest.raises(InputContractError, match=r"is an RT Structure Set \(RTSTRUCT\)"):
        load_image(dataset, {}, GRAY)


_NO_JPEG_DECODER = not any(importlib.util.find_spec(m) for m in ("libjpeg", "gdcm", "jpeg_ls"))


@pytest.mark.skipif(not _NO_JPEG_DECODER, reason="a JPEG decoder for pydicom is installed")
@pytest.mark.parametrize(
    "name,syntax,install",
    [
        (  # Pillow is installed but reads no 12-bit JPEG: its reason is kept
            "JPEG-lossy.dcm",
            "JPEG Extended (Process 2 and 4) (1.2.840.10008.1.2.4.51), which no decoder "
            "installed here reads (pillow: Pillow does not support 'JPEG Extended' for samples "
            "with 12-bit precision)",
            "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
        ),
        (
            "MR_small_jpeg_ls_lossless.dcm",
            "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80), which no decoder "
            "installed here reads",
            "pip install pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)",
        ),
    ],
)
def test_compressed_dicom_without_a_decoder_is_one_line(name, syntax, install) -> None:
    path = get_testdata_file(name)
    with pytest.raises(InputContractError) as caught:
        load_image(path, {}, GRAY)
    assert str(caught.value) == (
        f"cannot decode {path}: its pixel data are compressed as {syntax}; {install}"
    )


# 5. resfuse-check's table


def test_check_table_keeps_one_row_per_input_whatever_the_message() -> None:
    report = CheckReport("a.json", "onnxruntime", "cpu", Tolerance(), "float32")
    report.records = [
        CheckRecord("x|y.dcm", None, error="Unable to decode:\n  pillow: no | way\n\tgdcm: none"),
        CheckRecord("ok.png", None, error="one line"),
    ]
    lines = report.markdown().splitlines()
    assert len(lines) == 4  # header, rule, two rows
    cells = [line.replace("\\|", "").count("|") for line in lines]
    assert len(set(cells)) == 1, lines  # as many cells in every row
    assert "ERROR: Unable to decode: pillow: no \\| way gdcm: none" in lines[2]


# end to end: the export options reach the manifest, and resfuse-check reads and says it


@pytest.fixture(scope="module")
def ct_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-channel artifact exported with --window 40,400 through the CLI."""
    out = tmp_path_factory.mktemp("ct")
    args = ["--method", "upsample", "--stage", "3", "--in-channels", "1", "--window", "40,400"]
    result = CliRunner().invoke(export_main, [*args, "--max-size", "128", "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out / "upsample-resnet18.json"


def test_cli_records_the_window_and_its_units(ct_artifact: Path) -> None:
    preprocess = json.loads(ct_artifact.read_text())["preprocess"]
    assert preprocess["window"] == {"center": 40, "width": 400}
    assert preprocess["units"] == "rescaled"
    result = CliRunner().invoke(
        export_main, ["--method", "upsample", "--intensity-units", "stored", "--output", "x"]
    )
    assert result.exit_code == 1 and "drop --intensity-units" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_check_reads_a_signed_tiff_and_warns_of_clipping_once(
    ct_artifact: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    _hu_tiff(images / "hu.tif")
    shutil.copy(CT, images / "ct.dcm")
    runner = CliRunner()
    small = ["--images", str(images), "--shapes", "1x1x32x32"]  # one random input: quick
    result = runner.invoke(check_main, [str(ct_artifact), *small])
    assert result.exit_code == 0, result.output  # the int16 TIFF runs, as the DICOM does
    assert "hu.tif" in result.output and "warning" not in result.output  # windows clip
    # the same artifact read by the 12-bit rule: every negative HU clips, said once per file
    data = json.loads(ct_artifact.read_text())
    data["preprocess"] = {"range": [0, 4095], "mean": [0.5], "std": [0.5]}
    twelve = ct_artifact.with_name("twelve.json")
    twelve.write_text(json.dumps(data))
    result = runner.invoke(check_main, [str(twelve), *small])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("of pixels fall outside" in w for w in warnings)
    assert {w.split(": ")[1] for w in warnings} == {str(images / "ct.dcm"), str(images / "hu.tif")}


# 6. INT8 calibration: an unreadable file is skipped, said and counted


def _calibration_folder(folder: Path) -> Path:
    """Three real photographs (INT8 calibrated on noise is judged on noise: its features miss
    the bound) and one file that is no image."""
    from skimage import data

    for i, name in enumerate(("astronaut", "coffee", "chelsea")):
        Image.fromarray(getattr(data, name)()).resize((96, 72)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")  # sorts first
    return folder


def test_calibration_skips_an_unreadable_file_and_counts_it(tmp_path: Path) -> None:
    folder = _calibration_folder(tmp_path)
    contract = InputContract(3, Range(32, 512), Range(32, 512))
    preprocess = {"range": "dtype", "mean": [0.5] * 3, "std": [0.25] * 3}
    notes: list[str] = []
    calibration = Calibration(folder, count=2, size=64)
    batches = calibration.inputs(contract, preprocess, seed=0, warn=notes.append)
    assert len(batches) == 2  # two readable images, as asked: broken.png does not count
    assert notes == [
        f"skipped a calibration image: cannot read {folder / 'broken.png'} as an image: "
        f"cannot identify image file '{folder / 'broken.png'}'"
    ]
    record = calibration.describe()
    assert (record["count"], record["skipped"], record["skipped_files"]) == (2, 1, ["broken.png"])
    with pytest.warns(UserWarning, match="skipped a calibration image"):  # a library default
        Calibration(folder, count=1, size=64).inputs(contract, preprocess, seed=0)
    for good in folder.glob("img*.png"):
        good.write_bytes(b"not a png either")
    with pytest.raises(ConfigError) as caught:
        Calibration(folder, count=2, size=64).inputs(contract, preprocess, seed=0, warn=print)
    message = str(caught.value)
    assert message.startswith(f"cannot read calibration image {folder / 'broken.png'}: ")
    assert "none of the others could be read either" in message and "\n" not in message


def test_int8_export_skips_an_unreadable_calibration_image(tmp_path: Path) -> None:
    (tmp_path / "calib").mkdir()
    folder = _calibration_folder(tmp_path / "calib")
    out = tmp_path / "out"
    args = ["--method", "upsample", "--stage", "3", "--int8", "--calib-images", str(folder)]
    small = ["--max-size", "96", "--calib-size", "64", "--output", str(out)]  # quick
    result = CliRunner().invoke(export_main, [*args, *small])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "broken.png" in warnings[0]
    manifest = json.loads((out / "upsample-resnet18-int8.json").read_text())
    calibration = manifest["quantization"]["calibration"]
    assert (calibration["count"], calibration["skipped"]) == (3, 1)
    assert calibration["skipped_files"] == ["broken.png"]
    # resfuse-check judges on the calibration images, as the export did: without broken.png
    checked = CliRunner().invoke(check_main, [str(out / "upsample-resnet18-int8.json")])
    assert checked.exit_code == 0, checked.output
    assert "img0.png" in checked.output and "broken.png" not in checked.output
