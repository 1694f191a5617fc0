"""Build the engine's test guests from the sources in this directory (clang-14 for C, wat2wasm for WAT)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import wasmtime

GUESTS = Path(__file__).resolve().parent


def compile_c(name: str, out_dir: Path) -> Path:
    """Compile ``tests/guests/<name>.c`` to ``out_dir/<name>.wasm`` with clang-14 for wasm32-wasi."""
    out = out_dir / f"{name}.wasm"
    subprocess.run(
        ["clang-14", "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-o", str(out), str(GUESTS / f"{name}.c")],
        check=True,
        capture_output=True,
    )
    return out


def assemble_wat(name: str, out_dir: Path) -> Path:
    """Assemble ``tests/guests/<name>.wat`` to ``out_dir/<name>.wasm``."""
    out = out_dir / f"{name}.wasm"
    out.write_bytes(wasmtime.wat2wasm((GUESTS / f"{name}.wat").read_text()))
    return out
