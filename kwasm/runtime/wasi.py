"""The blocking WASI preview1 calls, re-implemented as async host functions.

``poll_oneoff``, ``sched_yield``, ``clock_time_get``, ``fd_read`` (for guests whose stdin is a pipe,
FIFO or terminal) and ``fd_write`` (for guests whose stdout or stderr is a FIFO) shadow wasmtime's
built-in versions, so a waiting guest is a suspended fiber that the scheduler resumes when its timer
is due or its fd is readable or writable, instead of a blocked thread. Everything else stays
wasmtime's WASI, which also enforces the preopen sandbox.
"""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Callable
from typing import Protocol

import wasmtime

from kwasm.runtime import _native, ffi
from kwasm.runtime.cells import MEMORY, U32, GuestCell
from kwasm.runtime.ffi import Continuation, HostCall

WASI = "wasi_snapshot_preview1"

ERRNO_SUCCESS = 0
ERRNO_FAULT = 21
ERRNO_INVAL = 28
ERRNO_IO = 29
ERRNO_PIPE = 64

CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME, CLOCK_THREAD_CPUTIME = 0, 1, 2, 3
EVENT_CLOCK, EVENT_FD_READ, EVENT_FD_WRITE = 0, 1, 2
SUBCLOCK_ABSTIME = 1

_SUBSCRIPTION = struct.Struct("<QB7xIxxxxQQH6x")  # userdata, tag, clock id / fd, timeout, precision, flags
_EVENT = struct.Struct("<QHB5xQH6x")  # userdata, errno, type, nbytes, flags
_IOVEC = struct.Struct("<II")  # pointer, length
_MAX_READ = 64 << 10
#: Most iovecs one fd_read/fd_write may pass (Linux's IOV_MAX; readv(2)/writev(2) refuse more: EINVAL).
_MAX_IOVS = 1024


def adapter_wat(name: str) -> str:
    """A minimal module that lets a host function call the built-in ``name(fd, iovs, len, *n)`` on a guest's memory."""
    return f"""(module
  (import "kwasm" "memory" (memory 0))
  (import "wasi_snapshot_preview1" "{name}" (func $builtin (param i32 i32 i32 i32) (result i32)))
  (export "memory" (memory 0))
  (func (export "{name}") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $builtin))"""


class Waiter(Protocol):
    """What the host functions need from the guest that called them."""

    stdin_fd: int | None
    #: Guest fd (1, 2) → our non-blocking write end of its FIFO; None when no output is a FIFO.
    output_fds: dict[int, int] | None
    cell: GuestCell
    #: Built-in ``fd_read`` / ``fd_write`` bound to the guest's memory, by name (made on first use).
    builtins: dict[str, object] | None

    def memory_region(self) -> tuple[int, int]:
        """``(address, length)`` of the guest's linear memory."""

    def suspend(self, deadline: float | None, fd: int | None, *, writable: bool = False) -> None:
        """Sleep until ``deadline`` (monotonic seconds) or until ``fd`` is readable (writable if ``writable``)."""

    def take_wakeup(self) -> bool:
        """True (once) if the scheduler has woken this guest since it suspended."""


