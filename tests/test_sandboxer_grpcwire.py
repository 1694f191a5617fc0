"""The sandboxer's own HTTP/2 gRPC server, spoken to frame by frame over its real socket.

The other sandboxer tests drive it with grpcio's client (the C core iSulad's C++ client is built
on); these check what that client never does on its own: a tiny flow-control window, a header
block split over CONTINUATION frames, padding, a reset call, PING, a non-gRPC request, bad frames,
a client that exceeds the server's limits, graceful shutdown, and the benchmark's own client.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import hpack
import pytest
from google.protobuf.any_pb2 import Any as AnyMessage

from kwasm.api import sandbox_pb2, sandboxer_admin_pb2
from kwasm.sandboxer.client import SandboxerClient
from kwasm.sandboxer.grpcwire import MAX_OPENING, GrpcServer
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
    SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE,
    frame,
)
from kwasm.sandboxer.launch import SandboxerProcess, pod_config, running_sandboxer
from kwasm.sandboxer.wireclient import WireClient

CONTROLLER = "/containerd.services.sandbox.v1.Controller/"


class RawClient:
    """An HTTP/2 client that sends exactly the frames a test asks for."""

    def __init__(self, path: Path, window: int = 1 << 20, settings: bytes = b"") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, window) + settings
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


class LocalServer:
    """A real GrpcServer on its own event loop thread, with handlers a test can hold open."""

    def __init__(self, path: Path, preface_timeout: float = 10.0) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.server = GrpcServer(preface_timeout=preface_timeout)
        self.gate = asyncio.Event()
        self.cancelled = threading.Event()
        handlers = {"Echo": self._echo, "Big": self._big, "Gate": self._gate, "Hold": self._hold}
        for method, handler in handlers.items():
            self.server.register("containerd.services.sandbox.v1.Controller", method, handler)
        self.loop.run_until_complete(self.server.start(path))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _echo(self, body: bytes) -> bytes:
        return body

    async def _big(self, body: bytes) -> bytes:
        return b"x" * int(body)

    async def _gate(self, body: bytes) -> bytes:
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return body

    async def _hold(self, body: bytes) -> bytes:
        await asyncio.Event().wait()  # never set: only shutdown answers this call
        return body

    def open_gate(self) -> None:
        """Let every Gate call answer."""
        self.loop.call_soon_threadsafe(self.gate.set)

    def close(self, grace: float) -> None:
        """GrpcServer.close(grace) on the server's loop, without waiting for it."""
        asyncio.run_coroutine_threadsafe(self.server.close(grace), self.loop)

    def stop(self) -> None:
        """Close (no grace) and stop the loop thread."""
        asyncio.run_coroutine_threadsafe(self.server.close(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture()
def local(tmp_path: Path) -> Iterator[LocalServer]:
    server = LocalServer(tmp_path / "grpc.sock")
    yield server
    server.stop()


def _call(client: RawClient, stream_id: int, method: str, body: bytes) -> None:
    client.send(frame(HEADERS, END_HEADERS, stream_id, client.headers(CONTROLLER + method)))
    client.send(frame(DATA, END_STREAM, stream_id, _message(body)))


def _goaway_code(client: RawClient) -> int:
    _last_stream, code = struct.unpack(">II", client.until(GOAWAY)[-1][3][:8])
    return int(code)


def test_a_body_longer_than_its_message_fails_the_call_and_resets_the_stream(sandboxer: SandboxerProcess) -> None:
    client = RawClient(sandboxer.listen)
    client.send(frame(HEADERS, END_HEADERS, 1, client.headers(CONTROLLER + "Status")))
    client.send(frame(DATA, 0, 1, b"\0\0\0\0\x02ab"))  # declares 2 bytes ...
    for _ in range(20):
        client.send(frame(DATA, 0, 1, b"A" * 16384))  # ... then keeps sending, never ending the stream
    answer = client.until(RST_STREAM, 1)
    assert any(kind == HEADERS and b"'grpc-status': '3'" in payload for kind, _, _, payload in answer)
    client.send(frame(PING, 0, 0, b"stillok!"))
    assert client.until(PING)[-1][3] == b"stillok!"


def test_unfinished_requests_past_16_mib_fail_the_one_that_crosses_the_limit(sandboxer: SandboxerProcess) -> None:
    client = RawClient(sandboxer.listen)
    for stream_id in (1, 3, 5, 7, 9):  # 5 unfinished messages of almost 4 MiB: more than 16 MiB held
        client.send(frame(HEADERS, END_HEADERS, stream_id, client.headers(CONTROLLER + "Status")))
        client.send(frame(DATA, 0, stream_id, (4 << 20).to_bytes(5, "big")))
        client.send(frame(DATA, 0, stream_id, b"A" * 16384) * 255)
    answer = client.until(RST_STREAM)
    assert [stream for kind, _, stream, _ in answer if kind in (HEADERS, RST_STREAM)] == [9, 9]
    assert b"'grpc-status': '8'" in answer[-2][3]  # RESOURCE_EXHAUSTED
    client.send(frame(PING, 0, 0, b"stillok!"))  # the connection and its other streams live on
    assert client.until(PING)[-1][3] == b"stillok!"


def test_streams_opened_beyond_the_limit_are_refused(sandboxer: SandboxerProcess) -> None:
    client = RawClient(sandboxer.listen)
    block = b"".join(
        frame(HEADERS, END_HEADERS, 2 * index + 1, client.headers(CONTROLLER + "Status"))
        for index in range(MAX_OPENING + 1)
    )
    client.send(block)  # header blocks only: none of these requests ever completes
    refused = client.until(RST_STREAM)[-1]
    assert (refused[2], refused[3]) == (2 * MAX_OPENING + 1, struct.pack(">I", 7))  # REFUSED_STREAM
    request = sandbox_pb2.ControllerStatusRequest(sandbox_id="pod-01").SerializeToString()
    client.send(frame(DATA, END_STREAM, 1, _message(request)))  # an opened one still completes
    body = b"".join(p for kind, _, _, p in client.until(HEADERS, 1) if kind == DATA)
    assert sandbox_pb2.ControllerStatusResponse.FromString(body[5:]).sandbox_id == "pod-01"


def test_a_long_error_message_fits_one_frame(sandboxer: SandboxerProcess) -> None:
    client = RawClient(sandboxer.listen)
    request = sandbox_pb2.ControllerStatusRequest(sandbox_id="é" * 25000).SerializeToString()
    message = _message(request)
    client.send(frame(HEADERS, END_HEADERS, 1, client.headers(CONTROLLER + "Status")))
    for offset in range(0, len(message), 16384):
        last = offset + 16384 >= len(message)
        client.send(frame(DATA, END_STREAM if last else 0, 1, message[offset : offset + 16384]))
    client.send(frame(PING, 0, 0, b"sizechek"))
    raw = b""
    while b"sizechek" not in raw:
        raw += client.sock.recv(1 << 20)
    sizes = []
    while raw:
        length = int.from_bytes(raw[:3], "big")
        sizes.append(length)
        if raw[3] == HEADERS:
            fields = dict(client.decoder.decode(raw[9 : 9 + length], raw=True))
        raw = raw[9 + length :]
    assert max(sizes) <= 16384
    assert fields[b"grpc-status"] == b"5"  # NOT_FOUND, not a transport error
    assert fields[b"grpc-message"].startswith(b"sandbox %C3%A9%C3%A9")


def test_a_stream_without_window_does_not_hold_back_another(local: LocalServer) -> None:
    client = RawClient(local.path, window=0)
    _call(client, 1, "Big", b"30000")
    _call(client, 3, "Big", b"30000")
    client.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20)))
    client.send(frame(WINDOW_UPDATE, 0, 3, struct.pack(">I", 1 << 20)))  # stream 1 gets no window
    answer = client.until(HEADERS, 3)
    assert sum(len(p) for kind, _, stream, p in answer if kind == DATA and stream == 3) == 30005
    assert b"'grpc-status': '0'" in answer[-1][3]
    assert not any(kind == DATA and stream == 1 for kind, _, stream, _ in answer)


