"""``kwasm doctor``: is this node ready to run wasm pods through iSulad and the kwasm sandboxer?

Required checks (a failure makes ``doctor`` exit non-zero): the isula client and the iSulad
daemon (reachable, ≥ 2.1.6), daemon.json routing the handler to a sandboxer with CRI v1 on,
the sandboxer answering a real ``Platform`` gRPC call, crictl installed and pointed at iSulad.
Recommended checks (warnings): the open-files limit and the kernel limits that density needs.
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kwasm.cri.daemon_json import DEFAULT_HANDLER, KWASM_SANDBOXER_SOCKET, parse_daemon_json
from kwasm.cri.isulad_schema import type_errors
from kwasm.cri.sandboxer_probe import probe_platform
from kwasm.cri.tools import (
    ISULA_UNREACHABLE,
    MIN_ISULAD_VERSION,
    crictl_endpoint_fix,
    crictl_targets_isulad,
    format_version,
    isulad_socket,
    last_line,
    parse_isula_version,
    require_tool,
    run_tool,
)
from kwasm.errors import ConfigFileError, ToolMissingError

OK, WARN, FAIL = "ok", "warn", "fail"
PROC_SYS_ENV = "KWASM_PROC_SYS"
MIN_NOFILE = 65536
# sysctl -> (recommended minimum, why density needs it)
KERNEL_LIMITS: dict[str, tuple[int, str]] = {
    "fs.nr_open": (1048576, "ceiling for any process's open-files limit"),
    "vm.max_map_count": (262144, "each wasm instance maps its own linear memory"),
    "kernel.pid_max": (65536, "thread and process ids for many sandboxes"),
    "kernel.threads-max": (65536, "threads across all sandboxes and runtimes"),
}


@dataclass(frozen=True)
class Check:
    """One row of the doctor table."""

    name: str
    status: str
    detail: str
    fix: str
    required: bool


@dataclass(frozen=True)
class DoctorOptions:
    """Where to look: daemon.json, the handler, an explicit sandboxer socket, /proc/sys."""

    daemon_json: Path
    handler: str = DEFAULT_HANDLER
    sandboxer_address: str | None = None
    proc_sys: Path = field(default_factory=lambda: Path(os.environ.get(PROC_SYS_ENV, "/proc/sys")))


def _isula_checks(socket_address: str) -> list[Check]:
    try:
        require_tool("isula")
    except ToolMissingError as exc:
        fix = "install iSulad ≥ 2.1.6 built with ENABLE_CRI_API_V1, ENABLE_SANDBOXER, ENABLE_SHIM_V2"
        return [Check("isula", FAIL, str(exc), fix, True)]
    result = run_tool(["isula", "version"], timeout=15)
    client, server = parse_isula_version(result.stdout)
    rows = [Check("isula", OK, f"client {format_version(client) if client else 'unknown'}", "", True)]
    if server is None:
        unreachable = ISULA_UNREACHABLE in result.stdout + result.stderr
        reason = f"not reachable at {socket_address}" if unreachable else last_line(result.stderr) or "no answer"
        rows.append(Check("iSulad daemon", FAIL, reason, "systemctl start isulad", True))
    elif server < MIN_ISULAD_VERSION:
        rows.append(
            Check(
                "iSulad daemon",
                FAIL,
                f"version {format_version(server)} speaks the pre-2.1.6 sandbox API",
                f"upgrade iSulad to ≥ {format_version(MIN_ISULAD_VERSION)}",
                True,
            )
        )
    else:
        rows.append(Check("iSulad daemon", OK, f"version {format_version(server)} at {socket_address}", "", True))
    return rows


def _daemon_json_check(options: DoctorOptions) -> tuple[Check, dict[str, Any]]:
    path = options.daemon_json
    fix = f"kwasm setup-isulad --config {path} --handler {options.handler} --restart"
    try:
        config = parse_daemon_json(path, path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Check("daemon.json", FAIL, f"{path} does not exist", fix, True), {}
    except (ConfigFileError, OSError) as exc:
        return Check("daemon.json", FAIL, str(exc), f"repair {path} by hand, then: {fix}", True), {}
    problems = type_errors(config)
    if problems:
        return Check("daemon.json", FAIL, "; ".join(problems), f"fix these values in {path}", True), config
    handler = options.handler
    runtime = (config.get("cri-runtimes") or {}).get(handler)
    entry: dict[str, Any] = (config.get("cri-sandboxers") or {}).get(handler) or {}
    missing = []
    if config.get("enable-cri-v1") is not True:
        missing.append("enable-cri-v1 is not true")
    if not runtime:
        missing.append(f"cri-runtimes[{handler!r}] is missing")
    if not entry.get("name") or not entry.get("address"):
        missing.append(f"cri-sandboxers[{handler!r}] lacks name/address")
    if config.get("systemd-cgroup") is True:
        missing.append("systemd-cgroup is true (shim-v2 containers refuse it)")
    if missing:
        return Check("daemon.json", FAIL, "; ".join(missing), fix, True), config
    detail = f"{handler} → {runtime}, sandboxer {entry['name']} at {entry['address']}"
    return Check("daemon.json", OK, detail, "", True), config


def _sandboxer_check(options: DoctorOptions, config: dict[str, Any]) -> Check:
    entry = (config.get("cri-sandboxers") or {}).get(options.handler)
    entry = entry if isinstance(entry, dict) else {}
    address = options.sandboxer_address or str(entry.get("address") or KWASM_SANDBOXER_SOCKET)
    name = str(entry.get("name") or options.handler)
    fix = f"start it: kwasm sandboxer --listen {address.removeprefix('unix://')}"
    answer = probe_platform(address, name)
    if answer.error is not None:
        return Check("sandboxer", FAIL, f"{address}: {answer.error}", fix, True)
    return Check("sandboxer", OK, f"{address} answers Platform: {answer.platform}", "", True)


def _crictl_checks(socket_address: str) -> list[Check]:
    try:
        require_tool("crictl")
    except ToolMissingError as exc:
        return [Check("crictl", FAIL, str(exc), "install cri-tools (crictl ≥ 1.25 speaks CRI v1)", True)]
    result = run_tool(["crictl", "--version"], timeout=15)
    version = last_line(result.stdout) or "unknown version"
    rows = [Check("crictl", OK, version, "", True)]
    pointed, where = crictl_targets_isulad(socket_address)
    fix = "" if pointed else crictl_endpoint_fix(socket_address)
    rows.append(Check("crictl endpoint", OK if pointed else FAIL, where, fix, True))
    return rows


def _limit_checks(proc_sys: Path) -> list[Check]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile_ok = hard == resource.RLIM_INFINITY or hard >= MIN_NOFILE
    rows = [
        Check(
            "open files (RLIMIT_NOFILE)",
            OK if nofile_ok else WARN,
            f"soft {soft}, hard {hard} (want hard ≥ {MIN_NOFILE})",
            "" if nofile_ok else "run the sandboxer with LimitNOFILE=1048576 (systemd) or `ulimit -Hn 1048576`",
            False,
        )
    ]
    for key, (minimum, why) in KERNEL_LIMITS.items():
        path = proc_sys / key.replace(".", "/")
        try:
            value = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            rows.append(Check(key, WARN, f"cannot read {path}: {exc}", "", False))
            continue
        good = value >= minimum
        fix = "" if good else f"sysctl -w {key}={minimum} (persist in /etc/sysctl.d/90-kwasm.conf)"
        rows.append(Check(key, OK if good else WARN, f"{value} (want ≥ {minimum}: {why})", fix, False))
    return rows


def run_checks(options: DoctorOptions) -> list[Check]:
    """Every doctor check, in table order."""
    daemon_check, config = _daemon_json_check(options)
    socket_address = isulad_socket(config)
    return [
        *_isula_checks(socket_address),
        daemon_check,
        _sandboxer_check(options, config),
        *_crictl_checks(socket_address),
        *_limit_checks(options.proc_sys),
    ]


def required_failed(checks: list[Check]) -> bool:
    """Whether any required check failed."""
    return any(check.required and check.status == FAIL for check in checks)


def as_json(checks: list[Check]) -> dict[str, Any]:
    """The ``--json`` document: ``{"ok": bool, "checks": [...]}``."""
    return {"ok": not required_failed(checks), "checks": [asdict(check) for check in checks]}
