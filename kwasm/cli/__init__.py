"""The kwasm command line: one Typer app per command group, merged in :mod:`kwasm.cli.main`."""
