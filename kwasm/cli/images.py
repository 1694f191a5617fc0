"""kwasm CLI command group: images."""

from __future__ import annotations

import typer

app = typer.Typer()
