"""`resfuse-build`: the command line over resfuse.export.engines (no logic of its own)."""

from __future__ import annotations

from pathlib import Path

import click

from resfuse.artifacts import Manifest, ensure_writable, read_manifest
from resfuse.console import err, fail, out
from resfuse.engine_manifest import HARDWARE_COMPAT, MAX_BUILDER_LEVEL, BuildSettings
from resfuse.errors import ConfigError, ResfuseError
from resfuse.export.engines import export_engine, find_or_build
from resfuse.export.triton import TritonOptions, require_schema, write_triton_repo
from resfuse.profiles import Profile, default_profiles, parse_profile
from resfuse.shapes import parse_shape
from resfuse.tensorrt_env import FLAVOURS, parse_targets


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--min", "min_shape", default=None, help="NxCxHxW [default: the artifact's minimum].")
@click.option(
    "--opt", "opt_shape", default=None, help="NxCxHxW kernels are tuned for [default: 1xCx512x512]."
)
@click.option("--max", "max_shape", default=None, help="NxCxHxW [default: the artifact's maximum].")
@click.option(
    "--profile",
    "profile_texts",
    multiple=True,
    help="MIN:OPT:MAX, one optimization profile (a shape bucket); repeatable. Instead of "
    "--min/--opt/--max.",
)
@click.option(
    "--engine",
    "flavour",
    type=click.Choice(list(FLAVOURS)),
    default=None,
    help="Which TensorRT builds: tensorrt (10/11, on the GPU that runs it) or tensorrt-rtx "
    "(TensorRT for RTX, on any machine) [default: the one installed; both: tensorrt].",
)
@click.option(
    "--compute-capability",
    "targets",
    default=None,
    metavar="CC[,CC...]",
    help="tensorrt-rtx: the GPUs the engine runs on, e.g. 8.6,8.9,12.0 [default: this GPU, "
    "else 8.6,8.9,12.0].",
)
@click.option(
    "--builder-level",
    default=3,
    show_default=True,
    type=click.IntRange(0, MAX_BUILDER_LEVEL),
    help="Builder optimisation level: higher builds longer, may run faster.",
)
@click.option(
    "--workspace",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Workspace memory limit in GiB [default: TensorRT's, the GPU's memory].",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path),
    default=None,
    help="Timing cache file, reused and updated [default: one per GPU and version in the cache].",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Engine cache [default: $XDG_CACHE_HOME/resfuse/engines or ~/.cache/resfuse/engines].",
)
@click.option(
    "--hardware-compat",
    default="none",
    show_default=True,
    type=click.Choice(HARDWARE_COMPAT),
    help="ampere+: one engine for every GPU of compute capability 8.0 and later (slower).",
)
@click.option(
    "--trust-host-code",
    is_flag=True,
    help="Build a version-compatible engine, which runs on later TensorRT versions but carries "
    "host code; whoever loads it must trust it too.",
)
@click.option("--no-rebuild", is_flag=True, help="Never build: use a cached engine or fail.")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Also copy the engine (plan and manifest) into this folder.",
)
@click.option(
    "--triton-repo",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write a Triton model repository serving the engine (DIR/NAME/1/model.plan).",
)
@click.option("--triton-instances", default=1, show_default=True, type=click.IntRange(min=1))
def main(
    artifact: Path,
    min_shape: str | None,
    opt_shape: str | None,
    max_shape: str | None,
    profile_texts: tuple[str, ...],
    flavour: str | None,
    targets: str | None,
    builder_level: int,
    workspace: float | None,
    timing_cache: Path | None,
    cache_dir: Path | None,
    hardware_compat: str,
    trust_host_code: bool,
    no_rebuild: bool,
    output: Path | None,
    triton_repo: Path | None,
    triton_instances: int,
) -> None:
    """Build (or find in the cache) the TensorRT engine of ARTIFACT, an artifact's manifest.

    The engine's precision is the artifact's: the network is strongly typed. Everything is
    checked before TensorRT is imported; the engine lands in the cache as NAME.<key>.json and
    the plan it names.
    """
    built: list[str] = []
    try:
        manifest = read_manifest(artifact)
        profiles = _profiles(manifest, min_shape, opt_shape, max_shape, profile_texts)
        settings = BuildSettings(builder_level, workspace, hardware_compat, trust_host_code)
        if output is not None:
            ensure_writable(output, manifest.path.stem)
        triton = TritonOptions(kind="gpu", instances=triton_instances)
        if triton_repo is not None:
            triton.validate()
            require_schema()
            if trust_host_code:
                raise ConfigError(
                    "--triton-repo takes no --trust-host-code engine: Triton would run its host "
                    "code unasked; build without --trust-host-code"
                )
        with err.status("checking the cache") as status:

            def progress(step: str) -> None:
                built.append(step)
                status.update(f"{step}: minutes, once per GPU, TensorRT version and input")

            engine = find_or_build(
                manifest,
                profiles,
                settings,
                cache_dir,
                timing_cache,
                rebuild=not no_rebuild,
                engine=flavour,
                targets=parse_targets(targets),
                progress=progress,
            )
        record = engine.record
        path = record.path if output is None else export_engine(engine, output)
        if triton_repo is not None:
            model = write_triton_repo(manifest.path, triton_repo, triton, engine=path)
    except ResfuseError as exc:
        fail(str(exc))
    env = record.environment
    how = f"built in {record.build_seconds:.1f} s" if built else "found in the cache"
    out.print(f"{path}", highlight=False, soft_wrap=True)
    out.print(
        f"{how}: {record.precision} engine for {env.flavour} {env.tensorrt_version} (CUDA "
        f"{env.cuda_version}, {env.platform}), {env.gpu_name} (compute capability "
        f"{env.compute_capability}); plan {record.plan_bytes / 2**20:.1f} MiB",
        highlight=False,
        soft_wrap=True,
    )
    for i, profile in enumerate(record.profiles):
        out.print(f"profile {i}: {profile.describe()}", highlight=False)
    if triton_repo is not None:
        out.print(f"Triton model: {model}", highlight=False, soft_wrap=True)


def _profiles(
    manifest: Manifest,
    min_shape: str | None,
    opt_shape: str | None,
    max_shape: str | None,
    profile_texts: tuple[str, ...],
) -> list[Profile] | None:
    """--profile entries, or one profile from --min/--opt/--max with the shapes left out taken
    from the artifact's default profile; None when nothing was given (the default profile)."""
    options = {"min": min_shape, "opt": opt_shape, "max": max_shape}
    given = {k: v for k, v in options.items() if v is not None}
    if profile_texts and given:
        raise ConfigError(
            "give one profile with --min/--opt/--max or several with --profile, not both"
        )
    if profile_texts:
        return [parse_profile(text) for text in profile_texts]
    if not given:
        return None
    shapes = {k: parse_shape(v, f"--{k}") for k, v in given.items()}
    if len(shapes) < 3:
        base = default_profiles(manifest)[0]
        shapes = {"min": base.min, "opt": base.opt, "max": base.max, **shapes}
    return [Profile(shapes["min"], shapes["opt"], shapes["max"])]


if __name__ == "__main__":
    main()
