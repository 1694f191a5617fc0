"""Ask a sandboxer socket a real ``containerd.services.sandbox.v1.Controller/Platform`` gRPC call.

This is the call iSulad's sandbox client uses to test that a sandboxer connection is alive.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

from kwasm.api import sandbox_pb2, sandbox_pb2_grpc

PROBE_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class PlatformAnswer:
    """``platform`` (``os/arch[/variant]``) when the sandboxer answered, else ``error`` says why not."""

    platform: str | None
    error: str | None


def probe_platform(address: str, sandboxer: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> PlatformAnswer:
    """Call ``Platform`` on the Unix socket ``address`` (path or ``unix://`` URL) as sandboxer ``sandboxer``."""
    path = Path(address.removeprefix("unix://"))
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return PlatformAnswer(None, "socket does not exist (sandboxer not running)")
    except OSError as exc:
        return PlatformAnswer(None, f"cannot stat socket: {exc.strerror or exc}")
    if not stat.S_ISSOCK(mode):
        return PlatformAnswer(None, "not a socket")
    with grpc.insecure_channel(f"unix://{path}") as channel:
        stub = sandbox_pb2_grpc.ControllerStub(channel)
        request = sandbox_pb2.ControllerPlatformRequest(sandbox_id="", sandboxer=sandboxer)
        try:
            response = stub.Platform(request, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = str(exc.details() if hasattr(exc, "details") else exc)
            name = code.name if code is not None else "ERROR"
            reason = "connection refused (nothing listens)" if "Connection refused" in details else details
            return PlatformAnswer(None, f"Platform call failed: {name}: {reason.split('; ')[0]}")
    platform = response.platform
    parts = [platform.os, platform.architecture] + ([platform.variant] if platform.variant else [])
    return PlatformAnswer("/".join(parts), None)
