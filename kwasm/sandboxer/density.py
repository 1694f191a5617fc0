"""Sandbox density benchmark: drive a sandboxer through its sockets the way iSulad does.

Each pod is Controller.Create (serialized PodSandboxConfig, empty type_url) -> Start -> Update
(extensions.tasks) -> Task.Create -> Task.Start of the demo app; ``window`` pods are in flight at
once. Afterwards the pods are held and the sandboxer's RSS and descriptors are read from /proc.
The pod path is :class:`~kwasm.sandboxer.podpump.PodPump`: the lean :class:`WireClient` for gRPC
(grpcio's client would cost the 2-core machine as much CPU as the sandboxer itself) and the ttrpc
client, every call sent from the callback of the answer before it; the sandboxer's CPU per pod is
read from /proc/<pid>/stat around the start phase and reported with the capacity per core it implies.
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

from kwasm.api import sandbox_pb2, shim_pb2
from kwasm.errors import SandboxerError
from kwasm.sandboxer.client import SandboxerClient, TaskClient
from kwasm.sandboxer.daemon import raise_nofile
from kwasm.sandboxer.launch import make_bundle
from kwasm.sandboxer.podpump import PodPump, PodRequests, Requests, create_request, update_request
from kwasm.sandboxer.ttrpc import TtrpcClient
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


class PodController(Protocol):
    """The Controller calls a pod needs (grpcio's :class:`SandboxerClient`)."""

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
    await sandboxes.create(create_request(sandbox_id))
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
    tasks = await TtrpcClient.connect(listing.task_address)
    pods = await WireClient.connect(listen)
    pump = PodPump(pods, tasks, listing.task_address)
    templates = PodRequests(str(bundle))
    sandboxer = psutil.Process(listing.pid)
    drain = _Drain()
    prefix = f"density-{os.getpid()}-{int(time.time())}"
    waits: list[asyncio.Future[object]] = []

    def templates_of(sandbox_id: str) -> tuple[str, Requests]:
        return sandbox_id, templates(sandbox_id)

    try:
        warm = iter(range(WARMUP))
        await pump.run(lambda: next((templates_of(f"{prefix}-warm{i}") for i in warm), None), 1)
        if pump.failures:
            raise SandboxerError(f"warm-up pods failed: {pump.failures[0]}")
        await asyncio.sleep(0.5)
        rss0, fds0 = sandboxer.memory_info().rss, sandboxer.num_fds()
        latencies: list[float] = []
        indices = iter(range(n))

        def next_pod() -> tuple[str, Requests] | None:
            index = next(indices, None)
            if index is None:
                return None
            sandbox_id = f"{prefix}-{index}"
            if not fifo:
                return templates_of(sandbox_id)
            path = work / f"fifo-{index}"
            drain.add(path)
            return sandbox_id, PodRequests(str(bundle), str(path)).build(sandbox_id)

        def started(sandbox_id: str, seconds: float) -> None:
            latencies.append(seconds)
            if wait:
                waits.append(asyncio.ensure_future(sandboxes.wait(sandbox_id)))
            if progress is not None:
                progress(1)

        cpu0, client0 = sandboxer.cpu_times(), time.process_time()
        began = time.perf_counter()
        await pump.run(next_pod, min(window, n), started)
        if not pump.connected:
            raise SandboxerError(f"the sandboxer hung up after {len(latencies)} pods: {pump.failures[-1:]}")
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
            failures=len(pump.failures),
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
