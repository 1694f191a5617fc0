"""``kwasm cri-config``: pod.json / container.json that parse as CRI runtime.v1 messages."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import KwasmRunner
from fakebin.harness import store_demo_image
from google.protobuf import json_format

from kwasm.api import cri_pb2


@pytest.fixture(autouse=True)
def private_pod_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pod log directories under tmp_path, never the real /var/log/pods."""
    root = tmp_path / "pod-logs"
    monkeypatch.setenv("KWASM_POD_LOG_ROOT", str(root))
    return root


def _parse(path: Path, message: type[json_format.Message]) -> json_format.Message:
    """Parse a crictl JSON file strictly: a key the proto does not define fails."""
    return json_format.Parse(path.read_text(), message(), ignore_unknown_fields=False)


def test_writes_configs_crictl_can_read_with_args_and_env(kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path) -> None:
    store_demo_image(kwasm_root)
    out = tmp_path / "cfg"
    result = kwasm("cri-config", "wasi-demo-app:latest", "-o", str(out), "-e", "GREETING=hi there",
                   "--name", "demo", "--", "echo", "hello")
    assert result.returncode == 0, result.stderr
    pod_path, container_path = out / "pod.json", out / "container.json"
    assert shlex.split(result.stdout.strip()) == [
        "crictl", "run", "--runtime=wasm", "--no-pull", str(container_path), str(pod_path)
    ]

    pod = _parse(pod_path, cri_pb2.PodSandboxConfig)
    assert isinstance(pod, cri_pb2.PodSandboxConfig)
    assert (pod.metadata.name, pod.metadata.namespace, pod.metadata.attempt) == ("demo", "default", 0)
    assert len(pod.metadata.uid) == 36
    assert pod.log_directory == f"{tmp_path}/pod-logs/default_demo_{pod.metadata.uid}"
    assert Path(pod.log_directory).is_dir()
    ns = pod.linux.security_context.namespace_options
    assert (ns.network, ns.pid) == (cri_pb2.NODE, cri_pb2.CONTAINER)

    container = _parse(container_path, cri_pb2.ContainerConfig)
    assert isinstance(container, cri_pb2.ContainerConfig)
    assert container.metadata.name == "demo"
    assert container.image.image == "wasi-demo-app:latest"
    assert list(container.command) == ["/wasi-demo-app.wasm"]
    assert list(container.args) == ["echo", "hello"]
    assert [(kv.key, kv.value) for kv in container.envs] == [("GREETING", "hi there")]
    assert container.log_path == "demo.log"
    assert container.linux.security_context.namespace_options.pid == cri_pb2.CONTAINER

    raw_pod = json.loads(pod_path.read_text())
    assert raw_pod["linux"]["security_context"]["namespace_options"] == {"network": 2, "pid": 1}


def test_without_args_uses_the_image_cmd_and_unique_names(
    kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path
) -> None:
    store_demo_image(kwasm_root, cmd=["daemon"])
    names = set()
    for out in (tmp_path / "a", tmp_path / "b"):
        result = kwasm("cri-config", "wasi-demo-app", "-o", str(out), "--handler", "kwasm", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["crictl"][2] == "--runtime=kwasm"
        container = json.loads((out / "container.json").read_text())
        assert container["args"] == ["daemon"]
        assert container["metadata"]["name"].startswith("wasi-demo-app-")
        names.add(report["name"])
    assert len(names) == 2


def test_a_misspelled_key_fails_strict_parsing(kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path) -> None:
    store_demo_image(kwasm_root)
    assert kwasm("cri-config", "wasi-demo-app", "-o", str(tmp_path)).returncode == 0
    pod = json.loads((tmp_path / "pod.json").read_text())
    pod["log_dir"] = pod.pop("log_directory")
    with pytest.raises(json_format.ParseError, match="log_dir"):
        json_format.Parse(json.dumps(pod), cri_pb2.PodSandboxConfig(), ignore_unknown_fields=False)


def test_messages_use_upstream_field_numbers() -> None:
    pod = cri_pb2.PodSandboxConfig(log_directory="/l")
    pod.metadata.name = "p"
    pod.linux.security_context.namespace_options.network = cri_pb2.NODE
    # metadata=1 {name=1}, log_directory=3, linux=8 {security_context=2 {namespace_options=1 {network=1: 2}}}
    assert pod.SerializeToString() == bytes.fromhex("0a030a0170" "1a022f6c" "42061204" "0a020802")
    container = cri_pb2.ContainerConfig(log_path="x", command=["c"])
    container.image.image = "i"
    container.envs.add(key="K", value="V")
    # image=2 {image=1}, command=3, envs=6 {key=1, value=2}, log_path=11
    assert container.SerializeToString() == bytes.fromhex("12030a0169" "1a0163" "32060a014b120156" "5a0178")


def test_unknown_image_and_bad_env_write_nothing(kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path) -> None:
    store_demo_image(kwasm_root)
    missing = kwasm("cri-config", "nope:1", "-o", str(tmp_path / "x"))
    assert missing.returncode == 3
    assert "nope" in missing.stderr
    bad_env = kwasm("cri-config", "wasi-demo-app", "-o", str(tmp_path / "y"), "-e", "=value")
    assert bad_env.returncode == 2
    assert "-e takes KEY=VALUE, not '=value'" in bad_env.stderr
    bad_name = kwasm("cri-config", "wasi-demo-app", "-o", str(tmp_path / "z"), "--name", "Bad_Name")
    assert bad_name.returncode == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_an_output_directory_that_cannot_be_made_is_one_error_line(
    kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path
) -> None:
    store_demo_image(kwasm_root)
    (tmp_path / "file").write_text("not a directory")
    result = kwasm("cri-config", "wasi-demo-app", "-o", str(tmp_path / "file" / "out"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: cannot create {tmp_path / 'file' / 'out'}: Not a directory"]


def test_k8s_runtimeclass_manifest(kwasm: KwasmRunner) -> None:
    result = kwasm("k8s", "runtimeclass", "--handler", "wasm", "--image", "127.0.0.1:5000/demo:1", "--", "sleep", "5")
    assert result.returncode == 0, result.stderr
    runtime_class, pod = result.stdout.split("---\n")
    assert "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: wasm\nhandler: wasm" in runtime_class
    assert "runtimeClassName: wasm\n" in pod
    assert '      image: "127.0.0.1:5000/demo:1"\n' in pod
    assert '      args: ["sleep", "5"]\n' in pod
    bad = kwasm("k8s", "runtimeclass", "--handler", "Wasm_1")
    assert bad.returncode == 2


def test_a_bare_env_name_copies_the_callers_value_as_docker_does(
    kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path
) -> None:
    store_demo_image(kwasm_root)
    out = tmp_path / "cfg"
    result = kwasm(
        "cri-config", "wasi-demo-app", "-o", str(out), "-e", "FROM_CALLER", "-e", "NOT_SET_ANYWHERE", "-e", "A=1",
        env={"FROM_CALLER": "copied"},
    )
    assert result.returncode == 0, result.stderr
    container = _parse(out / "container.json", cri_pb2.ContainerConfig)
    assert isinstance(container, cri_pb2.ContainerConfig)
    assert [(kv.key, kv.value) for kv in container.envs] == [("FROM_CALLER", "copied"), ("A", "1")]
