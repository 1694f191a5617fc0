"""The wasmtime engine settings kwasm uses (see docs/engine.md); part of the compiled-module cache key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib.metadata import version

#: wasmtime-py's version: part of every compiled-module cache key.
WASMTIME_VERSION: str = version("wasmtime")


@dataclass(frozen=True)
class EngineSettings:
    """The wasmtime engine configuration kwasm uses; part of the compiled-module cache key."""

    memory_reservation: int = 4 << 20
    memory_guard_size: int = 64 << 10
    memory_reservation_for_growth: int = 0
    max_wasm_stack: int = 128 << 10
    async_stack_size: int = 256 << 10
    epoch_interruption: bool = True
    memory_init_cow: bool = True

    def digest(self) -> str:
        """A short stable hash of these settings and the wasmtime version."""
        text = json.dumps({"wasmtime": WASMTIME_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
