"""containerd 1.6 + ``ctr``: kwasm's shim (one shared sandboxer per namespace) next to containerd's runc shim.

Both run on the same private containerd in the same run (started and stopped by pid through
``tests/containerd_service.py``). kwasm runs the demo app built by ``kwasm build``; the peer,
``io.containerd.runc.v2`` (one ``containerd-shim-runc-v2`` process per container, plus runc's
container process), runs a static C program with the same ``echo``/``sleep`` commands from a
one-layer linux/amd64 image written here.

* start: ``ctr run --rm IMAGE ID ... echo hi`` one after another, the two runtimes interleaved;
  median and p90 wall time of the whole ``ctr`` process (kwasm's shared sandboxer stays up between
  runs; both of kwasm's Python shim invocations, ``start`` and ``delete``, are on this path).
* memory: N detached ``sleep 3600`` containers; proportional set size (PSS) of every process the
  runtime added — kwasm: the shared sandboxer; runc: every shim and container process. Per
  container: the total over N, and kwasm's marginal cost ((PSS at N - PSS at 1) / (N - 1)).

Usage: python benchmarks/containerd_shim.py [--containers 50] [--runs 15] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from containerd_service import IMAGE, MODULE, RunningContainerd, running_containerd, sandboxers  # noqa: E402

PEER_IMAGE = "docker.io/library/kwasm-bench-peer:latest"
PEER_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "echo") == 0) {
        for (int i = 2; i < argc; i++) printf(i > 2 ? " %s" : "%s", argv[i]);
        printf("\n");
        return 0;
    }
    if (argc > 2 && strcmp(argv[1], "sleep") == 0) { sleep((unsigned) atoi(argv[2])); return 0; }
    fprintf(stderr, "unknown command\n");
    return 1;
}
"""
NAMESPACE = "bench"


def _blob(files: dict[str, bytes], data: bytes) -> dict[str, object]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    files[f"blobs/sha256/{digest[7:]}"] = data
    return {"digest": digest, "size": len(data)}


