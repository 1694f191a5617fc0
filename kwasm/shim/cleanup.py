"""``delete`` for a task the sandboxer still holds: kill it, wait briefly, delete it, over the Task API."""

from __future__ import annotations

import asyncio
import contextlib

from kwasm.api import shim_pb2
from kwasm.sandboxer.status import StatusError
from kwasm.sandboxer.ttrpc import TtrpcClient
from kwasm.shim.layout import NamespaceLayout

SERVICE = "containerd.task.v2.Task"

SIGKILL = 9
CALL_TIMEOUT = 5.0


async def _delete(layout: NamespaceLayout, task_id: str) -> shim_pb2.DeleteResponse | None:
    client = await TtrpcClient.connect(layout.socket)
    try:
        kill = shim_pb2.KillRequest(id=task_id, signal=SIGKILL, all=True)
        try:
            await client.call(SERVICE, "Kill", kill.SerializeToString(), CALL_TIMEOUT)
        except StatusError:
            return None  # the sandboxer no longer has the task
        with contextlib.suppress(StatusError, TimeoutError):
            await client.call(SERVICE, "Wait", shim_pb2.WaitRequest(id=task_id).SerializeToString(), CALL_TIMEOUT)
        payload = await client.call(
            SERVICE, "Delete", shim_pb2.DeleteRequest(id=task_id).SerializeToString(), CALL_TIMEOUT
        )
        response = shim_pb2.DeleteResponse()
        response.ParseFromString(payload)
        return response
    finally:
        await client.close()


def delete_in_sandboxer(layout: NamespaceLayout, task_id: str) -> shim_pb2.DeleteResponse | None:
    """The DeleteResponse of ``task_id`` after killing and deleting it; None when the sandboxer lacks it."""
    try:
        return asyncio.run(_delete(layout, task_id))
    except (OSError, StatusError):
        return None
