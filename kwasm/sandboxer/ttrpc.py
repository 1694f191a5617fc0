"""ttrpc over a unix socket on asyncio: a server and a client (framing in :mod:`.ttrpcframe`).

A frame is a 10-byte header (``length u32 BE | stream_id u32 BE | type u8 | flags u8``) followed by
``length`` bytes. A request frame (type 1) carries a ``ttrpc.Request``; the answer on the same stream
id is a response frame (type 2) carrying a ``ttrpc.Response`` whose ``status.code`` is a gRPC code.
Messages over 4 MiB are refused with RESOURCE_EXHAUSTED, as containerd's ttrpc does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from google.protobuf.message import DecodeError

from kwasm.api import ttrpc_pb2
from kwasm.sandboxer.backpressure import ReadPausingProtocol
from kwasm.sandboxer.inline import drive
from kwasm.sandboxer.status import (
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    OK,
    RESOURCE_EXHAUSTED,
    UNIMPLEMENTED,
    StatusError,
)
from kwasm.sandboxer.ttrpcframe import (
    HEADER,
    MESSAGE_LENGTH_MAX,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    encode_frame,
    socket_path,
)

log = logging.getLogger(__name__)

#: Larger frames are not even drained: the connection is closed (it cannot be a ttrpc peer).
DISCARD_LIMIT = 64 << 20

#: A method handler: request payload bytes in, response payload bytes out (or StatusError).
Handler = Callable[[bytes], Awaitable[bytes]]


def _response(stream_id: int, code: int, message: str, payload: bytes = b"") -> bytes:
    response = ttrpc_pb2.Response(payload=payload)
    if code != OK:
        response.status.code = code
        response.status.message = message
    return encode_frame(stream_id, TYPE_RESPONSE, response.SerializeToString())


class TtrpcServer:
    """Serves registered ``service/method`` handlers on one unix socket.

    Frames are parsed where they arrive (an asyncio Protocol, no stream reader task); a request is
    answered inline when its handler does not wait, else in a task of its own.
    """

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], Handler] = {}
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_ServerConnection] = set()
        self._closing = False

    def register(self, service: str, method: str, handler: Handler) -> None:
        """Route ``service``/``method`` to ``handler``."""
        self._handlers[(service, method)] = handler

    def has_service(self, service: str) -> bool:
        """Whether any method of ``service`` is registered."""
        return any(name == service for name, _ in self._handlers)

    async def start(self, path: Path) -> None:
        """Listen on the unix socket ``path`` (the caller has removed any stale file)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _ServerConnection(self), path=str(path))

    async def close(self) -> None:
        """Stop listening, drop every connection and cancel calls in flight."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _dispatch(self, stream_id: int, payload: bytes) -> bytes:
        request = ttrpc_pb2.Request()
        try:
            request.ParseFromString(payload)
        except DecodeError:
            return _response(stream_id, INVALID_ARGUMENT, "malformed ttrpc request")
        handler = self._handlers.get((request.service, request.method))
        if handler is None:
            what = "method" if self.has_service(request.service) else "service"
            name = request.method if what == "method" else request.service
            return _response(stream_id, UNIMPLEMENTED, f"{what} {name} is not implemented")
        try:
            result = handler(request.payload)
            if request.timeout_nano > 0:
                body = await asyncio.wait_for(result, request.timeout_nano / 1e9)
            else:
                body = await result
        except StatusError as exc:
            return _response(stream_id, exc.code, exc.message)
        except DecodeError:
            return _response(stream_id, INVALID_ARGUMENT, f"malformed {request.method} request")
        except TimeoutError:
            return _response(stream_id, DEADLINE_EXCEEDED, "deadline exceeded")
        except Exception as exc:
            log.exception("ttrpc %s/%s failed", request.service, request.method)
            return _response(stream_id, INTERNAL, str(exc) or type(exc).__name__)
        return _response(stream_id, OK, "", body)


class _ServerConnection(ReadPausingProtocol):
    """One client of a :class:`TtrpcServer`: frames in, answers out, its pending calls."""

    def __init__(self, server: TtrpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.calls: set[asyncio.Future[bytes]] = set()
        #: Bytes of an oversized frame still to skip, its stream id and length.
        self.skipping = 0
        self.skipped = (0, 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.server._closing:  # accepted just before close(): it would outlive the server
            transport.close()
            return
        self.transport = transport
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self.transport = None
        for call in list(self.calls):  # nobody is left to read the answers (a pending Wait, say)
            call.cancel()

    def abort(self) -> None:
        """Drop the connection (the server is closing)."""
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.skipping:
            skip = min(self.skipping, len(data))
            self.skipping -= skip
            data = data[skip:]
            if self.skipping:
                return
            self._too_large(*self.skipped)
        buffer = self.buffer
        buffer += data
        offset, size = 0, len(buffer)
        answers: list[bytes] = []  # inline answers leave together, in one send(2)
        while size - offset >= HEADER.size and self.transport is not None:
            length, stream_id, message_type, _flags = HEADER.unpack_from(buffer, offset)
            if length > MESSAGE_LENGTH_MAX:
                if length > DISCARD_LIMIT:
                    log.warning("closing ttrpc connection: frame of %d bytes", length)
                    self.transport.write(b"".join(answers))
                    answers = []
                    self.abort()
                    break
                available = min(length, size - offset - HEADER.size)
                offset += HEADER.size + available
                if available < length:
                    self.skipping, self.skipped = length - available, (stream_id, length)
                    break
                self._too_large(stream_id, length)
                continue
            if size - offset - HEADER.size < length:
                break
            payload = bytes(buffer[offset + HEADER.size : offset + HEADER.size + length])
            offset += HEADER.size + length
            if message_type != TYPE_REQUEST:
                continue
            call = drive(self.server._dispatch(stream_id, payload), self.loop)
            if call.done():  # answered without waiting: no task, no extra turn of the loop
                answers.append(call.result())
            else:
                self.calls.add(call)
                call.add_done_callback(self._answer)
        del buffer[:offset]
        if answers and self.transport is not None:
            self.transport.write(b"".join(answers))

    def _too_large(self, stream_id: int, length: int) -> None:
        if self.transport is not None:
            message = f"message length {length} exceeds maximum message size of {MESSAGE_LENGTH_MAX}"
            self.transport.write(_response(stream_id, RESOURCE_EXHAUSTED, message))

    def _answer(self, call: asyncio.Future[bytes]) -> None:
        self.calls.discard(call)
        if not call.cancelled() and self.transport is not None:
            self.transport.write(call.result())


#: Called with an answer's status code, its message and (status OK) the response payload.
Done = Callable[[int, str, bytes], None]


class TtrpcClient(asyncio.Protocol):
    """A ttrpc client on one unix-socket connection; calls may run concurrently.

    :meth:`send` takes a callback (no future, no task); :meth:`call` is the awaitable form. Frames
    written in one turn of the event loop leave in one ``send(2)``.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._next_stream = 1
        self._pending: dict[int, Done] = {}
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._closed: asyncio.Future[None] = self._loop.create_future()

    @classmethod
    async def connect(cls, path: Path | str) -> TtrpcClient:
        """Connect to ``path`` (a plain path, ``unix://`` or ``ttrpc+unix://`` address)."""
        _transport, client = await asyncio.get_running_loop().create_unix_connection(cls, socket_path(path))
        return client

    @property
    def connected(self) -> bool:
        """Whether the connection is up."""
        return self._transport is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        message = f"ttrpc connection closed: {exc}" if exc else "ttrpc connection closed"
        pending, self._pending = self._pending, {}
        for done in pending.values():
            done(-1, message, b"")
        if not self._closed.done():
            self._closed.set_result(None)

    def send(self, service: str, method: str, payload: bytes, done: Done, timeout: float | None = None) -> int:
        """Start a call of ``service/method``; ``done`` gets its outcome (code -1: the connection is gone).

        Returns the stream id.
        """
        request = ttrpc_pb2.Request(service=service, method=method, payload=payload)
        if timeout:
            request.timeout_nano = int(timeout * 1e9)
        return self.send_request(request.SerializeToString(), done)

    def send_request(self, request: bytes, done: Done) -> int:
        """Like :meth:`send` with an already serialized ``ttrpc.Request``."""
        if self._transport is None:  # nobody would ever answer
            done(-1, "ttrpc connection closed", b"")
            return 0
        stream_id = self._next_stream
        self._next_stream += 2
        self._pending[stream_id] = done
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(encode_frame(stream_id, TYPE_REQUEST, request))
        return stream_id

    def _flush(self) -> None:
        data, self._out = b"".join(self._out), []
        if self._transport is not None:
            self._transport.write(data)

    async def call(self, service: str, method: str, payload: bytes, timeout: float | None = None) -> bytes:
        """Call ``service/method`` with serialized ``payload``; returns the response payload."""
        future: asyncio.Future[bytes] = self._loop.create_future()

        def done(code: int, message: str, body: bytes) -> None:
            if future.done():
                return
            if code < 0:
                future.set_exception(ConnectionError(message))
            elif code != OK:
                future.set_exception(StatusError(code, message))
            else:
                future.set_result(body)

        stream_id = self.send(service, method, payload, done, timeout)
        try:
            return await future
        finally:
            self._pending.pop(stream_id, None)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, size = 0, len(buffer)
        while size - offset >= HEADER.size:
            length, stream_id, message_type, _flags = HEADER.unpack_from(buffer, offset)
            if size - offset - HEADER.size < length:
                break
            payload = bytes(buffer[offset + HEADER.size : offset + HEADER.size + length])
            offset += HEADER.size + length
            if message_type != TYPE_RESPONSE or stream_id not in self._pending:
                continue
            try:
                response = ttrpc_pb2.Response.FromString(payload)
            except DecodeError:
                if self._transport is not None:
                    self._transport.close()  # not a ttrpc server: every call fails with ConnectionError
                return
            done = self._pending.pop(stream_id)
            if response.status.code != OK:
                done(response.status.code, response.status.message, b"")
            else:
                done(OK, "", response.payload)
        del buffer[:offset]

    async def close(self) -> None:
        """Close the connection (after sending what is queued); calls still waiting fail with ConnectionError."""
        if self._transport is not None:
            self._flush()
            self._transport.close()
        await self._closed
