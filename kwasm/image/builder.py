"""Assembling wasm images (layer tar, config, manifest) and writing them into the local store.

Builds are reproducible: tar entries are sorted, owned by 0:0 with empty user/group names, dated
``SOURCE_DATE_EPOCH`` (or 0), the config's ``created`` is that same instant, and every JSON document is
serialised with sorted keys and no spaces. The same inputs therefore always give the same digests.

Two image forms:

* a normal OCI image: one uncompressed tar layer, an OCI image config with ``os``/``architecture`` from
  the platform, ``Entrypoint``/``Cmd``/``Env``/``Labels``/``WorkingDir``;
* ``artifact=True``: the CNCF Wasm OCI artifact (config ``application/vnd.wasm.config.v0+json``, the
  module itself as the single ``application/wasm`` layer).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kwasm.errors import DockerfileError, NotFoundError, UsageError
from kwasm.image.context import BuildContext, ImageTree
from kwasm.image.dockerfile import BuildRecipe, read_dockerfile
from kwasm.image.reference import Reference
from kwasm.image.store import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_LAYER_TAR,
    MEDIA_OCI_MANIFEST,
    MEDIA_WASM_CONFIG,
    MEDIA_WASM_LAYER,
    ImageStore,
    sha256_digest,
)
from kwasm.image.wasm import COMMAND_EXPORT, validate_module

DEFAULT_PLATFORM = "wasip1/wasm"
PLATFORMS = ("wasip1/wasm", "wasi/wasm", "linux/amd64")


def canonical_json(document: Any) -> bytes:
    """The bytes kwasm writes for a JSON document: sorted keys, no whitespace, UTF-8."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_platform(text: str) -> tuple[str, str]:
    """``os/architecture`` from ``--platform``; only the platforms wasm images are built for."""
    if text not in PLATFORMS:
        raise UsageError(f"unsupported platform {text!r}; use one of {', '.join(PLATFORMS)}")
    os_name, architecture = text.split("/")
    return os_name, architecture


def source_date_epoch(environ: Mapping[str, str] | None = None) -> int:
    """The build timestamp: ``$SOURCE_DATE_EPOCH`` (seconds since 1970) or 0."""
    value = (os.environ if environ is None else environ).get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH must be a whole number of seconds, not {value!r}")
    return int(value)


