"""pod.json and container.json in the form ``crictl run|runp|create`` reads (CRI ``runtime.v1``).

crictl unmarshals these files with Go's encoding/json into the CRI structs, so keys are the
snake_case proto field names and enums are integers. A wasm pod uses the host network
(``NamespaceMode.NODE`` = 2: no CNI, no netns) and a private PID namespace per container
(``NamespaceMode.CONTAINER`` = 1), as Kuasar's wasm example does.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kwasm.errors import KwasmError, UsageError
from kwasm.image.archive import atomic_file
from kwasm.image.reference import Reference
from kwasm.image.store import StoredImage

NAMESPACE_MODE_CONTAINER = 1
NAMESPACE_MODE_NODE = 2
POD_NAMESPACE = "default"
POD_LOG_ROOT = Path("/var/log/pods")
POD_LOG_ROOT_ENV = "KWASM_POD_LOG_ROOT"
POD_FILE = "pod.json"
CONTAINER_FILE = "container.json"

_NAME_OK = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def pod_log_root() -> Path:
    """Where pod log directories go: ``$KWASM_POD_LOG_ROOT`` or /var/log/pods (kubelet's place)."""
    env = os.environ.get(POD_LOG_ROOT_ENV)
    return Path(env) if env else POD_LOG_ROOT


def unique_name(base: str) -> str:
    """A DNS-label-safe name from ``base`` plus a random 8-hex suffix, so repeated runs never collide."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")[:40].strip("-") or "wasm"
    return f"{cleaned}-{secrets.token_hex(4)}"


def image_name(image: StoredImage, requested: str) -> str:
    """The name iSulad knows the image by (it drops ``docker.io/`` and ``library/``), e.g. ``app:latest``."""
    if image.reference is not None:
        return image.reference.familiar()
    return Reference.parse(requested).familiar()


@dataclass(frozen=True)
class CriConfigs:
    """The two crictl configs for one wasm container in its own pod."""

    name: str
    pod: dict[str, Any]
    container: dict[str, Any]

    @property
    def log_file(self) -> Path:
        """Where iSulad is asked to write the container's log."""
        return Path(str(self.pod["log_directory"])) / str(self.container["log_path"])


def build_configs(
    image: StoredImage,
    requested: str,
    args: list[str],
    env: dict[str, str],
    name: str | None = None,
    log_root: Path | None = None,
) -> CriConfigs:
    """pod.json / container.json contents for running ``image`` with ``args`` (or the image's Cmd).

    ``command`` is the image Entrypoint; ``args`` are ``args`` when given, else the image Cmd.
    """
    if name is not None and not _NAME_OK.match(name):
        raise UsageError(f"--name {name!r}: use lowercase letters, digits and '-' (a DNS label)")
    ref_name = image_name(image, requested)
    base = ref_name.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    pod_name = name or unique_name(base)
    pod_uid = str(uuid.uuid4())
    namespace_options = {"network": NAMESPACE_MODE_NODE, "pid": NAMESPACE_MODE_CONTAINER}
    pod: dict[str, Any] = {
        "metadata": {"name": pod_name, "uid": pod_uid, "namespace": POD_NAMESPACE, "attempt": 0},
        "log_directory": str((log_root or pod_log_root()) / f"{POD_NAMESPACE}_{pod_name}_{pod_uid}"),
        "labels": {"app.kubernetes.io/managed-by": "kwasm"},
        "linux": {"security_context": {"namespace_options": namespace_options}},
    }
    container: dict[str, Any] = {
        "metadata": {"name": pod_name, "attempt": 0},
        "image": {"image": ref_name},
        "command": list(image.config.entrypoint),
        "args": list(args) if args else list(image.config.cmd),
        "envs": [{"key": key, "value": value} for key, value in env.items()],
        "log_path": f"{pod_name}.log",
        "linux": {"security_context": {"namespace_options": namespace_options}},
    }
    if image.config.working_dir:
        container["working_dir"] = image.config.working_dir
    if not container["command"] and not container["args"]:
        raise UsageError(f"{requested} has no Entrypoint or Cmd: pass the module path and arguments after --")
    return CriConfigs(pod_name, pod, container)


def write_configs(configs: CriConfigs, out_dir: Path) -> tuple[Path, Path]:
    """Write ``pod.json`` and ``container.json`` into ``out_dir`` (created if needed); returns their paths."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KwasmError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    pod_path, container_path = out_dir / POD_FILE, out_dir / CONTAINER_FILE
    for path, document in ((pod_path, configs.pod), (container_path, configs.container)):
        with atomic_file(path) as handle:
            handle.write(json.dumps(document, indent=2).encode() + b"\n")
    return pod_path, container_path


def crictl_run_argv(handler: str, container_path: Path, pod_path: Path) -> list[str]:
    """The crictl command that starts the pod and container from the two files (no registry pull)."""
    return ["crictl", "run", f"--runtime={handler}", "--no-pull", str(container_path), str(pod_path)]


def shell_line(argv: list[str]) -> str:
    """``argv`` as one copy-pasteable shell line."""
    return shlex.join(argv)
