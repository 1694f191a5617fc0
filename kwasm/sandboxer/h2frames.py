"""HTTP/2 framing and the few HPACK header blocks a gRPC server sends (see :mod:`.grpcwire`).

Responses never use HPACK's dynamic table or Huffman coding (both optional for an encoder), so every
header block the server sends is a constant or a literal built here.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME = struct.Struct(">BHBBI")  # length (24 bits as 8 + 16), type, flags, stream id
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
NO_ERROR, PROTOCOL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR = 0x0, 0x1, 0x6, 0x9
SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x3, 0x4, 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
DEFAULT_WINDOW = 65535
#: The largest frame we accept (the protocol default, which we never raise).
MAX_FRAME = 16384
MESSAGE_LENGTH_MAX = 4 << 20
#: Our receive window, per stream and for the connection: a whole maximal message fits.
RECEIVE_WINDOW = 16 << 20
HEADER_LIST_MAX = 64 << 10


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


def _grpc_message(message: str) -> bytes:
    """``grpc-message`` is percent-encoded UTF-8: printable ASCII except ``%`` stays as it is."""
    return b"".join(
        bytes([byte]) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte for byte in message.encode()
    )


def trailers(code: int, message: str = "") -> bytes:
    """A Trailers-Only header block for a failed call."""
    block = RESPONSE_HEADERS + literal(b"grpc-status", str(code).encode())
    if message:
        block += literal(b"grpc-message", _grpc_message(message))
    return block
