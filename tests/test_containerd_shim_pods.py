"""CRI pods on containerd 1.6: the pause container and the pod's containers, as CRI hands them to the shim.

No CRI client runs here (no crictl), so the test replays what containerd's CRI plugin sends: the
pause container's bundle carries ``io.kubernetes.cri.container-type: sandbox`` and a non-wasm
``/pause`` process; each container names its pod with ``io.kubernetes.cri.sandbox-id``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import DEMO_WASM
from containerd_service import sandboxer_pid, scripts_dir, wait_for
from google.protobuf.message import Message

from kwasm.api import shim_pb2
from kwasm.sandboxer.launch import make_bundle
from kwasm.sandboxer.status import NOT_FOUND, UNIMPLEMENTED, StatusError
from kwasm.sandboxer.ttrpc import TtrpcClient
from kwasm.shim.cleanup import SERVICE
from kwasm.shim.layout import IDLE_GRACE_ENV, ROOT_ENV, NamespaceLayout

pytestmark = pytest.mark.timeout(60)
ADDRESS = "/unused/containerd.sock"


def _start(root: Path, bundle: Path, task_id: str) -> None:
    env = {**os.environ, ROOT_ENV: str(root), IDLE_GRACE_ENV: "0.5"}
    started = subprocess.run(
        [str(scripts_dir() / "containerd-shim-kwasm-v1"), "-namespace", "k8s.io", "-address", ADDRESS,
         "-publish-binary", "/bin/true", "-id", task_id, "start"],
        cwd=bundle, capture_output=True, timeout=30, env=env,
    )
    assert started.returncode == 0, started.stderr


def _bundle(
    directory: Path, args: list[str], annotations: dict[str, str], process_args: list[str] | None = None
) -> Path:
    bundle = make_bundle(directory, DEMO_WASM, args, annotations=annotations)
    if process_args is not None:
        config = json.loads((bundle / "config.json").read_text())
        config["process"]["args"] = process_args
        (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def test_pause_container_hosts_the_pods_wasm_containers(tmp_path: Path) -> None:
    root = tmp_path / "shim"
    layout = NamespaceLayout.of(ADDRESS, "k8s.io", root)
    pod = _bundle(tmp_path / "pod", [], {"io.kubernetes.cri.container-type": "sandbox",
                                         "io.kubernetes.cri.sandbox-id": "pod"}, ["/pause"])
    member = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod"}
    app = _bundle(tmp_path / "app", ["echo", "hi"], member)
    idle = _bundle(tmp_path / "idle", ["daemon"], member)

    async def scenario() -> None:
        client = await TtrpcClient.connect(layout.socket)

        async def call(method: str, request: Message, response: type[Message] | None = None) -> Message | None:
            payload = await client.call(SERVICE, method, request.SerializeToString())
            if response is None:
                return None
            message = response()
            message.ParseFromString(payload)
            return message

        try:
            await call("Create", shim_pb2.CreateTaskRequest(id="pod", bundle=str(pod)))
            await call("Start", shim_pb2.StartRequest(id="pod"))
            state = await call("State", shim_pb2.StateRequest(id="pod"), shim_pb2.StateResponse)
            assert isinstance(state, shim_pb2.StateResponse) and state.status == 2  # RUNNING, /pause never ran
            connected = await call("Connect", shim_pb2.ConnectRequest(id="pod"), shim_pb2.ConnectResponse)
            assert isinstance(connected, shim_pb2.ConnectResponse) and connected.shim_pid == sandboxer_pid(layout)
            with pytest.raises(StatusError) as refused:
                await call("Exec", shim_pb2.ExecProcessRequest(id="pod", exec_id="sh"))
            assert refused.value.code == UNIMPLEMENTED

            _start(root, app, "app")
            log = tmp_path / "app.log"
            await call("Create", shim_pb2.CreateTaskRequest(id="app", bundle=str(app), stdout=str(log)))
            await call("Start", shim_pb2.StartRequest(id="app"))
            waited = await call("Wait", shim_pb2.WaitRequest(id="app"), shim_pb2.WaitResponse)
            assert isinstance(waited, shim_pb2.WaitResponse) and waited.exit_status == 0
            assert log.read_text().endswith(" stdout F hi\n")
            await call("Delete", shim_pb2.DeleteRequest(id="app"))

            _start(root, idle, "idle")
            await call("Create", shim_pb2.CreateTaskRequest(id="idle", bundle=str(idle)))
            await call("Kill", shim_pb2.KillRequest(id="pod", signal=signal.SIGKILL))
            waited = await call("Wait", shim_pb2.WaitRequest(id="pod"), shim_pb2.WaitResponse)
            assert isinstance(waited, shim_pb2.WaitResponse) and waited.exit_status == 137
            await call("Delete", shim_pb2.DeleteRequest(id="pod"))
            with pytest.raises(StatusError) as gone:  # removing the pod removed its container too
                await call("State", shim_pb2.StateRequest(id="idle"))
            assert gone.value.code == NOT_FOUND
        finally:
            await client.close()

    _start(root, pod, "pod")
    try:
        asyncio.run(scenario())
        assert wait_for(lambda: sandboxer_pid(layout) is None, 15), "the sandboxer outlived the pod"
    finally:
        leftover = sandboxer_pid(layout)
        if leftover is not None:
            os.kill(leftover, signal.SIGTERM)
