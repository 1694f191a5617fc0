"""Shared recorder for the stand-ins of ``isula``, ``crictl`` and ``systemctl`` (tools that cannot run here).

Every call appends ``{"tool", "argv", "files"}`` to ``$FAKEBIN_STATE/calls.jsonl``; ``files`` holds
the text of each argument that names an existing ``.json`` file at call time. Behaviour is set by
files in ``$FAKEBIN_STATE`` (see each tool).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

STATE = Path(os.environ["FAKEBIN_STATE"])


def record(tool: str, argv: list[str], **extra: object) -> None:
    """Append this call to calls.jsonl."""
    files = {arg: Path(arg).read_text() for arg in argv if arg.endswith(".json") and Path(arg).is_file()}
    entry = {"tool": tool, "argv": [tool, *argv], "files": files, **extra}
    with (STATE / "calls.jsonl").open("a") as log:
        log.write(json.dumps(entry) + "\n")


def setting(name: str, default: str = "") -> str:
    """The content of ``$FAKEBIN_STATE/<name>`` (stripped), or ``default``."""
    path = STATE / name
    return path.read_text().strip() if path.exists() else default


def fail(message: str, code: int = 1) -> None:
    """Print ``message`` on stderr and exit ``code``."""
    print(message, file=sys.stderr)
    sys.exit(code)
