"""The one module that touches ``wasmtime._ffi``: a small typed API over wasmtime's async C API.

wasmtime-py wraps only the synchronous API; its private ``_ffi`` module carries ctypes bindings for
the async one (async host functions, async instantiation, call futures, epoch yields, the pooling
allocator). Everything kwasm needs from it lives here, so a wasmtime upgrade is one file's work.
``wasmtime`` is pinned to one major version in pyproject.toml for that reason.
"""

from __future__ import annotations

import ctypes
import itertools
import struct
from collections.abc import Callable
from ctypes import (
    POINTER,
    byref,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_ssize_t,
    c_ubyte,
    c_uint64,
    c_void_p,
)
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

from kwasm.runtime import _native
from kwasm.runtime.cells import MEMORY, U32, CellPool, GuestCell
from kwasm.runtime.settings import EngineSettings

#: A continuation: called on every poll of a suspended host call; True once the call is complete.
Continuation = Callable[[], bool]

_NULL_FINALIZER = ctypes.CFUNCTYPE(None, c_void_p)(0)
_ERRNO_IO = 29

# The header declares this one as returning an error, but the library's function is void.
_epoch_yield = ffi.dll.wasmtime_context_epoch_deadline_async_yield_and_update
_epoch_yield.restype = None
_epoch_yield.argtypes = [POINTER(ffi.wasmtime_context_t), c_uint64]


# Short, non-blocking calls, bound through PyDLL so they keep the GIL: releasing it for a few
# nanoseconds of work would hand it to another scheduler thread at every call.
_held = ctypes.PyDLL(ffi.dll._name)
_memory_data = _held.wasmtime_memory_data
_memory_data.restype = c_void_p
_memory_data.argtypes = [c_void_p, c_void_p]
_memory_data_size = _held.wasmtime_memory_data_size
_memory_data_size.restype = c_size_t
_memory_data_size.argtypes = [c_void_p, c_void_p]


_CONTINUATION = struct.Struct("<QQQ")  # wasmtime_async_continuation_t: callback, env, finalizer


def _array_pointer(items: Any) -> Any:
    """A ``char **`` to a ``c_char_p`` array (cast from its address: casting the array itself makes a ref cycle)."""
    return ctypes.cast(ctypes.addressof(items), POINTER(POINTER(c_char)))


def _chars(data: bytes) -> Any:
    return ctypes.cast(c_char_p(data), POINTER(c_char))


def new_engine(settings: EngineSettings) -> wasmtime.Engine:
    """Create a wasmtime engine with small memory reservations, async stacks and epoch interruption."""
    config = wasmtime.Config()
    config.memory_reservation = settings.memory_reservation
    config.memory_guard_size = settings.memory_guard_size
    config.memory_reservation_for_growth = settings.memory_reservation_for_growth
    config.max_wasm_stack = settings.max_wasm_stack
    config.epoch_interruption = settings.epoch_interruption
    config.memory_init_cow = settings.memory_init_cow
    ffi.wasmtime_config_async_stack_size_set(config.ptr(), settings.async_stack_size)
    return wasmtime.Engine(config)


