"""kill -9 with 50 live sandboxes, restart on the same sockets and state, then clean everything up."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from google.protobuf.any_pb2 import Any as AnyMessage

from kwasm.api import sandbox_pb2
from kwasm.sandboxer.client import SandboxerClient, TaskClient
from kwasm.sandboxer.density import start_pod
from kwasm.sandboxer.launch import make_bundle, pod_config, start_sandboxer, stop_sandboxer

DEMO_WASM = Path(__file__).resolve().parents[1] / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"
STOPPED = 3
PODS = 50


def _seconds(stamp: object) -> float:
    return stamp.ToNanoseconds() / 1e9  # type: ignore[attr-defined]


def test_kill_9_then_restart_recovers_all_sandboxes(tmp_path: Path) -> None:
    sleeper = make_bundle(tmp_path / "sleep", DEMO_WASM, ["sleep", "600"])
    exit3 = make_bundle(tmp_path / "exit3", DEMO_WASM, ["exit", "3"])
    directory = tmp_path / "sbx"
    first = start_sandboxer(directory)

    async def populate() -> None:
        sandboxes = SandboxerClient(first.listen)
        tasks = await TaskClient.connect(f"ttrpc+unix://{first.directory / 'task.sock'}")
        await asyncio.gather(*(start_pod(sandboxes, tasks, f"pod{i}", sleeper) for i in range(PODS)))
        finished = await start_pod(sandboxes, tasks, "finished", exit3)
        assert (await tasks.wait(finished)).exit_status == 3
        await sandboxes.create(sandbox_pb2.ControllerCreateRequest(
            sandbox_id="never-started", options=AnyMessage(value=pod_config("idle"))))
        await tasks.close()
        await sandboxes.close()

    try:
        asyncio.run(populate())
    except BaseException:
        stop_sandboxer(first)
        raise
    crash = time.time()
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait(10)
    assert first.listen.is_socket()  # left behind: the restart must replace it

    second = start_sandboxer(directory)
    try:
        async def check() -> None:
            sandboxes = SandboxerClient(second.listen)
            tasks = await TaskClient.connect(f"ttrpc+unix://{second.directory / 'task.sock'}")
            for i in range(PODS):
                sandbox_id, task_id = f"pod{i}", f"pod{i}-c"
                status = await sandboxes.status(sandbox_id)
                assert status.state == "SANDBOX_NOTREADY"
                assert crash <= _seconds(status.exited_at) <= time.time()
                waited = await asyncio.wait_for(sandboxes.wait(sandbox_id), 5)
                assert waited.exit_status == 137
                state = await tasks.state(task_id)
                assert (state.status, state.exit_status) == (STOPPED, 137)
                assert crash <= _seconds(state.exited_at) <= time.time()
                assert (await asyncio.wait_for(tasks.wait(task_id), 5)).exit_status == 137
                assert (await tasks.delete(task_id)).exit_status == 137
            assert (await tasks.state("finished-c")).exit_status == 3
            assert (await sandboxes.status("never-started")).state == "SANDBOX_NOTREADY"
            for sandbox_id in [*(f"pod{i}" for i in range(PODS)), "finished", "never-started"]:
                await sandboxes.shutdown(sandbox_id)
            assert not (await sandboxes.list()).sandboxes
            await tasks.close()
            await sandboxes.close()

        asyncio.run(check())
    finally:
        assert stop_sandboxer(second) == 0
    assert sorted(os.listdir(second.directory)) == []
    assert not second.listen.exists()
