"""The wasm engine: one wasmtime Engine, many guests per scheduler thread.

    with Engine() as engine:
        guest = engine.start(GuestSpec(module=Path("app.wasm"), argv=["app.wasm", "sleep", "1"]))
        print(guest.wait())

Guests are instantiated on the caller's thread (so errors raise there) and then run on one of
``threads`` scheduler threads as wasmtime fibers (see :mod:`kwasm.runtime.scheduler`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import wasmtime

from kwasm.errors import EngineError, WasmValidationError
from kwasm.runtime import ffi, wasiconfig
from kwasm.runtime.cache import ModuleCache, default_cache_dir
from kwasm.runtime.cells import GuestCell
from kwasm.runtime.guest import EXIT_KILLED, EXIT_TRAP, ExitReason, GuestExit, GuestSpec
from kwasm.runtime.scheduler import Scheduler
from kwasm.runtime.settings import EngineSettings
from kwasm.runtime.wasi import Shadows

#: How often running guests are made to yield (and how fast a spinning guest notices a kill).
EPOCH_TICK_SECONDS = 0.01


#: Which WASI calls a guest's linker shadows beyond the waits: ``(async stdin fd_read, async fd_write)``.
_LinkerKind = tuple[bool, bool]
_PLAIN: _LinkerKind = (False, False)


class _Loaded:
    """A compiled module with its pre-linked forms (one per linker kind used so far)."""

    def __init__(self, module: wasmtime.Module, digest: str) -> None:
        self.module = module
        self.digest = digest
        self.pres: dict[_LinkerKind, ffi.InstancePre] = {}


class Guest:
    """A running (or finished) guest; see :meth:`Engine.start`."""

    __slots__ = (
        "_done",
        "_engine",
        "_exit",
        "_exports",
        "_future",
        "_memory_handle",
        "_on_exit",
        "_owned_fds",
        "_region",
        "_scheduler",
        "_store",
        "builtins",
        "cell",
        "id",
        "output_fds",
        "spec",
        "stdin_fd",
    )

    def __init__(self, engine: Engine, guest_id: int, spec: GuestSpec) -> None:
        self.id = guest_id
        self.spec = spec
        self.stdin_fd: int | None = None
        self.output_fds: dict[int, int] | None = None
        self.builtins: dict[str, object] | None = None  # made on first use (most guests never need it)
        self.cell = GuestCell(guest_id)
        self._engine = engine
        self._exit: GuestExit | None = None
        self._done: threading.Event | None = None
        self._on_exit: Callable[[GuestExit], None] | None = None
        self._store: ffi.Store | None = None
        self._exports = 0  # the address of its pinned ``_start`` and memory handles (ffi.pin_exports)
        self._memory_handle: tuple[int, int] | None = None
        self._region = (0, 0)  # (address, length) last seen: a memory moves only when it grows
        self._future: ffi.CallFuture | None = None
        self._scheduler: Scheduler | None = None
        self._owned_fds: tuple[int, ...] = ()

    # ---- public API --------------------------------------------------------------------------
    @property
    def exit(self) -> GuestExit | None:
        """How the guest ended, or None while it runs."""
        return self._exit

    def kill(self) -> None:
        """Stop the guest (exit code 137); idempotent and safe from any thread."""
        if self._exit is None and self._scheduler is not None:
            self._scheduler.kill_later(self, ExitReason.KILLED)

    def wait(self, timeout: float | None = None) -> GuestExit | None:
        """Block until the guest has ended (or ``timeout`` seconds passed); its exit or None."""
        if self._exit is None:
            with self._engine._lock:
                if self._exit is None and self._done is None:
                    self._done = threading.Event()
                done = self._done
            if done is not None:
                done.wait(timeout)
        return self._exit

    def memory_bytes(self) -> int:
        """Current size of the guest's linear memory in bytes (0 once it has ended)."""
        with self._engine._lock:
            if self._exit is not None or self._memory_handle is None:
                return 0
            return ffi.memory_size(*self._memory_handle)

    # ---- scheduler protocol (runs on the guest's scheduler thread) ---------------------------
    def suspend(self, deadline: float | None, fd: int | None, *, writable: bool = False) -> None:
        """Park until ``deadline`` or until ``fd`` is readable (writable if ``writable``; by the async WASI calls)."""
        assert self._scheduler is not None
        self._scheduler.suspend(self, deadline, fd, writable=writable)

    def memory_region(self) -> tuple[int, int]:
        """``(address, length)`` of the guest's linear memory (for the async WASI calls)."""
        handle = self._memory_handle
        if handle is None:
            raise EngineError(f"{self.spec.module.name} exports no memory")
        # Wasm memories never shrink and move only when they grow: an unchanged length means an
        # unchanged address, so one FFI call instead of two on every host call.
        if ffi.memory_size(*handle) != self._region[1]:
            self._region = ffi.memory_region(*handle)
        return self._region

    def take_wakeup(self) -> bool:
        """True once after the scheduler woke this guest."""
        if self.cell.is_set():
            self.cell.clear()
            return True
        return False

    def run_slice(self) -> bool:
        """Run until the next suspension point; True once ``_start`` has finished (then :meth:`conclude`)."""
        if self._exit is not None:
            return True
        if self._future is None:
            assert self._store is not None
            self._future = ffi.CallFuture(self._store, self._exports)
        return self._future.poll()

    def conclude(self) -> None:
        """Record how the guest ended once its call future has completed, and clean up."""
        if self._exit is not None:
            return
        assert self._future is not None
        code, message = self._future.outcome()
        if code is None:
            self._finish(EXIT_TRAP, ExitReason.TRAPPED, message)
        else:
            self._finish(code, ExitReason.EXITED, "")

    def abort(self, reason: ExitReason) -> None:
        """Drop the guest wherever it is suspended (killed, timed out, engine closing, host error)."""
        if self._exit is None:
            if reason is ExitReason.TRAPPED:
                self._finish(EXIT_TRAP, reason, "host error while running the guest")
            else:
                self._finish(EXIT_KILLED, reason, "timed out" if reason is ExitReason.TIMEOUT else "killed")

    def _finish(self, code: int, reason: ExitReason, message: str) -> None:
        if self._future is not None:
            self._future.delete()
            self._future = None
        ffi.forget_pending(self.id)
        with self._engine._lock:
            if self._store is not None:
                self._store.delete()
            self._store = None
            self.builtins = None  # handles into the deleted store
            self._memory_handle = None
            if self._exports:
                ffi.unpin_exports(self._exports)
                self._exports = 0
            self._exit = GuestExit(code, reason, message, time.time())
            done = self._done
        if self._scheduler is not None:
            for fd in self._owned_fds:
                self._scheduler.release_fd(fd)
        for fd in self._owned_fds:
            os.close(fd)
        self._owned_fds = ()
        self._engine._forget(self)
        if done is not None:
            done.set()
        if self._on_exit is not None:
            with contextlib.suppress(Exception):  # a caller's callback must not kill a scheduler thread
                self._on_exit(self._exit)

    def __repr__(self) -> str:
        return f"<Guest {self.id} {self.spec.module.name} exit={self._exit}>"