def summarize(text: str) -> str:
    """One line out of a wasmtime error: its root cause (after "Caused by:") or its first line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if "Caused by:" in lines:
        return lines[-1]
    return lines[0] if lines else "unknown error"


def _error_message(err: Any) -> str:
    return summarize(str(wasmtime.WasmtimeError._from_ptr(err)))


def _trap_message(trap: Any) -> str:
    return summarize(str(wasmtime.Trap._from_ptr(trap)))


class HostCall:
    """One call of an async host function: its arguments, the caller's memory and its i32 result."""

    __slots__ = ("_caller", "_key", "_params", "_results")

    def __init__(self, caller: int, params: int, results: int) -> None:
        self._caller = caller  # raw addresses: no ctypes objects on the hot path
        self._params = params
        self._results = results
        self._key = _native.running_key()

    def arg(self, index: int) -> int:
        """Argument ``index`` as an unsigned 32-bit integer."""
        return int(U32.unpack_from(MEMORY, self._params + _VAL_SIZE * index + _VAL_OF)[0])

    def args4(self) -> tuple[int, int, int, int]:
        """The first four arguments as unsigned 32-bit integers (one read)."""
        first, second, third, fourth = _ARGS4.unpack_from(MEMORY, self._params)
        return first, second, third, fourth

    def store_key(self) -> int:
        """The integer key the calling guest's store was created with (see :class:`Store`)."""
        return self._key

    def set_result(self, value: int) -> None:
        """Set the i32 result; may be called until the continuation reports completion."""
        _RESULT.pack_into(MEMORY, self._results, 0, value)  # kind WASMTIME_I32 (0), then the value

    def builtin(self, engine: wasmtime.Engine, linker: wasmtime.Linker, adapter: wasmtime.Module, name: str) -> Any:
        """The built-in WASI function ``name`` made callable on the caller's memory (a store-bound handle).

        Built-in WASI functions read the memory of the instance that calls them, so a tiny adapter
        module (importing the guest's memory and the built-in function) is instantiated in the
        guest's store, polled to completion right here. Instances live as long as their store:
        keep the handle for the guest's later calls (see :meth:`call_func`).
        """
        caller = ctypes.cast(self._caller, POINTER(ffi.wasmtime_caller_t))
        context = ffi.wasmtime_caller_context(caller)
        memory = ffi.wasmtime_extern_t()
        builtin = ffi.wasmtime_extern_t()
        if not ffi.wasmtime_caller_export_get(caller, c_char_p(b"memory"), 6, byref(memory)):
            raise OSError("guest exports no memory")
        module_name, func_name = b"wasi_snapshot_preview1", name.encode()
        if not ffi.wasmtime_linker_get(
            linker.ptr(), context, _chars(module_name), len(module_name), _chars(func_name), len(func_name),
            byref(builtin),
        ):
            raise OSError(f"no built-in {name}")
        scratch = ffi.wasmtime_linker_new(engine.ptr())
        try:
            for import_module, import_name, item in ((b"kwasm", b"memory", memory), (module_name, func_name, builtin)):
                err = ffi.wasmtime_linker_define(
                    scratch, context, _chars(import_module), len(import_module), _chars(import_name),
                    len(import_name), byref(item),
                )
                if err:
                    raise OSError(_error_message(err))
            instance = ffi.wasmtime_instance_t()
            _run_to_completion(
                lambda trap, err: ffi.wasmtime_linker_instantiate_async(
                    scratch, context, adapter.ptr(), byref(instance), trap, err
                )
            )
        finally:
            ffi.wasmtime_linker_delete(scratch)
        func = ffi.wasmtime_extern_t()
        if not ffi.wasmtime_instance_export_get(
            context, byref(instance), _chars(func_name), len(func_name), byref(func)
        ):
            raise OSError("adapter lacks its export")
        return ffi.wasmtime_func_t.from_buffer_copy(func.of.func)

    def call_func(self, func: Any, nargs: int) -> int:
        """Call ``func`` (from :meth:`builtin`, same store) with this call's first ``nargs`` i32 arguments."""
        context = ffi.wasmtime_caller_context(ctypes.cast(self._caller, POINTER(ffi.wasmtime_caller_t)))
        args = (ffi.wasmtime_val_t * nargs)()
        for index in range(nargs):
            arg: Any = args[index]
            arg.kind = 0
            arg.of.i32 = self.arg(index)
        results = (ffi.wasmtime_val_t * 1)()
        _run_to_completion(
            lambda trap, err: ffi.wasmtime_func_call_async(context, byref(func), args, nargs, results, 1, trap, err)
        )
        return int(results[0].of.i32)


def _run_to_completion(start: Callable[[Any, Any], Any]) -> None:
    trap = POINTER(ffi.wasm_trap_t)()
    err = POINTER(ffi.wasmtime_error_t)()
    future = start(byref(trap), byref(err))
    while not ffi.wasmtime_call_future_poll(future):
        pass
    ffi.wasmtime_call_future_delete(future)
    if err:
        raise OSError(_error_message(err))
    if trap:
        raise OSError(_trap_message(trap))


#: An async host function: gets the call, returns None (complete now), a cell to wait on or a continuation.
AsyncHostFunction = Callable[[HostCall], Continuation | GuestCell | None]

_pending: dict[int, tuple[HostCall, Continuation]] = {}


