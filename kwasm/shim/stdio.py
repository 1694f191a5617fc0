"""Hold the write end of a task's stdout/stderr FIFOs from Start until the process exits.

The engine opens an output FIFO without waiting for its reader. containerd's clients (``ctr``) open
the read end from a goroutine, which on a busy machine may come after a short-lived guest already
wrote and exited: the output would be lost (EPIPE). So Start waits, briefly, for each FIFO's reader
and keeps a write end open for the process's life, as containerd's runc shim does: the guest never
writes into a reader-less pipe and the reader sees EOF only once the guest is gone. After the exit,
Wait answers once the reader has drained the pipes (``ctr`` cancels FIFO readers whose open has
not completed when it learns of the exit, which would drop a short guest's whole output).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import os
import stat
import termios
import time
from collections.abc import Iterable

#: How long Start waits for a FIFO's reader before starting the guest anyway.
READER_TIMEOUT = 5.0
#: How long an exit waits for the reader to drain what the guest wrote.
DRAIN_TIMEOUT = 2.0
_POLL = 0.005


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


async def _open_writer(path: str, deadline: float) -> int | None:
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() >= deadline:
                return None
        await asyncio.sleep(_POLL)


def _has_reader(path: str) -> bool:
    try:
        probe = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(probe)
    return True


def _unread(fd: int) -> int:
    count = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, count)
    except OSError:
        return 0
    return count[0]


async def drained(held: dict[str, int], timeout: float = DRAIN_TIMEOUT) -> None:
    """Return once every held pipe is empty or has lost its reader (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    for path, fd in held.items():
        while _unread(fd) and _has_reader(path) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL)


async def hold_writers(paths: Iterable[str], timeout: float = READER_TIMEOUT) -> dict[str, int]:
    """Wait (up to ``timeout``) until each FIFO among ``paths`` has a reader; return path -> held write fd."""
    deadline = time.monotonic() + timeout
    held: dict[str, int] = {}
    for path in dict.fromkeys(p for p in paths if p and _is_fifo(p)):
        fd = await _open_writer(path, deadline)
        if fd is not None:
            held[path] = fd
    return held


def release(held: dict[str, int]) -> None:
    """Close held write ends (the reader then sees EOF once it has drained the pipe)."""
    for fd in held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    held.clear()