class Engine:
    """One wasmtime engine and its scheduler threads; starts, tracks and kills guests."""

    def __init__(
        self,
        *,
        threads: int | None = None,
        cache_dir: Path | None = None,
        settings: EngineSettings | None = None,
    ) -> None:
        self.settings = settings or EngineSettings()
        self._lock = threading.Lock()
        self._pre_lock = threading.Lock()
        self._wasm = ffi.new_engine(self.settings)
        self.cache = ModuleCache(self._wasm, self.settings, cache_dir or default_cache_dir())
        self._guests: dict[int, Guest] = {}
        self._ids = itertools.count(1)
        self._modules: dict[tuple[str, int, int], _Loaded] = {}
        self._shadows = Shadows(self._wasm, self._guests.__getitem__)
        self._linkers: dict[_LinkerKind, wasmtime.Linker] = {}
        for async_stdin in (False, True):
            for async_output in (False, True):
                linker = ffi.new_linker(self._wasm, shadowing=True)
                self._shadows.install(linker, async_stdin=async_stdin, async_output=async_output)
                self._linkers[async_stdin, async_output] = linker
        count = threads if threads and threads > 0 else (os.cpu_count() or 1)
        self._schedulers = [Scheduler(f"kwasm-sched-{i}") for i in range(count)]
        self._closed = False
        self._ticking = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="kwasm-epoch", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._ticking.wait(EPOCH_TICK_SECONDS):
            self._wasm.increment_epoch()

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def guest_count(self) -> int:
        """Guests started and not yet ended."""
        return len(self._guests)

    def record_wake_lags(self, enabled: bool) -> list[float]:
        """Start (or stop) recording timer wake-up lags; returns the samples recorded so far, in seconds."""
        samples: list[float] = []
        for scheduler in self._schedulers:
            samples.extend(scheduler.wake_lags or [])
            scheduler.wake_lags = [] if enabled else None
        return samples

    def load(self, module: Path) -> None:
        """Validate and compile ``module`` now (cached on disk); WasmValidationError if it cannot run."""
        self._load(module)

    def _load(self, module: Path, info: os.stat_result | None = None) -> _Loaded:
        try:
            info = info or module.stat()
        except OSError as exc:
            raise WasmValidationError(f"cannot read {module}: {exc.strerror}") from None
        key = (str(module), info.st_mtime_ns, info.st_size)
        with self._lock:
            loaded = self._modules.get(key)
        if loaded is not None:
            return loaded
        digest, compiled = self.cache.load(module)
        starts = [e for e in compiled.exports if e.name == "_start" and isinstance(e.type, wasmtime.FuncType)]
        if not starts:
            raise WasmValidationError(f"{module} has no _start function: it is not a WASI command")
        loaded = _Loaded(compiled, digest)
        self._pre(loaded, _PLAIN, module)
        with self._lock:
            return self._modules.setdefault(key, loaded)

    def _pre(self, loaded: _Loaded, kind: _LinkerKind, module: Path) -> ffi.InstancePre:
        pre = loaded.pres.get(kind)
        if pre is None:
            with self._pre_lock:  # two threads starting the first guest of a kind must not both link it
                pre = loaded.pres.get(kind)
                if pre is None:
                    try:
                        pre = ffi.InstancePre(self._linkers[kind], loaded.module)
                    except ValueError as exc:
                        reason = str(exc).splitlines()[0]
                        raise WasmValidationError(f"{module} cannot be linked against WASI: {reason}") from None
                    loaded.pres[kind] = pre
        return pre

    def start(
        self,
        spec: GuestSpec,
        on_exit: Callable[[GuestExit], None] | None = None,
        *,
        module_stat: os.stat_result | None = None,
    ) -> Guest:
        """Instantiate ``spec`` and schedule it; returns once it is queued (EngineError on failure).

        ``module_stat``: the module file's stat if the caller just took it (the engine takes its own
        otherwise, to notice a file replaced in place).
        """
        if self._closed:
            raise EngineError("the engine is closed")
        loaded = self._load(spec.module, module_stat)
        guest = Guest(self, next(self._ids), spec)
        guest._on_exit = on_exit
        setup = wasiconfig.build(spec)
        try:
            pre = self._pre(loaded, (setup.stdin_fd is not None, setup.output_fds is not None), spec.module)
        except BaseException:
            setup.config.discard()
            setup.close()
            raise
        store = ffi.Store(self._wasm, guest.cell)
        try:
            store.set_wasi(setup.config)
            if spec.memory_limit is not None:
                store.limit_memory(spec.memory_limit)
            store.yield_on_epoch()
            instance = store.instantiate(pre)
        except OSError as exc:
            store.delete()
            setup.close()
            raise EngineError(f"cannot start {spec.module.name}: {str(exc).splitlines()[0]}") from None
        guest._store = store
        guest._exports, memory = ffi.pin_exports(instance.func("_start"), instance.memory())
        if memory is not None:
            guest._memory_handle = (store.context_address, memory)
            store.bind_memory(memory)
        guest.stdin_fd = setup.stdin_fd
        guest.output_fds = setup.output_fds
        if setup.output_fds:
            store.bind_outputs(setup.output_fds.get(1, -1), setup.output_fds.get(2, -1))
        guest._owned_fds = tuple(setup.owned_fds)
        with self._lock:
            self._guests[guest.id] = guest
            scheduler = min(self._schedulers, key=lambda s: s.load)
            guest._scheduler = scheduler
            scheduler.start_later(guest, spec.timeout)
        return guest

    def _forget(self, guest: Guest) -> None:
        with self._lock:
            self._guests.pop(guest.id, None)

    def close(self) -> None:
        """Kill every guest, stop the scheduler threads and join them."""
        if any(scheduler.is_current for scheduler in self._schedulers):
            raise EngineError("Engine.close() cannot run on a scheduler thread (e.g. inside on_exit)")
        if self._closed:
            return
        self._closed = True
        for scheduler in self._schedulers:
            scheduler.stop()
        self._ticking.set()
        self._ticker.join()
        with self._lock:
            for loaded in self._modules.values():
                for pre in loaded.pres.values():
                    pre.delete()
            self._modules.clear()
