"""Pod sandbox ("pause") containers, which containerd's CRI starts through the pod's runtime.

containerd 1.6/1.7 CRI has no sandbox API: it runs each pod's pause image as a task of the pod's
runtime (config.json annotation ``io.kubernetes.cri.container-type: sandbox``) and then creates
the pod's containers with ``io.kubernetes.cri.sandbox-id`` naming it. A pause container runs no
wasm: here it becomes a registry sandbox (so the pod's containers join it, as they do under the
sandbox API) plus a task that is RUNNING from Start until it is killed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.empty_pb2 import Empty

from kwasm.api import shim_pb2
from kwasm.sandboxer.model import CREATED, RUNNING, STOPPED
from kwasm.sandboxer.pbutil import metrics_any, timestamp
from kwasm.sandboxer.rootfs import unmount_rootfs
from kwasm.sandboxer.status import FAILED_PRECONDITION, UNIMPLEMENTED, StatusError

CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
SANDBOX_TYPE = "sandbox"


def is_pod_sandbox(annotations: dict[str, str]) -> bool:
    """Whether config.json annotations mark CRI's pod sandbox (pause) container."""
    return annotations.get(CONTAINER_TYPE_ANNOTATION) == SANDBOX_TYPE


@dataclass(eq=False)
class PauseTask:
    """The task of a pod's pause container: it only waits to be killed."""

    id: str
    bundle: str
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    rootfs_mount: str = ""
    status: int = CREATED
    exit_status: int = 0
    exited_at: float | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> shim_pb2.StartResponse:
        """Mark it running."""
        if self.status != CREATED:
            raise StatusError(FAILED_PRECONDITION, f"pod sandbox {self.id} is not created")
        self.status = RUNNING
        return shim_pb2.StartResponse(pid=0)

    def kill(self, signal: int) -> bool:
        """Stop it (exit status 128 + signal, as a killed pause process reports); True if it was running."""
        if signal == 0 or self.status == STOPPED:
            return False
        self.status = STOPPED
        self.exit_status = 128 + signal
        self.exited_at = time.time()
        self.stopped.set()
        return True

    def state(self) -> shim_pb2.StateResponse:
        """State as the Task API reports it."""
        response = shim_pb2.StateResponse(
            id=self.id, bundle=self.bundle, pid=0, status=self.status,  # type: ignore[arg-type]
            stdin=self.stdin, stdout=self.stdout, stderr=self.stderr, exit_status=self.exit_status,
        )
        if self.exited_at is not None:
            response.exited_at.CopyFrom(timestamp(self.exited_at))
        return response

    async def wait(self) -> shim_pb2.WaitResponse:
        """Return once it is stopped."""
        await self.stopped.wait()
        return shim_pb2.WaitResponse(exit_status=self.exit_status, exited_at=timestamp(self.exited_at or 0.0))

    def delete(self) -> shim_pb2.DeleteResponse:
        """Unmount its rootfs; a running pause task cannot be deleted."""
        if self.status == RUNNING:
            raise StatusError(FAILED_PRECONDITION, f"pod sandbox {self.id} is running")
        if self.rootfs_mount:
            unmount_rootfs(Path(self.rootfs_mount))
            self.rootfs_mount = ""
        response = shim_pb2.DeleteResponse(pid=0, exit_status=self.exit_status)
        if self.exited_at is not None:
            response.exited_at.CopyFrom(timestamp(self.exited_at))
        return response

    @staticmethod
    def pids() -> shim_pb2.PidsResponse:
        """No process."""
        return shim_pb2.PidsResponse()

    @staticmethod
    def stats() -> shim_pb2.StatsResponse:
        """No guest, no memory."""
        return shim_pb2.StatsResponse(stats=metrics_any(0, 0))

    @staticmethod
    def accepted() -> Empty:
        """CloseIO and ResizePty: nothing to do."""
        return Empty()

    def refuse_exec(self) -> Empty:
        """A pause container runs nothing, so nothing can be exec'd in it."""
        raise StatusError(UNIMPLEMENTED, f"exec in the pod sandbox container {self.id} is not supported")
