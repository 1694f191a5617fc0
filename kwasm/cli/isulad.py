"""kwasm CLI command group: isulad."""

from __future__ import annotations

import typer

app = typer.Typer()
