"""Every `kwasm` command is a new process: the CLI loads only what the command it runs needs.

Not timed (speed is for benchmarks/push.py and benchmarks/build.py): these check which modules a
command imports, so a heavy import creeping back into the start-up path fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KwasmRunner
from services import free_port

from kwasm import __version__
from kwasm.cli.main import COMMANDS, load_commands

# Modules that cost tens to hundreds of milliseconds to import and that push, pull and --version do not need.
HEAVY = ("pydantic", "requests", "oras", "jsonschema", "grpc", "google.protobuf", "wasmtime", "docker",
         "asyncio", "psutil", "kwasm.sandboxer", "kwasm.runtime", "kwasm.cri", "kwasm.cli.sandboxer",
         "kwasm.cli.images", "kwasm.cli.isulad", "kwasm.cli.run", "kwasm.cli.bench")  # fmt: skip


def _imported(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``kwasm ARGS`` with ``-X importtime``; the result and the names of the modules it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kwasm.cli.main", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip
    names = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return result, names


def _heavy(names: set[str]) -> list[str]:
    return sorted(name for name in names if any(name == h or name.startswith(h + ".") for h in HEAVY))


def test_every_command_is_in_the_lazy_table_of_its_module() -> None:
    for module in sorted(set(COMMANDS.values())):
        assert set(load_commands(module)) == {name for name, owner in COMMANDS.items() if owner == module}, module


def test_version_loads_no_command_group_and_no_rich(kwasm_root: Path) -> None:
    result, names = _imported("--version", env={"KWASM_ROOT": str(kwasm_root)})
    assert result.returncode == 0 and result.stdout == f"kwasm {__version__}\n"
    assert _heavy(names) == []
    assert not any(name == "rich" or name.startswith("rich.") for name in names)


def test_push_and_pull_load_only_the_registry_stack(kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path) -> None:
    kwasm("build", "--wasm", str(Path(__file__).parents[1] / "examples/wasi-demo-app/wasi-demo-app.wasm"),
          "-t", "demo:1", check=True)  # fmt: skip
    unreachable = f"127.0.0.1:{free_port()}"
    for args in (("push", "demo:1", f"{unreachable}/demo:1"), ("pull", f"{unreachable}/demo:1")):
        result, names = _imported(*args, env={"KWASM_ROOT": str(kwasm_root)})
        assert result.returncode == 6 and "cannot reach registry" in result.stderr, result.stderr[-500:]
        assert "kwasm.image.registry_client" in names
        assert _heavy(names) == [], args


@pytest.mark.parametrize("command", ["pusj", "sandboxr"])
def test_a_mistyped_command_still_gets_suggestions_from_every_group(kwasm: KwasmRunner, command: str) -> None:
    result = kwasm(command)
    assert result.returncode == 2
    assert {"pusj": "'push'", "sandboxr": "'sandboxer'"}[command] in result.stderr
