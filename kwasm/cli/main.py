"""Entry point of the ``kwasm`` command: merges the command groups and maps errors to exit codes.

Start-up time matters (every command is a new process, and ``push``/``pull`` are measured against
Go tools that start in ~10 ms), so the command groups are loaded lazily: ``kwasm push`` imports
``kwasm.cli.registry`` and nothing of the sandboxer, iSulad, image-build or engine commands.
``kwasm --help`` and a mistyped command load them all (for the listing and the suggestions).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
import typer.core
import typer.main

from kwasm import __version__
from kwasm.cli import state
from kwasm.errors import KwasmError

# Every top-level command → the kwasm.cli module whose ``app`` defines it, in the order `kwasm --help` lists them.
COMMANDS: dict[str, str] = {
    **dict.fromkeys(("build", "images", "inspect", "tag", "rmi", "save", "load"), "images"),
    **dict.fromkeys(("push", "pull", "login"), "registry"),
    "run": "run",
    **dict.fromkeys(("sandboxer", "ps", "stop", "logs"), "sandboxer"),
    **dict.fromkeys(("setup-isulad", "cri-config", "doctor", "k8s"), "isulad"),
    "bench": "bench",
}
# Modules whose ``app`` becomes a named sub-group rather than top-level commands: name → help.
SUB_GROUPS = {"bench": "Measure start rate, density and memory (see BENCHMARKS.md)."}


def load_commands(module_name: str) -> dict[str, click.Command]:
    """Import ``kwasm.cli.<module_name>`` and build the click commands of its Typer app."""
    module = importlib.import_module(f"kwasm.cli.{module_name}")
    wrapper = typer.Typer()
    if module_name in SUB_GROUPS:
        wrapper.add_typer(module.app, name=module_name, help=SUB_GROUPS[module_name])
    else:
        wrapper.add_typer(module.app)
    return dict(typer.main.get_group(wrapper).commands)


class LazyGroup(typer.core.TyperGroup):
    """The root group: a command's module is imported only when that command is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """All command names, without importing their modules."""
        return [*self.commands, *(name for name in COMMANDS if name not in self.commands)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, importing its module on first use."""
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            for name, command in load_commands(COMMANDS[cmd_name]).items():
                self.add_command(command, name)
        return self.commands.get(cmd_name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        """Resolve like click; an unknown name first loads every command, so typo suggestions see them all."""
        if args and args[0] not in COMMANDS:
            for name in COMMANDS:
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="kwasm",
    cls=LazyGroup,
    help=(
        "Package WebAssembly (WASI) programs as OCI images and run them as container sandboxes.\n\n"
        "Quick start:\n\n"
        "  kwasm build examples/wasi-demo-app\n\n"
        "  kwasm run wasi-demo-app:latest -- echo hello"
    ),
    no_args_is_help=True,
    suggest_commands=False,  # click suggests close command names itself
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


def main() -> None:
    """Run the CLI; every :class:`KwasmError` becomes one line on stderr and its exit code."""
    try:
        app()
    except KwasmError as exc:
        from kwasm.cli.output import error

        error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
