"""`resfuse-optimize`: the command line over resfuse.export.optimize (no logic of its own)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from resfuse.console import err, fail, out
from resfuse.errors import ResfuseError
from resfuse.export.optimize import TARGETS, Constraints, optimize
from resfuse.export.report import serving_ms
from resfuse.runtime.options import shapes_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path(path_type=Path))
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
    help=f"Comma-separated deployment targets: {', '.join(TARGETS)}.",
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
def main(
    artifact: Path,
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
    """Make every variant ARTIFACT (a float32 manifest) can be deployed as, judge each on your
    images, time them in one run, and choose per target the fastest that passes; writes
    OUTPUT/report.html, OUTPUT/report.json and OUTPUT/deploy/<target>/."""
    try:
        sides = [int(s) for s in sweep.split(",") if s]
    except ValueError:
        fail(f"--sweep takes square sides such as 128,256,512, not {sweep!r}")
    try:
        report = optimize(
            artifact,
            output,
            images=images,
            masks=masks,
            targets=[t for t in targets.split(",") if t],
            shapes=shapes or [],
            sweep=sides,
            constraints=Constraints(min_agreement, max_dice_drop, latency_budget),
            rounds=rounds,
            iters=iters,
            threads=threads,
            progress=lambda step: err.print(f"[dim]{escape(step)}[/]", highlight=False),
        )
    except ResfuseError as exc:
        fail(str(exc))
    if report["reused"]:
        out.print(f"reused {len(report['reused'])} earlier measurements", highlight=False)
    for target, chosen in report["chosen"].items():
        if chosen is None:
            out.print(f"{target}: no candidate passed (see the report)", highlight=False)
            continue
        ms = serving_ms(chosen, report["shapes"])
        out.print(
            f"{target}: {chosen['candidate']}, {ms:.1f} ms (p50) -> {output / 'deploy' / target}",
            highlight=False,
            soft_wrap=True,
        )
    out.print(f"report: {output / 'report.html'}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
