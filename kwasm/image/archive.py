"""Writing images as OCI image layouts and docker-archives (``kwasm build -o``, ``--oci-dir``, ``kwasm save``).

The tar written by :func:`write_archive` is at once:

* an OCI image layout: ``oci-layout``, ``index.json`` (one descriptor per tag, with ``platform`` and the
  annotations ``org.opencontainers.image.ref.name`` = tag and ``io.containerd.image.name`` = full name),
  ``blobs/sha256/<hex>``;
* a docker-archive: ``manifest.json`` (``Config``, ``RepoTags``, ``Layers`` pointing into ``blobs/``).

So ``docker load``, ``ctr images import``, ``isula load`` and ``skopeo`` (``oci-archive:`` and
``docker-archive:``) all read it. CNCF wasm artifacts have no docker-archive form (their layer is not a
tar), so they appear only in ``index.json``. Entries are sorted, dated 0 and owned by 0:0, so saving the
same images twice gives the same bytes. Files are written to a temporary name and renamed into place.
Reading archives back is :mod:`kwasm.image.load`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from kwasm.errors import KwasmError, NotFoundError, UsageError
from kwasm.image.builder import canonical_json
from kwasm.image.store import MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, ImageStore, StoredImage

OCI_LAYOUT = canonical_json({"imageLayoutVersion": "1.0.0"})
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"


def blob_name(digest: str) -> str:
    """The path of a blob inside a layout: ``blobs/sha256/<hex>``."""
    algorithm, _, hexpart = digest.partition(":")
    return f"blobs/{algorithm}/{hexpart}"


def index_descriptor(image: StoredImage, manifest_size: int) -> dict[str, Any]:
    """The ``index.json`` entry for ``image``: manifest descriptor, platform and name annotations."""
    descriptor: dict[str, Any] = {
        "mediaType": image.manifest.get("mediaType", MEDIA_OCI_MANIFEST),
        "digest": image.manifest_digest,
        "size": manifest_size,
        "platform": {"architecture": image.config.architecture, "os": image.config.os},
    }
    if image.reference is not None and image.reference.tag:
        descriptor["annotations"] = {
            ANNOTATION_IMAGE_NAME: str(image.reference),
            ANNOTATION_REF_NAME: image.reference.tag,
        }
    return descriptor


def _docker_manifest(images: Sequence[StoredImage]) -> list[dict[str, Any]]:
    """``manifest.json`` entries: one per tar image (grouped by manifest), artifacts left out."""
    entries: dict[str, dict[str, Any]] = {}
    for image in images:
        if image.is_artifact:
            continue
        entry = entries.setdefault(
            image.manifest_digest,
            {
                "Config": blob_name(image.config_digest),
                "RepoTags": [],
                "Layers": [blob_name(layer["digest"]) for layer in image.layers],
            },
        )
        if image.reference is not None and image.reference.tag:
            entry["RepoTags"].append(image.reference.familiar())
    return list(entries.values())


class _LayoutContent:
    """The files of a layout for a set of images: blobs (verified) and the two JSON documents."""

    def __init__(self, store: ImageStore, images: Sequence[StoredImage]) -> None:
        if not images:
            raise UsageError("no images to write")
        self.blobs: dict[str, bytes] = {}
        descriptors = []
        for image in images:
            manifest_bytes = store.read_blob(image.manifest_digest)
            self.blobs[image.manifest_digest] = manifest_bytes
            for descriptor in [image.manifest["config"], *image.layers]:
                self.blobs.setdefault(descriptor["digest"], store.read_blob(descriptor["digest"]))
            descriptors.append(index_descriptor(image, len(manifest_bytes)))
        self.descriptors = descriptors
        self.docker_manifest = _docker_manifest(images)

    def index(self, existing: Sequence[dict[str, Any]] = ()) -> bytes:
        """``index.json``: ``existing`` descriptors not renamed by ours, then ours."""
        ours = {_name_of(descriptor) for descriptor in self.descriptors} - {None}
        kept = [descriptor for descriptor in existing if _name_of(descriptor) not in ours]
        return canonical_json(
            {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [*kept, *self.descriptors]}
        )


def _name_of(descriptor: dict[str, Any]) -> str | None:
    annotations = descriptor.get("annotations") or {}
    name = annotations.get(ANNOTATION_IMAGE_NAME)
    return str(name) if name is not None else None


def check_output_file(target: Path) -> None:
    """Refuse an output path that cannot become a file: a directory, or one in a missing directory."""
    if target.is_dir():
        raise UsageError(f"cannot write {target}: it is a directory (give a file name)")
    if not target.parent.is_dir():
        raise NotFoundError(f"cannot write {target}: directory {target.parent} does not exist")


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[IO[bytes]]:
    """A temporary file next to ``target`` that replaces it only if the block succeeds."""
    check_output_file(target)
    staged: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as handle:
            staged = Path(handle.name)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(staged, 0o644)
        os.replace(staged, target)
    except OSError as exc:
        raise KwasmError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)


def _tar_entry(archive: tarfile.TarFile, name: str, data: bytes | None, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if data is None:
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
    else:
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))


def write_archive(store: ImageStore, images: Sequence[StoredImage], target: Path) -> None:
    """Write ``images`` into one tar that is both an OCI image layout and a docker-archive."""
    content = _LayoutContent(store, images)
    files: dict[str, tuple[bytes | None, int]] = {"blobs/": (None, 0o755), "blobs/sha256/": (None, 0o755)}
    for digest, data in content.blobs.items():
        files[blob_name(digest)] = (data, 0o444)
    files["oci-layout"] = (OCI_LAYOUT, 0o444)
    files["index.json"] = (content.index(), 0o644)
    if content.docker_manifest:
        files["manifest.json"] = (canonical_json(content.docker_manifest), 0o644)
    with atomic_file(target) as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            _tar_entry(tar, name, *files[name])


def write_layout_dir(store: ImageStore, images: Sequence[StoredImage], target: Path) -> None:
    """Write ``images`` into an OCI image layout directory, adding to a layout already there."""
    content = _LayoutContent(store, images)
    existing: list[dict[str, Any]] = []
    if target.exists():
        if not target.is_dir():
            raise UsageError(f"{target} exists and is not a directory")
        if (target / "oci-layout").is_file():
            existing = _existing_manifests(target)
        elif any(target.iterdir()):
            raise UsageError(f"{target} is a non-empty directory but not an OCI image layout")
    try:
        (target / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KwasmError(f"cannot create {target}: {exc.strerror or exc}") from None
    for digest, data in content.blobs.items():
        path = target / blob_name(digest)
        if not path.is_file() or _file_digest(path) != digest:
            with atomic_file(path) as handle:
                handle.write(data)
    with atomic_file(target / "oci-layout") as handle:
        handle.write(OCI_LAYOUT)
    with atomic_file(target / "index.json") as handle:
        handle.write(content.index(existing))


def _file_digest(path: Path) -> str:
    """The sha256 digest of a file already in a layout (so a damaged blob of the right size is rewritten)."""
    with path.open("rb") as handle:
        return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()


def _existing_manifests(layout: Path) -> list[dict[str, Any]]:
    try:
        index = json.loads((layout / "index.json").read_text())
        manifests = index["manifests"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{layout}/index.json is not a valid OCI index: {exc}") from None
    if not isinstance(manifests, list):
        raise UsageError(f"{layout}/index.json is not a valid OCI index: manifests is not a list")
    return [descriptor for descriptor in manifests if isinstance(descriptor, dict)]
