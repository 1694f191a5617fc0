"""kwasm CLI command group: images (``build``, ``images``, ``inspect``, ``tag``, ``rmi``, ``save``, ``load``).

The store, builder (and with it wasmtime) and rich tables are imported inside the commands, so that
``kwasm`` starts fast: ``kwasm build`` is measured whole-process against buildah (benchmarks/build.py).
"""

from __future__ import annotations

import re
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kwasm.cli.output import info, print_json, warn
from kwasm.errors import InvalidImageError, UsageError
from kwasm.image.reference import Reference
from kwasm.keyvalue import parse_pairs

if TYPE_CHECKING:
    from kwasm.image.store import ImageStore, StoredImage

app = typer.Typer()


class LoadTarget(StrEnum):
    """Where ``kwasm load`` (and ``kwasm build --load``) put images."""

    KWASM = "kwasm"
    DOCKER = "docker"


JsonOutput = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _human_size(size: int) -> str:
    """Decimal units, as ``docker images`` shows sizes: 512B, 103.1kB, 20.5MB."""
    if size < 1000:
        return f"{size}B"
    value = size / 1000
    for unit in ("kB", "MB"):
        if value < 1000:
            return f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}GB"


def _default_reference(source: Path) -> Reference:
    """``<name>:latest`` from a context directory or ``.wasm`` file name, made a valid repository name."""
    stem = source.resolve().name if source.is_dir() else source.stem
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("._-") or "image"
    return Reference.parse(name)


def _store() -> ImageStore:
    from kwasm.image.store import ImageStore

    return ImageStore.default()


def _image_json(image: StoredImage) -> dict[str, Any]:
    config = image.config
    return {
        "reference": image.reference.familiar() if image.reference else None,
        "name": str(image.reference) if image.reference else None,
        "id": image.config_digest,
        "manifest_digest": image.manifest_digest,
        "platform": config.platform,
        "artifact": image.is_artifact,
        "created": config.created,
        "size": image.size,
    }


@app.command("build")
def build(
    context: Annotated[
        Path | None, typer.Argument(help="Build context directory (default: the current directory).")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="The Dockerfile (default: CONTEXT/Dockerfile).")
    ] = None,
    tags: Annotated[
        list[str] | None,
        typer.Option("--tag", "-t", help="Name the image NAME[:TAG] (repeatable; default: <directory name>:latest)."),
    ] = None,
    wasm: Annotated[
        Path | None,
        typer.Option("--wasm", help="Build straight from this .wasm file (entrypoint /<file name>), no Dockerfile."),
    ] = None,
    platform: Annotated[
        str, typer.Option("--platform", help="os/architecture: wasip1/wasm, wasi/wasm or linux/amd64.")
    ] = "wasip1/wasm",
    artifact: Annotated[
        bool, typer.Option("--artifact", help="Build the CNCF Wasm OCI artifact form (one application/wasm layer).")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write a tar (OCI layout + docker-archive).")
    ] = None,
    oci_dir: Annotated[Path | None, typer.Option("--oci-dir", help="Also write an OCI layout directory.")] = None,
    build_arg: Annotated[
        list[str] | None,
        typer.Option("--build-arg", help="Set a Dockerfile ARG: KEY=VALUE, or KEY to copy it from your environment."),
    ] = None,
    load_into: Annotated[
        LoadTarget | None, typer.Option("--load", help="Also load the image into: docker (the engine at $DOCKER_HOST).")
    ] = None,
    json_output: JsonOutput = False,
) -> None:
    """Build a wasm image from a Dockerfile (FROM scratch) or a .wasm file into the local store.

    Examples:

      kwasm build examples/wasi-demo-app            # -> wasi-demo-app:latest

      kwasm build --wasm app.wasm -t app:1 -o app.tar

      SOURCE_DATE_EPOCH=0 kwasm build . --platform linux/amd64 --oci-dir out/
    """
    from kwasm.image.archive import check_output_file
    from kwasm.image.builder import build_from_dockerfile, build_from_wasm, source_date_epoch

    started = time.perf_counter()
    if output is not None:
        check_output_file(output)  # before building, so a typo in -o leaves the store as it was
    store = _store()
    epoch = source_date_epoch()
    if wasm is not None:
        if context is not None or file is not None:
            raise UsageError("give either a build context (and -f) or --wasm, not both")
        references = [Reference.parse(tag) for tag in tags or []] or [_default_reference(wasm)]
        result = build_from_wasm(store, wasm, references, platform=platform, artifact=artifact, epoch=epoch)
    else:
        context = context or Path(".")
        references = [Reference.parse(tag) for tag in tags or []] or [_default_reference(context)]
        result = build_from_dockerfile(
            store,
            context,
            file or context / "Dockerfile",
            references,
            platform=platform,
            artifact=artifact,
            build_args=parse_pairs(build_arg or [], "--build-arg"),
            epoch=epoch,
        )
    kind = ", artifact" if artifact else ""
    info(
        f"Built {', '.join(ref.familiar() for ref in references)} {result.manifest_digest[:19]} "
        f"({platform}{kind}, {_human_size(result.size)}) in {time.perf_counter() - started:.2f}s"
    )
    built = [store.resolve(ref) for ref in references]
    _export(built, store, output, oci_dir)
    docker_ids = _load_into_docker(store, built[:1]) if load_into is LoadTarget.DOCKER else []
    if json_output:
        print_json(
            {**result.to_json(), **({"docker_image_id": docker_ids[0]["docker_image_id"]} if docker_ids else {})}
        )


