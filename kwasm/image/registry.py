"""Push and pull wasm images between the local store and OCI registries.

Push sends an image exactly as stored (the same manifest bytes, so the same digest): the
container-image form, or the CNCF wasm artifact form for artifact images. Blobs the registry
already has are not sent again. Pull accepts a wasm image (tar layers, platform ``*/wasm`` or an
entrypoint ending in ``.wasm``) or a wasm artifact, picks the wasm platform from a multi-platform
index, and verifies every blob's digest and size before it becomes visible in the store; a failed
pull leaves the store as it was.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from kwasm.errors import (
    DigestMismatchError,
    ImageNotFoundError,
    InvalidImageError,
    RegistryUnreachableError,
    UsageError,
)
from kwasm.image.auth import Credentials, load_credentials, store_credentials
from kwasm.image.reference import DEFAULT_REGISTRY, Reference
from kwasm.image.registry_client import MAX_MANIFEST_BYTES, RegistryClient
from kwasm.image.store import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_LAYER_TAR_GZIP,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER_TAR,
    MEDIA_OCI_LAYER_TAR_GZIP,
    MEDIA_OCI_MANIFEST,
    MEDIA_WASM_CONFIG,
    MEDIA_WASM_LAYER,
    ImageStore,
    StoredImage,
    sha256_digest,
)

MEDIA_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_INDEX_TYPES = {MEDIA_OCI_INDEX, MEDIA_DOCKER_MANIFEST_LIST}
_MANIFEST_TYPES = {MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST}
_IMAGE_CONFIG_TYPES = {MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG}
_TAR_LAYER_TYPES = {MEDIA_OCI_LAYER_TAR, MEDIA_OCI_LAYER_TAR_GZIP, MEDIA_DOCKER_LAYER_TAR_GZIP}
_WASM_OS_PREFERENCE = ["wasip1", "wasi", "wasip2"]


class TransferProgress(Protocol):
    """Receives blob transfer events (the CLI draws them as rich progress bars)."""

    def begin(self, digest: str, size: int, action: str) -> None:
        """A blob transfer starts; ``action`` is ``upload``, ``download`` or ``exists`` (skipped)."""

    def advance(self, digest: str, count: int) -> None:
        """``count`` more bytes of blob ``digest`` were transferred."""

    def finish(self, digest: str) -> None:
        """The transfer of blob ``digest`` is complete."""


class NoProgress:
    """Transfer events ignored (the default, and the CLI's choice when stderr is not a terminal)."""

    def begin(self, digest: str, size: int, action: str) -> None:
        """Ignore the event."""

    def advance(self, digest: str, count: int) -> None:
        """Ignore the event."""

    def finish(self, digest: str) -> None:
        """Ignore the event."""


@dataclass(frozen=True)
class TransferResult:
    """What a push or pull did: the reference, the manifest digest, and which blobs moved."""

    reference: Reference
    digest: str
    transferred: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def connect(reference: Reference, *, plain_http: bool | None = None, insecure: bool = False) -> RegistryClient:
    """A client for ``reference``'s repository, authenticated with the stored Docker credentials."""
    client = RegistryClient(
        reference.registry,
        reference.repository,
        credentials=load_credentials(reference.registry),
        plain_http=plain_http,
        insecure=insecure,
    )
    try:
        client.connect()
    except BaseException:
        client.close()
        raise
    return client


def login(
    registry: str,
    credentials: Credentials,
    *,
    plain_http: bool | None = None,
    insecure: bool = False,
    config_path: Path | None = None,
) -> Path:
    """Check ``credentials`` against ``registry`` (basic or token auth) and store them; return the config path."""
    registry = registry.removeprefix("https://").removeprefix("http://").rstrip("/")
    if not registry or "/" in registry:
        raise UsageError(f"give a registry host such as 127.0.0.1:5000, not {registry!r}")
    with RegistryClient(registry, credentials=credentials, plain_http=plain_http, insecure=insecure) as client:
        client.connect()
    return store_credentials(registry, credentials, config_path)


# ------------------------------------------------------------------- push


def push(
    store: ImageStore,
    source: str,
    destination: str | None = None,
    *,
    artifact: bool = False,
    plain_http: bool | None = None,
    insecure: bool = False,
    progress: TransferProgress | None = None,
) -> TransferResult:
    """Push the stored image ``source`` to ``destination`` (default: its own name) with the same digest.

    ``artifact=True`` pushes a container-image wasm image as a CNCF wasm artifact instead (converted in
    the local store first, reproducibly).
    """
    image = store.resolve(source)
    if artifact and not image.is_artifact:
        image = as_artifact(store, image)
    if destination is not None:
        target = Reference.parse(destination)
    elif image.reference is not None:
        target = image.reference
    else:
        raise UsageError(f"{source} has no name to push to: give a destination like 127.0.0.1:5000/app:1")
    if target.digest is not None or target.tag is None:
        raise UsageError(f"push destination must be name:tag, not a digest: {destination}")
    progress = progress or NoProgress()
    with connect(target, plain_http=plain_http, insecure=insecure) as client:
        sent: list[str] = []
        skipped: list[str] = []
        for descriptor in [image.manifest["config"], *image.layers]:
            digest, size = str(descriptor["digest"]), int(descriptor["size"])
            if client.has_blob(digest):
                progress.begin(digest, size, "exists")
                skipped.append(digest)
            else:
                progress.begin(digest, size, "upload")
                client.upload_blob(digest, size, store.blob_path(digest), _advancer(progress, digest))
                sent.append(digest)
            progress.finish(digest)
        manifest_bytes = store.read_blob(image.manifest_digest)
        media_type = str(image.manifest.get("mediaType") or MEDIA_OCI_MANIFEST)
        client.put_manifest(target.tag, manifest_bytes, media_type)
    return TransferResult(target, image.manifest_digest, sent, skipped)


def as_artifact(store: ImageStore, image: StoredImage) -> StoredImage:
    """The CNCF wasm artifact form of a container-image wasm image, stored (untagged) next to it."""
    from kwasm.image.builder import assemble_artifact, store_image

    name = image.reference.familiar() if image.reference else image.manifest_digest
    config = image.config
    dropped = [
        field_name
        for field_name, value in (("Cmd", config.cmd), ("Env", config.env), ("Labels", config.labels),
                                  ("WorkingDir", config.working_dir), ("extra Entrypoint args", config.entrypoint[1:]))
        if value
    ]  # fmt: skip
    if dropped:
        raise UsageError(f"cannot push {name} as a wasm artifact: its config has no place for {', '.join(dropped)}")
    if config.architecture != "wasm" or "#" in "".join(config.entrypoint):
        raise UsageError(f"cannot push {name} as a wasm artifact: platform {config.platform} is not */wasm")
    module = store.module_path(image)
    epoch = 0
    if config.created:
        epoch = int(datetime.fromisoformat(config.created.replace("Z", "+00:00")).timestamp())
    assembled = assemble_artifact(module.read_bytes(), module.name, config.platform, epoch)
    store_image(store, assembled, [])
    by_digest = f"{image.reference.name() if image.reference else 'artifact'}@{assembled.manifest_digest}"
    return store.resolve(by_digest)


def _advancer(progress: TransferProgress, digest: str) -> Callable[[int], None]:
    return lambda count: progress.advance(digest, count)


# ------------------------------------------------------------------- pull


def _parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise InvalidImageError(f"{what} is not valid JSON") from exc
    if not isinstance(parsed, dict):
        raise InvalidImageError(f"{what} is not a JSON object")
    return parsed


def _descriptor(value: Any, what: str) -> tuple[str, int]:
    if not isinstance(value, dict) or not isinstance(value.get("digest"), str):
        raise InvalidImageError(f"{what} has a descriptor without a digest")
    size = value.get("size")
    if not isinstance(size, int) or size < 0:
        raise InvalidImageError(f"{what} has a descriptor for {value['digest']} without a valid size")
    return value["digest"], size


def _verified(data: bytes, digest: str, size: int | None, what: str) -> bytes:
    actual = sha256_digest(data)
    if actual != digest:
        raise DigestMismatchError(f"{what} does not match its digest: expected {digest}, got {actual}")
    if size is not None and len(data) != size:
        raise DigestMismatchError(f"{what} has {len(data)} bytes, its descriptor says {size}")
    return data


def _platform_name(entry: dict[str, Any]) -> str:
    platform = entry.get("platform") or {}
    return f"{platform.get('os', '?')}/{platform.get('architecture', '?')}"


def choose_platform(index: dict[str, Any], name: str) -> dict[str, Any]:
    """The wasm manifest descriptor of a multi-platform index (wasip1 preferred over wasi, wasip2)."""
    entries = [e for e in index.get("manifests") or [] if isinstance(e, dict)]
    wasm = [e for e in entries if (e.get("platform") or {}).get("architecture") == "wasm"]

    def rank(entry: dict[str, Any]) -> int:
        os_name = (entry.get("platform") or {}).get("os")
        return _WASM_OS_PREFERENCE.index(os_name) if os_name in _WASM_OS_PREFERENCE else len(_WASM_OS_PREFERENCE)

    if wasm:
        return min(wasm, key=rank)
    if len(entries) == 1:
        return entries[0]
    platforms = ", ".join(_platform_name(e) for e in entries) or "none"
    raise InvalidImageError(f"{name} has no wasm platform (it offers {platforms}); kwasm pulls wasm images only")


def check_wasm_image(name: str, manifest: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse a manifest that is neither a wasm image nor a CNCF wasm artifact, saying what it is."""
    config_type = (manifest.get("config") or {}).get("mediaType")
    layers = [layer for layer in manifest.get("layers") or [] if isinstance(layer, dict)]
    layer_types = {layer.get("mediaType") for layer in layers}
    if config_type == MEDIA_WASM_CONFIG:
        if len(layers) != 1 or layer_types != {MEDIA_WASM_LAYER}:
            raise InvalidImageError(f"{name} is a wasm artifact but not one application/wasm layer")
        return
    if config_type not in _IMAGE_CONFIG_TYPES:
        raise InvalidImageError(f"{name} is neither a wasm image nor a wasm artifact (config type {config_type})")
    runtime = config.get("config") or {}
    program = [*(runtime.get("Entrypoint") or []), *(runtime.get("Cmd") or [])]
    platform = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    if config.get("architecture") != "wasm" and not (program and str(program[0]).endswith(".wasm")):
        raise InvalidImageError(
            f"{name} is neither a wasm image nor a wasm artifact (platform {platform}, "
            f"entrypoint {json.dumps(program)})"
        )
    unsupported = layer_types - _TAR_LAYER_TYPES
    if unsupported:
        raise InvalidImageError(f"{name}: layer type {sorted(map(str, unsupported))[0]} is not supported")


def _fetch_manifest(client: RegistryClient, reference: Reference) -> tuple[str, bytes, dict[str, Any]]:
    """Manifest digest, bytes and JSON for ``reference``, going through an index if there is one."""
    name = reference.familiar()
    body, media_type = client.get_manifest(reference.digest or reference.tag or "latest")
    digest = sha256_digest(body)
    if reference.digest is not None:
        _verified(body, reference.digest, None, f"manifest of {name}")
    document = _parse_json(body, f"manifest of {name}")
    if media_type in _INDEX_TYPES:
        entry = choose_platform(document, name)
        digest, size = _descriptor(entry, f"index of {name}")
        if size > MAX_MANIFEST_BYTES:
            raise InvalidImageError(f"{name}: manifest {digest} is larger than 4 MiB")
        body, media_type = client.get_manifest(digest)
        _verified(body, digest, size, f"manifest {digest} of {name}")
        document = _parse_json(body, f"manifest of {name}")
    if media_type not in _MANIFEST_TYPES:
        raise InvalidImageError(f"{name} is neither a wasm image nor a wasm artifact (manifest type {media_type})")
    return digest, body, document


def _counted(chunks: Iterable[bytes], progress: TransferProgress, digest: str) -> Iterator[bytes]:
    for chunk in chunks:
        progress.advance(digest, len(chunk))
        yield chunk


def pull(
    store: ImageStore,
    ref: str,
    *,
    plain_http: bool | None = None,
    insecure: bool = False,
    progress: TransferProgress | None = None,
) -> TransferResult:
    """Fetch ``ref`` into the store, verifying every digest and size; tag it unless pulled by digest only."""
    reference = Reference.parse(ref)
    name = reference.familiar()
    progress = progress or NoProgress()
    with connect(reference, plain_http=plain_http, insecure=insecure) as client:
        digest, body, manifest = _fetch_manifest(client, reference)
        config_digest, config_size = _descriptor(manifest.get("config"), f"manifest of {name}")
        if config_size > MAX_MANIFEST_BYTES:
            raise InvalidImageError(f"{name}: config {config_digest} is larger than 4 MiB")
        config_bytes = _verified(
            b"".join(client.stream_blob(config_digest, config_size)), config_digest, config_size, f"config of {name}"
        )
        check_wasm_image(name, manifest, _parse_json(config_bytes, f"config of {name}"))
        layers = [_descriptor(layer, f"manifest of {name}") for layer in manifest.get("layers") or []]
        fetched: list[str] = []
        skipped: list[str] = []
        with store.ingest():
            store.put_blob(config_bytes, config_digest)
            for layer_digest, size in layers:
                if store.has_blob(layer_digest):
                    progress.begin(layer_digest, size, "exists")
                    skipped.append(layer_digest)
                else:
                    progress.begin(layer_digest, size, "download")
                    chunks = _counted(client.stream_blob(layer_digest, size), progress, layer_digest)
                    try:
                        store.put_blob_stream(chunks, layer_digest, size)
                    except DigestMismatchError as exc:
                        raise DigestMismatchError(f"layer of {name} from {reference.registry}: {exc}") from None
                    fetched.append(layer_digest)
                progress.finish(layer_digest)
            store.put_blob(body, digest)
            if reference.tag is not None:
                store.tag(reference.with_tag(reference.tag), digest)
    return TransferResult(reference, digest, fetched, skipped)


def ensure_local(store: ImageStore, ref: str, *, progress: TransferProgress | None = None) -> StoredImage:
    """The stored image ``ref``; pulled from its registry first if it is not in the store."""
    try:
        return store.resolve(ref)
    except ImageNotFoundError:
        reference = Reference.parse(ref)
        try:
            result = pull(store, ref, progress=progress)
        except RegistryUnreachableError as exc:
            if reference.registry == DEFAULT_REGISTRY and not ref.startswith(DEFAULT_REGISTRY):
                raise ImageNotFoundError(f"image {ref} is not in the local store, and {exc}") from exc
            raise
        return store.resolve(result.reference)
