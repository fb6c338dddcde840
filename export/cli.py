"""`resfuse-export`: the command line over resfuse.export.pipeline (no logic of its own)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from resfuse.compare import pooled
from resfuse.console import err, fail, out
from resfuse.errors import ConfigError, ResfuseError
from resfuse.export.model_options import model_options
from resfuse.export.parity import ParityResult
from resfuse.export.pipeline import ExportOptions, ExportResult, GateError, export_artifact
from resfuse.export.quantize import CALIBRATION_METHODS, Calibration
from resfuse.export.sensitivity import Sensitivity
from resfuse.export.triton import KINDS, TritonOptions, require_schema, write_triton_repo
from resfuse.images import UNITS
from resfuse.models import METHODS, ModelConfig
from resfuse.precisions import HEAD_GATES, PRECISIONS, from_option, options, variant_targets
from resfuse.precisions import precision as precision_entry
from resfuse.runtime.options import mask_gate_options
from resfuse.shapes import format_shape


def _head_bounds() -> str:
    bounds = {p.option: p.head_max_rel_l2 for p in PRECISIONS if p.head_max_rel_l2 is not None}
    return ", ".join(f"{bound:g} for {option}" for option, bound in bounds.items())


def _bounds() -> str:
    """Each variant's default parity bound, as --max-rel-l2's help gives them."""
    bounds = {p.option: p.max_rel_l2 for p in PRECISIONS if p.max_rel_l2 is not None}
    return ", ".join(f"{bound:g} for {option}" for option, bound in bounds.items())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--method",
    required=True,
    type=click.Choice([*METHODS, "all"]),
    help="Fusion method to export, or all three.",
)
@model_options
@click.option(
    "--pretrained", is_flag=True, help="Start from torchvision's ImageNet backbone (needs network)."
)
@click.option("--opset", default=18, show_default=True, type=int)
@click.option(
    "--output", "-o", default="artifacts", show_default=True, type=click.Path(path_type=Path)
)
@click.option(
    "--name",
    default=None,
    help="Base name of the files [default: METHOD-BACKBONE]; variants add -fp16, -int8 or "
    "-int8-trt to it.",
)
@click.option(
    "--min-size",
    default=None,
    type=int,
    help="Smallest H and W [default: 32; for int8, two feature cells: 64 at stride 32].",
)
@click.option("--max-size", default=2048, show_default=True, type=int, help="Largest H and W.")
@click.option("--max-batch", default=32, show_default=True, type=int)
@click.option(
    "--atol", default=1e-4, show_default=True, type=float, help="Parity tolerance, absolute."
)
@click.option(
    "--rtol", default=1e-4, show_default=True, type=float, help="Parity tolerance, relative."
)
@click.option("--no-simplify", is_flag=True, help="Skip onnxslim.")
@click.option(
    "--precision",
    type=click.Choice(options()),
    default=None,
    help="The artifact's precision, made from the verified float32 graph: fp16 (sensitive parts "
    "stay float32) or int8 (convolutions, static QDQ; needs --calib-images or --calib-random) "
    "[default: fp32].",
)
@click.option(
    "--target",
    type=click.Choice(variant_targets()),
    default=None,
    help="INT8 activations for: cpu (uint8, fastest on x86) or tensorrt (symmetric int8, zero "
    "point 0) [default: cpu].",
)
@click.option("--int8", is_flag=True, help="Alias of --precision int8.")
@click.option(
    "--calib-images",
    type=click.Path(path_type=Path),
    default=None,
    help="INT8 calibration: a folder of representative images.",
)
@click.option(
    "--calib-random",
    is_flag=True,
    help="INT8 calibration on random inputs: for latency work only, accuracy on real images "
    "will suffer.",
)
@click.option("--calib-count", default=32, show_default=True, type=int, help="Calibration inputs.")
@click.option(
    "--calib-size",
    default=512,
    show_default=True,
    type=int,
    help="Calibration inputs are resized to this H and W.",
)
@click.option(
    "--calib-method",
    type=click.Choice(list(CALIBRATION_METHODS)),
    default="minmax",
    show_default=True,
    help="INT8 calibration: each tensor's whole range (minmax), its 99.999th percentile, or "
    "the range that keeps most information (entropy); --keep-accuracy tries the others too.",
)
@click.option(
    "--max-rel-l2",
    default=None,
    type=float,
    help=f"fp16/int8 parity bound: relative L2 error against PyTorch [default: {_bounds()}; "
    f"a head's logits: {_head_bounds()}, its mask gated].",
)
@mask_gate_options("over the sweep (fp16/int8)", (HEAD_GATES.min_agreement, HEAD_GATES.min_dice))
@click.option(
    "--keep-accuracy",
    is_flag=True,
    help="fp16/int8 that misses its gate: try the other calibration methods, then keep its "
    "most sensitive layers float, fewest first, until it passes (a -mixed artifact).",
)
@click.option(
    "--keep-accuracy-seconds",
    default=900.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="With --keep-accuracy: stop searching after this long.",
)
@click.option(
    "--keep-accuracy-limit",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --keep-accuracy: keep at most this many layers float.",
)
@click.option(
    "--explain",
    is_flag=True,
    help="fp16/int8: rank every layer by the error it adds alone at the output (ONNX node and "
    "PyTorch module), pass or fail.",
)
@click.option(
    "--intensity-range",
    default=None,
    help="How image files' values map to [0, 1] at run time: dtype (the file type's full "
    "range, the default), image (each image's min..max) or LOW,HIGH (e.g. 0,4095 for 12-bit "
    "radiographs stored unsigned; CT: a range in Hounsfield units such as -1024,3071).",
)
@click.option(
    "--window",
    default=None,
    help="CENTER,WIDTH: an intensity window instead of a range (e.g. 40,400 for soft tissue "
    "in Hounsfield units).",
)
@click.option(
    "--intensity-units",
    type=click.Choice(UNITS),
    default=None,
    help="What --window or --intensity-range LOW,HIGH is written in, for DICOM: rescaled "
    "(after RescaleSlope/Intercept, e.g. Hounsfield units; the default) or stored (the "
    "file's integers). Other files have no rescale: both mean their values.",
)
@click.option(
    "--triton-repo",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write a Triton Inference Server model repository here (DIR/NAME/config.pbtxt, "
    "DIR/NAME/1/model.onnx).",
)
@click.option(
    "--triton-kind",
    default="cpu",
    show_default=True,
    type=click.Choice(KINDS),
    help="Triton instance group: KIND_CPU or KIND_GPU.",
)
@click.option("--triton-instances", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--triton-tensorrt",
    type=click.Choice(["fp32", "fp16"]),
    default=None,
    help="GPU instances: run the ONNX model through ONNX Runtime's TensorRT accelerator inside "
    "Triton, at this precision (opt-in).",
)
@click.option("--seed", default=0, show_default=True, type=int)
def main(
    method: str,
    backbone: str,
    stage: str,
    num_classes: int | None,
    class_names: str | None,
    in_channels: int,
    features: int,
    weights: Path | None,
    pretrained: bool,
    opset: int,
    output: Path,
    name: str | None,
    min_size: int | None,
    max_size: int,
    max_batch: int,
    atol: float,
    rtol: float,
    no_simplify: bool,
    precision: str | None,
    target: str | None,
    int8: bool,
    calib_images: Path | None,
    calib_random: bool,
    calib_count: int,
    calib_size: int,
    calib_method: str,
    max_rel_l2: float | None,
    min_agreement: float | None,
    min_dice: float | None,
    keep_accuracy: bool,
    keep_accuracy_seconds: float,
    keep_accuracy_limit: int,
    explain: bool,
    intensity_range: str | None,
    window: str | None,
    intensity_units: str | None,
    triton_repo: Path | None,
    triton_kind: str,
    triton_instances: int,
    triton_tensorrt: str | None,
    seed: int,
) -> None:
    """Export fusion models to ONNX with dynamic batch, H and W, verified against PyTorch.

    Writes the manifest METHOD-BACKBONE.json and the files it names (the .onnx model and the
    PyTorch weights as .safetensors) into --output, only once every check has passed. Other
    precisions are artifacts of their own: METHOD-BACKBONE-fp16, -int8, -int8-trt (with
    --name X: X-fp16, ...); an artifact of another precision is never replaced.
    """
    methods = list(METHODS) if method == "all" else [method]
    if name is not None and len(methods) > 1:
        fail("--name names one artifact; drop it with --method all")
    results = []
    try:
        triton = TritonOptions(
            kind=triton_kind,
            instances=triton_instances,
            tensorrt=triton_tensorrt is not None,
            tensorrt_fp16=triton_tensorrt == "fp16",
        )
        if triton_repo is not None:  # before any export work
            triton.validate()
            require_schema()
        elif triton != TritonOptions():
            raise ConfigError(
                "--triton-kind, --triton-instances and --triton-tensorrt need --triton-repo DIR"
            )
        precision = _precision(precision, int8)
        calibration = _calibration(
            precision, calib_images, calib_random, calib_count, calib_size, calib_method
        )
        if not precision_entry(from_option(precision)).converter and (keep_accuracy or explain):
            raise ConfigError(
                "--keep-accuracy and --explain work on an fp16 or int8 variant; a float32 export "
                "is the original graph: add --precision fp16 or --int8, or drop them"
            )
        options = ExportOptions(
            opset=opset,
            min_size=min_size,
            max_size=max_size,
            max_batch=max_batch,
            atol=atol,
            rtol=rtol,
            seed=seed,
            simplify=not no_simplify,
            calibration=calibration,
            precision=from_option(precision),
            target=target,
            max_rel_l2=max_rel_l2,
            min_agreement=min_agreement,
            min_dice=min_dice,
            keep_accuracy=keep_accuracy,
            keep_accuracy_seconds=keep_accuracy_seconds,
            keep_accuracy_limit=keep_accuracy_limit,
            explain=explain,
            intensity_range=_intensity_range(intensity_range),
            window=None if window is None else _pair(window, "--window", "CENTER,WIDTH"),
            intensity_units=intensity_units,
            class_names=None if class_names is None else tuple(class_names.split(",")),
        )
        if triton_repo is not None:  # a device the artifact is not made for: before the export
            triton.check_targets(options.targets, f"the {options.precision} artifact")
        for m in methods:
            config = ModelConfig(m, backbone, int(stage), in_channels, num_classes, features)
            try:
                with err.status(f"[bold]{m}[/]: starting") as status:
                    result = export_artifact(
                        config,
                        output,
                        options,
                        weights,
                        pretrained,
                        name,
                        progress=lambda step, m=m: status.update(f"[bold]{m}[/]: {step}"),
                        warn=_warn,
                    )
            except GateError as exc:  # the whole table, as a passing export shows it
                _show_sweep(f"{m} ({options.precision})", exc.results, options, config)
                _show_ranking(exc.ranking)
                raise
            _show_sweep(f"{result.name} ({options.precision})", result.parity, options, config)
            _show_ranking(result.mixed.ranking)
            _show_kept(result)
            if options.simplify and not result.simplified:
                err.print(f"note: onnxslim {result.simplify_note}", highlight=False, markup=False)
            if triton_repo is not None:
                model = write_triton_repo(result.manifest_path, triton_repo, triton)
                out.print(f"Triton model: {model}", highlight=False, soft_wrap=True)
            results.append(result)
    except ResfuseError as exc:
        fail(str(exc))
    out.print(_summary_table(results))
    for r in results:  # what resfuse-check, resfuse-build and the runtime take
        out.print(f"manifest: {r.manifest_path}", highlight=False, soft_wrap=True)


def _warn(note: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)


def _pair(text: str, option: str, form: str) -> tuple[float, float]:
    try:
        first, second = (float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} takes {form}, two numbers, not {text!r}") from None
    return first, second


def _intensity_range(text: str | None) -> str | tuple[float, float] | None:
    if text is None or text in ("dtype", "image"):
        return text
    return _pair(text, "--intensity-range", "dtype, image or LOW,HIGH")


def _precision(precision: str | None, int8: bool) -> str:
    if int8 and precision not in (None, "int8"):
        raise ConfigError(
            f"--int8 means --precision int8 and contradicts --precision {precision}; keep one"
        )
    return "int8" if int8 else precision or "fp32"


def _calibration(
    precision: str, images: Path | None, random: bool, count: int, size: int, method: str
) -> Calibration | None:
    if not precision_entry(from_option(precision)).calibrated:
        if images or random:
            raise ConfigError(
                "--calib-images and --calib-random calibrate INT8; add --int8 (--precision "
                "int8) or drop them"
            )
        return None
    if bool(images) == random:
        raise ConfigError(
            "--int8 needs calibration data: --calib-images DIR (representative images) or "
            "--calib-random (latency work only), one of them"
        )
    return Calibration(images, count, size, method)


def _show_sweep(
    title: str, results: list[ParityResult], options: ExportOptions, config: ModelConfig
) -> None:
    gates = options.gates(config)
    judged = options.tolerance_for(config).describe() + (f"; {gates.describe()}" if gates else "")
    out.print(
        f"\n{title}: ONNX Runtime (CPU) vs PyTorch (float32), {judged}",
        highlight=False,
        soft_wrap=True,
    )
    if results:
        out.print(_parity_table(results))
    masks = [r.mask for r in results if r.mask is not None]
    if gates is not None and masks:
        sweep = pooled(masks, gates)
        verdict = "[green]pass[/]" if sweep.passed else "[red]FAIL[/]"
        out.print(f"mask over the sweep: {sweep.describe()}: {verdict}", highlight=False)


def _parity_table(results: list[ParityResult]) -> Table:
    table = Table()
    masks = any(r.mask is not None for r in results)
    columns = ["shape", "max |err|", "p99 |err|", "max rel", "rel L2", "1 - cosine"]
    for col in [*columns, *(["agreement", "min Dice"] if masks else []), "result"]:
        table.add_column(col, justify="right")
    for r in results:
        s = r.stats
        mask = []
        if r.mask is not None:
            low = min(r.mask.gated_dice.values(), default=1.0)
            mask = [f"{r.mask.agreement:.2%}", f"{low:.4f}"]
        table.add_row(
            format_shape(r.shape),
            f"{s.max_abs:.2e}",
            f"{s.p99_abs:.2e}",
            f"{s.max_rel:.2e}",
            f"{s.rel_l2:.2e}",
            f"{1 - s.cosine:.1e}",
            *mask,
            "[green]pass[/]" if s.passed else "[red]FAIL[/]",
        )
    return table


def _show_ranking(ranking: list[Sensitivity]) -> None:
    """--explain: every layer by the error it adds alone, most sensitive first."""
    if not ranking:
        return
    table = Table(title="sensitivity: output error with this layer alone reduced")
    heads = ranking[0].agreement is not None
    for col in ["rank", "ONNX node", "PyTorch module", "rel L2", *(["agreement"] if heads else [])]:
        table.add_column(col, justify="right" if col in ("rank", "rel L2", "agreement") else "left")
    for i, s in enumerate(ranking, 1):
        agreement = [f"{s.agreement:.2%}"] if s.agreement is not None else []
        table.add_row(str(i), s.unit.node, s.unit.module or "-", f"{s.rel_l2:.2e}", *agreement)
    out.print(table)


def _show_kept(result: ExportResult) -> None:
    mixed = result.mixed
    if mixed.method is not None:
        out.print(f"calibration: {mixed.method} passed where the default did not", highlight=False)
    for s in mixed.kept:
        out.print(
            f"kept float: {s.unit.node} ({s.unit.module or 'no module'}), rel L2 alone "
            f"{s.rel_l2:.2e}",
            highlight=False,
            soft_wrap=True,
        )
    for record in mixed.always_float:
        out.print(
            f"kept float32: {record['node']} ({record['module'] or 'no module'}): {record['why']}",
            highlight=False,
            soft_wrap=True,
        )


def _summary_table(results: list[ExportResult]) -> Table:
    table = Table(title="exported")
    for col in ("file", "size", "export time", "worst max |err|", "worst rel L2", "simplified"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r.onnx_path),
            f"{r.onnx_bytes / 2**20:.1f} MiB",
            f"{r.seconds:.1f} s",
            f"{r.worst.stats.max_abs:.2e}",
            f"{max(p.stats.rel_l2 for p in r.parity):.2e}",
            "yes" if r.simplified else "no",
        )
    return table


if __name__ == "__main__":
    main()
