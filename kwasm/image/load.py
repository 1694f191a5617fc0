"""Reading images from archives into the local store (``kwasm load``).

Accepted inputs: an OCI image layout as a tar or a directory (``index.json`` is the root, as containerd
reads it), and a docker-archive (``manifest.json``, as ``docker save`` writes it, old or new style). A tar
that is both is read as an OCI layout. Tars may be gzip/bzip2/xz compressed.

Nothing is stored until the whole input has been checked: every entry name (no absolute paths, no
``..``, no links leading out, no device nodes), every blob against its digest and size, every
docker-archive layer against the config's ``diff_ids``. Only then are the blobs written and the names
tagged, inside one :meth:`~kwasm.image.store.ImageStore.ingest`, so a failure leaves the store unchanged.
"""

from __future__ import annotations

import gzip
import json
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kwasm.errors import DigestMismatchError, InvalidImageError, NotFoundError, UnsafeArchiveError, UsageError
from kwasm.image.archive import ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME, blob_name
from kwasm.image.builder import canonical_json
from kwasm.image.reference import Reference
from kwasm.image.store import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER_TAR,
    MEDIA_OCI_LAYER_TAR_GZIP,
    MEDIA_OCI_MANIFEST,
    ImageStore,
    sha256_digest,
)

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_INDEX_TYPES = {MEDIA_OCI_INDEX, "application/vnd.docker.distribution.manifest.list.v2+json"}


