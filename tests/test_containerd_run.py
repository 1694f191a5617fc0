"""`kwasm run --engine containerd`: an image of kwasm's local store runs on a real containerd 1.6."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DEMO_DIR
from containerd_service import RunningContainerd, running_containerd

from kwasm.image.store import ImageStore
from kwasm.shim.containerd_run import ctr_command, ensure_imported, run_on_containerd

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningContainerd]:
    """A private containerd for this module."""
    with running_containerd(Path(tmp_path_factory.mktemp("ctd-run"))) as running:
        yield running


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kwasm data root holding the demo app, built once by `kwasm build`."""
    root = tmp_path_factory.mktemp("kwasm-root")
    env = {**os.environ, "KWASM_ROOT": str(root)}
    built = subprocess.run(
        [sys.executable, "-m", "kwasm.cli.main", "build", str(DEMO_DIR), "-t", "wasi-demo-app:latest"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert built.returncode == 0, built.stderr
    return root


@pytest.fixture
def demo_image(store_root: Path, containerd: RunningContainerd, monkeypatch: pytest.MonkeyPatch) -> str:
    """The demo app's name; the kwasm store, ctr and the shim all point at the private instances."""
    monkeypatch.setenv("KWASM_ROOT", str(store_root))
    monkeypatch.setenv("PATH", containerd.env["PATH"])
    monkeypatch.setenv("CONTAINERD_NAMESPACE", "kwasm-run")
    return "wasi-demo-app:latest"


def test_run_imports_once_and_returns_the_exit_code(
    containerd: RunningContainerd, demo_image: str, capfd: pytest.CaptureFixture[str]
) -> None:
    assert run_on_containerd(demo_image, ["echo", "hello", "containerd"], {}, True, containerd.address) == 0
    assert capfd.readouterr().out.strip() == "hello containerd"
    listed = containerd.ctr("kwasm-run", "images", "ls", "-q").stdout.split()
    assert listed == ["docker.io/library/wasi-demo-app:latest"]
    store = ImageStore.default()
    assert not ensure_imported(store, store.resolve(demo_image), ctr_command(containerd.address, "kwasm-run"))
    assert run_on_containerd(demo_image, ["exit", "3"], {}, True, containerd.address) == 3
    assert containerd.ctr("kwasm-run", "containers", "ls", "-q").stdout.split() == []


def test_run_passes_env_and_keeps_the_container_without_rm(
    containerd: RunningContainerd, demo_image: str, capfd: pytest.CaptureFixture[str]
) -> None:
    assert run_on_containerd(demo_image, ["frobnicate"], {"GREETING": "hi"}, False, containerd.address) == 1
    assert "unknown command: frobnicate" in capfd.readouterr().err
    kept = containerd.ctr("kwasm-run", "containers", "ls", "-q").stdout.split()
    assert len(kept) == 1 and kept[0].startswith("kwasm-")
    info = containerd.ctr("kwasm-run", "containers", "info", kept[0]).stdout
    assert '"GREETING=hi"' in info
    assert containerd.ctr("kwasm-run", "containers", "rm", kept[0]).returncode == 0


def test_run_refuses_a_missing_containerd(demo_image: str, tmp_path: Path) -> None:
    from kwasm.errors import SandboxerError

    with pytest.raises(SandboxerError, match="no containerd socket"):
        run_on_containerd(demo_image, [], {}, True, str(tmp_path / "absent.sock"))


def test_kwasm_run_engine_containerd_cli(containerd: RunningContainerd, demo_image: str, store_root: Path) -> None:
    env = {**os.environ, "KWASM_ROOT": str(store_root), "CONTAINERD_ADDRESS": containerd.address,
           "CONTAINERD_NAMESPACE": "kwasm-cli", "PATH": containerd.env["PATH"]}

    def kwasm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kwasm.cli.main", "run", *args], capture_output=True,
                              text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)

    hello = kwasm("--engine", "containerd", demo_image, "--", "echo", "hello")
    assert (hello.returncode, hello.stdout) == (0, "hello\n"), hello.stderr
    assert kwasm("--engine", "containerd", demo_image, "--", "exit", "3").returncode == 3
    refused = kwasm("--engine", "containerd", "--memory", "8M", demo_image)
    assert refused.returncode == 2
    assert "not supported with --engine containerd" in refused.stderr and refused.stderr.count("\n") == 1
    unknown = kwasm("--engine", "podman", demo_image)
    assert unknown.returncode == 2 and "local, isulad or containerd" in unknown.stderr
    assert containerd.ctr("kwasm-cli", "containers", "ls", "-q").stdout.split() == []
