"""kwasm CLI command group: sandboxer."""

from __future__ import annotations

import typer

app = typer.Typer()
