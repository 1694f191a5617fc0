"""Push and pull wasm images with kwasm and with skopeo, to the same local registry, in the same run.

Images: the demo app (about 100 kB) and a 20 MiB wasm module (the demo app plus a 20 MiB custom
section), both built by ``kwasm build`` into the store and into an OCI layout that skopeo reads.
Every measurement starts from an empty registry storage (so nothing is skipped or cross-mounted)
and, for pulls, an empty destination. Timed: the whole process, as a user runs it
(``kwasm push``/``pull`` vs ``skopeo copy --preserve-digests``, so both move the same bytes);
also shown: kwasm's in-process library time, without interpreter start-up, and the start-up floor
(``python -c pass`` and ``kwasm --version`` with the same interpreter). One untimed warm-up round
per image comes first (page cache, byte code).

kwasm runs with byte-compiled modules, as an installed package has them: this sandbox sets
PYTHONDONTWRITEBYTECODE, which would make every ``kwasm`` process compile its sources again, so the
byte code is cached under the scratch directory (PYTHONPYCACHEPREFIX) instead.

Usage: python benchmarks/push.py [--rounds 5]
"""

from __future__ import annotations

import argparse
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

from services import running_registry  # noqa: E402

from kwasm.image.registry import pull, push  # noqa: E402
from kwasm.image.store import ImageStore  # noqa: E402

DEMO_WASM = REPO / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"
BIG_BYTES = 20 * 1024 * 1024


def _kwasm_command() -> list[str]:
    """The installed ``kwasm`` script next to this interpreter (not a pyenv shim, which adds ~0.1 s)."""
    script = Path(sysconfig.get_path("scripts")) / "kwasm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kwasm.cli.main"]


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _big_module(path: Path) -> None:
    """The demo module plus a custom section, ``BIG_BYTES`` in all (still a valid WASI command)."""
    name = b"kwasm.bench.padding"
    module = DEMO_WASM.read_bytes()
    padding = BIG_BYTES - len(module) - len(name) - 12
    payload = _leb128(len(name)) + name + os.urandom(padding)
    path.write_bytes(module + b"\x00" + _leb128(len(payload)) + payload)


def _timed(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def _timed_call(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _kwasm_env(base: Path, kwasm_root: Path) -> dict[str, str]:
    """The environment of timed kwasm processes: its store, and byte code cached under ``base``."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "KWASM_ROOT": str(kwasm_root), "PYTHONPYCACHEPREFIX": str(base / "pycache")}


def _round(work: Path, kwasm_root: Path, layout: Path, tag: str) -> dict[str, float]:
    kwasm = _kwasm_command()
    env = _kwasm_env(work.parent, kwasm_root)
    results: dict[str, float] = {}
    with running_registry(work / "registry-cli") as registry:
        results["skopeo push"] = _timed(
            ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
             f"oci:{layout}:{tag}", f"docker://{registry.ref('skopeo', tag)}"]
        )  # fmt: skip
        results["kwasm push"] = _timed([*kwasm, "push", f"bench:{tag}", registry.ref("kwasm", tag)], env)
        results["skopeo pull"] = _timed(
            ["skopeo", "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false",
             f"docker://{registry.ref('kwasm', tag)}", f"oci:{work / 'skopeo-pull'}:{tag}"]
        )  # fmt: skip
        pull_env = {**env, "KWASM_ROOT": str(work / "kwasm-pull")}
        results["kwasm pull"] = _timed([*kwasm, "pull", registry.ref("skopeo", tag)], pull_env)
    with running_registry(work / "registry-lib") as registry:
        store = ImageStore(kwasm_root)
        results["kwasm push (in-process)"] = _timed_call(lambda: push(store, f"bench:{tag}", registry.ref("lib", tag)))
        fresh = ImageStore(work / "kwasm-lib-pull")
        results["kwasm pull (in-process)"] = _timed_call(lambda: pull(fresh, registry.ref("lib", tag)))
    return results


def main() -> None:
    """Build the two images, run the rounds, print medians and kwasm/skopeo ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kwasm-bench-push-") as scratch:
        base = Path(scratch)
        kwasm_root = base / "root"
        env = _kwasm_env(base, kwasm_root)
        big = base / "big.wasm"
        _big_module(big)
        images = {"demo": DEMO_WASM, "20MiB": big}
        layouts: dict[str, Path] = {}
        for tag, module in images.items():
            layouts[tag] = base / f"layout-{tag}"
            build = ["build", "--wasm", str(module), "-t", f"bench:{tag}", "--oci-dir", str(layouts[tag])]
            subprocess.run([*_kwasm_command(), *build], check=True, capture_output=True, env=env)
        print(f"kwasm push/pull vs skopeo copy, local docker-registry 2.8, {args.rounds} rounds, medians (s)")
        print(f"{'image':8} {'operation':26} {'kwasm':>8} {'skopeo':>8} {'ratio':>7}")
        for tag in images:
            samples: dict[str, list[float]] = {}
            for number in range(-1, args.rounds):  # round -1: warm-up, not counted
                work = base / f"{tag}-{number}"
                for name, value in _round(work, kwasm_root, layouts[tag], tag).items():
                    if number >= 0:
                        samples.setdefault(name, []).append(value)
                shutil.rmtree(work, ignore_errors=True)
            medians = {name: statistics.median(values) for name, values in samples.items()}
            for operation in ("push", "pull"):
                peer = medians[f"skopeo {operation}"]
                for label, key in (("whole process", ""), ("in-process library", " (in-process)")):
                    ours = medians[f"kwasm {operation}{key}"]
                    print(f"{tag:8} {f'{operation} ({label})':26} {ours:8.3f} {peer:8.3f} {ours / peer:6.2f}x")
                overhead = medians[f"kwasm {operation}"] - medians[f"kwasm {operation} (in-process)"]
                print(f"{tag:8} {f'{operation} (whole - in-process)':26} {overhead:8.3f}    (start-up and exit)")
        floors = {
            "python -c pass (interpreter start-up alone)": [sys.executable, "-c", "pass"],
            "kwasm --version (interpreter + CLI start-up)": [*_kwasm_command(), "--version"],
        }
        for label, command in floors.items():
            times = [_timed(command, env) for _ in range(max(args.rounds, 5) * 3)]
            print(f"{label}: median {statistics.median(times):.3f} s, min {min(times):.3f} s")


if __name__ == "__main__":
    main()
