"""One export end to end: build, export, check, simplify, parity sweep, write the artifact."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from resfuse.artifacts import check_name, ensure_writable, write_artifact
from resfuse.compare import MaskGates, Tolerance
from resfuse.contract import InputContract, Range
from resfuse.environment import library_versions
from resfuse.errors import ConfigError, ExportError, ParityError
from resfuse.export import onnx as onnx_export
from resfuse.export.parity import ParityResult, failure, onnxruntime_cpu, run_parity, worst
from resfuse.export.quantize import CALIBRATION_METHODS, Calibration, quantization_record
from resfuse.export.sensitivity import Conversion, Sensitivity, rank, rescue
from resfuse.images import preprocess_record
from resfuse.models import FusionModel, ModelConfig, build_model
from resfuse.precisions import MIXED_SUFFIX, Precision, default_targets
from resfuse.precisions import precision as precision_entry
from resfuse.schema import FORMAT, FORMAT_VERSION
from resfuse.shapes import Shape, parity_shapes
from resfuse.weights import save_weights

# Inputs are read as images scaled to [0, 1], then normalised; recorded for the runtime.
_IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
MIN_OPSET, MAX_OPSET = 17, 23


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 18
    min_size: int | None = None  # None: 32, or two feature cells for INT8 (see smallest_size)
    max_size: int = 2048
    max_batch: int = 32
    atol: float = 1e-4
    rtol: float = 1e-4
    seed: int = 0
    simplify: bool = True
    # The manifest's dtype: float32, float16 or int8 (resfuse.precisions); INT8 needs a
    # calibration and takes a target, "cpu" (uint8 activations, the default) or "tensorrt".
    precision: str = "float32"
    calibration: Calibration | None = None
    target: str | None = None
    max_rel_l2: float | None = None  # a variant's parity bound; None: its precision's
    intensity_range: str | tuple[float, float] | None = None  # resfuse.images: "dtype" default
    window: tuple[float, float] | None = None  # (center, width), e.g. CT in Hounsfield units
    # what the window or range is written in: "rescaled" (None: the default) or "stored"
    intensity_units: str | None = None
    # a variant of a model with a head: its mask gates (None: the precision's defaults)
    min_agreement: float | None = None
    min_dice: float | None = None
    # when a variant misses its gate: keep its most sensitive layers float (resfuse.export.
    # sensitivity), within this many seconds and at most this many layers
    keep_accuracy: bool = False
    keep_accuracy_seconds: float = 900.0
    keep_accuracy_limit: int = 16
    explain: bool = False  # rank every layer's sensitivity, pass or fail
    # a head's class names, background (class 0) first: the segments of a DICOM SEG output
    class_names: tuple[str, ...] | None = None

    @property
    def variant(self) -> Precision:
        """What this precision is (resfuse.precisions); ConfigError for an unknown one."""
        return precision_entry(self.precision, self.target)

    @property
    def targets(self) -> list[str]:
        """The devices the artifact is made for (the manifest's `targets`)."""
        return list(self.variant.targets)

    @property
    def float_tolerance(self) -> Tolerance:
        return Tolerance(self.atol, self.rtol)

    @property
    def tolerance(self) -> Tolerance:
        """What the written artifact must meet against PyTorch."""
        bound = self.variant.max_rel_l2 if self.max_rel_l2 is None else self.max_rel_l2
        return self.float_tolerance if bound is None else Tolerance(self.atol, self.rtol, bound)

    def gates(self, config: ModelConfig) -> MaskGates | None:
        """The mask gates of a variant of a model with a head; None for float32 (judged
        elementwise) and for fused outputs (no mask)."""
        default = self.variant.mask_gates
        if config.num_classes is None or default is None:
            return None
        return MaskGates(
            default.min_agreement if self.min_agreement is None else self.min_agreement,
            default.min_dice if self.min_dice is None else self.min_dice,
        )

    def tolerance_for(self, config: ModelConfig) -> Tolerance:
        """`tolerance`, loosened for a head's logits where mask gates judge the variant."""
        loose = self.variant.head_max_rel_l2
        if self.gates(config) is None or loose is None or self.max_rel_l2 is not None:
            return self.tolerance
        return Tolerance(self.atol, self.rtol, loose)

    def preprocess(self, config: ModelConfig) -> dict[str, Any]:
        """How the runtime turns image files into inputs (recorded in the manifest): the
        intensity rule to [0, 1] (resfuse.images), then ImageNet's or a centring mean/std."""
        channels = config.in_channels
        norm = _IMAGENET if channels == 3 else {"mean": [0.5] * channels, "std": [0.5] * channels}
        window = None
        if self.window is not None:
            window = {"center": self.window[0], "width": self.window[1]}
        return preprocess_record(
            channels,
            mean=norm["mean"],
            std=norm["std"],
            value_range=self.intensity_range,
            window=window,
            units=self.intensity_units,
        )

    def smallest_size(self, config: ModelConfig) -> int:
        """--min-size, or its default: 32, and for INT8 two feature cells per side. An input of
        one cell quantizes worst (relative L2 0.09-0.13 at 32x32 on resnet18/50 with stride 32,
        0.04 at 64x64), so an INT8 artifact does not promise what it cannot keep there."""
        if self.min_size is not None:
            return self.min_size
        return max(32, 2 * config.stride) if self.variant.calibrated else 32

    def contract(self, config: ModelConfig) -> InputContract:
        """The exported graph's input contract; raises ConfigError naming the bad option."""
        min_size = self.smallest_size(config)
        if min_size < config.stride:
            raise ConfigError(
                f"--min-size {min_size} is below the smallest input {config.backbone} "
                f"stage {config.stage} accepts ({config.stride}, its output stride); use "
                f"--min-size {config.stride} or more"
            )
        if min_size > self.max_size:
            raise ConfigError(
                f"--min-size {min_size} is larger than --max-size {self.max_size}; "
                f"swap them or widen the range"
            )
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(
                f"--opset {self.opset} is outside {MIN_OPSET}..{MAX_OPSET}; 18 is the tested "
                f"default (TensorRT 10 and ONNX Runtime read 17-20)"
            )
        Tolerance(self.atol, self.rtol, self.max_rel_l2)  # raises ConfigError if negative
        self._check_precision()
        self.preprocess(config)  # a bad intensity rule fails before the export, too
        size = Range(min_size, self.max_size)
        return InputContract(config.in_channels, size, size, Range(1, self.max_batch))

    def _check_precision(self) -> None:
        variant = self.variant  # an unknown precision or a misplaced --target
        if variant.calibrated != (self.calibration is not None):
            raise ConfigError(
                f"a calibration makes an INT8 graph: a {self.precision} export with one asks for "
                f"two precisions at once; export one artifact per precision (--precision fp16, "
                f"--precision int8 with --calib-images DIR)"
                if self.calibration is not None
                else f"a {self.precision} export needs calibration inputs: --calib-images DIR "
                f"(representative images) or --calib-random (latency work only)"
            )
        if self.max_rel_l2 is not None and variant.max_rel_l2 is None:
            raise ConfigError(
                "--max-rel-l2 bounds the fp16 and int8 variants; a float32 export is judged "
                "elementwise: use --atol/--rtol, or drop --max-rel-l2"
            )


@dataclass(frozen=True)
class Source:
    """What a converter works from: the verified float32 graph and the model it came from, the
    export's contract and options, and where it reports progress and warnings."""

    model: FusionModel
    graph: onnx.ModelProto
    contract: InputContract
    options: ExportOptions
    progress: Callable[[str], None]
    warn: Callable[[str], None] | None


class GateError(ParityError):
    """A sweep that failed its gate, with every shape's result, so a command can show the whole
    table before the one-line reason."""

    def __init__(self, message: str, results: list[ParityResult], ranking: list[Sensitivity]):
        super().__init__(message)
        self.results = results
        self.ranking = ranking


@dataclass
class Mixed:
    """What a variant kept float beyond its precision's rules, and why: the rescue's layers
    (with their measured sensitivity), float16's measured range hazards, the calibration
    method that won, and the ranking when one was made."""

    kept: list[Sensitivity] = field(default_factory=list)
    always_float: list[dict[str, Any]] = field(default_factory=list)
    method: str | None = None
    ranking: list[Sensitivity] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept_float": [
                {**s.to_dict(), "why": "rescue: among the most sensitive"} for s in self.kept
            ]
            + self.always_float,
            **({"calibration_method": self.method} if self.method else {}),
        }


