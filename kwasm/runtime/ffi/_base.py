"""What the modules of :mod:`kwasm.runtime.ffi` share: raw bindings, pointer helpers, error text.

Also hands the native hot path (:mod:`kwasm.runtime._native`) the wasmtime and libc function
addresses it calls, once, at import.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from ctypes import (
    POINTER,
    byref,
    c_char,
    c_char_p,
    c_size_t,
    c_void_p,
)
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

from kwasm.runtime import _native

_NULL_FINALIZER = ctypes.CFUNCTYPE(None, c_void_p)(0)
_ERRNO_IO = 29

# Short, non-blocking calls, bound through PyDLL so they keep the GIL: releasing it for a few
# nanoseconds of work would hand it to another scheduler thread at every call.
_held = ctypes.PyDLL(ffi.dll._name)


class _HoldingGil:
    """wasmtime's C functions by name, with wasmtime-py's argument types, called without releasing the GIL.

    wasmtime-py binds them through ``CDLL``, which releases the GIL around every call. Starting a
    guest makes ~15 such calls of a few microseconds each; every release lets a scheduler thread
    take the GIL, and the starting thread (the sandboxer's event loop) then waits to get it back.
    The instantiation itself still releases it (:func:`_run_to_completion`): once per start is the
    scheduler threads' turn to run the guests already started.
    """

    def __getattr__(self, name: str) -> Any:
        released = getattr(ffi.dll, name)
        held = getattr(_held, name)
        held.argtypes, held.restype = released.argtypes, released.restype
        setattr(self, name, held)
        return held


#: ``held.wasmtime_store_new(...)`` etc.: see :class:`_HoldingGil`.
held = _HoldingGil()
_memory_data = _held.wasmtime_memory_data
_memory_data.restype = c_void_p
_memory_data.argtypes = [c_void_p, c_void_p]
_memory_data_size = _held.wasmtime_memory_data_size
_memory_data_size.restype = c_size_t
_memory_data_size.argtypes = [c_void_p, c_void_p]


def _array_pointer(items: Any) -> Any:
    """A ``char **`` to a ``c_char_p`` array (cast from its address: casting the array itself makes a ref cycle)."""
    return ctypes.cast(ctypes.addressof(items), POINTER(POINTER(c_char)))


def _chars(data: bytes) -> Any:
    return ctypes.cast(c_char_p(data), POINTER(c_char))


def _address(function: Any) -> int:
    return int(ctypes.cast(function, c_void_p).value or 0)



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


def _run_to_completion(start: Callable[[Any, Any], Any]) -> None:
    """Start a call future with ``start(trap_out, error_out)`` and poll it until it completes.

    The GIL is released while polling: wasm run by the future may call wasmtime's built-in WASI
    functions, which hand output to Python callbacks on threads of their own, and a starting thread
    that kept it through instantiation would starve the scheduler threads during a burst of starts
    (measured: 50,000 daemons' wake-up lag p99 0.84 s instead of 16 ms).
    """
    trap = POINTER(ffi.wasm_trap_t)()
    err = POINTER(ffi.wasmtime_error_t)()
    future = start(byref(trap), byref(err))
    while not ffi.wasmtime_call_future_poll(future):
        pass
    held.wasmtime_call_future_delete(future)
    if err:
        raise OSError(_error_message(err))
    if trap:
        raise OSError(_trap_message(trap))


_FLAG_IS_SET = _address(ctypes.CDLL(None).strlen)
_VAL_SIZE = ctypes.sizeof(ffi.wasmtime_val_t)
_VAL_OF = ffi.wasmtime_val_t.of.offset
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
