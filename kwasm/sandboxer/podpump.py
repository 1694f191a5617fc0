"""The density benchmark's pod path: every pod's five calls chained by callbacks, as a C++ client would.

A pod is Controller.Create -> Start -> Update (``extensions.tasks``) -> Task.Create -> Task.Start.
:class:`PodPump` sends each call from the callback of the answer before it (:meth:`WireClient.send`,
:meth:`TtrpcClient.send_request`): no coroutine, task or future per call, and the calls made in one
turn of the event loop leave in one ``send(2)`` per connection. Every answer's status is checked, and
Start's ``address`` must be the task address the pump talks to (the one field of an answer it uses).
The requests are what the protobuf builders make (:meth:`PodRequests.build`); since only the sandbox
id changes from pod to pod, :class:`PodRequests` builds them once per id length with a placeholder id
and splices each real id in, checked at build time against a second placeholder.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import DecodeError

from kwasm.api import sandbox_pb2, shim_pb2, ttrpc_pb2
from kwasm.sandboxer.launch import pod_config
from kwasm.sandboxer.status import OK
from kwasm.sandboxer.ttrpc import TtrpcClient
from kwasm.sandboxer.wireclient import WireClient

TASK_SERVICE = "containerd.task.v2.Task"
_PLACEHOLDERS = (b"~", b"^")

#: The serialized Controller.Create, Start and Update requests, then the ttrpc Requests of Task.Create and Start.
Requests = tuple[bytes, bytes, bytes, bytes, bytes]


def tasks_extension(task_ids: list[str], stdout: str = "") -> AnyMessage:
    """The ``extensions["tasks"]`` Any iSulad sends in Controller.Update."""
    tasks = [{"task_id": task_id, "spec": {}, "rootfs": [], "stdin": "", "stdout": stdout, "stderr": ""}
             for task_id in task_ids]
    return AnyMessage(type_url="github.com/containerd/containerd/Tasks", value=json.dumps({"tasks": tasks}).encode())


def create_request(sandbox_id: str) -> sandbox_pb2.ControllerCreateRequest:
    """Controller.Create as iSulad sends it: a serialized PodSandboxConfig with an empty ``type_url``."""
    return sandbox_pb2.ControllerCreateRequest(
        sandbox_id=sandbox_id, options=AnyMessage(value=pod_config(sandbox_id)), sandboxer="kwasm"
    )


def update_request(sandbox_id: str, task_ids: list[str], stdout: str = "") -> sandbox_pb2.ControllerUpdateRequest:
    """Controller.Update announcing ``task_ids`` as iSulad does before Task.Create."""
    request = sandbox_pb2.ControllerUpdateRequest(sandbox_id=sandbox_id, sandboxer="kwasm", fields=["extensions.tasks"])
    request.sandbox.sandbox_id = sandbox_id
    request.sandbox.sandboxer = "kwasm"
    request.sandbox.runtime.name = "io.containerd.wasm.v1"
    request.sandbox.labels["name"] = sandbox_id
    request.sandbox.extensions["tasks"].CopyFrom(tasks_extension(task_ids, stdout))
    return request


class PodRequests:
    """The five requests of a pod whose task runs ``bundle`` with ``stdout``; call it with a sandbox id."""

    def __init__(self, bundle: str, stdout: str = "") -> None:
        self.bundle = bundle
        self.stdout = stdout
        self._templates: dict[int, Requests | None] = {}

    def build(self, sandbox_id: str) -> Requests:
        """The requests as the protobuf builders serialize them; the task id is ``<sandbox_id>-c``."""
        task_id = f"{sandbox_id}-c"
        create = shim_pb2.CreateTaskRequest(id=task_id, bundle=self.bundle, stdout=self.stdout)
        return (
            create_request(sandbox_id).SerializeToString(),
            sandbox_pb2.ControllerStartRequest(sandbox_id=sandbox_id).SerializeToString(),
            update_request(sandbox_id, [task_id], self.stdout).SerializeToString(),
            ttrpc_pb2.Request(service=TASK_SERVICE, method="Create", payload=create.SerializeToString())
            .SerializeToString(),
            ttrpc_pb2.Request(
                service=TASK_SERVICE, method="Start", payload=shim_pb2.StartRequest(id=task_id).SerializeToString()
            ).SerializeToString(),
        )

    def __call__(self, sandbox_id: str) -> Requests:
        """The same bytes as :meth:`build`, spliced into the template of this id length."""
        size = len(sandbox_id)
        if size not in self._templates:
            self._templates[size] = self._template(size) if sandbox_id.isascii() else None
        template = self._templates[size]
        if template is None or not sandbox_id.isascii():
            return self.build(sandbox_id)
        mark, key = _PLACEHOLDERS[0] * size, sandbox_id.encode()
        create, start, update, task_create, task_start = (part.replace(mark, key) for part in template)
        return create, start, update, task_create, task_start

    def _template(self, size: int) -> Requests | None:
        """The requests of a placeholder id, if every byte that depends on the id is the id itself."""
        first, second = (self.build((mark * size).decode()) for mark in _PLACEHOLDERS)
        spliced = tuple(part.replace(_PLACEHOLDERS[0] * size, _PLACEHOLDERS[1] * size) for part in first)
        return first if spliced == second else None


class _Pod:
    """One pod on its way through the five calls."""

    __slots__ = ("began", "id", "pump", "requests", "step")

    def __init__(self, pump: PodPump, sandbox_id: str, requests: Requests) -> None:
        self.pump = pump
        self.id = sandbox_id
        self.requests = requests
        self.step = 0
        self.began = time.perf_counter()

    def answer(self, code: int, message: str, body: bytes) -> None:
        """The answer to the current call: make the next one, or finish."""
        pump = self.pump
        if code != OK:
            pump.finished(self, f"call {self.step + 1} of pod {self.id}: status {code}: {message}")
            return
        if self.step == 1:
            try:
                address = sandbox_pb2.ControllerStartResponse.FromString(body).address
            except DecodeError:
                pump.finished(self, f"pod {self.id}: Start answered a malformed response")
                return
            if address != pump.task_address:
                pump.finished(self, f"pod {self.id}: Start answered address {address!r}, not {pump.task_address!r}")
                return
        self.step += 1
        if self.step == 5:
            pump.finished(self, "")
        elif self.step < 3:
            pump.controller.send(("Create", "Start", "Update")[self.step], self.requests[self.step], self.answer)
        else:
            pump.tasks.send_request(self.requests[self.step], self.answer)


class PodPump:
    """Starts pods through one Controller and one Task connection, ``window`` of them in flight."""

    def __init__(self, controller: WireClient, tasks: TtrpcClient, task_address: str) -> None:
        self.controller = controller
        self.tasks = tasks
        self.task_address = task_address
        self.failures: list[str] = []
        self._next: Callable[[], tuple[str, Requests] | None] = lambda: None
        self._started: Callable[[str, float], None] = lambda sandbox_id, seconds: None
        self._in_flight = 0
        #: Launches asked for while one is under way (a call can fail at once, inside its own launch).
        self._wanted = 0
        self._launching = False
        self._all_done: asyncio.Future[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether both connections are still up (once one is gone no new pod is started)."""
        return self.controller.transport is not None and self.tasks.connected

    async def run(
        self,
        next_pod: Callable[[], tuple[str, Requests] | None],
        window: int,
        started: Callable[[str, float], None] | None = None,
    ) -> None:
        """Start pods from ``next_pod`` (None: no more) until it runs dry or a connection is lost;
        ``started`` gets each running pod's sandbox id and its create -> running seconds. Failed pods
        are listed in ``failures``."""
        self._next = next_pod
        self._started = started or (lambda sandbox_id, seconds: None)
        self._all_done = asyncio.get_running_loop().create_future()
        for _ in range(window):
            self._launch()
        if self._in_flight:
            await self._all_done

    def _launch(self) -> None:
        """Start the next pod; a pod that fails at once only asks the loop below for another."""
        self._wanted += 1
        if self._launching:
            return
        self._launching = True
        try:
            while self._wanted:
                self._wanted -= 1
                pod = self._next() if self.connected else None
                if pod is None:
                    if not self._in_flight and self._all_done is not None and not self._all_done.done():
                        self._all_done.set_result(None)
                    continue
                self._in_flight += 1
                sandbox_id, requests = pod
                self.controller.send("Create", requests[0], _Pod(self, sandbox_id, requests).answer)
        finally:
            self._launching = False

    def finished(self, pod: _Pod, failure: str) -> None:
        """``pod`` is running (no ``failure``) or failed; start the next one."""
        self._in_flight -= 1
        if failure:
            self.failures.append(failure)
        else:
            self._started(pod.id, time.perf_counter() - pod.began)
        self._launch()
