"""``kwasm run`` as a user runs it: real processes, exit codes, stdio, volumes, limits, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO_DIR, DEMO_WASM, KwasmRunner
from guests.toolchain import assemble_wat, compile_c

from kwasm.cli.run import parse_duration, parse_size, parse_volume
from kwasm.errors import UsageError


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guests/probe.c compiled with clang-14 for wasm32-wasi, in the test."""
    return compile_c("probe", tmp_path_factory.mktemp("guests"))


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_demo_app_subcommands_with_exit_codes(kwasm: KwasmRunner, tmp_path: Path) -> None:
    wasm = str(DEMO_WASM)
    echo = kwasm("run", wasm, "--", "echo", "hello", "world")
    assert (echo.returncode, echo.stdout) == (0, "hello world\n")
    started = time.monotonic()
    assert kwasm("run", wasm, "--", "sleep", "0.3").returncode == 0
    assert time.monotonic() - started >= 0.3
    assert kwasm("run", wasm, "--", "sleep", ".2").returncode == 0  # a bare fraction is fine
    bad_sleep = kwasm("run", wasm, "--", "sleep", "1.2.3")
    assert (bad_sleep.returncode, bad_sleep.stderr) == (1, "not a number of seconds: 1.2.3\n")
    assert kwasm("run", wasm, "--", "exit", "3").returncode == 3
    unknown = kwasm("run", wasm, "--", "frobnicate")
    assert (unknown.returncode, unknown.stderr) == (1, "unknown command: frobnicate\n")
    (tmp_path / "vol").mkdir()
    written = kwasm("run", wasm, "-v", f"{tmp_path / 'vol'}:/data", "--", "write", "/data/note.txt", "hi", "there")
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "vol" / "note.txt").read_text() == "hi there"
    daemon = kwasm("run", wasm, "--timeout", "1.5s", "--", "daemon")
    assert daemon.returncode == 137
    assert 1 <= daemon.stdout.count("Row, row, row your module") <= 2  # one verse a second until killed
    assert "killed after --timeout 1.5s" in one_error_line(daemon)


def test_env_reaches_the_guest(kwasm: KwasmRunner, probe: Path) -> None:
    result = kwasm("run", str(probe), "-e", "GREETING=hi there", "--", "env", "GREETING")
    assert (result.returncode, result.stdout) == (0, "hi there\n")


def test_c_guest_reads_stdin_and_is_confined_to_its_volume(kwasm: KwasmRunner, probe: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "link-out").symlink_to(tmp_path)
    volume = f"{data}:/data"
    copied = kwasm("run", str(probe), "-v", volume, "--", "copy", "/data/in.txt", input="line one\nline two\n")
    assert (copied.returncode, copied.stdout) == (0, "copied 18\n"), copied.stderr
    assert (data / "in.txt").read_text() == "line one\nline two\n"
    cat = kwasm("run", str(probe), "-v", f"{volume}:ro", "--", "cat", "/data/in.txt")
    assert cat.stdout == "line one\nline two\n"
    for escape in ("/data/../escaped", "/data/link-out/escaped"):  # more escapes: tests/test_engine.py
        refused = kwasm("run", str(probe), "-v", volume, "--", "open", escape)
        assert refused.returncode == 1 and refused.stdout.startswith("denied"), (escape, refused.stdout)
    assert not (tmp_path / "escaped").exists()
    read_only = kwasm("run", str(probe), "-v", f"{volume}:ro", "--", "open", "/data/new")
    assert read_only.returncode == 1 and not (data / "new").exists()


def test_memory_limit_fails_cleanly(kwasm: KwasmRunner, probe: Path) -> None:
    over = kwasm("run", str(probe), "--memory", "8M", "--", "alloc", "32")
    assert (over.returncode, over.stdout) == (12, "out of memory\n")
    assert kwasm("run", str(probe), "--memory", "64M", "--", "alloc", "32").stdout == "ok 8192\n"
    too_small = kwasm("run", str(DEMO_WASM), "--memory", "64k", "--", "echo")
    assert too_small.returncode == 7 and "exceeds memory limits" in one_error_line(too_small)


