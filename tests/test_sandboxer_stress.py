"""Hostile bytes on both sockets of a real sandboxer, and 500 sandboxes created at once."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path

import grpc
from google.protobuf.any_pb2 import Any as AnyMessage

from kwasm.api import sandbox_pb2, shim_pb2
from kwasm.sandboxer.client import SandboxerClient, TaskClient
from kwasm.sandboxer.density import start_pod
from kwasm.sandboxer.launch import make_bundle, pod_config, running_sandboxer
from kwasm.sandboxer.ttrpcframe import HEADER, encode_frame

DEMO_WASM = Path(__file__).resolve().parents[1] / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _send(path: Path, data: bytes, read: bool = False) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return b""  # the server hung up on the garbage: fine, as long as it keeps serving
        if not read:
            return b""
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def _grpc_raw(path: Path, method: str, payload: bytes) -> grpc.StatusCode:
    with grpc.insecure_channel(f"unix:{path}") as channel:
        call = channel.unary_unary(f"/containerd.services.sandbox.v1.Controller/{method}")
        try:
            call(payload, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_garbage_on_both_sockets_never_takes_the_daemon_down(tmp_path: Path) -> None:
    with running_sandboxer(tmp_path / "sbx") as sandboxer:
        task_socket = sandboxer.directory / "task.sock"
        for target in (sandboxer.listen, task_socket):
            _send(target, os.urandom(64 * 1024))
            _send(target, H2_PREFACE + os.urandom(4096))
            _send(target, HEADER.pack(1000, 1, 1, 0) + b"truncated")
            _send(target, struct.pack(">IIBB", 5 << 20, 3, 1, 0) + b"\0" * (5 << 20))
        # Invalid protobuf inside a well-formed ttrpc request answers INVALID_ARGUMENT.
        bogus = b"\x0a\x18containerd.task.v2.Task\x12\x05State\x1a\x03\xff\xff\xff"
        reply = _send(task_socket, encode_frame(1, 1, bogus), read=True)
        assert b"malformed" in reply
        # Well-formed gRPC with an invalid or oversized body.
        assert _grpc_raw(sandboxer.listen, "Create", b"\xff\xff\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT
        huge = sandbox_pb2.ControllerCreateRequest(sandbox_id="x" * (5 << 20)).SerializeToString()
        assert _grpc_raw(sandboxer.listen, "Create", huge) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _grpc_raw(sandboxer.listen, "NoSuchMethod", b"") == grpc.StatusCode.UNIMPLEMENTED

        async def still_serving() -> None:
            sandboxes = SandboxerClient(sandboxer.listen)
            await sandboxes.create(sandbox_pb2.ControllerCreateRequest(
                sandbox_id="after", options=AnyMessage(value=pod_config("after"))))
            assert (await sandboxes.start("after")).version == 2
            tasks = await TaskClient.connect(f"ttrpc+unix://{task_socket}")
            connected = await tasks.call("Connect", shim_pb2.ConnectRequest(), shim_pb2.ConnectResponse)
            assert connected.shim_pid == sandboxer.pid
            await tasks.close()
            await sandboxes.close()

        asyncio.run(still_serving())
        assert sandboxer.process.poll() is None


def test_500_sandboxes_created_concurrently_all_run(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", DEMO_WASM, ["sleep", "600"])
    with running_sandboxer(tmp_path / "sbx") as sandboxer:

        async def burst() -> None:
            sandboxes = SandboxerClient(sandboxer.listen)
            tasks = await TaskClient.connect(f"ttrpc+unix://{sandboxer.directory / 'task.sock'}")
            task_ids = await asyncio.gather(*(start_pod(sandboxes, tasks, f"p{i}", bundle) for i in range(500)))
            states = await asyncio.gather(*(tasks.state(task_id) for task_id in task_ids))
            assert all(state.status == 2 for state in states)
            listing = await sandboxes.list()
            assert len(listing.sandboxes) == 500
            assert all(s.state == "ready" and s.processes[0].status == 2 for s in listing.sandboxes)
            assert listing.open_fds < 100  # empty stdio: no descriptor per sandbox
            statuses = await asyncio.gather(*(sandboxes.status(f"p{i}") for i in range(500)))
            assert {s.state for s in statuses} == {"SANDBOX_READY"}
            await tasks.close()
            await sandboxes.close()

        asyncio.run(burst())
