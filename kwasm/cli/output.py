"""Shared output helpers for the CLI: rich consoles and ``--json`` rendering."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout (for ``--json``), nothing else."""
    print(json.dumps(data, indent=2, sort_keys=False, default=str))


def info(message: str) -> None:
    """Print a progress or status line on stderr (never wrapped mid-path), so stdout stays clean for data."""
    err_console.print(message, soft_wrap=True)