@dataclass
class LoadedImage:
    """One image read from an archive: its names, manifest digest and blobs (verified)."""

    references: list[Reference]
    manifest_digest: str
    platform: str
    blobs: dict[str, bytes] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` view of a loaded image."""
        return {
            "references": [ref.familiar() for ref in self.references],
            "manifest_digest": self.manifest_digest,
            "platform": self.platform,
        }


class _Source:
    """Files of an archive (tar or directory) by their normalised relative name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            return
        try:
            self.tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 (closed by close())
            members = self.tar.getmembers()
        except FileNotFoundError:
            raise NotFoundError(f"no such file: {path}") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InvalidImageError(f"{path}: not a readable tar archive ({exc})") from None
        for member in members:
            name = self._checked_name(member)
            if name:
                self.members[name] = member

    def _checked_name(self, member: tarfile.TarInfo) -> str:
        """The member's normalised name; :class:`UnsafeArchiveError` if it could escape."""
        name = member.name
        while name.startswith("./"):
            name = name[2:]
        name = name.rstrip("/")
        if name.startswith("/") or ".." in name.split("/"):
            raise UnsafeArchiveError(f"{self.path}: entry {member.name!r} would land outside the target")
        if member.issym():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
            if member.linkname.startswith("/") or target == ".." or target.startswith("../"):
                raise UnsafeArchiveError(
                    f"{self.path}: link {member.name!r} -> {member.linkname!r} points outside the archive"
                )
        elif member.islnk() and (member.linkname.startswith("/") or ".." in member.linkname.split("/")):
            raise UnsafeArchiveError(f"{self.path}: hard link {member.name!r} -> {member.linkname!r} escapes")
        elif not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise UnsafeArchiveError(f"{self.path}: entry {member.name!r} is a device node or FIFO")
        return name

    def has(self, name: str) -> bool:
        """Whether the archive holds a file called ``name``."""
        if self.tar is None:
            return (self.path / name).is_file()
        member = self.members.get(name)
        return member is not None and not member.isdir()

    def read(self, name: str) -> bytes:
        """The bytes of file ``name``; :class:`InvalidImageError` if it is missing."""
        if self.tar is None:
            path = (self.path / name).resolve()
            if not path.is_relative_to(self.path.resolve()):
                raise UnsafeArchiveError(f"{self.path}: {name} points outside the layout")
            try:
                return path.read_bytes()
            except OSError:
                raise InvalidImageError(f"{self.path}: {name} is missing") from None
        member = self.members.get(name)
        handle = self.tar.extractfile(member) if member is not None else None
        if handle is None:
            raise InvalidImageError(f"{self.path}: {name} is missing from the archive")
        with handle:
            return handle.read()

    def read_json(self, name: str) -> Any:
        """File ``name`` parsed as JSON."""
        try:
            return json.loads(self.read(name))
        except ValueError as exc:
            raise InvalidImageError(f"{self.path}: {name} is not valid JSON ({exc})") from None

    def blob(self, descriptor: dict[str, Any]) -> tuple[str, bytes]:
        """The blob a descriptor names, checked against its digest and size."""
        digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise InvalidImageError(f"{self.path}: unsupported or malformed digest {digest!r}")
        data = self.read(blob_name(digest))
        if sha256_digest(data) != digest:
            raise DigestMismatchError(f"{self.path}: {blob_name(digest)} does not match its digest")
        if "size" in descriptor and descriptor["size"] != len(data):
            raise DigestMismatchError(
                f"{self.path}: {blob_name(digest)} is {len(data)} bytes, descriptor says {descriptor['size']}"
            )
        return digest, data

    def close(self) -> None:
        """Close the tar file, if any."""
        if self.tar is not None:
            self.tar.close()


def _reference(text: str, where: Path) -> Reference:
    try:
        return Reference.parse(text)
    except UsageError as exc:
        raise InvalidImageError(f"{where}: bad image name in archive: {exc}") from None


def _platform(config: Any, where: Path) -> str:
    if not isinstance(config, dict):
        raise InvalidImageError(f"{where}: an image config is not a JSON object")
    return f"{config.get('os', '?')}/{config.get('architecture', '?')}"


def _read_manifest(source: _Source, descriptor: dict[str, Any], names: list[Reference]) -> LoadedImage:
    """Read and verify one manifest and everything it references."""
    digest, manifest_bytes = source.blob(descriptor)
    try:
        manifest = json.loads(manifest_bytes)
        parts = [manifest["config"], *manifest.get("layers", [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidImageError(f"{source.path}: manifest {digest} is not an image manifest ({exc})") from None
    image = LoadedImage(references=names, manifest_digest=digest, platform="?", blobs={digest: manifest_bytes})
    for part in parts:
        part_digest, data = source.blob(part)
        image.blobs[part_digest] = data
    try:
        image.platform = _platform(json.loads(image.blobs[manifest["config"]["digest"]]), source.path)
    except ValueError:
        raise InvalidImageError(f"{source.path}: config of {digest} is not valid JSON") from None
    return image


def _pick_manifest(source: _Source, descriptor: dict[str, Any]) -> dict[str, Any]:
    """A manifest descriptor; a nested index must hold one manifest (or exactly one wasm manifest)."""
    if descriptor.get("mediaType") not in _INDEX_TYPES:
        return descriptor
    digest, data = source.blob(descriptor)
    try:
        manifests = [entry for entry in json.loads(data)["manifests"] if isinstance(entry, dict)]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidImageError(f"{source.path}: index {digest} is not an image index ({exc})") from None
    wasm = [entry for entry in manifests if (entry.get("platform") or {}).get("architecture") == "wasm"]
    for candidates in (manifests, wasm):
        if len(candidates) == 1:
            return _pick_manifest(source, candidates[0])
    raise InvalidImageError(
        f"{source.path}: a multi-platform index with {len(manifests)} manifests; kwasm stores one platform per image"
    )


def _read_oci_layout(source: _Source, default_name: Reference | None) -> list[LoadedImage]:
    layout = source.read_json("oci-layout")
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise InvalidImageError(f"{source.path}: oci-layout has no imageLayoutVersion")
    index = source.read_json("index.json")
    descriptors = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(descriptors, list) or not descriptors:
        raise InvalidImageError(f"{source.path}: index.json lists no manifests")
    images: dict[str, LoadedImage] = {}
    for descriptor in descriptors:
        if not isinstance(descriptor, dict):
            raise InvalidImageError(f"{source.path}: index.json has a manifest entry that is not an object")
        annotations = descriptor.get("annotations") or {}
        name = str(annotations.get(ANNOTATION_IMAGE_NAME) or annotations.get(ANNOTATION_REF_NAME) or "")
        if name and (":" in name or "/" in name or ANNOTATION_IMAGE_NAME in annotations):
            names = [_reference(name, source.path)]
        elif default_name is not None:
            names = [default_name.with_tag(name) if name else default_name]
        else:
            only_tag = f" (only the tag {name!r})" if name else ""
            raise UsageError(
                f"{source.path}: image {descriptor.get('digest')} has no name{only_tag}; pass --tag NAME to name it"
            )
        image = _read_manifest(source, _pick_manifest(source, descriptor), names)
        if image.manifest_digest in images:
            images[image.manifest_digest].references.extend(names)
        else:
            images[image.manifest_digest] = image
    return list(images.values())


def _layer_diff_id(data: bytes, where: str) -> tuple[str, str]:
    """(media type, uncompressed digest) of a docker-archive layer, gzip or plain tar."""
    if data[:2] == b"\x1f\x8b":
        try:
            return MEDIA_OCI_LAYER_TAR_GZIP, sha256_digest(gzip.decompress(data))
        except (OSError, EOFError, zlib.error) as exc:
            raise InvalidImageError(f"{where}: corrupt gzip data ({exc})") from None
    return MEDIA_OCI_LAYER_TAR, sha256_digest(data)


def _read_docker_archive(source: _Source, default_name: Reference | None) -> list[LoadedImage]:
    entries = source.read_json("manifest.json")
    if not isinstance(entries, list) or not entries:
        raise InvalidImageError(f"{source.path}: manifest.json lists no images")
    images = []
    for entry in entries:
        try:
            config_path, layer_paths = str(entry["Config"]), [str(path) for path in entry["Layers"]]
        except (KeyError, TypeError) as exc:
            raise InvalidImageError(f"{source.path}: manifest.json entry lacks {exc}") from None
        config_bytes = source.read(config_path)
        config_digest = sha256_digest(config_bytes)
        named = _HEX64.search(posixpath.basename(config_path))
        if named and f"sha256:{named.group()}" != config_digest:
            raise DigestMismatchError(f"{source.path}: {config_path} does not match its digest")
        try:
            config = json.loads(config_bytes)
            diff_ids = list(config["rootfs"]["diff_ids"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidImageError(f"{source.path}: {config_path} is not an image config ({exc})") from None
        if len(diff_ids) != len(layer_paths):
            raise InvalidImageError(f"{source.path}: {len(layer_paths)} layers but {len(diff_ids)} diff_ids")
        blobs = {config_digest: config_bytes}
        layers = []
        for path, diff_id in zip(layer_paths, diff_ids, strict=True):
            data = source.read(path)
            media_type, actual = _layer_diff_id(data, f"{source.path}: layer {path}")
            if actual != diff_id:
                raise DigestMismatchError(f"{source.path}: layer {path} does not match diff_id {diff_id}")
            layer_digest = sha256_digest(data)
            layers.append({"mediaType": media_type, "digest": layer_digest, "size": len(data)})
            blobs[layer_digest] = data
        manifest = canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_MANIFEST,
                "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                "layers": layers,
            }
        )
        digest = sha256_digest(manifest)
        blobs[digest] = manifest
        names = [_reference(tag, source.path) for tag in entry.get("RepoTags") or []]
        if not names:
            if default_name is None:
                raise UsageError(f"{source.path}: image {config_digest[:19]} has no name; pass --tag NAME to name it")
            names = [default_name]
        images.append(LoadedImage(names, digest, _platform(config, source.path), blobs))
    return images


def read_images(path: Path, default_name: Reference | None = None) -> list[LoadedImage]:
    """Read and verify every image in the archive or layout at ``path`` (nothing is stored)."""
    if not path.exists():
        raise NotFoundError(f"no such file or directory: {path}")
    source = _Source(path)
    try:
        if source.has("oci-layout") and source.has("index.json"):
            return _read_oci_layout(source, default_name)
        if source.has("manifest.json"):
            return _read_docker_archive(source, default_name)
        raise InvalidImageError(
            f"{path}: neither an OCI image layout (oci-layout, index.json) nor a docker-archive (manifest.json)"
        )
    finally:
        source.close()


def load_images(store: ImageStore, path: Path, default_name: Reference | None = None) -> list[LoadedImage]:
    """Load every image in ``path`` into ``store`` and tag it; all or nothing."""
    images = read_images(path, default_name)
    with store.ingest():
        for image in images:
            for digest, data in image.blobs.items():
                store.put_blob(data, digest)
        for image in images:
            for reference in image.references:
                store.tag(reference, image.manifest_digest)
    return images