def test_infinite_loop_is_stopped_by_timeout_within_a_second(kwasm: KwasmRunner, probe: Path) -> None:
    started = time.monotonic()
    assert kwasm("run", str(probe), "--", "env", "PATH").returncode == 1  # same start-up, guest ends at once
    baseline = time.monotonic() - started
    started = time.monotonic()
    spun = kwasm("run", str(probe), "--timeout", "1s", "--", "spin")
    elapsed = time.monotonic() - started
    assert spun.returncode == 137
    assert "--timeout 1s" in one_error_line(spun)
    assert elapsed - baseline < 1.0 + 1.0  # the timeout, then stopped within a second


def test_trap_exits_134_with_the_reason(kwasm: KwasmRunner, probe: Path) -> None:
    trapped = kwasm("run", str(probe), "--", "trap")
    assert trapped.returncode == 134
    assert "unreachable" in one_error_line(trapped)


def test_ctrl_c_kills_the_guest_and_exits_130(kwasm_root: Path) -> None:
    env = {**os.environ, "KWASM_ROOT": str(kwasm_root)}
    process = subprocess.Popen(
        [sys.executable, "-m", "kwasm.cli.main", "run", str(DEMO_WASM), "--", "daemon"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"Row, row, row your module,\n"
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_clear_errors(kwasm: KwasmRunner, tmp_path: Path) -> None:
    text = tmp_path / "notes.wasm"
    text.write_text("not wasm")
    assert "not a WebAssembly module" in one_error_line(kwasm("run", str(text)))
    reactor = assemble_wat("reactor", tmp_path)
    result = kwasm("run", str(reactor))
    assert result.returncode == 4 and "no _start" in one_error_line(result)
    result = kwasm("run", "nosuch-image:1.0")
    assert result.returncode == 3 and "nosuch-image:1.0" in one_error_line(result)
    result = kwasm("run", str(DEMO_WASM), "-v", f"{tmp_path / 'absent'}:/data", "--", "echo")
    assert result.returncode == 3 and "does not exist" in one_error_line(result)
    assert "--memory takes a size" in one_error_line(kwasm("run", str(DEMO_WASM), "--memory", "lots"))


def test_option_parsing() -> None:
    assert parse_size("64M") == 64 << 20 and parse_size("512k") == 512 << 10 and parse_size("1GiB") == 1 << 30
    assert parse_duration("10s") == 10 and parse_duration("500ms") == 0.5 and parse_duration("2m") == 120
    for bad_size in ("lots", "0", "-5M"):
        with pytest.raises(UsageError):
            parse_size(bad_size)
    with pytest.raises(UsageError):
        parse_duration("soon")
    with pytest.raises(UsageError):
        parse_volume("relative:data")


def test_run_a_built_image_with_its_entrypoint_and_cmd(kwasm: KwasmRunner) -> None:
    kwasm("build", str(DEMO_DIR), "-t", "demo:test", check=True)
    echoed = kwasm("run", "demo:test", "-e", "UNUSED=1", "--", "echo", "from", "the", "image")
    assert (echoed.returncode, echoed.stdout) == (0, "from the image\n"), echoed.stderr
    assert kwasm("run", "demo:test", "--", "exit", "5").returncode == 5
    default = kwasm("run", "demo:test", "--timeout", "1.2s")  # the image's default command is the daemon
    assert default.returncode == 137 and "Row, row" in default.stdout


def test_engine_isulad_hands_the_run_to_isulad_run(monkeypatch: pytest.MonkeyPatch, kwasm_root: Path) -> None:
    # iSulad cannot run here: replace only the iSulad driver and check what `kwasm run` hands it.
    from typer.testing import CliRunner

    import kwasm.cri.isulad_run
    from kwasm.cli.main import app

    calls: list[tuple[str, list[str], dict[str, str], bool]] = []

    def fake_run_on_isulad(image: str, args: list[str], env: dict[str, str], rm: bool) -> int:
        calls.append((image, args, env, rm))
        return 7

    monkeypatch.setattr(kwasm.cri.isulad_run, "run_on_isulad", fake_run_on_isulad)
    result = CliRunner().invoke(app, ["run", "--engine", "isulad", "-e", "A=1", "demo:1", "--", "echo", "hi"])
    assert result.exit_code == 7
    assert calls == [("demo:1", ["echo", "hi"], {"A": "1"}, True)]
    refused = CliRunner().invoke(app, ["run", "--engine", "isulad", "--memory", "8M", "demo:1"])
    assert isinstance(refused.exception, UsageError) and "not supported with --engine isulad" in str(refused.exception)
