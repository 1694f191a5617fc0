"""``run_on_isulad`` (``kwasm run --engine isulad``) against recording stand-ins of isula and crictl."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import KwasmRunner
from fakebin.harness import Fakes, install_fakes, path_without, store_demo_image
from google.protobuf import json_format

from kwasm.api import cri_pb2
from kwasm.cri.isulad_run import run_on_isulad
from kwasm.errors import ConfigFileError, ToolMissingError


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fakes:
    """Recording stand-ins of isula/crictl/systemctl on PATH (see tests/fakebin)."""
    return install_fakes(tmp_path, monkeypatch)

CONFIGURED = {
    "enable-cri-v1": True,
    "cri-runtimes": {"wasm": "io.containerd.wasm.v1"},
    "cri-sandboxers": {"wasm": {"name": "wasm", "address": "/run/kwasm-sandboxer.sock"}},
}


@pytest.fixture
def node(fakes: Fakes, kwasm_root: Path) -> Fakes:
    """iSulad configured for the wasm handler, crictl pointed at it, the demo image in kwasm's store."""
    Path(os.environ["KWASM_ISULAD_CONFIG"]).write_text(json.dumps(CONFIGURED))
    Path(os.environ["CRI_CONFIG_FILE"]).write_text("runtime-endpoint: unix:///var/run/isulad.sock\ntimeout: 10\n")
    store_demo_image(kwasm_root)
    return fakes


