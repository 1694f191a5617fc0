"""containerd-shim-kwasm-v1 end to end: a real containerd 1.6, real `ctr`, a kwasm-built image tar."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import DEMO_DIR, REPO
from containerd_service import (
    IMAGE,
    MODULE,
    RUNTIME,
    RunningContainerd,
    running_containerd,
    sandboxer_pid,
    shim_processes,
    start_containerd,
    stop_containerd,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo app built by `kwasm build ... -o TAR` (OCI layout + docker-archive)."""
    directory = tmp_path_factory.mktemp("image")
    tar = directory / "wasi-demo-app.tar"
    env = {**os.environ, "KWASM_ROOT": str(directory / "root")}
    result = subprocess.run(
        [sys.executable, "-m", "kwasm.cli.main", "build", str(DEMO_DIR), "-o", str(tar)],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return tar


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningContainerd]:
    """One private containerd for this module; each test uses its own namespace (its own sandboxer)."""
    with running_containerd(Path(tmp_path_factory.mktemp("ctd", numbered=True))) as running:
        yield running


def _namespace(containerd: RunningContainerd, image_tar: Path, name: str) -> str:
    result = containerd.ctr(name, "images", "import", "--all-platforms", str(image_tar))
    assert result.returncode == 0, result.stderr
    return name


