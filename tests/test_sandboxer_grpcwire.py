"""The sandboxer's own HTTP/2 gRPC server, spoken to frame by frame over its real socket.

The other sandboxer tests drive it with grpcio's client (the C core iSulad's C++ client is built
on); these check what that client never does on its own: a tiny flow-control window, a header
block split over CONTINUATION frames, padding, a reset call, PING, a non-gRPC request, bad frames.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import hpack
import pytest
from google.protobuf.any_pb2 import Any as AnyMessage

from kwasm.api import sandbox_pb2, sandboxer_admin_pb2
from kwasm.sandboxer.client import SandboxerClient
from kwasm.sandboxer.h2frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    WINDOW_UPDATE,
    frame,
)
from kwasm.sandboxer.launch import SandboxerProcess, pod_config, running_sandboxer

CONTROLLER = "/containerd.services.sandbox.v1.Controller/"


class RawClient:
    """An HTTP/2 client that sends exactly the frames a test asks for."""

    def __init__(self, path: Path, window: int = 1 << 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, window)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))

    def headers(self, path: str, content_type: str = "application/grpc") -> bytes:
        """An encoded request header block."""
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
                  ("content-type", content_type), ("te", "trailers")]
        return bytes(self.encoder.encode(fields))

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def frames(self) -> Iterator[tuple[int, int, int, bytes]]:
        """Frames as they arrive: (type, flags, stream id, payload); header blocks are decoded."""
        buffer = b""
        while True:
            while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            length = int.from_bytes(buffer[:3], "big")
            kind, flags, stream_id = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big")
            payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
            if kind == HEADERS:
                payload = repr(dict(self.decoder.decode(payload))).encode()
            yield kind, flags, stream_id, payload

    def until(self, kind: int, stream_id: int | None = None) -> list[tuple[int, int, int, bytes]]:
        """Every frame up to and including the first of ``kind`` (on ``stream_id``; HEADERS: the last ones)."""
        seen = []
        for item in self.frames():
            seen.append(item)
            ends = kind != HEADERS or item[1] & END_STREAM
            if item[0] == kind and ends and (stream_id is None or item[2] == stream_id):
                return seen
        raise AssertionError(f"connection closed before frame type {kind}: {seen}")


def _message(body: bytes) -> bytes:
    return b"\0" + len(body).to_bytes(4, "big") + body


@pytest.fixture(scope="module")
def sandboxer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxerProcess]:
    with running_sandboxer(tmp_path_factory.mktemp("grpcwire") / "sbx") as process:

        async def populate() -> None:
            client = SandboxerClient(process.listen)
            for index in range(40):
                request = sandbox_pb2.ControllerCreateRequest(
                    sandbox_id=f"pod-{index:02d}", options=AnyMessage(value=pod_config(f"pod-{index:02d}")))
                await client.create(request)
            await client.close()

        asyncio.run(populate())
        yield process


def test_a_large_answer_waits_for_the_clients_flow_control_window(sandboxer: SandboxerProcess) -> None:
    client = RawClient(sandboxer.listen, window=100)
    client.send(frame(HEADERS, END_HEADERS, 1, client.headers("/kwasm.sandboxer.v1.Admin/List")))
    client.send(frame(DATA, END_STREAM, 1, _message(b"")))
    client.send(frame(PING, 0, 0, b"pingpong"))
    before_ping = client.until(PING)
    held = b"".join(payload for kind, _, stream, payload in before_ping if kind == DATA and stream == 1)
    assert len(held) == 100  # exactly the window, and no trailers yet
    assert not any(kind == HEADERS and flags & END_STREAM for kind, flags, _, _ in before_ping)
    client.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1 << 20)))
    rest = client.until(HEADERS, 1)
    body = held + b"".join(payload for kind, _, stream, payload in rest if kind == DATA and stream == 1)
    assert b"'grpc-status': '0'" in rest[-1][3]
    listing = sandboxer_admin_pb2.ListResponse.FromString(body[5:])
    assert len(body) == 5 + int.from_bytes(body[1:5], "big")
    assert sorted(s.id for s in listing.sandboxes) == [f"pod-{index:02d}" for index in range(40)]


def test_continuation_padding_ping_and_a_non_grpc_request(sandboxer: SandboxerProcess) -> None:
    client = RawClient(sandboxer.listen)
    block = client.headers(CONTROLLER + "Status")
    client.send(frame(HEADERS, 0, 1, block[:5]) + frame(CONTINUATION, END_HEADERS, 1, block[5:]))
    request = sandbox_pb2.ControllerStatusRequest(sandbox_id="pod-07").SerializeToString()
    client.send(frame(DATA, PADDED | END_STREAM, 1, b"\x03" + _message(request) + b"\0\0\0"))
    answer = client.until(HEADERS, 1)
    status = sandbox_pb2.ControllerStatusResponse.FromString(
        b"".join(p for kind, _, _, p in answer if kind == DATA)[5:])
    assert (status.sandbox_id, status.state) == ("pod-07", "SANDBOX_NOTREADY")
    client.send(frame(PING, 0, 0, b"12345678"))
    assert client.until(PING)[-1][3] == b"12345678"
    client.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, client.headers(CONTROLLER + "Status", "text/plain")))
    assert b"'415'" in client.until(HEADERS, 3)[-1][3]
    client.send(frame(DATA, 0, 5, b"x" * 20000))  # larger than the 16 KiB frames we accept
    goaway = client.until(GOAWAY)[-1][3]
    assert struct.unpack(">II", goaway[:8]) == (3, 6)  # last stream 3, FRAME_SIZE_ERROR


def test_a_reset_wait_is_dropped_and_the_connection_keeps_serving(sandboxer: SandboxerProcess) -> None:
    client = RawClient(sandboxer.listen)
    wait = sandbox_pb2.ControllerWaitRequest(sandbox_id="pod-03").SerializeToString()
    client.send(frame(HEADERS, END_HEADERS, 1, client.headers(CONTROLLER + "Wait")))
    client.send(frame(DATA, END_STREAM, 1, _message(wait)))
    client.send(frame(RST_STREAM, 0, 1, struct.pack(">I", 8)))  # CANCEL
    missing = sandbox_pb2.ControllerStatusRequest(sandbox_id="nope").SerializeToString()
    client.send(frame(HEADERS, END_HEADERS, 3, client.headers(CONTROLLER + "Status")))
    client.send(frame(DATA, END_STREAM, 3, _message(missing)))
    answer = client.until(HEADERS, 3)
    assert b"'grpc-status': '5'" in answer[-1][3]  # NOT_FOUND, as a Trailers-Only answer
    for stream_id, pod in ((5, "pod-05"), (7, "pod-06"), (9, "pod-07")):  # blocks of table indices only
        request = sandbox_pb2.ControllerStatusRequest(sandbox_id=pod).SerializeToString()
        client.send(frame(HEADERS, END_HEADERS, stream_id, client.headers(CONTROLLER + "Status")))
        client.send(frame(DATA, END_STREAM, stream_id, _message(request)))
        body = b"".join(p for kind, _, _, p in client.until(HEADERS, stream_id) if kind == DATA)
        assert sandbox_pb2.ControllerStatusResponse.FromString(body[5:]).sandbox_id == pod

    async def stop() -> None:
        other = SandboxerClient(sandboxer.listen)
        await other.stop("pod-03")
        await other.close()

    asyncio.run(stop())
    client.send(frame(PING, 0, 0, b"afterall"))
    assert not any(stream == 1 for _, _, stream, _ in client.until(PING))  # the reset Wait never answers
