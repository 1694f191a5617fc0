"""``kwasm run --engine containerd``: run an image of the local store on containerd through ``ctr``.

The image is imported when containerd lacks it (or holds another digest under its name): kwasm
writes its own archive (as ``kwasm save`` does) and runs ``ctr images import --all-platforms``.
Then ``ctr run --runtime io.containerd.kwasm.v1 IMAGE ID ENTRYPOINT... ARGS...`` runs it with the
terminal's stdio, and the guest's exit code is returned. The same by hand::

    kwasm save wasi-demo-app:latest -o demo.tar
    ctr images import --all-platforms demo.tar
    ctr run --rm --runtime io.containerd.kwasm.v1 docker.io/library/wasi-demo-app:latest demo \\
        /wasi-demo-app.wasm echo hello
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from kwasm.errors import InvalidImageError, SandboxerError, ToolMissingError, UsageError
from kwasm.image.archive import write_archive
from kwasm.image.store import ImageStore, StoredImage

RUNTIME = "io.containerd.kwasm.v1"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
#: ctr's own variable for the namespace; kwasm honours it too.
NAMESPACE_ENV = "CONTAINERD_NAMESPACE"
IMPORT_TIMEOUT = 300.0


def ctr_command(address: str, namespace: str) -> list[str]:
    """``ctr`` with the address and namespace flags."""
    ctr = shutil.which("ctr")
    if ctr is None:
        raise ToolMissingError("ctr is not installed (it comes with containerd)")
    return [ctr, "--address", address, "--namespace", namespace]


def _containerd_digest(ctr: list[str], name: str) -> str | None:
    listing = subprocess.run(
        [*ctr, "images", "ls"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    if listing.returncode != 0:
        raise SandboxerError(f"ctr images ls failed: {listing.stderr.strip()}")
    for line in listing.stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[0] == name:
            return fields[2]
    return None


def ensure_imported(store: ImageStore, image: StoredImage, ctr: list[str]) -> bool:
    """Import ``image`` into containerd unless it already holds that digest under its name; True if imported."""
    name = str(image.reference)
    if _containerd_digest(ctr, name) == image.manifest_digest:
        return False
    with tempfile.TemporaryDirectory(prefix="kwasm-ctr-") as scratch:
        archive = Path(scratch) / "image.tar"
        write_archive(store, [image], archive)
        result = subprocess.run(
            [*ctr, "images", "import", "--all-platforms", str(archive)],
            capture_output=True, text=True, timeout=IMPORT_TIMEOUT, stdin=subprocess.DEVNULL,
        )
    if result.returncode != 0:
        raise SandboxerError(f"ctr images import of {name} failed: {result.stderr.strip()}")
    return True


def run_command(
    image: StoredImage, args: list[str], env: dict[str, str], rm: bool, ctr: list[str], container_id: str
) -> list[str]:
    """The ``ctr run`` argv: the image's entrypoint, then ``args`` (or the image's cmd)."""
    process = [*image.config.entrypoint, *(args or image.config.cmd)]
    if not process:
        raise InvalidImageError(f"{image.reference} has neither entrypoint nor cmd, and no arguments were given")
    command = [*ctr, "run", "--runtime", RUNTIME]
    if rm:
        command.append("--rm")
    for key, value in env.items():
        command += ["--env", f"{key}={value}"]
    return [*command, str(image.reference), container_id, *process]


def run_on_containerd(image: str, args: list[str], env: dict[str, str], rm: bool, address: str | None) -> int:
    """Run ``image`` from the local store on containerd (importing it if needed); returns the exit code."""
    store = ImageStore.default()
    stored = store.resolve(image)
    if stored.reference is None:
        raise UsageError(f"{image} has no name: tag it first (kwasm tag {image} NAME:TAG)")
    if stored.is_artifact:
        raise InvalidImageError(f"{image} is a wasm OCI artifact, which containerd cannot unpack: build it without "
                                "--artifact")
    socket_path = address or os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_ADDRESS
    if not Path(socket_path).is_socket():
        raise SandboxerError(f"no containerd socket at {socket_path} (start containerd or pass its address)")
    ctr = ctr_command(socket_path, os.environ.get(NAMESPACE_ENV) or "default")
    ensure_imported(store, stored, ctr)
    container_id = f"kwasm-{secrets.token_hex(6)}"
    return subprocess.run(run_command(stored, args, env, rm, ctr, container_id)).returncode
