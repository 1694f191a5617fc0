"""Turn a :class:`GuestSpec` into a WASI context: argv, env, preopens and the three stdio streams.

File-descriptor budget: DISCARD and INHERIT streams open nothing; CALLBACK opens nothing; FILE and
FIFO cost one fd each for the guest's lifetime. A stdin that may block (a pipe, FIFO or terminal)
is served by the async ``fd_read`` (see :mod:`kwasm.runtime.wasi`), never by a blocking read; a
FIFO stdout/stderr by the async ``fd_write``, never by a blocking write.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from kwasm.errors import EngineError, NotFoundError
from kwasm.runtime.ffi import WasiConfig
from kwasm.runtime.guest import GuestSpec, Stdio, StdioKind


@dataclass
class WasiSetup:
    """The context plus what the engine must track: the async stdin and output fds, fds to close at exit."""

    config: WasiConfig
    stdin_fd: int | None = None
    #: Guest fd (1, 2) → our non-blocking write end of its FIFO; None when no output is a FIFO.
    output_fds: dict[int, int] | None = None
    owned_fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        """Close the fds this setup opened (after the guest's store is gone, or on failure)."""
        for fd in self.owned_fds:
            os.close(fd)
        self.owned_fds.clear()


def _may_block(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


def _appender(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


def build(spec: GuestSpec) -> WasiSetup:
    """Build the WASI context for ``spec``; raises NotFoundError / EngineError with one clear line."""
    setup = WasiSetup(WasiConfig())
    try:
        setup.config.argv(spec.argv)
        setup.config.env(spec.env)
        for preopen in spec.preopens:
            if not preopen.host_path.is_dir():
                raise NotFoundError(f"host directory {preopen.host_path} does not exist")
            setup.config.preopen(str(preopen.host_path), preopen.guest_path, read_only=preopen.read_only)
        _stdin(setup, spec.stdin)
        for fd, stream in ((1, spec.stdout), (2, spec.stderr)):
            _output(setup, fd, stream)
    except OSError as exc:
        setup.config.discard()
        setup.close()
        raise EngineError(f"cannot set up the guest's WASI context: {exc}") from None
    except BaseException:
        setup.config.discard()
        setup.close()
        raise
    return setup


def _stdin(setup: WasiSetup, stream: Stdio) -> None:
    if stream.kind is StdioKind.INHERIT:
        if _may_block(0):
            setup.stdin_fd = 0
        else:
            setup.config.inherit_stdin()
    elif stream.kind is StdioKind.FILE:
        setup.config.stdin_file(str(_path(stream)))
    elif stream.kind is StdioKind.FIFO:
        fd = os.open(_path(stream), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        setup.owned_fds.append(fd)
        setup.stdin_fd = fd
    elif stream.kind is StdioKind.CALLBACK:
        raise EngineError("stdin cannot be a callback")


def _output(setup: WasiSetup, fd: int, stream: Stdio) -> None:
    if stream.kind is StdioKind.INHERIT:
        setup.config.inherit_output(fd)
    elif stream.kind is StdioKind.CALLBACK:
        assert stream.callback is not None
        setup.config.output_callback(fd, stream.callback)
    elif stream.kind is StdioKind.FILE:
        target = os.open(_path(stream), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        setup.owned_fds.append(target)
        setup.config.output_callback(fd, _appender(target))
    elif stream.kind is StdioKind.FIFO:
        # O_RDWR never blocks, even before the reader has opened the FIFO; the write-only end is then
        # opened through /proc (instantly, since a reader exists) and the O_RDWR one dropped, so a
        # reader that goes away makes writes fail with EPIPE. wasmtime's own stream for ``fd`` stays
        # the default sink: the async fd_write serves it from this fd.
        read_write = os.open(_path(stream), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ours = os.open(f"/proc/self/fd/{read_write}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        finally:
            os.close(read_write)
        setup.owned_fds.append(ours)
        if setup.output_fds is None:
            setup.output_fds = {}
        setup.output_fds[fd] = ours


def _path(stream: Stdio) -> str:
    if stream.path is None:
        raise EngineError(f"a {stream.kind.value} stdio stream needs a path")
    return str(stream.path)
