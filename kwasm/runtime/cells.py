"""Native memory for the few bytes per guest that wasmtime reads or writes, without a ctypes object each.

A sleeping guest needs a handful of native bytes: its wake-up flag (which wasmtime polls through
libc's ``strlen``) and the two out-pointers of its call future (trap, error). A ctypes object per
value costs ~140 bytes of Python heap and a cyclic-GC entry; a cell from a :class:`CellPool` costs
only its size and is reused when released. Cells, guest memory and wasmtime's call frames are all
read and written by address through :data:`MEMORY` with ``struct``.
"""

from __future__ import annotations

import ctypes
import struct
import sys
import threading
from collections.abc import Callable

#: This process's whole address space as one writable byte view (index = address).
MEMORY = memoryview((ctypes.c_char * sys.maxsize).from_address(0)).cast("B")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


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


#: Two bytes per flag: the flag and the NUL that ends it for ``strlen``.
_FLAGS = CellPool(2)


class ReadyFlag:
    """A one-byte flag wasmtime polls natively: a wait completes once the scheduler sets it.

    The continuation callback for a flag is libc's ``strlen`` on the flag's two bytes (1 when set,
    0 when clear), so polling a waiting guest costs no Python callback.
    """

    __slots__ = ("address",)

    def __init__(self) -> None:
        self.address = _FLAGS.take()

    def __del__(self, give_back: Callable[[int], None] = _FLAGS.give_back) -> None:
        give_back(self.address)  # bound at definition time: still callable while the interpreter shuts down

    def set(self) -> None:
        """Mark the wait complete."""
        MEMORY[self.address] = 1

    def clear(self) -> None:
        """Start a new wait."""
        MEMORY[self.address] = 0

    def is_set(self) -> bool:
        """Whether the wait is complete."""
        return MEMORY[self.address] != 0
