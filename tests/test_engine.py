"""The wasm engine through its Python API: exits, stdio, WASI waits, limits, kill and the module cache."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wasmtime
from conftest import DEMO_WASM
from guests.toolchain import assemble_wat, compile_c

from kwasm.errors import EngineError, NotFoundError, WasmValidationError
from kwasm.runtime.cells import GuestCell
from kwasm.runtime.engine import Engine
from kwasm.runtime.ffi import HostCall
from kwasm.runtime.guest import EXIT_KILLED, EXIT_TRAP, ExitReason, GuestSpec, Preopen, Stdio
from kwasm.runtime.scheduler import Scheduler
from kwasm.runtime.wasi import Shadows


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guests/probe.c compiled with clang-14 for wasm32-wasi."""
    return compile_c("probe", tmp_path_factory.mktemp("guests"))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A one-thread engine with a private module cache."""
    with Engine(threads=1, cache_dir=tmp_path / "cache") as runtime:
        yield runtime


class Collector:
    """A CALLBACK stdout sink."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.chunks.append(data)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode()


def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes (machines under load are slow)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run(engine: Engine, module: Path, *args: str, **spec: object) -> tuple[int, str, Collector]:
    out = Collector()
    guest = engine.start(GuestSpec(module=module, argv=[module.name, *args], stdout=Stdio.to_callback(out), **spec))  # type: ignore[arg-type]
    exit = guest.wait(20)
    assert exit is not None, "guest did not finish"
    return exit.code, exit.message, out


def test_demo_app_exit_codes_and_output(engine: Engine) -> None:
    code, _, out = run(engine, DEMO_WASM, "echo", "hello", "world")
    assert (code, out.text) == (0, "hello world\n")
    assert run(engine, DEMO_WASM, "exit", "3")[0] == 3
    assert run(engine, DEMO_WASM, "no-such-command")[0] == 1


def test_argv_and_env_reach_the_guest(engine: Engine, probe: Path) -> None:
    code, _, out = run(engine, probe, "env", "MODE", env={"MODE": "fast lane"})
    assert (code, out.text) == (0, "fast lane\n")
    assert run(engine, probe, "env", "ABSENT")[0] == 1


def test_trap_reports_134_with_the_trap_message(engine: Engine, probe: Path) -> None:
    guest = engine.start(GuestSpec(module=probe, argv=["probe", "trap"]))
    exit = guest.wait(10)
    assert exit is not None
    assert (exit.code, exit.reason) == (EXIT_TRAP, ExitReason.TRAPPED)
    assert "unreachable" in exit.message


def test_kill_stops_a_sleeping_guest_at_once(engine: Engine) -> None:
    guest = engine.start(GuestSpec(module=DEMO_WASM, argv=["app", "sleep", "3600"]))
    time.sleep(0.1)
    assert guest.exit is None
    started = time.monotonic()
    guest.kill()
    exit = guest.wait(5)
    assert exit is not None and (exit.code, exit.reason) == (EXIT_KILLED, ExitReason.KILLED)
    assert time.monotonic() - started < 1.0
    guest.kill()  # idempotent
    assert guest.exit == exit


def test_kill_stops_a_spinning_guest_without_starving_others(engine: Engine, probe: Path) -> None:
    ticks = Collector()
    spinner = engine.start(GuestSpec(module=probe, argv=["probe", "spin"]))
    daemon = engine.start(GuestSpec(module=DEMO_WASM, argv=["app", "daemon"], stdout=Stdio.to_callback(ticks)))
    # the daemon still ticks on the same thread while the spinner runs
    assert eventually(lambda: ticks.text.count("Row, row") >= 2)
    assert spinner.exit is None
    started = time.monotonic()
    spinner.kill()
    exit = spinner.wait(5)
    assert exit is not None and exit.code == EXIT_KILLED
    assert time.monotonic() - started < 1.0
    daemon.kill()
    assert daemon.wait(5) is not None


