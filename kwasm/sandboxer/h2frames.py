"""HTTP/2 framing and the few HPACK header blocks a gRPC server sends (see :mod:`.grpcwire`).

Responses never use HPACK's dynamic table or Huffman coding (both optional for an encoder), so every
header block the server sends is a constant or a literal built here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME = struct.Struct(">BHBBI")  # length (24 bits as 8 + 16), type, flags, stream id
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
#: Flags of a header block that ends a stream.
LAST = END_HEADERS | 0x1
PADDED = 0x8
PRIORITY_FLAG = 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x7, 0x8, 0x9
SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x3, 0x4, 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
DEFAULT_WINDOW = 65535
#: The largest frame we accept (the protocol default, which we never raise).
MAX_FRAME = 16384
#: The largest frame size a peer may announce, and the largest flow-control window.
MAX_FRAME_LIMIT, WINDOW_MAX = (1 << 24) - 1, (1 << 31) - 1
MESSAGE_LENGTH_MAX = 4 << 20
#: Our receive window, per stream and for the connection: a whole maximal message fits.
RECEIVE_WINDOW = 16 << 20
HEADER_LIST_MAX = 64 << 10
#: The longest (percent-encoded) ``grpc-message`` sent: every header block fits the smallest frame.
STATUS_TEXT_MAX = 1024


class ProtocolError(Exception):
    """The peer broke HTTP/2: the connection ends with GOAWAY ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def unpad(flags: int, payload: bytes) -> bytes:
    """The payload of a DATA or HEADERS frame without its padding."""
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ProtocolError(PROTOCOL_ERROR, "bad padding")
    return payload[1 : len(payload) - payload[0]]


def _integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer with a ``prefix_bits``-bit prefix, OR-ed into ``first``."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes, *, indexing: bool = False) -> bytes:
    """A header field as an HPACK literal (no Huffman); ``indexing`` also adds it to the peer's table."""
    return (b"\x40" if indexing else b"\x00") + _integer(len(name), 7) + name + _integer(len(value), 7) + value


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    length = len(payload)
    return FRAME.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id) + payload


#: ``:status: 200`` (static table entry 8) and ``content-type: application/grpc``.
RESPONSE_HEADERS = b"\x88" + literal(b"content-type", b"application/grpc")
TRAILERS_OK = literal(b"grpc-status", b"0")
#: A request whose content-type is not gRPC gets a plain HTTP 415.
UNSUPPORTED_MEDIA = b"\x08\x03415"


def _percent(text: str) -> bytes:
    """Percent-encoded UTF-8: printable ASCII except ``%`` stays as it is."""
    return b"".join(
        bytes([byte]) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte
        for byte in text.encode(errors="backslashreplace")
    )


def _grpc_message(message: str) -> bytes:
    """``grpc-message``: ``message`` percent-encoded, cut on a character to :data:`STATUS_TEXT_MAX` bytes."""
    encoded = _percent(message)
    if len(encoded) <= STATUS_TEXT_MAX:
        return encoded
    out = bytearray()
    for char in message:
        piece = _percent(char)
        if len(out) + len(piece) > STATUS_TEXT_MAX:
            break
        out += piece
    return bytes(out)


def trailers(code: int, message: str = "") -> bytes:
    """A Trailers-Only header block for a failed call."""
    block = RESPONSE_HEADERS + literal(b"grpc-status", str(code).encode())
    if message:
        block += literal(b"grpc-message", _grpc_message(message))
    return block


def server_preface(max_streams: int) -> bytes:
    """A server's first frames: SETTINGS (our windows and limits), then the connection window."""
    settings = struct.pack(
        ">HIHIHI",
        SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW,
        SETTINGS_MAX_HEADER_LIST_SIZE, HEADER_LIST_MAX,
        SETTINGS_MAX_CONCURRENT_STREAMS, max_streams,
    )
    update = struct.pack(">I", RECEIVE_WINDOW - DEFAULT_WINDOW)
    return frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, update)


def settings_ack(flags: int, stream_id: int, payload: bytes) -> bool:
    """Whether a (well-formed) SETTINGS frame is an acknowledgement."""
    if stream_id != 0 or len(payload) % 6:
        raise ProtocolError(PROTOCOL_ERROR, "bad SETTINGS frame")
    return bool(flags & ACK)


def settings(payload: bytes) -> Iterator[tuple[int, int]]:
    """The (key, value) pairs of a SETTINGS frame; an initial window or frame size out of range is an error."""
    for offset in range(0, len(payload), 6):
        key, value = struct.unpack_from(">HI", payload, offset)
        if key == SETTINGS_INITIAL_WINDOW_SIZE and value > WINDOW_MAX:
            raise ProtocolError(FLOW_CONTROL_ERROR, f"initial window of {value} bytes")
        if key == SETTINGS_MAX_FRAME_SIZE and not MAX_FRAME <= value <= MAX_FRAME_LIMIT:
            raise ProtocolError(PROTOCOL_ERROR, f"maximum frame size of {value} bytes")
        yield key, value


def increment(stream_id: int, payload: bytes) -> int:
    """A WINDOW_UPDATE's increment (0 is left to the caller on a stream, an error on the connection)."""
    if len(payload) != 4:
        raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE is not 4 bytes")
    value = int.from_bytes(payload, "big") & 0x7FFFFFFF
    if value == 0 and stream_id == 0:
        raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
    return value


#: Payload length and whether it belongs on the connection (stream 0), per control frame type.
_CONTROL = {PING: (8, True), RST_STREAM: (4, False), PRIORITY: (5, False)}


def check_control(kind: int, stream_id: int, payload: bytes, last_stream: int) -> None:
    """A PING, RST_STREAM or PRIORITY frame of the wrong size or on the wrong stream is an error."""
    size, connection = _CONTROL[kind]
    if len(payload) != size:
        raise ProtocolError(FRAME_SIZE_ERROR, f"frame type {kind} of {len(payload)} bytes")
    if (stream_id == 0) != connection or (kind == RST_STREAM and stream_id > last_stream):
        raise ProtocolError(PROTOCOL_ERROR, f"frame type {kind} on stream {stream_id}")


class HeaderDecoder:
    """HPACK decoding of request header blocks, remembering blocks of indexed fields only.

    Such a block cannot change the dynamic table, so while no other block arrives it always means
    the same; a gRPC client repeats a handful of them, one per method.
    """

    def __init__(self) -> None:
        self.decoder = hpack.Decoder(max_header_list_size=HEADER_LIST_MAX)
        self.decoded: dict[bytes, list[tuple[bytes, bytes]]] = {}

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The (name, value) fields of ``block``."""
        indexed_only = min(block, default=0) >= 0x80 and 0xFF not in block
        if indexed_only and (known := self.decoded.get(block)) is not None:
            return known
        try:
            fields = [(bytes(name), bytes(value)) for name, value in self.decoder.decode(block, raw=True)]
        except hpack.HPACKError as exc:
            raise ProtocolError(COMPRESSION_ERROR, f"bad header block: {exc}") from exc
        if not indexed_only:
            self.decoded.clear()  # the table may have changed under every remembered block
        elif len(self.decoded) < 64:
            self.decoded[block] = fields
        return fields