@dataclass
class ExportResult:
    name: str
    folder: Path
    files: dict[str, dict[str, Any]]  # the manifest's file records, by key
    seconds: float
    simplify_note: str  # "simplified", or why the raw graph was kept
    parity: list[ParityResult] = field(default_factory=list)
    mixed: Mixed = field(default_factory=Mixed)

    @property
    def simplified(self) -> bool:
        return self.simplify_note == "simplified"

    @property
    def manifest_path(self) -> Path:
        return self.folder / f"{self.name}.json"

    @property
    def onnx_path(self) -> Path:
        return self.folder / self.files["onnx"]["path"]

    @property
    def weights_path(self) -> Path:
        return self.folder / self.files["weights"]["path"]

    @property
    def onnx_bytes(self) -> int:
        return int(self.files["onnx"]["bytes"])

    @property
    def worst(self) -> ParityResult:
        return worst(self.parity)


def artifact_name(
    config: ModelConfig,
    precision: str = "float32",
    target: str | None = None,
    base: str | None = None,
) -> str:
    """The base name (METHOD-BACKBONE by default), then the precision's suffix (-fp16, -int8
    for the CPU's INT8, -int8-trt for TensorRT's): a variant never takes its source's name."""
    base = base or f"{config.method}-{config.backbone}"
    return base + precision_entry(precision, target).suffix


