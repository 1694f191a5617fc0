"""Turn an OCI bundle (``<bundle>/config.json``) and task stdio paths into a :class:`GuestSpec`.

The module is ``root.path`` + ``process.args[0]`` (kept inside the rootfs). When no such file
exists, args[0] ends in ``.wasm`` (or args is empty) and the rootfs holds exactly one ``*.wasm`` at
its top (an image whose wasm layer was unpacked under its own name), that module runs.
``process.env`` becomes the environment, ``process.cwd`` is passed as ``PWD`` (WASI has no working
directory), the rootfs is preopened at ``/`` (unless it holds nothing but the module, as a ``FROM
scratch`` wasm image does: a preopen costs the sandboxer one descriptor for the guest's lifetime),
every bind mount of a directory at its destination (``ro`` honoured), and
``linux.resources.memory.limit`` caps linear memory. Stdio: an empty path is discarded, a FIFO is
wired as one, any other path is a
CRI log file that receives ``<RFC3339Nano> <stream> <F|P> <text>`` lines.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kwasm.runtime.guest import GuestSpec, Preopen, Stdio

WASM_MAGIC = b"\0asm"
#: Shared by every discarded stream (Stdio is immutable): one object, not three per task.
_DISCARD = Stdio.discard()
#: One Path object per module path, shared by every task that runs it.
_PATHS: dict[str, Path] = {}
#: read(2) size for config.json.
_READ_SIZE = 1 << 16
#: What :func:`_canonical` returns for an existing path it was not asked to stat.
_EXISTS = os.stat("/")


class BundleError(Exception):
    """The bundle cannot be run; ``not_wasm`` tells a non-wasm process spec apart from a broken one."""

    def __init__(self, message: str, *, not_wasm: bool = False) -> None:
        super().__init__(message)
        self.not_wasm = not_wasm


@dataclass(frozen=True)
class TaskIO:
    """The stdio paths a Task.Create or Task.Exec request names."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""


def read_config(bundle: Path) -> dict[str, Any]:
    """The OCI runtime spec of ``bundle``."""
    if not bundle.is_absolute():
        raise BundleError(f"bundle path {bundle} is not absolute")
    path = os.path.join(bundle, "config.json")
    try:
        data = json.loads(_read_file(path))
    except FileNotFoundError as exc:
        raise BundleError(f"bundle {bundle} has no config.json") from exc
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object")
    return data


def _read_file(path: str) -> bytes:
    """The whole file: open, read, close (a buffered ``open()`` adds fstat, lseek and ioctl calls)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block the loop
    try:
        chunks = [os.read(fd, _READ_SIZE)]
        while len(chunks[-1]) == _READ_SIZE:  # a regular file's read is short only at its end
            chunks.append(os.read(fd, _READ_SIZE))
    finally:
        os.close(fd)
    return b"".join(chunks)


def _canonical(path: str, flags: int = 0, *, stat_it: bool = False) -> tuple[str, os.stat_result | None]:
    """``path`` with every symlink resolved, like :meth:`Path.resolve`, and whether it exists.

    An existing path is opened ``O_PATH`` and read back from ``/proc/self/fd`` (three system calls
    instead of an lstat per component: this runs on every Task.Create); ``stat_it`` adds its stat.
    Returns the path and, if it exists, its stat (``stat_it``) or the stat of the directory ``/``.
    ``flags`` may add ``O_DIRECTORY``: a path that is no directory then counts as missing.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC | flags)
    except OSError:
        return os.path.realpath(path), None
    try:
        return os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd) if stat_it else _EXISTS
    except OSError:
        return os.path.realpath(path), None
    finally:
        os.close(fd)


def rootfs_of(bundle: Path, config: dict[str, Any]) -> tuple[str, bool]:
    """The rootfs directory (relative ``root.path`` is relative to the bundle) and its readonly flag."""
    root = config.get("root") or {}
    if not isinstance(root, dict) or not root.get("path"):
        raise BundleError("config.json has no root.path")
    path = os.path.join(bundle, str(root["path"]))  # an absolute root.path replaces the bundle
    canonical, info = _canonical(path, os.O_DIRECTORY)
    if info is None:
        raise BundleError(f"rootfs {path} is not a directory")
    return canonical, bool(root.get("readonly", False))


