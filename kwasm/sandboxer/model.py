"""The sandboxer's records (sandboxes, tasks, processes) and their persistence under ``--dir``.

Every sandbox (with its tasks) is one record of the journal ``<dir>/state.journal`` (see
:mod:`.journal`): on every change recovery needs (sandbox create and stop, task create, exec, exit
and delete) its whole new version is appended with one ``write(2)``, and Shutdown appends a removal;
at reload the last whole record of each sandbox wins, so a ``kill -9`` leaves either the old or the
new version. The journal is compacted when it has grown well past the live records, and deleted once
no sandbox is left. Records keep only what the protocols answer with: the OCI spec and the guest
handle exist in memory while a task runs and are never persisted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kwasm.runtime.guest import GuestSpec
from kwasm.sandboxer.journal import Journal

log = logging.getLogger(__name__)

JOURNAL_FILE = "state.journal"
#: Where earlier versions kept each sandbox (``<dir>/<id>/sandbox.json``); moved into the journal at start.
LEGACY_FILE = "sandbox.json"
#: Records a journal may gain beyond four per live sandbox before a removal compacts it.
COMPACT_MIN = 4096
#: Sandbox and task ids become path components and log fields: keep them tame.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

# Task status values (containerd.v1.types.Status).
CREATED = 1
RUNNING = 2
STOPPED = 3

# Sandbox states.
SANDBOX_CREATED = "created"
SANDBOX_READY = "ready"
SANDBOX_STOPPED = "stopped"

#: Exit code of a task that was running when the sandboxer died (128 + SIGKILL, like a killed guest).
EXIT_SANDBOXER_LOST = 137


def valid_id(value: str) -> bool:
    """Whether ``value`` may name a sandbox, task or exec process."""
    return bool(_ID.match(value))


@dataclass(slots=True, eq=False)
class Process:
    """A task's init process (``exec_id == ""``) or one exec process."""

    exec_id: str
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    status: int = CREATED
    exit_status: int = 0
    started_at: float | None = None
    exited_at: float | None = None
    spec: GuestSpec | None = None
    #: The module's stat when Task.Create compiled it (not persisted; saves the engine a stat at start).
    module_stat: os.stat_result | None = None
    guest: Any = None
    waiters: list[Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The persisted form."""
        return {
            "exec_id": self.exec_id,
            "stdin": self.stdin,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "terminal": self.terminal,
            "status": self.status,
            "exit_status": self.exit_status,
            "started_at": self.started_at,
            "exited_at": self.exited_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Process:
        """Rebuild from the persisted form."""
        return cls(
            exec_id=str(data.get("exec_id", "")),
            stdin=str(data.get("stdin", "")),
            stdout=str(data.get("stdout", "")),
            stderr=str(data.get("stderr", "")),
            terminal=bool(data.get("terminal", False)),
            status=int(data.get("status", CREATED)),
            exit_status=int(data.get("exit_status", 0)),
            started_at=data.get("started_at"),
            exited_at=data.get("exited_at"),
        )


@dataclass(slots=True, eq=False)
class Task:
    """A container of a sandbox: its bundle, init process and exec processes."""

    id: str
    sandbox_id: str
    bundle: str
    init: Process
    created_at: float = field(default_factory=time.time)
    execs: dict[str, Process] | None = None
    #: Where the sandboxer mounted the rootfs Task.Create passed (unmounted on delete), or "".
    rootfs_mount: str = ""

    def process(self, exec_id: str) -> Process | None:
        """The init process for ``""``, else the exec process of that id (or None)."""
        if not exec_id:
            return self.init
        return (self.execs or {}).get(exec_id)

    def processes(self) -> list[Process]:
        """Init process first, then exec processes."""
        return [self.init, *(self.execs or {}).values()]

    def to_json(self) -> dict[str, Any]:
        """The persisted form."""
        data: dict[str, Any] = {
            "id": self.id,
            "bundle": self.bundle,
            "created_at": self.created_at,
            "init": self.init.to_json(),
        }
        if self.execs:
            data["execs"] = [process.to_json() for process in self.execs.values()]
        if self.rootfs_mount:
            data["rootfs_mount"] = self.rootfs_mount
        return data

    @classmethod
    def from_json(cls, sandbox_id: str, data: dict[str, Any]) -> Task:
        """Rebuild from the persisted form."""
        execs = [Process.from_json(item) for item in data.get("execs", [])]
        return cls(
            id=str(data["id"]),
            sandbox_id=sandbox_id,
            bundle=str(data.get("bundle", "")),
            init=Process.from_json(data.get("init", {})),
            created_at=float(data.get("created_at", 0.0)),
            execs={process.exec_id: process for process in execs} or None,
            rootfs_mount=str(data.get("rootfs_mount", "")),
        )


#: Compact JSON (one encoder for every record instead of one per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def pod_meta(labels: dict[str, str], annotations: dict[str, str]) -> bytes:
    """The compact form of a pod's labels and annotations that :class:`Sandbox` keeps."""
    return _ENCODER.encode({"labels": labels, "annotations": annotations}).encode()


@dataclass(slots=True, eq=False)
class Sandbox:
    """One pod sandbox: what Create gave us, its state, and its tasks."""

    id: str
    created_at: float
    netns_path: str = ""
    name: str = ""
    namespace: str = ""
    uid: str = ""
    #: The pod's labels and annotations as compact JSON (rarely read, so kept small: see pod_meta()).
    pod_meta: bytes = b"{}"
    state: str = SANDBOX_CREATED
    exit_status: int = 0
    exited_at: float | None = None
    announced: tuple[str, ...] = ()
    tasks: dict[str, Task] = field(default_factory=dict)
    waiters: list[Any] | None = None

    def record(self) -> bytes:
        """The persisted form: compact JSON with ``labels`` and ``annotations`` spliced in from pod_meta."""
        core = _ENCODER.encode({
            "id": self.id,
            "created_at": self.created_at,
            "netns_path": self.netns_path,
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
            "state": self.state,
            "exit_status": self.exit_status,
            "exited_at": self.exited_at,
            "announced": list(self.announced),
            "tasks": [task.to_json() for task in self.tasks.values()],
        })
        meta = self.pod_meta[1:-1]
        return core.encode()[:-1] + (b"," + meta if meta else b"") + b"}"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sandbox:
        """Rebuild from the persisted form."""
        metadata = data.get("metadata", {})
        sandbox = cls(
            id=str(data["id"]),
            created_at=float(data["created_at"]),
            netns_path=str(data.get("netns_path", "")),
            name=str(metadata.get("name", "")),
            namespace=str(metadata.get("namespace", "")),
            uid=str(metadata.get("uid", "")),
            pod_meta=pod_meta(data.get("labels", {}), data.get("annotations", {})),
            state=str(data.get("state", SANDBOX_CREATED)),
            exit_status=int(data.get("exit_status", 0)),
            exited_at=data.get("exited_at"),
            announced=tuple(data.get("announced", [])),
        )
        for item in data.get("tasks", []):
            task = Task.from_json(sandbox.id, item)
            sandbox.tasks[task.id] = task
        return sandbox


class StateStore:
    """Reads and writes sandbox records under the sandboxer's working directory (one journal)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.journal = Journal(os.path.join(root, JOURNAL_FILE))

    def save(self, sandbox: Sandbox) -> None:
        """Persist the sandbox (and its tasks): one record appended, whole or not at all."""
        self.journal.append(sandbox.record())

    def remove(self, sandbox_id: str) -> None:
        """Forget the sandbox on disk (a failure is logged: at worst it reloads as stopped)."""
        try:
            self.journal.append(b'{"removed":%s}' % _ENCODER.encode(sandbox_id).encode())
        except OSError as exc:
            log.warning("cannot record the removal of sandbox %s: %s", sandbox_id, exc)

    def settle(self, live: Collection[Sandbox]) -> None:
        """After a removal: delete the journal once nothing is live, compact it once mostly garbage."""
        journal = self.journal
        if not journal.opened:
            return
        if not live:
            journal.discard()
        elif journal.appended > COMPACT_MIN + 4 * len(live):
            journal.rewrite(sandbox.record() for sandbox in live)

    def load_all(self) -> list[Sandbox]:
        """Every persisted sandbox (the journal compacted to them); unreadable records are logged and dropped.

        Sandboxes persisted by earlier versions (``<dir>/<id>/sandbox.json``) are moved into the journal.
        """
        if not self.root.is_dir():
            return []
        latest: dict[str, bytes] = {}
        for payload in self.journal.replay():
            try:
                data = json.loads(payload)
                if "removed" in data:
                    latest.pop(str(data["removed"]), None)
                else:
                    latest[str(data["id"])] = payload
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("dropping unreadable sandbox record in %s: %s", self.journal.path, exc)
        sandboxes: dict[str, Sandbox] = {}
        for sandbox_id, payload in latest.items():
            try:
                sandboxes[sandbox_id] = Sandbox.from_json(json.loads(payload))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("dropping unreadable record of sandbox %s: %s", sandbox_id, exc)
        legacy = self._legacy(sandboxes)
        if sandboxes:
            self.journal.rewrite(sandbox.record() for sandbox in sandboxes.values())
        else:
            self.journal.discard()
        for path in legacy:
            shutil.rmtree(path, ignore_errors=True)
        return list(sandboxes.values())

    def _legacy(self, sandboxes: dict[str, Sandbox]) -> list[str]:
        """Add the per-directory records of earlier versions to ``sandboxes``; their directories."""
        found = []
        for entry in os.scandir(self.root):
            if not entry.is_dir(follow_symlinks=False) or not valid_id(entry.name):
                continue
            path = Path(entry.path) / LEGACY_FILE
            found.append(entry.path)
            try:
                sandbox = Sandbox.from_json(json.loads(path.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("dropping unreadable sandbox state %s: %s", path, exc)
                continue
            sandboxes.setdefault(sandbox.id, sandbox)
        return found
