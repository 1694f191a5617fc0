"""kwasm CLI command group: sandboxer (``kwasm sandboxer``, ``kwasm ps``, ``kwasm logs``, ``kwasm stop``)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from kwasm.cli.output import console, print_json
from kwasm.errors import NotFoundError, SandboxerError, UsageError
from kwasm.sandboxer.paths import DEFAULT_DIR, DEFAULT_LISTEN

if TYPE_CHECKING:  # the gRPC stack loads only when a sandboxer command runs
    from kwasm.api import sandboxer_admin_pb2
    from kwasm.sandboxer.client import SandboxerClient
    from kwasm.sandboxer.registry import GuestEngine

app = typer.Typer()
T = TypeVar("T")
_STATUS = {0: "unknown", 1: "created", 2: "running", 3: "stopped", 4: "paused", 5: "pausing"}
_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR}

ListenOption = Annotated[
    Path, typer.Option("--listen", "-l", envvar="KWASM_SANDBOXER", help="The sandboxer's gRPC socket.")
]


def _engine() -> GuestEngine:
    from kwasm.runtime.engine import Engine

    return Engine()


@app.command("sandboxer")
def sandboxer(
    listen: Annotated[Path, typer.Option("--listen", "-l", help="gRPC socket of the sandbox API.")] = DEFAULT_LISTEN,
    directory: Annotated[
        Path, typer.Option("--dir", "-d", help="State directory (sandbox records, the shared task socket).")
    ] = DEFAULT_DIR,
    nofile: Annotated[
        int | None, typer.Option("--nofile", help="Soft RLIMIT_NOFILE to set (default: the hard limit).")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="trace, debug, info, warn or error.")] = "info",
    print_unit: Annotated[
        bool, typer.Option("--print-unit", help="Print a systemd unit for these options and exit.")
    ] = False,
) -> None:
    """Run the wasm sandboxer: a drop-in for Kuasar's wasm-sandboxer (iSulad >= 2.1.6, containerd 2.x).

    Serves containerd.services.sandbox.v1.Controller (gRPC) on --listen and containerd.task.v2.Task
    (ttrpc) on <dir>/task.sock, in the foreground, until SIGTERM.

    Example:  kwasm sandboxer --listen /run/kwasm-sandboxer.sock --dir /run/kwasm
    """
    from kwasm.sandboxer.daemon import DaemonConfig, run, unit_file

    if print_unit:
        print(unit_file(listen.absolute(), directory.absolute(), shutil.which("kwasm") or "/usr/local/bin/kwasm"))
        return
    if log_level.lower() not in _LEVELS:
        raise UsageError(f"unknown --log-level {log_level!r} (use {', '.join(_LEVELS)})")
    if nofile is not None and nofile < 64:
        raise UsageError("--nofile must be at least 64")
    logging.basicConfig(
        level=_LEVELS[log_level.lower()], stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        run(DaemonConfig(listen=listen.absolute(), directory=directory.absolute(), nofile=nofile), _engine)
    except OSError as exc:
        raise SandboxerError(f"cannot serve on {listen} with state in {directory}: {exc}") from exc


def _with_client(listen: Path, action: Callable[[SandboxerClient], Awaitable[T]]) -> T:
    from kwasm.sandboxer.client import SandboxerClient

    async def go() -> T:
        client = SandboxerClient(listen)
        try:
            return await action(client)
        finally:
            await client.close()

    if not listen.exists():
        raise SandboxerError(f"no sandboxer socket at {listen} (start one with: kwasm sandboxer --listen {listen})")
    return asyncio.run(go())


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _rows(listing: sandboxer_admin_pb2.ListResponse) -> list[dict[str, Any]]:
    now = time.time()
    rows: list[dict[str, Any]] = []
    for sandbox in listing.sandboxes:
        processes = []
        for process in sandbox.processes:
            started = process.started_at.ToNanoseconds() / 1e9 if process.HasField("started_at") else None
            ended = process.exited_at.ToNanoseconds() / 1e9 if process.HasField("exited_at") else now
            processes.append({
                "task_id": process.task_id,
                "exec_id": process.exec_id,
                "status": _STATUS.get(process.status, str(process.status)),
                "exit_status": process.exit_status if process.status == 3 else None,
                "uptime_s": round(ended - started, 3) if started is not None else None,
                "memory_bytes": process.memory_bytes,
            })
        rows.append({
            "id": sandbox.id,
            "name": sandbox.name,
            "namespace": sandbox.namespace,
            "state": sandbox.state,
            "uptime_s": round(now - sandbox.created_at.ToNanoseconds() / 1e9, 3),
            "memory_bytes": sandbox.memory_bytes,
            "tasks": processes,
        })
    return rows


@app.command("ps")
def ps(
    listen: ListenOption = DEFAULT_LISTEN,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the sandboxes and tasks of a running sandboxer, with state, uptime and memory.

    Example:  kwasm ps --listen /run/kwasm-sandboxer.sock
    """
    rows = _rows(_with_client(listen, lambda client: client.list()))
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    table = Table("SANDBOX", "NAME", "STATE", "TASK", "STATUS", "UPTIME", "MEMORY", box=None)
    for row in rows:
        tasks: list[dict[str, Any]] = row["tasks"] or [{}]
        for index, task in enumerate(tasks):
            head = [str(row["id"])[:12], str(row["name"]), str(row["state"])] if index == 0 else ["", "", ""]
            status = task.get("status", "")
            if task.get("exit_status") is not None:
                status = f"{status} ({task['exit_status']})"
            uptime = task.get("uptime_s", row["uptime_s"] if not task else None)
            memory = task.get("memory_bytes", row["memory_bytes"])
            table.add_row(
                *head,
                str(task.get("task_id", "")) + (f"/{task['exec_id']}" if task.get("exec_id") else ""),
                str(status),
                _duration(uptime) if uptime is not None else "-",
                f"{memory / 1024:.0f} KiB",
            )
    console.print(table)


