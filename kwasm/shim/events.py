"""Publish task events to containerd through its publish binary.

containerd 1.6 passes ``-publish-binary`` (its own executable) and ``-address`` to the shim; an event
is published by running ``<binary> --address <containerd> publish --topic T --namespace NS`` with the
event packed in a ``google.protobuf.Any`` (type_url = the message's full name) on stdin. Events of
one task go out in order; different tasks' events go out concurrently (a few binaries at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from dataclasses import dataclass

from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message

log = logging.getLogger(__name__)

TOPIC_CREATE = "/tasks/create"
TOPIC_START = "/tasks/start"
TOPIC_EXIT = "/tasks/exit"
TOPIC_DELETE = "/tasks/delete"
TOPIC_EXEC_ADDED = "/tasks/exec-added"
TOPIC_EXEC_STARTED = "/tasks/exec-started"
#: How many publish binaries may run at once.
CONCURRENCY = 8
PUBLISH_TIMEOUT = 10.0
#: containerd's publish command gives up dialing after 2s, which a busy machine can exceed.
ATTEMPTS = 4
RETRY_DELAY = 0.5


def pack(event: Message) -> bytes:
    """The Any containerd's publish command reads from stdin."""
    return AnyMessage(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString()).SerializeToString()


@dataclass(frozen=True)
class PublishTarget:
    """Where events go: containerd's publish binary, its gRPC address and the namespace."""

    binary: str
    address: str
    namespace: str


class Publisher:
    """Runs the publish binary for each event; ``drain`` waits for everything queued."""

    def __init__(self, target: PublishTarget | None) -> None:
        self.target = target
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._last: dict[str, asyncio.Task[None]] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def publish(self, task_id: str, topic: str, event: Message) -> None:
        """Queue ``event`` on ``topic`` after the events already queued for ``task_id``."""
        if self.target is None:
            return
        previous = self._last.get(task_id)
        sent = asyncio.create_task(self._send(self.target, topic, pack(event), previous))
        self._last[task_id] = sent
        self._pending.add(sent)
        sent.add_done_callback(lambda done: self._forget(task_id, done))

    def _forget(self, task_id: str, done: asyncio.Task[None]) -> None:
        self._pending.discard(done)
        if self._last.get(task_id) is done:
            del self._last[task_id]

    async def _send(
        self, target: PublishTarget, topic: str, payload: bytes, previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        command = [target.binary, "--address", target.address, "publish", "--topic", topic,
                   "--namespace", target.namespace]
        error = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(RETRY_DELAY * attempt)
            async with self._slots:
                error = await asyncio.to_thread(_run_publish, command, payload)
            if not error:
                return
        log.warning("publishing %s failed after %d attempts: %s", topic, ATTEMPTS, error)

    def close(self) -> None:
        """Publish nothing more (events already queued still go out; see drain)."""
        self.target = None

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every queued event is published or failed; after ``timeout`` give up on the rest."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while self._pending:
            pending = list(self._pending)
            left = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if left is not None and left <= 0:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                return
            await asyncio.wait(pending, timeout=left)


def _run_publish(command: list[str], payload: bytes) -> str:
    """Run the publish binary (in a worker thread: no asyncio child watcher); returns an error or ""."""
    try:
        done = subprocess.run(command, input=payload, capture_output=True, timeout=PUBLISH_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode != 0:
        return done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
    return ""
