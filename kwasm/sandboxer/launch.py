"""Start a private sandboxer process and build OCI bundles for it (benchmark and test harness).

``running_sandboxer`` runs ``kwasm sandboxer`` as a child process on sockets under a private
directory and stops it by its pid; ``make_bundle`` writes a minimal OCI bundle whose rootfs holds
a wasm module as ``/app.wasm``; ``pod_config`` is the PodSandboxConfig iSulad would serialise.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kwasm.api import cri_pb2
from kwasm.errors import SandboxerError

START_TIMEOUT = 30.0


@dataclass
class SandboxerProcess:
    """A sandboxer child process and where it listens."""

    process: subprocess.Popen[bytes]
    listen: Path
    directory: Path
    log: Path

    @property
    def pid(self) -> int:
        """The sandboxer's pid."""
        return self.process.pid

    def log_tail(self) -> str:
        """The end of the sandboxer's log (for failure messages)."""
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def start_sandboxer(
    directory: Path, listen: Path | None = None, extra: list[str] | None = None, env: dict[str, str] | None = None
) -> SandboxerProcess:
    """Start ``kwasm sandboxer`` with state in ``directory`` and wait until both sockets answer."""
    directory.mkdir(parents=True, exist_ok=True)
    listen = listen or directory / "sandboxer.sock"
    log = directory.parent / f"{directory.name}.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "kwasm.cli.main", "sandboxer", "--listen", str(listen),
             "--dir", str(directory / "state"), *(extra or [])],
            stdout=output, stderr=output, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
        )
    started = SandboxerProcess(process, listen, directory / "state", log)
    deadline = time.monotonic() + START_TIMEOUT
    while not (_answers(listen) and _answers(started.directory / "task.sock")):
        if process.poll() is not None:
            raise SandboxerError(f"sandboxer exited with {process.returncode}: {started.log_tail()}")
        if time.monotonic() > deadline:
            stop_sandboxer(started)
            raise SandboxerError(f"sandboxer did not listen within {START_TIMEOUT}s: {started.log_tail()}")
        time.sleep(0.02)
    return started


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM ``process`` by its pid (SIGKILL if it has not exited after ``timeout``); returns its exit status."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout)
    return process.returncode


def stop_sandboxer(sandboxer: SandboxerProcess, timeout: float = 15.0) -> int:
    """SIGTERM the sandboxer by pid (SIGKILL after ``timeout``); returns its exit status."""
    return stop_process(sandboxer.process, timeout)


@contextlib.contextmanager
def running_sandboxer(directory: Path, extra: list[str] | None = None) -> Iterator[SandboxerProcess]:
    """A sandboxer for the duration of the ``with`` block."""
    sandboxer = start_sandboxer(directory, extra=extra)
    try:
        yield sandboxer
    finally:
        stop_sandboxer(sandboxer)


def make_bundle(
    bundle: Path,
    module: Path,
    args: list[str],
    *,
    env: list[str] | None = None,
    memory_limit: int | None = None,
    mounts: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
) -> Path:
    """Write an OCI bundle: ``rootfs/app.wasm`` (a hard link or copy of ``module``) and config.json.

    ``args`` follow the module path, so the process runs ``/app.wasm ARGS...``.
    """
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True, exist_ok=True)
    target = rootfs / "app.wasm"
    if not target.exists():
        try:
            os.link(module, target)
        except OSError:
            target.write_bytes(module.read_bytes())
    config: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {"args": ["/app.wasm", *args], "env": env or ["PATH=/"], "cwd": "/"},
        "root": {"path": str(rootfs)},
        "mounts": mounts or [],
        "annotations": annotations or {},
        "linux": {"resources": {"memory": {"limit": memory_limit}} if memory_limit else {}},
    }
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def pod_config(name: str, namespace: str = "default", uid: str = "") -> bytes:
    """A serialized CRI PodSandboxConfig as iSulad sends it in Create's ``options.value``."""
    config = cri_pb2.PodSandboxConfig()
    config.metadata.name = name
    config.metadata.namespace = namespace
    config.metadata.uid = uid or f"uid-{name}"
    config.labels["io.kubernetes.pod.name"] = name
    config.labels["cri.isulad.type"] = "podsandbox"
    config.annotations["io.kubernetes.cri.container-type"] = "sandbox"
    config.annotations["io.kubernetes.cri.sandbox-name"] = name
    config.linux.security_context.namespace_options.network = cri_pb2.NODE
    return config.SerializeToString()