@ffi.wasmtime_func_async_continuation_callback_t  # type: ignore[untyped-decorator]
def _always_ready(env: Any) -> bool:
    return True


@ffi.wasmtime_func_async_continuation_callback_t  # type: ignore[untyped-decorator]
def _continue(env: Any) -> bool:
    call, continuation = _pending[env]
    try:
        done = continuation()
    except Exception:  # a host bug must not hang or crash the guest's scheduler: fail the call
        call.set_result(_ERRNO_IO)
        done = True
    if done:
        del _pending[env]
    return done


def _address(function: Any) -> int:
    return int(ctypes.cast(function, c_void_p).value or 0)


_FLAG_IS_SET = _address(ctypes.CDLL(None).strlen)
_ALWAYS_READY = _address(_always_ready)
_CONTINUE = _address(_continue)
_VAL_SIZE = ctypes.sizeof(ffi.wasmtime_val_t)
_VAL_OF = ffi.wasmtime_val_t.of.offset
_ARGS4 = struct.Struct(f"<{_VAL_OF}x" + f"I{_VAL_SIZE - 4}x" * 3 + "I")
_RESULT = struct.Struct(f"<B{_VAL_OF - 1}xi")
_native.init(
    _address(ffi.dll.wasmtime_caller_context),
    _address(ffi.dll.wasmtime_context_get_data),
    _address(_memory_data),
    _address(_memory_data_size),
    _address(ffi.dll.wasmtime_call_future_poll),
    _address(ffi.dll.wasmtime_context_set_epoch_deadline),
    _FLAG_IS_SET,
    _VAL_SIZE,
    _VAL_OF,
)
#: wasmtime_func_async_callback_t with every pointer as a plain address (cheaper to enter from C).
_RawAsyncCallback = ctypes.CFUNCTYPE(
    None, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_void_p
)

_host_functions: list[Any] = []


def _python_host_function(impl: AsyncHostFunction) -> int:
    """A C-callable ``wasmtime_func_async_callback_t`` running ``impl`` (kept alive for the process)."""

    def trampoline(env: int, caller: int, params: int, np: int, results: int, nr: int, trap: int, cont: int) -> None:
        call = HostCall(caller, params, results)
        callback, data = _ALWAYS_READY, 0
        try:
            continuation = impl(call)
        except Exception:  # never let an exception cross into wasmtime (it would abort the process)
            call.set_result(_ERRNO_IO)
            continuation = None
        if isinstance(continuation, GuestCell):
            callback, data = _FLAG_IS_SET, continuation.address
        elif continuation is not None:
            data = call.store_key()
            _pending[data] = (call, continuation)
            callback = _CONTINUE
        # wasmtime_async_continuation_t {callback, env, finalizer}; wasmtime aborts if callback is unset.
        _CONTINUATION.pack_into(MEMORY, cont, callback, data, 0)

    raw = _RawAsyncCallback(trampoline)
    _host_functions.append(raw)  # ctypes callbacks must outlive every linker using them
    return _address(raw)


def define_async(
    linker: wasmtime.Linker,
    module: str,
    name: str,
    params: list[str],
    impl: AsyncHostFunction | None,
    *,
    native: int | None = None,
) -> None:
    """Define (or shadow) ``module.name`` as an async host function ``(params...) -> i32``.

    ``params`` lists the wasm types ("i32" or "i64"); :meth:`HostCall.arg` reads the i32 ones.
    ``native`` is the address of a host function in :mod:`kwasm.runtime._native`: it serves the
    calls it can and hands the others to ``impl`` (None when it serves them all).
    """

    python = 0 if impl is None else _python_host_function(impl)
    if native is None and not python:
        raise ValueError(f"{module}.{name} needs a Python or a native implementation")
    callback = ctypes.cast(native or python, ffi.wasmtime_func_async_callback_t)
    env = python if native else 0  # the native function hands what it does not serve to the Python one
    types = {"i32": wasmtime.ValType.i32(), "i64": wasmtime.ValType.i64()}
    functype = wasmtime.FuncType([types[p] for p in params], [wasmtime.ValType.i32()])
    module_bytes, name_bytes = module.encode(), name.encode()
    err = ffi.wasmtime_linker_define_async_func(
        linker.ptr(), _chars(module_bytes), len(module_bytes), _chars(name_bytes), len(name_bytes),
        functype.ptr(), callback, env or None, _NULL_FINALIZER,
    )
    if err:
        raise wasmtime.WasmtimeError._from_ptr(err)


