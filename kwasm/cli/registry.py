"""kwasm CLI command group: registry (``push``, ``pull``, ``login``).

The registry client is imported inside the commands, and rich only when stderr is a terminal (for
the progress bars): a scripted push or pull loads neither rich nor anything the other commands need.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from kwasm.cli.output import print_json
from kwasm.errors import UsageError

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from kwasm.image.registry import TransferProgress, TransferResult

app = typer.Typer()

PlainHttp = Annotated[
    bool | None,
    typer.Option(
        "--plain-http/--https",
        help="Talk HTTP instead of HTTPS (default: HTTP for loopback registries such as 127.0.0.1:5000, "
        "unless --insecure).",
        show_default=False,
    ),
]
Insecure = Annotated[
    bool, typer.Option("--insecure", help="Accept a self-signed or otherwise unverifiable TLS certificate.")
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


class RichTransferProgress:
    """Blob transfer events drawn as rich progress bars on stderr."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def begin(self, digest: str, size: int, action: str) -> None:
        """Add a bar for blob ``digest``; an ``exists`` blob is shown as already complete."""
        label = {"upload": "push", "download": "pull", "exists": "exists"}.get(action, action)
        done = size if action == "exists" else 0
        self._tasks[digest] = self._progress.add_task(f"{label:6} {digest[7:19]}", total=size, completed=done)

    def advance(self, digest: str, count: int) -> None:
        """Move the bar of ``digest`` on by ``count`` bytes."""
        self._progress.advance(self._tasks[digest], count)

    def finish(self, digest: str) -> None:
        """Fill the bar of ``digest``."""
        task = self._tasks[digest]
        self._progress.update(task, completed=self._progress.tasks[task].total)


_TERMINAL_OVERRIDES = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_TERMINAL")


def _stderr_may_be_terminal() -> bool:
    """False when rich would certainly not draw on stderr: not a tty, and none of rich's overrides set."""
    return sys.stderr.isatty() or any(name in os.environ for name in _TERMINAL_OVERRIDES)


@contextmanager
def transfer_progress() -> Iterator[TransferProgress]:
    """Rich progress bars for blob transfers on stderr (``kwasm run`` uses this for its implicit pull).

    Drawn only when stderr is a terminal, so scripts and logs get just the result or the error line
    (and do not import rich).
    """
    if not _stderr_may_be_terminal():
        from kwasm.image.registry import NoProgress

        yield NoProgress()
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from kwasm.cli.output import err_console

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=err_console, transient=False, disable=not err_console.is_terminal) as progress:
        yield RichTransferProgress(progress)


def _report(result: TransferResult, verb: str, as_json: bool) -> None:
    if as_json:
        print_json(
            {
                "reference": str(result.reference),
                "digest": result.digest,
                "transferred": result.transferred,
                "skipped": result.skipped,
            }
        )
        return
    print(f"{verb} {result.reference.familiar()}")
    print(f"digest: {result.digest}")


@app.command()
def push(
    ref: Annotated[str, typer.Argument(help="Image in the local store (name:tag, digest or ID).")],
    dest: Annotated[str | None, typer.Argument(help="Where to push it (default: the image's own name).")] = None,
    artifact: Annotated[
        bool, typer.Option("--artifact", help="Push a container-image wasm image as a CNCF wasm artifact.")
    ] = False,
    plain_http: PlainHttp = None,
    insecure: Insecure = False,
    as_json: JsonOutput = False,
) -> None:
    """Push an image from the local store to an OCI registry, keeping its digest.

    Blobs the registry already has are not uploaded again. Wasm artifacts are pushed as
    artifacts, container-image wasm images as images (or as artifacts with --artifact).

    Example: kwasm push wasi-demo-app:latest 127.0.0.1:5000/wasi-demo-app:latest
    """
    from kwasm.image.registry import push as push_image
    from kwasm.image.store import ImageStore

    store = ImageStore.default()
    with transfer_progress() as progress:
        result = push_image(
            store, ref, dest, artifact=artifact, plain_http=plain_http, insecure=insecure, progress=progress
        )
    _report(result, "pushed", as_json)


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="Registry reference: host[:port]/repository[:tag|@digest].")],
    plain_http: PlainHttp = None,
    insecure: Insecure = False,
    as_json: JsonOutput = False,
) -> None:
    """Pull a wasm image or wasm artifact into the local store, verifying every digest and size.

    From a multi-platform index the wasm platform is chosen; anything that is not a wasm image
    is refused.

    Example: kwasm pull 127.0.0.1:5000/wasi-demo-app:latest
    """
    from kwasm.image.registry import pull as pull_image
    from kwasm.image.store import ImageStore

    with transfer_progress() as progress:
        result = pull_image(ImageStore.default(), ref, plain_http=plain_http, insecure=insecure, progress=progress)
    _report(result, "pulled", as_json)


@app.command()
def login(
    registry: Annotated[str, typer.Argument(help="Registry host, e.g. 127.0.0.1:5000 or ghcr.io.")],
    username: Annotated[str | None, typer.Option("--username", "-u", help="User name (prompted if absent).")] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    plain_http: PlainHttp = None,
    insecure: Insecure = False,
) -> None:
    """Log in to a registry and store the credentials where Docker keeps them.

    The file is $DOCKER_CONFIG/config.json (default ~/.docker/config.json); push and pull use it.

    Example: echo "$PASSWORD" | kwasm login 127.0.0.1:5000 -u alice --password-stdin
    """
    from kwasm.image.auth import Credentials
    from kwasm.image.registry import login as login_registry

    if password_stdin:
        if username is None:
            raise UsageError("--password-stdin needs --username/-u")
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        username = username or typer.prompt("Username")
        password = typer.prompt("Password", hide_input=True)
    if not password:
        raise UsageError("an empty password was given")
    path = login_registry(registry, Credentials(username, password), plain_http=plain_http, insecure=insecure)
    print(f"Login succeeded: credentials for {registry} saved in {path}")