def _keep_other_precisions(folder: Path, name: str, options: ExportOptions) -> None:
    """Refuse to replace an artifact of another precision or other targets: it is a different
    artifact (a variant's source, or deployed), not an earlier version of this one."""
    path = folder / f"{name}.json"
    try:
        data = json.loads(path.read_bytes())
        precision = str(data["precision"])
        targets = sorted(map(str, data.get("targets") or default_targets(precision)))
    except (OSError, ValueError, TypeError, KeyError):
        return  # no artifact there, or none this check can read: the export replaces it
    if (precision, targets) != (options.precision, sorted(options.targets)):
        raise ConfigError(
            f"{path} is the {precision} artifact for {', '.join(targets)}, which this "
            f"{options.precision} export would replace; choose another --name or --output"
        )


def check_class_names(config: ModelConfig, names: tuple[str, ...] | None) -> None:
    """One non-empty name per class of the head, background first, each named once."""
    if not names:
        return
    if config.num_classes is None or len(names) != config.num_classes:
        classes = "no head" if config.num_classes is None else f"{config.num_classes} classes"
        raise ConfigError(
            f"--class-names gives {len(names)} names and the model has {classes}; name each "
            f"class of --num-classes once, background (class 0) first"
        )
    if any(not n.strip() or len(n) > 64 for n in names) or len(set(names)) != len(names):
        raise ConfigError(
            f"--class-names {','.join(names)!r} must be distinct, non-empty names of at most "
            f"64 characters (a DICOM segment label's limit)"
        )


