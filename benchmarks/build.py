"""Build the demo app image with kwasm, buildah and docker, from the same Dockerfile, in the same run.

Peers (each timed as a whole process, the way a user runs it; medians over ``--rounds``, tools
interleaved within a round so that machine noise hits them alike):

* ``kwasm build CONTEXT`` into an empty store (store only), and with ``-o image.tar``;
* ``buildah bud --storage-driver vfs`` into a private storage root (no layer cache: buildah's default);
* ``docker build --no-cache`` and ``docker build --no-cache`` + ``docker save -o image.tar`` (the same
  output as ``kwasm build -o``), against a private ``dockerd`` (own data root, exec root, pidfile and
  unix socket; started and stopped by pid through ``tests/services.py``). The engine is Debian's
  docker.io 20.10; docker builds linux/amd64 and buildah the host platform (neither can label a
  scratch image ``wasip1/wasm`` without BuildKit), kwasm the default ``wasip1/wasm``.

Also shown: ``kwasm --version`` (the CLI's start-up alone: interpreter, Typer, every command group's
imports) and kwasm's in-process build time (the library call, without start-up).

Usage: python benchmarks/build.py [--rounds 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from services import running_dockerd  # noqa: E402

from kwasm.image.builder import build_from_dockerfile  # noqa: E402
from kwasm.image.reference import Reference  # noqa: E402
from kwasm.image.store import ImageStore  # noqa: E402

DEMO_DIR = REPO / "examples" / "wasi-demo-app"


def _kwasm_command() -> list[str]:
    """The installed ``kwasm`` script next to this interpreter (not a pyenv shim, which adds ~0.1 s)."""
    script = Path(sysconfig.get_path("scripts")) / "kwasm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kwasm.cli.main"]


def _timed(command: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds one command takes to run to completion; raises with its stderr if it fails."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed


def _in_process(context: Path, root: Path) -> float:
    started = time.perf_counter()
    build_from_dockerfile(ImageStore(root), context, context / "Dockerfile", [Reference.parse("demo:bench")])
    return time.perf_counter() - started


def measure(rounds: int, work: Path, docker_host: str) -> dict[str, list[float]]:
    """Run every peer ``rounds`` times; return their times in seconds."""
    context = work / "wasi-demo-app"
    shutil.copytree(DEMO_DIR, context, ignore=shutil.ignore_patterns("src", "build.sh"))
    kwasm = _kwasm_command()
    # An installed package has byte-compiled modules; this sandbox sets PYTHONDONTWRITEBYTECODE, which would
    # make every kwasm start re-compile its sources. Cache byte code in the work directory instead.
    kwasm_env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    kwasm_env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    docker_env = {**os.environ, "DOCKER_HOST": docker_host, "DOCKER_BUILDKIT": "0"}
    buildah = ["buildah", "--root", str(work / "buildah"), "--runroot", str(work / "buildah-run")]
    buildah += ["--storage-driver", "vfs"]
    results: dict[str, list[float]] = {}
    peers: dict[str, Callable[[int], float]] = {
        "kwasm build": lambda r: _timed([*kwasm, "--root", str(work / f"k{r}"), "build", str(context)], kwasm_env),
        "kwasm build -o tar": lambda r: _timed(
            [*kwasm, "--root", str(work / f"ko{r}"), "build", str(context), "-o", str(work / f"k{r}.tar")], kwasm_env
        ),
        "kwasm --version (start-up only)": lambda r: _timed([*kwasm, "--version"], kwasm_env),
        "kwasm (in-process)": lambda r: _in_process(context, work / f"kp{r}"),
        "buildah bud --storage-driver vfs": lambda r: _timed([*buildah, "bud", "-q", "-t", f"demo:{r}", str(context)]),
        "docker build": lambda r: _timed(
            ["docker", "build", "-q", "--no-cache", "-t", f"demo:b{r}", str(context)], docker_env
        ),
        "docker build + docker save": lambda r: (
            _timed(["docker", "build", "-q", "--no-cache", "-t", f"demo:s{r}", str(context)], docker_env)
            + _timed(["docker", "save", "-o", str(work / f"d{r}.tar"), f"demo:s{r}"], docker_env)
        ),
    }
    for name, run in peers.items():  # warm-up: page cache, dockerd's first build, buildah's storage set-up
        run(999)
        results[name] = []
    for round_number in range(rounds):
        for name, run in peers.items():
            results[name].append(run(round_number))
    return results


def report(results: dict[str, list[float]], as_json: bool) -> None:
    """Print medians, minima and the ratio of each peer to ``kwasm build -o`` (and the targets' verdicts).

    Minima are the best estimate of a tool's own cost on a shared, busy machine; medians include the
    noise of whatever else runs. Both are printed, and the verdicts use both.
    """
    medians = {name: statistics.median(times) for name, times in results.items()}
    minima = {name: min(times) for name, times in results.items()}
    if as_json:
        print(json.dumps({"medians_s": medians, "minima_s": minima, "rounds": results}, indent=2))
        return
    base, base_min = medians["kwasm build -o tar"], minima["kwasm build -o tar"]
    print(f"{'tool':36} {'median':>9} {'min':>9}  ratio to kwasm build -o tar (median / min)")
    for name in results:
        ratio = f"{medians[name] / base:6.2f}x / {minima[name] / base_min:5.2f}x"
        print(f"{name:36} {medians[name]:8.3f}s {minima[name]:8.3f}s  {ratio}")
    for label, peer, ours, target in (
        ("buildah bud", "buildah bud --storage-driver vfs", "kwasm build", ">= 1.0x"),
        ("docker build + save", "docker build + docker save", "kwasm build -o tar", ">= 2x; DESIGN: 10x"),
    ):
        by_median = medians[peer] / medians[ours]
        by_min = minima[peer] / minima[ours]
        print(f"{label} takes {by_median:.2f}x (median) / {by_min:.2f}x (min) as long as {ours} (target: {target})")


def main() -> None:
    """Parse arguments, start a private dockerd, measure, report, stop everything."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds per tool (default 7)")
    parser.add_argument("--json", action="store_true", help="print raw times as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kwasm-bench-build-") as tmp:
        work = Path(tmp)
        with running_dockerd(work / "dockerd") as dockerd:
            results = measure(args.rounds, work, dockerd.base_url)
        report(results, args.json)


if __name__ == "__main__":
    main()
