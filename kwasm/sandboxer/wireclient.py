"""A lean gRPC client of the sandbox Controller for the density benchmark (unary calls, one connection).

grpcio's asyncio client costs ~0.3 ms of CPU per call here, as much as the sandboxer spends serving
it: on a 2-core machine the benchmark would mostly measure itself. iSulad's C++ client costs a small
fraction of that, so the benchmark's pod path speaks HTTP/2 directly: constant HPACK header blocks
out (no dynamic table, no Huffman), the server's blocks decoded by ``hpack`` (its two constant
blocks, ``:status 200`` and ``grpc-status 0``, recognised without decoding: they name only static
table entries and literals, so they cannot depend on or change the table), and a large receive
window replenished as answers arrive. Frames written in one turn of the event loop leave in one
``send(2)``. :meth:`WireClient.send` takes a callback (no future, no task: the benchmark's pod
pipeline), :meth:`WireClient.call` is the awaitable form. Everything else (CLI, tests) uses
grpcio's client.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from pathlib import Path

import hpack

from kwasm.sandboxer.h2frames import (
    ACK,
    CANCEL,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    MAX_FRAME,
    PING,
    PREFACE,
    RECEIVE_WINDOW,
    RESPONSE_HEADERS,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    TRAILERS_OK,
    WINDOW_UPDATE,
    frame,
    literal,
)
from kwasm.sandboxer.status import INTERNAL, UNAVAILABLE, StatusError

CONTROLLER = "/containerd.services.sandbox.v1.Controller/"
#: ``:method: POST``, ``:scheme: http`` (static entries 3 and 6), then the per-method fields.
_HEAD = b"\x83\x86"
_COMMON = ((b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers"))
#: HPACK's default dynamic table size, which this client never outgrows.
_TABLE_SIZE = 4096
#: The server's constant header blocks and what they decode to.
_CONSTANT_BLOCKS = {
    RESPONSE_HEADERS: {b":status": b"200", b"content-type": b"application/grpc"},
    TRAILERS_OK: {b"grpc-status": b"0"},
}

#: Called with an answer's gRPC status code, its message and (status OK) the serialized response.
Done = Callable[[int, str, bytes], None]


class WireClient(asyncio.Protocol):
    """Unary gRPC calls over one HTTP/2 connection; answers are matched to calls by stream id."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.decoder = hpack.Decoder()
        self.buffer = bytearray()
        self.next_stream = 1
        self.pending: dict[int, tuple[Done, bytearray]] = {}
        self.unacked = 0
        #: Header block per method once its fields are in the server's dynamic table.
        self.blocks: dict[str, bytes] = {}
        #: What this client added to the server's HPACK dynamic table, oldest first, and its size.
        self.table: list[tuple[bytes, bytes]] = []
        self.table_size = 0
        #: Frames waiting for the end of this turn of the event loop.
        self.out: list[bytes] = []
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, path: Path) -> WireClient:
        """Connect to the sandboxer's Controller socket."""
        _transport, client = await asyncio.get_running_loop().create_unix_connection(cls, str(path))
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        settings = frame(SETTINGS, 0, 0, struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW))
        update = frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", RECEIVE_WINDOW - 65535))
        transport.write(PREFACE + settings + update)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        pending, self.pending = self.pending, {}
        for done, _body in pending.values():
            done(UNAVAILABLE, f"connection closed: {exc}", b"")

    def _write(self, data: bytes) -> None:
        """Queue ``data``; everything queued in this turn of the loop is sent at once."""
        if not self.out:
            self.loop.call_soon(self._flush)
        self.out.append(data)

    def _flush(self) -> None:
        data, self.out = b"".join(self.out), []
        if self.transport is not None:
            self.transport.write(data)

    def send(self, method: str, request: bytes, done: Done) -> int:
        """Start a call of ``Controller/<method>``; ``done`` gets its outcome. Returns the stream id."""
        if self.transport is None:
            done(UNAVAILABLE, "connection closed", b"")
            return 0
        block = self.blocks.get(method) or self._block(method)
        stream_id = self.next_stream
        self.next_stream += 2
        message = b"\0" + len(request).to_bytes(4, "big") + request
        out = [frame(HEADERS, END_HEADERS, stream_id, block)]
        for offset in range(0, len(message), MAX_FRAME):
            last = offset + MAX_FRAME >= len(message)
            out.append(frame(DATA, END_STREAM if last else 0, stream_id, message[offset : offset + MAX_FRAME]))
        self.pending[stream_id] = (done, bytearray())
        self._write(b"".join(out))
        return stream_id

    async def call(self, method: str, request: bytes) -> bytes:
        """Call ``Controller/<method>`` with a serialized request; returns the serialized response."""
        future: asyncio.Future[bytes] = self.loop.create_future()

        def done(code: int, message: str, body: bytes) -> None:
            if future.done():
                return
            if code:
                future.set_exception(StatusError(code, message))
            else:
                future.set_result(body)

        stream_id = self.send(method, request, done)
        try:
            return await future
        except asyncio.CancelledError:  # the caller gave up: tell the server to stop the call
            if self.pending.pop(stream_id, None) is not None:
                self._write(frame(RST_STREAM, 0, stream_id, struct.pack(">I", CANCEL)))
            raise

    def _block(self, method: str) -> bytes:
        """The header block of a first call: its fields enter the server's table, as grpc clients do.

        Later calls of that method send only their table indices (see ``blocks``).
        """
        fields = [(b":path", (CONTROLLER + method).encode()), *_COMMON]
        size = sum(len(name) + len(value) + 32 for name, value in fields)
        if self.table_size + size > _TABLE_SIZE or len(self.table) + len(fields) > 126 - 61:
            # never evict (every remembered index stays valid) and keep every index one byte long
            return _HEAD + b"".join(literal(name, value) for name, value in fields)
        self.table.extend(fields)
        self.table_size += size
        self.blocks = {}  # every index moved
        for known in {path for name, path in self.table if name == b":path"}:
            refs = [len(self.table) - self.table.index(field) + 61 for field in [(b":path", known), *_COMMON]]
            self.blocks[known[len(CONTROLLER) :].decode()] = _HEAD + bytes(0x80 | ref for ref in refs)
        return _HEAD + b"".join(literal(name, value, indexing=True) for name, value in fields)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset, size = 0, len(buffer)
        while size - offset >= 9:
            length = int.from_bytes(buffer[offset : offset + 3], "big")
            if size - offset - 9 < length:
                break
            kind, flags = buffer[offset + 3], buffer[offset + 4]
            stream_id = int.from_bytes(buffer[offset + 5 : offset + 9], "big") & 0x7FFFFFFF
            payload = bytes(buffer[offset + 9 : offset + 9 + length])
            offset += 9 + length
            self._frame(kind, flags, stream_id, payload)
        del buffer[:offset]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.transport is None:
            return
        if kind == DATA:
            self.unacked += len(payload)
            if self.unacked >= RECEIVE_WINDOW // 2:
                self._write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.unacked)))
                self.unacked = 0
            if stream_id in self.pending:
                self.pending[stream_id][1].extend(payload)
        elif kind == HEADERS:
            fields = _CONSTANT_BLOCKS.get(payload)
            if fields is None:
                fields = dict(self.decoder.decode(payload, raw=True))
            if flags & END_STREAM and stream_id in self.pending:
                self._finish(stream_id, fields)
        elif kind == SETTINGS and not flags & ACK:
            self._write(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self._write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM and stream_id in self.pending:
            done, _body = self.pending.pop(stream_id)
            done(INTERNAL, "stream reset by the server", b"")
        elif kind == GOAWAY:
            self.transport.close()

    def _finish(self, stream_id: int, fields: dict[bytes, bytes]) -> None:
        done, body = self.pending.pop(stream_id)
        code = int(fields.get(b"grpc-status", b"2"))
        if code:
            done(code, fields.get(b"grpc-message", b"").decode(errors="replace"), b"")
        elif len(body) < 5:
            done(INTERNAL, "answer without a message", b"")
        else:
            done(0, "", bytes(body[5:]))

    async def close(self) -> None:
        """Close the connection (after sending what is queued)."""
        if self.transport is not None:
            self._flush()
            self.transport.close()
