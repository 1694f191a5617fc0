"""The Task API in shim mode: the shared sandboxer's TaskService plus what containerd 1.6 expects of a shim.

On top of :class:`kwasm.sandboxer.tasks.TaskService` (reused unchanged; it mounts the request's
rootfs at ``<bundle>/rootfs`` on Create and unmounts it on Delete) this adds: containerd 1.6 has
no sandbox API, so a CRI pod's pause container becomes a sandbox its containers join (see
:mod:`kwasm.shim.pods`) and any other task gets a sandbox of its own id; Start waits for the
output FIFOs' readers; task events are published to containerd; and the process exits once its
last task is deleted and no ``start`` has promised containerd another one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from google.protobuf.empty_pb2 import Empty

from kwasm.api import events_pb2, shim_pb2
from kwasm.sandboxer.bundle import BundleError, read_config
from kwasm.sandboxer.model import CREATED, Process, Sandbox, StateStore
from kwasm.sandboxer.pbutil import timestamp
from kwasm.sandboxer.registry import SANDBOX_ID_ANNOTATION, Registry
from kwasm.sandboxer.rootfs import mount_rootfs
from kwasm.sandboxer.status import FAILED_PRECONDITION, StatusError
from kwasm.sandboxer.tasks import TaskService
from kwasm.shim.events import (
    TOPIC_CREATE,
    TOPIC_DELETE,
    TOPIC_EXEC_ADDED,
    TOPIC_EXEC_STARTED,
    TOPIC_EXIT,
    TOPIC_START,
    Publisher,
)
from kwasm.shim.layout import NamespaceLayout
from kwasm.shim.pods import PauseTask, is_pod_sandbox
from kwasm.shim.stdio import drained, hold_writers, release

log = logging.getLogger(__name__)

#: How long the sandboxer stays up without tasks before it exits (saves a restart between runs).
IDLE_GRACE = 5.0


class MemoryStateStore(StateStore):
    """No records on disk: after a crash containerd cleans up through ``containerd-shim-kwasm-v1 delete``."""

    def save(self, sandbox: Sandbox) -> None:
        """Nothing to persist."""

    def remove(self, sandbox_id: str) -> None:
        """Nothing was persisted."""

    def load_all(self) -> list[Sandbox]:
        """Nothing to recover."""
        return []


class ShimTaskService(TaskService):
    """TaskService for containerd's runtime v2 shim protocol, shared by every task of a namespace."""

    def __init__(
        self,
        registry: Registry,
        publisher: Publisher,
        layout: NamespaceLayout,
        stop_serving: Callable[[], Awaitable[None]],
        idle_grace: float = IDLE_GRACE,
    ) -> None:
        super().__init__(registry)
        self.publisher = publisher
        self.layout = layout
        self.stop_serving = stop_serving
        self.idle_grace = idle_grace
        #: CRI pause containers by id (each also a registry sandbox of that id).
        self.pods: dict[str, PauseTask] = {}
        self._creating = 0
        #: Set once a running process has exited and its output was drained (Wait answers then).
        self._draining: dict[Process, asyncio.Event] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._idle_check: asyncio.Task[None] | None = None

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        job = asyncio.ensure_future(coroutine)
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ create

    async def create(self, request: shim_pb2.CreateTaskRequest) -> shim_pb2.CreateTaskResponse:
        """Create a pause container, a container of a pod held here, or a task with a sandbox of its own."""
        self._creating += 1
        try:
            annotations = _annotations(request.bundle)
            if is_pod_sandbox(annotations):
                response = await self._create_pod(request)
            elif annotations.get(SANDBOX_ID_ANNOTATION, "") in self.pods:
                response = await super().create(request)
            else:
                response = await self._create_alone(request)
            self.layout.mark_held(request.id, True)
        finally:
            self._creating -= 1
            self.layout.release(request.id)
            self.schedule_idle_check()
        event = events_pb2.TaskCreate(container_id=request.id, bundle=request.bundle, checkpoint=request.checkpoint)
        event.rootfs.extend(request.rootfs)
        event.io.CopyFrom(
            events_pb2.TaskIO(
                stdin=request.stdin, stdout=request.stdout, stderr=request.stderr, terminal=request.terminal
            )
        )
        self.publisher.publish(request.id, TOPIC_CREATE, event)
        return response

    async def _create_alone(self, request: shim_pb2.CreateTaskRequest) -> shim_pb2.CreateTaskResponse:
        self._new_sandbox(request.id)
        self.registry.announce(request.id, [request.id])
        try:
            return await super().create(request)
        except BaseException:
            await self.registry.shutdown(request.id)
            raise

    async def _create_pod(self, request: shim_pb2.CreateTaskRequest) -> shim_pb2.CreateTaskResponse:
        self._new_sandbox(request.id)
        rootfs = Path(request.bundle) / "rootfs"
        try:
            if request.rootfs:
                mount_rootfs(request.rootfs, rootfs)
        except BundleError as exc:
            await self.registry.shutdown(request.id)
            raise StatusError(FAILED_PRECONDITION, str(exc)) from exc
        self.pods[request.id] = PauseTask(
            request.id, request.bundle, request.stdin, request.stdout, request.stderr,
            rootfs_mount=str(rootfs) if request.rootfs else "",
        )
        return shim_pb2.CreateTaskResponse(pid=0)

    def _new_sandbox(self, sandbox_id: str) -> None:
        self.registry.create(Sandbox(id=sandbox_id, created_at=time.time(), namespace=self.layout.directory.name))
        self.registry.start(sandbox_id)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, request: shim_pb2.StartRequest) -> shim_pb2.StartResponse:
        """Start the process (once its output FIFOs have readers), announce it, report its exit later."""
        pod = self.pods.get(request.id)
        if pod is not None:
            response = pod.start()
            self.publisher.publish(pod.id, TOPIC_START, events_pb2.TaskStart(container_id=pod.id, pid=0))
            return response
        task, process = self.registry.process(request.id, request.exec_id)
        held = await hold_writers([process.stdout, process.stderr]) if process.status == CREATED else {}
        try:
            response = await super().start(request)
        except BaseException:
            release(held)
            raise
        if request.exec_id:
            started = events_pb2.TaskExecStarted(container_id=task.id, exec_id=request.exec_id, pid=0)
            self.publisher.publish(task.id, TOPIC_EXEC_STARTED, started)
        else:
            self.publisher.publish(task.id, TOPIC_START, events_pb2.TaskStart(container_id=task.id, pid=0))
        drained_event = asyncio.Event()
        self._draining[process] = drained_event
        self._spawn(self._report_exit(task.id, process, held, drained_event))
        return response

    async def wait(self, request: shim_pb2.WaitRequest) -> shim_pb2.WaitResponse:
        """The exit, once the reader of the process's output has drained it."""
        pod = self.pods.get(request.id)
        if pod is not None:
            return await pod.wait()
        _task, process = self.registry.process(request.id, request.exec_id)
        response = await super().wait(request)
        drained_event = self._draining.get(process)
        if drained_event is not None:
            await drained_event.wait()
        return response

    async def _report_exit(
        self, task_id: str, process: Process, held: dict[str, int], drained_event: asyncio.Event
    ) -> None:
        try:
            await self.registry.wait_process(process)
            await drained(held)
        finally:
            release(held)
            drained_event.set()
            self._draining.pop(process, None)
        self._publish_exit(task_id, process.exec_id or task_id, process.exit_status, process.exited_at)

    def _publish_exit(self, task_id: str, process_id: str, status: int, exited_at: float | None) -> None:
        event = events_pb2.TaskExit(container_id=task_id, id=process_id, pid=0, exit_status=status)
        event.exited_at.CopyFrom(timestamp(exited_at or time.time()))
        self.publisher.publish(task_id, TOPIC_EXIT, event)

    async def kill(self, request: shim_pb2.KillRequest) -> Empty:
        """Kill a process (a pause container stops with 128 + signal)."""
        pod = self.pods.get(request.id)
        if pod is None:
            return await super().kill(request)
        if pod.kill(request.signal):
            self._publish_exit(pod.id, pod.id, pod.exit_status, pod.exited_at)
        return Empty()

    async def delete(self, request: shim_pb2.DeleteRequest) -> shim_pb2.DeleteResponse:
        """Delete the process; the init process also loses its rootfs mount and its own sandbox."""
        pod = self.pods.get(request.id)
        if pod is not None:
            response = pod.delete()
            del self.pods[pod.id]
            await self.registry.shutdown(pod.id)  # kills whatever of the pod still runs
            task_id = pod.id
        else:
            task = self.registry.task(request.id)
            response = await super().delete(request)
            if request.exec_id:
                return response
            if task.sandbox_id == task.id:
                await self.registry.shutdown(task.id)
            task_id = task.id
        self.layout.mark_held(task_id, False)
        event = events_pb2.TaskDelete(container_id=task_id, pid=0, exit_status=response.exit_status)
        event.exited_at.CopyFrom(response.exited_at)
        self.publisher.publish(task_id, TOPIC_DELETE, event)
        self.schedule_idle_check()
        return response

    # ------------------------------------------------------------------ the rest of the Task API

    async def exec(self, request: shim_pb2.ExecProcessRequest) -> Empty:
        """Exec a wasm process in a task (not in a pause container)."""
        pod = self.pods.get(request.id)
        if pod is not None:
            return pod.refuse_exec()
        response = await super().exec(request)
        added = events_pb2.TaskExecAdded(container_id=request.id, exec_id=request.exec_id)
        self.publisher.publish(request.id, TOPIC_EXEC_ADDED, added)
        return response

    async def state(self, request: shim_pb2.StateRequest) -> shim_pb2.StateResponse:
        """Status, stdio and exit of one process."""
        pod = self.pods.get(request.id)
        return pod.state() if pod is not None else await super().state(request)

    async def pids(self, request: shim_pb2.PidsRequest) -> shim_pb2.PidsResponse:
        """No OS processes."""
        pod = self.pods.get(request.id)
        return pod.pids() if pod is not None else await super().pids(request)

    async def stats(self, request: shim_pb2.StatsRequest) -> shim_pb2.StatsResponse:
        """Running guests and their memory (none for a pause container)."""
        pod = self.pods.get(request.id)
        return pod.stats() if pod is not None else await super().stats(request)

    async def close_io(self, request: shim_pb2.CloseIORequest) -> Empty:
        """Accepted."""
        pod = self.pods.get(request.id)
        return pod.accepted() if pod is not None else await super().close_io(request)

    async def resize_pty(self, request: shim_pb2.ResizePtyRequest) -> Empty:
        """Accepted (no console)."""
        pod = self.pods.get(request.id)
        return pod.accepted() if pod is not None else await super().resize_pty(request)

    async def connect(self, request: shim_pb2.ConnectRequest) -> shim_pb2.ConnectResponse:
        """The shared sandboxer's pid; no task pid."""
        if request.id in self.pods:
            request = shim_pb2.ConnectRequest()
        return await super().connect(request)

    async def shutdown(self, request: shim_pb2.ShutdownRequest) -> Empty:
        """containerd is done with one task's connection: exit if that was the last task."""
        self.schedule_idle_check()
        return Empty()

    # ------------------------------------------------------------------ exiting when idle

    def idle(self) -> bool:
        """No task, no pod, no Create in flight, no task promised to containerd."""
        return (
            not self.registry.tasks and not self.pods and not self._creating
            and not self.layout.pending_reservations()
        )

    def schedule_idle_check(self) -> None:
        """Exit after the idle grace period if nothing needs this sandboxer any more."""
        if self._idle_check is None or self._idle_check.done():
            self._idle_check = asyncio.ensure_future(self._exit_when_idle())

    async def _exit_when_idle(self) -> None:
        while True:
            await asyncio.sleep(self.idle_grace)
            if self.registry.tasks or self.pods or self._creating:
                return  # the next Delete checks again
            if not self.layout.pending_reservations():
                break
        await self.publisher.drain()
        fd = await asyncio.to_thread(self.layout.acquire_start_lock)
        try:
            # Under the election lock no `start` can hand out this socket while it goes away.
            if self.idle():
                log.info("last task gone: exiting")
                await self.stop_serving()
        finally:
            self.layout.release_start_lock(fd)


def _annotations(bundle: str) -> dict[str, Any]:
    try:
        annotations = read_config(Path(bundle)).get("annotations") or {}
    except BundleError:
        return {}  # TaskService.create reports the broken bundle
    return annotations if isinstance(annotations, dict) else {}
