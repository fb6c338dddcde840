"""Option groups shared by resfuse-check, -bench, -predict and -serve, declared once (as
Polygraphy's option groups are): each command stacks the groups it takes, so an option reads,
checks and documents alike everywhere."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from resfuse.errors import ConfigError, ResfuseError
from resfuse.precisions import TARGETS
from resfuse.runtime.backend_spec import parse_spec, with_threads
from resfuse.runtime.backends import threaded
from resfuse.runtime.session import prepare
from resfuse.runtime.tiling import BLENDS, parse_tile
from resfuse.shapes import parse_shapes

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def group(*options: Decorator) -> Decorator:
    """Several options as one decorator, in the order given (as --help lists them)."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def mask_gate_options(where: str, defaults: tuple[float, float] | None = None) -> Decorator:
    """--min-agreement and --min-dice of resfuse-export and resfuse-check: a head's mask gates
    (resfuse.compare.MaskGates), judged `where` (over the sweep, per input)."""
    shown = ("", "") if defaults is None else tuple(f" [default: {d:g}]" for d in defaults)
    return group(
        click.option(
            "--min-agreement",
            type=click.FloatRange(0, 1),
            default=None,
            help=f"Models with a head: least share of pixels keeping the original's argmax "
            f"class {where}{shown[0]}.",
        ),
        click.option(
            "--min-dice",
            type=click.FloatRange(0, 1),
            default=None,
            help=f"Models with a head: least Dice of every class against the original's mask "
            f"{where}{shown[1]}.",
        ),
    )


CONTEXT = {"help_option_names": ["-h", "--help"]}
DEVICES = click.Choice(TARGETS)  # the devices an artifact can be made for


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf: nan passes every range comparison, and an
    infinite tolerance or allowed regression would be a gate that can never close."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


# Numeric options: click names the option, the value and the range in one line, exit code 2.
NON_NEGATIVE = FiniteRange(min=0)


class BackendSpec(click.ParamType):
    """A backend spec, NAME or NAME:KEY=VALUE[,KEY=VALUE], whose NAME is one of `names()`; a bad
    one is a usage error (exit 2) before any work. Option keys are checked by the backend.
    `names` is asked on each use: the registry (BACKENDS) decides, not a list made at import."""

    name = "backend"

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self.names = names

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            backend, _ = parse_spec(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)
        names = self.names()
        if backend not in names:
            self.fail(f"{backend!r} is not one of {', '.join(names)}", param, ctx)
        return value


def backend_option(names: Callable[[], list[str]]) -> Decorator:
    """--backend of resfuse-check, -predict and -serve: one engine, with options."""
    return click.option(
        "--backend",
        default="onnxruntime",
        show_default=True,
        type=BackendSpec(names),
        help=f"One of {', '.join(names())}, with options as NAME:KEY=VALUE[,KEY=VALUE] "
        f"(openvino:precision=bf16); README's backend options table lists them.",
    )


# --threads of every command, declared once (as Polygraphy's option groups are).
threads_option = click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help=f"CPU threads of {', '.join(threaded())}; refused for a lone backend of another kind "
    f"(tensorrt) [default: the physical cores this process may use, within its affinity and "
    f"cgroup CPU quota].",
)


def _tile(ctx: click.Context, param: click.Parameter, value: str | None) -> object:
    try:
        return None if value is None else parse_tile(value)
    except ResfuseError as exc:
        raise click.BadParameter(str(exc).removeprefix("--tile "), ctx, param) from exc


# --tile, --overlap and --blend of resfuse-check, -predict and -serve; `tiling_options` turns
# them into Session.run's keywords.
tile_options = group(
    click.option(
        "--tile",
        default=None,
        metavar="auto|N|HxW",
        callback=_tile,
        help="Run inputs outside the H x W range one backend call takes (the artifact's, "
        "or the engine profiles') as overlapping tiles of this size, stitched back to "
        "full size on the CPU; auto: the backend's size (TensorRT: the profile's opt).",
    ),
    click.option(
        "--overlap",
        default=0.25,
        show_default=True,
        type=click.FloatRange(0, 1, max_open=True),
        help="With --tile: the fraction of a tile its neighbour covers too.",
    ),
    click.option(
        "--blend",
        default="gaussian",
        show_default=True,
        type=click.Choice(BLENDS),
        help="With --tile: how overlapping tiles are weighted (gaussian: centres count more).",
    ),
)


