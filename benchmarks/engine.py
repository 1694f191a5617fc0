"""Density of kwasm's in-process engine, next to Node.js's built-in WASI (``node:wasi``), in the same run.

Scenarios (each in a fresh child process, so one does not inherit the other's memory):

* ``sleep``: N demo-app guests in ``sleep 3600`` (the 100,000-guest / <= 48 KiB target);
* ``daemon``: N demo-app guests printing a verse every second into one shared pipe (the 50,000-guest,
  wake-up lag p99 < 100 ms target).

Node.js: one ``node`` process instantiating the same module with ``node:wasi`` as often as it can
(up to the sleep N): once running ``echo`` in each instance, once only instantiating (node:wasi is
synchronous, so it cannot hold sleeping guests at all).

Usage: python benchmarks/engine.py [--sleep 100000] [--daemon 50000] [--hold 10] [--threads N] [--json]
Set a count to 0 to skip that scenario. As root, vm.max_map_count is raised if N needs it (not restored).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def kwasm_bench(n: int, mode: str, hold: float, threads: int) -> dict[str, Any]:
    """Run ``kwasm bench engine`` (without Node) in a child process and return its JSON."""
    result = subprocess.run(
        [sys.executable, "-m", "kwasm.cli.main", "bench", "engine", "--n", str(n), "--mode", mode,
         "--hold", str(hold), "--threads", str(threads), "--no-node", "--json"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    sys.stderr.write(result.stderr)
    data: dict[str, Any] = json.loads(result.stdout)["kwasm"]
    return data


def main() -> None:
    """Run the scenarios and print kwasm's and Node's figures side by side."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sleep", type=int, default=100_000, help="sleeping guests (0: skip)")
    parser.add_argument("--daemon", type=int, default=50_000, help="daemon guests (0: skip)")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds to measure CPU and lag over")
    parser.add_argument("--threads", type=int, default=0, help="scheduler threads (0: one per core)")
    parser.add_argument("--node-budget", type=float, default=150.0, help="seconds Node may spend instantiating")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()

    from kwasm.runtime.benchmark import measure_node

    module = REPO / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"
    report: dict[str, Any] = {}
    if args.sleep:
        report["sleep"] = kwasm_bench(args.sleep, "sleep", args.hold, args.threads)
    if args.daemon:
        report["daemon"] = kwasm_bench(args.daemon, "daemon", args.hold, args.threads)
    limit = max(args.sleep, args.daemon, 1)
    report["node"] = [
        measure_node(module, limit, run_start=run_start, budget_seconds=args.node_budget).__dict__
        for run_start in (True, False)
    ]
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for scenario in ("sleep", "daemon"):
        if scenario in report:
            ours = report[scenario]
            print(f"kwasm {scenario:6}: n={ours['n']} start={ours['start_per_s']}/s "
                  f"rss={ours['rss_per_guest_kib']} KiB "
                  f"pss={ours['pss_per_guest_kib']} KiB maps={ours['maps_per_guest']} fds={ours['fds_per_guest']} "
                  f"lag p50={ours['wake_lag_p50_ms']} ms p99={ours['wake_lag_p99_ms']} ms "
                  f"wakeups={ours['wakeups_per_s']}/s cpu={ours['cpu_cores']} cores; limit: {ours['binding_limit']}")
    for peer in report["node"]:
        print(f"node:wasi ({peer['variant']}): n={peer['n']} rss={peer['rss_per_instance_kib']} KiB "
              f"in {peer['seconds']} s; stopped by: {peer['stopped_by']}")
    if "sleep" in report:
        ours = report["sleep"]
        for peer in report["node"]:
            print(f"ratio vs node ({peer['variant']}): instances {ours['n'] / max(peer['n'], 1):.1f}x, "
                  f"RSS per instance {peer['rss_per_instance_kib'] / max(ours['rss_per_guest_kib'], 0.001):.2f}x")


if __name__ == "__main__":
    main()
