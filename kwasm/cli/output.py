"""Shared output helpers for the CLI: rich consoles and ``--json`` rendering.

``console`` (stdout) and ``err_console`` (stderr) are real ``rich.console.Console`` objects created
on first use (the module's ``__getattr__``), so import them inside the code that prints with them:
a command that prints plain lines or JSON then does not import rich at all (rich.console alone costs
15-25 ms of start-up). Status lines (:func:`info`) are plain prints for the same reason.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    console: Console
    err_console: Console


def __getattr__(name: str) -> Console:
    """Create ``console`` or ``err_console`` at its first import (and keep it as a module global)."""
    if name not in ("console", "err_console"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rich.console import Console

    created = Console(stderr=name == "err_console", highlight=False)
    globals()[name] = created
    return created


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout (for ``--json``), nothing else."""
    print(json.dumps(data, indent=2, sort_keys=False, default=str))


def info(message: str) -> None:
    """Print a status line on stderr as it is (no markup, never wrapped mid-path), so stdout stays clean for data."""
    print(message, file=sys.stderr)


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr (the command goes on)."""
    print(f"warning: {message}", file=sys.stderr)


def error(message: str) -> None:
    """Print ``error: message`` on stderr as every failing command does (red on a terminal, never markup)."""
    from rich.markup import escape

    from kwasm.cli.output import err_console  # created on first use by this module's __getattr__

    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
