"""`kwasm sandboxer` as a daemon (sockets, notify, SIGTERM) and `kwasm ps / logs / stop` against it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from kwasm.sandboxer.client import SandboxerClient, TaskClient
from kwasm.sandboxer.density import start_pod
from kwasm.sandboxer.launch import make_bundle, running_sandboxer, start_sandboxer, stop_sandboxer

DEMO_WASM = Path(__file__).resolve().parents[1] / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"


def _kwasm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kwasm.cli.main", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "200"})


def test_daemon_sockets_notify_refusal_and_clean_sigterm(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(10)
    sandboxer = start_sandboxer(tmp_path / "sbx", env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"})
    try:
        assert notify.recv(100) == b"READY=1"
        assert notify.recv(100) == b"WATCHDOG=1"
        for path in (sandboxer.listen, sandboxer.directory / "task.sock"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        refused = _kwasm("sandboxer", "--listen", str(sandboxer.listen), "--dir", str(tmp_path / "other"))
        assert refused.returncode == 8
        assert "another sandboxer is live" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    finally:
        notify.close()
        assert stop_sandboxer(sandboxer) == 0
    assert not sandboxer.listen.exists()
    assert not (sandboxer.directory / "task.sock").exists()
    bad = _kwasm("sandboxer", "--log-level", "loud")
    assert bad.returncode == 2 and "--log-level" in bad.stderr
    unusable = _kwasm("sandboxer", "--listen", str(tmp_path / "s.sock"), "--dir", "/proc/no-such-dir")
    assert unusable.returncode == 8
    assert unusable.stderr.strip().splitlines()[-1].startswith("error: cannot serve")
    assert "Traceback" not in unusable.stderr


def test_print_unit_is_a_notify_service() -> None:
    unit = _kwasm("sandboxer", "--print-unit", "--listen", "/run/k.sock", "--dir", "/run/kw")
    assert unit.returncode == 0
    assert "Type=notify" in unit.stdout
    assert "sandboxer --listen /run/k.sock --dir /run/kw" in unit.stdout


def test_ps_logs_stop_and_bundle_wiring(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    mounts = [
        {"destination": "/data", "type": "bind", "source": str(volume), "options": ["rbind", "rw"]},
        {"destination": "/ro", "type": "bind", "source": str(readonly), "options": ["rbind", "ro"]},
        {"destination": "/proc", "type": "proc", "source": "proc"},
    ]
    writer = make_bundle(tmp_path / "writer", DEMO_WASM, ["write", "/data/out.txt", "persisted"], mounts=mounts)
    ro_writer = make_bundle(tmp_path / "ro", DEMO_WASM, ["write", "/ro/out.txt", "nope"], mounts=mounts)
    echo = make_bundle(tmp_path / "echo", DEMO_WASM, ["echo", "line", "one"])
    sleeper = make_bundle(tmp_path / "sleeper", DEMO_WASM, ["sleep", "600"])
    log_path = tmp_path / "logs" / "echo.log"
    log_path.parent.mkdir()

    with running_sandboxer(tmp_path / "sbx") as sandboxer:
        async def populate() -> None:
            sandboxes = SandboxerClient(sandboxer.listen)
            tasks = await TaskClient.connect(f"ttrpc+unix://{sandboxer.directory / 'task.sock'}")
            assert (await tasks.wait(await start_pod(sandboxes, tasks, "writer", writer))).exit_status == 0
            assert (await tasks.wait(await start_pod(sandboxes, tasks, "ro", ro_writer))).exit_status == 1
            echoed = await start_pod(sandboxes, tasks, "echo", echo, str(log_path))
            assert (await tasks.wait(echoed)).exit_status == 0
            await start_pod(sandboxes, tasks, "sleeper", sleeper)
            await tasks.close()
            await sandboxes.close()

        asyncio.run(populate())
        assert (volume / "out.txt").read_text() == "persisted"
        assert not (readonly / "out.txt").exists()
        entry = log_path.read_text().splitlines()[0].split(" ", 3)
        assert entry[1:] == ["stdout", "F", "line one"]

        listen = str(sandboxer.listen)
        listing = _kwasm("ps", "--listen", listen, "--json")
        assert listing.returncode == 0, listing.stderr
        rows = {row["id"]: row for row in json.loads(listing.stdout)}
        assert set(rows) == {"writer", "ro", "echo", "sleeper"}
        assert rows["sleeper"]["tasks"][0]["status"] == "running"
        assert rows["sleeper"]["tasks"][0]["memory_bytes"] > 0
        assert rows["ro"]["tasks"][0]["exit_status"] == 1
        table = _kwasm("ps", "--listen", listen)
        assert "sleeper" in table.stdout and "running" in table.stdout

        logs = _kwasm("logs", "echo-c", "--listen", listen)
        assert (logs.returncode, logs.stdout) == (0, "line one\n")
        no_log = _kwasm("logs", "sleeper-c", "--listen", listen)
        assert no_log.returncode == 8 and "no log file" in no_log.stderr

        stopped = _kwasm("stop", "sleeper", "--listen", listen)
        assert stopped.returncode == 0, stopped.stderr
        after = {row["id"]: row for row in json.loads(_kwasm("ps", "--listen", listen, "--json").stdout)}
        assert after["sleeper"]["state"] == "stopped"
        assert after["sleeper"]["tasks"][0]["exit_status"] == 137
        missing = _kwasm("stop", "ghost", "--listen", listen)
        assert missing.returncode == 3 and "ghost" in missing.stderr
    unreachable = _kwasm("ps", "--listen", str(tmp_path / "none.sock"))
    assert unreachable.returncode == 8


def test_daemon_raises_its_own_descriptor_limit(tmp_path: Path) -> None:
    listen = tmp_path / "s.sock"
    process = subprocess.Popen(
        ["prlimit", "--nofile=1024:", sys.executable, "-m", "kwasm.cli.main", "sandboxer",
         "--listen", str(listen), "--dir", str(tmp_path / "state"), "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            if listen.is_socket():
                break
            time.sleep(0.05)
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        soft, hard = next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3:5]
        assert soft == hard and int(soft) > 1024
    finally:
        process.terminate()
        assert process.wait(15) == 0
