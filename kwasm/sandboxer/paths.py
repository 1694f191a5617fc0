"""Default locations of the sandboxer (kept import-light: the CLI reads them at start-up)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_LISTEN = Path("/run/kwasm-sandboxer.sock")
DEFAULT_DIR = Path("/run/kwasm")
TASK_SOCKET = "task.sock"
LOCK_FILE = "sandboxer.lock"
