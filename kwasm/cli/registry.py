"""kwasm CLI command group: registry."""

from __future__ import annotations

import typer

app = typer.Typer()