def _timestamp(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def layer_tar(tree: ImageTree, mtime: int) -> bytes:
    """One uncompressed, reproducible tar holding every entry of ``tree``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(tree.entries):
            entry = tree.entries[name]
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            info.mode = entry.mode
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if entry.data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
    return buffer.getvalue()


@dataclass(frozen=True)
class ImageSpec:
    """Everything an image is made of, before it is serialised."""

    tree: ImageTree
    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""


@dataclass(frozen=True)
class AssembledImage:
    """The serialised blobs of one image: manifest, config and layers, ready to store."""

    manifest: bytes
    config: bytes
    layers: list[bytes]

    @property
    def manifest_digest(self) -> str:
        """Digest of the manifest bytes (the image's digest)."""
        return sha256_digest(self.manifest)

    @property
    def config_digest(self) -> str:
        """Digest of the config bytes (the image ID)."""
        return sha256_digest(self.config)

    @property
    def size(self) -> int:
        """Bytes of manifest + config + layers."""
        return len(self.manifest) + len(self.config) + sum(len(layer) for layer in self.layers)


@dataclass(frozen=True)
class BuildResult:
    """What ``kwasm build`` made: tags, digests, size and form."""

    references: list[Reference]
    manifest_digest: str
    config_digest: str
    size: int
    platform: str
    artifact: bool

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` view of the result."""
        return {
            "reference": self.references[0].familiar() if self.references else None,
            "references": [ref.familiar() for ref in self.references],
            "manifest_digest": self.manifest_digest,
            "config_digest": self.config_digest,
            "size": self.size,
            "platform": self.platform,
            "artifact": self.artifact,
        }


def _manifest(config: bytes, config_type: str, layers: list[tuple[bytes, dict[str, Any]]]) -> bytes:
    descriptors = [{**extra, "digest": sha256_digest(data), "size": len(data)} for data, extra in layers]
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": sha256_digest(config), "size": len(config)},
            "layers": descriptors,
        }
    )


def assemble_image(spec: ImageSpec, platform: str, epoch: int) -> AssembledImage:
    """Serialise ``spec`` as an OCI image with one tar layer."""
    os_name, architecture = parse_platform(platform)
    layer = layer_tar(spec.tree, epoch)
    runtime: dict[str, Any] = {"Entrypoint": spec.entrypoint}
    if spec.cmd:
        runtime["Cmd"] = spec.cmd
    if spec.env:
        runtime["Env"] = [f"{key}={value}" for key, value in spec.env.items()]
    if spec.labels:
        runtime["Labels"] = spec.labels
    if spec.working_dir:
        runtime["WorkingDir"] = spec.working_dir
    created = _timestamp(epoch)
    config = canonical_json(
        {
            "architecture": architecture,
            "os": os_name,
            "created": created,
            "config": runtime,
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer)]},
            "history": [{"created": created, "created_by": "kwasm build"}],
        }
    )
    manifest = _manifest(config, MEDIA_OCI_CONFIG, [(layer, {"mediaType": MEDIA_OCI_LAYER_TAR})])
    return AssembledImage(manifest=manifest, config=config, layers=[layer])


def assemble_artifact(module: bytes, title: str, platform: str, epoch: int) -> AssembledImage:
    """Serialise ``module`` as a CNCF Wasm OCI artifact (wasm config, one ``application/wasm`` layer)."""
    os_name, architecture = parse_platform(platform)
    if architecture != "wasm":
        raise UsageError(f"--artifact images are wasm only; --platform {platform} is not (use wasip1/wasm)")
    config = canonical_json(
        {
            "architecture": architecture,
            "os": "wasip1" if os_name == "wasi" else os_name,
            "created": _timestamp(epoch),
            "author": None,
            "layerDigests": [sha256_digest(module)],
            "component": None,
        }
    )
    layer_extra = {"mediaType": MEDIA_WASM_LAYER, "annotations": {"org.opencontainers.image.title": title}}
    manifest = _manifest(config, MEDIA_WASM_CONFIG, [(module, layer_extra)])
    return AssembledImage(manifest=manifest, config=config, layers=[module])


def store_image(store: ImageStore, image: AssembledImage, references: Sequence[Reference]) -> None:
    """Write the blobs of ``image`` into ``store`` and tag it; on failure nothing new stays behind."""
    with store.ingest():
        for layer in image.layers:
            store.put_blob(layer)
        store.put_blob(image.config)
        store.put_blob(image.manifest)
        for reference in references:
            store.tag(reference, image.manifest_digest)


def _entry_module(spec: ImageSpec, dockerfile: str) -> tuple[str, str, bytes]:
    """The module the image starts (path, exported function, bytes), from ENTRYPOINT/CMD."""
    program = spec.entrypoint or spec.cmd
    if not program:
        raise DockerfileError(f"{dockerfile}: no ENTRYPOINT or CMD names the wasm module to run")
    path, _, function = program[0].partition("#")
    absolute = posixpath.normpath(posixpath.join(spec.working_dir or "/", path))
    data = spec.tree.file(absolute)
    if data is None:
        files = ", ".join("/" + name for name, entry in sorted(spec.tree.entries.items()) if entry.data is not None)
        raise DockerfileError(
            f"{dockerfile}: the entrypoint {absolute} is not a file in the image (files: {files or 'none'})"
        )
    return absolute, function or COMMAND_EXPORT, data


def spec_from_recipe(context: Path, dockerfile: Path, recipe: BuildRecipe) -> ImageSpec:
    """Collect the files a recipe copies from ``context`` into an :class:`ImageSpec`."""
    build_context = BuildContext(context, str(dockerfile))
    tree = ImageTree()
    for directory in recipe.workdirs:
        tree.add_dir(directory)
    for copy in recipe.copies:
        build_context.apply(tree, copy)
    return ImageSpec(
        tree=tree,
        entrypoint=recipe.entrypoint,
        cmd=recipe.cmd,
        env=recipe.env,
        labels=recipe.labels,
        working_dir=recipe.working_dir,
    )


def build_from_dockerfile(
    store: ImageStore,
    context: Path,
    dockerfile: Path,
    references: Sequence[Reference],
    *,
    platform: str = DEFAULT_PLATFORM,
    artifact: bool = False,
    build_args: Mapping[str, str] | None = None,
    epoch: int = 0,
) -> BuildResult:
    """Build the image a Dockerfile describes, validate its module, store and tag it."""
    if not context.is_dir():
        hint = f"; to build from a module use --wasm {context}" if context.suffix == ".wasm" else ""
        raise NotFoundError(f"build context {context} is not a directory{hint}")
    parse_platform(platform)
    recipe = read_dockerfile(dockerfile, build_args)
    spec = spec_from_recipe(context, dockerfile, recipe)
    module_path, function, module = _entry_module(spec, str(dockerfile))
    validate_module(module, f"{module_path} (from {dockerfile})", function)
    if artifact:
        _check_artifact_recipe(spec, str(dockerfile))
        image = assemble_artifact(module, posixpath.basename(module_path), platform, epoch)
    else:
        image = assemble_image(spec, platform, epoch)
    store_image(store, image, references)
    return _result(image, references, platform, artifact)


def _check_artifact_recipe(spec: ImageSpec, dockerfile: str) -> None:
    """A wasm artifact holds one module and no run settings; refuse what it would silently drop."""
    files = [name for name, entry in spec.tree.entries.items() if entry.data is not None]
    if len(files) != 1:
        raise DockerfileError(f"{dockerfile}: an --artifact image holds exactly one module; it adds {len(files)} files")
    dropped = [name for name, value in (("CMD", spec.cmd), ("ENV", spec.env), ("LABEL", spec.labels)) if value]
    if dropped:
        raise DockerfileError(f"{dockerfile}: the wasm artifact config has no place for {', '.join(dropped)}")


def build_from_wasm(
    store: ImageStore,
    wasm: Path,
    references: Sequence[Reference],
    *,
    platform: str = DEFAULT_PLATFORM,
    artifact: bool = False,
    epoch: int = 0,
) -> BuildResult:
    """Build an image straight from a ``.wasm`` file: the module at ``/<name>``, entrypoint ``/<name>``."""
    parse_platform(platform)
    try:
        module = wasm.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"no such file: {wasm}") from None
    except IsADirectoryError:
        raise UsageError(f"{wasm} is a directory; --wasm takes a .wasm file") from None
    except OSError as exc:
        raise NotFoundError(f"cannot read {wasm}: {exc.strerror or exc}") from None
    validate_module(module, str(wasm))
    if artifact:
        image = assemble_artifact(module, wasm.name, platform, epoch)
    else:
        tree = ImageTree()
        tree.add_file(wasm.name, module, 0o755)
        image = assemble_image(ImageSpec(tree=tree, entrypoint=[f"/{wasm.name}"]), platform, epoch)
    store_image(store, image, references)
    return _result(image, references, platform, artifact)


def _result(image: AssembledImage, references: Sequence[Reference], platform: str, artifact: bool) -> BuildResult:
    return BuildResult(
        references=list(references),
        manifest_digest=image.manifest_digest,
        config_digest=image.config_digest,
        size=image.size,
        platform=platform,
        artifact=artifact,
    )
