"""Test helpers for the iSulad path: recording stand-ins on PATH and a wasm image in a private store.

``isula``, ``crictl`` and ``systemctl`` cannot run on this machine, so the tests put the
recording stand-ins of this directory first on PATH and assert the exact argv and files they
were given (``calls.jsonl`` in the state directory).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kwasm.image.store import MEDIA_OCI_CONFIG, MEDIA_OCI_LAYER_TAR, MEDIA_OCI_MANIFEST, ImageStore

FAKEBIN = Path(__file__).resolve().parent
DEMO_WASM = FAKEBIN.parents[1] / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"


@dataclass
class Fakes:
    """The stand-ins' state directory and what they recorded."""

    state: Path

    def set(self, name: str, value: str) -> None:
        """Write a behaviour setting (see the stand-ins' docstrings)."""
        (self.state / name).write_text(value)

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        """Recorded calls, oldest first, optionally of one tool."""
        log = self.state / "calls.jsonl"
        entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [entry for entry in entries if tool is None or entry["tool"] == tool]

    def argvs(self, tool: str | None = None) -> list[list[str]]:
        """Just the argv of each recorded call."""
        return [entry["argv"] for entry in self.calls(tool)]


def install_fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fakes:
    """Put the recording stand-ins first on PATH, with private crictl/iSulad settings (nothing under /etc)."""
    state = tmp_path / "fakebin-state"
    state.mkdir()
    monkeypatch.setenv("FAKEBIN_STATE", str(state))
    monkeypatch.setenv("PATH", f"{FAKEBIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CRI_CONFIG_FILE", str(tmp_path / "crictl.yaml"))
    monkeypatch.delenv("CONTAINER_RUNTIME_ENDPOINT", raising=False)
    monkeypatch.setenv("KWASM_ISULAD_CONFIG", str(tmp_path / "isulad" / "daemon.json"))
    monkeypatch.setenv("KWASM_POD_LOG_ROOT", str(tmp_path / "pod-logs"))
    (tmp_path / "isulad").mkdir()
    return Fakes(state)


def path_without(tool: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make ``tool`` absent from PATH while keeping the other stand-ins (a private bin dir of links)."""
    bin_dir = tmp_path / f"bin-without-{tool}"
    bin_dir.mkdir()
    for entry in FAKEBIN.iterdir():
        if entry.name != tool:
            (bin_dir / entry.name).symlink_to(entry)
    system_dirs = [d for d in os.environ["PATH"].split(os.pathsep) if d != str(FAKEBIN)]
    assert all(not (Path(d) / tool).exists() for d in system_dirs), f"a real {tool} is installed"
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), *system_dirs]))


def store_demo_image(root: Path, name: str = "wasi-demo-app:latest", cmd: list[str] | None = None) -> ImageStore:
    """Put a one-layer wasm image (the demo app at /wasi-demo-app.wasm) into the store at ``root``."""
    store = ImageStore(root)
    buffer = io.BytesIO()
    module = DEMO_WASM.read_bytes()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("wasi-demo-app.wasm")
        info.size, info.mode = len(module), 0o755
        archive.addfile(info, io.BytesIO(module))
    layer = buffer.getvalue()
    layer_digest = store.put_blob(layer)
    config = json.dumps(
        {
            "created": "2026-01-01T00:00:00Z",
            "os": "wasip1",
            "architecture": "wasm",
            "config": {"Entrypoint": ["/wasi-demo-app.wasm"], "Cmd": cmd or ["echo", "hello"], "Env": ["A=1"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    config_digest = store.put_blob(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": MEDIA_OCI_LAYER_TAR, "digest": layer_digest, "size": len(layer)}],
        }
    ).encode()
    store.tag(name, store.put_blob(manifest))
    return store
