"""Accuracy: a deployed backend against the PyTorch original on the same inputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resfuse.compare import ErrorStats, Tolerance, compare
from resfuse.errors import ResfuseError
from resfuse.export.parity import parity_shapes
from resfuse.runtime.inputs import image_files
from resfuse.runtime.report import Shape, markdown_table, shape_str
from resfuse.runtime.session import Session, load


@dataclass
class CheckRecord:
    source: str  # "random" or the image file's name
    shape: Shape | None
    stats: ErrorStats | None = None
    passthrough: str = "n/a"  # how the image channels of the fused output were checked
    passthrough_ok: bool = True
    error: str | None = None  # the input could not be run at all

    @property
    def passed(self) -> bool:
        return (
            self.error is None
            and self.stats is not None
            and self.stats.passed
            and (self.passthrough_ok)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "shape": list(self.shape) if self.shape else None,
            **(self.stats.to_dict() if self.stats else {}),
            "passthrough": self.passthrough,
            "passthrough_ok": self.passthrough_ok,
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
        rows = []
        for r in self.records:
            s = r.stats
            if s is None:
                rows.append(
                    [
                        r.source,
                        shape_str(r.shape) if r.shape else "-",
                        *["-"] * 7,
                        "-",
                        f"ERROR: {r.error}",
                    ]
                )
                continue
            rows.append(
                [
                    r.source,
                    shape_str(r.shape or ()),
                    f"{s.max_abs:.2e}",
                    f"{s.mean_abs:.2e}",
                    f"{s.rel_l2:.2e}",
                    f"{s.p99_abs:.2e}",
                    f"{s.cosine:.7f}",
                    s.nonfinite,
                    f"{s.required_atol:.1e}",
                    r.passthrough,
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
            "image channels",
            "result",
        ]
        return markdown_table(headers, rows)


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
    **options: Any,
) -> CheckReport:
    with (
        load(path, backend, device, resize=resize, **options) as deployed,
        load(path, "torch", "cpu") as reference,
    ):
        tol = tolerance or deployed.manifest.tolerance
        report = CheckReport(str(path), backend, device, tol, deployed.manifest.precision)
        grid = list(shapes) if shapes is not None else parity_shapes(deployed.contract)
        for shape in grid:  # refuse a bad grid before spending time on a good part of it
            deployed.contract.check(shape, "float32")
        generator = np.random.default_rng(seed)
        for shape in grid:
            x = generator.standard_normal(shape, dtype=np.float32)
            report.records.append(_check_one("random", x, deployed, reference, tol))
            progress()
        for file in image_files(images) if images else []:
            name = str(file.relative_to(images))  # recursive: sub/a.png and a.png both exist
            try:
                x = deployed.preprocess(file)
            except ResfuseError as exc:
                report.records.append(CheckRecord(name, None, error=str(exc)))
            else:
                report.records.append(_check_one(name, x, deployed, reference, tol))
            progress()
    return report


def _check_one(
    source: str, x: np.ndarray, deployed: Session, reference: Session, tol: Tolerance
) -> CheckRecord:
    shape: Shape = tuple(int(d) for d in x.shape)  # type: ignore[assignment]
    fused = deployed.manifest.config.num_classes is None
    try:
        # The reference first: torch hands its working memory back when a call ends, while
        # ONNX Runtime's arena keeps its own, so this order keeps the two peaks apart.
        ref = np.asarray(reference.run(x))
        image = _expected_image(x, reference) if fused else None
        out = np.asarray(deployed.run(x))
    except ResfuseError as exc:
        return CheckRecord(source, shape, error=str(exc))
    record = CheckRecord(source, shape, compare(ref, out, tol))
    if image is not None:
        record.passthrough, record.passthrough_ok = _passthrough(*image, out, tol)
    return record


def _expected_image(x: np.ndarray, reference: Session) -> tuple[np.ndarray, bool]:
    """What the fused output's first C channels must be, and whether a mask gates them: the
    image itself (upsample, spp), or image * (1 - mask) with the reference's mask (masked)."""
    model = getattr(reference.runner, "model", None)
    if model is None or model.config.method != "masked":
        return x, False
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
