"""Read, merge, validate and atomically rewrite iSulad's daemon.json for a wasm runtime handler.

A run adds or updates ``cri-runtimes[handler]``, ``cri-sandboxers[handler]`` and
``enable-cri-v1: true``, keeps every other key and its order, and changes nothing when the
file already says all that. A file that is not JSON is never touched.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kwasm.cri.isulad_schema import SHIPPED_DEFAULT, type_errors
from kwasm.errors import ConfigFileError, UsageError

DAEMON_JSON = Path("/etc/isulad/daemon.json")
DAEMON_JSON_ENV = "KWASM_ISULAD_CONFIG"
DEFAULT_HANDLER = "wasm"
DEFAULT_RUNTIME = "io.containerd.wasm.v1"
KWASM_SANDBOXER_SOCKET = "/run/kwasm-sandboxer.sock"
KUASAR_SANDBOXER_SOCKET = "/run/wasm-sandboxer.sock"
NEW_FILE_MODE = 0o640  # what iSulad's RPM installs daemon.json with


def daemon_json_path(explicit: Path | None = None) -> Path:
    """The daemon.json to use: ``explicit`` (``--config``), else ``$KWASM_ISULAD_CONFIG``, else /etc/isulad."""
    if explicit is not None:
        return explicit
    env = os.environ.get(DAEMON_JSON_ENV)
    return Path(env) if env else DAEMON_JSON


@dataclass(frozen=True)
class HandlerSettings:
    """What one CRI runtime handler maps to: a shim-v2 runtime name and a sandboxer (name + socket)."""

    handler: str = DEFAULT_HANDLER
    runtime: str = DEFAULT_RUNTIME
    sandboxer_name: str = DEFAULT_HANDLER
    sandboxer_address: str = KWASM_SANDBOXER_SOCKET

    def validate(self) -> None:
        """Refuse values iSulad would reject at pod or container creation."""
        if not self.handler or not self.sandboxer_name:
            raise UsageError("--handler and --sandboxer-name must not be empty")
        parts = self.runtime.split(".")
        if len(parts) != 4 or parts[:2] != ["io", "containerd"] or not all(parts):
            raise UsageError(
                f"--runtime {self.runtime!r} is not a shim-v2 name iSulad accepts (io.containerd.<name>.<version>)"
            )
        address = self.sandboxer_address.removeprefix("unix://")
        if not address.startswith("/"):
            raise UsageError(f"--sandboxer-address {self.sandboxer_address!r} must be an absolute socket path")


@dataclass(frozen=True)
class DaemonJson:
    """A loaded daemon.json: its text as found (None when the file is absent) and its parsed object."""

    path: Path
    text: str | None
    config: dict[str, Any]


def parse_daemon_json(path: Path, text: str) -> dict[str, Any]:
    """Parse ``text`` as daemon.json; ConfigFileError with line and column when it is not a JSON object."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigFileError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); left it untouched"
        ) from None
    if not isinstance(config, dict):
        raise ConfigFileError(f"{path} must hold a JSON object, found {type(config).__name__}; left it untouched")
    return config


def load_daemon_json(path: Path) -> DaemonJson:
    """Read ``path``; an absent file yields iSulad's shipped defaults (text None)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return DaemonJson(path, None, json.loads(json.dumps(SHIPPED_DEFAULT)))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read {path}: {exc}") from None
    config = parse_daemon_json(path, text)
    duplicated = _duplicate_keys(text)
    if duplicated:
        raise ConfigFileError(
            f"{path} repeats the key(s) {', '.join(sorted(duplicated))}; rewriting it would drop all but one "
            "of each, so it was left untouched: remove the duplicates by hand"
        )
    return DaemonJson(path, text, config)


def _duplicate_keys(text: str) -> set[str]:
    """Keys that appear twice in one JSON object anywhere in ``text`` (already known to be valid JSON)."""
    duplicated: set[str] = set()

    def collect(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                duplicated.add(key)
            seen.add(key)
        return dict(pairs)

    json.loads(text, object_pairs_hook=collect)
    return duplicated


def apply_handler(config: dict[str, Any], settings: HandlerSettings) -> dict[str, Any]:
    """A copy of ``config`` with the handler's runtime, sandboxer and enable-cri-v1 set; other keys kept in order."""
    merged: dict[str, Any] = json.loads(json.dumps(config))
    for key in ("cri-runtimes", "cri-sandboxers"):
        if not isinstance(merged.get(key, {}), dict):
            raise ConfigFileError(
                f"{key} must be a JSON object (iSulad would refuse to start); fix it by hand, then run again"
            )
    runtimes = merged.get("cri-runtimes", {})
    runtimes[settings.handler] = settings.runtime
    sandboxers = merged.get("cri-sandboxers", {})
    entry = sandboxers.get(settings.handler)
    entry = dict(entry) if isinstance(entry, dict) else {}
    entry["name"] = settings.sandboxer_name
    entry["address"] = settings.sandboxer_address
    sandboxers[settings.handler] = entry
    merged["cri-runtimes"] = runtimes
    merged["cri-sandboxers"] = sandboxers
    merged["enable-cri-v1"] = True
    return merged