def test_close_lets_calls_in_flight_finish_then_answers_the_rest_unavailable(local: LocalServer) -> None:
    client = RawClient(local.path)
    blocked = RawClient(local.path)  # its call never finishes: it is answered at the end of the grace
    _call(client, 1, "Gate", b"done")
    _call(blocked, 1, "Hold", b"never")
    client.send(frame(PING, 0, 0, b"started!"))
    client.until(PING)
    local.close(grace=1.0)
    assert struct.unpack(">II", client.until(GOAWAY)[-1][3][:8]) == (1, 0)  # last stream 1, NO_ERROR
    _call(client, 3, "Echo", b"late")
    refused = client.until(RST_STREAM, 3)[-1]
    assert refused[3] == struct.pack(">I", 7)  # REFUSED_STREAM: opened after GOAWAY
    local.open_gate()
    finished = client.until(HEADERS, 1)
    assert b"'grpc-status': '0'" in finished[-1][3]
    assert b"done" in b"".join(p for kind, _, _, p in finished if kind == DATA)
    answer = blocked.until(HEADERS, 1)[-1][3]
    assert b"'grpc-status': '14'" in answer  # UNAVAILABLE, then the connection closes
    assert list(blocked.frames()) == []


def test_a_client_that_never_says_hello_is_disconnected(tmp_path: Path) -> None:
    server = LocalServer(tmp_path / "grpc.sock", preface_timeout=0.2)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(server.path))
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        assert GOAWAY in received[3::1]  # SETTINGS, then GOAWAY and EOF
        sock.close()
    finally:
        server.stop()


