"""Image assembly: layer tar, config, manifest, artifact form, reproducibility, and refusals that store nothing."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import wasmtime

from kwasm.errors import DockerfileError, NotFoundError, UsageError, WasmValidationError
from kwasm.image.builder import build_from_dockerfile, build_from_wasm, source_date_epoch
from kwasm.image.reference import Reference
from kwasm.image.store import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_LAYER_TAR,
    MEDIA_OCI_MANIFEST,
    MEDIA_WASM_CONFIG,
    MEDIA_WASM_LAYER,
    ImageStore,
    StoredImage,
)
from kwasm.image.wasm import exported_functions

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "examples" / "wasi-demo-app"
DEMO_WASM = DEMO_DIR / "wasi-demo-app.wasm"
DEMO = Reference.parse("wasi-demo-app:latest")
REACTOR_WAT = '(module (func (export "_initialize")) (func (export "handle")) (memory (export "memory") 1))'


def store_snapshot(store: ImageStore) -> dict[str, bytes]:
    """Every file of the store except staging and the lock: what 'the store is unchanged' compares."""
    if not store.root.exists():
        return {}
    return {
        str(path.relative_to(store.root)): path.read_bytes()
        for path in sorted(store.root.rglob("*"))
        if path.is_file() and path.parts[len(store.root.parts)] not in ("tmp", ".lock")
    }


def layer_members(store: ImageStore, image: StoredImage) -> dict[str, tarfile.TarInfo]:
    data = store.read_blob(image.layers[0]["digest"])
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {member.name: member for member in archive.getmembers()}


def config_json(store: ImageStore, image: StoredImage) -> dict[str, object]:
    return dict(json.loads(store.read_blob(image.config_digest)))


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def test_demo_image_has_the_documented_shape(store: ImageStore) -> None:
    result = build_from_dockerfile(store, DEMO_DIR, DEMO_DIR / "Dockerfile", [DEMO])
    image = store.resolve("wasi-demo-app:latest")
    assert image.manifest_digest == result.manifest_digest
    assert image.manifest["mediaType"] == MEDIA_OCI_MANIFEST
    assert image.manifest["config"]["mediaType"] == MEDIA_OCI_CONFIG
    assert [layer["mediaType"] for layer in image.layers] == [MEDIA_OCI_LAYER_TAR]
    members = layer_members(store, image)
    assert list(members) == ["wasi-demo-app.wasm"]
    module = members["wasi-demo-app.wasm"]
    assert (module.mode, module.uid, module.gid, module.uname, module.gname, module.mtime) == (0o755, 0, 0, "", "", 0)
    config = config_json(store, image)
    assert (config["os"], config["architecture"], config["created"]) == ("wasip1", "wasm", "1970-01-01T00:00:00Z")
    assert config["config"] == {"Entrypoint": ["/wasi-demo-app.wasm"]}
    assert config["rootfs"] == {"type": "layers", "diff_ids": [image.layers[0]["digest"]]}
    assert store.module_path(image).read_bytes() == DEMO_WASM.read_bytes()


def test_same_inputs_give_the_same_digests_and_changes_give_new_ones(tmp_path: Path) -> None:
    first = build_from_dockerfile(ImageStore(tmp_path / "a"), DEMO_DIR, DEMO_DIR / "Dockerfile", [DEMO])
    second = build_from_dockerfile(ImageStore(tmp_path / "b"), DEMO_DIR, DEMO_DIR / "Dockerfile", [DEMO])
    assert (first.manifest_digest, first.config_digest) == (second.manifest_digest, second.config_digest)

    changed = tmp_path / "changed"
    shutil.copytree(DEMO_DIR, changed)
    (changed / "wasi-demo-app.wasm").write_bytes(DEMO_WASM.read_bytes() + b"\0custom")  # trailing bytes: invalid
    with pytest.raises(WasmValidationError):
        build_from_dockerfile(ImageStore(tmp_path / "c"), changed, changed / "Dockerfile", [DEMO])
    (changed / "wasi-demo-app.wasm").write_bytes(DEMO_WASM.read_bytes() + b"\0\x06\x05extra")  # custom section
    third = build_from_dockerfile(ImageStore(tmp_path / "c"), changed, changed / "Dockerfile", [DEMO])
    assert third.manifest_digest != first.manifest_digest

    dated = build_from_dockerfile(
        ImageStore(tmp_path / "d"), DEMO_DIR, DEMO_DIR / "Dockerfile", [DEMO], epoch=1700000000
    )
    assert dated.manifest_digest != first.manifest_digest
    image = ImageStore(tmp_path / "d").resolve(DEMO)
    assert image.config.created == "2023-11-14T22:13:20Z"
    assert layer_members(ImageStore(tmp_path / "d"), image)["wasi-demo-app.wasm"].mtime == 1700000000


def test_source_date_epoch_is_read_and_checked() -> None:
    assert source_date_epoch({}) == 0
    assert source_date_epoch({"SOURCE_DATE_EPOCH": "1700000000"}) == 1700000000
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH"):
        source_date_epoch({"SOURCE_DATE_EPOCH": "yesterday"})


@pytest.mark.parametrize(
    ("platform", "os_name", "arch"), [("wasi/wasm", "wasi", "wasm"), ("linux/amd64", "linux", "amd64")]
)
def test_platform_goes_into_the_config(store: ImageStore, platform: str, os_name: str, arch: str) -> None:
    build_from_wasm(store, DEMO_WASM, [DEMO], platform=platform)
    config = config_json(store, store.resolve(DEMO))
    assert (config["os"], config["architecture"]) == (os_name, arch)


def test_unknown_platform_is_refused(store: ImageStore) -> None:
    with pytest.raises(UsageError, match="wasip1/wasm, wasi/wasm, linux/amd64"):
        build_from_wasm(store, DEMO_WASM, [DEMO], platform="linux/arm/v7")
    assert store_snapshot(store) == {}


def test_wasm_build_uses_the_file_name_as_entrypoint(store: ImageStore, tmp_path: Path) -> None:
    app = tmp_path / "app.wasm"
    shutil.copy(DEMO_WASM, app)
    build_from_wasm(store, app, [Reference.parse("app:1")])
    image = store.resolve("app:1")
    assert image.config.entrypoint == ["/app.wasm"]
    assert list(layer_members(store, image)) == ["app.wasm"]


def test_artifact_form_follows_the_cncf_layout(store: ImageStore) -> None:
    result = build_from_wasm(store, DEMO_WASM, [DEMO], artifact=True)
    image = store.resolve(DEMO)
    assert image.is_artifact and result.artifact
    assert image.manifest["config"]["mediaType"] == MEDIA_WASM_CONFIG
    (layer,) = image.layers
    assert layer["mediaType"] == MEDIA_WASM_LAYER
    assert layer["annotations"] == {"org.opencontainers.image.title": "wasi-demo-app.wasm"}
    assert store.read_blob(layer["digest"]) == DEMO_WASM.read_bytes()
    assert config_json(store, image) == {
        "architecture": "wasm",
        "os": "wasip1",
        "created": "1970-01-01T00:00:00Z",
        "author": None,
        "layerDigests": [layer["digest"]],
        "component": None,
    }
    with pytest.raises(UsageError, match="wasm only"):
        build_from_wasm(store, DEMO_WASM, [Reference.parse("x:1")], artifact=True, platform="linux/amd64")


def test_dockerfile_features_shape_the_image(store: ImageStore, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    (context / "bin").mkdir(parents=True)
    (context / "static" / "css").mkdir(parents=True)
    (context / "target").mkdir()
    shutil.copy(DEMO_WASM, context / "bin" / "server.wasm")
    (context / "bin" / "README").write_text("not copied by the glob")
    (context / "static" / "index.html").write_text("<h1>hi</h1>")
    (context / "static" / "css" / "site.css").write_text("body{}")
    (context / "static" / "draft.tmp").write_text("ignored")
    (context / "target" / "junk").write_text("ignored")
    (context / ".dockerignore").write_text("**/*.tmp\ntarget\n")
    (context / "Dockerfile").write_text(
        "FROM scratch\n"
        "ARG PORT=8080\n"
        "WORKDIR /srv\n"
        "COPY bin/*.wasm ./\n"
        "COPY static /srv/www\n"
        "ENV PORT=$PORT MODE=prod\n"
        "LABEL org.opencontainers.image.title=server\n"
        'ENTRYPOINT ["server.wasm"]\n'
        'CMD ["--port", "$PORT"]\n'
    )
    build_from_dockerfile(store, context, context / "Dockerfile", [DEMO], build_args={"PORT": "9000"})
    image = store.resolve(DEMO)
    members = layer_members(store, image)
    assert list(members) == sorted(members)
    assert set(members) == {
        "srv",
        "srv/server.wasm",
        "srv/www",
        "srv/www/css",
        "srv/www/css/site.css",
        "srv/www/index.html",
    }
    assert members["srv/server.wasm"].mode == 0o755
    assert members["srv/www/index.html"].mode == 0o644
    assert members["srv/www"].isdir()
    config = image.config
    assert config.entrypoint == ["server.wasm"]
    assert config.cmd == ["--port", "$PORT"]
    assert config.env == ["PORT=9000", "MODE=prod"]
    assert config.working_dir == "/srv"
    assert config.labels == {"org.opencontainers.image.title": "server"}
    assert store.module_path(image).read_bytes() == DEMO_WASM.read_bytes()


def test_entrypoint_function_suffix_is_what_gets_checked(store: ImageStore, tmp_path: Path) -> None:
    (tmp_path / "lib.wasm").write_bytes(wasmtime.wat2wasm(REACTOR_WAT))
    (tmp_path / "Dockerfile").write_text('FROM scratch\nCOPY lib.wasm /\nENTRYPOINT ["/lib.wasm#handle"]\n')
    build_from_dockerfile(store, tmp_path, tmp_path / "Dockerfile", [DEMO])
    (tmp_path / "Dockerfile").write_text('FROM scratch\nCOPY lib.wasm /\nENTRYPOINT ["/lib.wasm#missing"]\n')
    with pytest.raises(WasmValidationError, match="does not export function 'missing'"):
        build_from_dockerfile(store, tmp_path, tmp_path / "Dockerfile", [Reference.parse("other:1")])


def test_export_reader_agrees_with_wasmtime() -> None:
    wat = (
        '(module (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))'
        ' (global (export "g") i32 (i32.const 0)) (memory (export "memory") 1) (table (export "t") 1 funcref)'
        ' (func $run (export "_start")) (export "ünïcode" (func $run)) (export "again" (func $run)))'
    )
    for module in (DEMO_WASM.read_bytes(), wasmtime.wat2wasm(wat)):
        compiled = wasmtime.Module(wasmtime.Engine(), module)
        expected = [e.name for e in compiled.exports if isinstance(e.type, wasmtime.FuncType)]
        assert exported_functions(module) == expected


def _context(tmp_path: Path, dockerfile: str, files: dict[str, bytes]) -> Path:
    context = tmp_path / "bad"
    context.mkdir()
    for name, data in files.items():
        (context / name).write_bytes(data)
    (context / "Dockerfile").write_text(dockerfile)
    return context


DEMO_DOCKERFILE = 'FROM scratch\nADD app.wasm /\nENTRYPOINT ["/app.wasm"]\n'


@pytest.mark.parametrize(
    ("dockerfile", "files", "error", "reason"),
    [
        (DEMO_DOCKERFILE, {"app.wasm": b"#!/bin/sh\necho not wasm\n"}, WasmValidationError, "not a WebAssembly binary"),
        (DEMO_DOCKERFILE, {"app.wasm": DEMO_WASM.read_bytes()[:5000]}, WasmValidationError, "truncated module"),
        (
            DEMO_DOCKERFILE,
            {"app.wasm": wasmtime.wat2wasm('(module (func (export "_start") (result i32)))')},
            WasmValidationError,
            "wasmtime rejects it: type mismatch",
        ),
        (
            DEMO_DOCKERFILE,
            {"app.wasm": wasmtime.wat2wasm(REACTOR_WAT)},
            WasmValidationError,
            "does not export function '_start'",
        ),
        ("FROM scratch\nADD app.wasm /\nRUN strip app.wasm\n", {"app.wasm": b""}, DockerfileError, "line 3: RUN"),
        ("FROM scratch\nADD ../etc/passwd /\n", {}, DockerfileError, "outside the build context"),
        ("FROM scratch\nADD missing.wasm /\n", {}, DockerfileError, "no such file"),
        (
            'FROM scratch\nADD app.wasm /\nENTRYPOINT ["/other.wasm"]\n',
            {"app.wasm": b""},
            DockerfileError,
            "/other.wasm",
        ),
        ("FROM scratch\nADD app.wasm /\n", {"app.wasm": b""}, DockerfileError, "no ENTRYPOINT or CMD"),
    ],
)
def test_bad_inputs_are_refused_and_store_nothing(
    store: ImageStore, tmp_path: Path, dockerfile: str, files: dict[str, bytes], error: type[Exception], reason: str
) -> None:
    build_from_wasm(store, DEMO_WASM, [Reference.parse("existing:1")])
    before = store_snapshot(store)
    context = _context(tmp_path, dockerfile, files)
    with pytest.raises(error) as caught:
        build_from_dockerfile(store, context, context / "Dockerfile", [DEMO])
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)
    assert store_snapshot(store) == before


def test_symlink_out_of_the_context_is_refused(store: ImageStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret.wasm"
    shutil.copy(DEMO_WASM, secret)
    context = _context(tmp_path, DEMO_DOCKERFILE, {})
    (context / "app.wasm").symlink_to(secret)
    with pytest.raises(DockerfileError, match="points outside the build context"):
        build_from_dockerfile(store, context, context / "Dockerfile", [DEMO])
    assert store_snapshot(store) == {}


def test_broken_symlink_in_the_context_is_one_clear_error(store: ImageStore, tmp_path: Path) -> None:
    context = _context(tmp_path, DEMO_DOCKERFILE, {})
    (context / "app.wasm").symlink_to("missing.wasm")
    with pytest.raises(DockerfileError, match=r"line 2: ADD: .*missing\.wasm: No such file") as caught:
        build_from_dockerfile(store, context, context / "Dockerfile", [DEMO])
    assert "\n" not in str(caught.value)
    assert store_snapshot(store) == {}


@pytest.mark.parametrize(
    ("destination", "entrypoint", "folder"),
    [("sub/.", "sub/app.wasm", "srv/sub"), ("./sub/", "sub/app.wasm", "srv/sub"), (".", "app.wasm", "srv")],
)
def test_a_dot_destination_names_a_directory(
    store: ImageStore, tmp_path: Path, destination: str, entrypoint: str, folder: str
) -> None:
    dockerfile = f'FROM scratch\nWORKDIR /srv\nCOPY app.wasm extra.txt {destination}\nENTRYPOINT ["{entrypoint}"]\n'
    context = _context(tmp_path, dockerfile, {"app.wasm": DEMO_WASM.read_bytes(), "extra.txt": b"x"})
    build_from_dockerfile(store, context, context / "Dockerfile", [DEMO])
    members = layer_members(store, store.resolve(DEMO))
    assert members[folder].isdir()
    assert members[f"{folder}/app.wasm"].isfile() and members[f"{folder}/extra.txt"].isfile()


def test_add_refuses_to_silently_skip_archive_unpacking(store: ImageStore, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.addfile(tarfile.TarInfo("x"), io.BytesIO(b""))
    context = _context(tmp_path, "FROM scratch\nADD app.tar /\n", {"app.tar": buffer.getvalue()})
    with pytest.raises(DockerfileError, match="use COPY"):
        build_from_dockerfile(store, context, context / "Dockerfile", [DEMO])


def test_missing_inputs_are_not_found(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such file"):
        build_from_wasm(store, tmp_path / "nope.wasm", [DEMO])
    with pytest.raises(NotFoundError, match="not a directory"):
        build_from_dockerfile(store, tmp_path / "nope", tmp_path / "nope" / "Dockerfile", [DEMO])
    with pytest.raises(NotFoundError, match="no Dockerfile"):
        build_from_dockerfile(store, tmp_path, tmp_path / "Dockerfile", [DEMO])
