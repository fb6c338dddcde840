"""From a float32 artifact to the fastest verified deployment per target, with a report.

`optimize` chains what the commands do, through the same library functions: it makes each
variant a target takes (`export_artifact`, with the mixed-precision rescue), judges every
(variant, backend) candidate as `resfuse-check` does (`check_artifact`, on the user's images),
times them all in one rotated run as `resfuse-bench` does (`benchmark`), and chooses per target
the fastest candidate that passes every gate and constraint, saying for every other one why
not. Everything it made or measured is kept under OUTPUT and reused by a rerun with the same
inputs (variants by their source's weights, checks and timings by the bytes of the manifests
they judged), so a Ctrl-C loses only the step in flight.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from resfuse.artifacts import (
    Manifest,
    named_files,
    read_manifest,
    replace_file,
    sha256_of,
    write_json,
)
from resfuse.compare import MaskGates, pooled
from resfuse.engine_manifest import digest
from resfuse.environment import library_versions
from resfuse.errors import BackendUnavailableError, ConfigError, ParityError
from resfuse.export.pipeline import ExportOptions, artifact_name, export_artifact
from resfuse.export.quantize import Calibration
from resfuse.export.report import serving_ms, write_html
from resfuse.images import image_files
from resfuse.models import ModelConfig
from resfuse.runtime.backend_spec import parse_spec
from resfuse.runtime.bench import benchmark
from resfuse.runtime.check import check_artifact
from resfuse.runtime.machine import machine_info
from resfuse.shapes import Shape, format_shape

REPORT_FORMAT = "resfuse-optimize"


@dataclass(frozen=True)
class Target:
    """A deployment target: the backends that run it here, and the variants it takes
    (manifest dtype, INT8 activation scheme), widest first."""

    backends: tuple[str, ...]
    variants: tuple[tuple[str, str | None], ...]
    bf16: bool = False  # OpenVINO may compute float32 graphs in bf16 where the CPU has it
    # a TensorRT flavour: an engine is built per variant for the target's GPUs, and each
    # variant is judged here on its ONNX graph (the backends), untimed: no GPU runs it here
    engine: str | None = None


_FP32, _FP16 = ("float32", None), ("float16", None)
TARGETS = {
    "cpu": Target(("onnxruntime", "openvino"), (_FP32, ("int8", "cpu")), True),
    "openvino": Target(("openvino",), (_FP32, ("int8", "cpu")), True),
    "tensorrt": Target(("onnxruntime",), (_FP32, _FP16, ("int8", "tensorrt")), engine="tensorrt"),
    # RTX GPUs run an engine for the compute capabilities named after a colon, e.g.
    # tensorrt-rtx:8.9,12.0 (default: this GPU, else TensorRT-RTX's usual set)
    "tensorrt-rtx": Target(("onnxruntime",), (_FP32, _FP16), engine="tensorrt-rtx"),
}
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# images outside the artifact's range are judged as they would be served: in tiles
_TILES = {"tile": "auto", "overlap": 0.25, "blend": "gaussian"}
_MASKS = (".png", ".tif", ".tiff")


@dataclass
class Candidate:
    """One variant on one backend, with what was measured and the verdict."""

    artifact: str  # the variant's manifest path
    name: str
    backend: str
    precision: str
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    check: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # shape -> p50
    memory_mib: dict[str, float] = field(default_factory=dict)  # peak RSS: process, model
    targets: list[str] = field(default_factory=list)  # the targets it is a candidate for
    # an engine target's: what judged its graph here, and the engine built for the target
    judged_on: str | None = None
    engine: str | None = None

    def key(self) -> str:
        return f"{self.name} on {self.backend}"

    def runs_as(self) -> str:
        """The backend that judges (and times) it here."""
        return self.judged_on or self.backend

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.key(),
            "artifact": self.artifact,
            "name": self.name,
            "backend": self.backend,
            "precision": self.precision,
            "passed": self.passed,
            "reasons": self.reasons,
            "check": self.check,
            "latency_ms": self.latency_ms,
            "memory_mib": self.memory_mib,
            "targets": self.targets,
            "judged_on": self.judged_on,
            "engine": self.engine,
        }


@dataclass(frozen=True)
class Constraints:
    min_agreement: float | None = None  # a model with a head: least pooled agreement
    # a model with a head: 1 - the lowest class Dice against the original; with ground-truth
    # masks, the most any class's Dice against them falls below the original's
    max_dice_drop: float | None = None
    latency_budget_ms: float | None = None  # p50 at the largest serving shape


def optimize(
    artifact: str | Path,
    output: str | Path,
    *,
    images: str | Path,
    masks: str | Path | None = None,
    targets: Sequence[str] = ("cpu",),
    shapes: Sequence[Shape] = (),
    sweep: Sequence[int] = (128, 256, 512),
    constraints: Constraints = Constraints(),
    rounds: int = 3,
    iters: int = 3,
    threads: int | None = None,
    progress: Callable[[str], None] = lambda step: None,
) -> dict[str, Any]:
    """Make, judge and time every candidate for `targets`, choose per target, and write
    OUTPUT/report.json, OUTPUT/report.html and OUTPUT/deploy/<target>/; returns the report.
    `masks`: ground-truth label maps (PNG, class per pixel) named as the images are: each
    candidate's Dice against them is measured too, and the original's beside it."""
    source = read_manifest(artifact)
    if source.precision != "float32":
        raise ConfigError(
            f"{artifact} is a {source.precision} artifact; resfuse-optimize starts from the "
            f"float32 one and makes the variants itself: pass the float32 manifest"
        )
    for target in targets:
        _check_target(target)
    files = image_files(images, "--images")  # a bad folder fails before any work
    truths = _truths(files, Path(images), masks) if masks is not None else None
    if truths is not None and source.config.num_classes is None:
        raise ConfigError(
            "--masks scores class masks, and this model has no segmentation head "
            "(num_classes); drop --masks"
        )
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    shapes = list(shapes) or [(1, source.contract.channels, 512, 512)]
    sweep_shapes = [(1, source.contract.channels, s, s) for s in sweep]
    variants, failed = _variants(source, output / "artifacts", images, targets, progress)
    candidates = _candidates(variants, targets)
    cache = _Cache(output / "cache")
    engines = _engines(candidates, output / "engines", cache, progress)
    for c in candidates:
        if "engine_error" in c.check:
            continue
        progress(f"checking {c.key()}")
        c.check = cache.get_or(
            ("check", c.artifact, c.runs_as(), str(images)), partial(_checked, c, images)
        )
    original = None
    if truths is not None:
        original = Candidate(str(source.path), _base(source), "torch", "float32")
        for c in [original, *candidates]:
            progress(f"scoring {c.key()} against the masks")
            c.check["truth_dice"] = cache.get_or(
                ("truth", c.artifact, c.runs_as(), str(images), str(masks)),
                partial(_truth_dice, c, truths),
            )
    timed = [c for c in candidates if c.judged_on is None]
    also = sorted({c.artifact for c in timed} - {str(source.path)})
    backends = list(dict.fromkeys(c.backend for c in timed))
    timing: dict[str, Any] = {"records": []}
    if timed:
        progress("timing every candidate in one rotated run")
        timing = cache.get_or(
            ("bench", str(artifact), *also, *backends,
             *map(format_shape, [*shapes, *sweep_shapes]), str(rounds), str(iters)),
            lambda: benchmark(source.path, backends=backends, shapes=[*shapes, *sweep_shapes],
                              also=also, rounds=rounds, iters=iters, threads=threads, warmup=1),
        )  # fmt: skip
    _attach_latency(candidates, timing)
    for c in timed:
        progress(f"peak memory of {c.key()}")
        c.memory_mib = cache.get_or(
            ("memory", c.artifact, c.backend, format_shape(shapes[-1])),
            partial(_peak_memory, c, shapes[-1]),
        )
    serving = [format_shape(s) for s in shapes]
    for c in candidates:
        _judge(c, constraints, serving, original)
    chosen = {t: _choose([c for c in candidates if t in c.targets], serving) for t in targets}
    report = {
        "format": REPORT_FORMAT,
        "source": str(Path(artifact).resolve()),
        "images": str(Path(images).resolve()),
        "targets": list(targets),
        "shapes": serving,
        "sweep": [format_shape(s) for s in sweep_shapes],
        "constraints": constraints.__dict__,
        "masks": str(Path(masks).resolve()) if masks is not None else None,
        "original_truth_dice": original.check["truth_dice"] if original else None,
        "candidates": [c.to_dict() for c in candidates],
        "chosen": {t: (c.to_dict() if c else None) for t, c in chosen.items()},
        "deploy": {t: f"deploy/{_folder(t)}" for t, c in chosen.items() if c is not None},
        "why_not": {t: _why_not(candidates, c, t, serving) for t, c in chosen.items()},
        "failed_variants": failed,
        "reused": cache.reused,
        "machine": machine_info(),
        "versions": library_versions(),
        "commands": _commands(artifact, output, images, targets, shapes),
    }
    write_json(output / "report.json", report)
    for target, candidate in chosen.items():
        if candidate is not None:
            _deploy(candidate, output / report["deploy"][target], engines.get(candidate.key()))
    write_html(report, output / "report.html")
    return report


def from_checkpoint(
    config: ModelConfig,
    folder: Path,
    weights: Path | None,
    class_names: tuple[str, ...] | None,
    progress: Callable[[str], None] = lambda step: None,
) -> Path:
    """The float32 artifact of `config` with `weights` (None: seeded random init) in `folder`,
    exported as resfuse-export does with its defaults, or reused when already made from the
    same weights, model and class names."""
    model = digest([dataclasses.asdict(config), class_names])
    made_from = f"{_weights_sha256(weights) if weights else 'random-init'} {model}"
    name = artifact_name(config, "float32", None, None)
    found = _reusable(folder, name, made_from)
    if found is not None:
        progress(f"reusing {found.name}")
        return found
    progress(f"exporting {name} from {weights or 'a random init'}")
    result = export_artifact(
        config,
        folder,
        ExportOptions(class_names=class_names),
        weights=weights,
        progress=lambda step: progress(f"{name}: {step}"),
    )
    replace_file(_made_from_path(result.manifest_path), made_from.encode())
    return result.manifest_path


def _weights_sha256(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"--weights {path} is not a file; give the checkpoint's path")
    return sha256_of(path)


# Variants


def _variants(
    source: Manifest,
    folder: Path,
    images: str | Path,
    targets: Sequence[str],
    progress: Callable[[str], None],
) -> tuple[dict[tuple[str, str | None], str | None], dict[str, str]]:
    """Each variant the targets take, made once: reused when present and made from the same
    weights and calibration images; None where it failed its gate even after the rescue, with
    the reason in the second dict (by the variant's name)."""
    wanted = {v for t in targets for v in _spec(t).variants if v != _FP32}
    made: dict[tuple[str, str | None], str | None] = {_FP32: str(source.path)}
    failed: dict[str, str] = {}
    made_from = f"{source.data['files']['weights']['sha256']} {_identity(str(images))}"
    for dtype, target in sorted(wanted, key=str):
        name = artifact_name(source.config, dtype, target, _base(source))
        found = _reusable(folder, name, made_from)
        if found is not None:
            progress(f"reusing {found.name}")
            made[(dtype, target)] = str(found)
            continue
        progress(f"making {name} (rescued if it misses its gate)")
        try:
            result = export_artifact(
                source.config,
                folder,
                _options(source, dtype, target, images),
                weights=source.path.parent / source.record("weights")["path"],
                name=_base(source),
                progress=lambda step, name=name: progress(f"{name}: {step}"),
            )
        except ParityError as exc:
            progress(f"{name} failed: {exc}")
            made[(dtype, target)], failed[name] = None, str(exc)
            continue
        made[(dtype, target)] = str(result.manifest_path)
        replace_file(_made_from_path(result.manifest_path), made_from.encode())
    return made, failed


def _base(source: Manifest) -> str:
    return str(source.data["name"])


def _made_from_path(manifest: Path) -> Path:
    """Where optimize records what a variant was made from: weights and calibration images."""
    return manifest.with_name(f".{manifest.stem}.made-from")


def _reusable(folder: Path, name: str, made_from: str) -> Path | None:
    """A variant already in `folder` (plain or mixed) made from the same weights and images."""
    for candidate in (folder / f"{name}.json", folder / f"{name}-mixed.json"):
        try:
            read_manifest(candidate)  # whole and verified
            if _made_from_path(candidate).read_text() == made_from:
                return candidate
        except Exception:  # noqa: BLE001 - absent, broken or made otherwise: made again
            continue
    return None


def _options(source: Manifest, dtype: str, target: str | None, images: str | Path) -> ExportOptions:
    """The source's export options in another precision: its input range, intensity rule and
    opset, calibrated on the user's images, rescued if it misses its gate."""
    preprocess = source.data.get("preprocess", {})
    window = preprocess.get("window")
    value_range = preprocess.get("range")
    contract = source.contract
    side = contract.height.clamp(512)
    return ExportOptions(
        opset=int(source.record("onnx").get("opset", 18)),
        max_size=contract.height.max or 2048,
        max_batch=contract.batch.max or 32,
        precision=dtype,
        target=target,
        calibration=Calibration(images, count=32, size=side) if dtype == "int8" else None,
        intensity_range=tuple(value_range) if isinstance(value_range, list) else value_range,
        window=(window["center"], window["width"]) if window else None,
        intensity_units=preprocess.get("units"),
        keep_accuracy=True,
        class_names=tuple(source.data["class_names"]) if "class_names" in source.data else None,
    )


def _candidates(
    variants: dict[tuple[str, str | None], str | None], targets: Sequence[str]
) -> list[Candidate]:
    """Each (variant, backend) the targets take, once, knowing every target it serves."""
    found: dict[str, Candidate] = {}
    for target in targets:
        spec = _spec(target)
        for variant in spec.variants:
            path = variants.get(variant)
            if path is None:
                continue
            for backend in _target_backends(target):
                if backend.endswith("bf16") and variant != _FP32:
                    continue  # bf16 computes float32 graphs; an INT8 graph runs as INT8
                name = Path(path).stem
                if spec.engine is None:
                    candidate = Candidate(path, name, backend, variant[0])
                else:
                    candidate = Candidate(path, name, target, variant[0], judged_on=backend)
                found.setdefault(candidate.key(), candidate).targets.append(target)
    return list(found.values())


def _target_backends(target: str) -> list[str]:
    spec = _spec(target)
    extra = ["openvino:precision=bf16"] if spec.bf16 and _has_bf16() else []
    return [*spec.backends, *extra]


def split_targets(text: str) -> list[str]:
    """--targets' comma-separated words, where the compute capabilities after a colon
    (tensorrt-rtx:8.9,12.0) stay with their target."""
    found: list[str] = []
    for word in (w.strip() for w in text.split(",")):
        if re.fullmatch(r"\d+\.\d+", word) and found and ":" in found[-1]:
            found[-1] += f",{word}"
        elif word:
            found.append(word)
    return found


def _spec(target: str) -> Target:
    return TARGETS[target.partition(":")[0]]


def _check_target(target: str) -> None:
    """A known target, its GPUs valid for its flavour, and the flavour installed here: one
    line otherwise, before any work."""
    from resfuse.tensorrt_env import check_targets, flavour, import_flavour, parse_targets

    name, colon, gpus = target.partition(":")
    if name not in TARGETS:
        raise ConfigError(f"target {name!r} is not one of {', '.join(TARGETS)}")
    spec = TARGETS[name]
    if spec.engine is None:
        if colon:
            raise ConfigError(f"target {name!r} takes no GPUs after a colon: give {name}")
        return
    entry = flavour(spec.engine)
    if colon:
        if not entry.targets:
            raise ConfigError(
                f"{name} builds on the GPU that runs it, which names its compute capability: "
                f"give {name} without a colon"
            )
        check_targets(entry, parse_targets(gpus) or ())
    try:
        import_flavour(entry)
    except BackendUnavailableError:
        raise ConfigError(
            f"target {name} needs {entry.label}, which is not installed here: {entry.install}; "
            f"or leave {name} out of --targets"
        ) from None


def _folder(target: str) -> str:
    """A target's deploy folder name: tensorrt-rtx:8.9,12.0 -> tensorrt-rtx."""
    return target.partition(":")[0]


@cache  # the machine does not change under a run; machine_info reads /proc and more
def _has_bf16() -> bool:
    flags = set(machine_info().get("cpu_flags", []))
    return any(flag in flags for flag in _BF16_FLAGS)


# Checks and timing


def _checked(candidate: Candidate, images: str | Path) -> dict[str, Any]:
    """resfuse-check's verdict on the user's images (in tiles where one is outside the
    artifact's range): passed, the worst error, and for a head the agreement and per-class
    Dice pooled over the images."""
    backend, options = parse_spec(candidate.runs_as())
    report = check_artifact(  # the user's images only, so every candidate is judged alike
        candidate.artifact, backend, shapes=[], images=images, tiling=_TILES, **options
    )
    masks = [r.mask for r in report.records if r.mask is not None]
    record: dict[str, Any] = {
        "passed": report.passed,
        "rel_l2": max((r.stats.rel_l2 for r in report.records if r.stats), default=0.0),
        "inputs": len(report.records),
    }
    if masks:
        sweep = pooled(masks, MaskGates())
        record |= {"agreement": sweep.agreement, "dice": {str(c): d for c, d in sweep.dice.items()}}
    return record


def _truths(files: list[Path], images: Path, masks: str | Path) -> dict[str, Path]:
    """Each image's ground-truth mask: the file of the same relative path and stem under
    `masks` (PNG or TIFF); an image without one is an error naming it."""
    found = {}
    for file in files:
        relative = file.relative_to(images).with_suffix("")
        matches = [p for p in Path(masks).glob(f"{relative}.*") if p.suffix.lower() in _MASKS]
        if not matches:
            raise ConfigError(
                f"no mask for {file} under --masks {masks} (expected {relative}.png); give "
                f"every image its mask, or drop --masks"
            )
        found[str(file)] = matches[0]
    return found


def _truth_dice(candidate: Candidate, truths: dict[str, Path]) -> dict[str, float]:
    """Per class, the Dice of the candidate's masks against the ground truth, pooled over
    the images (run in tiles where an image is outside the artifact's range)."""
    from PIL import Image

    from resfuse.compare import label_agreement
    from resfuse.runtime.session import load

    backend, options = parse_spec(candidate.runs_as())
    results = []
    with load(candidate.artifact, backend, **options) as session:
        for image, mask_path in truths.items():
            truth = np.asarray(Image.open(mask_path))
            predicted = np.asarray(session.run(image, **_TILES))[0].argmax(axis=0)
            if truth.shape != predicted.shape:
                raise ConfigError(
                    f"mask {mask_path} is {truth.shape[1]}x{truth.shape[0]}, its image "
                    f"{predicted.shape[1]}x{predicted.shape[0]}; masks must match their images"
                )
            results.append(label_agreement(truth[None], predicted[None], MaskGates()))
    return {str(c): d for c, d in pooled(results, MaskGates()).dice.items()}


# A fresh interpreter per candidate, so one's peak is not another's: resident memory at its
# peak after the imports, then after loading the artifact and one call at the largest shape.
_MEMORY = """
import json, resource, sys
import numpy as np
from resfuse.runtime import load
from resfuse.runtime.backend_spec import parse_spec
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
backend, options = parse_spec(sys.argv[2])
shape = tuple(int(d) for d in sys.argv[3].split("x"))
x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
base = peak()
with load(sys.argv[1], backend, **options) as session:
    session.run(x)
print(json.dumps({"process": peak(), "model": peak() - base}))
"""


def _peak_memory(candidate: Candidate, shape: Shape) -> dict[str, float]:
    """Peak resident memory (MiB) serving one call at `shape`: the whole process, and what
    the artifact and its backend added to the imports'."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY, candidate.artifact, candidate.backend, format_shape(shape)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"measuring the memory of {candidate.key()} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _attach_latency(candidates: list[Candidate], timing: dict[str, Any]) -> None:
    for record in timing["records"]:
        for c in candidates:
            if record["artifact"] == c.name and record["backend"] == c.backend and not c.judged_on:
                c.latency_ms[format_shape(record["shape"])] = record["p50_ms"]


# Choosing


def _judge(
    c: Candidate, constraints: Constraints, serving: list[str], original: Candidate | None = None
) -> None:
    """`passed` and the reasons it did not: the check, then each constraint (a Dice drop
    against ground truth where `original`, the PyTorch model scored on the masks, is given)."""
    if "engine_error" in c.check:
        c.passed, c.reasons = False, [f"the engine build failed: {c.check['engine_error']}"]
        return
    reasons = (
        []
        if c.check.get("passed")
        else [
            f"fails resfuse-check on the images (worst rel L2 {c.check.get('rel_l2', 0.0):.3g}, "
            f"outside the artifact's tolerance or gates)"
        ]
    )
    agreement, dice = c.check.get("agreement"), c.check.get("dice") or {}
    if constraints.min_agreement is not None and agreement is not None:
        if agreement < constraints.min_agreement:
            reasons.append(f"agreement {agreement:.4%} < {constraints.min_agreement:.4%}")
    if constraints.max_dice_drop is not None and original is not None:
        truth, base = c.check["truth_dice"], original.check["truth_dice"]
        drop = max((base[k] - truth.get(k, 0.0) for k in base), default=0.0)
        if drop > constraints.max_dice_drop:
            reasons.append(
                f"Dice against the masks drops {drop:.4f} > {constraints.max_dice_drop:g}"
            )
    elif constraints.max_dice_drop is not None and dice:
        drop = 1 - min(dice.values())
        if drop > constraints.max_dice_drop:
            reasons.append(f"Dice drop {drop:.4f} > {constraints.max_dice_drop:g}")
    missing = [s for s in serving if s not in c.latency_ms]
    if c.judged_on:
        pass  # an engine target's candidate: its GPU is not here, so it is not timed
    elif missing:
        reasons.append(f"not timed at {', '.join(missing)}")
    elif constraints.latency_budget_ms is not None:
        largest = c.latency_ms[serving[-1]]
        if largest > constraints.latency_budget_ms:
            reasons.append(
                f"p50 {largest:.1f} ms at {serving[-1]} > budget {constraints.latency_budget_ms:g}"
            )
    c.passed, c.reasons = not reasons, reasons


def _choose(candidates: list[Candidate], serving: list[str]) -> Candidate | None:
    """The fastest candidate that passes; where none could be timed here (an engine target,
    whose GPU is elsewhere), the narrowest precision that passes, as its variants are listed
    widest first."""
    passing = [c for c in candidates if c.passed]
    timed = [c for c in passing if c.latency_ms]
    if timed:
        return min(timed, key=lambda c: serving_ms(c, serving))
    return passing[-1] if passing else None


def _why_not(
    candidates: list[Candidate], chosen: Candidate | None, target: str, serving: list[str]
) -> dict[str, str]:
    """Every other candidate of the target and why it was not chosen."""
    found = {}
    for c in candidates:
        if target not in c.targets or c is chosen:
            continue
        if c.reasons:
            found[c.key()] = "; ".join(c.reasons)
        elif chosen is not None and not chosen.latency_ms:
            found[c.key()] = (
                f"passes; not timed here (no {c.backend} GPU), and {chosen.precision} is the "
                f"narrower precision that passes"
            )
        elif chosen is not None:
            ratio = serving_ms(c, serving) / serving_ms(chosen, serving)
            found[c.key()] = f"passes, {ratio:.2f}x the chosen one's latency"
    return found


def _engines(
    candidates: list[Candidate], folder: Path, cache: _Cache, progress: Callable[[str], None]
) -> dict[str, Any]:
    """An engine per engine-target candidate, for the target's GPUs, in `folder` (TensorRT's
    cache: a rerun finds them); a build that fails fails its candidate, with TensorRT's words."""
    from resfuse.errors import ResfuseError
    from resfuse.export.engines import find_or_build
    from resfuse.tensorrt_env import parse_targets

    engines = {}
    for c in candidates:
        if not c.judged_on:
            continue
        gpus = parse_targets(c.backend.partition(":")[2] or None)
        built: list[str] = []

        def heard(step: str, c: Candidate = c, built: list[str] = built) -> None:
            built.append(step)
            progress(f"{c.key()}: {step}")

        try:
            engine = find_or_build(
                c.artifact, cache_dir=folder, engine=_spec(c.backend).engine, targets=gpus,
                progress=heard,
            )  # fmt: skip
        except ResfuseError as exc:
            c.check = {"passed": False, "engine_error": str(exc)}
            progress(f"{c.key()}: the engine build failed: {exc}")
            continue
        if not built:
            cache.reused.append(f"engine: {engine.record.path.name}")
        c.engine, engines[c.key()] = str(engine.record.path), engine
    return engines


