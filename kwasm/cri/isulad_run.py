"""``kwasm run --engine isulad``: run a stored wasm image as a CRI pod on iSulad through crictl.

Steps: check the tools, the handler in daemon.json and crictl's endpoint; ``isula load`` kwasm's
own image tar when ``isula images`` lacks the image; write pod.json / container.json; then
``crictl run --runtime=<handler> --no-pull container.json pod.json``. With ``rm`` it waits for
the container to exit, prints its log, removes the pod and returns the exit code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kwasm.cri.crictl_config import build_configs, crictl_run_argv, write_configs
from kwasm.cri.daemon_json import DEFAULT_HANDLER, daemon_json_path, parse_daemon_json
from kwasm.cri.tools import (
    ISULA_UNREACHABLE,
    crictl_endpoint_fix,
    crictl_targets_isulad,
    isula_images_has,
    isulad_socket,
    last_line,
    require_tool,
    run_tool,
)
from kwasm.errors import ConfigFileError, InvalidImageError, ToolMissingError
from kwasm.image.archive import write_archive
from kwasm.image.store import ImageStore, StoredImage

POLL_SECONDS = 0.25


def _daemon_config(handler: str) -> dict[str, object]:
    """daemon.json, checked to route ``handler`` to a sandboxer (else ConfigFileError naming the fix)."""
    path = daemon_json_path()
    fix = f"run `kwasm setup-isulad --handler {handler} --restart`"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"{path} does not exist, so handler {handler!r} is not configured: {fix}") from None
    except OSError as exc:
        raise ConfigFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    config = parse_daemon_json(path, text)
    runtimes, sandboxers = config.get("cri-runtimes"), config.get("cri-sandboxers")
    missing = []
    if config.get("enable-cri-v1") is not True:
        missing.append("enable-cri-v1")
    if not isinstance(runtimes, dict) or handler not in runtimes:
        missing.append(f"cri-runtimes[{handler!r}]")
    if not isinstance(sandboxers, dict) or not isinstance(sandboxers.get(handler), dict):
        missing.append(f"cri-sandboxers[{handler!r}]")
    if missing:
        raise ConfigFileError(
            f"handler {handler!r} is not configured in {path} (missing {', '.join(missing)}): {fix}"
        )
    return config


def _isula(argv: list[str], socket_address: str) -> str:
    """Run an ``isula`` command; one clear error line when iSulad is down or the command fails."""
    result = run_tool(["isula", *argv])
    if result.returncode != 0:
        reason = last_line(result.stderr) or last_line(result.stdout)
        if ISULA_UNREACHABLE in result.stderr or ISULA_UNREACHABLE in result.stdout:
            raise ToolMissingError(
                f"iSulad is not reachable at {socket_address}: start it with `systemctl start isulad`"
            )
        raise ToolMissingError(f"`isula {' '.join(argv)}` failed: {reason}")
    return result.stdout


def _crictl(argv: list[str]) -> str:
    """Run a ``crictl`` command, returning stdout; ToolMissingError with crictl's reason on failure."""
    result = run_tool(["crictl", *argv])
    if result.returncode != 0:
        reason = last_line(result.stderr) or last_line(result.stdout)
        raise ToolMissingError(f"`crictl {' '.join(argv)}` failed: {reason}")
    return result.stdout


def ensure_image(store: ImageStore, image: StoredImage, requested: str, name: str, socket_address: str) -> bool:
    """Make sure iSulad has ``name``: ``isula load -i`` kwasm's own tar when absent. True when it loaded it."""
    if isula_images_has(_isula(["images"], socket_address), name):
        return False
    if image.is_artifact:
        raise InvalidImageError(
            f"{requested} is a wasm OCI artifact, which `isula load` cannot read: rebuild it without --artifact"
        )
    with tempfile.TemporaryDirectory(prefix="kwasm-isula-load-") as tmp:
        tar_path = Path(tmp) / "image.tar"
        write_archive(store, [image], tar_path)
        _isula(["load", "-i", str(tar_path)], socket_address)
    return True


