"""Archives: the dual OCI-layout/docker-archive tar and layout dirs as skopeo and umoci read them, and loading."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from services import RunningDockerd, stop_process
from test_build import DEMO, DEMO_DIR, DEMO_WASM, store_snapshot

from kwasm.errors import DigestMismatchError, InvalidImageError, UnsafeArchiveError, UsageError
from kwasm.image.archive import write_archive, write_layout_dir
from kwasm.image.builder import build_from_dockerfile, build_from_wasm
from kwasm.image.load import load_images
from kwasm.image.reference import Reference
from kwasm.image.store import MEDIA_OCI_INDEX, MEDIA_WASM_CONFIG, ImageStore, StoredImage


def run_tool(*command: str) -> str:
    """Run skopeo/umoci; fail the test with their stderr if they refuse."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(command)} failed: {done.stderr}"
    return done.stdout


def skopeo_json(*args: str) -> Any:
    return json.loads(run_tool("skopeo", "inspect", *args))


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


@pytest.fixture
def demo(store: ImageStore) -> StoredImage:
    build_from_dockerfile(store, DEMO_DIR, DEMO_DIR / "Dockerfile", [DEMO])
    return store.resolve(DEMO)


def tar_files(path: Path) -> dict[str, bytes]:
    files = {}
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            handle = archive.extractfile(member) if member.isfile() else None
            if handle is not None:
                files[member.name] = handle.read()
    return files


