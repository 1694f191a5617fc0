"""An append-only record file: one ``write(2)`` per record, torn records detected at reload.

Each record is one line, ``<crc32 of the payload, 8 hex digits> <payload>\\n``; a payload never holds
a newline (the sandboxer writes compact JSON). A ``kill -9`` can cut the last write short (the kernel
checks for a fatal signal between pages); such a tail has no newline or a wrong checksum, and
:meth:`Journal.replay` skips it, so a record is read whole or not at all. A failed or short write is
truncated away at once, so later records never land behind a partial one. :meth:`Journal.rewrite`
replaces the whole file atomically (temp file + rename), which is how it is compacted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import zlib
from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)

_PREFIX = 9  # eight hex digits and a space


def _line(payload: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


class Journal:
    """The record file at ``path``, opened for appending on the first write."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        #: Bytes in the file (as far as this process wrote them).
        self.size = 0
        #: Records appended since the file was last rewritten.
        self.appended = 0

    @property
    def opened(self) -> bool:
        """Whether this process has the file open for appending."""
        return self.fd >= 0

    def append(self, payload: bytes) -> None:
        """Add one record with a single ``write(2)``; on failure nothing of it stays in the file."""
        if self.fd < 0:
            self._open()
        line = _line(payload)
        try:
            written = os.write(self.fd, line)
        except OSError:
            self._cut()
            raise
        if written != len(line):
            self._cut()
            raise OSError(errno.ENOSPC, f"short write to {self.path}")
        self.size += written
        self.appended += 1

    def replay(self) -> Iterator[bytes]:
        """Every whole record's payload, oldest first (torn or corrupt lines are logged and skipped)."""
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return
        lines = data.split(b"\n")
        if lines[-1]:
            log.warning("%s: dropping an unfinished last record (%d bytes)", self.path, len(lines[-1]))
        for number, line in enumerate(lines[:-1], 1):
            payload = line[_PREFIX:]
            try:
                valid = line[8:9] == b" " and int(line[:8], 16) == zlib.crc32(payload)
            except ValueError:
                valid = False
            if valid:
                yield payload
            elif line:
                log.warning("%s: dropping corrupt record on line %d", self.path, number)

    def rewrite(self, payloads: Iterable[bytes]) -> None:
        """Replace the file with exactly ``payloads`` (atomic: a crash leaves the old or the new file)."""
        data = b"".join(_line(payload) for payload in payloads)
        temp = f"{self.path}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(temp, self.path)
        self.close()
        self._open()
        self.appended = 0

    def discard(self) -> None:
        """Close and delete the file (nothing in it is needed any more)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.size = 0
        self.appended = 0

    def close(self) -> None:
        """Close the file (the next append reopens it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn record: end its line first
            size += os.write(fd, b"\n")
        self.fd, self.size = fd, size

    def _cut(self) -> None:
        """Truncate back to the last whole record."""
        try:
            os.ftruncate(self.fd, self.size)
        except OSError as exc:
            log.error("cannot truncate %s after a failed write: %s", self.path, exc)
