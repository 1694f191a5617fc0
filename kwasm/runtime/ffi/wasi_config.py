"""WASI contexts under construction: argv, env, preopens and stdio (:class:`WasiConfig`)."""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Callable
from ctypes import (
    POINTER,
    c_char_p,
    c_size_t,
    c_ssize_t,
    c_ubyte,
    c_void_p,
)
from typing import Any

from wasmtime import _ffi as ffi

from kwasm.runtime.ffi._base import _array_pointer, _chars, held

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


#: Recently used string lists as C ``char **`` (wasmtime copies them): many guests share argv and env.
_C_STRINGS: dict[tuple[str, ...], tuple[Any, Any]] = {}
_C_STRINGS_KEPT = 256


def _c_strings(items: tuple[str, ...]) -> tuple[Any, Any]:
    """``(array, char **)`` for ``items`` (UTF-8): hold the pair while the pointer is in use."""
    cached = _C_STRINGS.get(items)
    if cached is None:
        if len(_C_STRINGS) >= _C_STRINGS_KEPT:
            _C_STRINGS.clear()
        array = (c_char_p * len(items))(*(item.encode() for item in items))
        cached = _C_STRINGS[items] = (array, _array_pointer(array))
    return cached


class WasiConfig:
    """A WASI context under construction (consumed by :meth:`Store.set_wasi`)."""

    __slots__ = ("_ptr",)

    def __init__(self) -> None:
        self._ptr: Any = held.wasi_config_new()

    def discard(self) -> None:
        """Free a configuration that will not be installed."""
        if self._ptr:
            held.wasi_config_delete(self._ptr)
            self._ptr = None

    def argv(self, argv: list[str]) -> None:
        """Set the program arguments (``argv[0]`` first)."""
        strings = _c_strings(tuple(argv))  # held here: another thread may empty the cache meanwhile
        if not held.wasi_config_set_argv(self._ptr, len(argv), strings[1]):
            raise ValueError("invalid argv")

    def env(self, env: dict[str, str]) -> None:
        """Set the environment."""
        names, values = _c_strings(tuple(env)), _c_strings(tuple(env.values()))
        if not held.wasi_config_set_env(self._ptr, len(env), names[1], values[1]):
            raise ValueError("invalid environment")

    def stdin_file(self, path: str) -> None:
        """Read stdin from a file (opened now)."""
        if not ffi.wasi_config_set_stdin_file(self._ptr, c_char_p(path.encode())):
            raise OSError(f"cannot open {path} for reading")

    def inherit_stdin(self) -> None:
        """Use this process's stdin."""
        held.wasi_config_inherit_stdin(self._ptr)

    def inherit_output(self, fd: int) -> None:
        """Write stdout (fd 1) or stderr (fd 2) to this process's own stream (no new fd)."""
        (held.wasi_config_inherit_stdout if fd == 1 else held.wasi_config_inherit_stderr)(self._ptr)

    def output_callback(self, fd: int, callback: Callable[[bytes], None]) -> None:
        """Hand every chunk written to stdout (fd 1) or stderr (fd 2) to ``callback``."""
        key = next(_output_keys)
        _outputs[key] = callback
        setter = held.wasi_config_set_stdout_custom if fd == 1 else held.wasi_config_set_stderr_custom
        setter(self._ptr, _write_output, key, _forget_output)

    def preopen(self, host_path: str, guest_path: str, *, read_only: bool) -> None:
        """Give the guest ``host_path`` as ``guest_path`` (wasmtime confines it there)."""
        if not ffi.wasi_config_preopen_dir(
            self._ptr, _chars(host_path.encode()), _chars(guest_path.encode()), not read_only
        ):
            raise OSError(f"cannot open directory {host_path}")

