"""The sandboxer's core: sandboxes and tasks in memory, their lifecycle, persistence and recovery.

Both protocol layers (the gRPC Controller and the ttrpc Task service) call into :class:`Registry`;
it talks to the wasm engine only through :class:`GuestEngine` (load a module, start a guest, get
its exit), so another engine fits behind the same protocols. Everything runs on the asyncio loop;
exits arrive from the engine's scheduler threads through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from kwasm.runtime.guest import EXIT_KILLED, ExitReason, GuestExit, GuestSpec
from kwasm.sandboxer.bundle import CriLogWriter
from kwasm.sandboxer.model import (
    CREATED,
    EXIT_SANDBOXER_LOST,
    RUNNING,
    SANDBOX_READY,
    SANDBOX_STOPPED,
    STOPPED,
    Process,
    Sandbox,
    StateStore,
    Task,
    valid_id,
)
from kwasm.sandboxer.rootfs import unmount_rootfs
from kwasm.sandboxer.status import (
    ALREADY_EXISTS,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    StatusError,
)

log = logging.getLogger(__name__)

#: How long Stop waits for killed guests when the caller gives no timeout.
DEFAULT_STOP_TIMEOUT = 10.0
#: The CRI annotation naming a container's sandbox (containerd and iSulad set it in config.json).
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"


class GuestHandle(Protocol):
    """What the sandboxer needs of a running guest."""

    def kill(self) -> None:
        """Stop the guest; its exit is reported through on_exit."""

    def memory_bytes(self) -> int:
        """Bytes of linear memory the guest holds now."""


class GuestEngine(Protocol):
    """What the sandboxer needs of a wasm engine."""

    def load(self, module: Path) -> None:
        """Compile and cache ``module`` (raises on invalid wasm)."""

    def start(
        self,
        spec: GuestSpec,
        on_exit: Callable[[GuestExit], None] | None = None,
        *,
        module_stat: os.stat_result | None = None,
    ) -> GuestHandle:
        """Start a guest; ``on_exit`` is called from an engine thread when it ends."""

    def close(self) -> None:
        """Stop every guest and release the engine."""


def _resolve(waiters: list[asyncio.Future[None]] | None) -> None:
    for waiter in waiters or ():
        if not waiter.done():
            waiter.set_result(None)


class Registry:
    """All sandboxes and tasks of one sandboxer, keyed by id."""

    def __init__(self, store: StateStore, engine: GuestEngine, task_address: str) -> None:
        self.store = store
        self.engine = engine
        self.task_address = task_address
        self.sandboxes: dict[str, Sandbox] = {}
        self.tasks: dict[str, Task] = {}
        #: Task ids announced by Controller.Update (extensions.tasks) -> their sandbox id.
        self.announced: dict[str, str] = {}
        self._loaded: set[tuple[str, int, int]] = set()
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ lookup

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """The sandbox of that id, else NOT_FOUND."""
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            if not sandbox_id:
                raise StatusError(INVALID_ARGUMENT, "sandbox id is empty")
            raise StatusError(NOT_FOUND, f"sandbox {sandbox_id} not found")
        return sandbox

    def task(self, task_id: str) -> Task:
        """The task of that id, else NOT_FOUND."""
        task = self.tasks.get(task_id)
        if task is None:
            if not task_id:
                raise StatusError(INVALID_ARGUMENT, "task id is empty")
            raise StatusError(NOT_FOUND, f"task {task_id} not found")
        return task

    def process(self, task_id: str, exec_id: str) -> tuple[Task, Process]:
        """A task and one of its processes, else NOT_FOUND."""
        task = self.task(task_id)
        process = task.process(exec_id)
        if process is None:
            raise StatusError(NOT_FOUND, f"exec {exec_id} of task {task_id} not found")
        return task, process

    def save(self, sandbox_id: str) -> None:
        """Persist one sandbox (no-op once it is shut down)."""
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is not None:
            self.store.save(sandbox)

    # ------------------------------------------------------------------ sandboxes

    def create(self, sandbox: Sandbox) -> None:
        """Register and persist a new sandbox (Controller.Create)."""
        if not valid_id(sandbox.id):
            raise StatusError(INVALID_ARGUMENT, f"invalid sandbox id {sandbox.id!r}")
        if sandbox.id in self.sandboxes:
            raise StatusError(ALREADY_EXISTS, f"sandbox {sandbox.id} already exists")
        self.sandboxes[sandbox.id] = sandbox
        try:
            self.store.save(sandbox)
        except OSError:  # nothing of it was persisted
            del self.sandboxes[sandbox.id]
            raise

    def start(self, sandbox_id: str) -> Sandbox:
        """Make a created sandbox ready (Controller.Start); starting a ready one is a no-op."""
        sandbox = self.sandbox(sandbox_id)
        if sandbox.state == SANDBOX_STOPPED:
            raise StatusError(FAILED_PRECONDITION, f"sandbox {sandbox_id} is stopped")
        # Not persisted: recovery reports every sandbox stopped, created or ready alike.
        sandbox.state = SANDBOX_READY
        return sandbox

    def announce(self, sandbox_id: str, task_ids: list[str]) -> None:
        """Record the tasks iSulad announced with Update(extensions.tasks)."""
        sandbox = self.sandbox(sandbox_id)
        for task_id in sandbox.announced:
            if self.announced.get(task_id) == sandbox_id:
                del self.announced[task_id]
        sandbox.announced = tuple(task_ids)
        for task_id in task_ids:
            self.announced[task_id] = sandbox_id

    async def stop(self, sandbox_id: str, timeout: float | None) -> Sandbox:
        """Kill the sandbox's running guests, wait up to ``timeout`` for them, mark it stopped."""
        sandbox = self.sandbox(sandbox_id)
        await self._kill_all(sandbox, timeout or DEFAULT_STOP_TIMEOUT)
        if sandbox.state != SANDBOX_STOPPED:
            sandbox.state = SANDBOX_STOPPED
            sandbox.exit_status = 0
            sandbox.exited_at = time.time()
            self.save(sandbox_id)
        _resolve(sandbox.waiters)
        sandbox.waiters = None
        return sandbox

    async def wait(self, sandbox_id: str) -> Sandbox:
        """Return once the sandbox is stopped (or shut down)."""
        sandbox = self.sandbox(sandbox_id)
        if sandbox.state != SANDBOX_STOPPED:
            waiter: asyncio.Future[None] = self._loop.create_future()
            sandbox.waiters = [*(sandbox.waiters or ()), waiter]
            try:
                await waiter
            finally:
                if sandbox.waiters and waiter in sandbox.waiters:
                    sandbox.waiters.remove(waiter)
        return sandbox

    async def shutdown(self, sandbox_id: str) -> None:
        """Kill what still runs and remove every trace of the sandbox (Controller.Shutdown)."""
        sandbox = self.sandbox(sandbox_id)
        await self._kill_all(sandbox, DEFAULT_STOP_TIMEOUT)
        if sandbox.state != SANDBOX_STOPPED:
            sandbox.state = SANDBOX_STOPPED
            sandbox.exited_at = time.time()
        for task_id, task in sandbox.tasks.items():
            self.tasks.pop(task_id, None)
            if task.rootfs_mount:
                unmount_rootfs(Path(task.rootfs_mount))
        for task_id in sandbox.announced:
            if self.announced.get(task_id) == sandbox_id:
                del self.announced[task_id]
        if self.sandboxes.get(sandbox_id) is sandbox:  # not already gone (or re-created) meanwhile
            del self.sandboxes[sandbox_id]
            self.store.remove(sandbox_id)
            self.store.settle(self.sandboxes.values())
        _resolve(sandbox.waiters)
        sandbox.waiters = None

    def memory_bytes(self, sandbox: Sandbox) -> int:
        """Linear memory held by the sandbox's running guests."""
        total = 0
        for task in sandbox.tasks.values():
            for process in task.processes():
                if process.guest is not None:
                    total += process.guest.memory_bytes()
        return total

    async def _kill_all(self, sandbox: Sandbox, timeout: float) -> None:
        running = [p for task in sandbox.tasks.values() for p in task.processes() if p.status == RUNNING]
        for task in sandbox.tasks.values():
            for process in task.processes():
                self.kill_process(task, process)
        waits = [asyncio.ensure_future(self.wait_process(process)) for process in running]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=timeout)
            for future in pending:
                future.cancel()

    # ------------------------------------------------------------------ tasks and processes

    def sandbox_of_new_task(self, task_id: str, annotations: dict[str, str]) -> Sandbox:
        """The ready sandbox a new task belongs to: announced by Update, else named by annotation."""
        if not valid_id(task_id):
            raise StatusError(INVALID_ARGUMENT, f"invalid task id {task_id!r}")
        if task_id in self.tasks:
            raise StatusError(ALREADY_EXISTS, f"task {task_id} already exists")
        sandbox_id = self.announced.get(task_id) or annotations.get(SANDBOX_ID_ANNOTATION, "")
        if not sandbox_id:
            raise StatusError(
                FAILED_PRECONDITION,
                f"task {task_id} belongs to no sandbox: announce it with Controller.Update "
                f"(extensions.tasks) or set the {SANDBOX_ID_ANNOTATION} annotation",
            )
        sandbox = self.sandbox(sandbox_id)
        if sandbox.state != SANDBOX_READY:
            raise StatusError(FAILED_PRECONDITION, f"sandbox {sandbox_id} is not ready")
        return sandbox

    def compiled(self, module: str, info: os.stat_result) -> bool:
        """Whether the engine has compiled ``module`` at this mtime and size."""
        return (module, info.st_mtime_ns, info.st_size) in self._loaded

    async def load_module(self, module: Path, info: os.stat_result | None = None) -> os.stat_result:
        """Have the engine compile ``module`` once per (path, mtime, size); compiles run off the loop.

        ``info`` is the module's stat if the caller has it at hand; returns the stat used (the task's
        start hands it to the engine, which then need not take it again).
        """
        info = info or module.stat()
        key = (str(module), info.st_mtime_ns, info.st_size)
        if key not in self._loaded:
            await asyncio.to_thread(self.engine.load, module)
            self._loaded.add(key)
        return info

    def add_task(self, sandbox: Sandbox, task: Task) -> None:
        """Attach a created task to its sandbox and persist."""
        sandbox.tasks[task.id] = task
        self.tasks[task.id] = task
        self.store.save(sandbox)

    def start_process(self, task: Task, process: Process) -> None:
        """Start a created process on the engine."""
        if process.status != CREATED or process.spec is None:
            raise StatusError(FAILED_PRECONDITION, f"process {task.id}/{process.exec_id} is not created")
        loop = self._loop

        def on_exit(exit: GuestExit) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the sandboxer is exiting
                loop.call_soon_threadsafe(self._exited, task, process, exit)

        process.guest = self.engine.start(process.spec, on_exit, module_stat=process.module_stat)
        process.status = RUNNING
        process.started_at = time.time()
        # Not persisted: recovery reports created and running processes alike as stopped.

    def _exited(self, task: Task, process: Process, exit: GuestExit) -> None:
        if process.spec is not None:
            for stream in (process.spec.stdout, process.spec.stderr):
                if isinstance(stream.callback, CriLogWriter):
                    stream.callback.flush()
        process.status = STOPPED
        process.exit_status = exit.code & 0xFFFFFFFF
        process.exited_at = exit.exited_at
        process.guest = None
        process.spec = None
        self.save(task.sandbox_id)
        _resolve(process.waiters)
        process.waiters = None
        if process is task.init:  # as with runc, a container's exec processes die with its init
            for other in task.processes()[1:]:
                self.kill_process(task, other)

    def kill_process(self, task: Task, process: Process) -> None:
        """Kill a running guest; a created one is marked stopped as killed; a stopped one is left."""
        if process.status == STOPPED:
            return
        if process.status == RUNNING:
            process.guest.kill()
            return
        self._exited(task, process, GuestExit(EXIT_KILLED, ExitReason.KILLED, "killed before start", time.time()))

    async def wait_process(self, process: Process) -> Process:
        """Return once the process is stopped."""
        if process.status != STOPPED:
            waiter: asyncio.Future[None] = self._loop.create_future()
            process.waiters = [*(process.waiters or ()), waiter]
            try:
                await waiter
            finally:
                if process.waiters and waiter in process.waiters:
                    process.waiters.remove(waiter)
        return process

    def delete_process(self, task: Task, process: Process) -> None:
        """Forget a stopped or never-started process; deleting the init process deletes the task."""
        if process.status == RUNNING:
            raise StatusError(FAILED_PRECONDITION, f"process {task.id}/{process.exec_id} is running")
        sandbox = self.sandboxes.get(task.sandbox_id)
        if process.exec_id:
            if task.execs is not None:
                task.execs.pop(process.exec_id, None)
        else:
            if any(p.status == RUNNING for p in task.processes()):
                raise StatusError(FAILED_PRECONDITION, f"task {task.id} has running exec processes")
            self.tasks.pop(task.id, None)
            if sandbox is not None:
                sandbox.tasks.pop(task.id, None)
            if task.rootfs_mount:
                unmount_rootfs(Path(task.rootfs_mount))
        if sandbox is not None:
            self.store.save(sandbox)

    # ------------------------------------------------------------------ recovery

    def recover(self) -> int:
        """Reload every persisted sandbox; what was running is reported stopped (exit 137, now)."""
        now = time.time()
        count = 0
        for sandbox in self.store.load_all():
            changed = False
            for task in sandbox.tasks.values():
                for process in task.processes():
                    if process.status != STOPPED:
                        process.status = STOPPED
                        process.exit_status = EXIT_SANDBOXER_LOST
                        process.exited_at = now
                        changed = True
                self.tasks[task.id] = task
            if sandbox.state != SANDBOX_STOPPED:
                sandbox.state = SANDBOX_STOPPED
                sandbox.exit_status = EXIT_SANDBOXER_LOST
                sandbox.exited_at = now
                changed = True
            for task_id in sandbox.announced:
                self.announced[task_id] = sandbox.id
            self.sandboxes[sandbox.id] = sandbox
            if changed:
                self.store.save(sandbox)
            count += 1
        return count

    def close(self) -> None:
        """Release the engine (guests die with it; their records stay as they are on disk)."""
        self.engine.close()
