"""End to end without iSulad: the configs ``kwasm cri-config`` writes, handed to a live ``kwasm sandboxer``
the way iSulad >= 2.1.6 hands them over (PodSandboxConfig bytes in Create, an OCI bundle built from
container.json and the image rootfs), run the image and produce its output."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from conftest import KwasmRunner
from fakebin.harness import store_demo_image
from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyMessage

from kwasm.api import cri_pb2, sandbox_pb2, shim_pb2
from kwasm.sandboxer.client import SandboxerClient, TaskClient
from kwasm.sandboxer.density import update_request
from kwasm.sandboxer.launch import running_sandboxer


@pytest.fixture(autouse=True)
def private_pod_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pod log directories under tmp_path, never the real /var/log/pods."""
    root = tmp_path / "pod-logs"
    monkeypatch.setenv("KWASM_POD_LOG_ROOT", str(root))
    return root


def _bundle(bundle: Path, rootfs: Path, container: cri_pb2.ContainerConfig, image_env: list[str]) -> Path:
    """config.json as iSulad generates it from a ContainerConfig: args = command + args, env = image + CRI."""
    bundle.mkdir()
    spec = {
        "ociVersion": "1.0.2",
        "process": {
            "args": [*container.command, *container.args],
            "env": [*image_env, *(f"{kv.key}={kv.value}" for kv in container.envs)],
            "cwd": container.working_dir or "/",
        },
        "root": {"path": str(rootfs), "readonly": True},
        "mounts": [],
        "annotations": {"io.kubernetes.cri.container-type": "container"},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def test_cri_config_output_runs_on_the_kwasm_sandboxer(kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path) -> None:
    store = store_demo_image(kwasm_root)
    out = tmp_path / "cfg"
    result = kwasm("cri-config", "wasi-demo-app:latest", "-o", str(out), "--", "echo", "hello", "from", "cri")
    assert result.returncode == 0, result.stderr
    pod = json_format.Parse((out / "pod.json").read_text(), cri_pb2.PodSandboxConfig())
    container = json_format.Parse((out / "container.json").read_text(), cri_pb2.ContainerConfig())
    image = store.resolve("wasi-demo-app:latest")
    bundle = _bundle(tmp_path / "bundle", store.unpack(image), container, image.config.env)
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    sandbox_id, task_id = "b" * 64, "c" * 64

    async def as_isulad(listen: Path) -> tuple[dict[str, str], int]:
        sandboxes = SandboxerClient(listen)
        create = sandbox_pb2.ControllerCreateRequest(
            sandbox_id=sandbox_id, options=AnyMessage(value=pod.SerializeToString()), sandboxer="wasm"
        )
        await sandboxes.create(create)
        started = await sandboxes.start(sandbox_id)
        tasks = await TaskClient.connect(started.address)
        await sandboxes.update(update_request(sandbox_id, [task_id], str(fifo)))
        await tasks.create(shim_pb2.CreateTaskRequest(id=task_id, bundle=str(bundle), stdout=str(fifo)))
        await tasks.start(task_id)
        exit_status = (await asyncio.wait_for(tasks.wait(task_id), 30)).exit_status
        info = dict((await sandboxes.status(sandbox_id, verbose=True)).info)
        await tasks.delete(task_id)
        await sandboxes.stop(sandbox_id, 5)
        await sandboxes.shutdown(sandbox_id)
        await tasks.close()
        await sandboxes.close()
        return info, exit_status

    with running_sandboxer(tmp_path / "sbx") as sandboxer:
        info, exit_status = asyncio.run(as_isulad(sandboxer.listen))
    output = os.read(reader, 4096)
    os.close(reader)
    assert exit_status == 0
    assert output == b"hello from cri\n"
    assert (info["name"], info["namespace"], info["uid"]) == (
        pod.metadata.name, "default", pod.metadata.uid
    )