def _export(images: list[StoredImage], store: ImageStore, output: Path | None, oci_dir: Path | None) -> None:
    from kwasm.image.archive import write_archive, write_layout_dir

    if output is not None:
        write_archive(store, images, output)
        forms = "OCI image layout" + ("" if all(image.is_artifact for image in images) else " + docker-archive")
        info(f"Wrote {output} ({forms})")
    if oci_dir is not None:
        write_layout_dir(store, images, oci_dir)
        info(f"Wrote OCI image layout {oci_dir}")


@app.command("images")
def images(json_output: JsonOutput = False) -> None:
    """List the images in the local store.

    Examples:

      kwasm images

      kwasm images --json | jq -r '.[].reference'
    """
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    from kwasm.cli.output import console

    stored, broken = _store().scan()
    for name, reason in broken.items():
        warn(f"{name} cannot be read: {reason} (remove it with: kwasm rmi {name})")
    if json_output:
        print_json([_image_json(image) for image in stored])
        return
    table = Table(box=None, header_style="bold")
    for column in ("REPOSITORY", "TAG", "IMAGE ID", "PLATFORM", "KIND", "CREATED", "SIZE"):
        table.add_column(column, no_wrap=True)
    for image in stored:
        reference = image.reference
        repository = reference.familiar().rsplit(":", 1)[0] if reference and reference.tag else "<none>"
        created = (image.config.created or "")[:19].replace("T", " ")
        table.add_row(
            repository,
            reference.tag if reference and reference.tag else "<none>",
            image.config_digest[7:19],
            image.config.platform,
            "artifact" if image.is_artifact else "image",
            created,
            _human_size(image.size),
        )
    if console.is_terminal:
        console.print(table)
    else:  # piped: never cut names short to fit an assumed 80 columns
        natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
        Console(width=max(console.width, natural), highlight=False).print(table)


@app.command("inspect")
def inspect(refs: Annotated[list[str], typer.Argument(help="Images: NAME[:TAG], NAME@DIGEST or an ID.")]) -> None:
    """Print the details of images as JSON (names, digests, platform, entrypoint, env, manifest).

    Example:

      kwasm inspect wasi-demo-app:latest
    """
    store = _store()
    details = []
    for ref in refs:
        image = store.resolve(ref)
        config = image.config
        details.append(
            {
                **_image_json(image),
                "entrypoint": config.entrypoint,
                "cmd": config.cmd,
                "env": config.env,
                "working_dir": config.working_dir,
                "labels": config.labels,
                "manifest": image.manifest,
            }
        )
    print_json(details)


@app.command("tag")
def tag(
    source: Annotated[str, typer.Argument(help="Existing image: NAME[:TAG] or ID.")],
    target: Annotated[str, typer.Argument(help="New name: NAME[:TAG].")],
) -> None:
    """Give an image in the local store another name.

    Example:

      kwasm tag wasi-demo-app:latest 127.0.0.1:5000/demo:v1
    """
    store = _store()
    image = store.resolve(source)
    reference = Reference.parse(target)
    store.tag(reference, image.manifest_digest)
    info(f"Tagged {reference.familiar()} -> {image.manifest_digest[:19]}")