def write_tar(path: Path, files: dict[str, bytes], extra: Sequence[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra:
            archive.addfile(info)
    return path


def test_dual_tar_is_an_oci_archive_and_a_docker_archive(store: ImageStore, demo: StoredImage, tmp_path: Path) -> None:
    target = tmp_path / "demo.tar"
    write_archive(store, [demo], target)
    with tarfile.open(target) as archive:
        names = archive.getnames()
        assert all(m.uid == 0 and m.gid == 0 and m.mtime == 0 for m in archive.getmembers())
    assert names == sorted(names)
    files = tar_files(target)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (descriptor,) = json.loads(files["index.json"])["manifests"]
    assert descriptor["annotations"] == {
        "io.containerd.image.name": "docker.io/library/wasi-demo-app:latest",
        "org.opencontainers.image.ref.name": "latest",
    }
    assert descriptor["platform"] == {"architecture": "wasm", "os": "wasip1"}
    assert json.loads(files["manifest.json"])[0]["RepoTags"] == ["wasi-demo-app:latest"]

    oci = skopeo_json(f"oci-archive:{target}")
    assert (oci["Os"], oci["Architecture"], oci["Digest"]) == ("wasip1", "wasm", demo.manifest_digest)
    for transport in ("oci-archive", "docker-archive"):
        config = skopeo_json("--config", f"{transport}:{target}")
        assert config["config"]["Entrypoint"] == ["/wasi-demo-app.wasm"]
        assert (config["os"], config["architecture"]) == ("wasip1", "wasm")
    copied = tmp_path / "copied"
    run_tool("skopeo", "copy", "-q", f"docker-archive:{target}", f"oci:{copied}:copied")  # verifies every digest


def test_linux_amd64_platform_shows_in_skopeo(store: ImageStore, tmp_path: Path) -> None:
    build_from_wasm(store, DEMO_WASM, [DEMO], platform="linux/amd64")
    target = tmp_path / "amd64.tar"
    write_archive(store, [store.resolve(DEMO)], target)
    docker = skopeo_json(f"docker-archive:{target}")
    assert (docker["Os"], docker["Architecture"]) == ("linux", "amd64")


def test_layout_dir_is_read_by_skopeo_and_unpacked_by_umoci(
    store: ImageStore, demo: StoredImage, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    write_layout_dir(store, [demo], layout)
    build_from_wasm(store, DEMO_WASM, [Reference.parse("second:v2")], platform="linux/amd64")
    write_layout_dir(store, [store.resolve("second:v2")], layout)  # adds to the layout already there

    assert sorted(run_tool("umoci", "ls", "--layout", str(layout)).split()) == ["latest", "v2"]
    assert "kwasm build" in run_tool("umoci", "stat", "--image", f"{layout}:latest")
    inspected = skopeo_json(f"oci:{layout}:latest")
    assert (inspected["Os"], inspected["Architecture"]) == ("wasip1", "wasm")
    assert skopeo_json("--config", f"oci:{layout}:latest")["config"]["Entrypoint"] == ["/wasi-demo-app.wasm"]
    bundle = tmp_path / "bundle"
    run_tool("umoci", "unpack", "--image", f"{layout}:v2", str(bundle))  # umoci makes runtime specs for linux only
    module = bundle / "rootfs" / "wasi-demo-app.wasm"
    assert module.read_bytes() == DEMO_WASM.read_bytes()
    assert module.stat().st_mode & 0o777 == 0o755
    runtime = json.loads((bundle / "config.json").read_text())
    assert runtime["process"]["args"] == ["/wasi-demo-app.wasm"]


def test_rewriting_a_layout_repairs_a_damaged_blob_of_the_same_size(
    store: ImageStore, demo: StoredImage, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    write_layout_dir(store, [demo], layout)
    blob = layout / "blobs" / "sha256" / demo.layers[0]["digest"][7:]
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + b"?")
    write_layout_dir(store, [demo], layout)
    assert blob.read_bytes() == original


def test_saving_twice_gives_identical_bytes(store: ImageStore, demo: StoredImage, tmp_path: Path) -> None:
    write_archive(store, [demo], tmp_path / "one.tar")
    write_archive(store, [demo], tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()


def test_artifact_archive_is_oci_only_and_skopeo_copies_it(store: ImageStore, tmp_path: Path) -> None:
    build_from_wasm(store, DEMO_WASM, [DEMO], artifact=True)
    target = tmp_path / "artifact.tar"
    write_archive(store, [store.resolve(DEMO)], target)
    assert "manifest.json" not in tar_files(target)
    raw = json.loads(run_tool("skopeo", "inspect", "--raw", f"oci-archive:{target}"))
    assert raw["config"]["mediaType"] == MEDIA_WASM_CONFIG
    run_tool("skopeo", "copy", "-q", f"oci-archive:{target}", f"oci:{tmp_path / 'copy'}:artifact")


@pytest.mark.parametrize("form", ["tar", "tar.gz", "dir", "docker-archive-only"])
def test_round_trip_keeps_digests_and_names(store: ImageStore, demo: StoredImage, tmp_path: Path, form: str) -> None:
    source = tmp_path / "image.tar"
    if form == "dir":
        source = tmp_path / "layout"
        write_layout_dir(store, [demo], source)
    else:
        write_archive(store, [demo], source)
    if form == "tar.gz":
        compressed = tmp_path / "image.tar.gz"
        compressed.write_bytes(gzip.compress(source.read_bytes()))
        source = compressed
    if form == "docker-archive-only":
        files = tar_files(source)
        del files["oci-layout"], files["index.json"]
        write_tar(source, files)
    fresh = ImageStore(tmp_path / "fresh")
    (loaded,) = load_images(fresh, source)
    image = fresh.resolve(DEMO)
    assert loaded.references == [DEMO]
    assert image.config_digest == demo.config_digest
    if form != "docker-archive-only":
        assert image.manifest_digest == demo.manifest_digest
    assert fresh.module_path(image).read_bytes() == DEMO_WASM.read_bytes()


def test_skopeo_written_archives_load(store: ImageStore, demo: StoredImage, tmp_path: Path) -> None:
    ours = tmp_path / "ours.tar"
    write_archive(store, [demo], ours)
    docker_archive = tmp_path / "skopeo-docker.tar"
    run_tool("skopeo", "copy", "-q", f"oci-archive:{ours}", f"docker-archive:{docker_archive}:made/by-skopeo:1")
    layout = tmp_path / "skopeo-layout"
    run_tool("skopeo", "copy", "-q", f"oci-archive:{ours}", f"oci:{layout}:v1")
    fresh = ImageStore(tmp_path / "fresh")
    load_images(fresh, docker_archive)
    assert fresh.module_path(fresh.resolve("made/by-skopeo:1")).read_bytes() == DEMO_WASM.read_bytes()
    with pytest.raises(UsageError, match="has no name"):  # skopeo's layout names only the tag
        load_images(fresh, layout)
    load_images(fresh, layout, Reference.parse("named"))
    assert fresh.resolve("named:v1").config_digest == demo.config_digest


def _symlink(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("extra_file", "extra_entry"),
    [
        ("../escape.txt", None),
        ("blobs/../../escape.txt", None),
        ("/etc/cron.d/evil", None),
        (None, _symlink("blobs/sha256/link", "../../../etc/passwd")),
        (None, _symlink("blobs/abs", "/etc/shadow")),
        (None, _symlink("hard", "../outside", tarfile.LNKTYPE)),
    ],
)
def test_escaping_entries_are_refused_and_store_nothing(
    store: ImageStore, demo: StoredImage, tmp_path: Path, extra_file: str | None, extra_entry: tarfile.TarInfo | None
) -> None:
    good = tmp_path / "good.tar"
    write_archive(store, [demo], good)
    files = tar_files(good)
    if extra_file:
        files[extra_file] = b"owned"
    evil = write_tar(tmp_path / "evil.tar", files, [extra_entry] if extra_entry else [])
    target = ImageStore(tmp_path / "target")
    build_from_wasm(target, DEMO_WASM, [Reference.parse("existing:1")], artifact=True)
    before = store_snapshot(target)
    with pytest.raises(UnsafeArchiveError) as caught:
        load_images(target, evil)
    assert str(evil) in str(caught.value) and "\n" not in str(caught.value)
    assert store_snapshot(target) == before
    assert not (tmp_path / "escape.txt").exists()


def test_tampered_blob_is_a_digest_mismatch(store: ImageStore, demo: StoredImage, tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    write_archive(store, [demo], good)
    files = tar_files(good)
    layer = f"blobs/sha256/{demo.layers[0]['digest'][7:]}"
    files[layer] = files[layer].replace(b"\0asm", b"\0ASM", 1)
    target = ImageStore(tmp_path / "target")
    with pytest.raises(DigestMismatchError, match="does not match its digest"):
        load_images(target, write_tar(tmp_path / "tampered.tar", files))
    del files["oci-layout"]  # docker-archive path: the layer no longer matches the config's diff_id
    with pytest.raises(DigestMismatchError, match="diff_id"):
        load_images(target, write_tar(tmp_path / "tampered-docker.tar", files))
    assert store_snapshot(target) == {}


def test_corrupt_gzip_layer_in_a_docker_archive_is_one_clear_error(store: ImageStore, tmp_path: Path) -> None:
    layer = bytearray(gzip.compress(bytes(range(256)) * 64))
    layer[10:18] = b"\x00\xff" * 4  # breaks the deflate stream itself (zlib.error, not OSError)
    config = json.dumps({"os": "linux", "architecture": "amd64", "rootfs": {"diff_ids": ["sha256:" + "0" * 64]}})
    manifest = [{"Config": "config.json", "RepoTags": ["corrupt:1"], "Layers": ["layer.tar.gz"]}]
    files = {"manifest.json": json.dumps(manifest).encode(), "config.json": config.encode()}
    files["layer.tar.gz"] = bytes(layer)
    with pytest.raises(InvalidImageError, match="corrupt gzip data"):
        load_images(store, write_tar(tmp_path / "corrupt.tar", files))
    assert store_snapshot(store) == {}


def test_not_an_archive_is_refused(store: ImageStore, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"definitely not a tar archive" * 100)
    with pytest.raises(InvalidImageError, match="not a readable tar"):
        load_images(store, junk)
    empty = write_tar(tmp_path / "empty.tar", {"README": b"hi"})
    with pytest.raises(InvalidImageError, match="neither an OCI image layout"):
        load_images(store, empty)
    assert store_snapshot(store) == {}


def test_docker_save_output_loads(dockerd: RunningDockerd, store: ImageStore, tmp_path: Path) -> None:
    env = {**os.environ, "DOCKER_HOST": dockerd.base_url, "DOCKER_BUILDKIT": "0"}
    for command in (
        ["docker", "build", "-q", "-t", "from-docker:1", str(DEMO_DIR)],
        ["docker", "save", "-o", str(tmp_path / "docker.tar"), "from-docker:1"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
    (loaded,) = load_images(store, tmp_path / "docker.tar")
    image = store.resolve("from-docker:1")
    assert loaded.platform == "linux/amd64"
    assert image.config.entrypoint == ["/wasi-demo-app.wasm"]
    assert store.module_path(image).read_bytes() == DEMO_WASM.read_bytes()


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[list[str]]:
    """A private containerd (own root, state and socket); yields the ``ctr`` command prefix for it."""
    sock_dir = Path(tempfile.mkdtemp(prefix="kwc", dir="/tmp"))  # unix socket paths must stay short
    config = tmp_path / "containerd.toml"
    config.write_text(
        f'version = 2\nroot = "{tmp_path}/ctd-root"\nstate = "{sock_dir}/state"\n'
        f'[grpc]\n  address = "{sock_dir}/c.sock"\n[ttrpc]\n  address = "{sock_dir}/c.sock.ttrpc"\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n  disable_tcp_service = true\n'
    )
    with (tmp_path / "containerd.log").open("wb") as log:
        process = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    ctr = ["ctr", "--address", str(sock_dir / "c.sock")]
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], capture_output=True).returncode != 0:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "containerd.log").read_text()
            time.sleep(0.1)
        yield ctr
    finally:
        stop_process(process)
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_ctr_images_import_reads_the_dual_tar(
    containerd: list[str], store: ImageStore, demo: StoredImage, tmp_path: Path
) -> None:
    build_from_wasm(store, DEMO_WASM, [Reference.parse("demo:amd64")], platform="linux/amd64")
    write_archive(store, [demo], tmp_path / "wasm.tar")
    write_archive(store, [store.resolve("demo:amd64")], tmp_path / "amd64.tar")
    run_tool(*containerd, "images", "import", "--platform", "wasip1/wasm", str(tmp_path / "wasm.tar"))
    run_tool(*containerd, "images", "import", str(tmp_path / "amd64.tar"))  # the host platform by default
    listed = " ".join(run_tool(*containerd, "images", "ls").split())
    assert (
        f"docker.io/library/wasi-demo-app:latest application/vnd.oci.image.manifest.v1+json {demo.manifest_digest}"
        in (listed)
    )
    assert "docker.io/library/demo:amd64" in listed and "wasip1/wasm" in listed and "linux/amd64" in listed


def test_multi_platform_index_loads_its_wasm_manifest(store: ImageStore, demo: StoredImage, tmp_path: Path) -> None:
    build_from_wasm(store, DEMO_WASM, [Reference.parse("demo:amd64")], platform="linux/amd64")
    amd64 = store.resolve("demo:amd64")
    layout = tmp_path / "layout"
    write_layout_dir(store, [amd64, demo], layout)
    index = json.loads((layout / "index.json").read_text())
    for descriptor in index["manifests"]:
        del descriptor["annotations"]
    nested = json.dumps(index).encode()
    digest = "sha256:" + hashlib.sha256(nested).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(nested)
    top = {"mediaType": MEDIA_OCI_INDEX, "digest": digest, "size": len(nested)}
    top["annotations"] = {"io.containerd.image.name": "docker.io/library/multi:1"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))

    fresh = ImageStore(tmp_path / "fresh")
    (loaded,) = load_images(fresh, layout)
    assert (loaded.platform, loaded.manifest_digest) == ("wasip1/wasm", demo.manifest_digest)
    assert fresh.resolve("multi:1").config.platform == "wasip1/wasm"
