"""``kwasm doctor`` against a live ``kwasm sandboxer``, a dead socket, and stand-ins of isula/crictl."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import KwasmRunner
from fakebin.harness import Fakes, install_fakes

from kwasm.sandboxer.launch import running_sandboxer

GOOD_LIMITS = {"fs/nr_open": 1048576, "vm/max_map_count": 262144, "kernel/pid_max": 4194304,
               "kernel/threads-max": 200000}


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fakes:
    """Recording stand-ins of isula/crictl/systemctl on PATH (see tests/fakebin)."""
    return install_fakes(tmp_path, monkeypatch)


@pytest.fixture
def live_sandboxer(tmp_path: Path) -> Iterator[Path]:
    """A real ``kwasm sandboxer`` on a private socket (stopped by pid afterwards); yields the socket."""
    with running_sandboxer(tmp_path / "sbx") as sandboxer:
        yield sandboxer.listen


def _node(tmp_path: Path, sandboxer_address: str, limits: dict[str, int] | None = None) -> dict[str, str]:
    """daemon.json for the wasm handler, crictl.yaml pointed at iSulad, a private /proc/sys; the env to use."""
    Path(os.environ["KWASM_ISULAD_CONFIG"]).write_text(json.dumps({
        "enable-cri-v1": True,
        "cri-runtimes": {"wasm": "io.containerd.wasm.v1"},
        "cri-sandboxers": {"wasm": {"name": "wasm", "address": sandboxer_address}},
    }))
    Path(os.environ["CRI_CONFIG_FILE"]).write_text("runtime-endpoint: unix:///run/isulad.sock\n")
    proc_sys = tmp_path / "proc-sys"
    for key, value in (limits or GOOD_LIMITS).items():
        (proc_sys / key).parent.mkdir(parents=True, exist_ok=True)
        (proc_sys / key).write_text(f"{value}\n")
    return {"KWASM_PROC_SYS": str(proc_sys)}


def _rows(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    report = json.loads(result.stdout)
    return {row["name"]: row for row in report["checks"]}


def test_ready_node_with_live_sandboxer_passes(
    kwasm: KwasmRunner, fakes: Fakes, tmp_path: Path, live_sandboxer: Path
) -> None:
    env = _node(tmp_path, str(live_sandboxer))
    result = kwasm("doctor", "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["ok"] is True
    rows = _rows(result)
    assert rows["sandboxer"]["status"] == "ok"
    assert rows["sandboxer"]["detail"] == f"{live_sandboxer} answers Platform: linux/amd64"
    assert rows["iSulad daemon"]["detail"] == "version 2.1.6 at unix:///var/run/isulad.sock"
    assert rows["daemon.json"]["detail"] == f"wasm → io.containerd.wasm.v1, sandboxer wasm at {live_sandboxer}"
    assert rows["crictl"]["detail"] == "crictl version v1.29.0"
    assert rows["crictl endpoint"]["status"] == "ok"
    assert all(rows[key]["status"] == "ok" for key in ("fs.nr_open", "vm.max_map_count", "kernel.pid_max"))
    assert fakes.argvs() == [["isula", "version"], ["crictl", "--version"]]


def test_dead_socket_fails_with_the_fix(kwasm: KwasmRunner, fakes: Fakes, tmp_path: Path) -> None:
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(dead))
    env = _node(tmp_path, str(dead))
    result = kwasm("doctor", "--json", env=env)
    assert result.returncode == 1
    row = _rows(result)["sandboxer"]
    assert row["status"] == "fail" and row["required"] is True
    assert row["detail"] == f"{dead}: Platform call failed: UNAVAILABLE: connection refused (nothing listens)"
    assert row["fix"] == f"start it: kwasm sandboxer --listen {dead}"

    table = kwasm("doctor", env=env)
    assert table.returncode == 1
    assert "FAIL" in table.stdout and "start it: kwasm sandboxer --listen" in table.stdout


def test_old_or_unreachable_isulad_and_crictl_elsewhere_fail(
    kwasm: KwasmRunner, fakes: Fakes, tmp_path: Path, live_sandboxer: Path
) -> None:
    env = _node(tmp_path, str(live_sandboxer))
    fakes.set("isulad_version", "2.1.5")
    old = _rows(kwasm("doctor", "--json", env=env))["iSulad daemon"]
    assert (old["status"], old["fix"]) == ("fail", "upgrade iSulad to ≥ 2.1.6")

    fakes.set("isulad_down", "")
    down = _rows(kwasm("doctor", "--json", env=env))["iSulad daemon"]
    assert (down["status"], down["detail"]) == ("fail", "not reachable at unix:///var/run/isulad.sock")

    Path(os.environ["CRI_CONFIG_FILE"]).write_text("runtime-endpoint: unix:///run/containerd/containerd.sock\n")
    endpoint = _rows(kwasm("doctor", "--json", env=env))["crictl endpoint"]
    assert endpoint["status"] == "fail"
    assert endpoint["fix"].startswith("crictl config --set runtime-endpoint=unix:///var/run/isulad.sock")


def test_missing_daemon_json_and_tools_fail_with_fixes(
    kwasm: KwasmRunner, fakes: Fakes, tmp_path: Path
) -> None:
    result = kwasm("doctor", "--json", env={"PATH": "/usr/bin:/bin", "KWASM_PROC_SYS": str(tmp_path)})
    assert result.returncode == 1
    rows = _rows(result)
    assert rows["daemon.json"]["detail"].endswith("daemon.json does not exist")
    assert rows["daemon.json"]["fix"].startswith("kwasm setup-isulad --config ")
    assert rows["isula"]["status"] == rows["crictl"]["status"] == "fail"
    assert "install cri-tools" in rows["crictl"]["fix"]


def test_low_kernel_limits_warn_without_failing(
    kwasm: KwasmRunner, fakes: Fakes, tmp_path: Path, live_sandboxer: Path
) -> None:
    low = {**GOOD_LIMITS, "vm/max_map_count": 65530, "kernel/pid_max": 32768}
    result = kwasm("doctor", "--json", env=_node(tmp_path, str(live_sandboxer), low))
    assert result.returncode == 0, result.stdout
    rows = _rows(result)
    assert rows["vm.max_map_count"]["status"] == "warn" and rows["vm.max_map_count"]["required"] is False
    assert rows["vm.max_map_count"]["fix"].startswith("sysctl -w vm.max_map_count=262144")
    assert rows["kernel.pid_max"]["fix"].startswith("sysctl -w kernel.pid_max=65536")
    assert rows["kernel.threads-max"]["status"] == "ok"


def test_daemon_json_that_isulad_would_refuse_fails(kwasm: KwasmRunner, fakes: Fakes, tmp_path: Path) -> None:
    env = _node(tmp_path, str(tmp_path / "none.sock"))
    Path(os.environ["KWASM_ISULAD_CONFIG"]).write_text('{"enable-cri-v1": "true", "systemd-cgroup": false}')
    row = _rows(kwasm("doctor", "--json", env=env))["daemon.json"]
    assert row["status"] == "fail"
    assert row["detail"] == "enable-cri-v1: expected boolean, found string 'true'"
    Path(os.environ["KWASM_ISULAD_CONFIG"]).write_text('{"enable-cri-v1": true, "systemd-cgroup": true}')
    row = _rows(kwasm("doctor", "--json", env=env))["daemon.json"]
    assert "cri-runtimes['wasm'] is missing" in row["detail"]
    assert "systemd-cgroup is true" in row["detail"]
    assert row["fix"].endswith("--handler wasm --restart")
