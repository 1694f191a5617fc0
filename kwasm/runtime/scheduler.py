"""One scheduler thread: runs many guests cooperatively, waking only those that are due.

Each guest's ``_start`` is a wasmtime call future. A guest runs until it suspends in an async host
call (a sleep, a read on an empty pipe, a write to a full FIFO, ``sched_yield``) or until an epoch
tick makes it yield. The thread then waits in ``epoll`` for the earliest timer, a readable stdin, a
writable FIFO, or a message from another thread (a new guest, a kill, stop). Timers live in a
native heap (:class:`kwasm.runtime._native.TimerHeap`), so an idle guest costs no CPU at all, and a
guest that wakes from a plain sleep, runs and sleeps again never enters Python: the heap runs it
and its next ``poll_oneoff`` is answered natively. Python sees only what needs it: a guest that
finished, timed out, yielded on an epoch tick or waits on a Python continuation.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import threading
import time
from typing import Protocol

from kwasm.runtime import _native
from kwasm.runtime.cells import GuestCell
from kwasm.runtime.guest import ExitReason

log = logging.getLogger(__name__)


class Task(Protocol):
    """What the scheduler needs from a guest."""

    #: Unique among the tasks of one scheduler (the key of its cell).
    id: int
    cell: GuestCell

    def run_slice(self) -> bool:
        """Poll the guest once; True when it has finished (then :meth:`conclude` is called)."""

    def conclude(self) -> None:
        """Record the exit of a guest whose last slice (run here or natively) finished it, and clean up."""

    def abort(self, reason: ExitReason) -> None:
        """Stop a guest that is not running right now (killed, timed out, or failed in the host)."""


class Scheduler:
    """A thread multiplexing guests; every method except the ``*_later`` ones runs on that thread."""

    def __init__(self, name: str) -> None:
        self._inbox: collections.deque[tuple[str, Task, ExitReason | float | None]] = collections.deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._timers = _native.TimerHeap()
        self._runnable: collections.deque[Task] = collections.deque()
        self._fd_waiters: dict[int, list[tuple[int, Task]]] = {}
        self._tasks: dict[int, Task] = {}
        self._stopping = False
        self._sleeping = False  # in epoll_wait: only then does a poster need to signal the eventfd
        self._signaled = False  # an eventfd signal is on its way: later posters need not send another
        # Each counter has one writer (``load`` = their difference): callers of start_later, which the
        # engine serializes, and this thread. A shared ``+=``/``-=`` could lose updates across threads.
        self._started = 0
        self._reaped = 0
        #: When a list: every timer wake-up appends its lag (seconds from due time to resumption).
        self.wake_lags: list[float] | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- called from any thread -------------------------------------------------------------
    def start_later(self, task: Task, timeout: float | None) -> None:
        """Hand a freshly instantiated guest to this thread (callers must not race each other)."""
        self._started += 1
        self._post("start", task, timeout)

    def kill_later(self, task: Task, reason: ExitReason) -> None:
        """Ask this thread to stop ``task`` (it yields within one epoch tick if it is running)."""
        self._post("kill", task, reason)

    @property
    def load(self) -> int:
        """Guests assigned to this scheduler and not yet reaped (read by the engine to balance load)."""
        return self._started - self._reaped

    @property
    def is_current(self) -> bool:
        """Whether the calling code runs on this scheduler thread (e.g. inside an on_exit callback)."""
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        """Kill every guest, end the thread and wait for it."""
        self._stopping = True
        self._signal()
        self._thread.join()

    def _post(self, op: str, task: Task, arg: ExitReason | float | None) -> None:
        self._inbox.append((op, task, arg))
        # Read after the append: a scheduler about to sleep re-checks the inbox. One signal per sleep
        # is enough (a burst of starts costs one eventfd write, not one each).
        if self._sleeping and not self._signaled:
            self._signaled = True
            self._signal()

    def _signal(self) -> None:
        with contextlib.suppress(BlockingIOError):  # counter saturated: a wake-up is pending anyway
            os.eventfd_write(self._wake_fd, 1)

    # ---- called on the scheduler thread by host functions ----------------------------------
    def suspend(self, task: Task, deadline: float | None, fd: int | None, *, writable: bool = False) -> None:
        """Park ``task`` until ``deadline`` (monotonic) or until ``fd`` is readable (writable if ``writable``).

        An fd is waited on in one direction only (stdin for reading, a FIFO stdout/stderr for writing);
        errors and hang-ups wake its waiters too, so a write end whose reader left is woken.
        """
        seq = task.cell.new_wait()
        if deadline is not None:
            self._timers.push(deadline, seq, task.id, task.cell.address)
        if fd is not None:
            waiters = self._fd_waiters.get(fd)
            if waiters is None:
                self._fd_waiters[fd] = [(seq, task)]
                self._epoll.register(fd, select.EPOLLOUT if writable else select.EPOLLIN)
            else:
                waiters.append((seq, task))

    def release_fd(self, fd: int) -> None:
        """Forget every wait on ``fd`` before its owner closes it."""
        if self._fd_waiters.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    # ---- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        self._timers.bind()  # this thread's guests queue their sleeps on it natively
        try:
            while not self._stopping:
                self._drain_inbox()
                self._wake_due_timers()
                for _ in range(len(self._runnable)):
                    self._run_one(self._runnable.popleft())
                self._wait_for_events()
        finally:
            self._timers.unbind()
            self._drain_inbox()
            for task in list(self._tasks.values()):
                task.abort(ExitReason.KILLED)
            self._epoll.close()
            os.close(self._wake_fd)

    def _drain_inbox(self) -> None:
        while self._inbox:
            op, task, arg = self._inbox.popleft()
            if op == "start":
                self._tasks[task.id] = task
                self._timers.adopt(task.cell.address)
                self._runnable.append(task)
                if isinstance(arg, (int, float)):  # GuestSpec.timeout: an int of seconds is fine too
                    self._timers.push_timeout(time.monotonic() + arg, task.id)
            elif self._tasks.get(task.id) is task and isinstance(arg, ExitReason):
                self._reap(task, arg)

    def _reap(self, task: Task, reason: ExitReason) -> None:
        del self._tasks[task.id]
        self._reaped += 1
        task.abort(reason)

    def _wake_due_timers(self) -> None:
        tasks = self._tasks
        for kind, task_id in self._timers.run_due(time.monotonic(), self.wake_lags):
            task = tasks.get(task_id)
            if task is None:
                continue
            if kind == _native.RUNNABLE:
                self._runnable.append(task)
            elif kind == _native.FINISHED:
                self._conclude(task)
            else:
                self._reap(task, ExitReason.TIMEOUT)

    def _conclude(self, task: Task) -> None:
        del self._tasks[task.id]
        self._reaped += 1
        try:
            task.conclude()
        except Exception:  # a host-side bug must not end the thread that runs every other guest
            log.exception("guest %r failed on scheduler thread %s", task, self._thread.name)
            task.abort(ExitReason.TRAPPED)

    def _run_one(self, task: Task) -> None:
        if self._tasks.get(task.id) is not task:
            return
        seq = task.cell.wait
        try:
            finished = task.run_slice()
        except Exception:  # a host-side bug must not end the thread that runs every other guest
            log.exception("guest %r failed on scheduler thread %s", task, self._thread.name)
            self._reap(task, ExitReason.TRAPPED)
            return
        if finished:
            self._conclude(task)
        elif task.cell.wait == seq:  # no new wait registered: it yielded on an epoch tick
            self._runnable.append(task)

    def _wait_for_events(self) -> None:
        self._sleeping = True
        if self._runnable or self._inbox or self._stopping:
            timeout = 0.0
        elif (due := self._timers.next_due()) is not None:
            timeout = max(0.0, due - time.monotonic())
        else:
            timeout = -1.0
        events = self._epoll.poll(timeout)
        self._sleeping = False
        self._signaled = False  # cleared before the inbox is drained (next loop turn)
        for fd, _events in events:
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
                continue
            self._epoll.unregister(fd)
            for seq, task in self._fd_waiters.pop(fd, []):
                if seq == task.cell.wait and not task.cell.is_set() and self._tasks.get(task.id) is task:
                    task.cell.set()
                    self._runnable.append(task)
