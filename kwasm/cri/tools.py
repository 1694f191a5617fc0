"""The external tools of the iSulad path (``isula``, ``crictl``, ``systemctl``) and where they point.

Every path is overridable so nothing here needs the real /etc: ``$KWASM_ISULAD_SOCKET`` (else
daemon.json ``hosts``, else /var/run/isulad.sock), ``$CRI_CONFIG_FILE`` and
``$CONTAINER_RUNTIME_ENDPOINT`` (the variables crictl itself reads).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from kwasm.errors import ToolMissingError

ISULAD_SOCKET = "/var/run/isulad.sock"
ISULAD_SOCKET_ENV = "KWASM_ISULAD_SOCKET"
CRICTL_YAML = Path("/etc/crictl.yaml")
MIN_ISULAD_VERSION = (2, 1, 6)
ISULA_UNREACHABLE = "Can not connect with server"

INSTALL_HINTS = {
    "isula": "install iSulad (openEuler: `dnf install iSulad`)",
    "crictl": "install cri-tools (openEuler: `dnf install cri-tools`; or a release of kubernetes-sigs/cri-tools)",
    "systemctl": "restart the isulad daemon by hand",
}


def require_tool(name: str) -> str:
    """Absolute path of ``name`` on PATH; ToolMissingError naming the fix when it is absent."""
    found = shutil.which(name)
    if found is None:
        raise ToolMissingError(f"`{name}` is not on PATH: {INSTALL_HINTS.get(name, f'install {name}')}")
    return found


def run_tool(argv: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` capturing text output; ToolMissingError if it cannot start or times out."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except OSError as exc:
        raise ToolMissingError(f"cannot run `{argv[0]}`: {exc.strerror or exc}") from None
    except subprocess.TimeoutExpired:
        raise ToolMissingError(f"`{shlex.join(argv)}` did not finish within {timeout:.0f}s") from None


def last_line(text: str) -> str:
    """The last non-empty line of ``text`` (tools put the reason there), or ``""``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def socket_path(address: str) -> Path:
    """A ``unix://`` address or plain path as a Path with /var/run spelled /run (they are the same dir)."""
    path = address.removeprefix("unix://")
    if path.startswith("/var/run/"):
        path = "/run/" + path[len("/var/run/") :]
    return Path(path)


def isulad_socket(daemon_config: dict[str, Any] | None = None) -> str:
    """The address iSulad serves CRI on: ``$KWASM_ISULAD_SOCKET``, daemon.json ``hosts``, or the default."""
    env = os.environ.get(ISULAD_SOCKET_ENV)
    if env:
        return env if env.startswith("unix://") else f"unix://{env}"
    hosts = (daemon_config or {}).get("hosts")
    if isinstance(hosts, list):
        for host in hosts:
            if isinstance(host, str) and host.startswith("unix://"):
                return host
    return f"unix://{ISULAD_SOCKET}"


def socket_accepts(address: str, timeout: float = 1.0) -> bool:
    """Whether something listens on the Unix socket at ``address``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path(address)))
        except OSError:
            return False
    return True


def crictl_config_path() -> Path:
    """crictl's config file: ``$CRI_CONFIG_FILE`` or /etc/crictl.yaml."""
    env = os.environ.get("CRI_CONFIG_FILE")
    return Path(env) if env else CRICTL_YAML


def crictl_endpoint() -> tuple[str | None, str]:
    """crictl's runtime endpoint and where it comes from (``$CONTAINER_RUNTIME_ENDPOINT`` or crictl.yaml)."""
    env = os.environ.get("CONTAINER_RUNTIME_ENDPOINT")
    if env:
        return env, "$CONTAINER_RUNTIME_ENDPOINT"
    path = crictl_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None, f"{path} (absent)"
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "runtime-endpoint":
            return value.split("#", 1)[0].strip().strip("\"'") or None, str(path)
    return None, str(path)


def crictl_endpoint_fix(isulad_address: str) -> str:
    """The command that points crictl at iSulad."""
    return f"crictl config --set runtime-endpoint={isulad_address} (writes {crictl_config_path()})"


def crictl_targets_isulad(isulad_address: str) -> tuple[bool, str]:
    """Whether crictl talks to iSulad, with a one-line description of what it is pointed at."""
    endpoint, source = crictl_endpoint()
    if endpoint is None:
        return False, f"no runtime-endpoint in {source}; crictl would probe containerd/CRI-O sockets"
    if socket_path(endpoint) != socket_path(isulad_address):
        return False, f"runtime-endpoint is {endpoint} (from {source}), not iSulad's {isulad_address}"
    return True, f"runtime-endpoint {endpoint} (from {source})"


_VERSION = re.compile(r"^\s*Version:\s*(\d+)\.(\d+)\.(\d+)", re.MULTILINE)


def parse_isula_version(text: str) -> tuple[tuple[int, int, int] | None, tuple[int, int, int] | None]:
    """Client and server versions from ``isula version`` output (None where a section is missing)."""
    sections: dict[str, tuple[int, int, int]] = {}
    current = ""
    for line in text.splitlines():
        if line and not line.startswith((" ", "\t")) and line.rstrip().endswith(":"):
            current = line.rstrip()[:-1]
        match = _VERSION.match(line)
        if match and current and current not in sections:
            sections[current] = (int(match[1]), int(match[2]), int(match[3]))
    return sections.get("Client"), sections.get("Server")


def format_version(version: tuple[int, int, int]) -> str:
    """``(2, 1, 6)`` as ``2.1.6``."""
    return ".".join(str(part) for part in version)


def isula_images_has(output: str, name: str) -> bool:
    """Whether ``isula images`` output lists ``name`` (``repository:tag`` as iSulad normalises it)."""
    repository, _, tag = name.rpartition(":")
    if "/" in tag or not repository:
        repository, tag = name, "latest"
    for line in output.splitlines()[1:]:
        columns = line.split()
        if len(columns) >= 2 and (columns[0], columns[1]) == (repository, tag):
            return True
    return False
