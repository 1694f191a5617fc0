"""The gRPC ``containerd.services.sandbox.v1.Controller`` service (and kwasm's ``Admin.List``).

Served by :class:`~kwasm.sandboxer.grpcwire.GrpcServer`: each handler receives the raw request
bytes and parses them itself, so a request that is not valid protobuf answers INVALID_ARGUMENT
instead of an opaque INTERNAL; every :class:`StatusError` becomes the matching gRPC status.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psutil
from google.protobuf.message import DecodeError, Message

from kwasm.api import cri_pb2, sandbox_pb2, sandboxer_admin_pb2
from kwasm.sandboxer.grpcwire import GrpcServer, Handler
from kwasm.sandboxer.model import SANDBOX_READY, SANDBOX_STOPPED, Sandbox, pod_meta
from kwasm.sandboxer.pbutil import metrics_any, timestamp
from kwasm.sandboxer.registry import Registry
from kwasm.sandboxer.status import INTERNAL, INVALID_ARGUMENT, StatusError

CONTROLLER = "containerd.services.sandbox.v1.Controller"
ADMIN = "kwasm.sandboxer.v1.Admin"
#: Controller.Start/Status ``version``: the task API is containerd.task.v2 over ttrpc.
TASK_API_VERSION = 2
TASKS_EXTENSION = "tasks"
RequestT = TypeVar("RequestT", bound=Message)
_Route = tuple[type[Message], Callable[[Any], Awaitable[Message]]]
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "riscv64": "riscv64"}


class ControllerService:
    """Sandbox Controller handlers on top of a :class:`Registry`."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._process = psutil.Process()

    def register(self, server: GrpcServer) -> None:
        """Route every Controller method (and Admin.List) of ``server`` here."""
        controller: dict[str, _Route] = {
            "Create": (sandbox_pb2.ControllerCreateRequest, self.create),
            "Start": (sandbox_pb2.ControllerStartRequest, self.start),
            "Platform": (sandbox_pb2.ControllerPlatformRequest, self.platform),
            "Stop": (sandbox_pb2.ControllerStopRequest, self.stop),
            "Wait": (sandbox_pb2.ControllerWaitRequest, self.wait),
            "Status": (sandbox_pb2.ControllerStatusRequest, self.status),
            "Shutdown": (sandbox_pb2.ControllerShutdownRequest, self.shutdown),
            "Metrics": (sandbox_pb2.ControllerMetricsRequest, self.metrics),
            "Update": (sandbox_pb2.ControllerUpdateRequest, self.update),
        }
        admin: dict[str, _Route] = {"List": (sandboxer_admin_pb2.ListRequest, self.list)}
        for service, methods in ((CONTROLLER, controller), (ADMIN, admin)):
            for name, (request_type, call) in methods.items():
                server.register(service, name, _unary(request_type, call))

    async def create(self, request: sandbox_pb2.ControllerCreateRequest) -> Message:
        """Register a sandbox; ``options.value`` is a CRI PodSandboxConfig whatever its type_url."""
        if not request.sandbox_id:
            raise StatusError(INVALID_ARGUMENT, "sandbox id is empty")
        config = cri_pb2.PodSandboxConfig()
        try:
            config.ParseFromString(request.options.value)
        except DecodeError as exc:
            raise StatusError(INVALID_ARGUMENT, "options.value is not a runtime.v1.PodSandboxConfig") from exc
        sandbox = Sandbox(
            id=request.sandbox_id,
            created_at=time.time(),
            netns_path=request.netns_path,
            name=config.metadata.name,
            namespace=config.metadata.namespace,
            uid=config.metadata.uid,
            pod_meta=pod_meta(dict(config.labels), dict(config.annotations)),
        )
        try:
            self.registry.create(sandbox)
        except OSError as exc:
            raise StatusError(INTERNAL, f"cannot persist sandbox {request.sandbox_id}: {exc}") from exc
        return sandbox_pb2.ControllerCreateResponse(sandbox_id=request.sandbox_id)

    async def start(self, request: sandbox_pb2.ControllerStartRequest) -> Message:
        """Make the sandbox ready; its tasks are served at the shared ttrpc address."""
        sandbox = self.registry.start(request.sandbox_id)
        return sandbox_pb2.ControllerStartResponse(
            sandbox_id=sandbox.id,
            pid=0,
            created_at=timestamp(sandbox.created_at),
            address=self.registry.task_address,
            version=TASK_API_VERSION,
        )

    async def platform(self, request: sandbox_pb2.ControllerPlatformRequest) -> Message:
        """The host platform (the Kuasar sandboxer says "x86"; this one says what the host is)."""
        response = sandbox_pb2.ControllerPlatformResponse()
        response.platform.os = "linux"
        machine = platform.machine()
        response.platform.architecture = _ARCHITECTURES.get(machine, machine)
        return response

    async def stop(self, request: sandbox_pb2.ControllerStopRequest) -> Message:
        """Kill the sandbox's guests (waiting up to ``timeout_secs``) and mark it stopped."""
        await self.registry.stop(request.sandbox_id, float(request.timeout_secs) or None)
        return sandbox_pb2.ControllerStopResponse()

    async def wait(self, request: sandbox_pb2.ControllerWaitRequest) -> Message:
        """Long-lived: returns when the sandbox stops."""
        sandbox = await self.registry.wait(request.sandbox_id)
        return sandbox_pb2.ControllerWaitResponse(
            exit_status=sandbox.exit_status, exited_at=timestamp(sandbox.exited_at or time.time())
        )

    async def status(self, request: sandbox_pb2.ControllerStatusRequest) -> Message:
        """READY/NOTREADY with creation and exit times; ``verbose`` adds pod metadata and task counts."""
        sandbox = self.registry.sandbox(request.sandbox_id)
        response = sandbox_pb2.ControllerStatusResponse(
            sandbox_id=sandbox.id,
            pid=0,
            state="SANDBOX_READY" if sandbox.state == SANDBOX_READY else "SANDBOX_NOTREADY",
            created_at=timestamp(sandbox.created_at),
            address=self.registry.task_address,
            version=TASK_API_VERSION,
        )
        if sandbox.state == SANDBOX_STOPPED and sandbox.exited_at is not None:
            response.exited_at.CopyFrom(timestamp(sandbox.exited_at))
        if request.verbose:
            response.info.update(
                {
                    "name": sandbox.name,
                    "namespace": sandbox.namespace,
                    "uid": sandbox.uid,
                    "netns_path": sandbox.netns_path,
                    "tasks": str(len(sandbox.tasks)),
                }
            )
        return response

    async def shutdown(self, request: sandbox_pb2.ControllerShutdownRequest) -> Message:
        """Remove the sandbox, its tasks and its record."""
        await self.registry.shutdown(request.sandbox_id)
        return sandbox_pb2.ControllerShutdownResponse()

    async def metrics(self, request: sandbox_pb2.ControllerMetricsRequest) -> Message:
        """Running guests and their memory, as a containerd Metric with cgroup v2 Metrics data."""
        sandbox = self.registry.sandbox(request.sandbox_id)
        running = sum(p.guest is not None for t in sandbox.tasks.values() for p in t.processes())
        response = sandbox_pb2.ControllerMetricsResponse()
        response.metrics.timestamp.CopyFrom(timestamp(time.time()))
        response.metrics.id = sandbox.id
        response.metrics.data.CopyFrom(metrics_any(running, self.registry.memory_bytes(sandbox)))
        return response

    async def update(self, request: sandbox_pb2.ControllerUpdateRequest) -> Message:
        """Record the task list iSulad announces in ``extensions["tasks"]`` (JSON); other fields are ignored."""
        sandbox = self.registry.sandbox(request.sandbox_id)
        if "extensions.tasks" not in request.fields:
            return sandbox_pb2.ControllerUpdateResponse()
        if not request.HasField("sandbox") or TASKS_EXTENSION not in request.sandbox.extensions:
            raise StatusError(INVALID_ARGUMENT, 'fields names "extensions.tasks" but the sandbox has none')
        try:
            document = json.loads(request.sandbox.extensions[TASKS_EXTENSION].value or b"{}")
            task_ids = [str(task["task_id"]) for task in document.get("tasks") or []]
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StatusError(INVALID_ARGUMENT, f"extensions.tasks is not a task list: {exc}") from exc
        self.registry.announce(sandbox.id, task_ids)
        return sandbox_pb2.ControllerUpdateResponse()

    async def list(self, request: sandboxer_admin_pb2.ListRequest) -> Message:
        """Every sandbox with its processes, and the sandboxer's own RSS and descriptors."""
        registry = self.registry
        chosen = [registry.sandbox(request.sandbox_id)] if request.sandbox_id else registry.sandboxes.values()
        response = sandboxer_admin_pb2.ListResponse(
            pid=os.getpid(),
            rss_bytes=self._process.memory_info().rss,
            open_fds=self._process.num_fds(),
            task_address=registry.task_address,
        )
        for sandbox in chosen:
            info = response.sandboxes.add(
                id=sandbox.id,
                name=sandbox.name,
                namespace=sandbox.namespace,
                state=sandbox.state,
                created_at=timestamp(sandbox.created_at),
                memory_bytes=registry.memory_bytes(sandbox),
            )
            if sandbox.exited_at is not None:
                info.exited_at.CopyFrom(timestamp(sandbox.exited_at))
            for task in sandbox.tasks.values():
                for process in task.processes():
                    entry = info.processes.add(
                        task_id=task.id,
                        exec_id=process.exec_id,
                        status=process.status,
                        exit_status=process.exit_status,
                        memory_bytes=process.guest.memory_bytes() if process.guest is not None else 0,
                        stdout=process.stdout,
                        stderr=process.stderr,
                        bundle=task.bundle,
                    )
                    if process.started_at is not None:
                        entry.started_at.CopyFrom(timestamp(process.started_at))
                    if process.exited_at is not None:
                        entry.exited_at.CopyFrom(timestamp(process.exited_at))
        return response


def _unary(request_type: type[RequestT], call: Callable[[Any], Awaitable[Message]]) -> Handler:
    """Bytes in, bytes out; a DecodeError makes the server answer INVALID_ARGUMENT."""

    async def handle(payload: bytes) -> bytes:
        response = await call(request_type.FromString(payload))
        return response.SerializeToString()

    return handle