def test_timeout_kills_an_infinite_loop_within_a_second(engine: Engine, probe: Path) -> None:
    started = time.monotonic()
    guest = engine.start(GuestSpec(module=probe, argv=["probe", "spin"], timeout=0.5))
    exit = guest.wait(5)
    assert exit is not None and (exit.code, exit.reason) == (EXIT_KILLED, ExitReason.TIMEOUT)
    assert time.monotonic() - started < 1.5


def test_timeout_in_whole_seconds_is_honoured(engine: Engine) -> None:
    started = time.monotonic()
    guest = engine.start(GuestSpec(module=DEMO_WASM, argv=["demo", "sleep", "30"], timeout=1))
    exit = guest.wait(5)
    assert exit is not None and (exit.code, exit.reason) == (EXIT_KILLED, ExitReason.TIMEOUT)
    assert time.monotonic() - started < 2.5


def test_memory_limit_holds(engine: Engine, probe: Path) -> None:
    code, _, out = run(engine, probe, "alloc", "16", memory_limit=4 << 20)
    assert (code, out.text) == (12, "out of memory\n")
    code, _, out = run(engine, probe, "alloc", "16", memory_limit=64 << 20)
    assert (code, out.text) == (0, "ok 4096\n")
    with pytest.raises(EngineError, match="exceeds memory limits"):
        engine.start(GuestSpec(module=DEMO_WASM, argv=["app"], memory_limit=64 << 10))


def test_memory_bytes_reports_linear_memory(engine: Engine) -> None:
    guest = engine.start(GuestSpec(module=DEMO_WASM, argv=["app", "sleep", "10"]))
    time.sleep(0.1)
    assert guest.memory_bytes() >= 17 * 65536
    guest.kill()
    guest.wait(5)
    assert guest.memory_bytes() == 0


def test_poll_oneoff_several_clocks_wakes_on_the_earliest(engine: Engine, probe: Path) -> None:
    code, _, out = run(engine, probe, "poll2")
    assert code == 0
    words = out.text.split()
    assert words[:4] == ["events", "1", "first", "9"]
    assert 45 <= int(words[5]) < 1000


def test_poll_oneoff_absolute_realtime_deadline(engine: Engine, probe: Path) -> None:
    code, _, out = run(engine, probe, "pollabs", "150")
    assert code == 0
    assert 140 <= int(out.text.split()[1]) < 1000