def new_linker(engine: wasmtime.Engine, *, shadowing: bool) -> wasmtime.Linker:
    """A linker with the built-in WASI preview1 functions (shadowable when ``shadowing``)."""
    linker = wasmtime.Linker(engine)
    linker.allow_shadowing = shadowing
    linker.define_wasi()
    return linker


def forget_pending(store_key: int) -> None:
    """Drop the suspended host call of a store that is being deleted."""
    _pending.pop(store_key, None)


_outputs: dict[int, Callable[[bytes], None]] = {}
_output_keys = itertools.count(1)


@ctypes.CFUNCTYPE(c_ssize_t, c_void_p, POINTER(c_ubyte), c_size_t)  # type: ignore[untyped-decorator]
def _write_output(key: Any, data: Any, size: int) -> int:
    try:
        _outputs[key](ctypes.string_at(data, size))
    except Exception:  # a failing sink must not crash the guest: report EIO to it
        return -5
    return size


@ctypes.CFUNCTYPE(None, c_void_p)  # type: ignore[untyped-decorator]
def _forget_output(key: Any) -> None:
    _outputs.pop(key, None)


class WasiConfig:
    """A WASI context under construction (consumed by :meth:`Store.set_wasi`)."""

    __slots__ = ("_ptr",)

    def __init__(self) -> None:
        self._ptr: Any = ffi.wasi_config_new()

    def discard(self) -> None:
        """Free a configuration that will not be installed."""
        if self._ptr:
            ffi.wasi_config_delete(self._ptr)
            self._ptr = None

    def argv(self, argv: list[str]) -> None:
        """Set the program arguments (``argv[0]`` first)."""
        items = (c_char_p * len(argv))(*(a.encode() for a in argv))
        if not ffi.wasi_config_set_argv(self._ptr, len(argv), _array_pointer(items)):
            raise ValueError("invalid argv")

    def env(self, env: dict[str, str]) -> None:
        """Set the environment."""
        names = (c_char_p * len(env))(*(k.encode() for k in env))
        values = (c_char_p * len(env))(*(v.encode() for v in env.values()))
        if not ffi.wasi_config_set_env(self._ptr, len(env), _array_pointer(names), _array_pointer(values)):
            raise ValueError("invalid environment")

    def stdin_file(self, path: str) -> None:
        """Read stdin from a file (opened now)."""
        if not ffi.wasi_config_set_stdin_file(self._ptr, c_char_p(path.encode())):
            raise OSError(f"cannot open {path} for reading")

    def inherit_stdin(self) -> None:
        """Use this process's stdin."""
        ffi.wasi_config_inherit_stdin(self._ptr)

    def inherit_output(self, fd: int) -> None:
        """Write stdout (fd 1) or stderr (fd 2) to this process's own stream (no new fd)."""
        (ffi.wasi_config_inherit_stdout if fd == 1 else ffi.wasi_config_inherit_stderr)(self._ptr)

    def output_callback(self, fd: int, callback: Callable[[bytes], None]) -> None:
        """Hand every chunk written to stdout (fd 1) or stderr (fd 2) to ``callback``."""
        key = next(_output_keys)
        _outputs[key] = callback
        setter = ffi.wasi_config_set_stdout_custom if fd == 1 else ffi.wasi_config_set_stderr_custom
        setter(self._ptr, _write_output, key, _forget_output)

    def preopen(self, host_path: str, guest_path: str, *, read_only: bool) -> None:
        """Give the guest ``host_path`` as ``guest_path`` (wasmtime confines it there)."""
        if not ffi.wasi_config_preopen_dir(
            self._ptr, _chars(host_path.encode()), _chars(guest_path.encode()), not read_only
        ):
            raise OSError(f"cannot open directory {host_path}")


