"""Async host functions: :class:`HostCall`, :func:`define_async` and the continuations wasmtime polls."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from ctypes import (
    POINTER,
    byref,
    c_char_p,
    c_size_t,
    c_void_p,
)
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

from kwasm.runtime import _native
from kwasm.runtime.cells import MEMORY, U32, GuestCell
from kwasm.runtime.ffi._base import (
    _ERRNO_IO,
    _FLAG_IS_SET,
    _NULL_FINALIZER,
    _VAL_OF,
    _VAL_SIZE,
    _address,
    _chars,
    _error_message,
    _run_to_completion,
)

#: A continuation: called on every poll of a suspended host call; True once the call is complete.
Continuation = Callable[[], bool]

_CONTINUATION = struct.Struct("<QQQ")  # wasmtime_async_continuation_t: callback, env, finalizer


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


_ALWAYS_READY = _address(_always_ready)
_CONTINUE = _address(_continue)
_ARGS4 = struct.Struct(f"<{_VAL_OF}x" + f"I{_VAL_SIZE - 4}x" * 3 + "I")
_RESULT = struct.Struct(f"<B{_VAL_OF - 1}xi")
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
