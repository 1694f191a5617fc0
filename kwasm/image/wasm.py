"""Checking a WebAssembly module before it is packaged into an image.

A module is accepted when it is a core wasm binary (magic ``\\0asm``, version 1), passes wasmtime's
validator (``wasmtime.Module.validate`` with a plain ``wasmtime.Engine``: the full check the compiler
runs before it generates code, with the engine's default features), and exports the function the image
will start: ``_start`` for a WASI command, or the ``func`` of a runwasi-style ``module.wasm#func``
entrypoint. Machine code is not generated here, since ``kwasm run`` compiles (and caches) the module
itself; skipping it keeps ``kwasm build`` quick (about 2 ms instead of 70-100 ms for the demo app).

Every refusal is one :class:`~kwasm.errors.WasmValidationError` line naming the file and the reason.
"""

from __future__ import annotations

from kwasm.errors import WasmValidationError

WASM_MAGIC = b"\0asm"
CORE_MODULE_VERSION = b"\x01\x00\x00\x00"
COMMAND_EXPORT = "_start"
_EXPORT_SECTION = 7
_FUNCTION_KIND = 0


def _leb128(data: bytes, position: int) -> tuple[int, int]:
    """Decode an unsigned LEB128 number at ``position``; return it and the position after it."""
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def exported_functions(data: bytes) -> list[str]:
    """Names of the functions a (validated) core module exports, in export-section order."""
    position = 8
    while position < len(data):
        section_id = data[position]
        size, position = _leb128(data, position + 1)
        if section_id == _EXPORT_SECTION:
            names = []
            count, cursor = _leb128(data, position)
            for _ in range(count):
                length, cursor = _leb128(data, cursor)
                name = data[cursor : cursor + length].decode("utf-8")
                kind = data[cursor + length]
                _, cursor = _leb128(data, cursor + length + 1)
                if kind == _FUNCTION_KIND:
                    names.append(name)
            return names
        position += size
    return []


def _validation_failure(name: str, error: Exception) -> WasmValidationError:
    """One line from a wasmtime validation error: its most specific (last) line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = lines[-1] if lines else type(error).__name__
    if "end-of-file" in cause or "unexpected end" in cause:
        return WasmValidationError(f"{name}: truncated module ({cause})")
    return WasmValidationError(f"{name}: wasmtime rejects it: {cause}")


def validate_module(data: bytes, name: str, entry: str = COMMAND_EXPORT) -> None:
    """Refuse ``data`` (shown to the user as ``name``) unless it is a valid core module exporting ``entry``."""
    if data[:4] != WASM_MAGIC:
        raise WasmValidationError(f"{name}: not a WebAssembly binary (it does not start with \\0asm)")
    if len(data) < 8:
        raise WasmValidationError(f"{name}: truncated module ({len(data)} bytes, shorter than the header)")
    if data[4:8] != CORE_MODULE_VERSION:
        if data[6:8] == b"\x01\x00":
            raise WasmValidationError(f"{name}: is a WebAssembly component (wasip2); kwasm runs core modules (wasip1)")
        raise WasmValidationError(f"{name}: unsupported wasm binary version {data[4:8].hex()}")
    import wasmtime  # here, not at module level: only builds need it, and it takes a while to load

    try:
        wasmtime.Module.validate(wasmtime.Engine(), data)
    except wasmtime.WasmtimeError as exc:
        raise _validation_failure(name, exc) from None
    functions = exported_functions(data)
    if entry not in functions:
        what = "a WASI command must export _start" if entry == COMMAND_EXPORT else "the entrypoint names it"
        exported = ", ".join(sorted(functions)) or "none"
        raise WasmValidationError(
            f"{name}: does not export function {entry!r} ({what}; exported functions: {exported})"
        )
