"""resfuse-check judges an artifact as its export did, and a segmentation model by its mask."""

from __future__ import annotations

import json

import numpy as np
import pytest

from resfuse.errors import ConfigError
from resfuse.runtime.check import MaskGates, check_artifact, mask_agreement

pytestmark = pytest.mark.slow  # INT8 and fp16 exports


def test_the_manifest_records_what_the_sweep_ran_on(int8_on_images, exported) -> None:
    path, photos = int8_on_images
    inputs = json.loads(path.read_text())["parity"]["inputs"]
    assert inputs == {"kind": "images", "folder": str(photos.resolve())}
    float32 = json.loads(exported["masked"].manifest_path.read_text())
    assert float32["parity"]["inputs"] == {"kind": "random normal"}


def test_check_judges_on_the_images_the_export_judged_on(int8_on_images) -> None:
    """With no --images, an artifact swept on its calibration images is judged on them, not on
    random noise, which lies outside what its INT8 graph was calibrated for."""
    path, _ = int8_on_images
    report = check_artifact(path)
    assert sorted(r.source for r in report.records) == ["photo0.png", "photo1.png", "photo2.png"]
    assert all(r.mask is not None and 0.0 <= r.mask.agreement <= 1.0 for r in report.records)
    explicit = check_artifact(path, shapes=[(1, 3, 96, 96)])  # asked for: random at a shape
    assert [r.source for r in explicit.records] == ["random"]


def test_missing_calibration_images_are_named_not_judged_on_noise(int8_on_images, tmp_path):
    path, photos = int8_on_images
    moved = photos.rename(tmp_path / "elsewhere")
    try:
        with pytest.raises(ConfigError, match="verified on its calibration images in") as caught:
            check_artifact(path)
        assert "--images DIR" in str(caught.value) and "\n" not in str(caught.value)
        report = check_artifact(path, images=moved)  # the user gives them: judged on them
        assert len(report.records) == 3
    finally:
        moved.rename(photos)


def test_mask_agreement_and_dice() -> None:
    ref = np.zeros((1, 3, 2, 4), np.float32)
    ref[0, 1, :, :2] = 1  # class 1 on the left half, class 0 on the right
    out = ref.copy()
    out[0, 2, 0, 0] = 5  # one pixel of class 1 becomes class 2
    result = mask_agreement(ref, out, MaskGates())
    assert result.agreement == 7 / 8
    assert result.dice == {0: 1.0, 1: 2 * 3 / (4 + 3), 2: 0.0}
    assert result.passed  # no gates: reported only
    assert not mask_agreement(ref, out, MaskGates(min_agreement=0.9)).passed
    assert mask_agreement(ref, out, MaskGates(min_agreement=0.85)).passed
    assert not mask_agreement(ref, out, MaskGates(min_dice=0.5)).passed  # class 2: Dice 0


def test_gates_decide_the_verdict(int8_on_images) -> None:
    path, photos = int8_on_images
    lenient = check_artifact(path, images=photos, gates=MaskGates(min_agreement=0.0))
    strict = check_artifact(path, images=photos, gates=MaskGates(min_agreement=1.01))
    assert all(r.mask and r.mask.passed for r in lenient.records)
    assert not strict.passed and "mask agreement" in strict.markdown()


def test_the_command_judges_like_the_export_and_gates_masks(int8_on_images) -> None:
    from click.testing import CliRunner

    from resfuse.runtime.cli import check_main

    path, _ = int8_on_images
    result = CliRunner().invoke(check_main, [str(path), "--min-agreement", "0"])
    assert result.exit_code == 0, result.output
    assert "photo0.png" in result.stdout and "mask agreement" in result.stdout
    assert "random" not in result.stdout


def test_openvino_bf16_over_a_float16_artifact_is_labelled_bfloat16(fp16) -> None:
    from resfuse.artifacts import read_manifest
    from resfuse.runtime.backends.openvino import OpenVinoRunner

    manifest = read_manifest(fp16["masked"])
    assert OpenVinoRunner(manifest, "cpu", precision="bf16").precision == "bfloat16"
    assert OpenVinoRunner(manifest, "cpu", precision="f32").precision == "float16"
