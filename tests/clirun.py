"""Console scripts run in the test process."""

from __future__ import annotations

import subprocess
import traceback

import click
from click.testing import CliRunner


def invoke(command: click.Command, *args: str) -> subprocess.CompletedProcess[str]:
    """A command run in this process by click's CliRunner, as a CompletedProcess: for tests of
    what a command says and writes, where a subprocess would only add seconds of starting
    Python and torch (each console script keeps one subprocess test of its own). A crash shows
    as a traceback on stderr, as it would in a terminal."""
    result = CliRunner().invoke(command, list(args))
    stderr = result.stderr
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)
