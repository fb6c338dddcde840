"""INT8 accuracy on trained models: each fusion method trained briefly on a procedural task.

    python benchmarks/accuracy.py            # about 21 minutes on 2 shared cores
    python benchmarks/accuracy.py --reuse    # keep the weights and artifacts of an earlier run
    python benchmarks/accuracy.py --quick    # smoke run, everything tiny

Accuracy measured on random-init models says little about a deployed one, so each method
(resnet18, segmentation head, 3 classes) is trained on the CPU for a few minutes on a
segmentation task drawn with numpy: striped red-to-yellow ellipses (class 1) and speckled
green-to-blue rectangles or triangles (class 2) on textured or gradient grey backgrounds, with
noise. Its weights are saved as safetensors and exported twice with resfuse.export: float32,
and INT8 calibrated on PNG files from the training distribution. On held-out images (their own
seed, three sizes, one no multiple of 32) each precision is compared with the PyTorch
original: relative L2 of the logits, per-pixel argmax agreement, and mIoU against the ground
truth. Latency at 512x512, batch 1, 2 threads, is timed by resfuse-bench's stopwatch
(`runtime.bench.time_shape`) in blocks of consecutive calls per
backend (never call by call: ONNX Runtime's spinning threads slow whatever runs next), the
block order rotated over 3 rounds.

Targets reported on, not asserted: INT8 argmax agreement >= 99% and INT8 mIoU within 1 point
of float32, on every held-out size. Writes benchmarks/results/accuracy.json (with the machine)
and accuracy.md beside it; trained weights, calibration images and artifacts go to
benchmarks/artifacts/accuracy/ (a temporary folder with --quick).
"""

from __future__ import annotations

import argparse
import colorsys
import contextlib
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from resfuse.artifacts import read_manifest, write_json
from resfuse.export.pipeline import ExportOptions, artifact_name, export_artifact
from resfuse.export.quantize import Calibration
from resfuse.models import METHODS, ModelConfig, build_model
from resfuse.runtime import Session, load
from resfuse.runtime.backends.onnxrt import OPTIONS as ORT_OPTIONS
from resfuse.runtime.bench import time_shape
from resfuse.runtime.machine import machine_info
from resfuse.runtime.report import markdown_table
from resfuse.shapes import format_shape
from resfuse.weights import save_weights

HERE = Path(__file__).parent
CLASSES = ("background", "ellipse", "polygon")
BACKENDS = {"torch": "torch", "float32": "ORT float32", "int8": "ORT INT8"}
AGREEMENT_TARGET, MIOU_POINTS_TARGET = 0.99, 1.0
ORT_SPINNING_OPTION = "spinning" in ORT_OPTIONS  # declared by newer resfuse runtimes
# Seed streams, one per use: the held-out images are never trained or calibrated on.
TRAIN, CALIBRATION, HELDOUT = 0, 1, 2


@dataclass(frozen=True)
class Plan:
    minutes: float  # training time per method
    train_size: int = 128
    batch: int = 4  # steps, not pixels, limit a few minutes of training
    lr: float = 3e-3
    heldout: dict[str, int] = field(  # "HxW" -> images
        default_factory=lambda: {"128x128": 32, "256x256": 12, "200x168": 16}
    )
    calib_count: int = 32
    calib_size: int = 256  # drawn at this size, so calibration reads them unresized
    latency_side: int = 512
    latency_calls: int = 7  # per block; PyTorch eager takes 1-2.5 s a call here at 512x512
    warmup: int = 1
    rounds: int = 3
    max_size: int = 2048  # the exported range: the default deployment contract


FULL = Plan(minutes=4)
QUICK = Plan(
    minutes=0.05,
    train_size=64,
    batch=4,
    heldout={"64x64": 2, "96x96": 1, "88x72": 1},  # INT8 artifacts take 64 and more
    calib_count=2,
    calib_size=64,
    latency_side=128,
    latency_calls=2,
    max_size=256,  # fewer, smaller shapes in the export's parity sweeps
)


# --- the task: shapes on backgrounds, drawn with numpy ----------------------------------------


