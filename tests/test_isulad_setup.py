"""``kwasm setup-isulad``: daemon.json merging, validation, backups, atomic writes, restart."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
from conftest import KwasmRunner
from fakebin.harness import Fakes, install_fakes

from kwasm.cri.isulad_schema import SHIPPED_DEFAULT


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fakes:
    """Recording stand-ins of isula/crictl/systemctl on PATH (see tests/fakebin)."""
    return install_fakes(tmp_path, monkeypatch)

WANT_SANDBOXER = {"name": "wasm", "address": "/run/kwasm-sandboxer.sock"}

SHIPPED_TEXT = json.dumps(SHIPPED_DEFAULT, indent=4) + "\n"


def _daemon_json(fakes: Fakes) -> Path:
    return Path(os.environ["KWASM_ISULAD_CONFIG"])


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.*.bak"))


def test_absent_file_is_created_from_isulads_shipped_defaults(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    result = kwasm("setup-isulad")
    assert result.returncode == 0, result.stderr
    config = json.loads(path.read_text())
    assert list(config)[: len(SHIPPED_DEFAULT)] == list(SHIPPED_DEFAULT)
    assert config["cri-runtimes"] == {"kata": "io.containerd.kata.v2", "wasm": "io.containerd.wasm.v1"}
    assert config["cri-sandboxers"] == {"wasm": WANT_SANDBOXER}
    assert config["enable-cri-v1"] is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert _backups(path) == []
    assert "new file from iSulad's defaults" in result.stderr


def test_shipped_default_gains_entries_keeps_keys_order_mode_owner_and_backup(
    kwasm: KwasmRunner, fakes: Fakes
) -> None:
    path = _daemon_json(fakes)
    path.write_text(SHIPPED_TEXT)
    os.chmod(path, 0o604)
    os.chown(path, 1234, 4321)

    result = kwasm("setup-isulad")
    assert result.returncode == 0, result.stderr

    config = json.loads(path.read_text())
    assert list(config) == [*SHIPPED_DEFAULT, "cri-sandboxers", "enable-cri-v1"]
    for key, value in SHIPPED_DEFAULT.items():
        if key != "cri-runtimes":
            assert config[key] == value
    assert config["cri-runtimes"] == {"kata": "io.containerd.kata.v2", "wasm": "io.containerd.wasm.v1"}
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o604, 1234, 4321)
    [backup] = _backups(path)
    assert backup.read_bytes() == SHIPPED_TEXT.encode()
    assert f"backup: {backup}" in result.stderr
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_second_run_changes_nothing_and_says_so(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    path.write_text(SHIPPED_TEXT)
    assert kwasm("setup-isulad").returncode == 0
    first = path.read_bytes()
    first_mtime = path.stat().st_mtime_ns

    again = kwasm("setup-isulad", "--json")
    assert again.returncode == 0, again.stderr
    assert "nothing changed" in again.stderr
    assert json.loads(again.stdout)["changed"] is False
    assert path.read_bytes() == first
    assert path.stat().st_mtime_ns == first_mtime
    assert len(_backups(path)) == 1


def test_already_configured_by_hand_is_left_byte_for_byte(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    text = (
        '{"enable-cri-v1": true,\n "cri-runtimes": {"wasm": "io.containerd.wasm.v1"},\n'
        ' "cri-sandboxers": {"wasm": {"name": "wasm", "address": "/run/kwasm-sandboxer.sock"}}}\n'
    )
    path.write_text(text)
    result = kwasm("setup-isulad")
    assert result.returncode == 0, result.stderr
    assert "nothing changed" in result.stderr
    assert path.read_text() == text
    assert _backups(path) == []


def test_other_handler_is_kept_and_ours_is_updated(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    path.write_text(
        json.dumps(
            {
                "cri-runtimes": {"vmm": "io.containerd.vmm.v1", "wasm": "io.containerd.old.v1"},
                "cri-sandboxers": {
                    "vmm": {"name": "vmm", "address": "/run/vmm-sandboxer.sock"},
                    "wasm": {"name": "wasm", "address": "/run/old.sock", "image-type": "remote"},
                },
                "enable-cri-v1": False,
            }
        )
    )
    assert kwasm("setup-isulad").returncode == 0
    config = json.loads(path.read_text())
    assert config["cri-runtimes"] == {"vmm": "io.containerd.vmm.v1", "wasm": "io.containerd.wasm.v1"}
    assert config["cri-sandboxers"] == {
        "vmm": {"name": "vmm", "address": "/run/vmm-sandboxer.sock"},
        "wasm": {"name": "wasm", "address": "/run/kwasm-sandboxer.sock", "image-type": "remote"},
    }
    assert config["enable-cri-v1"] is True


def test_wrong_value_types_are_refused_and_the_file_is_untouched(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    text = json.dumps({"systemd-cgroup": "false", "log-opts": {"max-file": 1}, "hosts": "unix:///x.sock"})
    path.write_text(text)
    result = kwasm("setup-isulad")
    assert result.returncode == 9
    assert "systemd-cgroup: expected boolean, found string 'false'" in result.stderr
    assert "log-opts.max-file: expected string, found integer 1" in result.stderr
    assert "hosts: expected array of string, found string" in result.stderr
    assert path.read_text() == text
    assert _backups(path) == []


def test_a_string_enable_cri_v1_is_corrected_to_a_boolean(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    path.write_text('{"enable-cri-v1": "true"}')
    assert kwasm("setup-isulad").returncode == 0
    assert json.loads(path.read_text())["enable-cri-v1"] is True


def test_a_numeric_enable_cri_v1_is_corrected_to_a_boolean(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    configured = {
        "enable-cri-v1": 1,
        "cri-runtimes": {"wasm": "io.containerd.wasm.v1"},
        "cri-sandboxers": {"wasm": WANT_SANDBOXER},
    }
    path.write_text(json.dumps(configured))
    assert kwasm("setup-isulad").returncode == 0
    assert json.loads(path.read_text())["enable-cri-v1"] is True


def test_non_object_cri_runtimes_is_refused(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    path.write_text('{"cri-runtimes": ["wasm"]}')
    result = kwasm("setup-isulad")
    assert result.returncode == 9
    assert "cri-runtimes must be a JSON object" in result.stderr
    assert path.read_text() == '{"cri-runtimes": ["wasm"]}'


def test_invalid_json_is_untouched_and_reported_with_line_and_column(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    text = '{\n    "group": "isula",\n    "graph": "/var/lib/isulad",,\n}\n'
    path.write_text(text)
    result = kwasm("setup-isulad")
    assert result.returncode == 9
    assert "is not valid JSON (line 3, column 32" in result.stderr
    assert "left it untouched" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert path.read_text() == text
    assert sorted(p.name for p in path.parent.iterdir()) == ["daemon.json"]


def test_duplicate_keys_are_refused_untouched(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    text = '{"cri-runtimes": {"kata": "io.containerd.kata.v2", "kata": "io.containerd.kata.v3"}}\n'
    path.write_text(text)
    result = kwasm("setup-isulad")
    assert result.returncode != 0
    assert "repeats the key(s) kata" in result.stderr
    assert path.read_text() == text
    assert _backups(path) == []


def test_read_only_file_is_refused_untouched(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    path.write_text(SHIPPED_TEXT)
    os.chmod(path, 0o444)
    result = kwasm("setup-isulad")
    assert result.returncode == 9
    assert "read-only (mode 0444)" in result.stderr
    assert path.read_text() == SHIPPED_TEXT
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert sorted(p.name for p in path.parent.iterdir()) == ["daemon.json"]


def test_dry_run_prints_a_diff_and_writes_nothing(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    path.write_text(SHIPPED_TEXT)
    result = kwasm("setup-isulad", "--dry-run", "--handler", "wasi", "--runtime", "io.containerd.kwasm.v1")
    assert result.returncode == 0, result.stderr
    assert '+        "wasi": "io.containerd.kwasm.v1"' in result.stdout
    assert '+    "enable-cri-v1": true' in result.stdout
    assert '-        "kata": "io.containerd.kata.v2"' in result.stdout
    assert "dry run: nothing written" in result.stderr
    assert path.read_text() == SHIPPED_TEXT
    assert sorted(p.name for p in path.parent.iterdir()) == ["daemon.json"]


def test_kuasar_variant_points_at_kuasars_default_socket(kwasm: KwasmRunner, fakes: Fakes) -> None:
    path = _daemon_json(fakes)
    assert kwasm("setup-isulad", "--sandboxer", "kuasar").returncode == 0
    assert json.loads(path.read_text())["cri-sandboxers"]["wasm"] == {
        "name": "wasm",
        "address": "/run/wasm-sandboxer.sock",
    }


def test_warns_about_settings_that_break_wasm_sandboxes(kwasm: KwasmRunner, fakes: Fakes, tmp_path: Path) -> None:
    path = _daemon_json(fakes)
    path.write_text('{"systemd-cgroup": true, "cri-sandboxers": {"vmm": {"name": "wasm", "address": "/x"}}}')
    missing = tmp_path / "nowhere.sock"
    result = kwasm("setup-isulad", "--sandboxer-address", str(missing))
    assert result.returncode == 0, result.stderr
    assert "systemd-cgroup is true" in result.stderr
    assert f"sandboxer socket {missing} does not exist yet" in result.stderr
    assert "cri-sandboxers['vmm'] also uses the name 'wasm'" in result.stderr


def test_bad_runtime_name_is_a_usage_error(kwasm: KwasmRunner, fakes: Fakes) -> None:
    result = kwasm("setup-isulad", "--runtime", "wasmtime")
    assert result.returncode == 2
    assert "io.containerd.<name>.<version>" in result.stderr
    assert not _daemon_json(fakes).exists()


def test_restart_uses_systemctl_and_waits_for_isulads_socket(
    kwasm: KwasmRunner, fakes: Fakes, tmp_path: Path
) -> None:
    sock_path = tmp_path / "isulad.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(sock_path))
        listener.listen(8)
        result = kwasm("setup-isulad", "--restart", env={"KWASM_ISULAD_SOCKET": str(sock_path)})
    assert result.returncode == 0, result.stderr
    assert fakes.argvs("systemctl") == [["systemctl", "is-system-running"], ["systemctl", "restart", "isulad"]]
    assert f"restarted iSulad; unix://{sock_path} answered" in result.stderr


def test_restart_without_systemd_says_how_after_writing(kwasm: KwasmRunner, fakes: Fakes) -> None:
    fakes.set("systemd_state", "offline")
    result = kwasm("setup-isulad", "--restart")
    assert result.returncode == 10
    assert "restart iSulad by hand" in result.stderr
    assert json.loads(_daemon_json(fakes).read_text())["enable-cri-v1"] is True
    assert fakes.argvs("systemctl") == [["systemctl", "is-system-running"]]


def test_symlinked_daemon_json_is_written_through(kwasm: KwasmRunner, fakes: Fakes, tmp_path: Path) -> None:
    path = _daemon_json(fakes)
    target = tmp_path / "managed" / "daemon.json"
    target.parent.mkdir()
    target.write_text(SHIPPED_TEXT)
    path.symlink_to(target)
    assert kwasm("setup-isulad").returncode == 0
    assert path.is_symlink()
    assert json.loads(target.read_text())["enable-cri-v1"] is True
    assert [b.read_text() for b in _backups(target)] == [SHIPPED_TEXT]
