"""Where the shared sandboxer of one containerd namespace lives, and the lock that elects it.

All shim state of one (containerd address, namespace) pair sits in one short directory under the
shim root (``$KWASM_SHIM_ROOT``, default ``/run/kwasm-shim``): ``task.sock`` (the ttrpc socket every
task of the namespace is served on), ``sandboxer.pid``, ``sandboxer.lock`` (held by the running
sandboxer), ``start.lock`` (held by ``start`` while it elects or spawns the sandboxer, and by the
sandboxer while it decides to exit), ``tasks/<id>`` (a task the sandboxer holds), ``reserved/<id>``
(a task promised to containerd but not yet created, so an idle sandboxer does not exit under it)
and ``sandboxer.log``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from kwasm.errors import SandboxerError

ROOT_ENV = "KWASM_SHIM_ROOT"
#: Seconds a sandboxer without tasks waits before exiting (default: kwasm.shim.service.IDLE_GRACE).
IDLE_GRACE_ENV = "KWASM_SHIM_IDLE_GRACE"
DEFAULT_ROOT = Path("/run/kwasm-shim")
#: A reservation older than this is ignored (its containerd call never came).
RESERVATION_TTL = 120.0
#: Task ids become file names here: containerd's identifier rule (as the sandboxer's).
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_task_id(task_id: str) -> str:
    """``task_id`` if it is a valid containerd identifier, else SandboxerError."""
    if not _TASK_ID.match(task_id):
        raise SandboxerError(f"invalid task id {task_id!r}")
    return task_id


def shim_root() -> Path:
    """The directory holding every namespace's shim state."""
    configured = os.environ.get(ROOT_ENV)
    return Path(configured) if configured else DEFAULT_ROOT


class NamespaceLayout:
    """The files of one namespace's shared sandboxer (a plain class: ``start`` and ``delete`` import it)."""

    __slots__ = ("directory",)

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def of(cls, containerd_address: str, namespace: str, root: Path | None = None) -> NamespaceLayout:
        """The layout for tasks of ``namespace`` on the containerd at ``containerd_address``."""
        key = hashlib.sha256(f"{containerd_address}\0{namespace}".encode()).hexdigest()[:16]
        return cls((root or shim_root()) / key)

    @property
    def socket(self) -> Path:
        """The ttrpc Task API socket."""
        return self.directory / "task.sock"

    @property
    def address(self) -> str:
        """The socket as containerd 1.6 dials it."""
        return f"unix://{self.socket}"

    @property
    def pid_file(self) -> Path:
        """The running sandboxer's pid."""
        return self.directory / "sandboxer.pid"

    @property
    def log(self) -> Path:
        """The sandboxer's log file."""
        return self.directory / "sandboxer.log"

    @property
    def reserved(self) -> Path:
        """Directory of task ids handed to containerd and not yet created."""
        return self.directory / "reserved"

    @property
    def held(self) -> Path:
        """Directory with one marker per task the sandboxer holds (so ``delete`` knows whom to ask)."""
        return self.directory / "tasks"

    def mark_held(self, task_id: str, held: bool) -> None:
        """Create or remove the marker of a task the sandboxer holds."""
        marker = self.held / check_task_id(task_id)
        if held:
            self.held.mkdir(mode=0o700, parents=True, exist_ok=True)
            marker.touch(mode=0o600)
        else:
            with contextlib.suppress(OSError):
                marker.unlink()

    def is_held(self, task_id: str) -> bool:
        """Whether a sandboxer took ``task_id`` and has not deleted it."""
        return (self.held / check_task_id(task_id)).exists()

    def reserve(self, task_id: str) -> None:
        """Record that containerd was told to create ``task_id`` here."""
        self.reserved.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.reserved / check_task_id(task_id)).touch(mode=0o600)

    def release(self, task_id: str) -> None:
        """Forget the reservation of ``task_id`` (created, or given up)."""
        if _TASK_ID.match(task_id):  # an invalid id was never reserved
            with contextlib.suppress(OSError):
                (self.reserved / task_id).unlink()

    def pending_reservations(self, now: float | None = None) -> list[str]:
        """Task ids reserved within the last RESERVATION_TTL seconds."""
        now = time.time() if now is None else now
        try:
            entries = list(os.scandir(self.reserved))
        except FileNotFoundError:
            return []
        pending = []
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime < RESERVATION_TTL:
                    pending.append(entry.name)
        return pending

    def acquire_start_lock(self) -> int:
        """Take the namespace's election lock (blocking); returns the fd to pass to release_start_lock."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / "start.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def release_start_lock(fd: int) -> None:
        """Release the election lock taken by acquire_start_lock."""
        os.close(fd)

    @contextlib.contextmanager
    def start_lock(self) -> Iterator[None]:
        """Hold the namespace's election lock (blocking) for the ``with`` block."""
        fd = self.acquire_start_lock()
        try:
            yield
        finally:
            self.release_start_lock(fd)

    def answers(self) -> bool:
        """Whether a sandboxer accepts connections on the socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True
