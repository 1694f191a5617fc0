"""Engines, stores, instances and the call futures that run a guest's ``_start``."""

from __future__ import annotations

import ctypes
import struct
from ctypes import (
    POINTER,
    byref,
    c_int,
    c_size_t,
    c_uint64,
    c_void_p,
)
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

from kwasm.runtime import _native
from kwasm.runtime.cells import MEMORY, CellPool, GuestCell
from kwasm.runtime.ffi._base import (
    _NULL_FINALIZER,
    _chars,
    _error_message,
    _held,
    _memory_data,
    _memory_data_size,
    _run_to_completion,
    _trap_message,
    held,
)
from kwasm.runtime.ffi.wasi_config import WasiConfig
from kwasm.runtime.settings import EngineSettings

# The header declares this one as returning an error, but the library's function is void.
_epoch_yield = _held.wasmtime_context_epoch_deadline_async_yield_and_update
_epoch_yield.restype = None
_epoch_yield.argtypes = [POINTER(ffi.wasmtime_context_t), c_uint64]



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


class Store:
    """A wasmtime store for one guest; its data is the guest's :class:`GuestCell` (host calls read its key)."""

    # Plain addresses, not ctypes pointer objects: a sleeping guest's store adds no cyclic-GC work.
    __slots__ = ("_address", "_context_address", "cell")

    def __init__(self, engine: wasmtime.Engine, cell: GuestCell) -> None:
        self.cell = cell
        store = held.wasmtime_store_new(engine.ptr(), cell.address, _NULL_FINALIZER)
        self._address = int(c_void_p.from_buffer(store).value or 0)
        self._context_address = int(c_void_p.from_buffer(held.wasmtime_store_context(store)).value or 0)
        _native.cell_set_store(cell.address, self._context_address, 0)

    @property
    def key(self) -> int:
        """The guest's key (what :meth:`HostCall.store_key` returns for its calls)."""
        return self.cell.key

    def bind_outputs(self, stdout_fd: int, stderr_fd: int) -> None:
        """The non-blocking FIFO fds behind the guest's fds 1 and 2 (-1: not a FIFO), for the native fd_write."""
        _native.cell_set_outputs(self.cell.address, stdout_fd, stderr_fd)

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
        err = held.wasmtime_context_set_wasi(self._context, ptr)
        if err:
            raise OSError(_error_message(err))

    def limit_memory(self, max_bytes: int) -> None:
        """Cap the size of every linear memory of this store."""
        held.wasmtime_store_limiter(self._ptr, max_bytes, -1, -1, -1, -1)

    def yield_on_epoch(self) -> None:
        """Make running wasm yield to the scheduler on every engine epoch tick."""
        held.wasmtime_context_set_epoch_deadline(self._context, 1)
        _epoch_yield(self._context, 1)

    def delete(self) -> None:
        """Free the store and everything in it (the call future must be deleted first)."""
        if self._address:
            _native.cell_set_store(self.cell.address, 0, 0)
            _native.cell_set_outputs(self.cell.address, -1, -1)
            ffi.wasmtime_store_delete(self._ptr)
            self._address = 0

    def instantiate(self, pre: InstancePre) -> Instance:
        """Instantiate a pre-linked module in this store (polled to completion, the GIL released)."""
        instance = ffi.wasmtime_instance_t()
        _native.set_running_key(self.key)
        _run_to_completion(
            lambda trap, err: held.wasmtime_instance_pre_instantiate_async(
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
        found = held.wasmtime_instance_export_get(
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
# The call-future functions with plain addresses: no ctypes pointer objects kept per guest. Creating
# a future runs no wasm (the GIL is kept); deleting one unwinds a suspended fiber (it is released).
_call_async = ctypes.PYFUNCTYPE(
    c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_void_p
)(("wasmtime_func_call_async", _held))
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

