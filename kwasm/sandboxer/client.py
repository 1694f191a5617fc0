"""Clients of a running sandboxer, built from the project's own protos (CLI, benchmark, tests).

:class:`SandboxerClient` speaks gRPC to the Controller/Admin socket; :class:`TaskClient` speaks
ttrpc to the task address Controller.Start returns. Both raise :class:`StatusError` for a non-OK
status and :class:`SandboxerError` when the sandboxer cannot be reached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from kwasm.api import sandbox_pb2, sandboxer_admin_pb2, shim_pb2
from kwasm.errors import SandboxerError
from kwasm.sandboxer.status import UNAVAILABLE, StatusError
from kwasm.sandboxer.ttrpc import TtrpcClient

ResponseT = TypeVar("ResponseT", bound=Message)
CONTROLLER = "/containerd.services.sandbox.v1.Controller/"
ADMIN_LIST = "/kwasm.sandboxer.v1.Admin/List"
TASK_SERVICE = "containerd.task.v2.Task"


class SandboxerClient:
    """gRPC client of the sandbox Controller (and kwasm's Admin service) on a unix socket."""

    def __init__(self, listen: Path) -> None:
        self.listen = listen
        self._channel = grpc.aio.insecure_channel(
            f"unix:{listen}", options=[("grpc.max_receive_message_length", 1 << 30)]
        )

    async def _call(self, path: str, request: Message, response_type: type[ResponseT], **kw: Any) -> ResponseT:
        method = self._channel.unary_unary(
            path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_type.FromString
        )
        try:
            response: ResponseT = await method(request, **kw)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().value[0]
            if code == UNAVAILABLE:
                raise SandboxerError(f"no sandboxer answers on {self.listen}: {exc.details()}") from exc
            raise StatusError(code, exc.details() or "") from exc
        return response

    async def controller(self, method: str, request: Message, response_type: type[ResponseT]) -> ResponseT:
        """Call ``Controller/<method>``."""
        return await self._call(CONTROLLER + method, request, response_type)

    async def create(self, request: sandbox_pb2.ControllerCreateRequest) -> sandbox_pb2.ControllerCreateResponse:
        """Controller.Create."""
        return await self.controller("Create", request, sandbox_pb2.ControllerCreateResponse)

    async def start(self, sandbox_id: str) -> sandbox_pb2.ControllerStartResponse:
        """Controller.Start."""
        request = sandbox_pb2.ControllerStartRequest(sandbox_id=sandbox_id)
        return await self.controller("Start", request, sandbox_pb2.ControllerStartResponse)

    async def update(self, request: sandbox_pb2.ControllerUpdateRequest) -> sandbox_pb2.ControllerUpdateResponse:
        """Controller.Update."""
        return await self.controller("Update", request, sandbox_pb2.ControllerUpdateResponse)

    async def stop(self, sandbox_id: str, timeout_secs: int = 0) -> sandbox_pb2.ControllerStopResponse:
        """Controller.Stop."""
        request = sandbox_pb2.ControllerStopRequest(sandbox_id=sandbox_id, timeout_secs=timeout_secs)
        return await self.controller("Stop", request, sandbox_pb2.ControllerStopResponse)

    async def wait(self, sandbox_id: str) -> sandbox_pb2.ControllerWaitResponse:
        """Controller.Wait (long-lived)."""
        request = sandbox_pb2.ControllerWaitRequest(sandbox_id=sandbox_id)
        return await self.controller("Wait", request, sandbox_pb2.ControllerWaitResponse)

    async def status(self, sandbox_id: str, verbose: bool = False) -> sandbox_pb2.ControllerStatusResponse:
        """Controller.Status."""
        request = sandbox_pb2.ControllerStatusRequest(sandbox_id=sandbox_id, verbose=verbose)
        return await self.controller("Status", request, sandbox_pb2.ControllerStatusResponse)

    async def shutdown(self, sandbox_id: str) -> sandbox_pb2.ControllerShutdownResponse:
        """Controller.Shutdown."""
        request = sandbox_pb2.ControllerShutdownRequest(sandbox_id=sandbox_id)
        return await self.controller("Shutdown", request, sandbox_pb2.ControllerShutdownResponse)

    async def list(self, sandbox_id: str = "") -> sandboxer_admin_pb2.ListResponse:
        """Admin.List: every sandbox and process, plus the sandboxer's RSS and descriptor count."""
        request = sandboxer_admin_pb2.ListRequest(sandbox_id=sandbox_id)
        return await self._call(ADMIN_LIST, request, sandboxer_admin_pb2.ListResponse)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()


class TaskClient:
    """ttrpc client of ``containerd.task.v2.Task``."""

    def __init__(self, connection: TtrpcClient) -> None:
        self.connection = connection

    @classmethod
    async def connect(cls, address: str) -> TaskClient:
        """Connect to a ``ttrpc+unix://`` address."""
        try:
            return cls(await TtrpcClient.connect(address))
        except OSError as exc:
            raise SandboxerError(f"cannot connect to task address {address}: {exc}") from exc

    async def call(self, method: str, request: Message, response_type: type[ResponseT]) -> ResponseT:
        """Call ``Task/<method>`` and decode its response."""
        payload = await self.connection.call(TASK_SERVICE, method, request.SerializeToString())
        return response_type.FromString(payload)

    async def create(self, request: shim_pb2.CreateTaskRequest) -> shim_pb2.CreateTaskResponse:
        """Task.Create."""
        return await self.call("Create", request, shim_pb2.CreateTaskResponse)

    async def start(self, task_id: str, exec_id: str = "") -> shim_pb2.StartResponse:
        """Task.Start."""
        return await self.call("Start", shim_pb2.StartRequest(id=task_id, exec_id=exec_id), shim_pb2.StartResponse)

    async def state(self, task_id: str, exec_id: str = "") -> shim_pb2.StateResponse:
        """Task.State."""
        return await self.call("State", shim_pb2.StateRequest(id=task_id, exec_id=exec_id), shim_pb2.StateResponse)

    async def wait(self, task_id: str, exec_id: str = "") -> shim_pb2.WaitResponse:
        """Task.Wait."""
        return await self.call("Wait", shim_pb2.WaitRequest(id=task_id, exec_id=exec_id), shim_pb2.WaitResponse)

    async def kill(self, task_id: str, signal: int = 9, exec_id: str = "", all: bool = False) -> None:
        """Task.Kill."""
        request = shim_pb2.KillRequest(id=task_id, exec_id=exec_id, signal=signal, all=all)
        await self.call("Kill", request, Empty)

    async def delete(self, task_id: str, exec_id: str = "") -> shim_pb2.DeleteResponse:
        """Task.Delete."""
        request = shim_pb2.DeleteRequest(id=task_id, exec_id=exec_id)
        return await self.call("Delete", request, shim_pb2.DeleteResponse)

    async def shutdown(self, task_id: str) -> None:
        """Task.Shutdown."""
        await self.call("Shutdown", shim_pb2.ShutdownRequest(id=task_id), Empty)

    async def close(self) -> None:
        """Close the connection."""
        await self.connection.close()
