"""One scheduler thread: runs many guests cooperatively, waking only those that are due.

Each guest's ``_start`` is a wasmtime call future. A guest runs until it suspends in an async host
call (a sleep, a read on an empty pipe, a write to a full FIFO, ``sched_yield``) or until an epoch
tick makes it yield. The thread then waits in ``epoll`` for the earliest timer, a readable stdin, a
writable FIFO, or a message from another thread (a new guest, a kill, stop). Timers live in a heap,
so an idle guest costs no CPU at all.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import math
import os
import select
import threading
import time
from typing import Protocol

from kwasm.runtime.cells import MEMORY, ReadyFlag
from kwasm.runtime.guest import ExitReason

log = logging.getLogger(__name__)


class Task(Protocol):
    """What the scheduler needs from a guest."""

    #: Unique among the tasks of one scheduler.
    id: int
    wait_seq: int
    ready_flag: ReadyFlag

    def run_slice(self) -> bool:
        """Poll the guest once; True when it has finished (and has been cleaned up)."""

    def abort(self, reason: ExitReason) -> None:
        """Stop a guest that is not running right now (killed, timed out, or failed in the host)."""


_TIMEOUT = -1  # the sequence number of a heap entry that enforces GuestSpec.timeout


class Scheduler:
    """A thread multiplexing guests; every method except the ``*_later`` ones runs on that thread."""

    def __init__(self, name: str) -> None:
        self._inbox: collections.deque[tuple[str, Task, ExitReason | float | None]] = collections.deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        # Timers: a heap of distinct due times (plain floats compare fastest) and, per due time, the
        # wait it ends as ``(wait_seq, task id)``. Entries hold only numbers: Python's cyclic GC stops
        # tracking them, so many pending sleeps do not make its full collections longer.
        self._timers: list[float] = []
        self._timer_entries: dict[float, tuple[int, int]] = {}
        self._runnable: collections.deque[tuple[Task, float]] = collections.deque()
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
        task.wait_seq += 1
        task.ready_flag.clear()
        if deadline is not None:
            self._add_timer(deadline, task.wait_seq, task.id)
        if fd is not None:
            waiters = self._fd_waiters.get(fd)
            if waiters is None:
                self._fd_waiters[fd] = [(task.wait_seq, task)]
                self._epoll.register(fd, select.EPOLLOUT if writable else select.EPOLLIN)
            else:
                waiters.append((task.wait_seq, task))

    def sleep_until(self, task: Task, deadline: float) -> None:
        """:meth:`suspend` with only a deadline (a guest's sleep: the hot path)."""
        task.wait_seq = seq = task.wait_seq + 1
        MEMORY[task.ready_flag.address] = 0
        entries = self._timer_entries
        while deadline in entries:  # due times are keys: a tie moves to the next float
            deadline = math.nextafter(deadline, math.inf)
        entries[deadline] = (seq, task.id)
        heapq.heappush(self._timers, deadline)

    def _add_timer(self, deadline: float, seq: int, task_id: int) -> None:
        entries = self._timer_entries
        while deadline in entries:
            deadline = math.nextafter(deadline, math.inf)
        entries[deadline] = (seq, task_id)
        heapq.heappush(self._timers, deadline)

    def release_fd(self, fd: int) -> None:
        """Forget every wait on ``fd`` before its owner closes it."""
        if self._fd_waiters.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    # ---- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                self._wake_due_timers()
                for _ in range(len(self._runnable)):
                    self._run_one(*self._runnable.popleft())
                self._wait_for_events()
        finally:
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
                self._runnable.append((task, 0.0))
                if isinstance(arg, (int, float)):  # GuestSpec.timeout: an int of seconds is fine too
                    self._add_timer(time.monotonic() + arg, _TIMEOUT, task.id)
            elif self._tasks.get(task.id) is task and isinstance(arg, ExitReason):
                self._reap(task, arg)

    def _reap(self, task: Task, reason: ExitReason) -> None:
        del self._tasks[task.id]
        self._reaped += 1
        task.abort(reason)

    def _wake_due_timers(self) -> None:
        now = time.monotonic()
        timers, entries, tasks = self._timers, self._timer_entries, self._tasks
        while timers and timers[0] <= now:
            due = heapq.heappop(timers)
            seq, task_id = entries.pop(due)
            task = tasks.get(task_id)
            if task is None:
                continue
            if seq == task.wait_seq:
                flag = task.ready_flag.address
                if not MEMORY[flag]:
                    MEMORY[flag] = 1
                    self._runnable.append((task, due))
            elif seq == _TIMEOUT:
                self._reap(task, ExitReason.TIMEOUT)

    def _run_one(self, task: Task, due: float) -> None:
        if self._tasks.get(task.id) is not task:
            return
        if due and self.wake_lags is not None:
            self.wake_lags.append(time.monotonic() - due)
        seq = task.wait_seq
        try:
            finished = task.run_slice()
        except Exception:  # a host-side bug must not end the thread that runs every other guest
            log.exception("guest %r failed on scheduler thread %s", task, self._thread.name)
            self._reap(task, ExitReason.TRAPPED)
            return
        if finished:
            del self._tasks[task.id]
            self._reaped += 1
        elif task.wait_seq == seq:  # no new wait registered: it yielded on an epoch tick
            self._runnable.append((task, 0.0))

    def _wait_for_events(self) -> None:
        self._sleeping = True
        if self._runnable or self._inbox or self._stopping:
            timeout = 0.0
        elif self._timers:
            timeout = max(0.0, self._timers[0] - time.monotonic())
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
                if seq == task.wait_seq and not task.ready_flag.is_set() and self._tasks.get(task.id) is task:
                    task.ready_flag.set()
                    self._runnable.append((task, 0.0))
