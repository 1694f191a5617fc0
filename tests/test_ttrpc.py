"""The ttrpc layer on a real unix socket: framing, status codes, and hostile input."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from kwasm.api import ttrpc_pb2
from kwasm.sandboxer import status
from kwasm.sandboxer.status import StatusError
from kwasm.sandboxer.ttrpc import TtrpcClient, TtrpcServer
from kwasm.sandboxer.ttrpcframe import HEADER, MESSAGE_LENGTH_MAX, encode_frame

SERVICE = "test.Echo"


async def _echo(payload: bytes) -> bytes:
    return payload[::-1]


async def _slow(payload: bytes) -> bytes:
    await asyncio.sleep(float(payload.decode()))
    return payload


async def _refuse(payload: bytes) -> bytes:
    raise StatusError(status.NOT_FOUND, f"no {payload.decode()}")


def _serve(path: Path, body: Callable[[TtrpcServer], Awaitable[None]]) -> None:
    async def main() -> None:
        server = TtrpcServer()
        server.register(SERVICE, "Reverse", _echo)
        server.register(SERVICE, "Sleep", _slow)
        server.register(SERVICE, "Refuse", _refuse)
        await server.start(path)
        try:
            await body(server)
        finally:
            await server.close()

    asyncio.run(main())


def _raw_call(sock: socket.socket, stream_id: int, request: bytes) -> ttrpc_pb2.Response:
    sock.sendall(encode_frame(stream_id, 1, request))
    return _read_response(sock, stream_id)


def _read_response(sock: socket.socket, stream_id: int) -> ttrpc_pb2.Response:
    header = b""
    while len(header) < HEADER.size:
        header += sock.recv(HEADER.size - len(header))
    length, got_stream, message_type, _ = HEADER.unpack(header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    assert (got_stream, message_type) == (stream_id, 2)
    return ttrpc_pb2.Response.FromString(body)


def test_round_trip_and_concurrent_calls_answer_by_stream(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"

    async def body(server: TtrpcServer) -> None:
        client = await TtrpcClient.connect(f"ttrpc+unix://{path}")
        slow = asyncio.ensure_future(client.call(SERVICE, "Sleep", b"0.3"))
        fast = await client.call(SERVICE, "Reverse", b"abc")
        assert fast == b"cba"
        assert not slow.done()
        assert await slow == b"0.3"
        await client.close()

    _serve(path, body)


def test_status_codes_for_unknown_refused_and_late_calls(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"

    async def body(server: TtrpcServer) -> None:
        client = await TtrpcClient.connect(path)
        with pytest.raises(StatusError) as unknown_method:
            await client.call(SERVICE, "Nope", b"")
        assert unknown_method.value.code == status.UNIMPLEMENTED
        with pytest.raises(StatusError) as unknown_service:
            await client.call("other.Service", "Reverse", b"")
        assert unknown_service.value.code == status.UNIMPLEMENTED
        with pytest.raises(StatusError) as refused:
            await client.call(SERVICE, "Refuse", b"thing")
        assert (refused.value.code, refused.value.message) == (status.NOT_FOUND, "no thing")
        with pytest.raises(StatusError) as late:
            await client.call(SERVICE, "Sleep", b"5", timeout=0.1)
        assert late.value.code == status.DEADLINE_EXCEEDED
        await client.close()

    _serve(path, body)


def test_hostile_input_never_takes_the_server_down(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"

    def attack() -> None:
        valid = ttrpc_pb2.Request(service=SERVICE, method="Reverse", payload=b"ok").SerializeToString()
        # Random bytes, then close.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(os.urandom(5000))
        # A truncated frame: header promises 100 bytes, 10 arrive, then close.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(HEADER.pack(100, 1, 1, 0) + b"x" * 10)
        # Invalid protobuf as the request envelope: INVALID_ARGUMENT, connection stays usable.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            assert _raw_call(sock, 1, b"\xff\xff\xff\xff").status.code == status.INVALID_ARGUMENT
            assert _raw_call(sock, 3, valid).payload == b"ko"
        # A frame over 4 MiB: RESOURCE_EXHAUSTED, then the same connection still works.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            big = MESSAGE_LENGTH_MAX + 10
            sock.sendall(struct.pack(">IIBB", big, 5, 1, 0) + b"\0" * big)
            assert _read_response(sock, 5).status.code == status.RESOURCE_EXHAUSTED
            assert _raw_call(sock, 7, valid).payload == b"ko"
        # A header announcing gigabytes: the connection is closed, nothing is buffered.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(struct.pack(">IIBB", 0xFFFFFFF0, 9, 1, 0))
            sock.settimeout(5)
            assert sock.recv(10) == b""

    async def body(server: TtrpcServer) -> None:
        await asyncio.to_thread(attack)
        client = await TtrpcClient.connect(path)
        assert await client.call(SERVICE, "Reverse", b"still up") == b"pu llits"
        await client.close()

    _serve(path, body)


def test_calls_of_a_closed_connection_are_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    cancelled: list[bool] = []

    async def park(payload: bytes) -> bytes:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return payload

    async def main() -> None:
        server = TtrpcServer()
        server.register(SERVICE, "Park", park)
        await server.start(path)
        client = await TtrpcClient.connect(path)
        pending = asyncio.ensure_future(client.call(SERVICE, "Park", b""))
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(ConnectionError):
            await pending
        for _ in range(50):
            if cancelled:
                break
            await asyncio.sleep(0.02)
        assert cancelled == [True]
        with pytest.raises(ConnectionError):  # a closed client fails at once instead of waiting forever
            await asyncio.wait_for(client.call(SERVICE, "Park", b""), 2)
        survivor = await TtrpcClient.connect(path)
        await asyncio.sleep(0.1)  # let the server accept it
        await server.close()
        with pytest.raises(ConnectionError):  # the server went away under a live client
            await asyncio.wait_for(survivor.call(SERVICE, "Park", b""), 2)
        await survivor.close()

    asyncio.run(main())