def setting_warnings(config: dict[str, Any], settings: HandlerSettings) -> list[str]:
    """Settings that load fine but break wasm sandboxes (systemd cgroups, missing socket, clashing names)."""
    warnings: list[str] = []
    if config.get("systemd-cgroup") is True:
        warnings.append(
            "systemd-cgroup is true: iSulad refuses shim-v2 containers with it (set it to false or remove it)"
        )
    socket_path = Path(settings.sandboxer_address.removeprefix("unix://"))
    if not socket_path.exists():
        warnings.append(f"sandboxer socket {socket_path} does not exist yet: start `kwasm sandboxer` before pods")
    elif not stat.S_ISSOCK(socket_path.stat().st_mode):
        warnings.append(f"sandboxer address {socket_path} exists but is not a socket")
    sandboxers = config.get("cri-sandboxers")
    if isinstance(sandboxers, dict):
        for handler, entry in sandboxers.items():
            clashes = isinstance(entry, dict) and entry.get("name") == settings.sandboxer_name
            if handler != settings.handler and clashes:
                warnings.append(
                    f"cri-sandboxers[{handler!r}] also uses the name {settings.sandboxer_name!r}: "
                    "iSulad's CRI fails to start on duplicate sandboxer names"
                )
    return warnings


def render_daemon_json(config: dict[str, Any]) -> str:
    """daemon.json text in iSulad's own layout (4-space indent, non-ASCII kept, trailing newline)."""
    return json.dumps(config, indent=4, ensure_ascii=False) + "\n"


def validate_types(path: Path, config: dict[str, Any]) -> None:
    """ConfigFileError naming each value whose type would make iSulad refuse to start."""
    errors = type_errors(config)
    if errors:
        raise ConfigFileError(
            f"{path}: iSulad would refuse to start with these values; fix them first: " + "; ".join(errors)
        )


def unified_diff(path: Path, old_text: str, new_text: str) -> list[str]:
    """Unified diff lines from ``old_text`` to ``new_text``, labelled with ``path``."""
    return list(
        difflib.unified_diff(
            old_text.splitlines(keepends=True),
            new_text.splitlines(keepends=True),
            fromfile=f"{path} (current)",
            tofile=f"{path} (new)",
        )
    )


def check_writable(path: Path) -> None:
    """ConfigFileError when ``path`` (or, if absent, its directory) must not or cannot be written."""
    try:
        st = path.stat()
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir():
            raise ConfigFileError(f"directory {parent} does not exist (is iSulad installed?)") from None
        if not os.access(parent, os.W_OK):
            raise ConfigFileError(f"cannot create {path}: {parent} is not writable (run as root)") from None
        return
    if not st.st_mode & stat.S_IWUSR:
        raise ConfigFileError(
            f"{path} is read-only (mode {stat.S_IMODE(st.st_mode):04o}); left it untouched: "
            f"make it writable with `chmod u+w {path}` and run again"
        )
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
        raise ConfigFileError(f"cannot write {path}: permission denied (run as root)")


def write_daemon_json(path: Path, new_text: str, old_text: str | None) -> Path | None:
    """Atomically replace ``path`` with ``new_text``, keeping mode and owner; returns the backup, if any.

    The backup (``daemon.json.<UTC timestamp>.bak``) is a byte-for-byte copy of the old file. A
    symlinked daemon.json is written through: its target is replaced, the link stays.
    """
    path = path.resolve() if path.is_symlink() else path
    check_writable(path)
    backup: Path | None = None
    mode, uid, gid = NEW_FILE_MODE, -1, -1
    try:
        if old_text is not None:
            st = path.stat()
            mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            backup = path.with_name(f"{path.name}.{stamp}.bak")
            counter = 1
            while backup.exists():
                backup = path.with_name(f"{path.name}.{stamp}.{counter}.bak")
                counter += 1
            shutil.copy2(path, backup)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(new_text)
                handle.flush()
                os.fchmod(handle.fileno(), mode)
                if uid != -1 and (uid, gid) != (os.geteuid(), os.getegid()):
                    os.fchown(handle.fileno(), uid, gid)
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ConfigFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    return backup


@dataclass(frozen=True)
class SetupPlan:
    """What ``kwasm setup-isulad`` would do to one daemon.json."""

    path: Path
    old_text: str | None
    new_text: str
    changed: bool
    warnings: list[str]

    def diff(self) -> list[str]:
        """Unified diff of the change (from an empty file when daemon.json does not exist yet)."""
        return unified_diff(self.path, self.old_text or "", self.new_text)


def plan_setup(path: Path, settings: HandlerSettings) -> SetupPlan:
    """Load ``path``, merge the handler in and validate the result; writes nothing.

    Raises ConfigFileError (file untouched) for invalid JSON or values iSulad would reject.
    """
    settings.validate()
    loaded = load_daemon_json(path)
    try:
        merged = apply_handler(loaded.config, settings)
    except ConfigFileError as exc:
        raise ConfigFileError(f"{path}: {exc}") from None
    validate_types(path, merged)
    changed = loaded.text is None or json.dumps(merged) != json.dumps(loaded.config)  # 1 == True in Python
    new_text = render_daemon_json(merged) if changed else (loaded.text or "")
    return SetupPlan(path, loaded.text, new_text, changed, setting_warnings(merged, settings))
