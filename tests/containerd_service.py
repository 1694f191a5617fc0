"""A private containerd 1.6 for the containerd tests: own root, state, socket and shim root; stopped by pid.

The shim binary ``containerd-shim-kwasm-v1`` (a console script of this package) is put first on
containerd's PATH, ``KWASM_SHIM_ROOT`` points its shared sandboxers at a private directory and
``KWASM_SHIM_IDLE_GRACE=1`` lets an idle one exit after a second.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from kwasm.sandboxer.launch import stop_process
from kwasm.sandboxer.rootfs import unmount_rootfs
from kwasm.shim.layout import IDLE_GRACE_ENV, ROOT_ENV, NamespaceLayout

RUNTIME = "io.containerd.kwasm.v1"
IMAGE = "docker.io/library/wasi-demo-app:latest"
MODULE = "/wasi-demo-app.wasm"
SHIM = "containerd-shim-kwasm-v1"

# Plugins the tests do not need (CRI unless asked for); the tasks service needs both runtime plugins.
_CRI = "io.containerd.grpc.v1.cri"
_DISABLED = [
    _CRI,
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
]


def scripts_dir() -> Path:
    """Where ``pip install -e .`` put the console scripts of this interpreter."""
    return Path(sysconfig.get_path("scripts"))


@dataclass
class RunningContainerd:
    """A containerd child process and its private directories."""

    process: subprocess.Popen[bytes]
    directory: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """containerd's gRPC socket."""
        return str(self.directory / "c.sock")

    @property
    def state(self) -> Path:
        """containerd's state directory (task bundles live under it)."""
        return self.directory / "state"

    @property
    def shim_root(self) -> Path:
        """KWASM_SHIM_ROOT of the shims this containerd starts."""
        return self.directory / "shim"

    def bundles(self, namespace: str) -> Path:
        """The directory holding one bundle per live task of ``namespace``."""
        return self.state / "io.containerd.runtime.v2.task" / namespace

    def layout(self, namespace: str) -> NamespaceLayout:
        """The shared sandboxer files of ``namespace``."""
        return NamespaceLayout.of(self.address, namespace, self.shim_root)

    def ctr_command(self, namespace: str, *args: str) -> list[str]:
        """The argv of ``ctr`` against this containerd."""
        return ["ctr", "--address", self.address, "--namespace", namespace, *args]

    @property
    def fifo_dir(self) -> Path:
        """Where ``ctr run``/``ctr task exec`` create stdio FIFOs (instead of /run/containerd/fifo)."""
        return self.directory / "fifo"

    def ctr(self, namespace: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` to completion (stdin from /dev/null)."""
        return subprocess.run(
            self.ctr_command(namespace, *args), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, env=self.env,
        )

    def run(
        self, namespace: str, container: str, *guest_args: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``ctr run --rm --runtime io.containerd.kwasm.v1 IMAGE ID /wasi-demo-app.wasm ARGS``."""
        return self.ctr(namespace, "run", "--rm", "--fifo-dir", str(self.fifo_dir), "--runtime", RUNTIME, IMAGE,
                        container, MODULE, *guest_args, timeout=timeout)

    def run_detached(self, namespace: str, container: str, *guest_args: str) -> subprocess.CompletedProcess[str]:
        """``ctr run -d --runtime io.containerd.kwasm.v1 IMAGE ID /wasi-demo-app.wasm ARGS``."""
        return self.ctr(namespace, "run", "-d", "--fifo-dir", str(self.fifo_dir), "--runtime", RUNTIME, IMAGE,
                        container, MODULE, *guest_args)

    def exec(self, namespace: str, container: str, exec_id: str, *guest_args: str) -> subprocess.CompletedProcess[str]:
        """``ctr task exec --exec-id EXEC_ID ID /wasi-demo-app.wasm ARGS``."""
        return self.ctr(namespace, "task", "exec", "--fifo-dir", str(self.fifo_dir), "--exec-id", exec_id, container,
                        MODULE, *guest_args)

    def mounts_below(self, path: Path) -> list[str]:
        """Mount points under ``path`` (from /proc/self/mountinfo)."""
        prefix = str(path)
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
        return points


def sandboxers(layout: NamespaceLayout) -> list[psutil.Process]:
    """Live shared sandboxer processes of the namespace (there must never be more than one)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "kwasm.shim.server" in cmdline and str(layout.directory) in cmdline:
            found.append(process)
    return found


def sandboxer_pid(layout: NamespaceLayout) -> int | None:
    """The pid of the namespace's live shared sandboxer (checked against its command line)."""
    try:
        pid = int(layout.pid_file.read_text())
        process = psutil.Process(pid)
        if "kwasm.shim.server" in process.cmdline() and str(layout.directory) in process.cmdline():
            return pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def shim_processes(containerd: RunningContainerd) -> list[psutil.Process]:
    """Live shim binaries and sandboxers started for this containerd."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if (SHIM in cmdline and containerd.address in cmdline) or str(containerd.shim_root) in cmdline:
            found.append(process)
    return found


def wait_for(condition: object, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition()`` until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(condition())  # type: ignore[operator]


def _write_config(directory: Path, cri: bool) -> Path:
    disabled = ", ".join(f'"{name}"' for name in _DISABLED if cri is False or name != _CRI)
    config = directory / "config.toml"
    text = (
        f'version = 2\nroot = "{directory / "root"}"\nstate = "{directory / "state"}"\n'
        f"disabled_plugins = [{disabled}]\n"
        f'[grpc]\n  address = "{directory / "c.sock"}"\n'
        f'[ttrpc]\n  address = "{directory / "c.sock"}.ttrpc"\n'
        '[debug]\n  level = "info"\n'
    )
    if cri:
        # Host-network pods only (no CNI here); the pause image is the demo app (the shim runs no
        # process for a pause container, and nothing can be pulled from this machine).
        text += (
            f'[plugins."{_CRI}"]\n  sandbox_image = "{IMAGE}"\n  disable_cgroup = true\n'
            '  disable_apparmor = true\n  restrict_oom_score_adj = true\n'
            '  stream_server_address = "127.0.0.1"\n  stream_server_port = "0"\n'
            f'  [plugins."{_CRI}".cni]\n    bin_dir = "{directory / "cni"}"\n    conf_dir = "{directory / "cni"}"\n'
            f'  [plugins."{_CRI}".containerd]\n    default_runtime_name = "kwasm"\n'
            f'    [plugins."{_CRI}".containerd.runtimes.kwasm]\n      runtime_type = "{RUNTIME}"\n'
        )
    config.write_text(text)
    return config


def start_containerd(directory: Path, idle_grace: str | None = "1", cri: bool = False) -> RunningContainerd:
    """Start containerd with private dirs under ``directory`` and wait until ``ctr version`` answers.

    ``idle_grace`` becomes the shims' KWASM_SHIM_IDLE_GRACE (None: the shim's default); ``cri``
    enables the CRI plugin with the runtime handler ``kwasm`` (type io.containerd.kwasm.v1).
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = _write_config(directory, cri)
    env = {
        **os.environ,
        "PATH": f"{scripts_dir()}:{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        ROOT_ENV: str(directory / "shim"),
    }
    if idle_grace is not None:
        env[IDLE_GRACE_ENV] = idle_grace
    with (directory / "containerd.log").open("ab") as log:
        process = subprocess.Popen(
            ["containerd", "--config", str(config), "--root", str(directory / "root"), "--state",
             str(directory / "state"), "--address", str(directory / "c.sock")],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
        )
    containerd = RunningContainerd(process, directory, env)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"containerd exited: {(directory / 'containerd.log').read_text()[-2000:]}")
        return containerd.ctr("default", "version", timeout=10).returncode == 0

    if not wait_for(ready, 30, 0.1):
        stop_containerd(containerd)
        raise AssertionError("containerd did not answer within 30s")
    return containerd


def stop_containerd(containerd: RunningContainerd) -> None:
    """Stop containerd by pid, then any shared sandboxer it left, then unmount what is left under its dirs."""
    stop_process(containerd.process, 15)
    if containerd.shim_root.is_dir():
        for directory in containerd.shim_root.iterdir():
            pid = sandboxer_pid(NamespaceLayout(directory))
            if pid is not None:
                with contextlib.suppress(psutil.Error):
                    sandboxer = psutil.Process(pid)
                    sandboxer.terminate()
                    sandboxer.wait(10)
    for point in reversed(containerd.mounts_below(containerd.directory)):
        unmount_rootfs(Path(point))


@contextlib.contextmanager
def running_containerd(
    directory: Path, idle_grace: str | None = "1", cri: bool = False
) -> Iterator[RunningContainerd]:
    """A private containerd for the ``with`` block."""
    containerd = start_containerd(directory, idle_grace, cri)
    try:
        yield containerd
    finally:
        stop_containerd(containerd)