# Outputs


def _deploy(candidate: Candidate, folder: Path, engine: Any = None) -> None:
    """The chosen artifact's manifest and files (and its engine, under engines/), a Triton
    model repository (not for TensorRT-RTX, which Triton does not run), and the lines that
    run it."""
    from resfuse.export.engines import export_engine
    from resfuse.export.triton import TritonOptions, write_triton_repo
    from resfuse.runtime.backend_spec import format_spec

    manifest = Path(candidate.artifact)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in [manifest.name, *named_files(manifest)]:
        shutil.copy2(manifest.parent / name, folder / name)
    triton, plan = TritonOptions(), None
    if engine is None:
        backend, options = parse_spec(candidate.backend)
    else:  # found by the runner in engines/, never rebuilt on the device
        plan = export_engine(engine, folder / "engines")
        options = {"flavour": _folder(candidate.backend), "cache_dir": "engines", "rebuild": False}
        backend, triton = "tensorrt", TritonOptions(kind="gpu")
    args = "".join(f", {k}={v!r}" for k, v in options.items())
    (folder / "run.py").write_text(
        "from resfuse import runtime\n\n"
        f'with runtime.load("{manifest.name}", "{backend}"{args}) as session:\n'
        '    output = session.run("image.png")  # or an NCHW float32 array\n'
    )
    (folder / "COMMAND").write_text(
        f"resfuse-predict {manifest.name} INPUT_DIR --output OUT "
        f"--backend {format_spec(backend, options)}\n"
    )
    if engine is None or engine.record.environment.flavour == "tensorrt":
        # Triton's tensorrt_plan backend runs TensorRT's plans, not TensorRT-RTX's
        write_triton_repo(folder / manifest.name, folder / "triton", triton, engine=plan)


def _commands(
    artifact: str | Path,
    output: Path,
    images: str | Path,
    targets: Sequence[str],
    shapes: Sequence[Shape],
) -> list[str]:
    shown = ",".join(format_shape(s) for s in shapes)
    return [
        f"resfuse-optimize {artifact} --images {images} --targets {','.join(targets)} "
        f"--shapes {shown} --output {output}"
    ]


class _Cache:
    """Checks and timings already made, keyed by what they depend on: the bytes of every
    manifest they judged (which name their files' sha256), the backend and the inputs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.reused: list[str] = []

    def get_or(self, key: tuple[str, ...], make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.folder / f"{key[0]}-{digest([_identity(k) for k in key])[:16]}.json"
        if path.is_file():
            self.reused.append(f"{key[0]}: {' '.join(Path(k).name for k in key[1:3])}")
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        value = make()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(path, value)
        return value


def _identity(part: str) -> str:
    """A manifest path stands for its bytes; an image folder for its files' names and sizes."""
    path = Path(part)
    if path.is_file() and path.suffix == ".json":
        return sha256_of(path)
    if path.is_dir():
        files = sorted((str(p.relative_to(path)), p.stat().st_size) for p in image_files(path))
        return digest(files)
    return part
