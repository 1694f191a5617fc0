"""The ``kwasm sandboxer`` daemon: one process serving the gRPC Controller and the ttrpc Task API.

Start-up: raise RLIMIT_NOFILE, lock ``--dir``, refuse a socket another sandboxer answers on (a stale
one is replaced), recover persisted sandboxes, bind both sockets 0600, tell systemd ``READY=1`` (and
ping ``WATCHDOG=1`` when systemd sets ``WATCHDOG_USEC``).
SIGTERM/SIGINT stop it cleanly: sockets removed, state kept for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kwasm.errors import SandboxerError
from kwasm.sandboxer.controller import ControllerService
from kwasm.sandboxer.grpcwire import GrpcServer
from kwasm.sandboxer.model import StateStore
from kwasm.sandboxer.paths import DEFAULT_DIR, DEFAULT_LISTEN, LOCK_FILE, TASK_SOCKET
from kwasm.sandboxer.registry import GuestEngine, Registry
from kwasm.sandboxer.tasks import TaskService
from kwasm.sandboxer.ttrpc import TtrpcServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaemonConfig:
    """Where the sandboxer listens and keeps its state."""

    listen: Path = DEFAULT_LISTEN
    directory: Path = DEFAULT_DIR
    nofile: int | None = None

    @property
    def task_socket(self) -> Path:
        """The one ttrpc socket every sandbox's tasks are served on."""
        return self.directory / TASK_SOCKET


def raise_nofile(requested: int | None) -> int:
    """Raise the soft RLIMIT_NOFILE to ``requested`` (default: the hard limit, which caps it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if requested is None else min(requested, hard)
    if hard == resource.RLIM_INFINITY and requested is None:
        target = 1 << 20
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def claim_socket(path: Path) -> None:
    """Remove a stale socket at ``path``; raise if a live server answers there or it is no socket."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise SandboxerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        log.info("replaced stale socket %s", path)
        return
    finally:
        probe.close()
    raise SandboxerError(f"another sandboxer is live on {path}")


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    previous = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(previous)


@contextlib.contextmanager
def lock_directory(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` for the daemon's lifetime."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise SandboxerError(f"another sandboxer is using {directory}") from exc
        yield
        (directory / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(fd)


def notify_systemd(message: bytes) -> None:
    """Send ``message`` (``READY=1``, ``WATCHDOG=1``) to systemd when ``NOTIFY_SOCKET`` is set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(message, address)


async def _watchdog(interval: float) -> None:
    while True:
        notify_systemd(b"WATCHDOG=1")
        await asyncio.sleep(interval)


async def serve(config: DaemonConfig, engine: GuestEngine) -> None:
    """Run the sandboxer until SIGTERM or SIGINT."""
    registry = Registry(StateStore(config.directory), engine, f"ttrpc+unix://{config.task_socket.resolve()}")
    recovered = registry.recover()
    if recovered:
        log.info("recovered %d sandboxes from %s", recovered, config.directory)
    # Long-lived records dominate the heap: collect the young generation less often.
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    ttrpc_server = TtrpcServer()
    TaskService(registry).register(ttrpc_server)
    grpc_server = GrpcServer()
    ControllerService(registry).register(grpc_server)
    stop = asyncio.Event()
    background: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        with _private_umask():
            await ttrpc_server.start(config.task_socket)
            await grpc_server.start(config.listen)
        for path in (config.listen, config.task_socket):
            path.chmod(0o600)
        notify_systemd(b"READY=1")
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if watchdog_usec > 0:  # systemd WatchdogSec=: ping at half the interval while the loop is alive
            background.add(asyncio.create_task(_watchdog(watchdog_usec / 2e6)))
        log.info("serving sandbox API on %s, task API on %s", config.listen, registry.task_address)
        await stop.wait()
        log.info("stopping")
    finally:
        for task in background:
            task.cancel()
        await grpc_server.close()
        await ttrpc_server.close()
        registry.close()
        for path in (config.listen, config.task_socket):
            path.unlink(missing_ok=True)


def run(config: DaemonConfig, engine_factory: Callable[[], GuestEngine]) -> None:
    """Claim the sockets, lock the directory, raise the fd limit and serve (blocks until stopped)."""
    config.listen.parent.mkdir(parents=True, exist_ok=True)
    claim_socket(config.listen)
    with lock_directory(config.directory):
        claim_socket(config.task_socket)
        limit = raise_nofile(config.nofile)
        log.info("RLIMIT_NOFILE soft limit %d", limit)
        asyncio.run(serve(config, engine_factory()))


def unit_file(listen: Path, directory: Path, executable: str) -> str:
    """A systemd unit that runs this sandboxer (``kwasm sandboxer --print-unit``)."""
    return f"""[Unit]
Description=kwasm wasm sandboxer (containerd sandbox API + task API)
Documentation=https://github.com/kwasm/kwasm/blob/main/docs/sandboxer.md
After=network.target
Before=isulad.service containerd.service

[Service]
Type=notify
ExecStart={executable} sandboxer --listen {listen} --dir {directory}
WatchdogSec=30s
Restart=always
RestartSec=1
LimitNOFILE=1048576
KillMode=process
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
"""
