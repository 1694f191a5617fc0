"""The density benchmark's pod pipeline against a real sandboxer: requests, answers, failures, hang-ups."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kwasm.sandboxer.client import SandboxerClient
from kwasm.sandboxer.launch import SandboxerProcess, make_bundle, running_sandboxer
from kwasm.sandboxer.podpump import PodPump, PodRequests, Requests
from kwasm.sandboxer.ttrpc import TtrpcClient
from kwasm.sandboxer.wireclient import WireClient

DEMO_WASM = Path(__file__).resolve().parents[1] / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"
RUNNING = 2


@pytest.fixture
def sandboxer(tmp_path: Path) -> Iterator[SandboxerProcess]:
    with running_sandboxer(tmp_path / "sbx") as process:
        yield process


def test_spliced_requests_are_the_bytes_the_protobuf_builders_make() -> None:
    requests = PodRequests("/run/bundles/x", "/run/fifo")
    for sandbox_id in ("a", "pod-7", "pod-12", "density-1234-1700000000-99999", "pod-13"):
        assert requests(sandbox_id) == requests.build(sandbox_id)
    awkward = PodRequests("/run/~~~~~/bundle")  # the placeholder itself in the bundle path
    assert awkward("abcde") == awkward.build("abcde")
    assert b"/run/~~~~~/bundle" in awkward("abcde")[3]


def test_pods_run_and_a_refused_one_is_reported(sandboxer: SandboxerProcess, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "sleep", DEMO_WASM, ["sleep", "600"])
    requests = PodRequests(str(bundle))
    ids = [f"pump-{index}" for index in range(40)]
    pods = [(sandbox_id, requests(sandbox_id)) for sandbox_id in ids]
    pods.insert(20, ("bad id", requests.build("bad id")))  # not a valid sandbox id: Create fails
    queue = list(reversed(pods))
    started: list[tuple[str, float]] = []

    async def drive() -> PodPump:
        admin = SandboxerClient(sandboxer.listen)
        address = (await admin.list()).task_address
        controller = await WireClient.connect(sandboxer.listen)
        tasks = await TtrpcClient.connect(address)
        pump = PodPump(controller, tasks, address)
        await pump.run(lambda: queue.pop() if queue else None, 8, lambda i, seconds: started.append((i, seconds)))
        listing = await admin.list()
        assert sorted(s.id for s in listing.sandboxes if any(p.status == RUNNING for p in s.processes)) == sorted(ids)
        await controller.close()
        await tasks.close()
        await admin.close()
        return pump

    pump = asyncio.run(drive())
    assert sorted(sandbox_id for sandbox_id, _seconds in started) == sorted(ids)
    assert all(seconds > 0 for _sandbox_id, seconds in started)
    assert len(pump.failures) == 1
    assert "status 3" in pump.failures[0] and "bad id" in pump.failures[0]  # INVALID_ARGUMENT


def test_a_wrong_task_address_in_start_fails_the_pod(sandboxer: SandboxerProcess, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "sleep", DEMO_WASM, ["sleep", "600"])
    requests = PodRequests(str(bundle))
    queue = [("lost", requests("lost"))]

    async def drive() -> PodPump:
        address = (await SandboxerClient(sandboxer.listen).list()).task_address
        controller = await WireClient.connect(sandboxer.listen)
        tasks = await TtrpcClient.connect(address)
        pump = PodPump(controller, tasks, "ttrpc+unix:///elsewhere.sock")
        await pump.run(lambda: queue.pop() if queue else None, 1)
        await controller.close()
        await tasks.close()
        return pump

    pump = asyncio.run(drive())
    assert len(pump.failures) == 1 and "elsewhere" in pump.failures[0]


def test_a_sandboxer_that_dies_mid_run_ends_the_run(sandboxer: SandboxerProcess, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "sleep", DEMO_WASM, ["sleep", "600"])
    requests = PodRequests(str(bundle))
    remaining = iter(range(20_000))
    handed_out = 0

    def next_pod() -> tuple[str, Requests] | None:
        nonlocal handed_out
        index = next(remaining, None)
        if index is None:
            return None
        handed_out += 1
        if handed_out == 50:
            os.kill(sandboxer.pid, signal.SIGKILL)
        return f"dying-{index}", requests(f"dying-{index}")

    async def drive() -> PodPump:
        address = (await SandboxerClient(sandboxer.listen).list()).task_address
        controller = await WireClient.connect(sandboxer.listen)
        tasks = await TtrpcClient.connect(address)
        pump = PodPump(controller, tasks, address)
        await asyncio.wait_for(pump.run(next_pod, 32), 60)  # a guard against a hang, not a timing
        return pump

    pump = asyncio.run(drive())
    assert not pump.connected
    assert pump.failures
    assert handed_out < 20_000  # no pod is started once a connection is gone
