"""The shared sandboxer one containerd namespace's shims hand their tasks to.

``containerd-shim-kwasm-v1 start`` spawns it (``python -m kwasm.shim.server``) when none answers; it
serves the ttrpc ``containerd.task.v2.Task`` API for every task of the namespace on one socket, runs
all guests on one engine in this one process, and exits once its last task is deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from kwasm.errors import KwasmError
from kwasm.sandboxer.daemon import claim_socket, lock_directory, raise_nofile
from kwasm.sandboxer.registry import GuestEngine, Registry
from kwasm.sandboxer.ttrpc import TtrpcServer
from kwasm.shim.events import Publisher, PublishTarget
from kwasm.shim.layout import NamespaceLayout
from kwasm.shim.service import IDLE_GRACE, MemoryStateStore, ShimTaskService

log = logging.getLogger(__name__)
#: On SIGTERM, how long queued events may still take before they are dropped.
SHUTDOWN_DRAIN = 5.0


async def serve(
    layout: NamespaceLayout,
    target: PublishTarget | None,
    engine_factory: Callable[[], GuestEngine],
    idle_grace: float = IDLE_GRACE,
) -> None:
    """Serve the Task API on ``layout.socket`` until the last task is gone (or SIGTERM/SIGINT)."""
    with contextlib.ExitStack() as instance:
        instance.enter_context(lock_directory(layout.directory))
        claim_socket(layout.socket)
        registry = Registry(MemoryStateStore(layout.directory), engine_factory(), layout.address)
        server = TtrpcServer()
        done = asyncio.Event()
        released = False  # once True, the socket path may already belong to a successor

        async def stop_serving() -> None:
            nonlocal released
            # Called under the election lock with no task held and none reserved: everything another
            # sandboxer would trip over is gone before a `start` may spawn one.
            await server.close()
            layout.socket.unlink(missing_ok=True)
            layout.pid_file.unlink(missing_ok=True)
            shutil.rmtree(layout.held, ignore_errors=True)
            shutil.rmtree(layout.reserved, ignore_errors=True)
            instance.close()
            released = True
            done.set()

        publisher = Publisher(target)
        service = ShimTaskService(registry, publisher, layout, stop_serving, idle_grace)
        service.register(server)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, done.set)
        # Markers left by a sandboxer that was killed name tasks that died with it.
        shutil.rmtree(layout.held, ignore_errors=True)
        previous = os.umask(0o177)
        try:
            await server.start(layout.socket)
        finally:
            os.umask(previous)
        layout.socket.chmod(0o600)
        layout.pid_file.write_text(str(os.getpid()))
        log.info("serving the task API on %s (pid %d)", layout.address, os.getpid())
        # Exit even if containerd never comes: `start` reserved the task that made us start.
        service.schedule_idle_check()
        try:
            await done.wait()
        finally:
            await server.close()
            if not released:
                layout.socket.unlink(missing_ok=True)
                layout.pid_file.unlink(missing_ok=True)
            # Guests killed by this shutdown get no events: containerd sees their connections close and
            # publishes their exits itself.
            publisher.close()
            registry.close()
            await publisher.drain(SHUTDOWN_DRAIN)


def _engine() -> GuestEngine:
    from kwasm.runtime.engine import Engine

    return Engine()


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m kwasm.shim.server --dir D [--namespace NS --address A --publish-binary B]``."""
    parser = argparse.ArgumentParser(prog="kwasm-shim-sandboxer", description=__doc__)
    parser.add_argument("--dir", required=True, type=Path, help="The namespace's shim directory.")
    parser.add_argument("--namespace", default="", help="containerd namespace the events go to.")
    parser.add_argument("--address", default="", help="containerd's gRPC address (for events).")
    parser.add_argument("--publish-binary", default="", help="containerd's publish binary.")
    parser.add_argument("--idle-grace", type=float, default=IDLE_GRACE, help="Seconds idle before exiting.")
    parser.add_argument("--debug", action="store_true", help="Log at debug level.")
    options = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if options.debug else logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s kwasm-shim[{os.getpid()}] %(name)s: %(message)s",
    )
    layout = NamespaceLayout(options.dir.absolute())
    target = None
    if options.publish_binary and options.address:
        target = PublishTarget(options.publish_binary, options.address, options.namespace)
    raise_nofile(None)
    try:
        asyncio.run(serve(layout, target, _engine, options.idle_grace))
    except KwasmError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