class EventLog:
    """`ctr events` in the background, collecting lines."""

    def __init__(self, containerd: RunningContainerd) -> None:
        self.process = subprocess.Popen(
            containerd.ctr_command("default", "events"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, text=True, env=containerd.env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        time.sleep(0.3)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def matching(self, namespace: str, topic: str, container: str) -> list[str]:
        """Event lines of ``topic`` about ``container`` in ``namespace``."""
        return [
            line for line in list(self.lines)
            if f" {namespace} {topic} " in line and f'"container_id":"{container}"' in line
        ]

    def stop(self) -> None:
        """Stop `ctr events` by its pid."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(10)
        self._reader.join(5)


def _assert_namespace_clean(containerd: RunningContainerd, namespace: str, timeout: float = 15) -> None:
    layout = containerd.layout(namespace)
    # The sandboxer exits after its idle grace, once every queued event is published.
    assert wait_for(lambda: sandboxer_pid(layout) is None and not layout.socket.exists(), timeout), (
        "the shared sandboxer did not exit after its last task"
    )
    assert containerd.ctr(namespace, "task", "ls", "-q").stdout.split() == []
    assert not list(containerd.bundles(namespace).glob("*")), "bundles left behind"
    assert containerd.mounts_below(containerd.state) == []
    assert layout.pending_reservations() == []
    assert not layout.pid_file.exists()


def test_echo_exit_code_and_stderr(containerd: RunningContainerd, image_tar: Path) -> None:
    namespace = _namespace(containerd, image_tar, "basic")
    hello = containerd.run(namespace, "hello", "echo", "hello")
    assert hello.returncode == 0, hello.stderr
    assert hello.stdout.strip() == "hello"
    three = containerd.run(namespace, "three", "exit", "3")
    assert three.returncode == 3, three.stderr
    bogus = containerd.run(namespace, "bogus", "frobnicate")
    assert bogus.returncode == 1
    assert "unknown command: frobnicate" in bogus.stderr
    # The native snapshotter hands the shim a bind mount instead of an overlay.
    bound = containerd.ctr(namespace, "run", "--rm", "--fifo-dir", str(containerd.fifo_dir), "--snapshotter", "native",
                           "--runtime", RUNTIME, IMAGE,
                           "bound", MODULE, "echo", "bind-mounted")
    assert (bound.returncode, bound.stdout.strip()) == (0, "bind-mounted"), bound.stderr
    native = containerd.ctr(namespace, "run", "--rm", "--fifo-dir", str(containerd.fifo_dir), "--runtime", RUNTIME,
                            IMAGE, "native", "/bin/sh")
    assert native.returncode == 1
    assert "only wasm processes run in this sandboxer: /bin/sh is not a wasm module" in native.stderr
    assert containerd.ctr(namespace, "containers", "ls", "-q").stdout.split() == []
    _assert_namespace_clean(containerd, namespace)


def test_daemon_streams_execs_is_killed_listed_stopped_and_deleted(
    containerd: RunningContainerd, image_tar: Path
) -> None:
    namespace = _namespace(containerd, image_tar, "daemon")
    events = EventLog(containerd)
    try:
        started = containerd.run_detached(namespace, "verse", "daemon")
        assert started.returncode == 0, started.stderr
        bundle = containerd.bundles(namespace) / "verse"
        assert containerd.mounts_below(bundle / "rootfs") == [str(bundle / "rootfs")]
        attach = subprocess.Popen(
            containerd.ctr_command(namespace, "task", "attach", "verse"), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, env=containerd.env,
        )
        try:
            assert attach.stdout is not None
            streamed = [attach.stdout.readline() for _ in range(5)]
        finally:
            attach.kill()  # by pid, before the task ends: `ctr task attach` deletes a task it saw exit
            attach.wait(10)
        assert "Row, row, row your module,\n" in streamed
        assert "a sandbox is but a dream.\n" in streamed
        listed = containerd.ctr(namespace, "task", "ls").stdout
        assert "verse" in listed and "RUNNING" in listed
        probe = containerd.exec(namespace, "verse", "probe", "echo", "from exec")
        assert (probe.returncode, probe.stdout) == (0, "from exec\n"), probe.stderr
        failing = containerd.exec(namespace, "verse", "failing", "exit", "4")
        assert failing.returncode == 4
        killed = containerd.ctr(namespace, "task", "kill", "verse")
        assert killed.returncode == 0, killed.stderr
        assert wait_for(lambda: "STOPPED" in containerd.ctr(namespace, "task", "ls").stdout, 10)
        deleted = containerd.ctr(namespace, "task", "delete", "verse")
        assert deleted.returncode == 0, deleted.stderr
        assert containerd.ctr(namespace, "task", "ls", "-q").stdout.split() == []
        assert containerd.mounts_below(bundle) == []
        assert containerd.ctr(namespace, "containers", "rm", "verse").returncode == 0
        assert wait_for(lambda: events.matching(namespace, "/tasks/delete", "verse"), 10)
    finally:
        events.stop()
    for topic in ("/tasks/create", "/tasks/start", "/tasks/delete"):
        assert len(events.matching(namespace, topic, "verse")) == 1, topic
    exits = {line.split('"id":"')[1].split('"')[0]: line for line in events.matching(namespace, "/tasks/exit", "verse")}
    assert sorted(exits) == ["failing", "probe", "verse"]  # the task's and each exec's exit
    assert '"exit_status":137' in exits["verse"] and '"exit_status":4' in exits["failing"]
    for topic in ("/tasks/exec-added", "/tasks/exec-started"):
        assert len(events.matching(namespace, topic, "verse")) == 2, topic
    _assert_namespace_clean(containerd, namespace)


def _serving_periods(log: str) -> list[tuple[str, str]]:
    """(pid, event) per sandboxer start ("serving") and idle exit ("exiting"), in log order."""
    periods = []
    for line in log.splitlines():
        match = re.search(r"kwasm-shim\[(\d+)\].*(serving the task API|last task gone: exiting)", line)
        if match:
            periods.append((match.group(1), "serving" if match.group(2).startswith("serving") else "exiting"))
    return periods


def test_hundred_concurrent_containers_share_one_sandboxer(containerd: RunningContainerd, image_tar: Path) -> None:
    namespace = _namespace(containerd, image_tar, "hundred")
    layout = containerd.layout(namespace)
    count = 100
    began = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda i: containerd.run(namespace, f"c{i}", "echo", f"hi {i}", timeout=100),
                                range(count)))
    elapsed = time.monotonic() - began
    failures = [(i, r.returncode, r.stderr[-300:]) for i, r in enumerate(results) if r.returncode != 0]
    assert failures == []
    assert [r.stdout.strip() for r in results] == [f"hi {i}" for i in range(count)]
    assert containerd.ctr(namespace, "containers", "ls", "-q").stdout.split() == []
    _assert_namespace_clean(containerd, namespace, timeout=60)
    periods = _serving_periods(layout.log.read_text())
    # One sandboxer at a time, each serving until its idle exit; a sandboxer only leaves after a second
    # without tasks, so a handful of them served all 100 containers.
    assert [event for _pid, event in periods] == ["serving", "exiting"] * (len(periods) // 2)
    assert all(periods[i][0] == periods[i + 1][0] for i in range(0, len(periods), 2))
    assert 1 <= len(periods) // 2 <= 5

    def left_behind() -> list[psutil.Process]:
        return [p for p in shim_processes(containerd) if str(layout.directory) in " ".join(p.info["cmdline"] or [])]

    # The sandboxer removes its pid file and socket before its interpreter has finished exiting.
    assert wait_for(lambda: left_behind() == [], 15), left_behind()
    assert sorted(path.name for path in layout.directory.iterdir()) == ["sandboxer.log", "start.lock"]
    print(f"100 concurrent `ctr run --rm` in {elapsed:.1f}s, {len(periods) // 2} sandboxer(s) in turn")


def test_kill_9_of_the_shared_sandboxer(containerd: RunningContainerd, image_tar: Path) -> None:
    namespace = _namespace(containerd, image_tar, "crash")
    layout = containerd.layout(namespace)
    events = EventLog(containerd)
    names = ["crash-a", "crash-b", "crash-c"]
    try:
        for name in names:
            started = containerd.run_detached(namespace, name, "sleep", "60")
            assert started.returncode == 0, started.stderr
        assert sorted(containerd.ctr(namespace, "task", "ls", "-q").stdout.split()) == names
        pid = sandboxer_pid(layout)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: containerd.ctr(namespace, "task", "ls", "-q").stdout.split() == [], 20)
        assert wait_for(lambda: all(events.matching(namespace, "/tasks/exit", n) for n in names), 10)
    finally:
        events.stop()
    for name in names:
        assert '"exit_status":137' in events.matching(namespace, "/tasks/exit", name)[0]
        assert containerd.mounts_below(containerd.bundles(namespace) / name) == []
    again = containerd.run(namespace, "after-crash", "echo", "still here")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "still here"
    assert sandboxer_pid(layout) != pid
    for name in names:
        assert containerd.ctr(namespace, "containers", "rm", name).returncode == 0
    _assert_namespace_clean(containerd, namespace)


def test_tasks_survive_a_containerd_restart(tmp_path: Path, image_tar: Path) -> None:
    directory = tmp_path / "ctd"
    with running_containerd(directory) as first:
        namespace = _namespace(first, image_tar, "restart")
        layout = first.layout(namespace)
        started = first.run_detached(namespace, "survivor", "daemon")
        assert started.returncode == 0, started.stderr
        pid = sandboxer_pid(layout)
        first.process.terminate()  # containerd only: the task and its sandboxer keep running
        first.process.wait(15)
        second = start_containerd(directory)
        try:
            listed = second.ctr(namespace, "task", "ls").stdout
            assert "survivor" in listed and "RUNNING" in listed, listed
            assert sandboxer_pid(layout) == pid
            assert second.ctr(namespace, "task", "kill", "survivor").returncode == 0
            assert wait_for(lambda: "STOPPED" in second.ctr(namespace, "task", "ls").stdout, 10)
            assert second.ctr(namespace, "task", "delete", "survivor").returncode == 0
            assert second.ctr(namespace, "containers", "rm", "survivor").returncode == 0
            _assert_namespace_clean(second, namespace)
        finally:
            stop_containerd(second)
