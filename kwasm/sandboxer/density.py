"""Sandbox density benchmark: drive a sandboxer through its sockets the way iSulad does.

Each pod is Controller.Create (serialized PodSandboxConfig, empty type_url) -> Start -> Update
(extensions.tasks) -> Task.Create -> Task.Start of the demo app; ``window`` pods are in flight at
once. Afterwards the pods are held and the sandboxer's RSS and descriptors are read from /proc.
The pod path speaks gRPC through the lean :class:`WireClient` (grpcio's client would cost the
2-core machine as much CPU as the sandboxer itself); the sandboxer's CPU per pod is read from
/proc/<pid>/stat around the start phase and reported with the capacity per core it implies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import psutil
from google.protobuf.any_pb2 import Any as AnyMessage

from kwasm.api import sandbox_pb2, shim_pb2
from kwasm.sandboxer.client import SandboxerClient, TaskClient
from kwasm.sandboxer.daemon import raise_nofile
from kwasm.sandboxer.launch import make_bundle, pod_config
from kwasm.sandboxer.wireclient import WireClient

#: Kuasar's published memory per wasm sandbox (100k sandboxes, 183.3 GB).
KUASAR_KIB_PER_SANDBOX = 1.9 * 1024
GUEST_ARGS = {"sleep": ["sleep", "1000000"], "daemon": ["daemon"]}
WARMUP = 20


@dataclass
class DensityResult:
    """What one density run measured."""

    n: int
    mode: str
    stdout: str
    waits: bool
    rss_per_sandbox_kib: float
    rss_total_per_sandbox_kib: float
    start_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    fds_per_sandbox: float
    running: int
    failures: int
    stdout_bytes_per_s: float
    held_cpu_cores: float
    #: Sandboxer CPU (user + system, from /proc/<pid>/stat) per pod while pods were started.
    server_cpu_ms_per_pod: float
    #: Pods per second one core of sandboxer CPU sustains (1000 / server_cpu_ms_per_pod).
    capacity_per_core: float
    #: The benchmark client's own CPU per pod (it shares the machine's cores).
    client_cpu_ms_per_pod: float
    rss_mib: float
    fds: int
    kuasar_kib_per_sandbox: float = KUASAR_KIB_PER_SANDBOX

    def to_json(self) -> str:
        """One JSON object."""
        return json.dumps(asdict(self))


def tasks_extension(task_ids: list[str], stdout: str = "") -> AnyMessage:
    """The ``extensions["tasks"]`` Any iSulad sends in Controller.Update."""
    tasks = [{"task_id": task_id, "spec": {}, "rootfs": [], "stdin": "", "stdout": stdout, "stderr": ""}
             for task_id in task_ids]
    return AnyMessage(type_url="github.com/containerd/containerd/Tasks", value=json.dumps({"tasks": tasks}).encode())


def update_request(sandbox_id: str, task_ids: list[str], stdout: str = "") -> sandbox_pb2.ControllerUpdateRequest:
    """Controller.Update announcing ``task_ids`` as iSulad does before Task.Create."""
    request = sandbox_pb2.ControllerUpdateRequest(sandbox_id=sandbox_id, sandboxer="kwasm", fields=["extensions.tasks"])
    request.sandbox.sandbox_id = sandbox_id
    request.sandbox.sandboxer = "kwasm"
    request.sandbox.runtime.name = "io.containerd.wasm.v1"
    request.sandbox.labels["name"] = sandbox_id
    request.sandbox.extensions["tasks"].CopyFrom(tasks_extension(task_ids, stdout))
    return request


class PodController(Protocol):
    """The Controller calls a pod needs (grpcio's :class:`SandboxerClient` or the lean :class:`WireClient`)."""

    async def create(self, request: sandbox_pb2.ControllerCreateRequest) -> sandbox_pb2.ControllerCreateResponse:
        """Controller.Create."""

    async def start(self, sandbox_id: str) -> sandbox_pb2.ControllerStartResponse:
        """Controller.Start."""

    async def update(self, request: sandbox_pb2.ControllerUpdateRequest) -> sandbox_pb2.ControllerUpdateResponse:
        """Controller.Update."""


async def start_pod(
    sandboxes: PodController, tasks: TaskClient, sandbox_id: str, bundle: Path, stdout: str = ""
) -> str:
    """Create, start and announce a sandbox, then create and start its one task; returns the task id."""
    await sandboxes.create(
        sandbox_pb2.ControllerCreateRequest(
            sandbox_id=sandbox_id, options=AnyMessage(value=pod_config(sandbox_id)), sandboxer="kwasm"
        )
    )
    await sandboxes.start(sandbox_id)
    task_id = f"{sandbox_id}-c"
    await sandboxes.update(update_request(sandbox_id, [task_id], stdout))
    await tasks.create(shim_pb2.CreateTaskRequest(id=task_id, bundle=str(bundle), stdout=stdout))
    await tasks.start(task_id)
    return task_id


def scratch_dir() -> Path:
    """A private work directory, on tmpfs (/dev/shm) when there is one, as a sandboxer's /run is."""
    shm = Path("/dev/shm")
    parent = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="kwasm-density-", dir=parent))


async def _shutdown_all(sandboxes: SandboxerClient, prefix: str, window: int) -> None:
    ids = [s.id for s in (await sandboxes.list("")).sandboxes if s.id.startswith(prefix)]

    async def worker() -> None:
        while ids:
            await sandboxes.shutdown(ids.pop())

    await asyncio.gather(*(worker() for _ in range(window)))


