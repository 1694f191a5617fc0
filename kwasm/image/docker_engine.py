"""Loading images from the local store into a Docker engine through the docker SDK.

The engine is the one ``DOCKER_HOST`` names (default ``unix:///var/run/docker.sock``); the API
version is negotiated, so old (20.10) and new engines both work. The image travels as the dual
OCI-layout/docker-archive tar of :mod:`kwasm.image.archive`.

Docker's classic image store loads only images for the host's OS: it refuses a ``wasip1/wasm``
image ("cannot load wasip1 image on linux"). That refusal becomes one line saying why and what
to do: build with ``--platform linux/amd64``, or switch the engine to the containerd image store,
which loads wasm images.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import docker
import docker.errors

from kwasm.errors import ToolMissingError
from kwasm.image.archive import write_archive
from kwasm.image.store import ImageStore, StoredImage

CONTAINERD_STORE_HINT = 'the containerd image store ("features": {"containerd-snapshotter": true} in daemon.json)'
_PLATFORM_REFUSALS = ("cannot load", "operating system is not supported", "unknown operating system")
_CONNECT_FAILURES = (
    ("FileNotFoundError", "no such socket"),
    ("ConnectionRefused", "connection refused"),
    ("Connection refused", "connection refused"),
    ("PermissionError", "permission denied"),
    ("timed out", "timed out"),
)


def docker_host() -> str:
    """The engine address the docker SDK will use: ``$DOCKER_HOST`` or the default socket."""
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def docker_client() -> docker.DockerClient:
    """A docker SDK client for ``$DOCKER_HOST`` with a negotiated API version."""
    try:
        client = docker.from_env(version="auto", timeout=120)
    except docker.errors.DockerException as exc:
        raise _unreachable(exc) from None
    return client


def _unreachable(exc: BaseException) -> ToolMissingError:
    text = str(exc)
    reason = next((why for marker, why in _CONNECT_FAILURES if marker in text), _first_line(exc))
    return ToolMissingError(
        f"cannot reach the Docker engine at {docker_host()}: {reason} (is dockerd running? is DOCKER_HOST right?)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "explanation", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _name(image: StoredImage) -> str:
    return image.reference.familiar() if image.reference else image.manifest_digest[:19]


def _refusal(image: StoredImage, reason: str) -> ToolMissingError:
    name = _name(image)
    if image.is_artifact:
        return ToolMissingError(
            f"the Docker engine refused {name} ({reason}): it is a wasm artifact, which only {CONTAINERD_STORE_HINT} "
            "loads; or build the image form with --platform linux/amd64"
        )
    if any(marker in reason.lower() for marker in _PLATFORM_REFUSALS) or image.config.os != "linux":
        return ToolMissingError(
            f"the Docker engine refused {name} ({reason}): its image store loads only linux images, "
            f"not {image.config.platform}; rebuild with `kwasm build --platform linux/amd64` or enable "
            f"{CONTAINERD_STORE_HINT}"
        )
    return ToolMissingError(f"the Docker engine refused {name}: {reason}")


def load_into_docker(store: ImageStore, image: StoredImage) -> str:
    """Load ``image`` into the Docker engine at ``$DOCKER_HOST``; return the engine's image ID."""
    client = docker_client()
    try:
        with tempfile.TemporaryDirectory(prefix="kwasm-docker-") as scratch:
            archive = Path(scratch) / "image.tar"
            write_archive(store, [image], archive)
            with archive.open("rb") as data:
                loaded = client.images.load(data)
    except docker.errors.ImageLoadError as exc:
        raise _refusal(image, _first_line(exc)) from None
    except docker.errors.APIError as exc:
        if exc.status_code is not None and exc.status_code < 500 and exc.status_code != 400:
            raise ToolMissingError(f"the Docker engine failed to load {_name(image)}: {_first_line(exc)}") from None
        raise _refusal(image, _first_line(exc)) from None
    except (docker.errors.DockerException, OSError) as exc:  # requests' errors are OSErrors
        raise _unreachable(exc) from None
    finally:
        client.close()
    if not loaded:
        raise ToolMissingError(f"the Docker engine loaded nothing from the archive of {_name(image)}")
    return str(loaded[0].id)
