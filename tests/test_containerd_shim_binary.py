"""The `containerd-shim-kwasm-v1` binary contract, driven as containerd drives it (no containerd needed)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import DEMO_WASM
from containerd_service import sandboxer_pid, sandboxers, scripts_dir, wait_for

from kwasm.api import shim_pb2
from kwasm.sandboxer.launch import make_bundle
from kwasm.sandboxer.ttrpc import TtrpcClient
from kwasm.shim.cleanup import SERVICE
from kwasm.shim.layout import IDLE_GRACE_ENV, ROOT_ENV, NamespaceLayout

pytestmark = pytest.mark.timeout(60)
SHIM = "containerd-shim-kwasm-v1"


def _shim(root: Path, bundle: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    # /bin/true stands in for the publish binary here; real publishing is checked against containerd
    # in test_containerd_shim.py.
    binary = shutil.which(SHIM, path=str(scripts_dir()))
    assert binary is not None, "pip install -e . did not install the console script"
    env = {**os.environ, ROOT_ENV: str(root), IDLE_GRACE_ENV: "0.5"}
    return subprocess.run(
        [binary, "-namespace", "unit", "-address", "/unused/containerd.sock", "-publish-binary", "/bin/true",
         *args], cwd=bundle, capture_output=True, timeout=30, env=env, stdin=subprocess.DEVNULL,
    )


def test_start_shares_one_sandboxer_and_delete_answers(tmp_path: Path) -> None:
    root = tmp_path / "shim"
    layout = NamespaceLayout.of("/unused/containerd.sock", "unit", root)
    try:
        bundles = [tmp_path / name for name in ("one", "two")]
        addresses = []
        for bundle in bundles:
            bundle.mkdir()
            started = _shim(root, bundle, "-id", bundle.name, "start")
            assert started.returncode == 0, started.stderr
            assert started.stderr == b""  # containerd reads stdout and stderr combined
            addresses.append(started.stdout.decode())
            assert (bundle / "address").read_text() == addresses[-1]
        assert addresses == [layout.address, layout.address]
        assert layout.socket.is_socket() and (layout.socket.stat().st_mode & 0o777) == 0o600
        pid = sandboxer_pid(layout)
        assert pid is not None and len(sandboxers(layout)) == 1
        assert sorted(layout.pending_reservations()) == ["one", "two"]

        for bundle in bundles:
            deleted = _shim(root, bundle, "-id", bundle.name, "-bundle", str(bundle), "delete")
            assert deleted.returncode == 0, deleted.stderr
            response = shim_pb2.DeleteResponse()
            response.ParseFromString(deleted.stdout)
            assert response.exit_status == 137 and response.exited_at.seconds > 0
        # Nothing reserved, nothing running: the sandboxer leaves after its idle grace.
        assert wait_for(lambda: sandboxer_pid(layout) is None, 15)
        assert sorted(path.name for path in layout.directory.iterdir()) == ["sandboxer.log", "start.lock"]
    finally:
        leftover = sandboxer_pid(layout)
        if leftover is not None:
            os.kill(leftover, signal.SIGTERM)


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    missing = _shim(tmp_path, tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.decode().count("\n") == 1 and b"start or delete" in missing.stderr
    no_id = _shim(tmp_path, tmp_path, "start")
    assert no_id.returncode == 1
    assert no_id.stderr.decode().strip() == "containerd-shim-kwasm-v1 start: start needs -id"
    escape = _shim(tmp_path, tmp_path, "-id", "../escape", "start")
    assert escape.returncode == 1 and b"invalid task id '../escape'" in escape.stderr
    assert not (tmp_path / "escape").exists()
    version = _shim(tmp_path, tmp_path, "-v")
    assert version.returncode == 0 and b"kwasm" in version.stdout


def test_delete_kills_and_deletes_tasks_the_sandboxer_still_holds(tmp_path: Path) -> None:
    root = tmp_path / "shim"
    layout = NamespaceLayout.of("/unused/containerd.sock", "unit", root)
    tasks = {"looping": ["daemon"], "exited": ["exit", "7"]}
    bundles = {name: make_bundle(tmp_path / name, DEMO_WASM, args) for name, args in tasks.items()}

    async def create_and_start(name: str) -> None:
        client = await TtrpcClient.connect(layout.socket)
        try:
            create = shim_pb2.CreateTaskRequest(id=name, bundle=str(bundles[name]))
            await client.call(SERVICE, "Create", create.SerializeToString())
            await client.call(SERVICE, "Start", shim_pb2.StartRequest(id=name).SerializeToString())
        finally:
            await client.close()

    try:
        for name, bundle in bundles.items():
            assert _shim(root, bundle, "-id", name, "start").returncode == 0
            asyncio.run(create_and_start(name))
            assert layout.is_held(name)
        statuses = {}
        for name, bundle in bundles.items():
            deleted = _shim(root, bundle, "-id", name, "-bundle", str(bundle), "delete")
            assert deleted.returncode == 0, deleted.stderr
            response = shim_pb2.DeleteResponse()
            response.ParseFromString(deleted.stdout)
            statuses[name] = response.exit_status
            assert not layout.is_held(name)
        # The guest's own code comes from the sandboxer; the looping one was killed there.
        assert statuses == {"looping": 137, "exited": 7}
        assert wait_for(lambda: sandboxer_pid(layout) is None, 15), "the sandboxer kept a deleted task"
    finally:
        leftover = sandboxer_pid(layout)
        if leftover is not None:
            os.kill(leftover, signal.SIGTERM)


def test_sigterm_stops_the_sandboxer_and_its_guests(tmp_path: Path) -> None:
    root = tmp_path / "shim"
    layout = NamespaceLayout.of("/unused/containerd.sock", "unit", root)
    bundle = make_bundle(tmp_path / "looping", DEMO_WASM, ["daemon"])

    async def create_and_start() -> None:
        client = await TtrpcClient.connect(layout.socket)
        try:
            create = shim_pb2.CreateTaskRequest(id="looping", bundle=str(bundle))
            await client.call(SERVICE, "Create", create.SerializeToString())
            await client.call(SERVICE, "Start", shim_pb2.StartRequest(id="looping").SerializeToString())
        finally:
            await client.close()

    assert _shim(root, bundle, "-id", "looping", "start").returncode == 0
    pid = sandboxer_pid(layout)
    assert pid is not None
    try:
        asyncio.run(create_and_start())
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: sandboxer_pid(layout) is None, 15), "SIGTERM did not stop the sandboxer"
        assert not layout.socket.exists() and not layout.pid_file.exists()
    finally:
        if sandboxer_pid(layout) is not None:
            os.kill(pid, signal.SIGKILL)