def export_artifact(
    config: ModelConfig,
    output_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    weights: str | Path | None = None,
    pretrained: bool = False,
    name: str | None = None,
    progress: Callable[[str], None] = lambda step: None,
    warn: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export `config` into `output_dir`: the manifest <name>.json and the files it names,
    <name>.<tag>.onnx and <name>.<tag>.safetensors (tag: the file's sha256 prefix). `name` is
    the base name: a variant adds its suffix (artifact_name). `warn` hears of each calibration
    image skipped as unreadable (default: a Python warning).

    Nothing is written unless every check passes; then the manifest's rename commits the new
    artifact in one step (resfuse.artifacts). Raises a ResfuseError subclass on any failure.
    """
    contract = options.contract(config)
    check_class_names(config, options.class_names)
    base = check_name(name) if name is not None else None
    name = check_name(artifact_name(config, options.precision, options.target, base))
    ensure_writable(output_dir, name)
    _keep_other_precisions(Path(output_dir), name, options)
    start = time.perf_counter()
    progress("building the PyTorch model")
    torch.manual_seed(options.seed)
    model = build_model(**config.to_dict(), pretrained=pretrained, weights=weights)

    progress("exporting to ONNX (dynamo)")
    raw = onnx_export.export_onnx(model, contract, options.opset)
    onnx_export.check_model(raw)
    shapes = parity_shapes(contract)
    proto, note = raw, "off (--no-simplify)"
    results: list[ParityResult] = []
    if options.simplify:
        proto, results, note = _simplified(model, raw, shapes, options, progress)
    if not results:
        progress("parity sweep")
        results = _parity(model, raw, shapes, options.float_tolerance, options.seed)
    _require_parity(results, options.float_tolerance, "")
    source = None
    mixed = Mixed()
    if options.variant.converter is not None:
        # The variant names the float32 graph it was made from. The export is deterministic:
        # a float32 export with the same options and input range writes these very bytes
        # (INT8's smallest input defaults to two cells, float32's to 32: pass --min-size).
        source = {
            "name": artifact_name(config, base=base),
            "onnx_sha256": onnx_export.digest(proto),
        }
        proto, results, mixed = _variant(model, proto, contract, shapes, options, progress, warn)
        if mixed.kept:  # a mixed variant is an artifact of its own
            name = check_name(name + MIXED_SUFFIX)
            ensure_writable(output_dir, name)
            _keep_other_precisions(Path(output_dir), name, options)

    progress("writing the artifact")
    with write_artifact(output_dir, name) as writer:
        files = {
            "onnx": writer.add(".onnx", lambda path: onnx_export.save(proto, path)),
            "weights": writer.add(".safetensors", lambda path: save_weights(model, path)),
        }
        result = ExportResult(
            name, Path(output_dir), files, time.perf_counter() - start, note, results, mixed
        )
        record = _manifest(
            config=config,
            contract=contract,
            options=options,
            result=result,
            pretrained=pretrained,
            weights=weights,
            source=source,
        )
        writer.commit(record)
    return result


def _simplified(
    model: FusionModel,
    raw: onnx.ModelProto,
    shapes: list[Shape],
    options: ExportOptions,
    progress: Callable[[str], None],
) -> tuple[onnx.ModelProto, list[ParityResult], str]:
    """onnxslim's graph with its parity sweep when it passes; else the raw graph, no results
    yet, and why it was kept."""
    progress("simplifying (onnxslim)")
    try:
        slim = onnx_export.simplify(raw)
        onnx_export.check_model(slim)
    except ExportError as exc:
        return raw, [], f"kept the raw graph: {exc}"
    progress("parity sweep on the simplified graph")
    results = _parity(model, slim, shapes, options.float_tolerance, options.seed)
    failed = [r for r in results if not r.stats.passed]
    if failed:
        bad = failed[0]
        return (
            raw,
            [],
            (
                f"kept the raw graph: the simplified one failed parity at {bad.shape} "
                f"(max |error| {bad.stats.max_abs:.3g})"
            ),
        )
    return slim, results, "simplified"


def _parity(
    model: FusionModel,
    proto: onnx.ModelProto,
    shapes: list[Shape],
    tol: Tolerance,
    seed: int,
    sample: Callable[[Shape, int], np.ndarray] | None = None,
) -> list[ParityResult]:
    return run_parity(model, onnxruntime_cpu(proto), shapes, tol, seed, sample)


def _variant(
    model: FusionModel,
    proto: onnx.ModelProto,
    contract: InputContract,
    shapes: list[Shape],
    options: ExportOptions,
    progress: Callable[[str], None],
    warn: Callable[[str], None] | None = None,
) -> tuple[onnx.ModelProto, list[ParityResult], Mixed]:
    """The verified float32 graph in the options' precision, made by its converter, with its
    own parity sweep against the float32 PyTorch original: relative L2 and, for a model with a
    head, the mask gates. With `keep_accuracy`, a variant that fails tries the other calibration
    methods, then keeps its most sensitive layers float (resfuse.export.sensitivity)."""
    variant, config = options.variant, model.config
    tol, gates = options.tolerance_for(config), options.gates(config)
    conversion = variant.convert()(Source(model, proto, contract, options, progress, warn))
    mixed = Mixed(always_float=conversion.always_float)

    def sweep(graph: onnx.ModelProto) -> list[ParityResult]:
        onnx_export.check_model(graph)
        onnx_export.check_dynamic_axes(graph, contract)
        progress(f"parity sweep on the {options.precision} graph")
        seed, sample = options.seed, conversion.sample
        return run_parity(model, onnxruntime_cpu(graph), shapes, tol, seed, sample, gates)

    def ranking() -> list[Sensitivity]:
        if not mixed.ranking:
            reference = [onnxruntime_cpu(proto)(x) for x in conversion.inputs]
            heads = config.num_classes is not None
            make = conversion.make
            mixed.ranking = rank(
                lambda keep: make(keep, mixed.method),
                conversion.units,
                conversion.inputs,
                reference,
                onnxruntime_cpu,
                config.image_channels,
                heads,
                progress,
            )
        return mixed.ranking

    graph = conversion.make((), None)
    results = sweep(graph)
    reason = failure(results, gates)
    if reason is not None and options.keep_accuracy:
        graph, results, reason = _rescue(
            conversion, (graph, results), sweep, gates, ranking, mixed, options
        )
    if options.explain:
        ranking()
    if reason is not None:
        fix = f"; {variant.hint}" if variant.hint and not options.keep_accuracy else ""
        raise GateError(
            f"the {options.precision} graph fails its gate ({tol.describe()}"
            f"{'; ' + gates.describe() if gates else ''}): {reason}{fix}; nothing was written",
            results,
            mixed.ranking,
        )
    return graph, results, mixed


def _rescue(
    conversion: Conversion,
    first: tuple[onnx.ModelProto, list[ParityResult]],
    sweep: Callable[[onnx.ModelProto], list[ParityResult]],
    gates: MaskGates | None,
    ranking: Callable[[], list[Sensitivity]],
    mixed: Mixed,
    options: ExportOptions,
) -> tuple[onnx.ModelProto, list[ParityResult], str | None]:
    """Another calibration method first (the cheapest fix: no layer given up), else the fewest
    most sensitive layers float, ranked under the method that came closest."""
    closest: tuple[float, str | None] = (_worst_error(first[1]), None)
    for method in conversion.methods:
        results = sweep(graph := conversion.make((), method))
        if failure(results, gates) is None:
            mixed.method = method
            return graph, results, None
        closest = min(closest, (_worst_error(results), method), key=lambda pair: pair[0])
    mixed.method = closest[1]
    found: list[list[ParityResult]] = []

    def passes(graph: onnx.ModelProto) -> bool:
        found.append(sweep(graph))
        return failure(found[-1], gates) is None

    try:
        graph, mixed.kept = rescue(
            lambda keep: conversion.make(keep, mixed.method),
            ranking(),
            passes,
            options.keep_accuracy_seconds,
            options.keep_accuracy_limit,
        )
    except ExportError as exc:  # the last try's table goes with the reason
        return first[0], found[-1] if found else first[1], str(exc)
    return graph, found[-1], None


def _worst_error(results: list[ParityResult]) -> float:
    return max(r.stats.rel_l2 for r in results)


def _require_parity(results: list[ParityResult], tol: Tolerance, hint: str) -> None:
    failed = [r for r in results if not r.stats.passed]
    if failed:
        bad = failed[0].stats
        raise ParityError(
            f"ONNX Runtime differs from PyTorch at {len(failed)} of {len(results)} shapes; at "
            f"{failed[0].shape} max |error| {bad.max_abs:.3g}, rel L2 {bad.rel_l2:.3g}, NaN/Inf "
            f"{bad.nonfinite} ({tol.describe()}){hint}; nothing was written"
        )


def _manifest(
    *,
    config: ModelConfig,
    contract: InputContract,
    options: ExportOptions,
    result: ExportResult,
    pretrained: bool,
    weights: str | Path | None,
    source: dict[str, str] | None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": result.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": config.to_dict(),
        "input": {"name": onnx_export.INPUT_NAME, "layout": "NCHW", "contract": contract.to_dict()},
        "output": {
            "name": config.output_name,
            "channels": config.out_channels,
            "layout": "NCHW",
            "size": "same as input",
        },
        "files": {
            "onnx": {
                **result.files["onnx"],
                "opset": options.opset,
                "simplified": result.simplified,
                "simplify": result.simplify_note,
            },
            "weights": result.files["weights"],
        },
        "weights_source": str(weights)
        if weights
        else ("torchvision" if pretrained else f"random (seed {options.seed})"),
        "preprocess": options.preprocess(config),
        **({"class_names": list(options.class_names)} if options.class_names else {}),
        "precision": options.precision,
        "targets": options.targets,
        **({"source": source} if source else {}),
        **(
            {"quantization": _quantization(options, result.mixed.method)}
            if options.calibration
            else {}
        ),
        **({"mixed": result.mixed.to_dict()} if _is_mixed(result.mixed) else {}),
        "parity": {
            "reference": "torch (cpu, float32)",
            "candidate": "onnxruntime CPUExecutionProvider",
            "inputs": _parity_inputs(options.calibration),
            **options.tolerance_for(config).to_dict(),
            **_gates_record(options.gates(config)),
            "results": [r.to_dict() for r in result.parity],
        },
        "export_seconds": round(result.seconds, 2),
        "versions": library_versions(),
    }


def _quantization(options: ExportOptions, method: str | None) -> dict[str, Any]:
    assert options.calibration is not None
    record = quantization_record(options.calibration, options.variant.symmetric)
    if method is not None:  # another method than asked for won (--keep-accuracy)
        record["calibration"]["method"] = CALIBRATION_METHODS[method]
    return record


def _is_mixed(mixed: Mixed) -> bool:
    return bool(mixed.kept or mixed.always_float or mixed.method)


def _gates_record(gates: MaskGates | None) -> dict[str, Any]:
    return {} if gates is None else {"gates": gates.to_dict()}


def _parity_inputs(calibration: Calibration | None) -> dict[str, Any]:
    """What the final parity sweep ran on, so that resfuse-check can judge the same way: an
    INT8 graph calibrated on images is swept on those images (random inputs lie outside what
    it was calibrated for), everything else on random normal inputs."""
    if calibration is None or calibration.images is None:
        return {"kind": "random normal"}
    return {"kind": "images", "folder": str(Path(calibration.images).resolve())}
