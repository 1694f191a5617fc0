"""gRPC's HTTP/2 wire protocol, server side, on asyncio: unary calls on a unix socket.

Why not grpc.aio: it costs ~0.3 ms of CPU per unary call here (its completion queue runs on a poller
thread that hands every event to the event loop). This server parses frames where they arrive, on
the loop, and answers a handler that does not wait without a task of its own.

What it speaks (RFC 9113 and gRPC's HTTP/2 mapping): the client preface; SETTINGS (acknowledged; the
peer's INITIAL_WINDOW_SIZE and MAX_FRAME_SIZE are honoured); HEADERS and CONTINUATION (HPACK by the
``hpack`` package); DATA with padding; flow control both ways; PING; RST_STREAM (cancels the call);
GOAWAY; PRIORITY (ignored). A request is one length-prefixed message POSTed to ``/service/method``;
the answer is HEADERS, DATA and trailers, or a Trailers-Only error. Unknown methods answer
UNIMPLEMENTED, messages over 4 MiB RESOURCE_EXHAUSTED, compressed messages UNIMPLEMENTED (INTERNAL
without a ``grpc-encoding``). A peer that breaks HTTP/2 gets GOAWAY and is disconnected; the server
keeps serving everyone else. What a connection may hold is bounded: streams (``MAX_STREAMS``, of
which ``MAX_OPENING`` still receiving their request), bytes of unfinished requests
(``BUFFERED_MAX``), time to say hello (``PREFACE_TIMEOUT``).
Frames in are handled here; calls, answers and stream ends in :mod:`.grpcstreams`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from pathlib import Path

from kwasm.sandboxer import h2frames as h2
from kwasm.sandboxer.backpressure import ReadPausingProtocol
from kwasm.sandboxer.grpcstreams import Handler, Stream, StreamEnds
from kwasm.sandboxer.h2frames import ProtocolError, unpad
from kwasm.sandboxer.status import INVALID_ARGUMENT, RESOURCE_EXHAUSTED

__all__ = ["GrpcServer", "Handler"]

log = logging.getLogger(__name__)
#: Streams a client may keep open (each pending Controller.Wait holds one, so one per sandbox).
MAX_STREAMS = 1 << 18
#: Streams whose request has not fully arrived; a client opening more is refused (REFUSED_STREAM).
MAX_OPENING = 1000
#: Bytes of unfinished requests a connection may hold; the request that goes past it fails.
BUFFERED_MAX = 16 << 20
#: Seconds a client has to send the HTTP/2 preface and its SETTINGS.
PREFACE_TIMEOUT = 10.0
#: Seconds :meth:`GrpcServer.close` lets calls in flight finish before answering them UNAVAILABLE.
GRACE = 1.0


class GrpcServer:
    """Serves registered unary methods (``/service/method``) on one unix socket."""

    def __init__(self, preface_timeout: float = PREFACE_TIMEOUT) -> None:
        self.handlers: dict[bytes, Handler] = {}
        self.connections: set[_Connection] = set()
        self.preface_timeout = preface_timeout
        self._server: asyncio.AbstractServer | None = None

    def register(self, service: str, method: str, handler: Handler) -> None:
        """Route ``/service/method`` to ``handler``."""
        self.handlers[f"/{service}/{method}".encode()] = handler

    async def start(self, path: Path) -> None:
        """Listen on the unix socket ``path`` (the caller has removed any stale file)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), path=str(path))

    async def close(self, grace: float = GRACE) -> None:
        """Stop listening and say GOAWAY; calls in flight get ``grace`` seconds to finish, the rest
        are answered UNAVAILABLE (a pending Wait included); then every connection is closed."""
        if self._server is not None:
            self._server.close()
        for connection in self.connections:
            connection.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(connection.streams for connection in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.shut()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


class _Connection(StreamEnds, ReadPausingProtocol):
    """One client connection: frames in, frames out."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.handlers = server.handlers
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface = False
        self.timer: asyncio.TimerHandle | None = None
        self.decoder = h2.HeaderDecoder()
        self.streams: dict[int, Stream] = {}
        self.opening = 0
        self.draining = False
        self.last_stream = 0
        self.block = bytearray()
        self.block_stream: Stream | None = None
        self.block_flags = 0
        self.send_window = h2.DEFAULT_WINDOW
        self.peer_window = h2.DEFAULT_WINDOW
        self.peer_frame = h2.MAX_FRAME
        self.buffered = 0
        self.unacked = 0
        self.blocked: dict[int, Stream] = {}

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)
        transport.write(h2.server_preface(MAX_STREAMS))
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.server.preface_timeout, self.goaway, h2.PROTOCOL_ERROR, "no preface")

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
        for stream in self.streams.values():
            if stream.call is not None:
                stream.call.cancel()
        self.streams.clear()
        self.blocked.clear()

    def goaway(self, code: int, message: str) -> None:
        """Tell the peer no more streams are served, then disconnect."""
        if self.transport is not None:
            payload = struct.pack(">II", self.last_stream, code) + message.encode()[:256]
            self.write(h2.frame(h2.GOAWAY, 0, 0, payload))
            self.uncork()
            self.transport.close()

    def drain(self) -> None:
        """Say GOAWAY but keep serving the streams already opened; newer ones are refused."""
        self.draining = True
        if self.transport is not None:
            self.write(h2.frame(h2.GOAWAY, 0, 0, struct.pack(">II", self.last_stream, h2.NO_ERROR)))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        self.out = []
        try:
            if not self.preface:
                if len(buffer) < len(h2.PREFACE):
                    if not h2.PREFACE.startswith(bytes(buffer)):
                        raise ProtocolError(h2.PROTOCOL_ERROR, "not an HTTP/2 client")
                    return
                if buffer[: len(h2.PREFACE)] != h2.PREFACE:
                    raise ProtocolError(h2.PROTOCOL_ERROR, "not an HTTP/2 client")
                del buffer[: len(h2.PREFACE)]
                self.preface = True
            offset, size = 0, len(buffer)
            while size - offset >= 9 and self.transport is not None:
                high, low, kind, flags, stream_id = h2.FRAME.unpack_from(buffer, offset)
                length = high << 16 | low
                if length > h2.MAX_FRAME:
                    raise ProtocolError(h2.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if size - offset - 9 < length:
                    break
                payload = bytes(buffer[offset + 9 : offset + 9 + length])
                offset += 9 + length
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
            del buffer[:offset]
        except ProtocolError as exc:
            log.debug("closing gRPC connection: %s", exc)
            self.buffer = bytearray()
            self.goaway(exc.code, str(exc))
        finally:
            self.uncork()

    # ------------------------------------------------------------------ frames in

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.block_stream is not None and kind != h2.CONTINUATION:
            raise ProtocolError(h2.PROTOCOL_ERROR, "header block interrupted")
        if kind == h2.DATA:
            self._data(flags, stream_id, payload)
        elif kind == h2.HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == h2.CONTINUATION:
            if self.block_stream is None or self.block_stream.id != stream_id:
                raise ProtocolError(h2.PROTOCOL_ERROR, "unexpected CONTINUATION")
            self._header_fragment(flags, payload)
        elif kind == h2.SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == h2.WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == h2.PING:
            h2.check_control(kind, stream_id, payload, self.last_stream)
            if not flags & h2.ACK and self.transport is not None:
                self.write(h2.frame(h2.PING, h2.ACK, 0, payload))
        elif kind == h2.RST_STREAM:
            h2.check_control(kind, stream_id, payload, self.last_stream)
            if (stream := self.streams.get(stream_id)) is not None:
                self._drop(stream)
        elif kind == h2.PRIORITY:
            h2.check_control(kind, stream_id, payload, self.last_stream)
        elif kind == h2.PUSH_PROMISE:
            raise ProtocolError(h2.PROTOCOL_ERROR, "a client cannot push")
        # GOAWAY (the peer closes the socket after it) and unknown types are ignored.

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id > self.last_stream:
            raise ProtocolError(h2.PROTOCOL_ERROR, "DATA on an idle stream")
        self.unacked += len(payload)
        if self.unacked >= h2.RECEIVE_WINDOW // 2 and self.transport is not None:
            self.write(h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", self.unacked)))
            self.unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None or stream.call is not None:
            return  # answered already (or reset): the rest of its body is dropped
        data = unpad(flags, payload)
        body = stream.body
        body += data
        self.buffered += len(data)
        if self.buffered > BUFFERED_MAX:
            self._refuse(stream, flags, RESOURCE_EXHAUSTED, f"requests in progress exceed {BUFFERED_MAX} bytes")
            return
        if len(body) >= 5:
            length = int.from_bytes(body[1:5], "big")
            if length > h2.MESSAGE_LENGTH_MAX:
                self._refuse(stream, flags, RESOURCE_EXHAUSTED,
                             f"message of {length} bytes exceeds {h2.MESSAGE_LENGTH_MAX}")
                return
            if len(body) > 5 + length:
                self._refuse(stream, flags, INVALID_ARGUMENT, "a unary call carries exactly one message")
                return
        if flags & h2.END_STREAM:
            self._call(stream)

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id % 2 == 0:
            raise ProtocolError(h2.PROTOCOL_ERROR, "HEADERS on a server stream id")
        payload = unpad(flags, payload)
        if flags & h2.PRIORITY_FLAG:
            payload = payload[5:]
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream:
                self.last_stream = stream_id
                if self.draining or self.opening >= MAX_OPENING or len(self.streams) >= MAX_STREAMS:
                    stream = self._closed(stream_id)
                    if self.transport is not None:
                        refused = struct.pack(">I", h2.REFUSED_STREAM)
                        self.write(h2.frame(h2.RST_STREAM, 0, stream_id, refused))
                else:
                    stream = Stream(stream_id, self.peer_window)
                    self.streams[stream_id] = stream
                    self.opening += 1
            elif not flags & h2.END_STREAM:  # only trailers may follow a stream's first header block
                raise ProtocolError(h2.PROTOCOL_ERROR, f"HEADERS opening stream {stream_id} out of order")
            else:  # a closed stream: its block still updates the HPACK table
                stream = self._closed(stream_id)
        self.block_stream = stream
        self.block_flags = flags
        self.block = bytearray()
        self._header_fragment(flags, payload)

    @staticmethod
    def _closed(stream_id: int) -> Stream:
        """A stand-in for a stream that is not served: its header block is decoded and dropped."""
        stream = Stream(stream_id, 0)
        stream.call = asyncio.get_running_loop().create_future()
        return stream

    def _header_fragment(self, flags: int, payload: bytes) -> None:
        self.block += payload
        if len(self.block) > h2.HEADER_LIST_MAX:
            raise ProtocolError(h2.PROTOCOL_ERROR, "header block too large")
        if not flags & h2.END_HEADERS:
            return
        stream, self.block_stream = self.block_stream, None
        assert stream is not None
        fields = self.decoder.decode(bytes(self.block))
        if stream.call is not None:
            return  # a closed stream
        if stream.path:  # trailers of a request: they carry nothing a unary call needs but END_STREAM
            if self.block_flags & h2.END_STREAM:
                self._call(stream)
            return
        content_type = b""
        for name, value in fields:
            if name == b":path":
                stream.path = bytes(value)
            elif name == b"content-type":
                content_type = bytes(value)
            elif name == b"grpc-encoding":
                stream.encoded = value != b"identity"
        if not content_type.startswith(b"application/grpc"):
            self._release(stream)
            self.streams.pop(stream.id, None)
            if self.transport is not None:
                answer = h2.frame(h2.HEADERS, h2.LAST, stream.id, h2.UNSUPPORTED_MEDIA)
                if not self.block_flags & h2.END_STREAM:  # the client need not send the rest
                    answer += h2.frame(h2.RST_STREAM, 0, stream.id, struct.pack(">I", h2.NO_ERROR))
                self.write(answer)
            return
        if self.block_flags & h2.END_STREAM:
            self._call(stream)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if h2.settings_ack(flags, stream_id, payload):
            return
        if self.timer is not None:  # the preface is complete
            self.timer.cancel()
            self.timer = None
        for key, value in h2.settings(payload):
            if key == h2.SETTINGS_INITIAL_WINDOW_SIZE:
                delta, self.peer_window = value - self.peer_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == h2.SETTINGS_MAX_FRAME_SIZE:
                self.peer_frame = value
        if self.transport is not None:
            self.write(h2.frame(h2.SETTINGS, h2.ACK, 0))
        self._flush()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        increment = h2.increment(stream_id, payload)
        if stream_id == 0:
            self.send_window += increment
            if self.send_window > h2.WINDOW_MAX:
                raise ProtocolError(h2.FLOW_CONTROL_ERROR, "connection window beyond 2^31-1")
        elif (stream := self.streams.get(stream_id)) is not None:
            if increment == 0:
                self._reset(stream, h2.PROTOCOL_ERROR)
            elif stream.send_window + increment > h2.WINDOW_MAX:
                self._reset(stream, h2.FLOW_CONTROL_ERROR)
            else:
                stream.send_window += increment
        self._flush()