class Store:
    """A wasmtime store for one guest; its data is the guest's :class:`GuestCell` (host calls read its key)."""

    # Plain addresses, not ctypes pointer objects: a sleeping guest's store adds no cyclic-GC work.
    __slots__ = ("_address", "_context_address", "cell")

    def __init__(self, engine: wasmtime.Engine, cell: GuestCell) -> None:
        self.cell = cell
        store = ffi.wasmtime_store_new(engine.ptr(), cell.address, _NULL_FINALIZER)
        self._address = int(c_void_p.from_buffer(store).value or 0)
        self._context_address = int(c_void_p.from_buffer(ffi.wasmtime_store_context(store)).value or 0)
        _native.cell_set_store(cell.address, self._context_address, 0)

    @property
    def key(self) -> int:
        """The guest's key (what :meth:`HostCall.store_key` returns for its calls)."""
        return self.cell.key

    def bind_memory(self, memory: int) -> None:
        """Tell the native host functions where the guest's memory handle is (see :func:`pin_exports`)."""
        _native.cell_set_store(self.cell.address, self._context_address, memory)

    @property
    def context_address(self) -> int:
        """The address of the store's context (for :func:`memory_size` and :func:`memory_region`)."""
        return self._context_address

    @property
    def _ptr(self) -> Any:
        return ctypes.cast(self._address, POINTER(ffi.wasmtime_store_t)) if self._address else None

    @property
    def _context(self) -> Any:
        return ctypes.cast(self._context_address, POINTER(ffi.wasmtime_context_t))

    def set_wasi(self, config: WasiConfig) -> None:
        """Install the WASI context (consumes ``config``)."""
        ptr, config._ptr = config._ptr, None
        err = ffi.wasmtime_context_set_wasi(self._context, ptr)
        if err:
            raise OSError(_error_message(err))

    def limit_memory(self, max_bytes: int) -> None:
        """Cap the size of every linear memory of this store."""
        ffi.wasmtime_store_limiter(self._ptr, max_bytes, -1, -1, -1, -1)

    def yield_on_epoch(self) -> None:
        """Make running wasm yield to the scheduler on every engine epoch tick."""
        ffi.wasmtime_context_set_epoch_deadline(self._context, 1)
        _epoch_yield(self._context, 1)

    def delete(self) -> None:
        """Free the store and everything in it (the call future must be deleted first)."""
        if self._address:
            _native.cell_set_store(self.cell.address, 0, 0)
            ffi.wasmtime_store_delete(self._ptr)
            self._address = 0

    def instantiate(self, pre: InstancePre) -> Instance:
        """Instantiate a pre-linked module in this store (polled to completion)."""
        instance = ffi.wasmtime_instance_t()
        _native.set_running_key(self.key)
        _run_to_completion(
            lambda trap, err: ffi.wasmtime_instance_pre_instantiate_async(
                pre.ptr, self._context, byref(instance), trap, err
            )
        )
        return Instance(self, instance)


class Instance:
    """An instance in a :class:`Store`."""

    __slots__ = ("_instance", "_store")

    def __init__(self, store: Store, instance: Any) -> None:
        self._store = store
        self._instance = instance

    def _export(self, name: str) -> Any:
        item = ffi.wasmtime_extern_t()
        raw = name.encode()
        found = ffi.wasmtime_instance_export_get(
            self._store._context, byref(self._instance), _chars(raw), len(raw), byref(item)
        )
        return item if found else None

    def func(self, name: str) -> Any:
        """The exported function ``name`` (an opaque handle) or None."""
        item = self._export(name)
        if item is None or item.kind != 0:
            return None
        return ffi.wasmtime_func_t.from_buffer_copy(item.of.func)  # a small copy, not the whole extern

    def memory(self, name: str = "memory") -> Any:
        """The exported memory ``name`` (an opaque handle) or None."""
        item = self._export(name)
        if item is None or item.kind != 3:
            return None
        return ffi.wasmtime_memory_t.from_buffer_copy(item.of.memory)

    def memory_handle(self, memory: Any) -> tuple[int, int]:
        """``(context, memory)`` addresses for :func:`memory_region`; valid while the store and ``memory`` live."""
        return self._store._context_address, ctypes.addressof(memory)


#: Per guest: its ``_start`` function handle (16 bytes) and memory handle (24 bytes), see pin_exports.
_EXPORTS = CellPool(48)
_MEMORY_AT = 16


