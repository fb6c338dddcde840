"""Accuracy: a deployed backend against the PyTorch original on the same inputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resfuse.artifacts import Manifest
from resfuse.compare import (
    ErrorStats,
    MaskAgreement,
    MaskGates,
    Tolerance,
    compare,
    compare_output,
    mask_agreement,
)
from resfuse.errors import ConfigError, ResfuseError
from resfuse.runtime.inputs import image_files
from resfuse.runtime.report import markdown_table
from resfuse.runtime.session import Session, load
from resfuse.shapes import Shape, format_shape, parity_shapes


@dataclass
class CheckRecord:
    source: str  # "random" or the image file's name
    shape: Shape | None
    stats: ErrorStats | None = None
    passthrough: str = "n/a"  # how the image channels of the fused output were checked
    passthrough_ok: bool = True
    error: str | None = None  # the input could not be run at all
    mask: MaskAgreement | None = None  # a model with a head: what the logits change in the mask

    @property
    def passed(self) -> bool:
        return (
            self.error is None
            and self.stats is not None
            and self.stats.passed
            and self.passthrough_ok
            and (self.mask is None or self.mask.passed)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "shape": list(self.shape) if self.shape else None,
            **(self.stats.to_dict() if self.stats else {}),
            "passthrough": self.passthrough,
            "passthrough_ok": self.passthrough_ok,
            **(self.mask.to_dict() if self.mask else {}),
            "error": self.error,
            "passed": self.passed,
        }


@dataclass
class CheckReport:
    artifact: str
    backend: str
    device: str
    tolerance: Tolerance
    precision: str
    records: list[CheckRecord] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.records) and all(r.passed for r in self.records)

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact,
            "backend": self.backend,
            "device": self.device,
            "reference": "torch (cpu, float32)",
            "precision": self.precision,
            "tolerance": self.tolerance.to_dict(),
            "passed": self.passed,
            "records": [r.to_dict() for r in self.records],
        }

    def markdown(self) -> str:
        rows: list[list[object]] = []
        for r in self.records:
            s = r.stats
            if s is None:
                rows.append(
                    [
                        _cell(r.source),
                        format_shape(r.shape) if r.shape else "-",
                        *["-"] * 7,
                        "-",
                        _cell(f"ERROR: {r.error}"),
                    ]
                )
                continue
            rows.append(
                [
                    _cell(r.source),
                    format_shape(r.shape or ()),
                    f"{s.max_abs:.2e}",
                    f"{s.mean_abs:.2e}",
                    f"{s.rel_l2:.2e}",
                    f"{s.p99_abs:.2e}",
                    f"{s.cosine:.7f}",
                    s.nonfinite,
                    f"{s.required_atol:.1e}",
                    r.mask.describe() if r.mask else r.passthrough,
                    "pass" if r.passed else "FAIL",
                ]
            )
        headers = [
            "input",
            "shape",
            "max abs",
            "mean abs",
            "rel L2",
            "p99 abs",
            "cosine",
            "NaN/Inf",
            "min atol",
            "mask agreement" if any(r.mask for r in self.records) else "image channels",
            "result",
        ]
        return markdown_table(headers, rows)


def _cell(text: str) -> str:
    """Text as one Markdown table cell: a message from a library (pydicom's span several
    lines) or a file name may hold newlines and pipes, which would end the row or the cell."""
    return " ".join(text.split()).replace("|", "\\|")


def check_artifact(
    path: str | Path,
    backend: str = "onnxruntime",
    device: str = "cpu",
    shapes: Iterable[Shape] | None = None,
    images: str | Path | None = None,
    tolerance: Tolerance | None = None,
    seed: int = 0,
    resize: str | None = None,
    progress: Callable[[], None] = lambda: None,
    gates: MaskGates | None = None,
    on_clip: Callable[[str], None] | None = None,
    tiling: dict[str, Any] | None = None,
    **options: Any,
) -> CheckReport:
    """Judges as the export did: on the shapes of its parity sweep with random inputs, or, for
    an INT8 artifact swept on its calibration images, on images (those, unless `images` names
    others), random ones only at `shapes` asked for. A model with a head also gets argmax
    agreement and per-class Dice against the original, gated by `gates` (default: the gates
    its export passed, if any). `on_clip` hears, once
    per image file, that the artifact's intensity range clips much of it (resfuse.images).
    `tiling` (Session.run's tile keywords) runs an input the deployed backend cannot take in one
    call as tiles, on both backends alike."""
    with (
        load(path, backend, device, resize=resize, **options) as deployed,
        load(path, "torch", "cpu") as reference,
    ):
        tol = tolerance or deployed.manifest.tolerance
        gates = gates or deployed.manifest.mask_gates
        report = CheckReport(str(path), backend, device, tol, deployed.manifest.precision)
        grid, images = judged_inputs(deployed.manifest, shapes, images)
        for shape in grid:  # refuse a bad grid before spending time on a good part of it
            deployed.contract.check(shape, "float32", spatial=not tiling)
        tiles = _Tiles(deployed, tiling or {})
        generator = np.random.default_rng(seed)
        for shape in grid:
            x = generator.standard_normal(shape, dtype=np.float32)
            report.records.append(_check_one("random", x, tiles, reference, tol, gates))
            progress()
        skipped = _skipped_at_export(deployed.manifest, images)
        for file in image_files(images) if images else []:
            name = str(file.relative_to(images))  # recursive: sub/a.png and a.png both exist
            if name in skipped:
                continue
            try:
                x = deployed.preprocess(file, on_clip=on_clip)
            except ResfuseError as exc:
                report.records.append(CheckRecord(name, None, error=str(exc)))
            else:
                report.records.append(_check_one(name, x, tiles, reference, tol, gates))
            progress()
    return report


def judged_inputs(
    manifest: Manifest, shapes: Iterable[Shape] | None, images: str | Path | None
) -> tuple[list[Shape], str | Path | None]:
    """The random-input shapes and the image folder a check runs on: what was asked for, else
    what the export's parity sweep ran on."""
    on_images = _sweep_inputs(manifest).get("kind") == "images"
    if on_images and images is None and shapes is None:
        images = _calibration_folder(manifest)
    default = [] if on_images else parity_shapes(manifest.contract)
    return (list(shapes) if shapes is not None else default), images


def _skipped_at_export(manifest: Manifest, images: str | Path | None) -> set[str]:
    """The files of the calibration folder that INT8 calibration skipped as unreadable, when
    `images` is that folder: the export judged without them, and so does the check."""
    inputs = _sweep_inputs(manifest)
    if images is None or inputs.get("kind") != "images":
        return set()
    if Path(images).resolve() != Path(inputs["folder"]):
        return set()
    calibration = manifest.data.get("quantization", {}).get("calibration", {})
    return set(calibration.get("skipped_files", []))


def _sweep_inputs(manifest: Manifest) -> dict[str, Any]:
    """What the export's parity sweep ran on (older manifests: random inputs)."""
    return manifest.data.get("parity", {}).get("inputs", {"kind": "random normal"})


def _calibration_folder(manifest: Manifest) -> Path:
    """The calibration images an artifact's parity sweep ran on; a ConfigError when they are no
    longer there, since random inputs would judge it unfairly."""
    folder = Path(_sweep_inputs(manifest)["folder"])
    if not folder.is_dir():
        raise ConfigError(
            f"{manifest.path.name} was verified on its calibration images in {folder}, which "
            f"are not here, and random inputs lie outside what its INT8 graph was calibrated "
            f"for; give --images DIR of representative images (or --shapes to judge random ones)"
        )
    return folder


@dataclass(frozen=True)
class _Tiles:
    """The deployed session and how inputs it cannot take whole are tiled: the same tiles (its
    own "auto" size included) for the reference, so both are judged on one computation."""

    deployed: Session
    tiling: dict[str, Any]

    def keywords(self, x: np.ndarray) -> dict[str, Any]:
        if not self.tiling or self.deployed.runner.accepts(*x.shape[2:]):
            return {}
        roi = self.deployed.tiling(**self.tiling).roi
        return {**self.tiling, "tile": roi}


def _check_one(
    source: str,
    x: np.ndarray,
    tiles: _Tiles,
    reference: Session,
    tol: Tolerance,
    gates: MaskGates,
) -> CheckRecord:
    shape: Shape = tuple(int(d) for d in x.shape)  # type: ignore[assignment]
    deployed, tiling = tiles.deployed, tiles.keywords(x)
    fused = deployed.manifest.config.num_classes is None
    try:
        # The reference first: torch hands its working memory back when a call ends, while
        # ONNX Runtime's arena keeps its own, so this order keeps the two peaks apart.
        ref = np.asarray(reference.run(x, **tiling))
        # a gate computed per tile is no whole-image gate: tiled, a gated image part is judged
        # with the rest of the output
        passes = deployed.manifest.config.spec.passes_image
        image = _expected_image(x, reference) if fused and (passes or not tiling) else None
        out = np.asarray(deployed.run(x, **tiling))
    except ResfuseError as exc:
        return CheckRecord(source, shape, error=str(exc))
    image_channels = deployed.manifest.config.image_channels
    record = CheckRecord(source, shape, compare_output(ref, out, tol, image_channels))
    if not fused:
        record.mask = mask_agreement(ref, out, gates)
    if image is not None:
        record.passthrough, record.passthrough_ok = _passthrough(*image, out, tol)
    return record


def _expected_image(x: np.ndarray, reference: Session) -> tuple[np.ndarray, bool]:
    """What the fused output's first C channels must be, and whether a mask gates them: the
    image itself (upsample, spp), or image * (1 - mask) with the reference's mask (masked)."""
    model = getattr(reference.runner, "model", None)
    if model is None or model.fusion.passes_image:
        return x, False
    import torch  # the reference is the PyTorch original: torch is here

    with torch.inference_mode():
        t = torch.from_numpy(x)
        mask = model.fusion.mask(t, model.encoder(t)).numpy()
    return x * (1 - mask), True


def _passthrough(
    expected: np.ndarray, masked: bool, out: np.ndarray, tol: Tolerance
) -> tuple[str, bool]:
    image_part = out[:, : expected.shape[1]]
    if not masked:
        exact = bool(np.array_equal(image_part, expected))
        return ("exact" if exact else "DIFFERS from input"), exact
    stats = compare(expected, image_part, tol)
    return (f"image*(1-mask) {stats.max_abs:.1e}", stats.passed)
