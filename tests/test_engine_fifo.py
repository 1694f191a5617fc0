"""FIFO stdout/stderr: a full pipe suspends only its writer, Kill and close still work, no byte is lost."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from conftest import DEMO_WASM
from guests.toolchain import compile_c
from test_engine import Collector, eventually

from kwasm.runtime.engine import Engine, Guest
from kwasm.runtime.ffi import HostCall
from kwasm.runtime.guest import EXIT_KILLED, ExitReason, GuestSpec, Preopen, Stdio
from kwasm.runtime.wasi import Shadows

MIB = 1 << 20
#: Linux's default pipe capacity: a writer nobody drains stops after this many bytes.
PIPE_CAPACITY = 64 << 10


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guests/probe.c compiled with clang-14 for wasm32-wasi."""
    return compile_c("probe", tmp_path_factory.mktemp("guests"))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A one-thread engine (every guest shares one scheduler thread) with a private module cache."""
    with Engine(threads=1, cache_dir=tmp_path / "cache") as runtime:
        yield runtime


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A FIFO and its read end, opened first as containerd's is (closed at the end unless the test did)."""
    path = tmp_path / "out.fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    yield path, reader
    with contextlib.suppress(OSError):  # the test closed it to play a reader that leaves
        os.close(reader)


def pending(reader: int) -> int:
    """Bytes sitting in the pipe, unread."""
    return int(struct.unpack("i", fcntl.ioctl(reader, termios.FIONREAD, b"\0\0\0\0"))[0])


def flood(engine: Engine, probe: Path, stdout: Path, size: int, chunk: int, stderr: Collector) -> Guest:
    """Start a probe writing ``size`` pattern bytes to the FIFO ``stdout`` in ``chunk``-byte writes."""
    return engine.start(GuestSpec(module=probe, argv=["probe", "flood", str(size), str(chunk)],
                                  stdout=Stdio.fifo(stdout), stderr=Stdio.to_callback(stderr)))


def pattern(size: int) -> bytes:
    """What ``probe flood size`` writes before its final line."""
    return bytes(i % 251 for i in range(size))


def test_a_full_fifo_stalls_only_its_writer_and_kill_ends_it(
    engine: Engine, probe: Path, fifo: tuple[Path, int]
) -> None:
    path, reader = fifo
    ticks = Collector()
    arrivals: list[float] = []

    def verse(data: bytes) -> None:
        ticks(data)
        arrivals.append(time.monotonic())

    daemon = engine.start(GuestSpec(module=DEMO_WASM, argv=["app", "daemon"], stdout=Stdio.to_callback(verse)))
    writer = flood(engine, probe, path, MIB, 4096, Collector())
    assert eventually(lambda: pending(reader) >= PIPE_CAPACITY - 4096)
    full_at = time.monotonic()
    # the daemon on the same (only) scheduler thread keeps its one-verse-a-second pace
    assert eventually(lambda: len([t for t in arrivals if t > full_at]) >= 2, timeout=4)
    assert writer.exit is None and pending(reader) < PIPE_CAPACITY + 1
    started = time.monotonic()
    writer.kill()
    exit = writer.wait(5)
    assert exit is not None and (exit.code, exit.reason) == (EXIT_KILLED, ExitReason.KILLED)
    assert time.monotonic() - started < 1.0
    verses = ticks.text.count("Row, row")
    assert eventually(lambda: ticks.text.count("Row, row") > verses)  # the thread still serves the daemon
    daemon.kill()
    assert daemon.wait(5) is not None


def test_close_returns_promptly_with_a_blocked_writer(probe: Path, fifo: tuple[Path, int], tmp_path: Path) -> None:
    path, reader = fifo
    engine = Engine(threads=1, cache_dir=tmp_path / "cache")
    writer = flood(engine, probe, path, MIB, 4096, Collector())
    assert eventually(lambda: pending(reader) >= PIPE_CAPACITY - 4096)
    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 2.0
    exit = writer.wait(0)
    assert exit is not None and exit.code == EXIT_KILLED


