"""Engine density benchmark: N guests in one process, next to Node.js's ``node:wasi`` holding the same module.

Used by ``kwasm bench engine`` and ``benchmarks/engine.py``. Every guest's stdout is the process's
fd 1, pointed for the run at one 1 MiB pipe that a thread drains every 20 ms (one shared sink, no fd
per guest; reading in batches, like a log collector, keeps the sink from competing with the
scheduler for the GIL at every write). Inside the measured window only cheap counters are read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kwasm.errors import ToolMissingError
from kwasm.runtime.engine import Engine
from kwasm.runtime.guest import GuestSpec, Stdio

#: The demo app's arguments for each mode.
MODES = {"sleep": ["sleep", "3600"], "daemon": ["daemon"]}
_MAPS_PER_GUEST_ESTIMATE = 8


@dataclass
class EngineResult:
    """What ``kwasm bench engine`` reports for kwasm."""

    mode: str
    n: int
    threads: int
    start_per_s: float
    rss_per_guest_kib: float
    pss_per_guest_kib: float
    maps_per_guest: float
    fds_per_guest: float
    wake_lag_p50_ms: float | None
    wake_lag_p99_ms: float | None
    wakeups_per_s: float
    stdout_kib_per_s: float
    cpu_cores: float
    binding_limit: str


@dataclass
class NodeResult:
    """How many instances of the module Node.js's node:wasi held in one process, and at what cost."""

    variant: str
    n: int
    rss_per_instance_kib: float
    seconds: float
    stopped_by: str


def _process_stats() -> dict[str, float]:
    stats: dict[str, float] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                stats["rss"] = int(value.split()[0])
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                stats["pss"] = int(line.split()[1])
    with open("/proc/self/maps") as maps:
        stats["maps"] = sum(1 for _ in maps)
    stats["fds"] = len(os.listdir("/proc/self/fd"))
    return stats


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _sysctl(name: str) -> int:
    return int(Path("/proc/sys", *name.split(".")).read_text())


def ensure_map_count(n: int, announce: Callable[[str], None]) -> str:
    """Make sure ``vm.max_map_count`` fits N guests (raising it as root); say which limit binds."""
    current = _sysctl("vm.max_map_count")
    with open("/proc/self/maps") as maps:
        used = sum(1 for _ in maps)
    needed = used + _MAPS_PER_GUEST_ESTIMATE * n + 1000
    if needed <= current:
        return f"none (vm.max_map_count {current} fits ~{(current - used) // _MAPS_PER_GUEST_ESTIMATE} guests)"
    if os.geteuid() != 0:
        return f"vm.max_map_count {current} binds at ~{(current - used) // _MAPS_PER_GUEST_ESTIMATE} guests"
    target = 1 << (needed - 1).bit_length()
    announce(f"raising vm.max_map_count {current} -> {target} for {n} guests (~7 mappings each; not restored)")
    Path("/proc/sys/vm/max_map_count").write_text(str(target))
    return f"vm.max_map_count (raised {current} -> {target}; not restored)"


#: The sink pipe's size and how long its reader sleeps between reads: it reads in batches (as a log
#: collector would), so it does not compete with the scheduler threads for the GIL at every write.
_SINK_PIPE_BYTES = 1 << 20
_SINK_BATCH_SECONDS = 0.02


@contextlib.contextmanager
def shared_stdout_sink() -> Iterator[list[int]]:
    """Point fd 1 at a pipe drained by a thread for the block; yields [bytes received]."""
    received = [0]
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # unprivileged callers may be capped by fs.pipe-max-size
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _SINK_PIPE_BYTES)
    saved = os.dup(1)
    os.dup2(write_end, 1)
    os.close(write_end)

    def drain() -> None:
        buffer = bytearray(_SINK_PIPE_BYTES)  # reused: no 1 MiB allocation (and mremap) per read
        while count := os.readv(read_end, [buffer]):
            received[0] += count
            time.sleep(_SINK_BATCH_SECONDS)

    thread = threading.Thread(target=drain, name="kwasm-bench-sink", daemon=True)
    thread.start()
    try:
        yield received
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        thread.join(5)
        os.close(read_end)


