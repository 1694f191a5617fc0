"""``delete`` for a task the sandboxer still holds: kill it, wait briefly, delete it, over the Task API.

Blocking calls on one connection (:class:`~kwasm.sandboxer.ttrpcframe.BlockingTtrpcClient`): this runs
in the short-lived ``containerd-shim-kwasm-v1 delete`` process, where importing asyncio alone would cost
more than the three calls.
"""

from __future__ import annotations

import contextlib

from kwasm.api import shim_pb2
from kwasm.sandboxer.status import StatusError
from kwasm.sandboxer.ttrpcframe import BlockingTtrpcClient
from kwasm.shim.layout import NamespaceLayout

SERVICE = "containerd.task.v2.Task"

SIGKILL = 9
CALL_TIMEOUT = 5.0


def delete_in_sandboxer(layout: NamespaceLayout, task_id: str) -> shim_pb2.DeleteResponse | None:
    """The DeleteResponse of ``task_id`` after killing and deleting it; None when the sandboxer lacks it."""
    try:
        client = BlockingTtrpcClient(layout.socket, CALL_TIMEOUT)
    except OSError:
        return None
    try:
        kill = shim_pb2.KillRequest(id=task_id, signal=SIGKILL, all=True)
        client.call(SERVICE, "Kill", kill.SerializeToString())
        with contextlib.suppress(StatusError, TimeoutError):
            client.call(SERVICE, "Wait", shim_pb2.WaitRequest(id=task_id).SerializeToString())
        payload = client.call(SERVICE, "Delete", shim_pb2.DeleteRequest(id=task_id).SerializeToString())
        return shim_pb2.DeleteResponse.FromString(payload)
    except (OSError, StatusError):
        return None  # the sandboxer no longer has the task, or went away
    finally:
        client.close()
