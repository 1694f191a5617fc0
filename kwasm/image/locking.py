"""The image store's lock: one writer at a time across threads and ``kwasm`` processes.

``flock(2)`` from the standard library, so taking it costs no import (the ``filelock`` package took
~15 ms of every command's start-up).
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from kwasm.errors import StoreError


class StoreLock:
    """A reentrant lock across threads and processes: ``flock(2)`` on the store's ``.lock`` file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1
        self._depth = 0
        self._threads = threading.RLock()

    def __enter__(self) -> None:
        self._threads.acquire()
        if self._depth == 0:
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                self._threads.release()
                raise StoreError(f"cannot lock the image store {self._path.parent}: {exc.strerror}") from None
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd = fd
        self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = -1
        self._threads.release()