def test_plain_sleeps_stay_native_and_other_polls_reach_python(
    probe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python_polls: list[int] = []
    python_poll_oneoff = Shadows.poll_oneoff

    def counting(self: Shadows, call: HostCall) -> object:
        python_polls.append(1)
        return python_poll_oneoff(self, call)

    monkeypatch.setattr(Shadows, "poll_oneoff", counting)  # before the engine's linkers are made
    with Engine(threads=1, cache_dir=tmp_path / "cache") as runtime:
        out = Collector()
        daemon = runtime.start(GuestSpec(module=DEMO_WASM, argv=["demo", "daemon"], stdout=Stdio.to_callback(out)))
        assert eventually(lambda: out.text.count("Row, row") >= 2), "the daemon woke from its sleep and printed again"
        daemon.kill()
        assert run(runtime, DEMO_WASM, "sleep", "0.05")[0] == 0
        assert python_polls == [], "a lone clock subscription is answered by the native poll_oneoff"
        code, _, out = run(runtime, probe, "poll2")
        assert code == 0 and out.text.split()[:4] == ["events", "1", "first", "9"]
        assert python_polls, "two subscriptions are handed to the Python poll_oneoff"


def test_sched_yield_returns(engine: Engine, probe: Path) -> None:
    assert run(engine, probe, "yield", "50")[2].text == "yielded\n"


def test_fifo_stdin_is_read_without_blocking_the_scheduler(engine: Engine, probe: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "stdin.fifo"
    os.mkfifo(fifo)
    (tmp_path / "data").mkdir()
    ticks = Collector()
    daemon = engine.start(GuestSpec(module=DEMO_WASM, argv=["app", "daemon"], stdout=Stdio.to_callback(ticks)))
    out = Collector()
    reader = engine.start(
        GuestSpec(
            module=probe,
            argv=["probe", "copy", "/data/copy.txt"],
            preopens=[Preopen(tmp_path / "data", "/data")],
            stdin=Stdio.fifo(fifo),
            stdout=Stdio.to_callback(out),
        )
    )
    # the reader waits on an empty FIFO; the daemon on the same thread keeps printing
    assert eventually(lambda: ticks.text.count("Row, row") >= 2)
    assert reader.exit is None
    with open(fifo, "wb") as writer:
        writer.write(b"through the fifo\n")
    exit = reader.wait(5)
    assert exit is not None and exit.code == 0, out.text
    assert out.text == "copied 17\n"
    assert (tmp_path / "data" / "copy.txt").read_text() == "through the fifo\n"
    daemon.kill()
    daemon.wait(5)


def test_file_reads_still_work_when_stdin_is_async(engine: Engine, probe: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "stdin.fifo"
    os.mkfifo(fifo)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "book.txt").write_text("chapter one\n" * 1000)
    code, _, out = run(engine, probe, "cat", "/data/book.txt", stdin=Stdio.fifo(fifo),
                       preopens=[Preopen(tmp_path / "data", "/data", read_only=True)])
    assert (code, out.text) == (0, "chapter one\n" * 1000)


def test_more_than_10000_file_reads_work_when_stdin_is_async(engine: Engine, probe: Path, tmp_path: Path) -> None:
    # A store holds at most 10,000 instances: file reads must not cost one each (the guest reads 2 KiB a call).
    fifo = tmp_path / "stdin.fifo"
    os.mkfifo(fifo)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"x" * (24 << 20))
    code, _, out = run(engine, probe, "cat", "/data/big.bin", stdin=Stdio.fifo(fifo),
                       preopens=[Preopen(tmp_path / "data", "/data", read_only=True)])
    assert (code, sum(len(chunk) for chunk in out.chunks)) == (0, 24 << 20)


def test_poll_oneoff_fd_readiness_on_a_fifo(engine: Engine, probe: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    assert run(engine, probe, "pollstdin", "200", stdin=Stdio.fifo(fifo))[2].text == "timeout\n"
    out = Collector()
    guest = engine.start(GuestSpec(module=probe, argv=["p", "pollstdin", "5000"], stdin=Stdio.fifo(fifo),
                                   stdout=Stdio.to_callback(out)))
    time.sleep(0.2)
    with open(fifo, "wb") as writer:
        writer.write(b"x")
    exit = guest.wait(3)
    assert exit is not None and out.text == "stdin\n"


def test_fd_read_on_fifo_stdin_refuses_more_iovecs_than_iov_max(engine: Engine, tmp_path: Path) -> None:
    # fd_read(0, iovs=0, iovs_len=2000, nread=60000); the errno becomes the exit code.
    module = tmp_path / "iovs.wasm"
    module.write_bytes(wasmtime.wat2wasm(
        '(module (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))'
        ' (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32))) (memory (export "memory") 1)'
        ' (func (export "_start") (call $exit (call $read (i32.const 0) (i32.const 0) (i32.const 2000)'
        " (i32.const 60000)))))"
    ))
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    assert run(engine, module, stdin=Stdio.fifo(fifo))[0] == 28  # EINVAL, as readv(2) answers


def test_file_and_fifo_stdout(engine: Engine, tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    log.write_text("earlier\n")
    guest = engine.start(GuestSpec(module=DEMO_WASM, argv=["app", "echo", "appended"], stdout=Stdio.file(log)))
    assert guest.wait(5) is not None
    assert log.read_text() == "earlier\nappended\n"

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the reader is there first, as containerd's is
    try:
        guest = engine.start(GuestSpec(module=DEMO_WASM, argv=["app", "echo", "via", "fifo"], stdout=Stdio.fifo(fifo)))
        exit = guest.wait(5)
        assert exit is not None and exit.code == 0
        assert os.read(reader, 1000) == b"via fifo\n"
        assert os.read(reader, 1000) == b""  # the guest's write end is closed with its store
    finally:
        os.close(reader)


def test_preopen_confines_the_guest(engine: Engine, probe: Path, tmp_path: Path) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "out-link").symlink_to(tmp_path)
    assert run(engine, probe, "open", "/data/ok.txt", preopens=[Preopen(inside, "/data")])[2].text == "ok\n"
    for escape in ("/data/../escaped.txt", str(tmp_path / "escaped.txt"), "/data/out-link/escaped.txt"):
        code, _, out = run(engine, probe, "open", escape, preopens=[Preopen(inside, "/data")])
        assert code == 1 and out.text.startswith("denied"), (escape, out.text)
    assert not (tmp_path / "escaped.txt").exists()
    code, _, out = run(engine, probe, "open", "/data/new.txt", preopens=[Preopen(inside, "/data", read_only=True)])
    assert code == 1 and out.text.startswith("denied")
    with pytest.raises(NotFoundError, match="does not exist"):
        engine.start(GuestSpec(module=probe, argv=["p"], preopens=[Preopen(tmp_path / "nope", "/x")]))


def test_bad_modules_are_refused_with_one_line(engine: Engine, tmp_path: Path) -> None:
    not_wasm = tmp_path / "text.wasm"
    not_wasm.write_text("hello")
    with pytest.raises(WasmValidationError, match="not a WebAssembly module"):
        engine.load(not_wasm)
    truncated = tmp_path / "truncated.wasm"
    truncated.write_bytes(DEMO_WASM.read_bytes()[:5000])
    with pytest.raises(WasmValidationError, match="not a valid WebAssembly module"):
        engine.load(truncated)
    with pytest.raises(WasmValidationError, match="no _start"):
        engine.load(assemble_wat("reactor", tmp_path))
    with pytest.raises(WasmValidationError, match="missing_host_function"):
        engine.load(assemble_wat("needs_env", tmp_path))


def test_compiled_modules_are_cached_and_corrupt_entries_recompiled(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with Engine(threads=1, cache_dir=cache) as first:
        first.load(DEMO_WASM)
        assert first.cache.last_source == "compiled"
    entries = list(cache.glob("*.cwasm"))
    assert len(entries) == 1
    with Engine(threads=1, cache_dir=cache) as second:
        second.load(DEMO_WASM)
        assert second.cache.last_source == "cached"
    raw = bytearray(entries[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    entries[0].write_bytes(bytes(raw))
    with Engine(threads=1, cache_dir=cache) as third:
        third.load(DEMO_WASM)
        assert third.cache.last_source == "recompiled"
        assert run(third, DEMO_WASM, "echo", "still", "works")[2].text == "still works\n"


def test_on_exit_callback_and_close_kills_everything(tmp_path: Path) -> None:
    exits: list[int] = []
    runtime = Engine(threads=2, cache_dir=tmp_path / "cache")
    spec = GuestSpec(module=DEMO_WASM, argv=["app", "sleep", "3600"])
    guests = [runtime.start(spec, on_exit=lambda e: exits.append(e.code)) for _ in range(10)]
    runtime.close()
    assert all(g.exit is not None and g.exit.code == EXIT_KILLED for g in guests)
    assert exits == [EXIT_KILLED] * 10
    with pytest.raises(EngineError, match="closed"):
        runtime.start(GuestSpec(module=DEMO_WASM, argv=["app"]))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_5000_sleeping_guests_on_one_scheduler_are_killed_and_reaped(tmp_path: Path) -> None:
    threads_before = threading.active_count()
    fds_before = _open_fds()
    with Engine(threads=1, cache_dir=tmp_path / "cache") as runtime:
        guests = [runtime.start(GuestSpec(module=DEMO_WASM, argv=["app", "sleep", "3600"]))]
        fds_engine = _open_fds()  # with the module loaded and its memory image mapped
        guests += [runtime.start(GuestSpec(module=DEMO_WASM, argv=["app", "sleep", "3600"])) for _ in range(4999)]
        time.sleep(0.5)
        assert runtime.guest_count == 5000
        assert all(g.exit is None for g in guests)
        assert _open_fds() == fds_engine  # DISCARD stdio costs no file descriptor
        for guest in guests:
            guest.kill()
        deadline = time.monotonic() + 20
        while runtime.guest_count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runtime.guest_count == 0
        assert all(g.exit is not None and g.exit.code == EXIT_KILLED for g in guests)
    assert threading.active_count() == threads_before
    assert _open_fds() == fds_before


_task_ids = itertools.count(1)


class ScriptedTask:
    """A scheduler task whose one slice either finishes or raises (a host-side bug)."""

    def __init__(self, fails: bool) -> None:
        self.id = next(_task_ids)
        self.cell = GuestCell(self.id)
        self.fails = fails
        self.finished = threading.Event()
        self.aborted: list[ExitReason] = []

    def run_slice(self) -> bool:
        if self.fails:
            raise RuntimeError("host bug")
        self.finished.set()
        return True

    def conclude(self) -> None:
        self.finished.set()

    def abort(self, reason: ExitReason) -> None:
        self.aborted.append(reason)


def test_a_failing_guest_does_not_take_its_scheduler_thread_down() -> None:
    scheduler = Scheduler("kwasm-test-sched")
    broken, before, after = ScriptedTask(fails=True), ScriptedTask(fails=False), ScriptedTask(fails=False)
    try:
        scheduler.start_later(broken, None)
        scheduler.start_later(before, None)
        assert before.finished.wait(5)
        scheduler.start_later(after, None)  # the thread still takes new guests
        assert after.finished.wait(5)
        assert broken.aborted == [ExitReason.TRAPPED]
        assert scheduler.load == 0
    finally:
        scheduler.stop()
    assert broken.aborted == [ExitReason.TRAPPED] and not before.aborted


GROWS_WAT = """(module
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $errno i32)
    (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 8)))
    (drop (memory.grow (i32.const 200)))  ;; 12.5 MiB: past the 4 MiB reservation, so the memory moves
    (local.set $errno (call $clock (i32.const 1) (i64.const 0) (i32.const 13172728)))  ;; its last 8 bytes
    (if (i32.eqz (local.get $errno))
      (then (if (i64.eqz (i64.load (i32.const 13172728))) (then (call $exit (i32.const 99))))))
    (call $exit (local.get $errno))))"""


def test_host_calls_follow_a_memory_that_grew_and_moved(tmp_path: Path) -> None:
    module = tmp_path / "grows.wasm"
    module.write_bytes(wasmtime.wat2wasm(GROWS_WAT))
    with Engine(threads=1, cache_dir=tmp_path / "cache") as engine:
        guest = engine.start(GuestSpec(module=module, argv=["grows"]))
        done = guest.wait(10)
    assert done is not None and (done.code, done.reason) == (0, ExitReason.EXITED)


def test_a_module_file_replaced_in_place_is_loaded_again(tmp_path: Path) -> None:
    module = tmp_path / "app.wasm"
    exits_with = """(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1) (func (export "_start") (call $exit (i32.const {code}))))"""
    module.write_bytes(wasmtime.wat2wasm(exits_with.format(code=3)))
    with Engine(threads=1, cache_dir=tmp_path / "cache") as engine:
        first = engine.start(GuestSpec(module=module, argv=["app"])).wait(10)
        module.write_bytes(wasmtime.wat2wasm(exits_with.format(code=4)))  # replaced in place
        os.utime(module, ns=(time.time_ns(), time.time_ns() + 10**9))  # a newer mtime, as a rewrite has
        second = engine.start(GuestSpec(module=module, argv=["app"])).wait(10)
    assert first is not None and first.code == 3
    assert second is not None and second.code == 4
