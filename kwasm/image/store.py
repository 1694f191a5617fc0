"""The local content-addressed image store.

Layout under the data root::

    blobs/sha256/<hex>     every blob (manifests, configs, layers), named by its digest
    refs.json              {"docker.io/library/app:latest": "sha256:<manifest>", ...}
    rootfs/<hex>/          a tar image's layers unpacked once (for ``kwasm run``), per manifest digest
    tmp/                   staging for atomic writes

Blobs are written to ``tmp/`` and renamed into place, so a reader never sees a partial blob; the
reference table is changed under a file lock, so two ``kwasm`` processes can write at once.
Multi-step imports (build, pull, load) run inside :meth:`ImageStore.ingest`, which removes the blobs it
added if the import fails, so a failed import leaves the store as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kwasm.errors import (
    DigestMismatchError,
    ImageNotFoundError,
    InvalidImageError,
    NotFoundError,
    StoreError,
    UnsafeArchiveError,
    UsageError,
)
from kwasm.image.locking import StoreLock
from kwasm.image.reference import Reference

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_WASM_CONFIG = "application/vnd.wasm.config.v0+json"
MEDIA_WASM_LAYER = "application/wasm"

_TAR_LAYER_TYPES = {MEDIA_OCI_LAYER_TAR, MEDIA_OCI_LAYER_TAR_GZIP, MEDIA_DOCKER_LAYER_TAR_GZIP}
_HEX = frozenset("0123456789abcdef")


def sha256_digest(data: bytes) -> str:
    """The OCI digest (``sha256:<hex>``) of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hex_of(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    if algorithm != "sha256" or len(hexpart) != 64 or not set(hexpart) <= _HEX:
        raise InvalidImageError(f"unsupported or malformed digest {digest!r}")
    return hexpart


@dataclass(frozen=True)
class ImageConfig:
    """What kwasm needs from an image config (OCI image config or CNCF wasm artifact config)."""

    os: str
    architecture: str
    entrypoint: list[str]
    cmd: list[str]
    env: list[str]
    working_dir: str
    labels: dict[str, str]
    created: str | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageConfig:
        """Normalise a parsed config blob (either kind) into an :class:`ImageConfig`."""
        if not isinstance(data, dict):
            raise InvalidImageError("image config is not a JSON object")
        runtime = data.get("config") or {}
        if not isinstance(runtime, dict):
            raise InvalidImageError("image config field 'config' is not a JSON object")
        return cls(
            os=str(data.get("os", "")),
            architecture=str(data.get("architecture", "")),
            entrypoint=list(runtime.get("Entrypoint") or []),
            cmd=list(runtime.get("Cmd") or []),
            env=list(runtime.get("Env") or []),
            working_dir=str(runtime.get("WorkingDir") or ""),
            labels=dict(runtime.get("Labels") or {}),
            created=data.get("created"),
        )

    @property
    def platform(self) -> str:
        """``os/architecture``, e.g. ``wasip1/wasm``."""
        return f"{self.os}/{self.architecture}"


@dataclass(frozen=True)
class StoredImage:
    """An image in the local store: its reference (if tagged), manifest and normalised config."""

    reference: Reference | None
    manifest_digest: str
    manifest: dict[str, Any]
    config: ImageConfig
    is_artifact: bool
    size: int

    @property
    def config_digest(self) -> str:
        """Digest of the config blob (Docker's image ID)."""
        return str(self.manifest["config"]["digest"])

    @property
    def layers(self) -> list[dict[str, Any]]:
        """The manifest's layer descriptors."""
        return list(self.manifest.get("layers", []))


class ImageStore:
    """A content-addressed image store rooted at a directory (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = StoreLock(self.root / ".lock")
        self._added: list[Path] | None = None

    @classmethod
    def default(cls) -> ImageStore:
        """The store at the CLI's data root (``--root``, ``$KWASM_ROOT``, /var/lib/kwasm or XDG)."""
        from kwasm.cli.state import data_root

        return cls(data_root())

    # ----------------------------------------------------------------- blobs

    def has_blob(self, digest: str) -> bool:
        """Whether the blob named ``digest`` is stored."""
        return self._blob_file(digest).is_file()

    def blob_path(self, digest: str) -> Path:
        """The file holding blob ``digest``; :class:`NotFoundError` if it is not stored."""
        path = self._blob_file(digest)
        if not path.is_file():
            raise NotFoundError(f"blob {digest} is not in the local store")
        return path

    def read_blob(self, digest: str) -> bytes:
        """The bytes of blob ``digest``, checked against the digest."""
        data = self.blob_path(digest).read_bytes()
        if sha256_digest(data) != digest:
            raise DigestMismatchError(f"stored blob {digest} is corrupt (content does not match its digest)")
        return data

    def put_blob(self, data: bytes, expected: str | None = None) -> str:
        """Store ``data`` and return its digest; :class:`DigestMismatchError` if it is not ``expected``."""
        digest = sha256_digest(data)
        if expected is not None and digest != expected:
            raise DigestMismatchError(f"content does not match its digest: expected {expected}, got {digest}")
        return self.put_blob_stream([data], digest, len(data))

    def put_blob_stream(self, chunks: Iterable[bytes], expected: str, size: int | None = None) -> str:
        """Store a blob from ``chunks``, verifying its digest and (if given) size before it becomes visible."""
        target = self._blob_file(expected)
        if target.is_file():
            return expected
        hasher = hashlib.sha256()
        written = 0
        with self._staging_file() as (handle, staged):
            for chunk in chunks:
                hasher.update(chunk)
                written += len(chunk)
                handle.write(chunk)
            handle.flush()
            actual = "sha256:" + hasher.hexdigest()
            if actual != expected:
                raise DigestMismatchError(
                    f"content does not match its digest: expected {expected}, got {actual}"
                )
            if size is not None and written != size:
                raise DigestMismatchError(f"blob {expected} has {written} bytes, expected {size}")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
        if self._added is not None:
            self._added.append(target)
        return expected

    # ------------------------------------------------------------ references

    @contextlib.contextmanager
    def ingest(self) -> Iterator[ImageStore]:
        """Hold the store lock for a multi-step import; on error, remove the blobs it added."""
        with self._lock:
            outer = self._added
            self._added = []
            try:
                yield self
            except BaseException:
                for path in self._added:
                    path.unlink(missing_ok=True)
                raise
            finally:
                if outer is not None:
                    outer.extend(self._added)
                self._added = outer

    def tag(self, ref: Reference | str, manifest_digest: str) -> None:
        """Point ``ref`` at a stored manifest; its config and layers must be stored too."""
        reference = _as_reference(ref)
        if reference.digest is not None:
            raise UsageError(f"cannot tag with a digest reference: {reference.familiar()}")
        with self._lock:  # checked under the lock, so a concurrent rmi cannot collect the blobs in between
            manifest = self._load_manifest(manifest_digest)
            for descriptor in [manifest["config"], *manifest.get("layers", [])]:
                if not self.has_blob(descriptor["digest"]):
                    raise StoreError(f"cannot tag {reference.familiar()}: blob {descriptor['digest']} is missing")
            refs = self._read_refs()
            refs[str(reference)] = manifest_digest
            self._write_refs(refs)

    def untag(self, ref: Reference | str) -> None:
        """Remove ``ref`` and delete the blobs no other reference needs."""
        reference = _as_reference(ref)
        with self._lock:
            refs = self._read_refs()
            if str(reference) not in refs:
                raise ImageNotFoundError(f"image {reference.familiar()} is not in the local store")
            del refs[str(reference)]
            self._write_refs(refs)
            self._collect_garbage(refs)

    def resolve(self, ref: Reference | str) -> StoredImage:
        """Look up an image by ``name:tag``, ``name@digest``, a digest or an ID prefix."""
        text = str(ref)
        refs = self._read_refs()
        candidate = text.removeprefix("sha256:")
        if len(candidate) >= 4 and set(candidate) <= _HEX and (len(candidate) < 64 or text.startswith("sha")):
            matches = {
                digest
                for digest in refs.values()
                if digest[7:].startswith(candidate) or self._config_digest(digest)[7:].startswith(candidate)
            }
            if len(matches) > 1:
                raise UsageError(f"{text!r} matches more than one image; give more digits")
            if matches:
                found = matches.pop()
                return self._image(found, self._first_reference(refs, found))
        reference = _as_reference(ref)
        if reference.digest is not None:
            if not self.has_blob(reference.digest):
                raise ImageNotFoundError(f"image {reference.familiar()} is not in the local store")
            return self._image(reference.digest, None)
        digest = refs.get(str(reference))
        if digest is None:
            raise ImageNotFoundError(f"image {reference.familiar()} is not in the local store")
        return self._image(digest, reference)

    def images(self) -> list[StoredImage]:
        """Every tagged image that can be read, sorted by reference (see :meth:`scan`)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[StoredImage], dict[str, str]]:
        """Readable tagged images, and the tags whose image cannot be read mapped to why."""
        images: list[StoredImage] = []
        broken: dict[str, str] = {}
        for name, digest in sorted(self._read_refs().items()):
            reference = Reference.parse(name)
            try:
                images.append(self._image(digest, reference))
            except (InvalidImageError, ImageNotFoundError) as exc:
                broken[reference.familiar()] = str(exc)
        return images, broken

    # ------------------------------------------------------------- contents

    def module_path(self, image: StoredImage) -> Path:
        """The ``.wasm`` file to run: an artifact's layer blob, or the entrypoint in a tar image's rootfs."""
        if image.is_artifact:
            wasm_layers = [layer for layer in image.layers if layer.get("mediaType") == MEDIA_WASM_LAYER]
            if len(wasm_layers) != 1:
                raise InvalidImageError(f"{_describe(image)}: a wasm artifact must have exactly one wasm layer")
            return self.blob_path(wasm_layers[0]["digest"])
        program = [*image.config.entrypoint, *image.config.cmd]
        if not program:
            raise InvalidImageError(f"{_describe(image)} has no entrypoint or cmd to run")
        rootfs = self.unpack(image)
        relative = program[0]
        if not relative.startswith("/"):
            relative = f"{image.config.working_dir or '/'}/{relative}"
        path = (rootfs / relative.lstrip("/")).resolve()
        if not path.is_relative_to(rootfs.resolve()) or not path.is_file():
            raise InvalidImageError(f"{_describe(image)}: entrypoint {program[0]} is not a file in the image")
        return path

    def unpack(self, image: StoredImage) -> Path:
        """The image's layers unpacked into a directory, once per manifest digest (entries can't escape)."""
        target = self.root / "rootfs" / _hex_of(image.manifest_digest)
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="rootfs-", dir=self._tmp_dir()))
        try:
            for layer in image.layers:
                if layer.get("mediaType") not in _TAR_LAYER_TYPES:
                    raise InvalidImageError(f"{_describe(image)}: layer type {layer.get('mediaType')} is not a tar")
                try:
                    with tarfile.open(self.blob_path(layer["digest"]), mode="r:*") as archive:
                        archive.extractall(staging, filter="data")
                except tarfile.FilterError as exc:
                    raise UnsafeArchiveError(f"{_describe(image)}: unsafe layer entry: {exc}") from exc
                except (tarfile.TarError, EOFError) as exc:
                    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
                    raise InvalidImageError(
                        f"{_describe(image)}: layer {layer['digest'][:19]} is not a readable tar ({reason})"
                    ) from exc
                except OSError as exc:
                    raise StoreError(f"cannot unpack {_describe(image)}: {exc.strerror or exc}") from exc
            try:
                os.replace(staging, target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    # -------------------------------------------------------------- private

    def _blob_file(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / _hex_of(digest)

    def _tmp_dir(self) -> Path:
        path = self.root / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def _staging_file(self) -> Iterator[tuple[Any, Path]]:
        handle = tempfile.NamedTemporaryFile(dir=self._tmp_dir(), delete=False)  # noqa: SIM115
        staged = Path(handle.name)
        try:
            with handle:
                yield handle, staged
        finally:
            staged.unlink(missing_ok=True)

    def _read_refs(self) -> dict[str, str]:
        path = self.root / "refs.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise StoreError(f"cannot read {path}: not a JSON object")
        return {str(key): str(value) for key, value in data.items()}

    def _write_refs(self, refs: dict[str, str]) -> None:
        with self._staging_file() as (handle, staged):
            handle.write(json.dumps(refs, indent=2, sort_keys=True).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(staged, self.root / "refs.json")

    def _load_manifest(self, digest: str) -> dict[str, Any]:
        try:
            manifest = json.loads(self.read_blob(digest))
        except NotFoundError as exc:
            raise ImageNotFoundError(f"manifest {digest} is not in the local store") from exc
        except ValueError as exc:
            raise InvalidImageError(f"manifest {digest} is not valid JSON") from exc
        if not isinstance(manifest, dict) or "config" not in manifest:
            raise InvalidImageError(f"blob {digest} is not an image manifest")
        return manifest

    def _config_digest(self, manifest_digest: str) -> str:
        return str(self._load_manifest(manifest_digest)["config"]["digest"])

    def _image(self, digest: str, reference: Reference | None) -> StoredImage:
        manifest = self._load_manifest(digest)
        config_descriptor = manifest["config"]
        try:
            config_json = json.loads(self.read_blob(config_descriptor["digest"]))
        except ValueError as exc:
            raise InvalidImageError(f"config of {digest} is not valid JSON") from exc
        size = self.blob_path(digest).stat().st_size + int(config_descriptor.get("size", 0))
        size += sum(int(layer.get("size", 0)) for layer in manifest.get("layers", []))
        return StoredImage(
            reference=reference,
            manifest_digest=digest,
            manifest=manifest,
            config=ImageConfig.from_json(config_json),
            is_artifact=config_descriptor.get("mediaType") == MEDIA_WASM_CONFIG,
            size=size,
        )

    @staticmethod
    def _first_reference(refs: dict[str, str], digest: str) -> Reference | None:
        names = sorted(name for name, target in refs.items() if target == digest)
        return Reference.parse(names[0]) if names else None

    def _collect_garbage(self, refs: dict[str, str]) -> None:
        keep: set[str] = set()
        for digest in set(refs.values()):
            try:
                manifest = self._load_manifest(digest)
            except (InvalidImageError, ImageNotFoundError):
                return  # which blobs a broken image still needs is unknown: collect nothing
            keep.add(_hex_of(digest))
            keep.update(_hex_of(d["digest"]) for d in [manifest["config"], *manifest.get("layers", [])])
        blobs = self.root / "blobs" / "sha256"
        if blobs.is_dir():
            for path in blobs.iterdir():
                if path.name not in keep:
                    path.unlink(missing_ok=True)
        rootfs = self.root / "rootfs"
        if rootfs.is_dir():
            for path in rootfs.iterdir():
                if path.name not in keep:
                    shutil.rmtree(path, ignore_errors=True)


def _as_reference(ref: Reference | str) -> Reference:
    return ref if isinstance(ref, Reference) else Reference.parse(ref)


def _describe(image: StoredImage) -> str:
    return f"image {image.reference.familiar()}" if image.reference else f"image {image.manifest_digest[:19]}"
