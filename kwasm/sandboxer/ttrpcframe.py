"""ttrpc framing, and a blocking one-connection client for short-lived processes.

A frame is a 10-byte header (``length u32 BE | stream_id u32 BE | type u8 | flags u8``) followed by
``length`` bytes. This module imports no asyncio (~45 ms of start-up), so a process that makes a
couple of calls and exits, such as ``containerd-shim-kwasm-v1 delete`` on containerd's critical
path, uses :class:`BlockingTtrpcClient`; long-lived code uses :mod:`kwasm.sandboxer.ttrpc`.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from kwasm.api import ttrpc_pb2
from kwasm.sandboxer.status import OK, StatusError

HEADER = struct.Struct(">IIBB")
MESSAGE_LENGTH_MAX = 4 << 20
TYPE_REQUEST = 1
TYPE_RESPONSE = 2


def encode_frame(stream_id: int, message_type: int, payload: bytes) -> bytes:
    """One frame: header plus payload."""
    return HEADER.pack(len(payload), stream_id, message_type, 0) + payload


def socket_path(address: Path | str) -> str:
    """The filesystem path of a plain path, ``unix://`` or ``ttrpc+unix://`` address."""
    path = str(address)
    for prefix in ("ttrpc+unix://", "unix://"):
        path = path.removeprefix(prefix)
    return path


class BlockingTtrpcClient:
    """Sequential ttrpc calls on one unix-socket connection, each waiting for its answer."""

    def __init__(self, address: Path | str, timeout: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(socket_path(address))
        except BaseException:
            self._sock.close()
            raise
        self._reader = self._sock.makefile("rb")
        self._next_stream = 1

    def call(self, service: str, method: str, payload: bytes) -> bytes:
        """Call ``service/method``; the response payload, or StatusError; OSError if the connection fails."""
        stream_id = self._next_stream
        self._next_stream += 2
        timeout = self._sock.gettimeout()
        request = ttrpc_pb2.Request(service=service, method=method, payload=payload)
        if timeout:
            request.timeout_nano = int(timeout * 1e9)
        self._sock.sendall(encode_frame(stream_id, TYPE_REQUEST, request.SerializeToString()))
        while True:
            header = self._reader.read(HEADER.size)
            if len(header) < HEADER.size:
                raise ConnectionError("ttrpc connection closed")
            length, answered, message_type, _flags = HEADER.unpack(header)
            if length > MESSAGE_LENGTH_MAX:
                raise ConnectionError(f"ttrpc frame of {length} bytes")
            body = self._reader.read(length)
            if len(body) < length:
                raise ConnectionError("ttrpc connection closed")
            if message_type == TYPE_RESPONSE and answered == stream_id:
                break
        response = ttrpc_pb2.Response.FromString(body)
        if response.status.code != OK:
            raise StatusError(response.status.code, response.status.message)
        return response.payload

    def close(self) -> None:
        """Close the connection."""
        self._reader.close()
        self._sock.close()