def _is_wasm(path: Path | str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return os.read(fd, 4) == WASM_MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def resolve_module(
    rootfs: str, args: list[str], known: Callable[[str, os.stat_result], bool] | None = None
) -> tuple[str, list[str], os.stat_result | None]:
    """The wasm module the process runs, its argv (args[0] kept as the guest sees it) and its stat
    (None when the module was found by looking for a single ``*.wasm``).

    ``known(path, stat)`` tells a module the engine has already compiled at that size and mtime: its
    first bytes need not be read again to tell that it is wasm.
    """
    if args:
        candidate, info = _canonical(os.path.join(rootfs, args[0].split("#", 1)[0].lstrip("/")), stat_it=True)
        if candidate != rootfs and not candidate.startswith(rootfs.rstrip("/") + "/"):
            raise BundleError(f"process.args[0] {args[0]!r} points outside the rootfs")
        if info is not None and stat.S_ISREG(info.st_mode):
            if (known is not None and known(candidate, info)) or _is_wasm(candidate):
                return candidate, args, info
            raise BundleError(f"{args[0]} is not a wasm module", not_wasm=True)
    if args and not args[0].split("#", 1)[0].endswith(".wasm"):
        raise BundleError(f"{args[0]} is not a wasm module in the rootfs", not_wasm=True)
    top = Path(rootfs)
    found = [(entry.name, entry.resolve()) for entry in top.glob("*.wasm")]
    layers = [(name, path) for name, path in found if path.is_relative_to(top) and path.is_file() and _is_wasm(path)]
    if len(layers) == 1:
        name, module = layers[0]
        return str(module), args or [f"/{name}"], None
    raise BundleError(f"no wasm module {args[0] if args else ''} in the rootfs (and no single *.wasm there)")


def _preopens(rootfs: str, read_only_root: bool, module: Path, mounts: list[Any]) -> list[Preopen]:
    preopens = []
    if any(name != module.name for name in os.listdir(rootfs)):
        preopens.append(Preopen(Path(rootfs), "/", read_only_root))
    for mount in mounts:
        if not isinstance(mount, dict):
            continue
        options = [str(option) for option in _list(mount.get("options"), "mounts[].options")]
        is_bind = mount.get("type") == "bind" or "bind" in options or "rbind" in options
        source, destination = mount.get("source"), mount.get("destination")
        if not is_bind or not source or not destination:
            continue
        if not Path(str(source)).is_absolute():
            raise BundleError(f"bind mount source {source!r} is not an absolute path")
        if not Path(str(source)).is_dir():  # files (/etc/hosts, ...) cannot be WASI preopens
            continue
        preopens.append(Preopen(Path(str(source)), str(destination), "ro" in options))
    return preopens


def _object(value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, ``{}`` if absent; else the spec is malformed."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BundleError(f"{what} in config.json is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    """``value`` if it is a JSON array, ``[]`` if absent; else the spec is malformed."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BundleError(f"{what} in config.json is not an array")
    return value


def _memory_limit(config: dict[str, Any]) -> int | None:
    resources = _object(_object(config.get("linux"), "linux").get("resources"), "linux.resources")
    limit = _object(resources.get("memory"), "linux.resources.memory").get("limit")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return limit
    return None


class CriLogWriter:
    """Appends a guest stream to a CRI log file, one ``<time> <stream> <F|P> <text>`` entry per line.

    A line is written when its newline arrives (``F``); a fragment longer than 16 KiB is written as a
    partial entry (``P``) and :meth:`flush` (at guest exit) writes what is left. The file is opened per
    write (O_APPEND), so a running guest holds no descriptor for its log.
    """

    PARTIAL_LIMIT = 16 << 10

    def __init__(self, path: Path, stream: str) -> None:
        self.path = path
        self.stream = stream
        self._pending = b""
        self._lock = threading.Lock()

    def __call__(self, chunk: bytes) -> None:
        """Take ``chunk`` from the guest; write every line it completes."""
        with self._lock:
            lines = (self._pending + chunk).split(b"\n")
            self._pending = lines.pop()
            entries = [(b"F", line) for line in lines]
            if len(self._pending) > self.PARTIAL_LIMIT:
                entries.append((b"P", self._pending))
                self._pending = b""
            self._write(entries)

    def flush(self) -> None:
        """Write an unfinished last line as a full entry."""
        with self._lock:
            if self._pending:
                self._write([(b"F", self._pending)])
                self._pending = b""

    def _write(self, entries: list[tuple[bytes, bytes]]) -> None:
        if not entries:
            return
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z").encode()
        prefix = stamp + b" " + self.stream.encode() + b" "
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, b"".join(prefix + tag + b" " + text + b"\n" for tag, text in entries))
        finally:
            os.close(fd)


def stdio_for(path: str, stream: str) -> Stdio:
    """The Stdio for one path of a task request (see the module docstring)."""
    if not path:
        return _DISCARD
    target = Path(path)
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = 0
    except OSError as exc:
        raise BundleError(f"cannot use {stream} path {path}: {exc}") from exc
    if stat.S_ISFIFO(mode):
        return Stdio.fifo(target)
    if stream == "stdin":
        if mode and stat.S_ISREG(mode):
            return Stdio.file(target)
        raise BundleError(f"stdin path {path} is neither a FIFO nor a file")
    if mode and not stat.S_ISREG(mode):
        raise BundleError(f"{stream} path {path} is neither a FIFO nor a log file")
    return Stdio.to_callback(CriLogWriter(target, stream))


def guest_spec(
    bundle: Path,
    config: dict[str, Any],
    io: TaskIO,
    process: dict[str, Any] | None = None,
    known: Callable[[str, os.stat_result], bool] | None = None,
) -> tuple[GuestSpec, os.stat_result | None]:
    """The GuestSpec for the bundle's process (or for ``process``, an exec's OCI process spec), and
    the stat of its module if it was at hand (see :func:`resolve_module`, which ``known`` is passed to)."""
    rootfs, read_only_root = rootfs_of(bundle, config)
    if process is None:
        process = config.get("process") or {}
    if not isinstance(process, dict):
        raise BundleError("process spec is not an object")
    args = [sys.intern(str(arg)) for arg in _list(process.get("args"), "process.args")]
    path, argv, info = resolve_module(rootfs, args, known)
    module = _PATHS.get(path) or _PATHS.setdefault(path, Path(path))
    env: dict[str, str] = {}
    for item in _list(process.get("env"), "process.env"):
        key, _, value = str(item).partition("=")
        if key:
            env[sys.intern(key)] = sys.intern(value)
    cwd = process.get("cwd")
    if cwd and cwd != "/":
        env.setdefault("PWD", str(cwd))
    spec = GuestSpec(
        module=module,
        argv=argv,
        env=env,
        preopens=_preopens(rootfs, read_only_root, module, _list(config.get("mounts"), "mounts")),
        stdin=stdio_for(io.stdin, "stdin"),
        stdout=stdio_for(io.stdout, "stdout"),
        stderr=stdio_for(io.stderr, "stderr"),
        memory_limit=_memory_limit(config),
    )
    return spec, info
