"""Fixtures shared by the whole suite: an isolated data root and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from services import RunningDockerd, RunningRegistry, running_dockerd, running_registry

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "examples" / "wasi-demo-app"
DEMO_WASM = DEMO_DIR / "wasi-demo-app.wasm"

KwasmRunner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(autouse=True)
def _no_stale_root_override() -> Iterator[None]:
    """In-process CLI calls (CliRunner) may set ``--root``; never let it leak into the next test."""
    from kwasm.cli import state

    state.set_root(None)
    yield
    state.set_root(None)


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


# --- registry and Docker engine services (tests/services.py; owned by the registry engineer) ---


@pytest.fixture
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private $DOCKER_CONFIG directory, so tests never touch ~/.docker."""
    directory = tmp_path / "docker-config"
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    return directory


@pytest.fixture
def registry(tmp_path: Path, docker_config: Path) -> Iterator[RunningRegistry]:
    """Debian's docker-registry (distribution 2.8) on a free 127.0.0.1 port, no auth."""
    with running_registry(tmp_path / "registry") as service:
        yield service


@pytest.fixture
def auth_registry(tmp_path: Path, docker_config: Path) -> Iterator[RunningRegistry]:
    """docker-registry with htpasswd basic auth for user ``alice`` (password in ``.users``)."""
    with running_registry(tmp_path / "auth-registry", users={"alice": "wonderland"}) as service:
        yield service


@pytest.fixture
def dockerd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningDockerd]:
    """A private Docker engine (own data root and socket); DOCKER_HOST points at it."""
    with running_dockerd(tmp_path / "dockerd") as service:
        monkeypatch.setenv("DOCKER_HOST", service.base_url)
        yield service
