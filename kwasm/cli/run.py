"""kwasm CLI command group: run."""

from __future__ import annotations

import typer

app = typer.Typer()