def readable(fd: int) -> bool:
    """Whether a read on ``fd`` would not block right now (data, EOF or an error is pending)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _clock_now(clock: int) -> int | None:
    if clock == CLOCK_MONOTONIC:
        return time.monotonic_ns()
    if clock == CLOCK_REALTIME:
        return time.time_ns()
    if clock == CLOCK_PROCESS_CPUTIME:
        return time.process_time_ns()
    if clock == CLOCK_THREAD_CPUTIME:
        return time.thread_time_ns()
    return None


def _until_done(guest: Waiter, attempt: Continuation) -> Continuation | None:
    """None when ``attempt`` finishes the call now; else a continuation retrying it at each wake-up."""
    if attempt():
        return None
    return lambda: guest.take_wakeup() and attempt()


class Subscription:
    """One parsed ``subscription_t`` with its deadline (monotonic seconds) for clocks."""

    __slots__ = ("deadline", "error", "fd", "tag", "userdata")

    def __init__(self, raw: bytes) -> None:
        self.userdata, self.tag, ident, timeout, _precision, flags = _SUBSCRIPTION.unpack(raw)
        self.fd = ident
        self.error = ERRNO_SUCCESS
        self.deadline = 0.0
        if self.tag == EVENT_CLOCK:
            now = _clock_now(ident)
            if now is None:
                self.error = ERRNO_INVAL
            elif flags & SUBCLOCK_ABSTIME:
                timeout = max(0, timeout - now)
            self.deadline = time.monotonic() + timeout / 1e9
        elif self.tag not in (EVENT_FD_READ, EVENT_FD_WRITE):
            self.error = ERRNO_INVAL


class Shadows:
    """The async WASI functions, bound to a way of finding the calling guest by its store key."""

    def __init__(self, engine: wasmtime.Engine, lookup: Callable[[int], Waiter]) -> None:
        self._engine = engine
        self._lookup = lookup
        self._builtin = ffi.new_linker(engine, shadowing=False)
        self._adapters = {name: wasmtime.Module(engine, adapter_wat(name)) for name in ("fd_read", "fd_write")}

    def install(self, linker: wasmtime.Linker, *, async_stdin: bool, async_output: bool) -> None:
        """Shadow the waits in ``linker``, and ``fd_read`` / ``fd_write`` if ``async_stdin`` / ``async_output``."""
        ffi.define_async(linker, WASI, "poll_oneoff", ["i32"] * 4, self.poll_oneoff, native=_native.POLL_ONEOFF)
        ffi.define_async(linker, WASI, "sched_yield", [], self.sched_yield)
        ffi.define_async(linker, WASI, "clock_time_get", ["i32", "i64", "i32"], None, native=_native.CLOCK_TIME_GET)
        if async_stdin:
            ffi.define_async(linker, WASI, "fd_read", ["i32"] * 4, self.fd_read)
        if async_output:
            ffi.define_async(linker, WASI, "fd_write", ["i32"] * 4, self.fd_write, native=_native.FD_WRITE)

    def sched_yield(self, call: HostCall) -> GuestCell:
        """``sched_yield()``: go to the back of the run queue."""
        guest = self._lookup(call.store_key())
        call.set_result(ERRNO_SUCCESS)
        guest.suspend(time.monotonic(), None)
        return guest.cell

    def poll_oneoff(self, call: HostCall) -> Continuation | GuestCell | None:
        """``poll_oneoff(in, out, nsubscriptions, *nevents)`` with clocks (relative, absolute) and fds.

        The native ``poll_oneoff`` serves a lone realtime or monotonic clock on a scheduler thread
        (a plain sleep) and hands every other call here.
        """
        guest = self._lookup(call.store_key())
        sub_ptr, event_ptr, count, nevents_ptr = call.args4()
        base, size = guest.memory_region()
        if count == 0:
            call.set_result(ERRNO_INVAL)
            return None
        if sub_ptr + 48 * count > size or event_ptr + 32 * count > size or nevents_ptr + 4 > size:
            call.set_result(ERRNO_FAULT)
            return None
        call.set_result(ERRNO_SUCCESS)
        raw = bytes(MEMORY[base + sub_ptr : base + sub_ptr + 48 * count])
        subs = [Subscription(raw[48 * i : 48 * i + 48]) for i in range(count)]
        if all(sub.tag == EVENT_CLOCK and not sub.error for sub in subs):
            # Only clocks: which subscriptions fire is known now (the earliest, and any tied with it),
            # so the events are written up front and the wait needs no Python continuation.
            first = min(sub.deadline for sub in subs)
            fired = [_EVENT.pack(sub.userdata, 0, EVENT_CLOCK, 0, 0) for sub in subs if sub.deadline <= first]
            data = b"".join(fired)
            MEMORY[base + event_ptr : base + event_ptr + len(data)] = data
            U32.pack_into(MEMORY, base + nevents_ptr, len(fired))
            if first <= time.monotonic():
                return None
            guest.suspend(first, None)
            return guest.cell

        def complete() -> bool:
            events = self._ready_events(guest, subs)
            if not events:
                guest.suspend(*self._wait_for(guest, subs))
                return False
            data = b"".join(events)
            MEMORY[base + event_ptr : base + event_ptr + len(data)] = data
            U32.pack_into(MEMORY, base + nevents_ptr, len(events))
            return True

        return _until_done(guest, complete)

    def _ready_events(self, guest: Waiter, subs: list[Subscription]) -> list[bytes]:
        now = time.monotonic()
        events = []
        for sub in subs:
            if sub.error:
                events.append(_EVENT.pack(sub.userdata, sub.error, sub.tag, 0, 0))
            elif sub.tag == EVENT_CLOCK:
                if sub.deadline <= now:
                    events.append(_EVENT.pack(sub.userdata, 0, EVENT_CLOCK, 0, 0))
            elif sub.tag == EVENT_FD_READ and sub.fd == 0 and guest.stdin_fd is not None:
                if readable(guest.stdin_fd):
                    events.append(_EVENT.pack(sub.userdata, 0, EVENT_FD_READ, 1, 0))
            else:  # files, sinks and non-pipe stdio never block
                events.append(_EVENT.pack(sub.userdata, 0, sub.tag, 0, 0))
        return events

    @staticmethod
    def _wait_for(guest: Waiter, subs: list[Subscription]) -> tuple[float | None, int | None]:
        deadlines = [s.deadline for s in subs if s.tag == EVENT_CLOCK]
        waits_stdin = any(s.tag == EVENT_FD_READ and s.fd == 0 for s in subs)
        return (min(deadlines) if deadlines else None), (guest.stdin_fd if waits_stdin else None)

    def _call_builtin(self, call: HostCall, guest: Waiter, name: str) -> None:
        """Serve ``call`` with wasmtime's built-in ``name`` (for the fds the shadow does not handle)."""
        if guest.builtins is None:
            guest.builtins = {}
        func = guest.builtins.get(name)
        if func is None:  # once per guest: every adapter instance lives as long as the store
            func = guest.builtins[name] = call.builtin(self._engine, self._builtin, self._adapters[name], name)
        call.set_result(call.call_func(func, 4))

    @staticmethod
    def _iovecs(call: HostCall, base: int, size: int) -> list[tuple[int, int]] | int:
        """The ``(pointer, length)`` iovecs of an ``fd_read``/``fd_write`` call, or the errno refusing them."""
        iovs, iovs_len, count_ptr = call.arg(1), call.arg(2), call.arg(3)
        if iovs_len > _MAX_IOVS:
            return ERRNO_INVAL
        if iovs + 8 * iovs_len > size or count_ptr + 4 > size:
            return ERRNO_FAULT
        vectors = list(_IOVEC.iter_unpack(MEMORY[base + iovs : base + iovs + 8 * iovs_len]))
        if any(ptr + length > size for ptr, length in vectors):
            return ERRNO_FAULT
        return vectors

    def fd_read(self, call: HostCall) -> Continuation | None:
        """``fd_read(fd, iovs, iovs_len, *nread)``: stdin from a pipe/FIFO without blocking the thread."""
        fd = call.arg(0)
        guest = self._lookup(call.store_key())
        if fd != 0 or guest.stdin_fd is None:
            self._call_builtin(call, guest, "fd_read")
            return None
        host_fd = guest.stdin_fd
        nread_ptr = call.arg(3)
        base, size = guest.memory_region()
        vectors = self._iovecs(call, base, size)
        if isinstance(vectors, int):
            call.set_result(vectors)
            return None
        wanted = min(_MAX_READ, sum(length for _, length in vectors))

        def attempt() -> bool:
            if wanted and not readable(host_fd):
                guest.suspend(None, host_fd)
                return False
            try:
                data = os.read(host_fd, wanted) if wanted else b""
            except BlockingIOError:
                guest.suspend(None, host_fd)
                return False
            except OSError:
                call.set_result(ERRNO_IO)
                return True
            offset = 0
            for ptr, length in vectors:
                chunk = data[offset : offset + length]
                MEMORY[base + ptr : base + ptr + len(chunk)] = chunk
                offset += len(chunk)
            U32.pack_into(MEMORY, base + nread_ptr, len(data))
            call.set_result(ERRNO_SUCCESS)
            return True

        return _until_done(guest, attempt)

    def fd_write(self, call: HostCall) -> Continuation | None:
        """``fd_write(fd, iovs, iovs_len, *nwritten)``: a FIFO stdout/stderr without blocking the thread.

        Like a blocking write to a pipe, the call returns once every byte is in the pipe (the guest
        waits, suspended, while it is full), so nothing is buffered here and nothing is lost at exit.
        A reader that went away is ``EPIPE`` (or the count written before it left). The native
        ``fd_write`` serves every write the pipe takes at once and hands only a full pipe (and fds
        that are not FIFOs) to this one.
        """
        fd = call.arg(0)
        guest = self._lookup(call.store_key())
        host_fd = guest.output_fds.get(fd) if guest.output_fds else None
        if host_fd is None:
            self._call_builtin(call, guest, "fd_write")
            return None
        nwritten_ptr = call.arg(3)
        base, size = guest.memory_region()
        vectors = self._iovecs(call, base, size)
        if isinstance(vectors, int):
            call.set_result(vectors)
            return None
        # Copied now: the guest's memory cannot change while it waits, but this keeps no pointer into it.
        data = memoryview(b"".join(MEMORY[base + ptr : base + ptr + length] for ptr, length in vectors if length))
        written = 0

        def attempt() -> bool:
            nonlocal written
            errno = ERRNO_SUCCESS
            while written < len(data):
                try:
                    written += os.write(host_fd, data[written:])
                except BlockingIOError:
                    guest.suspend(None, host_fd, writable=True)
                    return False
                except OSError as exc:
                    errno = ERRNO_PIPE if isinstance(exc, BrokenPipeError) else ERRNO_IO
                    break
            if written or not errno:
                U32.pack_into(MEMORY, base + nwritten_ptr, written)
                errno = ERRNO_SUCCESS
            call.set_result(errno)
            return True

        return _until_done(guest, attempt)
