"""Native memory for the few bytes per guest that wasmtime reads or writes, without a ctypes object each.

A sleeping guest needs a handful of native bytes: its :class:`GuestCell` (wake-up flag, which
wasmtime polls through libc's ``strlen``, and what the native wake-up path needs) and the two
out-pointers of its call future (trap, error). A ctypes object per value costs ~140 bytes of Python
heap and a cyclic-GC entry; a cell costs only its size and is reused when released. Cells, guest
memory and wasmtime's call frames are all read and written by address through :data:`MEMORY`.
"""

from __future__ import annotations

import ctypes
import struct
import sys
import threading
from collections.abc import Callable

from kwasm.runtime import _native

#: This process's whole address space as one writable byte view (index = address).
MEMORY = memoryview((ctypes.c_char * sys.maxsize).from_address(0)).cast("B")
U32 = struct.Struct("<I")


class CellPool:
    """Fixed-size, zero-initialised cells carved from blocks that are allocated as needed and never freed."""

    def __init__(self, size: int, per_block: int = 4096) -> None:
        self._size = size
        self._per_block = per_block
        self._blocks: list[ctypes.Array[ctypes.c_char]] = []
        self._free: list[int] = []
        self._next = self._end = 0
        self._lock = threading.Lock()

    def take(self) -> int:
        """The address of a zeroed cell, owned by the caller until :meth:`give_back`."""
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._next == self._end:
                block = (ctypes.c_char * (self._size * self._per_block))()
                self._blocks.append(block)
                self._next = ctypes.addressof(block)
                self._end = self._next + self._size * self._per_block
            address = self._next
            self._next += self._size
            return address

    def give_back(self, address: int) -> None:
        """Zero a cell and make it available again (nothing may use ``address`` afterwards)."""
        MEMORY[address : address + self._size] = bytes(self._size)
        with self._lock:
            self._free.append(address)


class GuestCell:
    """A guest's native record (see ``native/kwasm_native.h``): its wake-up flag, current wait and store handles.

    The cell's address is the guest's wasmtime store data, so the native host functions find it
    from any call. Its first byte is the wake-up flag and the second is always 0: the continuation
    of a waiting guest is libc's ``strlen`` on the cell (1 once the flag is set), so polling a
    waiting guest costs no Python callback. Each wait has a sequence number, unique in the process,
    that a timer or fd wake-up must match.
    """

    __slots__ = ("address", "key")

    def __init__(self, key: int) -> None:
        self.key = key
        self.address = _native.cell_new(key)

    def __del__(self, free: Callable[[int], None] = _native.cell_free) -> None:
        free(self.address)  # bound at definition time: still callable while the interpreter shuts down

    def set(self) -> None:
        """Mark the current wait complete."""
        MEMORY[self.address] = 1

    def clear(self) -> None:
        """Mark the current wait pending again."""
        MEMORY[self.address] = 0

    def is_set(self) -> bool:
        """Whether the current wait is complete."""
        return MEMORY[self.address] != 0

    def new_wait(self) -> int:
        """Start a new wait (flag cleared); its sequence number."""
        return _native.cell_new_wait(self.address)

    @property
    def wait(self) -> int:
        """The sequence number of the current wait."""
        return _native.cell_wait(self.address)
