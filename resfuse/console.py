"""Terminal output shared by the command-line tools: wide tables in logs, one-line errors."""

from __future__ import annotations

import sys
from typing import NoReturn

from rich.console import Console
from rich.markup import escape

# Piped output (CI logs, files) gets wide tables rather than rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` on stderr, without a traceback, and exit non-zero."""
    err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)