@app.command("stop")
def stop(
    target: Annotated[str, typer.Argument(help="A sandbox id, or the id of a task to kill.")],
    listen: ListenOption = DEFAULT_LISTEN,
    timeout: Annotated[int, typer.Option("--timeout", help="Seconds to wait for guests to exit.")] = 10,
) -> None:
    """Stop a sandbox (kills its tasks) or kill one task of a running sandboxer.

    Example:  kwasm stop 4f0c2a9d1e7b
    """
    from kwasm.sandboxer.client import TaskClient
    from kwasm.sandboxer.status import NOT_FOUND, StatusError

    async def go(client: SandboxerClient) -> str:
        listing = await client.list()
        matches = [s.id for s in listing.sandboxes if s.id == target or s.id.startswith(target)]
        if len(matches) == 1:
            await client.stop(matches[0], timeout)
            return f"stopped sandbox {matches[0]}"
        if len(matches) > 1:
            raise UsageError(f"{target!r} names {len(matches)} sandboxes; give more of the id")
        if not any(p.task_id == target for s in listing.sandboxes for p in s.processes):
            raise NotFoundError(f"no sandbox or task {target!r}")
        tasks = await TaskClient.connect(listing.task_address)
        try:
            await tasks.kill(target, all=True)
            await asyncio.wait_for(tasks.wait(target), timeout)
        finally:
            await tasks.close()
        return f"killed task {target}"

    try:
        console.print(_with_client(listen, go))
    except StatusError as exc:
        if exc.code == NOT_FOUND:
            raise NotFoundError(exc.message) from exc
        raise SandboxerError(exc.message) from exc


@app.command("logs")
def logs(
    task: Annotated[str, typer.Argument(help="A task id (or a sandbox id: its first task).")],
    listen: ListenOption = DEFAULT_LISTEN,
    raw: Annotated[bool, typer.Option("--raw", help="Print CRI log lines as stored (time, stream, tag).")] = False,
) -> None:
    """Print a task's output from its CRI log file (tasks whose stdout/stderr path is a log file).

    Example:  kwasm logs my-container
    """
    listing = _with_client(listen, lambda client: client.list())
    found = [p for s in listing.sandboxes for p in s.processes if task in (p.task_id, s.id) and not p.exec_id]
    if not found:
        raise NotFoundError(f"no task {task!r} in the sandboxer on {listen}")
    process = found[0]
    paths = [path for path in dict.fromkeys((process.stdout, process.stderr)) if path and Path(path).is_file()]
    if not paths:
        where = process.stdout or "discarded"
        raise SandboxerError(f"task {process.task_id} has no log file (stdout: {where})")
    for path in paths:
        for line in Path(path).read_text(errors="replace").splitlines():
            if raw:
                print(line)
                continue
            _stamp, _stream, tag, text = [*line.split(" ", 3), "", "", ""][:4]
            sys.stdout.write(text + ("\n" if tag == "F" else ""))
