"""Fixtures shared by the whole suite: an isolated data root and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "examples" / "wasi-demo-app"
DEMO_WASM = DEMO_DIR / "wasi-demo-app.wasm"

KwasmRunner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def kwasm_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private kwasm data root, also exported as KWASM_ROOT for in-process library calls."""
    root = tmp_path / "kwasm-root"
    monkeypatch.setenv("KWASM_ROOT", str(root))
    return root


@pytest.fixture
def kwasm(kwasm_root: Path) -> KwasmRunner:
    """Run ``kwasm ARGS...`` as a user would (a real process), against the private data root."""

    def run(*args: str, input: str | None = None, timeout: float = 120, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "KWASM_ROOT": str(kwasm_root), "COLUMNS": "200", **(env or {})}
        result = subprocess.run(
            [sys.executable, "-m", "kwasm.cli.main", *args],
            input=input, capture_output=True, text=True, timeout=timeout, env=full_env,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kwasm {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    return run