def test_writes_the_pipe_takes_stay_native_and_a_full_pipe_waits_in_python(
    probe: Path, fifo: tuple[Path, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, reader = fifo
    python_writes: list[int] = []
    python_fd_write = Shadows.fd_write

    def counting(self: Shadows, call: HostCall) -> object:
        python_writes.append(call.arg(0))
        return python_fd_write(self, call)

    monkeypatch.setattr(Shadows, "fd_write", counting)  # before the engine's linkers are made
    with Engine(threads=1, cache_dir=tmp_path / "cache") as runtime:
        errors = Collector()
        fits = flood(runtime, probe, path, 16 << 10, 4096, errors)
        assert (exit := fits.wait(20)) is not None and exit.code == 0, errors.text
        assert pending(reader) == (16 << 10) + len(b"flooded 16384\n")
        assert python_writes == [], "writes that fit in the pipe go straight from guest memory to the FIFO"
        os.read(reader, MIB)
        overflows = flood(runtime, probe, path, 4 * PIPE_CAPACITY, 4096, errors)
        assert eventually(lambda: python_writes != []), "a full pipe is handed to Python, which suspends the guest"
        overflows.kill()
        assert overflows.wait(5) is not None


@pytest.mark.parametrize("chunk", [4096, MIB], ids=["4KiB-writes", "one-1MiB-write"])
def test_a_slow_reader_gets_every_byte_in_order(
    engine: Engine, probe: Path, fifo: tuple[Path, int], chunk: int
) -> None:
    path, reader = fifo
    received = bytearray()

    def drain_slowly() -> None:
        os.set_blocking(reader, True)
        while data := os.read(reader, 8192):  # EOF once the guest's write end is closed at its exit
            received.extend(data)
            time.sleep(0.002)

    errors = Collector()
    writer = flood(engine, probe, path, MIB, chunk, errors)
    drainer = threading.Thread(target=drain_slowly)
    drainer.start()
    exit = writer.wait(20)
    drainer.join(10)
    assert exit is not None and exit.code == 0, errors.text
    assert bytes(received) == pattern(MIB) + f"flooded {MIB}\n".encode()
    assert errors.text == ""


def test_reader_leaving_ends_the_writer_with_epipe_and_the_engine_keeps_serving(
    engine: Engine, probe: Path, fifo: tuple[Path, int], tmp_path: Path
) -> None:
    path, reader = fifo
    errors = Collector()
    writer = flood(engine, probe, path, MIB, 4096, errors)
    assert eventually(lambda: pending(reader) >= PIPE_CAPACITY - 4096)
    os.close(reader)  # the writer is suspended on the full pipe: the hang-up must wake it
    exit = writer.wait(5)
    assert exit is not None and exit.code == 3, errors.text
    assert errors.text.startswith("flood: Broken pipe after ")

    second = tmp_path / "second.fifo"
    os.mkfifo(second)
    reader = os.open(second, os.O_RDONLY | os.O_NONBLOCK)
    try:
        guest = engine.start(GuestSpec(module=DEMO_WASM, argv=["app", "echo", "still", "serving"],
                                       stdout=Stdio.fifo(second)))
        exit = guest.wait(5)
        assert exit is not None and exit.code == 0
        assert os.read(reader, 100) == b"still serving\n"
    finally:
        os.close(reader)


def test_other_fds_keep_wasmtimes_writes_when_stdout_is_a_fifo(
    engine: Engine, fifo: tuple[Path, int], tmp_path: Path
) -> None:
    path, reader = fifo
    (tmp_path / "data").mkdir()
    errors = Collector()
    code_of = {}
    for argv in (["app", "write", "/data/note.txt", "kept", "in", "a", "file"], ["app", "nope"]):
        guest = engine.start(GuestSpec(module=DEMO_WASM, argv=argv, preopens=[Preopen(tmp_path / "data", "/data")],
                                       stdout=Stdio.fifo(path), stderr=Stdio.to_callback(errors)))
        exit = guest.wait(5)
        assert exit is not None
        code_of[argv[1]] = exit.code
    assert code_of == {"write": 0, "nope": 1}
    assert (tmp_path / "data" / "note.txt").read_text() == "kept in a file"
    assert errors.text == "unknown command: nope\n"
    assert pending(reader) == 0


HOSTILE_POINTERS_WAT = r"""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "\fa\ff\00\00\64\00\00\00")  ;; iovec {ptr 65530, len 100}: runs past the end
  (data (i32.const 32) "\00\ff\ff\ff\10\00\00\00")  ;; iovec {ptr 0xffffff00, len 16}
  (func $expect_fault (param $errno i32) (param $step i32)
    (if (i32.ne (local.get $errno) (i32.const 21)) (then (call $exit (local.get $step)))))
  (func (export "_start")
    (call $expect_fault (call $clock (i32.const 1) (i64.const 0) (i32.const 65532)) (i32.const 1))
    (call $expect_fault (call $clock (i32.const 1) (i64.const 0) (i32.const -8)) (i32.const 2))
    (call $expect_fault (call $poll (i32.const 65500) (i32.const 0) (i32.const 1) (i32.const 0)) (i32.const 3))
    (call $expect_fault (call $poll (i32.const 0) (i32.const -16) (i32.const 1) (i32.const 0)) (i32.const 4))
    (call $expect_fault (call $poll (i32.const 0) (i32.const 64) (i32.const 0x7fffffff) (i32.const 0)) (i32.const 5))
    (call $expect_fault (call $fd_write (i32.const 1) (i32.const -16) (i32.const 1) (i32.const 0)) (i32.const 6))
    (call $expect_fault (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 0)) (i32.const 7))
    (call $expect_fault (call $fd_write (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 65535)) (i32.const 8))
    (call $expect_fault (call $fd_read (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 0)) (i32.const 9))
    (call $expect_fault (call $fd_read (i32.const 0) (i32.const 8) (i32.const 1) (i32.const 65534)) (i32.const 10))
    (call $exit (i32.const 0))))
"""


def test_pointers_outside_the_guests_memory_get_efault_and_touch_nothing(
    engine: Engine, fifo: tuple[Path, int], tmp_path: Path
) -> None:
    """The async WASI calls reach memory by address: every pointer a guest passes is checked first."""
    stdout, reader = fifo
    stdin = tmp_path / "in.fifo"
    os.mkfifo(stdin)
    stdin_writer = os.open(stdin, os.O_RDWR | os.O_NONBLOCK)
    module = tmp_path / "hostile.wasm"
    module.write_bytes(wasmtime.wat2wasm(HOSTILE_POINTERS_WAT))
    try:
        os.write(stdin_writer, b"input that must stay unread")
        guest = engine.start(GuestSpec(module=module, argv=["hostile"], stdin=Stdio.fifo(stdin),
                                       stdout=Stdio.fifo(stdout)))
        exit = guest.wait(10)
        assert exit is not None and (exit.code, exit.reason) == (0, ExitReason.EXITED), exit
        assert pending(reader) == 0
        assert os.read(stdin_writer, 100) == b"input that must stay unread"
    finally:
        os.close(stdin_writer)
    after = engine.start(GuestSpec(module=DEMO_WASM, argv=["app", "echo", "unharmed"], stdout=Stdio.fifo(stdout)))
    done = after.wait(5)
    assert done is not None and done.code == 0
    assert os.read(reader, 100) == b"unharmed\n"