def _percentile(samples: list[float], fraction: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return round(1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 2)


def measure_engine(
    module: Path,
    n: int,
    mode: str,
    *,
    threads: int | None = None,
    hold: float = 5.0,
    announce: Callable[[str], None] = print,
    progress: Callable[[int], None] = lambda step: None,
) -> EngineResult:
    """Start N demo-app guests in ``mode`` in this process, hold them, measure, then kill them all."""
    limit = ensure_map_count(n, announce)
    with shared_stdout_sink() as received, Engine(threads=threads) as engine:
        spec = GuestSpec(module=module, argv=["wasi-demo-app.wasm", *MODES[mode]], stdout=Stdio.inherit())
        engine.start(spec)  # warm-up: module loaded, memory image created, threads running
        time.sleep(0.5)
        before = _process_stats()
        started = time.monotonic()
        for index in range(n):
            engine.start(spec)
            if index % 1000 == 999:
                progress(1000)
        start_seconds = time.monotonic() - started
        progress(n % 1000)
        time.sleep(min(hold, 2.0))
        # Only cheap reads inside the window: reading smaps_rollup walks every mapping under the
        # process's mmap lock, which would stall the guests' page faults and show up as lag.
        engine.record_wake_lags(True)
        cpu_before, bytes_before, window_start = _cpu_seconds(), received[0], time.monotonic()
        time.sleep(hold)
        window = time.monotonic() - window_start
        cpu_after = _cpu_seconds()
        lags = engine.record_wake_lags(False)
        after = _process_stats()
        out_bytes = received[0] - bytes_before
        running = engine.guest_count - 1
    return EngineResult(
        mode=mode,
        n=running,
        threads=threads or os.cpu_count() or 1,
        start_per_s=round(n / start_seconds, 1),
        rss_per_guest_kib=round((after["rss"] - before["rss"]) / n, 2),
        pss_per_guest_kib=round((after["pss"] - before["pss"]) / n, 2),
        maps_per_guest=round((after["maps"] - before["maps"]) / n, 2),
        fds_per_guest=round((after["fds"] - before["fds"]) / n, 4),
        wake_lag_p50_ms=_percentile(lags, 0.50),
        wake_lag_p99_ms=_percentile(lags, 0.99),
        wakeups_per_s=round(len(lags) / window, 1),
        stdout_kib_per_s=round(out_bytes / 1024 / window, 1),
        cpu_cores=round((cpu_after - cpu_before) / window, 3),
        binding_limit=limit,
    )


NODE_SCRIPT = r"""
const { WASI } = require('node:wasi');
const fs = require('node:fs');
const [path, limitText, budgetText, startText] = process.argv.slice(1);
const runStart = startText === 'start';
const limit = Number(limitText), budget = Number(budgetText) * 1000;
const wasmModule = new WebAssembly.Module(fs.readFileSync(path));
const sink = fs.openSync('/dev/null', 'w');
const held = [];
const base = process.memoryUsage().rss;
const started = Date.now();
let stoppedBy = 'reached n';
const report = (stopped) => console.log(JSON.stringify({
  n: held.length, rss_per_instance_kib: (process.memoryUsage().rss - base) / 1024 / Math.max(held.length, 1),
  seconds: (Date.now() - started) / 1000, stopped_by: stopped }));
for (let i = 0; i < limit; i++) {
  if (i % 1000 === 999) report('crashed');
  if (Date.now() - started > budget) { stoppedBy = 'time budget'; break; }
  try {
    const wasi = new WASI({ version: 'preview1', args: ['wasi-demo-app.wasm', 'echo', 'hi'], env: {},
                            stdout: sink, returnOnExit: true });
    const instance = new WebAssembly.Instance(wasmModule, wasi.getImportObject());
    if (runStart) wasi.start(instance);
    held.push(instance);
  } catch (error) { stoppedBy = String(error.message || error).split('\n')[0]; break; }
}
report(stoppedBy);
"""


def measure_node(module: Path, n: int, *, run_start: bool, budget_seconds: float = 120.0) -> NodeResult:
    """Instantiate the module up to N times in one ``node`` process with node:wasi; keep every instance.

    node:wasi is synchronous: a guest in ``sleep`` blocks Node's only thread, so with ``run_start``
    each instance runs ``echo`` to completion (initialising its memory like a live guest) and is then
    held; without it, instances are only created (Node's ceiling on instances per process).
    """
    node = shutil.which("node")
    if node is None:
        raise ToolMissingError("node is not installed (apt-get install nodejs)")
    variant = "ran echo, held" if run_start else "instantiated, held"
    result = subprocess.run(
        [node, "--no-warnings", "--no-concurrent-marking", "-e", NODE_SCRIPT, str(module), str(n), str(budget_seconds),
         "start" if run_start else "hold"],
        capture_output=True, text=True, timeout=budget_seconds + 120,
    )
    lines = result.stdout.strip().splitlines()
    if not lines:
        reason = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        return NodeResult(variant, 0, 0.0, 0.0, f"node failed: {reason}")
    data = json.loads(lines[-1])  # node reports every 1000 instances, so a crash still leaves a figure
    stopped = str(data["stopped_by"])
    if stopped == "crashed":
        stopped = f"node crashed (exit {result.returncode}) after this many instances"
    rss = round(float(data["rss_per_instance_kib"]), 2)
    return NodeResult(variant, int(data["n"]), rss, float(data["seconds"]), stopped)