def _pod_ids(pod_name: str) -> list[str]:
    return _crictl(["pods", "--name", f"^{pod_name}$", "-q"]).split()


def _wait_exit(container_id: str) -> int:
    """Poll ``crictl inspect`` until the container has exited; its exit code."""
    while True:
        output = _crictl(["inspect", "-o", "json", container_id])
        try:
            status = json.loads(output)["status"]
            state, exit_code = status.get("state"), status.get("exitCode", 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            reason = last_line(output) or "nothing"
            raise ToolMissingError(f"`crictl inspect {container_id}` printed no container status: {reason}") from None
        if state == "CONTAINER_EXITED":
            return int(exit_code)
        time.sleep(POLL_SECONDS)


def _show_logs(container_id: str) -> None:
    """Pass the container's log through to our stdout/stderr (``crictl logs``)."""
    sys.stdout.flush()
    result = subprocess.run(["crictl", "logs", container_id], check=False)
    if result.returncode != 0:
        _say(f"`crictl logs {container_id}` failed (exit {result.returncode})")


def _clean_up(pod_name: str, work_dir: Path, log_dir: Path) -> None:
    """Remove the pod (and its container), its log directory and the configs; failures are reported."""
    try:
        for pod_id in _pod_ids(pod_name):
            _crictl(["rmp", "-f", pod_id])
    except ToolMissingError as exc:
        _say(f"could not remove pod {pod_name}: {exc}")
    shutil.rmtree(work_dir, ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_on_isulad(
    image: str,
    args: list[str],
    env: dict[str, str],
    rm: bool,
    *,
    handler: str = DEFAULT_HANDLER,
    store: ImageStore | None = None,
) -> int:
    """Run ``image`` with ``args``/``env`` as a pod on iSulad via crictl; the exit code with ``rm``, else 0.

    Prints the pod and container ids (stdout) and how to follow the logs (stderr).
    """
    require_tool("crictl")
    require_tool("isula")
    config = _daemon_config(handler)
    socket_address = isulad_socket(config)
    pointed, where = crictl_targets_isulad(socket_address)
    if not pointed:
        raise ConfigFileError(f"crictl is not pointed at iSulad ({where}): {crictl_endpoint_fix(socket_address)}")
    store = store or ImageStore.default()
    stored = store.resolve(image)
    configs = build_configs(stored, image, args, env)
    if ensure_image(store, stored, image, configs.container["image"]["image"], socket_address):
        _say(f"loaded {configs.container['image']['image']} into iSulad")
    work_dir = store.root / "isulad" / configs.name
    pod_path, container_path = write_configs(configs, work_dir)
    log_dir = configs.log_file.parent
    try:
        log_dir.mkdir(parents=True, exist_ok=True)  # kubelet creates it before RunPodSandbox; so do we
    except OSError as exc:
        shutil.rmtree(work_dir, ignore_errors=True)
        reason = exc.strerror or exc
        raise ConfigFileError(
            f"cannot create the pod log directory {log_dir}: {reason} (run as root or set $KWASM_POD_LOG_ROOT)"
        ) from None
    argv = crictl_run_argv(handler, container_path, pod_path)
    try:
        container_id = last_line(_crictl(argv[1:]))
        pod_ids = _pod_ids(configs.name)
        print(f"pod: {' '.join(pod_ids)}\ncontainer: {container_id}", flush=True)
        if not rm:
            _say(f"logs: crictl logs -f {container_id}   (file: {configs.log_file})")
            _say(f"remove: crictl rmp -f {' '.join(pod_ids)}   (configs: {work_dir})")
            return 0
        _say(f"waiting for container {container_id[:13]} to exit (Ctrl-C stops waiting and removes the pod)")
        exit_code = _wait_exit(container_id)
        _show_logs(container_id)
        return exit_code
    finally:
        if rm:
            _clean_up(configs.name, work_dir, log_dir)
