"""Kubernetes' path on containerd 1.6: the CRI plugin runs pods with the runtime handler `kwasm`.

The test makes the CRI calls a kubelet makes (runtime.v1.RuntimeService over containerd's gRPC
socket): a host-network pod (its pause container goes through the shim too) and wasm containers in
it, with CRI's own log files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import DEMO_DIR, KwasmRunner
from containerd_service import IMAGE, RunningContainerd, running_containerd, sandboxer_pid, wait_for

from kwasm.api import cri_pb2, cri_runtime_pb2, cri_runtime_pb2_grpc

pytestmark = pytest.mark.timeout(120)
CALL_TIMEOUT = 60


Cri = tuple[RunningContainerd, cri_runtime_pb2_grpc.RuntimeServiceStub]


@pytest.fixture
def cri(tmp_path: Path, image_tar_path: Path) -> Iterator[Cri]:
    """containerd with CRI on, the demo image imported into CRI's namespace, and a RuntimeService client."""
    with running_containerd(tmp_path / "ctd", cri=True) as containerd:
        imported = containerd.ctr("k8s.io", "images", "import", "--all-platforms", str(image_tar_path))
        assert imported.returncode == 0, imported.stderr
        channel = grpc.insecure_channel(f"unix://{containerd.address}")
        try:
            yield containerd, cri_runtime_pb2_grpc.RuntimeServiceStub(channel)
        finally:
            channel.close()


@pytest.fixture
def image_tar_path(tmp_path: Path, kwasm: KwasmRunner) -> Path:
    """The demo app as `kwasm build -o TAR` writes it."""
    tar = tmp_path / "demo.tar"
    result = kwasm("build", str(DEMO_DIR), "-o", str(tar))
    assert result.returncode == 0, result.stderr
    return tar


def _container(name: str, args: list[str]) -> cri_pb2.ContainerConfig:
    config = cri_pb2.ContainerConfig()
    config.metadata.name = name
    config.image.image = IMAGE
    config.args.extend(args)
    config.log_path = f"{name}.log"
    return config


def _wait_exited(
    service: cri_runtime_pb2_grpc.RuntimeServiceStub, container_id: str
) -> cri_runtime_pb2.ContainerStatus:
    deadline = time.monotonic() + 30
    while True:
        status = service.ContainerStatus(
            cri_runtime_pb2.ContainerStatusRequest(container_id=container_id), timeout=CALL_TIMEOUT
        ).status
        if status.state == cri_runtime_pb2.CONTAINER_EXITED or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_a_pod_of_wasm_containers_through_cri(cri: Cri, tmp_path: Path) -> None:
    containerd, service = cri
    logs = tmp_path / "pod-logs"
    pod = cri_pb2.PodSandboxConfig(log_directory=str(logs))
    pod.metadata.name, pod.metadata.namespace, pod.metadata.uid = "demo", "default", "uid-demo"
    pod.linux.security_context.namespace_options.network = cri_pb2.NODE
    pod_id = service.RunPodSandbox(
        cri_runtime_pb2.RunPodSandboxRequest(config=pod, runtime_handler="kwasm"), timeout=CALL_TIMEOUT
    ).pod_sandbox_id
    layout = containerd.layout("k8s.io")
    sandboxer = sandboxer_pid(layout)
    assert sandboxer is not None  # the pause container made the shared sandboxer start

    def create(name: str, args: list[str]) -> str:
        request = cri_runtime_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=_container(name, args), sandbox_config=pod
        )
        container_id = service.CreateContainer(request, timeout=CALL_TIMEOUT).container_id
        service.StartContainer(cri_runtime_pb2.StartContainerRequest(container_id=container_id), timeout=CALL_TIMEOUT)
        return container_id

    hello = create("hello", ["echo", "hello", "from", "cri"])
    status = _wait_exited(service, hello)
    assert (status.state, status.exit_code, status.reason) == (cri_runtime_pb2.CONTAINER_EXITED, 0, "Completed")
    assert (logs / "hello.log").read_text().endswith(" stdout F hello from cri\n")

    failing = create("failing", ["exit", "3"])
    assert _wait_exited(service, failing).exit_code == 3

    daemon = create("daemon", ["daemon"])
    assert wait_for(lambda: "a sandbox is but a dream." in (logs / "daemon.log").read_text(), 10)
    service.StopContainer(cri_runtime_pb2.StopContainerRequest(container_id=daemon, timeout=1), timeout=CALL_TIMEOUT)
    stopped = _wait_exited(service, daemon)
    assert stopped.state == cri_runtime_pb2.CONTAINER_EXITED and stopped.exit_code != 0
    assert sandboxer_pid(layout) == sandboxer  # one sandboxer for the pod and all its containers

    for container_id in (hello, failing, daemon):
        service.RemoveContainer(cri_runtime_pb2.RemoveContainerRequest(container_id=container_id), timeout=CALL_TIMEOUT)
    service.StopPodSandbox(cri_runtime_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT)
    service.RemovePodSandbox(cri_runtime_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=CALL_TIMEOUT)
    assert wait_for(lambda: sandboxer_pid(layout) is None, 15), "the sandboxer outlived the pod"
    assert not list(containerd.bundles("k8s.io").glob("*"))
    assert containerd.mounts_below(containerd.state / "io.containerd.runtime.v2.task") == []
