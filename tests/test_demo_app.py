"""The committed demo app binary is exactly what its source and build script produce."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import DEMO_DIR, DEMO_WASM


def test_build_script_reproduces_the_committed_wasm(tmp_path: Path) -> None:
    copy = tmp_path / "wasi-demo-app"
    shutil.copytree(DEMO_DIR, copy)
    (copy / "wasi-demo-app.wasm").unlink()
    subprocess.run(["./build.sh"], cwd=copy, check=True, capture_output=True, timeout=180)
    rebuilt = (copy / "wasi-demo-app.wasm").read_bytes()
    assert rebuilt[:4] == b"\0asm"
    assert rebuilt == DEMO_WASM.read_bytes(), "examples/wasi-demo-app/wasi-demo-app.wasm is stale: run build.sh"