def pin_exports(func: Any, memory: Any) -> tuple[int, int | None]:
    """Copy a function handle and a memory handle (or None) into native memory: their addresses.

    The addresses stand in for the ctypes handles (:class:`CallFuture`, :func:`memory_size`) until
    :func:`unpin_exports`; a guest then keeps no ctypes objects alive while it sleeps.
    """
    cell = _EXPORTS.take()
    MEMORY[cell : cell + ctypes.sizeof(func)] = bytes(func)
    if memory is None:
        return cell, None
    MEMORY[cell + _MEMORY_AT : cell + _MEMORY_AT + ctypes.sizeof(memory)] = bytes(memory)
    return cell, cell + _MEMORY_AT


def unpin_exports(func_address: int) -> None:
    """Release what :func:`pin_exports` returned (the store and any future using it must be gone)."""
    _EXPORTS.give_back(func_address)


def memory_size(context: int, memory: int) -> int:
    """The byte length of a memory from its :meth:`Instance.memory_handle`."""
    return int(_memory_data_size(context, memory))


def memory_region(context: int, memory: int) -> tuple[int, int]:
    """``(address, length)`` of a memory from its :meth:`Instance.memory_handle` (valid until the guest runs again)."""
    return _memory_data(context, memory) or 0, _memory_data_size(context, memory)


class InstancePre:
    """A module linked once against a linker; instantiates quickly in many stores."""

    __slots__ = ("ptr",)

    def __init__(self, linker: wasmtime.Linker, module: wasmtime.Module) -> None:
        self.ptr: Any = POINTER(ffi.wasmtime_instance_pre_t)()
        err = ffi.wasmtime_linker_instantiate_pre(linker.ptr(), module.ptr(), byref(self.ptr))
        if err:
            raise ValueError(_error_message(err))

    def delete(self) -> None:
        """Free it."""
        if self.ptr:
            ffi.wasmtime_instance_pre_delete(self.ptr)
            self.ptr = None


#: Per call future: its trap and error out-pointers (two native pointers), written by wasmtime.
_OUTCOMES = CellPool(16)
_OUTCOME = struct.Struct("<QQ")
# The call-future functions with plain addresses: no ctypes pointer objects kept per guest.
_call_async = ctypes.CFUNCTYPE(
    c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_void_p
)(("wasmtime_func_call_async", ffi.dll))
_future_delete = ctypes.CFUNCTYPE(None, c_void_p)(("wasmtime_call_future_delete", ffi.dll))


class CallFuture:
    """An async call of a no-argument function, advanced by :meth:`poll`.

    ``func`` is a handle from :meth:`Instance.func` or the address of one (see :func:`pin_exports`);
    wasmtime reads it lazily, so the caller keeps it alive as long as the future. A store runs one
    future at a time: it is the one its guest cell's native wake-ups poll.
    """

    __slots__ = ("_address", "_cell", "_outcome")

    def __init__(self, store: Store, func: Any) -> None:
        self._cell = store.cell.address
        self._outcome = _OUTCOMES.take()
        func_address = func if isinstance(func, int) else ctypes.addressof(func)
        self._address: int = _call_async(
            store.context_address, func_address, None, 0, None, 0, self._outcome, self._outcome + 8
        ) or 0
        _native.cell_set_future(self._cell, self._address)

    def poll(self) -> bool:
        """Give the guest a fresh time slice (one epoch tick) and run it until it suspends (False) or ends (True)."""
        return _native.poll(self._cell)

    def delete(self) -> None:
        """Drop the future (a suspended guest is abandoned; its fiber is unwound)."""
        if self._address:
            _native.cell_set_future(self._cell, 0)
            _future_delete(self._address)
            self._address = 0
            _OUTCOMES.give_back(self._outcome)

    def outcome(self) -> tuple[int | None, str]:
        """After completion: ``(exit_code, "")`` for a return or ``proc_exit``; ``(None, message)`` for a trap."""
        trap_address, error_address = _OUTCOME.unpack_from(MEMORY, self._outcome)
        if error_address:
            error = ctypes.cast(error_address, POINTER(ffi.wasmtime_error_t))
            status = c_int()
            if ffi.wasmtime_error_exit_status(error, byref(status)):
                ffi.wasmtime_error_delete(error)
                return status.value, ""
            return None, _error_message(error)
        if trap_address:
            return None, _trap_message(ctypes.cast(trap_address, POINTER(ffi.wasm_trap_t)))
        return 0, ""