class _Drain:
    """Opens the read end of every stdout FIFO and throws away what arrives (on the event loop)."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.bytes = 0

    def add(self, path: Path) -> None:
        """Create the FIFO ``path`` and start draining it."""
        os.mkfifo(path, 0o600)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.fds.append(fd)
        asyncio.get_running_loop().add_reader(fd, self._read, fd)

    def _read(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            chunk = os.read(fd, 65536)
            self.bytes += len(chunk)
            if not chunk:
                asyncio.get_running_loop().remove_reader(fd)

    def close(self) -> None:
        """Stop draining and close every read end."""
        loop = asyncio.get_running_loop()
        for fd in self.fds:
            loop.remove_reader(fd)
            os.close(fd)


async def run_density(
    listen: Path,
    work: Path,
    module: Path,
    n: int,
    *,
    mode: str = "sleep",
    fifo: bool = False,
    window: int = 64,
    hold: float = 3.0,
    cleanup: bool = True,
    wait: bool = False,
    progress: Callable[[int], None] | None = None,
) -> DensityResult:
    """Start ``n`` pods on the sandboxer at ``listen``, hold them, measure, then (``cleanup``) shut them down.

    With ``wait`` every pod also keeps a long-lived Controller.Wait open, as iSulad does.
    """
    if fifo:
        raise_nofile(None)  # the read end of every FIFO stays open here
    bundle = make_bundle(work / f"bundle-{mode}", module, GUEST_ARGS[mode])
    sandboxes = SandboxerClient(listen)
    listing = await sandboxes.list("")
    tasks = await TaskClient.connect(listing.task_address)
    pods = await WireClient.connect(listen)
    sandboxer = psutil.Process(listing.pid)
    drain = _Drain()
    prefix = f"density-{os.getpid()}-{int(time.time())}"
    waits: list[asyncio.Future[object]] = []
    try:
        for index in range(WARMUP):
            await start_pod(pods, tasks, f"{prefix}-warm{index}", bundle)
        await asyncio.sleep(0.5)
        rss0, fds0 = sandboxer.memory_info().rss, sandboxer.num_fds()
        latencies: list[float] = []
        failures = 0
        next_index = 0

        async def worker() -> None:
            nonlocal next_index, failures
            while next_index < n:
                index = next_index
                next_index += 1
                stdout = ""
                if fifo:
                    path = work / f"fifo-{index}"
                    drain.add(path)
                    stdout = str(path)
                began = time.perf_counter()
                try:
                    await start_pod(pods, tasks, f"{prefix}-{index}", bundle, stdout)
                except Exception:
                    failures += 1
                    continue
                latencies.append(time.perf_counter() - began)
                if wait:
                    waits.append(asyncio.ensure_future(sandboxes.wait(f"{prefix}-{index}")))
                if progress is not None:
                    progress(1)

        cpu0, client0 = sandboxer.cpu_times(), time.process_time()
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(window, n))))
        elapsed = time.perf_counter() - began
        drained, cpu = drain.bytes, sandboxer.cpu_times()
        client_cpu = time.process_time() - client0
        server_cpu = cpu.user + cpu.system - cpu0.user - cpu0.system
        await asyncio.sleep(hold)
        drained, cpu_after = drain.bytes - drained, sandboxer.cpu_times()
        busy = (cpu_after.user + cpu_after.system - cpu.user - cpu.system) / hold
        rss1, fds1 = sandboxer.memory_info().rss, sandboxer.num_fds()
        final = await sandboxes.list("")
        running = sum(
            1 for s in final.sandboxes if s.id.startswith(prefix) and any(p.status == 2 for p in s.processes)
        ) - WARMUP
        latencies.sort()
        ok = len(latencies)
        return DensityResult(
            n=n,
            mode=mode,
            stdout="fifo" if fifo else "none",
            waits=wait,
            rss_per_sandbox_kib=round((rss1 - rss0) / max(ok, 1) / 1024, 2),
            rss_total_per_sandbox_kib=round(rss1 / max(ok, 1) / 1024, 2),
            start_per_s=round(ok / elapsed, 1),
            latency_p50_ms=round(statistics.median(latencies) * 1000, 3) if latencies else 0.0,
            latency_p99_ms=round(latencies[min(ok - 1, int(ok * 0.99))] * 1000, 3) if latencies else 0.0,
            fds_per_sandbox=round((fds1 - fds0) / max(ok, 1), 3),
            running=running,
            failures=failures,
            stdout_bytes_per_s=round(drained / hold, 1),
            held_cpu_cores=round(busy, 3),
            server_cpu_ms_per_pod=round(server_cpu * 1000 / max(ok, 1), 3),
            capacity_per_core=round(ok / server_cpu, 1) if server_cpu > 0 else 0.0,
            client_cpu_ms_per_pod=round(client_cpu * 1000 / max(ok, 1), 3),
            rss_mib=round(rss1 / (1 << 20), 1),
            fds=fds1,
        )
    finally:
        for pending in waits:
            pending.cancel()
        if cleanup:
            await _shutdown_all(sandboxes, prefix, window)
        drain.close()
        await tasks.close()
        await pods.close()
        await sandboxes.close()
