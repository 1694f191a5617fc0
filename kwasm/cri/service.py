"""Restart the iSulad daemon (through systemd) and wait until its socket answers again."""

from __future__ import annotations

import shutil
import time

from kwasm.cri.tools import last_line, run_tool, socket_accepts, socket_path
from kwasm.errors import ToolMissingError

SYSTEMD_STATES = {"running", "degraded", "starting", "initializing", "maintenance"}
HAND_RESTART = "stop the running `isulad` process and start `isulad` again"


def systemd_manages_services() -> bool:
    """Whether ``systemctl`` exists and this machine was booted with systemd (not ``offline``)."""
    if shutil.which("systemctl") is None:
        return False
    state = last_line(run_tool(["systemctl", "is-system-running"], timeout=15).stdout)
    return state in SYSTEMD_STATES


def restart_isulad(socket_address: str, timeout: float = 30.0) -> float:
    """``systemctl restart isulad``, then wait for ``socket_address`` to accept; seconds it took.

    ToolMissingError (saying how to restart by hand) when systemd does not run here, the restart
    fails, or the socket does not answer within ``timeout``.
    """
    if not systemd_manages_services():
        raise ToolMissingError(f"systemd does not run on this machine, so restart iSulad by hand: {HAND_RESTART}")
    started = time.monotonic()
    result = run_tool(["systemctl", "restart", "isulad"], timeout=timeout + 60)
    if result.returncode != 0:
        reason = last_line(result.stderr) or f"exit {result.returncode}"
        raise ToolMissingError(f"`systemctl restart isulad` failed ({reason}): see `journalctl -u isulad`")
    while not socket_accepts(socket_address):
        if time.monotonic() - started > timeout:
            raise ToolMissingError(
                f"iSulad's socket {socket_path(socket_address)} does not answer {timeout:.0f}s after the restart: "
                "see `journalctl -u isulad` (a wrong daemon.json value stops it)"
            )
        time.sleep(0.1)
    return time.monotonic() - started