def _waves(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Two plane waves in [-1, 1]; frequencies in pixels, so any image size shows the same."""
    total = np.zeros(np.broadcast_shapes(yy.shape, xx.shape), np.float32)
    for _ in range(2):
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.02, 0.2), rng.uniform(0, 6.3)
        total += np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
    return total / 2


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Greys with a slight tint, from which the saturated shapes stand out."""
    c0, c1 = rng.uniform(20, 170, (2, 1)) + rng.uniform(-15, 15, (2, 3))
    if rng.random() < 0.5:  # a linear gradient in a random direction
        theta = rng.uniform(0, 2 * np.pi)
        d = np.cos(theta) * xx + np.sin(theta) * yy
        t = (d - d.min()) / (np.ptp(d) + 1e-6)
    else:  # a texture between two colours
        t = 0.5 + 0.5 * _waves(rng, yy, xx)
    return c0 + (c1 - c0) * t[..., None]


def _saturated(rng: np.random.Generator, ellipse: bool) -> np.ndarray:
    """A bright, saturated colour: red to yellow hues for ellipses, green to blue for polygons."""
    hue = rng.uniform(-50, 50) if ellipse else rng.uniform(130, 230)
    rgb = colorsys.hsv_to_rgb(hue % 360 / 360, rng.uniform(0.7, 1), rng.uniform(0.75, 1))
    return 255 * np.array(rgb)


def _fill(rng: np.random.Generator, ellipse: bool, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Stripes in ellipses, coarse speckle in polygons."""
    if ellipse:
        return 35 * _waves(rng, yy, xx)[..., None] + rng.normal(0, 6, (*yy.shape, 3))
    return rng.normal(0, 25, (*yy.shape, 3))


def _inside(
    rng: np.random.Generator, kind: str, dy: np.ndarray, dx: np.ndarray, r: float
) -> np.ndarray:
    """Pixels of one shape of radius about r, centred at dy = dx = 0."""
    if kind == "triangle":
        angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3
        angles += rng.uniform(-0.35, 0.35, 3)  # less than a third of the gap: still convex
        vy, vx = 1.2 * r * np.sin(angles), 1.2 * r * np.cos(angles)
        cross = [
            (vx[(i + 1) % 3] - vx[i]) * (dy - vy[i]) - (vy[(i + 1) % 3] - vy[i]) * (dx - vx[i])
            for i in range(3)
        ]
        return np.all(np.array(cross) >= 0, 0) | np.all(np.array(cross) <= 0, 0)
    phi = rng.uniform(0, np.pi)
    u, v = np.cos(phi) * dx + np.sin(phi) * dy, np.cos(phi) * dy - np.sin(phi) * dx
    if kind == "ellipse":
        a, b = r * rng.uniform(0.6, 1.0, 2)
        return (u / a) ** 2 + (v / b) ** 2 <= 1
    a, b = r * rng.uniform(0.5, 0.9, 2)
    return (np.abs(u) <= a) & (np.abs(v) <= b)


def scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its class mask (H, W) uint8. Shapes are 20-53 pixels in
    radius (one or two of the backbone's 32-pixel cells) and their number grows with the area,
    so every size shows the same kind of scene: 65-72% background, the rest split about
    evenly. The classes differ in outline, texture and hue: by outline and texture alone, a
    few CPU minutes left the model undecided on most shape pixels (shape IoU 0.1-0.5), a poor
    stand-in for a deployed model, whose doubtful pixels are at the boundaries."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = _background(rng, yy, xx)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(1 + rng.poisson(3 * h * w / 128**2)):
        kind = rng.choice(["ellipse", "ellipse", "rectangle", "triangle"])
        r, cy, cx = rng.uniform(20, 44), rng.uniform(0, h), rng.uniform(0, w)
        box = np.s_[max(0, int(cy - 1.3 * r)) : int(cy + 1.3 * r) + 1,
                    max(0, int(cx - 1.3 * r)) : int(cx + 1.3 * r) + 1]  # fmt: skip
        inside = _inside(rng, kind, yy[box] - cy, xx[box] - cx, r)
        ellipse = kind == "ellipse"
        shade = _saturated(rng, ellipse) + _fill(rng, ellipse, yy[box], xx[box])
        image[box][inside] = shade[inside]
        mask[box][inside] = 1 if ellipse else 2
    image += rng.normal(0, rng.uniform(3, 12), image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), mask


def scenes(rng: np.random.Generator, n: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = [scene(rng, h, w) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def to_input(images: np.ndarray, preprocess: dict[str, Any]) -> np.ndarray:
    """8-bit images as the artifact reads image files: /255, then its mean and std (NCHW)."""
    mean = np.asarray(preprocess["mean"], np.float32)
    std = np.asarray(preprocess["std"], np.float32)
    return np.ascontiguousarray(((images / np.float32(255) - mean) / std).transpose(0, 3, 1, 2))


def _hw(size: str) -> tuple[int, int]:
    h, w = size.split("x")
    return int(h), int(w)


# --- training and export -----------------------------------------------------------------------


def train(config: ModelConfig, plan: Plan, seed: int, path: Path) -> dict[str, Any]:
    """Train from random init for plan.minutes (cosine learning rate over that time), then
    save the weights; returns what was done."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, TRAIN])
    preprocess = ExportOptions().preprocess(config)
    model = build_model(**config.to_dict()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=1e-4)
    budget, start, steps, losses = plan.minutes * 60, time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = plan.lr * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        images, masks = scenes(rng, plan.batch, plan.train_size, plan.train_size)
        logits = model(torch.from_numpy(to_input(images, preprocess)))
        loss = F.cross_entropy(logits, torch.from_numpy(masks).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        steps += 1
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, path)
    tail = losses[-max(1, steps // 10) :]
    print(f"  {steps} steps, loss {losses[0]:.3f} -> {np.mean(tail):.3f}", flush=True)
    return {
        "steps": steps,
        "images": steps * plan.batch,
        "seconds": round(time.perf_counter() - start, 1),
        "first_loss": losses[0],
        "last_loss": float(np.mean(tail)),  # mean of the last tenth of the steps
    }


def write_calibration(folder: Path, plan: Plan, seed: int) -> Path:
    """8-bit PNG files from the training distribution (its own seed stream, not held out)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, CALIBRATION])
    for i in range(plan.calib_count):
        image, _ = scene(rng, plan.calib_size, plan.calib_size)
        Image.fromarray(image).save(folder / f"calib-{i:03d}.png")
    return folder


def int8_options(plan: Plan, calibration: Path) -> ExportOptions:
    # This script measures INT8's error itself, so the export's gate is opened to an error as
    # large as the output (rel L2 1.0) and its sweep is recorded instead.
    return ExportOptions(
        max_size=plan.max_size,
        precision="int8",
        calibration=Calibration(calibration, count=plan.calib_count, size=plan.calib_size),
        max_rel_l2=1.0,
    )


def export_pair(
    config: ModelConfig, weights: Path, folder: Path, int8: ExportOptions, reuse: bool
) -> dict[str, Path]:
    """The float32 and INT8 manifests of the trained weights, exported unless reused."""
    manifests = {}
    for options in (ExportOptions(max_size=int8.max_size), int8):
        manifest = folder / f"{artifact_name(config, options.precision)}.json"
        if not (reuse and manifest.exists()):
            print(f"  exporting {manifest.stem}", flush=True)
            export_artifact(config, folder, options, weights=weights)
        manifests[options.precision] = manifest
    return manifests


# --- measuring -----------------------------------------------------------------------------------


def open_sessions(
    stack: contextlib.ExitStack, manifests: dict[str, Path], threads: int
) -> dict[str, Session]:
    """The PyTorch original (rebuilt from the float32 artifact's verified weights) and both
    deployed artifacts, each with `threads` threads, ONNX Runtime's without spinning threads
    where the backend declares that option (spinning ones would slow the next backend timed)."""
    ort = {"threads": threads, **({"spinning": False} if ORT_SPINNING_OPTION else {})}
    return {
        "torch": stack.enter_context(load(manifests["float32"], backend="torch", threads=threads)),
        "float32": stack.enter_context(load(manifests["float32"], **ort)),
        "int8": stack.enter_context(load(manifests["int8"], **ort)),
    }


def run_all(session: Session, x: np.ndarray, batch: int = 4) -> np.ndarray:
    return np.concatenate(
        [np.asarray(session.run(x[i : i + batch])) for i in range(0, len(x), batch)]
    )


def confusion(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(truth, predicted) pixel counts over the classes."""
    n = len(CLASSES)
    cells = truth.astype(np.int64).ravel() * n + predicted.ravel()
    return np.bincount(cells, minlength=n * n).reshape(n, n)


def iou(counts: np.ndarray) -> list[float]:
    """Per class, pooled over the images (the dataset's IoU, not a mean of per-image ones)."""
    hits = np.diag(counts)
    union = counts.sum(0) + counts.sum(1) - hits
    return [float(h / u) if u else float("nan") for h, u in zip(hits, union, strict=True)]


def accuracy(
    sessions: dict[str, Session], heldout: dict[str, tuple[np.ndarray, np.ndarray]]
) -> list[dict[str, Any]]:
    """Per held-out size and backend: logits against the PyTorch original, and the mIoU."""
    rows = []
    preprocess = sessions["float32"].manifest.data["preprocess"]
    for size, (images, masks) in heldout.items():
        x = to_input(images, preprocess)
        logits = {name: run_all(session, x) for name, session in sessions.items()}
        reference = logits["torch"].astype(np.float64)
        for name, out in logits.items():
            counts = confusion(out.argmax(1), masks)
            rows.append(
                {
                    "size": size,
                    "images": len(images),
                    "backend": name,
                    "rel_l2": float(np.linalg.norm(out - reference) / np.linalg.norm(reference)),
                    "agreement": float(np.mean(out.argmax(1) == reference.argmax(1))),
                    "iou": iou(counts),
                    "miou": float(np.nanmean(iou(counts))),
                    "confusion": counts.tolist(),
                }
            )
    return rows


def pooled_miou(rows: list[dict[str, Any]], backend: str) -> float:
    counts = sum(np.asarray(r["confusion"]) for r in rows if r["backend"] == backend)
    return float(np.nanmean(iou(np.asarray(counts))))


def latency(
    sessions: dict[str, Session], shape: tuple[int, int, int, int], plan: Plan
) -> dict[str, Any]:
    """resfuse-bench's stopwatch (`runtime.bench.time_shape`): blocks of consecutive calls per
    backend, order rotated each round; per backend the median of the rounds' medians, their
    spread (max - min over that) and the rel L2 error against torch on the timed input."""
    names = list(sessions)
    records = time_shape(
        list(sessions.values()),
        shape,
        warmup=plan.warmup,
        iters=plan.latency_calls,
        rounds=plan.rounds,
        reference=sessions["torch"],
        labels=names,
    )
    result = {}
    for name, record in zip(names, records, strict=True):
        medians = record.round_p50_ms
        p50 = float(np.median(medians))
        result[name] = {
            "p50_ms": p50,
            "spread": (max(medians) - min(medians)) / p50,
            "round_p50_ms": medians,
            "n": record.n,
            "rel_l2": record.rel_l2,
        }
    return result


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """INT8 against the targets on every held-out size (its worst size counts)."""
    by = {(r["size"], r["backend"]): r for r in rows}
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    agreement = min(by[s, "int8"]["agreement"] for s in sizes)
    drop = max(abs(by[s, "int8"]["miou"] - by[s, "float32"]["miou"]) * 100 for s in sizes)
    return {
        "int8_agreement_worst": agreement,
        "int8_agreement_met": agreement >= AGREEMENT_TARGET,
        "int8_miou_points_worst": drop,
        "int8_miou_met": drop <= MIOU_POINTS_TARGET,
    }


def measure_method(
    method: str, args: argparse.Namespace, plan: Plan, folder: Path, calibration: Path
) -> dict[str, Any]:
    config = ModelConfig(method, num_classes=len(CLASSES))
    weights = folder / "weights" / f"{method}-{config.backbone}.safetensors"
    trained: dict[str, Any] = {"reused": str(weights)}
    if not (args.reuse and weights.exists()):
        print(f"training {method} for {plan.minutes:g} min", flush=True)
        trained = train(config, plan, args.seed, weights)
    manifests = export_pair(config, weights, folder, int8_options(plan, calibration), args.reuse)
    heldout = {
        size: scenes(np.random.default_rng([args.seed, HELDOUT, i]), n, *_hw(size))
        for i, (size, n) in enumerate(plan.heldout.items())
    }
    side = plan.latency_side
    print(f"  measuring {method}", flush=True)
    with contextlib.ExitStack() as stack:
        sessions = open_sessions(stack, manifests, args.threads)
        rows = accuracy(sessions, heldout)
        times = latency(sessions, (1, config.in_channels, side, side), plan)
    sweep = read_manifest(manifests["int8"]).data["parity"]["results"]
    return {
        "model": f"{method}-{config.backbone}",
        "config": config.to_dict(),
        "training": trained,
        "artifacts": {k: str(v) for k, v in manifests.items()},
        "accuracy": rows,
        "miou_pooled": {name: pooled_miou(rows, name) for name in sessions},
        "latency": times,
        "targets": targets(rows),
        "int8_export_sweep_rel_l2": {format_shape(r["shape"]): r["rel_l2"] for r in sweep},
    }


# --- reporting -----------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{value:.2%}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def summary_table(summary: dict[str, Any]) -> str:
    rows = []
    for m in summary["models"]:
        for name, label in BACKENDS.items():
            mine = [r for r in m["accuracy"] if r["backend"] == name]
            t, lat = m["targets"], m["latency"][name]
            rows.append(
                [
                    m["model"],
                    label,
                    f"{max(r['rel_l2'] for r in mine):.4f}",
                    _pct(min(r["agreement"] for r in mine)),
                    f"{m['miou_pooled'][name] * 100:.2f}",
                    f"{(m['miou_pooled'][name] - m['miou_pooled']['float32']) * 100:+.2f}",
                    f"{lat['p50_ms']:.1f}",
                    f"{lat['spread']:.0%}",
                    f"{_met(t['int8_agreement_met'])}, {_met(t['int8_miou_met'])}"
                    if name == "int8"
                    else "",
                ]
            )
    side = summary["plan"]["latency_side"]
    return markdown_table(
        [
            "model",
            "backend",
            "rel L2 vs torch (worst size)",
            "argmax agreement (worst size)",
            "mIoU (all sizes)",
            "vs float32",
            f"p50 ms {side}x{side}",
            "spread",
            "targets: agreement >= 99%, mIoU within 1",
        ],
        rows,
    )


def size_table(summary: dict[str, Any]) -> str:
    rows = []
    for m in summary["models"]:
        by = {(r["size"], r["backend"]): r for r in m["accuracy"]}
        for size in summary["plan"]["heldout"]:
            rows.append(
                [
                    m["model"],
                    size,
                    by[size, "torch"]["images"],
                    *(f"{by[size, name]['miou'] * 100:.2f}" for name in BACKENDS),
                    _pct(by[size, "float32"]["agreement"]),
                    _pct(by[size, "int8"]["agreement"]),
                    f"{by[size, 'int8']['rel_l2']:.4f}",
                ]
            )
    return markdown_table(
        [
            "model",
            "HxW",
            "images",
            "mIoU torch",
            "ORT float32",
            "ORT INT8",
            "agreement float32",
            "INT8",
            "INT8 rel L2",
        ],
        rows,
    )


def report(summary: dict[str, Any]) -> str:
    plan = summary["plan"]
    heldout = ", ".join(f"{n} at {size}" for size, n in plan["heldout"].items())
    return f"""Command: `{summary["command"]}` ({summary["date"]})

{summary_table(summary)}

Per held-out size (mIoU in points; agreement: pixels whose argmax matches PyTorch's):

{size_table(summary)}

Held-out images: seed {summary["seed"]}, {heldout}.
INT8 calibrated on {plan["calib_count"]} PNG files at {plan["calib_size"]}x{plan["calib_size"]} \
from the training distribution. Latency: batch 1, {summary["threads"]} threads per backend, \
{plan["warmup"]} warm-up call(s) per backend, then {plan["rounds"]} rounds of one block per \
backend ({plan["latency_calls"]} timed calls after one that is not counted), block order \
rotated (resfuse-bench's stopwatch), ONNX Runtime's thread spinning \
{summary["ort_spinning"]}; p50 is the median of the rounds' medians, spread their \
range over it.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, help=f"training per method ({FULL.minutes})")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2, help="threads of each timed backend")
    # One thread: on a shared 2-core machine torch's second thread mostly waits at barriers
    # (a training step ran 2.5-4x slower with two while other work held the cores).
    parser.add_argument(
        "--work-threads", type=int, default=1, help="torch threads for training and export"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="keep existing weights, artifacts")
    parser.add_argument("--quick", action="store_true", help="smoke run: masked only, tiny")
    parser.add_argument("--output", type=Path, help="JSON path; the .md is written beside it")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.minutes is not None:
        plan = replace(plan, minutes=args.minutes)
    methods = ["masked"] if args.quick else args.methods.split(",")
    default = HERE / ("artifacts/accuracy-quick.json" if args.quick else "results/accuracy.json")
    output: Path = args.output or default
    torch.set_num_threads(args.work_threads)  # the torch backend sets --threads while timed
    with contextlib.ExitStack() as stack:
        folder = HERE / "artifacts" / "accuracy"
        if args.quick:  # nothing of a smoke run is kept but its results
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="resfuse-")))
        calibration = write_calibration(folder / "calibration", plan, args.seed)
        models = [measure_method(m, args, plan, folder, calibration) for m in methods]
    summary = {
        "format": "resfuse-accuracy",
        "command": " ".join(["python", "benchmarks/accuracy.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).date().isoformat(),
        "machine": machine_info(),
        "threads": args.threads,
        "work_threads": args.work_threads,
        "ort_spinning": "off" if ORT_SPINNING_OPTION else "on (no option to turn it off)",
        "seed": args.seed,
        "classes": list(CLASSES),
        "plan": asdict(plan),
        "targets": {"int8_agreement": AGREEMENT_TARGET, "int8_miou_points": MIOU_POINTS_TARGET},
        "models": models,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output, summary)
    text = report(summary)
    output.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
