"""kwasm.runtime.ffi on its own: the typed wrapper over wasmtime's async C API (run this after a wasmtime upgrade)."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Iterator

import pytest
import wasmtime

from kwasm.runtime import ffi
from kwasm.runtime.cells import MEMORY, CellPool, GuestCell
from kwasm.runtime.settings import EngineSettings

GUEST_WAT = """(module
  (import "test" "wait" (func $wait (param i32) (result i32)))
  (import "test" "later" (func $later (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello")
  (func (export "wait_twice") (drop (call $wait (i32.const 1))) (drop (call $wait (i32.const 2))))
  (func (export "later") (i32.store (i32.const 0) (call $later (i32.const 7))))
  (func (export "exit3") (call $exit (i32.const 3)))
  (func (export "trap") unreachable)
  (func (export "spin") (loop br 0))
  (func (export "grow") (drop (memory.grow (i32.const 100)))))"""


class Host:
    """Async host functions whose waits the test completes by hand."""

    def __init__(self) -> None:
        self.flag = GuestCell(0)  # used only as a flag
        self.seen: list[int] = []
        self.polls = 0

    def wait(self, call: ffi.HostCall) -> GuestCell:
        self.seen.append(call.arg(0))
        call.set_result(0)
        self.flag.clear()
        return self.flag

    def later(self, call: ffi.HostCall) -> ffi.Continuation:
        def continuation() -> bool:
            self.polls += 1
            if self.polls < 3:
                return False
            call.set_result(call.arg(0) * 6)  # results may be written until completion
            return True

        return continuation


@pytest.fixture(scope="module")
def runtime() -> Iterator[tuple[wasmtime.Engine, ffi.InstancePre, Host]]:
    engine = ffi.new_engine(EngineSettings())
    linker = ffi.new_linker(engine, shadowing=True)
    host = Host()
    ffi.define_async(linker, "test", "wait", ["i32"], host.wait)
    ffi.define_async(linker, "test", "later", ["i32"], host.later)
    pre = ffi.InstancePre(linker, wasmtime.Module(engine, GUEST_WAT))
    yield engine, pre, host
    pre.delete()


def new_store(engine: wasmtime.Engine, pre: ffi.InstancePre, key: int) -> tuple[ffi.Store, ffi.Instance]:
    store = ffi.Store(engine, GuestCell(key))
    store.set_wasi(ffi.WasiConfig())
    store.yield_on_epoch()
    return store, store.instantiate(pre)


def test_native_flag_continuation_suspends_until_set(runtime: tuple[wasmtime.Engine, ffi.InstancePre, Host]) -> None:
    engine, pre, host = runtime
    store, instance = new_store(engine, pre, 1)
    future = ffi.CallFuture(store, instance.func("wait_twice"))
    assert not future.poll() and host.seen == [1]
    assert not future.poll()  # the flag is clear: still waiting, no Python ran
    host.flag.set()
    assert not future.poll() and host.seen == [1, 2]
    host.flag.set()
    assert future.poll()
    assert future.outcome() == (0, "")
    future.delete()
    store.delete()


def test_python_continuation_can_set_the_result_late(runtime: tuple[wasmtime.Engine, ffi.InstancePre, Host]) -> None:
    engine, pre, _ = runtime
    store, instance = new_store(engine, pre, 2)
    future = ffi.CallFuture(store, instance.func("later"))
    polls = 1
    while not future.poll():
        polls += 1
    assert polls == 3
    memory = instance.memory()  # the handle points into it: keep it alive
    base, size = ffi.memory_region(*instance.memory_handle(memory))
    assert size == 65536
    assert ctypes.c_int32.from_address(base).value == 42
    assert ctypes.string_at(base + 16, 5) == b"hello"
    future.delete()
    store.delete()


def test_outcomes_exit_code_and_trap(runtime: tuple[wasmtime.Engine, ffi.InstancePre, Host]) -> None:
    engine, pre, _ = runtime
    for func, expected in (("exit3", (3, "")), ("trap", (None, "wasm trap: wasm `unreachable` instruction executed"))):
        store, instance = new_store(engine, pre, 3)
        future = ffi.CallFuture(store, instance.func(func))
        assert future.poll()
        assert future.outcome() == expected
        future.delete()
        store.delete()


def test_spinning_guest_yields_on_epoch_and_can_be_dropped(
    runtime: tuple[wasmtime.Engine, ffi.InstancePre, Host],
) -> None:
    engine, pre, _ = runtime
    store, instance = new_store(engine, pre, 4)
    future = ffi.CallFuture(store, instance.func("spin"))
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.01):
            engine.increment_epoch()

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        started = time.monotonic()
        assert not future.poll()  # returns on the next tick instead of spinning forever
        assert time.monotonic() - started < 1.0
        assert not future.poll()  # each poll starts a fresh time slice
    finally:
        stop.set()
        ticker.join()
    future.delete()  # a suspended fiber is unwound and freed
    store.delete()


def test_memory_limit_and_missing_exports(runtime: tuple[wasmtime.Engine, ffi.InstancePre, Host]) -> None:
    engine, pre, _ = runtime
    store = ffi.Store(engine, GuestCell(5))
    store.set_wasi(ffi.WasiConfig())
    store.limit_memory(2 * 65536)
    store.yield_on_epoch()
    instance = store.instantiate(pre)
    future = ffi.CallFuture(store, instance.func("grow"))
    assert future.poll() and future.outcome() == (0, "")
    memory = instance.memory()
    assert ffi.memory_size(*instance.memory_handle(memory)) == 65536  # memory.grow past the limit failed
    assert instance.func("no_such_export") is None and instance.memory("no_such_memory") is None
    future.delete()
    store.delete()
    too_small = ffi.Store(engine, GuestCell(6))
    too_small.set_wasi(ffi.WasiConfig())
    too_small.limit_memory(1024)
    with pytest.raises(OSError, match="exceeds memory limits"):
        too_small.instantiate(pre)
    too_small.delete()


def test_unknown_import_fails_to_link() -> None:
    engine = ffi.new_engine(EngineSettings())
    linker = ffi.new_linker(engine, shadowing=True)
    module = wasmtime.Module(engine, '(module (import "nowhere" "f" (func)))')
    with pytest.raises(ValueError, match="nowhere"):
        ffi.InstancePre(linker, module)


def test_output_callbacks_per_stream() -> None:
    engine = ffi.new_engine(EngineSettings())
    linker = ffi.new_linker(engine, shadowing=False)
    module = wasmtime.Module(engine, """(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 8) "\\10\\00\\00\\00\\03\\00\\00\\00hey")
      (func (export "_start") (drop (call $w (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 0)))
                              (drop (call $w (i32.const 2) (i32.const 8) (i32.const 1) (i32.const 0)))))""")
    pre = ffi.InstancePre(linker, module)
    received: list[bytes] = []
    errors: list[bytes] = []
    config = ffi.WasiConfig()
    config.output_callback(1, received.append)
    config.output_callback(2, errors.append)
    store = ffi.Store(engine, GuestCell(7))
    store.set_wasi(config)
    store.yield_on_epoch()
    instance = store.instantiate(pre)
    future = ffi.CallFuture(store, instance.func("_start"))
    assert future.poll() and future.outcome() == (0, "")
    future.delete()
    store.delete()
    pre.delete()
    assert received == [b"hey"]
    assert errors == [b"hey"]


def test_summarize_keeps_the_root_cause() -> None:
    text = "error while executing at wasm backtrace:\n    0: 0x1 - f\n\nCaused by:\n    wasm trap: out of bounds"
    assert ffi.summarize(text) == "wasm trap: out of bounds"
    assert ffi.summarize("one line\nmore") == "one line"


def test_cells_are_zeroed_distinct_and_reused() -> None:
    pool = CellPool(16, per_block=2)
    first, second, third = pool.take(), pool.take(), pool.take()  # the third comes from a new block
    assert len({first, second, third}) == 3
    MEMORY[second : second + 16] = b"x" * 16
    pool.give_back(second)
    again = pool.take()
    assert again == second and bytes(MEMORY[again : again + 16]) == bytes(16)


def test_a_guest_cell_flag_is_what_strlen_sees_and_a_reused_cell_starts_a_new_wait() -> None:
    strlen = ctypes.CDLL(None).strlen
    strlen.argtypes, strlen.restype = [ctypes.c_void_p], ctypes.c_size_t
    cell = GuestCell(9)
    assert strlen(cell.address) == 0 and not cell.is_set()
    cell.set()
    assert strlen(cell.address) == 1 and cell.is_set()
    first_wait = cell.new_wait()
    assert cell.wait == first_wait and not cell.is_set()
    address = cell.address
    del cell  # its memory goes back to the pool
    again = GuestCell(10)
    assert again.address == address and not again.is_set()
    assert again.wait > first_wait, "a stale timer or fd wait naming the old guest's cell never matches"
