"""The ttrpc ``containerd.task.v2.Task`` service: one server for every sandbox, each call routed by id.

Tasks have no OS process: ``pid`` is always 0 and State reports CREATED -> RUNNING -> STOPPED from
the engine. Pause, Resume, Checkpoint and Update are not registered, so the server answers them
with UNIMPLEMENTED (12); so do Exec of a process that names no wasm module and Create of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from kwasm import __version__
from kwasm.api import shim_pb2
from kwasm.errors import KwasmError
from kwasm.sandboxer.bundle import BundleError, TaskIO, guest_spec, read_config
from kwasm.sandboxer.model import RUNNING, Process, Task, valid_id
from kwasm.sandboxer.pbutil import metrics_any, timestamp
from kwasm.sandboxer.registry import Registry
from kwasm.sandboxer.rootfs import mount_rootfs, unmount_rootfs
from kwasm.sandboxer.status import (
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    UNIMPLEMENTED,
    StatusError,
)
from kwasm.sandboxer.ttrpc import TtrpcServer

SERVICE = "containerd.task.v2.Task"
RequestT = TypeVar("RequestT", bound=Message)


def _bundle_failure(exc: BundleError) -> StatusError:
    if exc.not_wasm:
        return StatusError(UNIMPLEMENTED, f"only wasm processes run in this sandboxer: {exc}")
    return StatusError(INVALID_ARGUMENT, str(exc))


class TaskService:
    """Handlers of the Task API on top of a :class:`Registry`."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def register(self, server: TtrpcServer) -> None:
        """Route every implemented Task method of ``server`` here."""
        routes: dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message]]]] = {
            "Create": (shim_pb2.CreateTaskRequest, self.create),
            "Start": (shim_pb2.StartRequest, self.start),
            "State": (shim_pb2.StateRequest, self.state),
            "Wait": (shim_pb2.WaitRequest, self.wait),
            "Kill": (shim_pb2.KillRequest, self.kill),
            "Delete": (shim_pb2.DeleteRequest, self.delete),
            "Exec": (shim_pb2.ExecProcessRequest, self.exec),
            "Pids": (shim_pb2.PidsRequest, self.pids),
            "Stats": (shim_pb2.StatsRequest, self.stats),
            "Connect": (shim_pb2.ConnectRequest, self.connect),
            "Shutdown": (shim_pb2.ShutdownRequest, self.shutdown),
            "CloseIO": (shim_pb2.CloseIORequest, self.close_io),
            "ResizePty": (shim_pb2.ResizePtyRequest, self.resize_pty),
        }
        for method, (request_type, handler) in routes.items():
            server.register(SERVICE, method, _typed(request_type, handler))

    async def _prepare(
        self, bundle: Path, config: dict[str, Any] | None, io: TaskIO, process: dict[str, Any] | None
    ) -> Process:
        try:
            config = config if config is not None else read_config(bundle)
            spec, info = guest_spec(bundle, config, io, process, self.registry.compiled)
        except BundleError as exc:
            raise _bundle_failure(exc) from exc
        try:
            info = await self.registry.load_module(spec.module, info)
        except (KwasmError, OSError) as exc:
            raise StatusError(INVALID_ARGUMENT, f"cannot load {spec.module}: {exc}") from exc
        return Process(exec_id="", stdin=io.stdin, stdout=io.stdout, stderr=io.stderr, spec=spec, module_stat=info)

    async def create(self, request: shim_pb2.CreateTaskRequest) -> shim_pb2.CreateTaskResponse:
        """Read the bundle, compile its module and register the task (not started)."""
        if request.checkpoint:
            raise StatusError(UNIMPLEMENTED, "checkpoint restore is not supported for wasm tasks")
        bundle = Path(request.bundle)
        try:
            config = read_config(bundle)
        except BundleError as exc:
            raise _bundle_failure(exc) from exc
        annotations = config.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise StatusError(INVALID_ARGUMENT, "annotations in config.json is not an object")
        self.registry.sandbox_of_new_task(request.id, annotations)
        mounted = ""
        if request.rootfs:
            try:
                mount_rootfs(request.rootfs, bundle / "rootfs")
            except BundleError as exc:
                raise StatusError(FAILED_PRECONDITION, str(exc)) from exc
            mounted = str(bundle / "rootfs")
        try:
            io = TaskIO(request.stdin, request.stdout, request.stderr)
            process = await self._prepare(bundle, config, io, None)
            process.terminal = request.terminal
            sandbox = self.registry.sandbox_of_new_task(request.id, annotations)
        except BaseException:
            if mounted:
                unmount_rootfs(Path(mounted))
            raise
        task = Task(request.id, sandbox.id, str(bundle), process, rootfs_mount=mounted)
        self.registry.add_task(sandbox, task)
        return shim_pb2.CreateTaskResponse(pid=0)

    async def exec(self, request: shim_pb2.ExecProcessRequest) -> Empty:
        """Add another wasm process to a running task (its spec must name a wasm module).

        Exec processes are killed when the task's init process exits, as runc's are.
        """
        task = self.registry.task(request.id)
        if not valid_id(request.exec_id):
            raise StatusError(INVALID_ARGUMENT, f"invalid exec id {request.exec_id!r}")
        if task.process(request.exec_id) is not None:
            raise StatusError(ALREADY_EXISTS, f"exec {request.exec_id} already exists")
        if task.init.status != RUNNING:
            raise StatusError(FAILED_PRECONDITION, f"task {task.id} is not running")
        try:
            spec = json.loads(request.spec.value or b"{}")
        except ValueError as exc:
            raise StatusError(INVALID_ARGUMENT, f"exec spec is not JSON: {exc}") from exc
        if not isinstance(spec, dict):
            raise StatusError(INVALID_ARGUMENT, "exec spec is not a JSON object")
        io = TaskIO(request.stdin, request.stdout, request.stderr)
        process = await self._prepare(Path(task.bundle), None, io, spec)
        process.exec_id = request.exec_id
        process.terminal = request.terminal
        if task.process(request.exec_id) is not None:  # the checks again: the module load awaited
            raise StatusError(ALREADY_EXISTS, f"exec {request.exec_id} already exists")
        if task.init.status != RUNNING or self.registry.tasks.get(task.id) is not task:
            raise StatusError(FAILED_PRECONDITION, f"task {task.id} is not running")
        task.execs = {**(task.execs or {}), request.exec_id: process}
        self.registry.save(task.sandbox_id)
        return Empty()

    async def start(self, request: shim_pb2.StartRequest) -> shim_pb2.StartResponse:
        """Start the init process or an exec process on the engine."""
        task, process = self.registry.process(request.id, request.exec_id)
        if process is not task.init and task.init.status != RUNNING:
            raise StatusError(FAILED_PRECONDITION, f"task {task.id} is not running")
        try:
            self.registry.start_process(task, process)
        except KwasmError as exc:
            raise StatusError(FAILED_PRECONDITION, f"cannot start {request.id}: {exc}") from exc
        return shim_pb2.StartResponse(pid=0)

    async def state(self, request: shim_pb2.StateRequest) -> shim_pb2.StateResponse:
        """Status, stdio and exit of one process."""
        task, process = self.registry.process(request.id, request.exec_id)
        response = shim_pb2.StateResponse(
            id=task.id,
            bundle=task.bundle,
            pid=0,
            status=process.status,  # type: ignore[arg-type]
            stdin=process.stdin,
            stdout=process.stdout,
            stderr=process.stderr,
            terminal=process.terminal,
            exit_status=process.exit_status,
            exec_id=process.exec_id,
        )
        if process.exited_at is not None:
            response.exited_at.CopyFrom(timestamp(process.exited_at))
        return response

    async def wait(self, request: shim_pb2.WaitRequest) -> shim_pb2.WaitResponse:
        """Return once the process has stopped, with its exit status and time."""
        _task, process = self.registry.process(request.id, request.exec_id)
        await self.registry.wait_process(process)
        return shim_pb2.WaitResponse(
            exit_status=process.exit_status, exited_at=timestamp(process.exited_at or 0.0)
        )

    async def kill(self, request: shim_pb2.KillRequest) -> Empty:
        """Kill one process (with ``all``, every process of the task); any signal kills a wasm guest.

        Signal 0 only checks that the process exists; killing a stopped process is a no-op.
        """
        task, process = self.registry.process(request.id, request.exec_id)
        if request.signal == 0:
            return Empty()
        for target in task.processes() if request.all else [process]:
            self.registry.kill_process(task, target)
        return Empty()

    async def delete(self, request: shim_pb2.DeleteRequest) -> shim_pb2.DeleteResponse:
        """Forget a stopped process; returns its exit status and time."""
        task, process = self.registry.process(request.id, request.exec_id)
        self.registry.delete_process(task, process)
        response = shim_pb2.DeleteResponse(pid=0, exit_status=process.exit_status)
        if process.exited_at is not None:
            response.exited_at.CopyFrom(timestamp(process.exited_at))
        return response

    async def pids(self, request: shim_pb2.PidsRequest) -> shim_pb2.PidsResponse:
        """Wasm guests have no OS process: the list is empty for a known task."""
        self.registry.task(request.id)
        return shim_pb2.PidsResponse()

    async def stats(self, request: shim_pb2.StatsRequest) -> shim_pb2.StatsResponse:
        """Running guests and their linear memory, as cgroup v2 Metrics."""
        task = self.registry.task(request.id)
        running = [p for p in task.processes() if p.guest is not None]
        memory = sum(p.guest.memory_bytes() for p in running)
        limit = task.init.spec.memory_limit if task.init.spec is not None else None
        return shim_pb2.StatsResponse(stats=metrics_any(len(running), memory, limit or 0))

    async def connect(self, request: shim_pb2.ConnectRequest) -> shim_pb2.ConnectResponse:
        """The sandboxer's pid (it is the shim of every task); the task itself has none."""
        if request.id:
            self.registry.task(request.id)
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=0, version=__version__)

    async def shutdown(self, request: shim_pb2.ShutdownRequest) -> Empty:
        """Accepted and ignored: the shared task server lives as long as the sandboxer."""
        return Empty()

    async def close_io(self, request: shim_pb2.CloseIORequest) -> Empty:
        """Accepted: stdin FIFOs are owned by the guest and close when it exits."""
        self.registry.process(request.id, request.exec_id)
        return Empty()

    async def resize_pty(self, request: shim_pb2.ResizePtyRequest) -> Empty:
        """No-op: wasm guests have no console."""
        self.registry.process(request.id, request.exec_id)
        return Empty()


def _typed(
    request_type: type[RequestT], handler: Callable[[RequestT], Awaitable[Message]]
) -> Callable[[bytes], Awaitable[bytes]]:
    async def call(payload: bytes) -> bytes:
        request = request_type()
        request.ParseFromString(payload)
        response = await handler(request)
        return response.SerializeToString()

    return call