def tiling_options(tile: object, overlap: float, blend: str) -> dict[str, Any]:
    """Session.run's tiling keywords from --tile/--overlap/--blend; none without --tile, where
    an --overlap or --blend given on the command line is a usage error (it would do nothing)."""
    if tile is None:
        ctx = click.get_current_context(silent=True)
        given = [
            f"--{name}"
            for name in ("overlap", "blend")
            if ctx is not None
            and ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
        ]
        if given:
            raise click.UsageError(
                f"{' and '.join(given)} only shape tiles, and no --tile was given; add --tile "
                f"auto (or a size), or drop {' and '.join(given)}"
            )
        return {}
    return {"tile": tile, "overlap": overlap, "blend": blend}


def resolve_backend(artifact: Path, spec: str, device: str, threads: int | None) -> str:
    """--backend and --threads as one spec, refused here, in one line, when the backend would
    refuse it: predict's Ray actors and serve's replicas open their sessions later, elsewhere."""
    spec = with_threads(spec, threads)
    prepare(artifact, spec, device)  # built, not activated: no engine is loaded twice
    return spec


def device_option(help: str | None = None) -> Decorator:
    """--device: cpu, cuda or tensorrt (ONNX Runtime's execution providers, TensorRT's GPU)."""
    return click.option("--device", default="cpu", show_default=True, type=DEVICES, help=help)


def _shapes(ctx: click.Context, param: click.Parameter, value: str | None) -> object:
    try:
        return None if value is None else parse_shapes(value)
    except ResfuseError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


def shapes_option(default: str | None, help: str | None = None) -> Decorator:
    """--shapes B x C x H x W[,...], parsed into shapes; a malformed one is a usage error."""
    return click.option(
        "--shapes", default=default, show_default=default is not None, callback=_shapes, help=help
    )


def json_option(help: str = "Also write the results as JSON.") -> Decorator:
    """--json PATH, refused before the run when it cannot be written (check_writable)."""
    return click.option("--json", "json_path", type=click.Path(path_type=Path), help=help)


def images_option(help: str) -> Decorator:
    """--images DIR: a folder of image files, searched recursively."""
    return click.option("--images", type=click.Path(path_type=Path), default=None, help=help)


def check_writable(path: Path | None, option: str) -> None:
    """Refuse an output path that cannot be written before the run, not after it: opened for
    append (nothing written), and removed again if this made it."""
    if path is None:
        return
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{option} {path} cannot be written ({exc.strerror or exc}); choose a writable path"
        ) from exc
    if not existed:
        path.unlink()


# --format and --seg-type of resfuse-predict (files, series and DICOMweb alike)
seg_options = group(
    click.option(
        "--format",
        "output_format",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "seg"]),
        help="seg: a DICOM Segmentation (SEG) per DICOM file or series, referencing its "
        "instances (a model with a head); auto: .npy, .mask.png or NIfTI by input.",
    ),
    click.option(
        "--seg-type",
        default="binary",
        show_default=True,
        type=click.Choice(["binary", "fractional"]),
        help="With --format seg: BINARY (the argmax class mask) or FRACTIONAL (each class's "
        "probability).",
    ),
)

# resfuse-predict against a PACS; credentials only from the environment, never options
dicomweb_options = group(
    click.option(
        "--dicomweb",
        "dicomweb_url",
        default=None,
        metavar="URL",
        help="Read series from this DICOMweb root (QIDO-RS, WADO-RS) and store each SEG back "
        "(STOW-RS) instead of INPUT_DIR; credentials from RESFUSE_DICOMWEB_TOKEN, or "
        "RESFUSE_DICOMWEB_USER and RESFUSE_DICOMWEB_PASSWORD.",
    ),
    click.option("--study", default=None, metavar="UID", help="With --dicomweb: the study."),
    click.option(
        "--series-uid",
        "series_uids",
        multiple=True,
        metavar="UID",
        help="With --dicomweb: only this series of the study (repeatable) [default: every "
        "image series].",
    ),
    click.option(
        "--timeout",
        default=30.0,
        show_default=True,
        type=click.FloatRange(min=0, min_open=True, max=3600),
        help="With --dicomweb: seconds each request may take.",
    ),
    click.option(
        "--retries",
        default=3,
        show_default=True,
        type=click.IntRange(0, 20),
        help="With --dicomweb: more tries for a refused connection or a busy server.",
    ),
)
