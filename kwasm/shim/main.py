"""``containerd-shim-kwasm-v1``: the containerd runtime v2 shim binary (runtime ``io.containerd.kwasm.v1``).

containerd runs ``containerd-shim-kwasm-v1 -namespace NS -address A -publish-binary B -id ID start``
in the task's bundle and dials the address it prints; every task of a namespace shares one kwasm
sandboxer (started here when none answers). ``... -id ID -bundle B delete`` cleans up a task whose
sandboxer is gone (or no longer answers for it) and prints a ``DeleteResponse``. Startup stays
light (no Typer, no wasm engine): containerd runs ``delete`` once per task.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from kwasm import __version__
from kwasm.errors import KwasmError, SandboxerError
from kwasm.shim.layout import IDLE_GRACE_ENV, NamespaceLayout, check_task_id

#: Seconds ``start`` waits for a new sandboxer to listen.
SPAWN_TIMEOUT = 30.0
#: 128 + SIGKILL: what a task whose sandboxer vanished reports.
EXIT_LOST = 137
MNT_DETACH = 0x2
#: A sandboxer log over this size is moved to sandboxer.log.1 when the next sandboxer starts.
LOG_LIMIT = 8 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """containerd's flags (Go style: one dash) and the action."""
    parser = argparse.ArgumentParser(
        prog="containerd-shim-kwasm-v1", allow_abbrev=False,
        description="containerd shim v2 for wasm tasks, backed by one shared kwasm sandboxer per namespace.",
        epilog="Example: containerd-shim-kwasm-v1 -namespace default -address /run/containerd/containerd.sock "
        "-publish-binary /usr/bin/containerd -id demo start",
    )
    parser.add_argument("-namespace", default=os.environ.get("NAMESPACE", "default"), help="containerd namespace")
    parser.add_argument("-address", default="/run/containerd/containerd.sock", help="containerd's gRPC socket")
    parser.add_argument("-publish-binary", dest="publish_binary", default="", help="containerd's publish binary")
    parser.add_argument("-id", default="", help="the task (container) id")
    parser.add_argument("-bundle", default="", help="the task's bundle (default: the working directory)")
    parser.add_argument("-socket", default="", help="ignored: the socket is chosen per namespace")
    parser.add_argument("-debug", action="store_true", help="debug logging in the sandboxer")
    parser.add_argument("-v", "-version", dest="version", action="store_true", help="print the version")
    parser.add_argument("action", nargs="?", choices=["start", "delete"], help="what containerd asks for")
    return parser.parse_args(argv)


def _spawn(layout: NamespaceLayout, options: argparse.Namespace) -> None:
    layout.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "kwasm.shim.server", "--dir", str(layout.directory), "--namespace", options.namespace,
        "--address", options.address, "--publish-binary", options.publish_binary,
    ]
    if options.debug:
        command.append("--debug")
    if os.environ.get(IDLE_GRACE_ENV):
        command += ["--idle-grace", os.environ[IDLE_GRACE_ENV]]
    with contextlib.suppress(FileNotFoundError):
        if layout.log.stat().st_size > LOG_LIMIT:
            layout.log.replace(layout.log.with_name(layout.log.name + ".1"))
    with layout.log.open("ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", start_new_session=True
        )
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while not layout.answers():
        if process.poll() is not None:
            tail = layout.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise SandboxerError(f"kwasm sandboxer exited with {process.returncode}: {' | '.join(tail)}")
        if time.monotonic() > deadline:
            raise SandboxerError(f"kwasm sandboxer did not listen on {layout.socket} within {SPAWN_TIMEOUT:.0f}s")
        time.sleep(0.01)


def start(options: argparse.Namespace) -> str:
    """Make sure the namespace's sandboxer runs, reserve the task there, return the address to dial."""
    layout = NamespaceLayout.of(options.address, options.namespace)
    with layout.start_lock():
        layout.reserve(options.id)
        if not layout.answers():
            try:
                _spawn(layout, options)
            except BaseException:
                layout.release(options.id)
                raise
    bundle = Path(options.bundle or os.getcwd())
    # containerd reconnects to running tasks through this file after it restarts.
    (bundle / "address").write_text(layout.address)
    return layout.address


def _unmount(target: Path) -> None:
    """Lazily unmount ``target`` if something is mounted there (what the sandboxer mounted on Create).

    Not kwasm.sandboxer.rootfs.unmount_rootfs: importing it pulls the bundle reader into every
    ``delete``, which containerd runs on the critical path of each container's removal.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(str(target).encode(), MNT_DETACH)


def delete(options: argparse.Namespace) -> bytes:
    """Clean up a task: kill and delete it in a sandboxer that still has it, unmount its rootfs."""
    from kwasm.api import shim_pb2

    layout = NamespaceLayout.of(options.address, options.namespace)
    layout.release(options.id)
    response = shim_pb2.DeleteResponse(pid=0, exit_status=EXIT_LOST)
    response.exited_at.FromNanoseconds(time.time_ns())
    if layout.is_held(options.id) and layout.answers():
        from kwasm.shim.cleanup import delete_in_sandboxer

        found = delete_in_sandboxer(layout, options.id)
        if found is not None:
            response = found
    layout.mark_held(options.id, False)
    _unmount(Path(options.bundle or os.getcwd()) / "rootfs")
    return response.SerializeToString()


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``containerd-shim-kwasm-v1``."""
    options = parse_args(argv)
    if options.version:
        print(f"containerd-shim-kwasm-v1 (kwasm) {__version__}")
        return 0
    if options.action is None:
        print("containerd-shim-kwasm-v1: give an action: start or delete (containerd runs these)", file=sys.stderr)
        return 2
    try:
        if not options.id:
            raise SandboxerError(f"{options.action} needs -id")
        check_task_id(options.id)
        if options.action == "start":
            sys.stdout.write(start(options))
        else:
            sys.stdout.buffer.write(delete(options))
    except (KwasmError, OSError) as exc:
        print(f"containerd-shim-kwasm-v1 {options.action}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
