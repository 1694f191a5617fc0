"""The one package that touches ``wasmtime._ffi``: a small typed API over wasmtime's async C API.

wasmtime-py wraps only the synchronous API; its private ``_ffi`` module carries ctypes bindings for
the async one (async host functions, async instantiation, call futures, epoch yields). Everything
kwasm needs from it lives in this package, so a wasmtime upgrade is this package's work (and
``native/``'s, which gets its wasmtime function addresses from here). ``wasmtime`` is pinned to one
major version in pyproject.toml for that reason.

* :mod:`.hostcalls` — async host functions (:class:`HostCall`, :func:`define_async`, linkers);
* :mod:`.store` — engines, stores, instances, ``InstancePre`` and call futures;
* :mod:`.wasi_config` — WASI contexts (:class:`WasiConfig`).
"""

from kwasm.runtime.ffi._base import summarize as summarize
from kwasm.runtime.ffi.hostcalls import AsyncHostFunction as AsyncHostFunction
from kwasm.runtime.ffi.hostcalls import Continuation as Continuation
from kwasm.runtime.ffi.hostcalls import HostCall as HostCall
from kwasm.runtime.ffi.hostcalls import define_async as define_async
from kwasm.runtime.ffi.hostcalls import forget_pending as forget_pending
from kwasm.runtime.ffi.hostcalls import new_linker as new_linker
from kwasm.runtime.ffi.store import CallFuture as CallFuture
from kwasm.runtime.ffi.store import Instance as Instance
from kwasm.runtime.ffi.store import InstancePre as InstancePre
from kwasm.runtime.ffi.store import Store as Store
from kwasm.runtime.ffi.store import memory_region as memory_region
from kwasm.runtime.ffi.store import memory_size as memory_size
from kwasm.runtime.ffi.store import new_engine as new_engine
from kwasm.runtime.ffi.store import pin_exports as pin_exports
from kwasm.runtime.ffi.store import unpin_exports as unpin_exports
from kwasm.runtime.ffi.wasi_config import WasiConfig as WasiConfig
