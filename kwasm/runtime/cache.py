"""The on-disk cache of compiled modules, shared by every kwasm process on the machine.

An entry is keyed by the module's sha256, the wasmtime version and the engine settings. Each file
starts with a header carrying the sha256 of the compiled code; an entry whose code does not match
(truncated, corrupt, tampered with) is recompiled and rewritten, never handed to wasmtime.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import platformdirs
import wasmtime

from kwasm.errors import WasmValidationError
from kwasm.runtime.settings import EngineSettings

_MAGIC = b"KWASM-CWASM-1 "
WASM_MAGIC = b"\0asm"


def default_cache_dir() -> Path:
    """/var/cache/kwasm/modules for root, else the user's cache dir (platformdirs)."""
    if os.geteuid() == 0:
        return Path("/var/cache/kwasm/modules")
    return Path(platformdirs.user_cache_dir("kwasm")) / "modules"


class ModuleCache:
    """Compile a module once per (content, wasmtime, settings); later loads deserialize the cached code."""

    def __init__(self, engine: wasmtime.Engine, settings: EngineSettings, directory: Path) -> None:
        self._engine = engine
        self._settings = settings.digest()
        self.directory = directory
        #: How the last :meth:`load` got its module: "compiled", "cached" or "recompiled" (corrupt entry).
        self.last_source = ""

    def entry_path(self, wasm_digest: str) -> Path:
        """Where the compiled form of the module with this sha256 (hex) lives."""
        return self.directory / f"{wasm_digest}-{self._settings}.cwasm"

    def load(self, path: Path) -> tuple[str, wasmtime.Module]:
        """``(sha256 hex, module)`` for the .wasm at ``path``; raises WasmValidationError if it is not one."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise WasmValidationError(f"cannot read {path}: {exc.strerror}") from None
        if not data.startswith(WASM_MAGIC):
            raise WasmValidationError(f"{path} is not a WebAssembly module (no \\0asm header)")
        digest = hashlib.sha256(data).hexdigest()
        entry = self.entry_path(digest)
        cached = self._read_entry(entry)
        if cached is not None:
            try:
                module = wasmtime.Module.deserialize(self._engine, cached)
                self.last_source = "cached"
                return digest, module
            except wasmtime.WasmtimeError:
                pass
        try:
            module = wasmtime.Module(self._engine, data)
        except wasmtime.WasmtimeError as exc:
            reason = str(exc).strip().splitlines()[0]
            raise WasmValidationError(f"{path} is not a valid WebAssembly module: {reason}") from None
        self.last_source = "recompiled" if entry.exists() else "compiled"
        self._write_entry(entry, bytes(module.serialize()))
        return digest, module

    @staticmethod
    def _read_entry(entry: Path) -> bytes | None:
        try:
            raw = entry.read_bytes()
        except OSError:
            return None
        header, _, payload = raw.partition(b"\n")
        if not header.startswith(_MAGIC) or header[len(_MAGIC) :].decode(errors="replace") != (
            hashlib.sha256(payload).hexdigest()
        ):
            return None
        return payload

    def _write_entry(self, entry: Path, payload: bytes) -> None:
        header = _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(header + payload)
                os.replace(tmp, entry)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:  # a read-only or full cache dir only costs a recompile next time
            pass
