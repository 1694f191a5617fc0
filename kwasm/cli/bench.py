"""kwasm CLI command group: bench."""

from __future__ import annotations

import typer

app = typer.Typer()
