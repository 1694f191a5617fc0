"""kwasm CLI command group: iSulad and crictl (``setup-isulad``, ``cri-config``, ``doctor``, ``k8s``).

Library code (and rich's tables) are imported inside the commands, so other commands start
without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kwasm.cli.output import info, print_json

app = typer.Typer()
k8s_app = typer.Typer(
    help="Kubernetes manifests for wasm pods on this node's handler.\n\nExample: kwasm k8s runtimeclass",
    no_args_is_help=True,
)
app.add_typer(k8s_app, name="k8s")

ConfigPath = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="KWASM_ISULAD_CONFIG",
        help="iSulad's daemon.json (default: /etc/isulad/daemon.json).",
        show_default=False,
    ),
]
Handler = Annotated[str, typer.Option("--handler", help="CRI runtime handler (crictl --runtime, RuntimeClass).")]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

_STATUS_STYLE = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}


def _print_diff(lines: list[str]) -> None:
    from rich.text import Text

    from kwasm.cli.output import console

    styles = {"+": "green", "-": "red", "@": "cyan"}
    for line in lines:
        style = "bold" if line.startswith(("+++", "---")) else styles.get(line[:1], "")
        console.print(Text(line.rstrip("\n"), style=style), soft_wrap=True)


@app.command("setup-isulad")
def setup_isulad(
    config: ConfigPath = None,
    handler: Handler = "wasm",
    runtime: Annotated[
        str, typer.Option("--runtime", help="Shim-v2 runtime name the handler maps to (cri-runtimes).")
    ] = "io.containerd.wasm.v1",
    sandboxer: Annotated[
        str,
        typer.Option(
            "--sandboxer",
            help="Whose sandboxer: kwasm (/run/kwasm-sandboxer.sock) or kuasar (Kuasar's /run/wasm-sandboxer.sock).",
        ),
    ] = "kwasm",
    sandboxer_name: Annotated[
        str | None, typer.Option("--sandboxer-name", help="Sandboxer name (default: the handler).")
    ] = None,
    sandboxer_address: Annotated[
        str | None, typer.Option("--sandboxer-address", help="Sandboxer socket (default: per --sandboxer).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the change as a diff; write nothing.")] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Restart iSulad (systemctl) after writing and wait for its socket.")
    ] = False,
    as_json: JsonOutput = False,
) -> None:
    """Configure iSulad to run wasm pods on a sandboxer: handler → runtime + sandboxer, CRI v1 on.

    Keeps every other key of daemon.json and its order, keeps a timestamped backup, writes
    atomically with the original mode and owner, and changes nothing when already configured.

    Example: kwasm setup-isulad --handler wasm --dry-run

    Example: kwasm setup-isulad --sandboxer kuasar --restart
    """
    from kwasm.cri.daemon_json import (
        KUASAR_SANDBOXER_SOCKET,
        KWASM_SANDBOXER_SOCKET,
        HandlerSettings,
        daemon_json_path,
        parse_daemon_json,
        plan_setup,
        write_daemon_json,
    )
    from kwasm.cri.service import restart_isulad
    from kwasm.cri.tools import isulad_socket
    from kwasm.errors import UsageError

    defaults = {"kwasm": KWASM_SANDBOXER_SOCKET, "kuasar": KUASAR_SANDBOXER_SOCKET}
    if sandboxer not in defaults:
        raise UsageError(f"--sandboxer {sandboxer!r}: choose kwasm or kuasar")
    settings = HandlerSettings(
        handler=handler,
        runtime=runtime,
        sandboxer_name=sandboxer_name or handler,
        sandboxer_address=sandboxer_address or defaults[sandboxer],
    )
    path = daemon_json_path(config)
    plan = plan_setup(path, settings)
    if plan.warnings:
        from kwasm.cli.output import err_console

        for warning in plan.warnings:
            err_console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    backup: Path | None = None
    if not plan.changed:
        info(f"{path} already routes handler {handler!r} to sandboxer {settings.sandboxer_name!r}; nothing changed")
    elif dry_run:
        _print_diff(plan.diff())
        info("dry run: nothing written")
    else:
        backup = write_daemon_json(path, plan.new_text, plan.old_text)
        info(f"wrote {path}" + (f" (backup: {backup})" if backup else " (new file from iSulad's defaults)"))
    restarted: float | None = None
    if restart and not dry_run:
        socket_address = isulad_socket(parse_daemon_json(path, plan.new_text))
        restarted = restart_isulad(socket_address)
        info(f"restarted iSulad; {socket_address} answered after {restarted:.1f}s")
    elif plan.changed and not dry_run:
        info("restart iSulad to apply it: systemctl restart isulad (or run again with --restart)")
    if as_json:
        print_json(
            {
                "config": str(path),
                "changed": plan.changed,
                "written": plan.changed and not dry_run,
                "backup": str(backup) if backup else None,
                "warnings": plan.warnings,
                "restarted": restarted is not None,
            }
        )


@app.command("cri-config")
def cri_config(
    image: Annotated[str, typer.Argument(help="Image in the local store (name:tag, digest or ID).")],
    args: Annotated[
        list[str] | None, typer.Argument(help="Arguments after --, replacing the image's Cmd.", show_default=False)
    ] = None,
    out_dir: Annotated[Path, typer.Option("-o", "--output", help="Directory for pod.json and container.json.")] = Path(
        "."
    ),
    name: Annotated[str | None, typer.Option("--name", help="Pod and container name (default: unique).")] = None,
    handler: Handler = "wasm",
    env: Annotated[
        list[str] | None, typer.Option("-e", "--env", help="Environment variable KEY=VALUE (a bare KEY copies yours).")
    ] = None,
    as_json: JsonOutput = False,
) -> None:
    """Write pod.json and container.json for crictl (CRI runtime.v1) and print the crictl line.

    Command is the image Entrypoint; args are ARGS when given, else the image Cmd. The pod uses
    the host network (no CNI) and a private PID namespace; its log directory (under /var/log/pods,
    or $KWASM_POD_LOG_ROOT) is created, as kubelet would.

    Example: kwasm cri-config wasi-demo-app:latest -o /tmp/demo -- echo hello
    """
    from kwasm.cri.crictl_config import build_configs, crictl_run_argv, shell_line, write_configs
    from kwasm.image.store import ImageStore
    from kwasm.keyvalue import parse_pairs

    stored = ImageStore.default().resolve(image)
    configs = build_configs(stored, image, list(args or []), parse_pairs(env or [], "-e"), name)
    pod_path, container_path = write_configs(configs, out_dir)
    argv = crictl_run_argv(handler, container_path, pod_path)
    log_dir = configs.log_file.parent
    try:
        log_dir.mkdir(parents=True, exist_ok=True)  # as kubelet does before RunPodSandbox
    except OSError as exc:
        info(f"create the pod's log directory before running crictl ({exc.strerror}): mkdir -p {log_dir}")
    if as_json:
        print_json({"name": configs.name, "pod": str(pod_path), "container": str(container_path), "crictl": argv})
        return
    info(f"wrote {pod_path} and {container_path}")
    print(shell_line(argv))


@app.command()
def doctor(
    config: ConfigPath = None,
    handler: Handler = "wasm",
    sandboxer_address: Annotated[
        str | None,
        typer.Option("--sandboxer-address", help="Sandboxer socket to probe (default: from daemon.json)."),
    ] = None,
    as_json: JsonOutput = False,
) -> None:
    """Check this node for wasm pods on iSulad: tools, daemon.json, sandboxer, crictl, kernel limits.

    Exits non-zero when a required check fails; warnings (limits for high density) do not.

    Example: kwasm doctor --json
    """
    from kwasm.cri.daemon_json import daemon_json_path
    from kwasm.cri.doctor import DoctorOptions, required_failed, run_checks
    from kwasm.cri.doctor import as_json as doctor_json

    checks = run_checks(DoctorOptions(daemon_json_path(config), handler, sandboxer_address))
    if as_json:
        print_json(doctor_json(checks))
    else:
        from rich.table import Table

        from kwasm.cli.output import console

        table = Table(title="kwasm doctor", show_lines=False)
        for column in ("check", "status", "detail", "fix"):
            table.add_column(column, overflow="fold")
        for check in checks:
            label = check.name if check.required else f"{check.name} [dim](recommended)[/]"
            table.add_row(label, _STATUS_STYLE[check.status], check.detail, check.fix)
        console.print(table)
    if required_failed(checks):
        raise typer.Exit(1)


@k8s_app.command("runtimeclass")
def runtimeclass(
    handler: Handler = "wasm",
    name: Annotated[str | None, typer.Option("--name", help="RuntimeClass name (default: the handler).")] = None,
    image: Annotated[str, typer.Option("--image", help="Image of the sample Pod.")] = "wasi-demo-app:latest",
    args: Annotated[
        list[str] | None, typer.Argument(help="Arguments of the sample Pod's container.", show_default=False)
    ] = None,
) -> None:
    """Print a Kubernetes RuntimeClass for the handler and a sample Pod that uses it (YAML).

    Example: kwasm k8s runtimeclass --handler wasm | kubectl apply -f -
    """
    from kwasm.cri.k8s import runtimeclass_manifests

    print(runtimeclass_manifests(handler, name or handler, image, list(args or ["echo", "hello"])), end="")