@app.command("rmi")
def rmi(
    refs: Annotated[list[str], typer.Argument(help="Images to remove: NAME[:TAG] (one name) or an ID (all names).")],
) -> None:
    """Remove image names from the local store; blobs no other name uses are deleted.

    Examples:

      kwasm rmi wasi-demo-app:latest

      kwasm rmi 3f2a9c1b7d04        # every name of that image ID
    """
    store = _store()
    for ref in refs:
        try:
            image = store.resolve(ref)
        except InvalidImageError:
            store.untag(ref)  # a tag whose image cannot be read can still be removed by its name
            info(f"Untagged: {Reference.parse(ref).familiar()}")
            continue
        if image.reference is not None and _names_image(ref, image.reference):
            names = [image.reference]
        else:
            names = [
                other.reference
                for other in store.images()
                if other.manifest_digest == image.manifest_digest and other.reference is not None
            ]
        for name in names:
            store.untag(name)
            info(f"Untagged: {name.familiar()}")


def _names_image(text: str, reference: Reference) -> bool:
    """Whether ``text`` is a name of ``reference`` (rather than an image ID or digest)."""
    try:
        return Reference.parse(text) == reference
    except UsageError:
        return False


@app.command("save")
def save(
    refs: Annotated[list[str], typer.Argument(help="Images to save: NAME[:TAG] or ID.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Tar to write (OCI image layout + docker-archive).")
    ] = None,
    oci_dir: Annotated[Path | None, typer.Option("--oci-dir", help="OCI image layout directory to write.")] = None,
) -> None:
    """Write images to a tar that docker load, ctr images import, isula load and skopeo accept.

    Examples:

      kwasm save wasi-demo-app:latest -o demo.tar

      kwasm save wasi-demo-app:latest --oci-dir ./layout
    """
    if output is None and oci_dir is None:
        raise UsageError("say where to write: -o IMAGE.tar and/or --oci-dir DIR")
    store = _store()
    _export([store.resolve(ref) for ref in refs], store, output, oci_dir)


def _load_into_docker(store: ImageStore, images: list[StoredImage]) -> list[dict[str, str]]:
    from kwasm.image.docker_engine import docker_host, load_into_docker

    loaded = []
    for image in images:
        image_id = load_into_docker(store, image)
        name = image.reference.familiar() if image.reference else image.manifest_digest
        info(f"Loaded {name} into the Docker engine at {docker_host()}: {image_id}")
        loaded.append({"reference": name, "docker_image_id": image_id})
    return loaded


@app.command("load")
def load(
    refs: Annotated[
        list[str] | None, typer.Argument(help="With --into docker: images from the local store to hand to Docker.")
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option("--input", "-i", help="A docker-archive or OCI layout tar, or an OCI layout directory."),
    ] = None,
    into: Annotated[
        LoadTarget, typer.Option("--into", help="kwasm: the local store (from -i); docker: the engine at $DOCKER_HOST.")
    ] = LoadTarget.KWASM,
    name: Annotated[
        str | None, typer.Option("--tag", "-t", help="Name for images the archive leaves unnamed: NAME[:TAG].")
    ] = None,
    json_output: JsonOutput = False,
) -> None:
    """Load images from a tar or OCI layout directory into the local store (all or nothing), or hand
    stored images to a Docker engine (--into docker).

    Examples:

      kwasm load -i demo.tar

      kwasm load -i ./layout -t demo:1

      kwasm load --into docker wasi-demo-app:amd64
    """
    if into is LoadTarget.DOCKER:
        if source is not None or not refs:
            raise UsageError("--into docker takes image names from the local store, not -i (use docker load -i)")
        store = _store()
        loaded_into_docker = _load_into_docker(store, [store.resolve(ref) for ref in refs])
        if json_output:
            print_json(loaded_into_docker)
        return
    if source is None or refs:
        raise UsageError("give the archive to load with -i TAR|DIR (image names go with --into docker)")
    from kwasm.image.load import load_images

    loaded = load_images(_store(), source, Reference.parse(name) if name else None)
    if json_output:
        print_json([image.to_json() for image in loaded])
        return
    for image in loaded:
        for reference in image.references:
            info(f"Loaded image: {reference.familiar()} ({image.platform}, {image.manifest_digest[:19]})")
