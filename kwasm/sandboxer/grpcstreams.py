"""The stream side of a gRPC connection (see :mod:`.grpcwire`): calls, flow-controlled answers, stream ends."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Coroutine
from typing import Any

from google.protobuf.message import DecodeError

from kwasm.sandboxer import h2frames as h2
from kwasm.sandboxer.inline import drive
from kwasm.sandboxer.status import INTERNAL, INVALID_ARGUMENT, UNAVAILABLE, UNIMPLEMENTED, StatusError

log = logging.getLogger(__name__)

#: A unary method: request message bytes in, response message bytes out (or StatusError).
Handler = Callable[[bytes], Coroutine[Any, Any, bytes]]


class Stream:
    """One request stream: its method, its body so far, the call serving it, output not yet sent."""

    __slots__ = ("body", "call", "encoded", "id", "path", "pending", "send_window")

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.path = b""
        self.encoded = False  # the client named a grpc-encoding
        self.body = bytearray()
        self.call: asyncio.Future[bytes] | None = None
        self.send_window = send_window
        self.pending: memoryview | None = None


class StreamEnds:
    """What a connection does with its streams once their requests arrive: the part of
    :class:`~kwasm.sandboxer.grpcwire._Connection` that answers, resets and credits them."""

    transport: asyncio.Transport | None
    handlers: dict[bytes, Handler]
    streams: dict[int, Stream]
    blocked: dict[int, Stream]
    opening: int
    buffered: int
    send_window: int
    peer_frame: int
    loop: asyncio.AbstractEventLoop
    #: Frames held back while the frames of one read are handled (then sent in one ``send(2)``).
    out: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        """Send ``data`` now, or with the other answers to the frames being handled."""
        if self.out is not None:
            self.out.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def uncork(self) -> None:
        """Send what :meth:`write` held back."""
        out, self.out = self.out, None
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def shut(self) -> None:
        """Answer every call still open UNAVAILABLE (reset one whose answer has begun), then disconnect."""
        for stream in list(self.streams.values()):
            if stream.id in self.blocked:
                self._reset(stream, h2.CANCEL)
            else:
                self._fail(stream, UNAVAILABLE, "the server is shutting down")
                if stream.call is not None:
                    stream.call.cancel()
        self.uncork()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ flow control and stream ends

    def _release(self, stream: Stream) -> None:
        """``stream``'s request is complete or abandoned: its body no longer counts as buffered."""
        self.opening -= 1
        self.buffered -= len(stream.body)

    def _refuse(self, stream: Stream, flags: int, code: int, message: str) -> None:
        """Fail a request still arriving; reset its stream unless the client has ended it."""
        self._release(stream)
        self._fail(stream, code, message)
        if not flags & h2.END_STREAM and self.transport is not None:
            self.write(h2.frame(h2.RST_STREAM, 0, stream.id, struct.pack(">I", h2.NO_ERROR)))

    def _drop(self, stream: Stream) -> None:
        """Forget ``stream`` (the client reset it, or we do): cancel its call or drop its request."""
        del self.streams[stream.id]
        self.blocked.pop(stream.id, None)
        if stream.call is None:
            self._release(stream)
        else:
            stream.call.cancel()

    def _reset(self, stream: Stream, code: int) -> None:
        """End ``stream`` with RST_STREAM ``code``."""
        self._drop(stream)
        if self.transport is not None:
            self.write(h2.frame(h2.RST_STREAM, 0, stream.id, struct.pack(">I", code)))

    # ------------------------------------------------------------------ calls and frames out

    def _call(self, stream: Stream) -> None:
        self._release(stream)
        handler = self.handlers.get(stream.path)
        body = stream.body
        if handler is None:
            self._fail(stream, UNIMPLEMENTED, f"method {stream.path.decode(errors='replace')} is not implemented")
        elif len(body) < 5 or len(body) != 5 + int.from_bytes(body[1:5], "big"):
            self._fail(stream, INVALID_ARGUMENT, "a unary call carries exactly one message")
        elif body[0]:  # compressed: unsupported, or (no grpc-encoding named) a broken client
            self._fail(stream, UNIMPLEMENTED if stream.encoded else INTERNAL, "compressed messages are not supported")
        else:
            call = drive(handler(bytes(body[5:])), self.loop)
            stream.body = bytearray()
            stream.call = call
            if call.done():
                self._complete(stream, call)
            else:
                call.add_done_callback(lambda done: self._complete(stream, done))

    def _complete(self, stream: Stream, call: asyncio.Future[bytes]) -> None:
        if call.cancelled() or self.streams.get(stream.id) is not stream or self.transport is None:
            return
        try:
            body = call.result()
        except StatusError as exc:
            self._fail(stream, exc.code, exc.message)
            return
        except DecodeError:
            method = stream.path.rsplit(b"/", 1)[-1].decode(errors="replace")
            self._fail(stream, INVALID_ARGUMENT, f"malformed {method} request")
            return
        except Exception as exc:
            log.exception("gRPC %s failed", stream.path.decode(errors="replace"))
            self._fail(stream, INTERNAL, str(exc) or type(exc).__name__)
            return
        message = b"\0" + len(body).to_bytes(4, "big") + body
        head = h2.frame(h2.HEADERS, h2.END_HEADERS, stream.id, h2.RESPONSE_HEADERS)
        size = len(message)
        if size <= self.send_window and size <= stream.send_window and size <= self.peer_frame:
            self.send_window -= size
            del self.streams[stream.id]
            end = h2.frame(h2.HEADERS, h2.LAST, stream.id, h2.TRAILERS_OK)
            self.write(head + h2.frame(h2.DATA, 0, stream.id, message) + end)
            return
        self.write(head)
        stream.pending = memoryview(message)
        self.blocked[stream.id] = stream
        self._flush()

    def _flush(self) -> None:
        """Send what flow control now allows of every blocked response, oldest first."""
        transport = self.transport
        if transport is None:
            return
        for stream in list(self.blocked.values()):
            pending = stream.pending
            assert pending is not None
            while pending:
                size = min(len(pending), self.send_window, stream.send_window, self.peer_frame)
                if size <= 0:
                    break
                self.write(h2.frame(h2.DATA, 0, stream.id, bytes(pending[:size])))
                self.send_window -= size
                stream.send_window -= size
                pending = stream.pending = pending[size:]
            if pending:
                if self.send_window <= 0:
                    return
                continue  # this stream waits for its own window; the next one may have some
            del self.blocked[stream.id]
            self.streams.pop(stream.id, None)
            self.write(h2.frame(h2.HEADERS, h2.LAST, stream.id, h2.TRAILERS_OK))

    def _fail(self, stream: Stream, code: int, message: str) -> None:
        """Answer Trailers-Only with a gRPC status (its message cut to fit any frame)."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        if self.transport is not None:
            self.write(h2.frame(h2.HEADERS, h2.LAST, stream.id, h2.trailers(code, message)))