def test_bad_settings_window_updates_and_control_frames_end_the_connection(local: LocalServer) -> None:
    cases = [
        (struct.pack(">HI", SETTINGS_MAX_FRAME_SIZE, 1 << 24), b"", 1),  # PROTOCOL_ERROR
        (struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, 1 << 31), b"", 3),  # FLOW_CONTROL_ERROR
        (b"", frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0x7FFFFFFF)) * 2, 3),
        (b"", frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)), 1),
        (b"", frame(PING, 0, 1, b"12345678"), 1),
        (b"", frame(RST_STREAM, 0, 0, struct.pack(">I", 8)), 1),
        (b"", frame(RST_STREAM, 0, 1, b"\0\0\0"), 6),  # FRAME_SIZE_ERROR
        (b"", frame(2, 0, 1, b"\0\0\0"), 6),  # PRIORITY of 3 bytes
    ]
    for settings, follow_up, code in cases:
        client = RawClient(local.path, settings=settings)
        if follow_up:
            client.send(follow_up)
        assert _goaway_code(client) == code, (settings, follow_up)


def test_a_new_request_on_an_old_stream_id_is_a_protocol_error(local: LocalServer) -> None:
    client = RawClient(local.path)
    _call(client, 5, "Echo", b"first")
    client.until(HEADERS, 5)
    client.send(frame(HEADERS, END_HEADERS, 3, client.headers(CONTROLLER + "Echo")))
    assert _goaway_code(client) == 1


def test_the_benchmark_client_survives_a_call_it_gave_up_on(local: LocalServer) -> None:
    async def scenario() -> bytes:
        client = await WireClient.connect(local.path)
        abandoned = asyncio.ensure_future(client.call("Gate", b"slow"))
        await asyncio.sleep(0)  # the request is on the wire
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        # the client reset the stream, so the server cancelled the call
        assert await asyncio.to_thread(local.cancelled.wait, 10)
        local.open_gate()
        answer = await client.call("Echo", b"next")
        await client.close()
        return answer

    assert asyncio.run(scenario()) == b"next"


def test_a_compressed_message_without_an_encoding_is_an_internal_error(local: LocalServer) -> None:
    client = RawClient(local.path)
    client.send(frame(HEADERS, END_HEADERS, 1, client.headers(CONTROLLER + "Echo")))
    client.send(frame(DATA, END_STREAM, 1, b"\1\0\0\0\2ab"))
    assert b"'grpc-status': '13'" in client.until(HEADERS, 1)[-1][3]


def test_a_non_grpc_request_still_sending_is_answered_415_and_reset(local: LocalServer) -> None:
    client = RawClient(local.path)
    client.send(frame(HEADERS, END_HEADERS, 1, client.headers(CONTROLLER + "Echo", "text/plain")))
    answer = client.until(RST_STREAM, 1)
    assert b"'415'" in answer[-2][3]
    assert answer[-1][3] == struct.pack(">I", 0)  # NO_ERROR: stop sending the body
