"""`resfuse-optimize`: the command line over resfuse.export.optimize (no logic of its own)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from resfuse.console import err, fail, out
from resfuse.errors import ConfigError, ResfuseError
from resfuse.export.model_options import model_options
from resfuse.export.optimize import TARGETS, Constraints, from_checkpoint, optimize, split_targets
from resfuse.export.report import serving_ms
from resfuse.models import METHODS, ModelConfig
from resfuse.runtime.options import shapes_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path(path_type=Path), required=False)
@click.option(
    "--method",
    type=click.Choice(list(METHODS)),
    default=None,
    help="Start from a checkpoint instead of ARTIFACT: export this fusion method (with the "
    "model options below and --weights) as the float32 artifact first.",
)
@model_options
@click.option(
    "--images",
    required=True,
    type=click.Path(path_type=Path),
    help="Your images: INT8 calibrates on them and every candidate is judged on them.",
)
@click.option(
    "--masks",
    type=click.Path(path_type=Path),
    default=None,
    help="Ground-truth label maps named as the images (PNG/TIFF, a class per pixel): Dice "
    "against them too, and --max-dice-drop judges its fall from the original's.",
)
@click.option(
    "--targets",
    default="cpu",
    show_default=True,
    help=f"Comma-separated deployment targets: {', '.join(TARGETS)}; tensorrt-rtx takes the "
    "GPUs' compute capabilities after a colon (tensorrt-rtx:8.9,12.0).",
)
@shapes_option(None, "The sizes that will be served, BxCxHxW,... [default: 1xCx512x512].")
@click.option(
    "--sweep",
    default="128,256,512",
    show_default=True,
    help="Square sides timed for the latency-against-size plot.",
)
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None)
@click.option("--max-dice-drop", type=click.FloatRange(0, 1), default=None)
@click.option("--latency-budget", type=click.FloatRange(min=0), default=None, help="ms, p50.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--iters", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=None, type=click.IntRange(min=1))
@click.option(
    "--output", "-o", default=Path("optimized"), show_default=True, type=click.Path(path_type=Path)
)
@click.pass_context
def main(
    ctx: click.Context,
    artifact: Path | None,
    method: str | None,
    backbone: str,
    stage: str,
    num_classes: int | None,
    class_names: str | None,
    in_channels: int,
    features: int,
    weights: Path | None,
    images: Path,
    masks: Path | None,
    targets: str,
    shapes: list[tuple[int, ...]] | None,
    sweep: str,
    min_agreement: float | None,
    max_dice_drop: float | None,
    latency_budget: float | None,
    rounds: int,
    iters: int,
    threads: int | None,
    output: Path,
) -> None:
    """Make every variant ARTIFACT (a float32 manifest, or the model --method and --weights
    define) can be deployed as, judge each on your images, time them in one run, and choose per
    target the fastest that passes; writes OUTPUT/report.html, OUTPUT/report.json and
    OUTPUT/deploy/<target>/."""
    try:
        sides = [int(s) for s in sweep.split(",") if s]
    except ValueError:
        fail(f"--sweep takes square sides such as 128,256,512, not {sweep!r}")
    given = [f"--{p.replace('_', '-')}" for p in _MODEL if _given(ctx, p)]
    if artifact is not None and (method is not None or given):
        fail(f"{(given or ['--method'])[0]} defines a model to export, and ARTIFACT already is "
             f"one: give one or the other")  # fmt: skip

    def progress(step: str) -> None:
        err.print(f"[dim]{escape(step)}[/]", highlight=False)

    try:
        if artifact is None:
            if method is None:
                raise ConfigError(
                    "give a float32 ARTIFACT, or --method (and --weights) to start from a "
                    "checkpoint"
                )
            config = ModelConfig(method, backbone, int(stage), in_channels, num_classes, features)
            names = None if class_names is None else tuple(class_names.split(","))
            artifact = from_checkpoint(config, output / "artifacts", weights, names, progress)
        report = optimize(
            artifact,
            output,
            images=images,
            masks=masks,
            targets=split_targets(targets),
            shapes=shapes or [],
            sweep=sides,
            constraints=Constraints(min_agreement, max_dice_drop, latency_budget),
            rounds=rounds,
            iters=iters,
            threads=threads,
            progress=progress,
        )
    except ResfuseError as exc:
        fail(str(exc))
    if report["reused"]:
        out.print(f"reused {len(report['reused'])} earlier measurements", highlight=False)
    for target, chosen in report["chosen"].items():
        if chosen is None:
            out.print(f"{target}: no candidate passed (see the report)", highlight=False)
            continue
        speed = (
            f"{serving_ms(chosen, report['shapes']):.1f} ms (p50)"
            if chosen["latency_ms"]
            else "not timed here (no GPU)"
        )
        folder = output / report["deploy"][target]
        out.print(
            f"{target}: {chosen['candidate']}, {speed} -> {folder}",
            highlight=False,
            soft_wrap=True,
        )
    out.print(f"report: {output / 'report.html'}", highlight=False, soft_wrap=True)


_MODEL = ("backbone", "stage", "num_classes", "class_names", "in_channels", "features", "weights")


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


if __name__ == "__main__":
    main()
