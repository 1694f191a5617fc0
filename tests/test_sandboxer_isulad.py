"""The sandboxer driven exactly as iSulad >= 2.1.6 drives it, over its real sockets, with the demo app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.empty_pb2 import Empty

from kwasm.api import cgroups_stats_pb2, sandbox_pb2, shim_pb2
from kwasm.sandboxer import status
from kwasm.sandboxer.client import SandboxerClient, TaskClient
from kwasm.sandboxer.density import start_pod
from kwasm.sandboxer.journal import Journal
from kwasm.sandboxer.launch import SandboxerProcess, make_bundle, pod_config, running_sandboxer
from kwasm.sandboxer.model import JOURNAL_FILE
from kwasm.sandboxer.podpump import update_request
from kwasm.sandboxer.status import StatusError

DEMO_WASM = Path(__file__).resolve().parents[1] / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"
CREATED, RUNNING, STOPPED = 1, 2, 3


@pytest.fixture
def sandboxer(tmp_path: Path) -> Iterator[SandboxerProcess]:
    with running_sandboxer(tmp_path / "sbx") as process:
        yield process


async def _clients(sandboxer: SandboxerProcess) -> tuple[SandboxerClient, TaskClient]:
    sandboxes = SandboxerClient(sandboxer.listen)
    tasks = await TaskClient.connect(f"ttrpc+unix://{sandboxer.directory / 'task.sock'}")
    return sandboxes, tasks


def _open_fds_on(pid: int, path: Path) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == str(path)
    return count


def test_isulad_sequence_checks_every_response_field(sandboxer: SandboxerProcess, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", DEMO_WASM, ["echo", "hello", "from", "wasm"])
    fifo = tmp_path / "stdout-fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    sandbox_id = "a" * 64

    async def sequence() -> None:
        sandboxes, tasks = await _clients(sandboxer)
        before = time.time()
        created = await sandboxes.create(sandbox_pb2.ControllerCreateRequest(
            sandbox_id=sandbox_id, options=AnyMessage(type_url="", value=pod_config("web")), sandboxer="wasm"))
        assert created == sandbox_pb2.ControllerCreateResponse(sandbox_id=sandbox_id)
        journal = Journal(str(sandboxer.directory / JOURNAL_FILE))
        record = [json.loads(payload) for payload in journal.replay()][-1]
        assert record["id"] == sandbox_id
        assert record["metadata"] == {"name": "web", "namespace": "default", "uid": "uid-web"}
        assert record["labels"]["io.kubernetes.pod.name"] == "web"
        assert record["annotations"]["io.kubernetes.cri.sandbox-name"] == "web"

        started = await sandboxes.start(sandbox_id)
        assert started.sandbox_id == sandbox_id
        assert started.pid == 0
        assert before <= started.created_at.ToNanoseconds() / 1e9 <= time.time()
        assert dict(started.labels) == {}
        assert started.address == f"ttrpc+unix://{sandboxer.directory / 'task.sock'}"
        assert started.version == 2

        wait = asyncio.ensure_future(sandboxes.wait(sandbox_id))
        update = update_request(sandbox_id, ["c1"], str(fifo))
        assert await sandboxes.update(update) == sandbox_pb2.ControllerUpdateResponse()

        created_task = await tasks.create(shim_pb2.CreateTaskRequest(
            id="c1", bundle=str(bundle), terminal=False, stdin="", stdout=str(fifo), stderr=""))
        assert created_task.pid == 0
        state = await tasks.state("c1")
        assert (state.id, state.bundle, state.pid, state.status) == ("c1", str(bundle), 0, CREATED)
        assert (state.stdout, state.stdin, state.stderr, state.exit_status) == (str(fifo), "", "", 0)
        assert not state.HasField("exited_at")

        assert (await tasks.start("c1")).pid == 0
        waited = await tasks.wait("c1")
        assert waited.exit_status == 0
        assert started.created_at.ToNanoseconds() / 1e9 <= waited.exited_at.ToNanoseconds() / 1e9 <= time.time()
        await asyncio.sleep(0.05)
        assert os.read(reader, 4096) == b"hello from wasm\n"
        assert _open_fds_on(sandboxer.pid, fifo) == 0
        state = await tasks.state("c1")
        assert (state.status, state.exit_status, state.exited_at) == (STOPPED, 0, waited.exited_at)

        await tasks.kill("c1", signal=9)
        deleted = await tasks.delete("c1")
        assert (deleted.pid, deleted.exit_status, deleted.exited_at) == (0, 0, waited.exited_at)
        await tasks.shutdown("c1")
        with pytest.raises(StatusError) as gone:
            await tasks.state("c1")
        assert gone.value.code == status.NOT_FOUND

        assert await sandboxes.update(update_request(sandbox_id, [])) == sandbox_pb2.ControllerUpdateResponse()
        assert not wait.done()
        stop_time = time.time()
        assert await sandboxes.stop(sandbox_id, 10) == sandbox_pb2.ControllerStopResponse()
        stopped = await asyncio.wait_for(wait, 5)
        assert stopped.exit_status == 0
        assert stop_time <= stopped.exited_at.ToNanoseconds() / 1e9 <= time.time()
        sandbox_status = await sandboxes.status(sandbox_id)
        assert sandbox_status.sandbox_id == sandbox_id
        assert (sandbox_status.state, sandbox_status.pid, sandbox_status.version) == ("SANDBOX_NOTREADY", 0, 2)
        assert sandbox_status.created_at == started.created_at
        assert sandbox_status.exited_at == stopped.exited_at
        assert sandbox_status.address == started.address

        assert await sandboxes.shutdown(sandbox_id) == sandbox_pb2.ControllerShutdownResponse()
        with pytest.raises(StatusError) as missing:
            await sandboxes.status(sandbox_id)
        assert missing.value.code == status.NOT_FOUND
        await tasks.close()
        await sandboxes.close()

    asyncio.run(sequence())
    os.close(reader)
    assert sorted(os.listdir(sandboxer.directory)) == ["sandboxer.lock", "task.sock"]


def test_exit_code_kill_exec_and_metrics(sandboxer: SandboxerProcess, tmp_path: Path) -> None:
    exit3 = make_bundle(tmp_path / "exit3", DEMO_WASM, ["exit", "3"])
    sleeper = make_bundle(tmp_path / "sleep", DEMO_WASM, ["sleep", "600"], memory_limit=64 << 20)
    daemon = make_bundle(tmp_path / "daemon", DEMO_WASM, ["daemon"])
    daemon_out = tmp_path / "daemon-out"
    os.mkfifo(daemon_out)
    reader = os.open(daemon_out, os.O_RDONLY | os.O_NONBLOCK)

    async def scenario() -> None:
        sandboxes, tasks = await _clients(sandboxer)
        exiting = await start_pod(sandboxes, tasks, "exit3", exit3)
        assert (await tasks.wait(exiting)).exit_status == 3
        assert (await tasks.state(exiting)).exit_status == 3
        assert (await tasks.delete(exiting)).exit_status == 3

        talking = await start_pod(sandboxes, tasks, "daemon", daemon, str(daemon_out))
        await asyncio.sleep(0.3)
        assert b"a sandbox is but a dream" in os.read(reader, 65536)
        assert (await tasks.state(talking)).status == RUNNING
        await tasks.kill(talking, signal=15)
        killed = await asyncio.wait_for(tasks.wait(talking), 5)
        assert killed.exit_status == 137
        assert (await tasks.delete(talking)).exit_status == 137

        sleeping = await start_pod(sandboxes, tasks, "sleep", sleeper)
        stats = await tasks.call("Stats", shim_pb2.StatsRequest(id=sleeping), shim_pb2.StatsResponse)
        assert stats.stats.type_url == "io.containerd.cgroups.v2.Metrics"
        metrics = cgroups_stats_pb2.Metrics.FromString(stats.stats.value)
        assert metrics.pids.current == 1
        assert 0 < metrics.memory.usage <= 64 << 20
        assert metrics.memory.usage_limit == 64 << 20
        controller_metrics = await sandboxes.controller(
            "Metrics", sandbox_pb2.ControllerMetricsRequest(sandbox_id="sleep"), sandbox_pb2.ControllerMetricsResponse)
        assert controller_metrics.metrics.id == "sleep"
        assert cgroups_stats_pb2.Metrics.FromString(controller_metrics.metrics.data.value).memory.usage > 0

        spec = AnyMessage(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                          value=json.dumps({"args": ["/app.wasm", "exit", "5"], "cwd": "/"}).encode())
        await tasks.call("Exec", shim_pb2.ExecProcessRequest(id=sleeping, exec_id="e1", spec=spec), Empty)
        await tasks.start(sleeping, "e1")
        assert (await tasks.wait(sleeping, "e1")).exit_status == 5
        assert (await tasks.delete(sleeping, "e1")).exit_status == 5
        shell = AnyMessage(value=json.dumps({"args": ["/bin/sh", "-c", "ls"], "cwd": "/"}).encode())
        with pytest.raises(StatusError) as not_wasm:
            await tasks.call("Exec", shim_pb2.ExecProcessRequest(id=sleeping, exec_id="e2", spec=shell), Empty)
        assert not_wasm.value.code == status.UNIMPLEMENTED

        began = time.monotonic()
        await sandboxes.stop("sleep", 5)
        assert time.monotonic() - began < 3
        state = await tasks.state(sleeping)
        assert (state.status, state.exit_status) == (STOPPED, 137)
        for sandbox_id in ("exit3", "daemon", "sleep"):
            await sandboxes.shutdown(sandbox_id)
        await tasks.close()
        await sandboxes.close()

    asyncio.run(scenario())
    os.close(reader)


def test_unknown_ids_bad_arguments_and_unsupported_calls(sandboxer: SandboxerProcess, tmp_path: Path) -> None:
    async def scenario() -> None:
        sandboxes, tasks = await _clients(sandboxer)
        for method, request, response in [
            ("Start", sandbox_pb2.ControllerStartRequest(sandbox_id="nope"), sandbox_pb2.ControllerStartResponse),
            ("Status", sandbox_pb2.ControllerStatusRequest(sandbox_id="nope"), sandbox_pb2.ControllerStatusResponse),
            ("Wait", sandbox_pb2.ControllerWaitRequest(sandbox_id="nope"), sandbox_pb2.ControllerWaitResponse),
            ("Stop", sandbox_pb2.ControllerStopRequest(sandbox_id="nope"), sandbox_pb2.ControllerStopResponse),
            ("Shutdown", sandbox_pb2.ControllerShutdownRequest(sandbox_id="nope"),
             sandbox_pb2.ControllerShutdownResponse),
            ("Metrics", sandbox_pb2.ControllerMetricsRequest(sandbox_id="nope"), sandbox_pb2.ControllerMetricsResponse),
            ("Update", update_request("nope", []), sandbox_pb2.ControllerUpdateResponse),
        ]:
            with pytest.raises(StatusError) as missing:
                await sandboxes.controller(method, request, response)
            assert missing.value.code == status.NOT_FOUND, method
        for method in ("State", "Start", "Kill", "Delete", "Wait", "Stats", "Pids"):
            with pytest.raises(StatusError) as missing:
                await tasks.call(method, shim_pb2.StateRequest(id="nope"), shim_pb2.StateResponse)
            assert missing.value.code == status.NOT_FOUND, method

        bad = [
            sandbox_pb2.ControllerCreateRequest(sandbox_id=""),
            sandbox_pb2.ControllerCreateRequest(sandbox_id="../escape"),
            sandbox_pb2.ControllerCreateRequest(sandbox_id="ok", options=AnyMessage(value=b"\xff\xff\xff")),
        ]
        for request in bad:
            with pytest.raises(StatusError) as invalid:
                await sandboxes.create(request)
            assert invalid.value.code == status.INVALID_ARGUMENT
        await sandboxes.create(sandbox_pb2.ControllerCreateRequest(sandbox_id="s1"))
        with pytest.raises(StatusError) as twice:
            await sandboxes.create(sandbox_pb2.ControllerCreateRequest(sandbox_id="s1"))
        assert twice.value.code == status.ALREADY_EXISTS
        no_extension = sandbox_pb2.ControllerUpdateRequest(sandbox_id="s1", fields=["extensions.tasks"])
        with pytest.raises(StatusError) as invalid_update:
            await sandboxes.update(no_extension)
        assert invalid_update.value.code == status.INVALID_ARGUMENT
        ignored = sandbox_pb2.ControllerUpdateRequest(sandbox_id="s1", fields=["labels"])
        assert await sandboxes.update(ignored) == sandbox_pb2.ControllerUpdateResponse()

        platform = await sandboxes.controller(
            "Platform", sandbox_pb2.ControllerPlatformRequest(sandbox_id="s1"), sandbox_pb2.ControllerPlatformResponse)
        assert (platform.platform.os, platform.platform.architecture) == ("linux", "amd64")

        await sandboxes.start("s1")
        with pytest.raises(StatusError) as unannounced:
            await tasks.create(shim_pb2.CreateTaskRequest(id="stray", bundle=str(tmp_path)))
        assert unannounced.value.code == status.INVALID_ARGUMENT  # no config.json in the bundle
        for method in ("Pause", "Resume", "Checkpoint", "Update"):
            with pytest.raises(StatusError) as unsupported:
                await tasks.call(method, shim_pb2.PauseRequest(id="x"), shim_pb2.StartResponse)
            assert unsupported.value.code == status.UNIMPLEMENTED, method
        connected = await tasks.call("Connect", shim_pb2.ConnectRequest(), shim_pb2.ConnectResponse)
        assert (connected.shim_pid, connected.task_pid) == (sandboxer.pid, 0)
        await sandboxes.shutdown("s1")
        await tasks.close()
        await sandboxes.close()

    asyncio.run(scenario())


def test_containerd_style_task_with_rootfs_mount_and_sandbox_annotation(
    sandboxer: SandboxerProcess, tmp_path: Path
) -> None:
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "app.wasm").write_bytes(DEMO_WASM.read_bytes())
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    config = {
        "process": {"args": ["/app.wasm", "exit", "7"], "env": [], "cwd": "/"},
        "root": {"path": "rootfs"},
        "annotations": {"io.kubernetes.cri.sandbox-id": "ctrd"},
    }
    (bundle / "config.json").write_text(json.dumps(config))

    async def scenario() -> None:
        sandboxes, tasks = await _clients(sandboxer)
        await sandboxes.create(sandbox_pb2.ControllerCreateRequest(
            sandbox_id="ctrd", options=AnyMessage(type_url="type.googleapis.com/runtime.v1.PodSandboxConfig",
                                                  value=pod_config("ctrd"))))
        await sandboxes.start("ctrd")
        request = shim_pb2.CreateTaskRequest(id="ctr1", bundle=str(bundle))
        request.rootfs.add(type="bind", source=str(snapshot), options=["rbind", "ro"])
        await tasks.create(request)
        assert (bundle / "rootfs" / "app.wasm").is_file()
        await tasks.start("ctr1")
        assert (await tasks.wait("ctr1")).exit_status == 7
        assert (await tasks.delete("ctr1")).exit_status == 7
        assert list((bundle / "rootfs").iterdir()) == []
        await sandboxes.shutdown("ctrd")
        await tasks.close()
        await sandboxes.close()

    asyncio.run(scenario())


def test_stderr_to_a_cri_log_file_joins_split_writes(sandboxer: SandboxerProcess, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", DEMO_WASM, ["no-such-command"])
    log_path = tmp_path / "container.log"

    async def scenario() -> None:
        sandboxes, tasks = await _clients(sandboxer)
        await sandboxes.create(sandbox_pb2.ControllerCreateRequest(
            sandbox_id="logs", options=AnyMessage(value=pod_config("logs"))))
        await sandboxes.start("logs")
        await sandboxes.update(update_request("logs", ["bad"]))
        await tasks.create(shim_pb2.CreateTaskRequest(
            id="bad", bundle=str(bundle), stdout=str(log_path), stderr=str(log_path)))
        await tasks.start("bad")
        assert (await tasks.wait("bad")).exit_status == 1
        await sandboxes.shutdown("logs")
        await tasks.close()
        await sandboxes.close()

    asyncio.run(scenario())
    stamp, stream, tag, text = log_path.read_text().splitlines()[0].split(" ", 3)
    assert (stream, tag, text) == ("stderr", "F", "unknown command: no-such-command")
    assert stamp.endswith("Z") and len(stamp.split(".")[1]) == 10  # RFC 3339 with nanoseconds


def test_kill_stops_a_busy_guest(sandboxer: SandboxerProcess, tmp_path: Path) -> None:
    source = tmp_path / "spin.wat"
    source.write_text('(module (memory (export "memory") 1) (func (export "_start") (loop $spin (br $spin))))')
    module = tmp_path / "spin.wasm"
    subprocess.run(["wat2wasm", str(source), "-o", str(module)], check=True)
    bundle = make_bundle(tmp_path / "bundle", module, [])

    async def scenario() -> None:
        sandboxes, tasks = await _clients(sandboxer)
        spinning = await start_pod(sandboxes, tasks, "busy", bundle)
        await asyncio.sleep(0.3)
        assert (await tasks.state(spinning)).status == RUNNING
        await tasks.kill(spinning, signal=9)
        assert (await asyncio.wait_for(tasks.wait(spinning), 5)).exit_status == 137
        await sandboxes.shutdown("busy")
        await tasks.close()
        await sandboxes.close()

    asyncio.run(scenario())


def test_memory_limit_from_the_oci_spec_holds(sandboxer: SandboxerProcess, tmp_path: Path) -> None:
    # Grows linear memory by 2000 pages (125 MiB); traps (exit 134) when the grow is refused.
    source = tmp_path / "grow.wat"
    source.write_text(
        '(module (memory (export "memory") 1) (func (export "_start")'
        " (if (i32.eq (memory.grow (i32.const 2000)) (i32.const -1)) (then unreachable))))"
    )
    module = tmp_path / "grow.wasm"
    subprocess.run(["wat2wasm", str(source), "-o", str(module)], check=True)
    limited = make_bundle(tmp_path / "limited", module, [], memory_limit=64 << 20)
    unlimited = make_bundle(tmp_path / "unlimited", module, [])

    async def scenario() -> None:
        sandboxes, tasks = await _clients(sandboxer)
        capped = await start_pod(sandboxes, tasks, "capped", limited)
        assert (await tasks.wait(capped)).exit_status == 134
        free = await start_pod(sandboxes, tasks, "free", unlimited)
        assert (await tasks.wait(free)).exit_status == 0
        for sandbox_id in ("capped", "free"):
            await sandboxes.shutdown(sandbox_id)
        await tasks.close()
        await sandboxes.close()

    asyncio.run(scenario())
