"""ttrpc over a unix socket, written on asyncio: the framing, a server and a client.

A frame is a 10-byte header (``length u32 BE | stream_id u32 BE | type u8 | flags u8``) followed by
``length`` bytes. A request frame (type 1) carries a ``ttrpc.Request``; the answer on the same stream
id is a response frame (type 2) carrying a ``ttrpc.Response`` whose ``status.code`` is a gRPC code.
Messages over 4 MiB are refused with RESOURCE_EXHAUSTED, as containerd's ttrpc does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from google.protobuf.message import DecodeError

from kwasm.api import ttrpc_pb2
from kwasm.sandboxer.status import (
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    OK,
    RESOURCE_EXHAUSTED,
    UNIMPLEMENTED,
    StatusError,
)

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IIBB")
MESSAGE_LENGTH_MAX = 4 << 20
#: Larger frames are not even drained: the connection is closed (it cannot be a ttrpc peer).
DISCARD_LIMIT = 64 << 20
TYPE_REQUEST = 1
TYPE_RESPONSE = 2

#: A method handler: request payload bytes in, response payload bytes out (or StatusError).
Handler = Callable[[bytes], Awaitable[bytes]]


def encode_frame(stream_id: int, message_type: int, payload: bytes) -> bytes:
    """One frame: header plus payload."""
    return HEADER.pack(len(payload), stream_id, message_type, 0) + payload


def _response(stream_id: int, code: int, message: str, payload: bytes = b"") -> bytes:
    response = ttrpc_pb2.Response(payload=payload)
    if code != OK:
        response.status.code = code
        response.status.message = message
    return encode_frame(stream_id, TYPE_RESPONSE, response.SerializeToString())


async def _discard(reader: asyncio.StreamReader, length: int) -> None:
    while length > 0:
        chunk = await reader.read(min(length, 1 << 20))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", length)
        length -= len(chunk)


class TtrpcServer:
    """Serves registered ``service/method`` handlers on one unix socket; every request runs as a task."""

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], Handler] = {}
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._calls: set[asyncio.Task[None]] = set()
        self._closing = False

    def register(self, service: str, method: str, handler: Handler) -> None:
        """Route ``service``/``method`` to ``handler``."""
        self._handlers[(service, method)] = handler

    def has_service(self, service: str) -> bool:
        """Whether any method of ``service`` is registered."""
        return any(name == service for name, _ in self._handlers)

    async def start(self, path: Path) -> None:
        """Listen on the unix socket ``path`` (the caller has removed any stale file)."""
        self._server = await asyncio.start_unix_server(self._serve_connection, path=str(path))

    async def close(self) -> None:
        """Stop listening, drop every connection and cancel calls in flight."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        for call in list(self._calls):
            call.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:  # accepted just before close(): it would outlive the server
            writer.close()
            return
        self._connections.add(writer)
        calls: set[asyncio.Task[None]] = set()
        try:
            while True:
                header = await reader.readexactly(HEADER.size)
                length, stream_id, message_type, _flags = HEADER.unpack(header)
                if length > MESSAGE_LENGTH_MAX:
                    if length > DISCARD_LIMIT:
                        log.warning("closing ttrpc connection: frame of %d bytes", length)
                        return
                    await _discard(reader, length)
                    writer.write(
                        _response(
                            stream_id,
                            RESOURCE_EXHAUSTED,
                            f"message length {length} exceeds maximum message size of {MESSAGE_LENGTH_MAX}",
                        )
                    )
                    continue
                payload = await reader.readexactly(length)
                if message_type != TYPE_REQUEST:
                    continue
                call = asyncio.create_task(self._answer(writer, stream_id, payload))
                for registry in (self._calls, calls):
                    registry.add(call)
                    call.add_done_callback(registry.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()
            for call in list(calls):  # nobody is left to read the answers (a pending Wait, say)
                call.cancel()

    async def _answer(self, writer: asyncio.StreamWriter, stream_id: int, payload: bytes) -> None:
        frame = await self._dispatch(stream_id, payload)
        if writer.is_closing():
            return
        writer.write(frame)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

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


class TtrpcClient:
    """A ttrpc client on one unix-socket connection; calls may run concurrently."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_stream = 1
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._receiver = asyncio.create_task(self._receive())

    @classmethod
    async def connect(cls, path: Path | str) -> TtrpcClient:
        """Connect to ``path`` (a plain path, ``unix://`` or ``ttrpc+unix://`` address)."""
        address = str(path)
        for prefix in ("ttrpc+unix://", "unix://"):
            address = address.removeprefix(prefix)
        reader, writer = await asyncio.open_unix_connection(address, limit=MESSAGE_LENGTH_MAX + 1024)
        return cls(reader, writer)

    async def call(self, service: str, method: str, payload: bytes, timeout: float | None = None) -> bytes:
        """Call ``service/method`` with serialized ``payload``; returns the response payload."""
        if self._receiver.done():  # nobody would ever resolve the answer
            raise ConnectionError("ttrpc connection closed")
        stream_id = self._next_stream
        self._next_stream += 2
        request = ttrpc_pb2.Request(service=service, method=method, payload=payload)
        if timeout:
            request.timeout_nano = int(timeout * 1e9)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        try:
            self._writer.write(encode_frame(stream_id, TYPE_REQUEST, request.SerializeToString()))
            await self._writer.drain()
            return await future
        finally:
            self._pending.pop(stream_id, None)

    async def _receive(self) -> None:
        error: BaseException = ConnectionError("ttrpc connection closed")
        try:
            while True:
                header = await self._reader.readexactly(HEADER.size)
                length, stream_id, message_type, _flags = HEADER.unpack(header)
                payload = await self._reader.readexactly(length)
                pending = self._pending.get(stream_id)
                if message_type != TYPE_RESPONSE or pending is None or pending.done():
                    continue
                response = ttrpc_pb2.Response()
                response.ParseFromString(payload)
                if response.status.code != OK:
                    pending.set_exception(StatusError(response.status.code, response.status.message))
                else:
                    pending.set_result(response.payload)
        except (asyncio.IncompleteReadError, ConnectionError, DecodeError) as exc:
            error = ConnectionError(f"ttrpc connection closed: {exc}")
        finally:
            for pending in self._pending.values():
                if not pending.done():
                    pending.set_exception(error)

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with ConnectionError."""
        self._writer.close()
        self._receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self._receiver
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
