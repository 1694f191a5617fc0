"""Process-wide CLI settings set by the top-level callback (``--root``)."""

from __future__ import annotations

import os
from pathlib import Path

_root_override: Path | None = None


def set_root(path: Path | None) -> None:
    """Use ``path`` as the kwasm data root for this invocation (``--root``)."""
    global _root_override
    _root_override = path


def data_root() -> Path:
    """The kwasm data root: ``--root``, else ``$KWASM_ROOT``, else /var/lib/kwasm (root) or the XDG data dir."""
    if _root_override is not None:
        return _root_override
    env = os.environ.get("KWASM_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/kwasm")
    import platformdirs

    return Path(platformdirs.user_data_dir("kwasm"))
