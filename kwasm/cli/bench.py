"""kwasm CLI command group: bench."""

from __future__ import annotations

import typer

app = typer.Typer()


# --- density (sandboxer engineer) ---------------------------------------------------------------


@app.command("density")
def density(
    n: int = typer.Option(1000, "--n", "-n", help="Sandboxes to start (each: 1 sandbox + 1 running task)."),
    mode: str = typer.Option("sleep", "--mode", help="Guest: sleep (idle) or daemon (prints every second)."),
    fifo: bool = typer.Option(False, "--fifo", help="Give each task a stdout FIFO that the benchmark drains."),
    listen: str = typer.Option("", "--listen", help="Drive this running sandboxer (default: start a private one)."),
    window: int = typer.Option(64, "--window", help="Pods in flight at once."),
    hold: float = typer.Option(3.0, "--hold", help="Seconds to hold the pods before measuring."),
    wait: bool = typer.Option(False, "--wait", help="Keep a Controller.Wait open per pod, as iSulad does."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Start N sandboxes through the sandboxer's sockets (as iSulad would) and report memory, fds and rate.

    Prints n, rss_per_sandbox_kib, start_per_s, create->running latency p50/p99, fds per sandbox and
    the sandboxer's own CPU per pod with the pods/s one core of it sustains, next to Kuasar's
    published 1.9 MB per sandbox.

    Example:  kwasm bench density --n 10000 --mode sleep
    """
    import asyncio
    import shutil
    from pathlib import Path

    from rich.progress import Progress

    from kwasm.cli.output import console, info, print_json
    from kwasm.errors import UsageError
    from kwasm.runtime.benchmark import ensure_map_count
    from kwasm.sandboxer.density import GUEST_ARGS, DensityResult, run_density, scratch_dir
    from kwasm.sandboxer.launch import running_sandboxer

    if mode not in GUEST_ARGS:
        raise UsageError(f"--mode must be one of {', '.join(GUEST_ARGS)}")
    if n < 1 or window < 1:
        raise UsageError("--n and --window must be positive")
    module = Path(__file__).resolve().parents[2] / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"
    if not module.is_file():
        raise UsageError(f"demo app not found at {module}")
    limit = ensure_map_count(n, info)  # each sandbox's guest maps ~7 regions in the sandboxer
    if limit.startswith("vm.max_map_count") and "raised" not in limit:
        info(f"{limit} in the sandboxer: run as root or `sysctl -w vm.max_map_count=1048576` first")
    work = scratch_dir()
    try:
        with Progress(console=console, transient=True, disable=as_json) as bar:
            task = bar.add_task(f"starting {n} sandboxes", total=n)

            def measure(socket: Path, cleanup: bool) -> DensityResult:
                return asyncio.run(run_density(
                    socket, work, module, n, mode=mode, fifo=fifo, window=window, hold=hold, cleanup=cleanup, wait=wait,
                    progress=lambda step: bar.advance(task, step),
                ))

            if listen:
                result = measure(Path(listen), True)
            else:
                with running_sandboxer(work / "sandboxer") as sandboxer:
                    result = measure(sandboxer.listen, False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data = result.__dict__
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        console.print(f"{key:28} {value}")
    ratio = data["kuasar_kib_per_sandbox"] / max(data["rss_per_sandbox_kib"], 0.001)
    console.print(f"{'vs Kuasar (1.9 MB/sandbox)':28} {ratio:.0f}x less memory per sandbox")


# --- engine (engine engineer) -------------------------------------------------------------------


@app.command("engine")
def engine_bench(
    n: int = typer.Option(10000, "--n", "-n", help="Guests to start in this process."),
    mode: str = typer.Option("sleep", "--mode", help="Guest: sleep (sleep 3600) or daemon (prints every second)."),
    threads: int = typer.Option(0, "--threads", help="Scheduler threads (default: one per core)."),
    hold: float = typer.Option(5.0, "--hold", help="Seconds to measure CPU and wake-up lag over."),
    node: bool = typer.Option(True, "--node/--no-node", help="Also measure Node.js node:wasi in the same run."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Start N demo-app guests on the in-process engine and report density, start rate, lag and CPU.

    Prints n, start_per_s, rss_per_guest_kib, wake-up lag p50/p99 and CPU cores used, next to
    Node.js's node:wasi holding as many instances of the same module as it can in one process.

    Example:  kwasm bench engine --n 20000 --mode daemon
    """
    from pathlib import Path

    from rich.progress import Progress

    from kwasm.cli.output import console, err_console, info, print_json
    from kwasm.errors import UsageError
    from kwasm.runtime.benchmark import MODES, measure_engine, measure_node

    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}")
    if n < 1:
        raise UsageError("--n must be positive")
    module = Path(__file__).resolve().parents[2] / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"
    if not module.is_file():
        raise UsageError(f"demo app not found at {module}")
    with Progress(console=err_console, transient=True, disable=as_json) as bar:
        task = bar.add_task(f"starting {n} {mode} guests", total=n)
        ours = measure_engine(
            module, n, mode, threads=threads or None, hold=hold, announce=info,
            progress=lambda step: bar.advance(task, step),
        )
    peers = [measure_node(module, n, run_start=run_start) for run_start in (True, False)] if node else []
    if as_json:
        print_json({"kwasm": ours.__dict__, "node": [peer.__dict__ for peer in peers]})
        return
    for key, value in ours.__dict__.items():
        console.print(f"{key:22} {value}")
    for peer in peers:
        ratio = peer.rss_per_instance_kib / max(ours.rss_per_guest_kib, 0.001)
        console.print(
            f"node:wasi ({peer.variant}): {peer.n} instances in one process, {peer.rss_per_instance_kib} KiB RSS "
            f"each ({ratio:.2f}x kwasm's), stopped by: {peer.stopped_by}; kwasm held {ours.n} "
            f"({ours.n / max(peer.n, 1):.1f}x)"
        )
