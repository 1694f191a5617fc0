"""The sandboxer's records (sandboxes, tasks, processes) and their persistence under ``--dir``.

Each sandbox lives in ``<dir>/<sandbox_id>/sandbox.json`` together with its tasks; the file is
rewritten atomically (temp file + rename) on every change recovery needs (sandbox create and stop,
task create, exec, exit and delete), so a ``kill -9`` leaves either the old or the new version.
Records keep only what the protocols answer with: the OCI spec and the guest handle exist in memory
while a task runs and are never persisted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kwasm.runtime.guest import GuestSpec

log = logging.getLogger(__name__)

STATE_FILE = "sandbox.json"
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


def pod_meta(labels: dict[str, str], annotations: dict[str, str]) -> bytes:
    """The compact form of a pod's labels and annotations that :class:`Sandbox` keeps."""
    return json.dumps({"labels": labels, "annotations": annotations}, separators=(",", ":")).encode()


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

    def to_json(self) -> dict[str, Any]:
        """The persisted form."""
        return {
            "id": self.id,
            "created_at": self.created_at,
            "netns_path": self.netns_path,
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
            **json.loads(self.pod_meta),
            "state": self.state,
            "exit_status": self.exit_status,
            "exited_at": self.exited_at,
            "announced": list(self.announced),
            "tasks": [task.to_json() for task in self.tasks.values()],
        }

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
    """Reads and writes sandbox records under the sandboxer's working directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._prefix = str(root)

    def sandbox_dir(self, sandbox_id: str) -> Path:
        """The directory owned by one sandbox."""
        return self.root / sandbox_id

    def save(self, sandbox: Sandbox) -> None:
        """Write the sandbox (and its tasks) atomically."""
        directory = f"{self._prefix}/{sandbox.id}"  # plain strings: this runs twice per pod started
        data = json.dumps(sandbox.to_json(), separators=(",", ":")).encode()
        temp = f"{directory}/.{STATE_FILE}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except FileNotFoundError:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(temp, f"{directory}/{STATE_FILE}")

    def remove(self, sandbox_id: str) -> None:
        """Delete everything the sandbox owns on disk."""
        shutil.rmtree(self.sandbox_dir(sandbox_id), ignore_errors=True)

    def load_all(self) -> list[Sandbox]:
        """Every sandbox persisted under the root; unreadable records are logged and removed."""
        sandboxes: list[Sandbox] = []
        if not self.root.is_dir():
            return sandboxes
        for entry in os.scandir(self.root):
            if not entry.is_dir(follow_symlinks=False) or not valid_id(entry.name):
                continue
            path = Path(entry.path) / STATE_FILE
            try:
                sandboxes.append(Sandbox.from_json(json.loads(path.read_bytes())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("dropping unreadable sandbox state %s: %s", path, exc)
                shutil.rmtree(entry.path, ignore_errors=True)
        return sandboxes
