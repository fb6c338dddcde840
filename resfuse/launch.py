"""The console scripts that need PyTorch (resfuse-export, resfuse-optimize): their click
commands where torch is installed; in the base install, which has none, a stand-in that says in
one line which extra to install, whatever the arguments, instead of a traceback from importing
torch."""

from __future__ import annotations

from collections.abc import Callable

import click

from resfuse.console import fail
from resfuse.torch_extra import TorchMissingError, has_torch, require_torch


def _torch_command(name: str, command: Callable[[], click.Command]) -> click.Command:
    if has_torch():
        return command()

    def refuse(args: tuple[str, ...]) -> None:
        try:
            require_torch(name)
        except TorchMissingError as exc:
            fail(str(exc))

    return click.Command(
        name,
        callback=refuse,
        params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,  # --help too gets the one line: nothing here would work
    )


def _export() -> click.Command:
    from resfuse.export.cli import main

    return main


def _optimize() -> click.Command:
    from resfuse.export.optimize_cli import main

    return main


export = _torch_command("resfuse-export", _export)
optimize = _torch_command("resfuse-optimize", _optimize)
