"""Mount the rootfs that containerd passes in Task.Create onto ``<bundle>/rootfs`` (and unmount it).

containerd 2.x sends the container's snapshot as ``CreateTaskRequest.rootfs`` (an overlay or bind
mount) and expects the shim to mount it where ``config.json``'s ``root.path`` points; iSulad sends
none (its rootfs is already mounted). Mounting needs CAP_SYS_ADMIN, as for any shim.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

from kwasm.api import containerd_types_pb2
from kwasm.sandboxer.bundle import BundleError

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2
_FLAGS = {"ro": MS_RDONLY, "rw": 0, "bind": MS_BIND, "rbind": MS_BIND | MS_REC}
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    result = _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags, data.encode() or None)
    if result != 0:
        error = ctypes.get_errno()
        raise BundleError(f"cannot mount {fstype} {source} on {target}: {os.strerror(error)}")


def mount_rootfs(mounts: Sequence[containerd_types_pb2.Mount], target: Path) -> None:
    """Mount ``mounts`` in order onto ``target`` (created 0711 if missing); on failure undo them."""
    target.mkdir(mode=0o711, exist_ok=True)
    done = 0
    try:
        for mount in mounts:
            flags = MS_BIND if mount.type == "bind" else 0
            data = []
            for option in mount.options:
                if option in _FLAGS:
                    flags |= _FLAGS[option]
                else:
                    data.append(option)
            _mount(mount.source, target, mount.type or "none", flags & ~MS_RDONLY if flags & MS_BIND else flags,
                   ",".join(data))
            done += 1
            if flags & MS_BIND and flags & MS_RDONLY:
                _mount("", target, "", MS_REMOUNT | MS_BIND | MS_RDONLY, "")
    except BundleError:
        for _ in range(done):
            unmount_rootfs(target)
        raise


def unmount_rootfs(target: Path) -> None:
    """Lazily unmount ``target`` (errors ignored: it may already be gone)."""
    _libc.umount2(str(target).encode(), MNT_DETACH)