def test_loads_missing_image_runs_waits_prints_logs_and_cleans_up(
    node: Fakes, kwasm_root: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    node.set("exit_code", "3")
    node.set("logs", "hello from wasm")

    assert run_on_isulad("wasi-demo-app:latest", ["echo", "hello from wasm"], {"K": "V"}, rm=True) == 3

    [images, load] = node.calls("isula")
    assert images["argv"] == ["isula", "images"]
    assert load["argv"][:3] == ["isula", "load", "-i"] and load["argv"][3].endswith("/image.tar")
    assert {"manifest.json", "index.json", "oci-layout"} <= set(load["tar_members"])
    assert not Path(load["argv"][3]).exists()

    calls = node.calls("crictl")
    run_argv = calls[0]["argv"]
    container_path, pod_path = run_argv[4], run_argv[5]
    assert run_argv == ["crictl", "run", "--runtime=wasm", "--no-pull", container_path, pod_path]
    assert Path(container_path).parent.parent == kwasm_root / "isulad"
    container = json_format.Parse(calls[0]["files"][container_path], cri_pb2.ContainerConfig())
    pod = json_format.Parse(calls[0]["files"][pod_path], cri_pb2.PodSandboxConfig())
    assert list(container.args) == ["echo", "hello from wasm"]
    assert [(kv.key, kv.value) for kv in container.envs] == [("K", "V")]
    name = pod.metadata.name
    assert pod.log_directory.startswith(os.environ["KWASM_POD_LOG_ROOT"] + "/default_")
    assert not Path(pod.log_directory).exists()
    container_id = node.argvs("crictl")[2][-1]
    pod_id = node.argvs("crictl")[-1][-1]
    assert node.argvs("crictl")[1:] == [
        ["crictl", "pods", "--name", f"^{name}$", "-q"],
        ["crictl", "inspect", "-o", "json", container_id],
        ["crictl", "logs", container_id],
        ["crictl", "pods", "--name", f"^{name}$", "-q"],
        ["crictl", "rmp", "-f", pod_id],
    ]
    out, err = capfd.readouterr()
    assert f"pod: {pod_id}\ncontainer: {container_id}\n" in out
    assert "hello from wasm" in out
    assert "loaded wasi-demo-app:latest into iSulad" in err
    assert json.loads((node.state / "pods.json").read_text()) == {}
    assert not Path(container_path).parent.exists()


def test_image_already_in_isulad_is_not_loaded_and_run_keeps_running(
    node: Fakes, capfd: pytest.CaptureFixture[str]
) -> None:
    node.set("images", "wasi-demo-app latest\n")
    assert run_on_isulad("wasi-demo-app", [], {}, rm=False) == 0
    assert node.argvs("isula") == [["isula", "images"]]
    [run, pods] = node.argvs("crictl")
    assert run[:4] == ["crictl", "run", "--runtime=wasm", "--no-pull"]
    assert pods[:2] == ["crictl", "pods"]
    container = json.loads(Path(run[4]).read_text())
    assert container["args"] == ["echo", "hello"]
    pod = json.loads(Path(run[5]).read_text())
    assert Path(pod["log_directory"]).is_dir()
    assert container["log_path"] == f"{pod['metadata']['name']}.log"
    out, err = capfd.readouterr()
    container_id = out.splitlines()[1].removeprefix("container: ")
    assert f"logs: crictl logs -f {container_id}" in err
    assert "crictl rmp -f" in err


def test_missing_crictl_names_the_fix(node: Fakes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path_without("crictl", monkeypatch, tmp_path)
    with pytest.raises(ToolMissingError, match=r"`crictl` is not on PATH: install cri-tools"):
        run_on_isulad("wasi-demo-app", [], {}, rm=True)
    assert node.calls() == []


def test_missing_isula_names_the_fix(node: Fakes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path_without("isula", monkeypatch, tmp_path)
    with pytest.raises(ToolMissingError, match=r"`isula` is not on PATH: install iSulad"):
        run_on_isulad("wasi-demo-app", [], {}, rm=True)


def test_unreachable_isulad_names_the_fix(node: Fakes) -> None:
    node.set("isulad_down", "")
    with pytest.raises(ToolMissingError, match=r"iSulad is not reachable at unix:///var/run/isulad.sock: start it"):
        run_on_isulad("wasi-demo-app", [], {}, rm=True)
    assert node.argvs("crictl") == []


def test_unconfigured_handler_names_setup_isulad(node: Fakes) -> None:
    Path(os.environ["KWASM_ISULAD_CONFIG"]).write_text(json.dumps({"cri-runtimes": {"vmm": "io.containerd.vmm.v1"}}))
    with pytest.raises(ConfigFileError) as caught:
        run_on_isulad("wasi-demo-app", [], {}, rm=True)
    message = str(caught.value)
    assert "missing enable-cri-v1, cri-runtimes['wasm'], cri-sandboxers['wasm']" in message
    assert "run `kwasm setup-isulad --handler wasm --restart`" in message
    assert node.calls() == []


def test_crictl_pointed_elsewhere_names_the_fix(node: Fakes) -> None:
    Path(os.environ["CRI_CONFIG_FILE"]).write_text("runtime-endpoint: unix:///run/containerd/containerd.sock\n")
    with pytest.raises(ConfigFileError, match=r"crictl config --set runtime-endpoint=unix:///var/run/isulad.sock"):
        run_on_isulad("wasi-demo-app", [], {}, rm=True)


def test_failed_crictl_run_reports_reason_and_removes_configs(node: Fakes, kwasm_root: Path) -> None:
    node.set("images", "wasi-demo-app latest\n")
    node.set("run_error", 'run pod sandbox: rpc error: code = Unknown desc = Invalid runtime name (wasm)')
    with pytest.raises(ToolMissingError, match=r"Invalid runtime name \(wasm\)"):
        run_on_isulad("wasi-demo-app", [], {}, rm=True)
    assert list((kwasm_root / "isulad").iterdir()) == []


def test_unwritable_pod_log_root_is_one_error_and_removes_configs(
    node: Fakes, kwasm_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.set("images", "wasi-demo-app latest\n")
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("KWASM_POD_LOG_ROOT", str(tmp_path / "not-a-dir"))
    with pytest.raises(ConfigFileError, match=r"cannot create the pod log directory .*KWASM_POD_LOG_ROOT"):
        run_on_isulad("wasi-demo-app", [], {}, rm=True)
    assert list((kwasm_root / "isulad").iterdir()) == []


def test_kwasm_run_engine_isulad_exits_with_the_containers_code(node: Fakes, kwasm: KwasmRunner) -> None:
    node.set("images", "wasi-demo-app latest\n")
    node.set("exit_code", "5")
    result = kwasm("run", "--engine", "isulad", "wasi-demo-app", "--", "exit", "5")
    assert result.returncode == 5, result.stderr
    assert result.stdout.startswith("pod: ")
    [run] = [call for call in node.calls("crictl") if call["argv"][1] == "run"]
    assert json.loads(run["files"][run["argv"][4]])["args"] == ["exit", "5"]


def test_kwasm_run_engine_isulad_without_crictl_is_one_clear_line(
    node: Fakes, kwasm: KwasmRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path_without("crictl", monkeypatch, tmp_path)
    result = kwasm("run", "--engine", "isulad", "wasi-demo-app")
    assert result.returncode == 10
    assert result.stderr.strip().splitlines() == [
        "error: `crictl` is not on PATH: install cri-tools (openEuler: `dnf install cri-tools`; "
        "or a release of kubernetes-sigs/cri-tools)"
    ]
