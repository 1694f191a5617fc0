"""What a guest is and how it ended: the plain objects the engine's callers build and read.

The engine knows nothing of OCI or gRPC: a caller (``kwasm run``, the sandboxer) describes a guest
with :class:`GuestSpec`, starts it on the engine, and gets a :class:`GuestExit` back.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: Exit code reported for a guest stopped by Kill, ``--timeout`` or Ctrl-C (128 + SIGKILL).
EXIT_KILLED = 137
#: Exit code reported for a guest that trapped (unreachable, out-of-bounds, stack overflow, ...).
EXIT_TRAP = 134


class StdioKind(enum.Enum):
    """Where a guest's stdin/stdout/stderr goes."""

    DISCARD = "discard"  # /dev/null; costs no file descriptor
    INHERIT = "inherit"  # the host process's own fd 0/1/2
    FILE = "file"  # a regular file (stdout/stderr: created/appended)
    FIFO = "fifo"  # a named pipe path (as containerd/iSulad pass them)
    CALLBACK = "callback"  # stdout/stderr only: a Python callable receiving bytes


@dataclass(frozen=True)
class Stdio:
    """One stdio stream of a guest; build with the class methods."""

    kind: StdioKind = StdioKind.DISCARD
    path: Path | None = None
    callback: Callable[[bytes], None] | None = None

    @classmethod
    def discard(cls) -> Stdio:
        """Throw output away / give empty input."""
        return cls(StdioKind.DISCARD)

    @classmethod
    def inherit(cls) -> Stdio:
        """Use the host process's own stream."""
        return cls(StdioKind.INHERIT)

    @classmethod
    def file(cls, path: Path) -> Stdio:
        """Read from / write to a regular file."""
        return cls(StdioKind.FILE, path=path)

    @classmethod
    def fifo(cls, path: Path) -> Stdio:
        """Read from / write to a named pipe."""
        return cls(StdioKind.FIFO, path=path)

    @classmethod
    def to_callback(cls, callback: Callable[[bytes], None]) -> Stdio:
        """Hand every chunk the guest writes to ``callback``."""
        return cls(StdioKind.CALLBACK, callback=callback)


@dataclass(frozen=True)
class Preopen:
    """A host directory the guest may use, visible at ``guest_path``."""

    host_path: Path
    guest_path: str
    read_only: bool = False


@dataclass(frozen=True)
class GuestSpec:
    """Everything needed to run one WASI command module."""

    module: Path
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    preopens: list[Preopen] = field(default_factory=list)
    stdin: Stdio = field(default_factory=Stdio.discard)
    stdout: Stdio = field(default_factory=Stdio.discard)
    stderr: Stdio = field(default_factory=Stdio.discard)
    #: Upper bound on linear memory in bytes (None: engine default).
    memory_limit: int | None = None
    #: Kill the guest after this many seconds (None: never).
    timeout: float | None = None


class ExitReason(enum.Enum):
    """Why a guest stopped."""

    EXITED = "exited"  # proc_exit(code) or _start returned (code 0)
    TRAPPED = "trapped"  # a wasm trap or a host error; code EXIT_TRAP
    KILLED = "killed"  # Kill; code EXIT_KILLED
    TIMEOUT = "timeout"  # GuestSpec.timeout elapsed; code EXIT_KILLED


@dataclass(frozen=True)
class GuestExit:
    """How a guest ended: its exit code, why, a message for traps, and when (UNIX seconds)."""

    code: int
    reason: ExitReason
    message: str
    exited_at: float
