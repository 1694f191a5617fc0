"""Exec processes die with their task's init, and malformed or escaping OCI specs are refused cleanly."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.empty_pb2 import Empty

from kwasm.api import shim_pb2
from kwasm.sandboxer import status
from kwasm.sandboxer.client import SandboxerClient, TaskClient
from kwasm.sandboxer.density import start_pod
from kwasm.sandboxer.launch import make_bundle, running_sandboxer
from kwasm.sandboxer.podpump import update_request
from kwasm.sandboxer.status import StatusError

DEMO_WASM = Path(__file__).resolve().parents[1] / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"
STOPPED = 3


def _exec_spec(*args: str) -> AnyMessage:
    return AnyMessage(value=json.dumps({"args": ["/app.wasm", *args], "cwd": "/"}).encode())


def _rewrite(bundle: Path, **changes: object) -> Path:
    config = json.loads((bundle / "config.json").read_text())
    config.update(changes)
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def test_exec_processes_die_with_init_and_bad_specs_are_invalid(tmp_path: Path) -> None:
    sleeper = make_bundle(tmp_path / "sleep", DEMO_WASM, ["sleep", "600"])
    process = {"args": ["/app.wasm", "echo"], "cwd": "/"}
    malformed = {
        "linux-string": _rewrite(make_bundle(tmp_path / "b1", DEMO_WASM, ["echo"]), linux="x"),
        "annotations-list": _rewrite(make_bundle(tmp_path / "b2", DEMO_WASM, ["echo"]), annotations=["pod"]),
        "args-string": _rewrite(make_bundle(tmp_path / "b3", DEMO_WASM, ["echo"]), process={"args": "/app.wasm"}),
        "relative-mount": _rewrite(
            make_bundle(tmp_path / "b4", DEMO_WASM, ["echo"]), process=process,
            mounts=[{"type": "bind", "source": "data", "destination": "/data", "options": ["rbind"]}],
        ),
        "options-string": _rewrite(  # "ro" as a string, not a list: must not become a writable preopen
            make_bundle(tmp_path / "b5", DEMO_WASM, ["echo"]), process=process,
            mounts=[{"type": "bind", "source": str(tmp_path), "destination": "/data", "options": "ro"}],
        ),
    }
    outside = tmp_path / "outside.wasm"
    outside.write_bytes(DEMO_WASM.read_bytes())
    escaping = make_bundle(tmp_path / "escaping", DEMO_WASM, ["echo"])
    (escaping / "rootfs" / "app.wasm").unlink()
    (escaping / "rootfs" / "layer.wasm").symlink_to(outside)  # the only *.wasm, pointing out of the rootfs
    malformed["symlinked-layer"] = _rewrite(escaping, process={"args": ["/main.wasm"], "cwd": "/"})

    async def scenario(listen: Path, task_socket: Path) -> None:
        sandboxes = SandboxerClient(listen)
        tasks = await TaskClient.connect(f"ttrpc+unix://{task_socket}")
        task = await start_pod(sandboxes, tasks, "pod", sleeper)
        await tasks.call("Exec", shim_pb2.ExecProcessRequest(id=task, exec_id="busy", spec=_exec_spec("daemon")), Empty)
        await tasks.start(task, "busy")
        await tasks.call("Exec", shim_pb2.ExecProcessRequest(id=task, exec_id="idle", spec=_exec_spec("echo")), Empty)
        await tasks.kill(task, signal=9)
        assert (await asyncio.wait_for(tasks.wait(task), 5)).exit_status == 137
        for exec_id in ("busy", "idle"):  # the init's exit takes its exec processes along, as with runc
            exited = await asyncio.wait_for(tasks.wait(task, exec_id), 5)
            assert exited.exit_status == 137 and exited.exited_at.seconds > 0, exec_id
            assert (await tasks.state(task, exec_id)).status == STOPPED, exec_id
        with pytest.raises(StatusError) as late_exec:
            await tasks.call("Exec", shim_pb2.ExecProcessRequest(id=task, exec_id="late", spec=_exec_spec()), Empty)
        assert late_exec.value.code == status.FAILED_PRECONDITION
        for exec_id in ("busy", "idle"):
            assert (await tasks.delete(task, exec_id)).exit_status == 137
        assert (await tasks.delete(task)).exit_status == 137

        await sandboxes.update(update_request("pod", list(malformed)))
        for task_id, bundle in malformed.items():
            with pytest.raises(StatusError) as refused:
                await tasks.create(shim_pb2.CreateTaskRequest(id=task_id, bundle=str(bundle)))
            assert refused.value.code == status.INVALID_ARGUMENT, (task_id, refused.value.message)
        await sandboxes.shutdown("pod")
        await tasks.close()
        await sandboxes.close()

    with running_sandboxer(tmp_path / "sbx") as sandboxer:
        asyncio.run(scenario(sandboxer.listen, sandboxer.directory / "task.sock"))
        assert sorted(os.listdir(sandboxer.directory)) == ["sandboxer.lock", "task.sock"]
