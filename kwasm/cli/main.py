"""Entry point of the ``kwasm`` command: merges the command groups and maps errors to exit codes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from kwasm import __version__
from kwasm.cli import bench, images, isulad, registry, run, sandboxer, state
from kwasm.cli.output import err_console
from kwasm.errors import KwasmError

app = typer.Typer(
    name="kwasm",
    help=(
        "Package WebAssembly (WASI) programs as OCI images and run them as container sandboxes.\n\n"
        "Quick start:\n\n"
        "  kwasm build examples/wasi-demo-app\n\n"
        "  kwasm run wasi-demo-app:latest -- echo hello"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"kwasm {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help=(
                "Data root of the local image store (default: $KWASM_ROOT, else /var/lib/kwasm as root, "
                "else the XDG data dir)."
            ),
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    state.set_root(root)


for group in (images, registry, run, sandboxer, isulad):
    app.add_typer(group.app)
app.add_typer(bench.app, name="bench", help="Measure start rate, density and memory (see BENCHMARKS.md).")


def main() -> None:
    """Run the CLI; every :class:`KwasmError` becomes one line on stderr and its exit code."""
    try:
        app()
    except KwasmError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