def peer_image(directory: Path) -> Path:
    """A one-layer linux/amd64 OCI image tar holding the static C peer as /peer."""
    source = directory / "peer.c"
    source.write_text(PEER_SOURCE)
    binary = directory / "peer"
    subprocess.run(["gcc", "-static", "-Os", "-o", str(binary), str(source)], check=True)
    layer_buffer = io.BytesIO()
    with tarfile.open(fileobj=layer_buffer, mode="w") as layer:
        info = tarfile.TarInfo("peer")
        data = binary.read_bytes()
        info.size, info.mode = len(data), 0o755
        layer.addfile(info, io.BytesIO(data))
    layer_bytes = layer_buffer.getvalue()
    files: dict[str, bytes] = {}
    layer_descriptor = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(files, layer_bytes)}
    config = {
        "architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/peer"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_descriptor["digest"]]},
    }
    config_descriptor = {"mediaType": "application/vnd.oci.image.config.v1+json",
                         **_blob(files, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_descriptor, "layers": [layer_descriptor]}
    manifest_descriptor = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           **_blob(files, json.dumps(manifest).encode()),
                           "annotations": {"io.containerd.image.name": PEER_IMAGE,
                                           "org.opencontainers.image.ref.name": "latest"}}
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [manifest_descriptor]}).encode()
    files["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
    target = directory / "peer.tar"
    with tarfile.open(target, "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return target


def _ctr(containerd: RunningContainerd, *args: str) -> subprocess.CompletedProcess[str]:
    result = containerd.ctr(NAMESPACE, *args, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def start_latency(
    containerd: RunningContainerd, runtimes: dict[str, tuple[str, str, list[str]]], runs: int
) -> dict[str, list[float]]:
    """Wall seconds of each ``ctr run --rm ... echo hi``, runtimes interleaved (one warm-up each, not counted)."""
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for index in range(runs + 1):
        for name, (runtime, image, process) in runtimes.items():
            began = time.perf_counter()
            result = _ctr(containerd, "run", "--rm", "--fifo-dir", str(containerd.fifo_dir), "--runtime", runtime,
                          image, f"lat-{name}-{index}", *process, "echo", "hi")
            elapsed = time.perf_counter() - began
            if result.stdout.strip() != "hi":
                raise RuntimeError(f"unexpected output {result.stdout!r}")
            if index:
                times[name].append(elapsed)
    return times


def _pss(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_full_info().pss
    return total


def _runc_processes() -> list[psutil.Process]:
    shims = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "containerd-shim-runc-v2"
             and NAMESPACE in (p.info["cmdline"] or [])]
    return shims + [child for shim in shims for child in shim.children(recursive=True)]


def memory(
    containerd: RunningContainerd, runtime: str, image: str, process: list[str], count: int
) -> dict[str, int]:
    """PSS of the runtime's processes with 1 and with ``count`` idle containers."""
    layout = containerd.layout(NAMESPACE)

    def measure() -> int:
        time.sleep(1.0)
        return _pss(sandboxers(layout) if runtime.endswith("kwasm.v1") else _runc_processes())

    names = [f"mem-{i}" for i in range(count)]
    fifo_dir = str(containerd.fifo_dir)
    try:
        _ctr(containerd, "run", "-d", "--fifo-dir", fifo_dir, "--runtime", runtime, image, names[0], *process,
             "sleep", "3600")
        one = measure()
        for name in names[1:]:
            _ctr(containerd, "run", "-d", "--fifo-dir", fifo_dir, "--runtime", runtime, image, name, *process,
                 "sleep", "3600")
        many = measure()
    finally:
        for name in names:
            containerd.ctr(NAMESPACE, "task", "kill", "-s", "SIGKILL", name)
        for name in names:
            for _ in range(50):
                if containerd.ctr(NAMESPACE, "task", "delete", name).returncode == 0 or \
                        name not in containerd.ctr(NAMESPACE, "task", "ls", "-q").stdout.split():
                    break
                time.sleep(0.1)
            containerd.ctr(NAMESPACE, "containers", "rm", name)
    return {"pss_one": one, "pss_all": many, "containers": count}


def main() -> None:
    """Run both runtimes and print the figures side by side."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kwasm-bench-ctd-") as scratch:
        directory = Path(scratch)
        store = directory / "kwasm-root"
        subprocess.run([sys.executable, "-m", "kwasm.cli.main", "build", str(REPO / "examples" / "wasi-demo-app"),
                        "-o", str(directory / "demo.tar")], check=True, capture_output=True,
                       env={**os.environ, "KWASM_ROOT": str(store)})
        peer = peer_image(directory)
        with running_containerd(directory / "containerd", idle_grace=None) as containerd:
            for tar in (directory / "demo.tar", peer):
                _ctr(containerd, "images", "import", "--all-platforms", str(tar))
            runtimes = {
                "kwasm": ("io.containerd.kwasm.v1", IMAGE, [MODULE]),
                "runc": ("io.containerd.runc.v2", PEER_IMAGE, ["/peer"]),
            }
            latency = start_latency(containerd, runtimes, options.runs)
            results: dict[str, dict[str, float]] = {}
            for name, (runtime, image, process) in runtimes.items():
                times = latency[name]
                mem = memory(containerd, runtime, image, process, options.containers)
                results[name] = {
                    "start_p50_ms": statistics.median(times) * 1000,
                    "start_p90_ms": statistics.quantiles(times, n=10)[-1] * 1000,
                    "pss_total_mib": mem["pss_all"] / 2**20,
                    "pss_per_container_kib": mem["pss_all"] / mem["containers"] / 1024,
                    "pss_marginal_kib": (mem["pss_all"] - mem["pss_one"]) / max(mem["containers"] - 1, 1) / 1024,
                }
    if options.json:
        print(json.dumps(results, indent=2))
        return
    kwasm, runc = results["kwasm"], results["runc"]
    print(f"containerd 1.6 + ctr, {options.containers} idle containers, {options.runs} sequential runs")
    print(f"{'figure':34} {'kwasm shim':>12} {'runc shim':>12} {'kwasm/runc':>11}")
    figures = (
        ("start_p50_ms", "ctr run --rm echo, p50 (ms)"),
        ("start_p90_ms", "ctr run --rm echo, p90 (ms)"),
        ("pss_total_mib", f"PSS with {options.containers} containers (MiB)"),
        ("pss_per_container_kib", "PSS per container (KiB)"),
        ("pss_marginal_kib", "marginal PSS per container (KiB)"),
    )
    for key, label in figures:
        print(f"{label:34} {kwasm[key]:12.1f} {runc[key]:12.1f} {kwasm[key] / runc[key]:11.2f}")


if __name__ == "__main__":
    main()
