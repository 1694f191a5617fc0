"""kwasm CLI command group: run (an image from the local store, or a .wasm file, in-process)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from kwasm.cli.output import error
from kwasm.cli.state import data_root
from kwasm.errors import ImageNotFoundError, NotFoundError, UsageError
from kwasm.keyvalue import parse_pairs

app = typer.Typer()

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """``64M`` / ``512k`` / ``1G`` / ``1048576`` → bytes (binary units)."""
    match = re.fullmatch(r"(\d+)\s*([bkmg]?)(?:i?b)?", text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"--memory takes a size like 64M, 512k or 1G, not {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def parse_duration(text: str) -> float:
    """``10s`` / ``500ms`` / ``2m`` / ``1.5`` → seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?", text.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"--timeout takes a duration like 10s, 500ms or 2m, not {text!r}")
    return float(match.group(1)) * _TIME_UNITS[match.group(2) or ""]


@dataclass
class Volume:
    """A ``-v HOST:GUEST[:ro]`` mount."""

    host: Path
    guest: str
    read_only: bool = False


def parse_volume(text: str) -> Volume:
    """Parse ``HOST:GUEST[:ro|:rw]``; the host directory must exist."""
    parts = text.split(":")
    mode = "rw"
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        mode = parts.pop()
    if len(parts) != 2 or not parts[0] or not parts[1].startswith("/"):
        raise UsageError(f"-v takes HOST:GUEST[:ro] with an absolute GUEST path, not {text!r}")
    host = Path(parts[0]).expanduser()
    if not host.is_dir():
        raise NotFoundError(f"host path {host} does not exist or is not a directory")
    return Volume(host.resolve(), parts[1], mode == "ro")


@dataclass
class Program:
    """What to run: the module, its argv, env and extra preopens (an image's rootfs)."""

    module: Path
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    rootfs: Path | None = None


def resolve_program(target: str, args: list[str]) -> Program:
    """A ``.wasm`` path runs as is; anything else is an image, pulled into the local store if absent."""
    path = Path(target)
    if target.endswith(".wasm") or path.is_file():
        if not path.is_file():
            raise NotFoundError(f"no such file: {target}")
        return Program(path, [path.name, *args])
    from kwasm.image.store import ImageStore

    store = ImageStore.default()
    try:
        image = store.resolve(target)
    except ImageNotFoundError:
        from kwasm.image.registry import ensure_local

        image = ensure_local(store, target)
    config = image.config
    module = store.module_path(image)
    program = [*config.entrypoint, *(args or config.cmd)]
    if image.is_artifact and not config.entrypoint:
        program = [module.name, *(args or config.cmd)]
    env = dict(item.partition("=")[::2] for item in config.env)
    if config.working_dir and "PWD" not in env:
        env["PWD"] = config.working_dir
    return Program(module, program, env, None if image.is_artifact else store.unpack(image))


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def run(
    target: Annotated[
        str, typer.Argument(help="Image reference (pulled first if not in the local store), or a .wasm file.")
    ],
    args: Annotated[
        list[str] | None, typer.Argument(help="Arguments (after --); they replace the image's cmd.")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("-e", "--env", help="Set K=V in the guest's env (a bare K copies yours).")
    ] = None,
    volume: Annotated[
        list[str] | None, typer.Option("-v", "--volume", help="Give the guest HOST dir as GUEST[:ro].")
    ] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="Linear memory limit, e.g. 64M.")] = None,
    timeout: Annotated[str | None, typer.Option("--timeout", help="Kill the guest after this, e.g. 10s.")] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="local (in-process), isulad (via crictl) or containerd (via ctr).")
    ] = "local",
    rm: Annotated[
        bool, typer.Option("--rm/--keep", help="isulad: remove the pod when it ends; containerd: the container.")
    ] = True,
) -> None:
    """Run a wasm image or module; kwasm exits with the guest's exit code.

    Example:

      kwasm run wasi-demo-app:latest -- echo hello

      kwasm run app.wasm -v ./data:/data -e MODE=fast --memory 64M --timeout 10s -- arg1

      kwasm run 127.0.0.1:5000/team/app:1 -- serve   (pulls the image first)
    """
    arguments = list(args or [])
    environment = parse_pairs(env or [], "-e")
    if engine == "isulad":
        if volume or memory or timeout:
            raise UsageError("-v, --memory and --timeout are not supported with --engine isulad")
        from kwasm.cri.isulad_run import run_on_isulad

        raise typer.Exit(run_on_isulad(target, arguments, environment, rm))
    if engine == "containerd":
        if volume or memory or timeout:
            raise UsageError("-v, --memory and --timeout are not supported with --engine containerd")
        from kwasm.shim.containerd_run import run_on_containerd

        raise typer.Exit(run_on_containerd(target, arguments, environment, rm, None))
    if engine != "local":
        raise UsageError(f"--engine takes local, isulad or containerd, not {engine!r}")
    limit = parse_size(memory) if memory else None
    seconds = parse_duration(timeout) if timeout else None
    volumes = [parse_volume(v) for v in volume or []]
    program = resolve_program(target, arguments)
    raise typer.Exit(_run_local(program, environment, volumes, limit, seconds, timeout or ""))


def _run_local(
    program: Program, env: dict[str, str], volumes: list[Volume], limit: int | None, seconds: float | None, shown: str
) -> int:
    from kwasm.runtime.engine import Engine
    from kwasm.runtime.guest import ExitReason, GuestSpec, Preopen, Stdio

    preopens = [Preopen(v.host, v.guest, v.read_only) for v in volumes]
    if program.rootfs is not None and not any(p.guest_path == "/" for p in preopens):
        preopens.insert(0, Preopen(program.rootfs, "/", read_only=True))
    spec = GuestSpec(
        module=program.module,
        argv=program.argv,
        env={**program.env, **env},
        preopens=preopens,
        stdin=Stdio.inherit(),
        stdout=Stdio.inherit(),
        stderr=Stdio.inherit(),
        memory_limit=limit,
        timeout=seconds,
    )
    with Engine(threads=1, cache_dir=data_root() / "cache" / "modules") as runtime:
        guest = runtime.start(spec)
        try:
            outcome = None
            while outcome is None:
                outcome = guest.wait(0.25)
        except KeyboardInterrupt:
            guest.kill()
            guest.wait(5)
            return 130
    if outcome.reason is ExitReason.TRAPPED:
        error(f"guest trapped: {outcome.message.splitlines()[0]}")
    elif outcome.reason is ExitReason.TIMEOUT:
        error(f"guest killed after --timeout {shown}")
    return outcome.code
