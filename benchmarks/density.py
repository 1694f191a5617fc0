"""Sandbox density of ``kwasm sandboxer``, driven through its sockets as iSulad drives a sandboxer.

Each pod: Controller.Create (serialized PodSandboxConfig, empty type_url) -> Start -> Update
(``extensions.tasks``) -> Task.Create -> Task.Start of the demo app, ``--window`` pods in flight.
The pods are then held and the sandboxer's RSS and open descriptors are read from /proc; the
sandboxer's CPU per pod (from /proc/<pid>/stat around the start phase) is printed with the pods per
second one core of it sustains.

Scenarios (each against a fresh private sandboxer unless ``--listen`` names a running one):

* ``sleep``: N sleeping guests, empty stdio (iSulad's CRI path): the 100k-sandbox target;
* ``fifo``: N sleeping guests whose stdout FIFO the benchmark holds open and drains;
* ``daemon``: N guests printing a verse every second (stdout discarded), at the N the CPU sustains.

The peer is Kuasar's wasm-sandboxer, which cannot run here; its published figure is 1.9 MB per
sandbox (100k sandboxes, 183.3 GB), printed next to ours with the ratio.

Usage: python benchmarks/density.py [--sleep 10000] [--fifo 2000] [--daemon 2000] [--window 32] [--json]
Set a count to 0 to skip that scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
from pathlib import Path

from kwasm.sandboxer.density import KUASAR_KIB_PER_SANDBOX, DensityResult, run_density, scratch_dir
from kwasm.sandboxer.launch import running_sandboxer

REPO = Path(__file__).resolve().parents[1]
DEMO_WASM = REPO / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"


def scenario(n: int, mode: str, fifo: bool, window: int, listen: str) -> DensityResult:
    """Run one scenario on a private sandboxer (or the one at ``listen``)."""
    work = scratch_dir()
    try:
        if listen:
            return asyncio.run(run_density(Path(listen), work, DEMO_WASM, n, mode=mode, fifo=fifo, window=window))
        with running_sandboxer(work / "sandboxer") as sandboxer:
            return asyncio.run(
                run_density(sandboxer.listen, work, DEMO_WASM, n, mode=mode, fifo=fifo, window=window, cleanup=False)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    """Run the chosen scenarios and print them next to Kuasar's published figure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sleep", type=int, default=10000, help="sleeping guests, empty stdio")
    parser.add_argument("--fifo", type=int, default=2000, help="sleeping guests with drained stdout FIFOs")
    parser.add_argument("--daemon", type=int, default=2000, help="guests printing every second")
    parser.add_argument("--window", type=int, default=32, help="pods in flight at once")
    parser.add_argument("--listen", default="", help="drive this running sandboxer instead of a private one")
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario")
    args = parser.parse_args()
    plan = [(args.sleep, "sleep", False), (args.fifo, "sleep", True), (args.daemon, "daemon", False)]
    results = [scenario(n, mode, fifo, args.window, args.listen) for n, mode, fifo in plan if n > 0]
    if args.json:
        for result in results:
            print(result.to_json())
        return
    print(f"{'scenario':14} {'n':>7} {'KiB/sbx':>8} {'Kuasar':>8} {'ratio':>6} {'start/s':>8} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'srv ms/pod':>10} {'pods/s/core':>11} {'fds/sbx':>8} {'running':>8}")
    for r in results:
        name = f"{r.mode}/{r.stdout}"
        ratio = KUASAR_KIB_PER_SANDBOX / max(r.rss_per_sandbox_kib, 0.001)
        print(f"{name:14} {r.n:>7} {r.rss_per_sandbox_kib:>8.1f} {KUASAR_KIB_PER_SANDBOX:>8.0f} {ratio:>5.0f}x "
              f"{r.start_per_s:>8.0f} {r.latency_p50_ms:>8.1f} {r.latency_p99_ms:>8.1f} "
              f"{r.server_cpu_ms_per_pod:>10.3f} {r.capacity_per_core:>11.0f} {r.fds_per_sandbox:>8.2f} {r.running:>8}")
    print(json.dumps({"kuasar_note": "published figure, not measured here (Kuasar cannot run on this machine)"}))


if __name__ == "__main__":
    main()
