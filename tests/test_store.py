"""The local image store: content addressing, tags, lookups, unpacking, and failed imports."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from kwasm.errors import (
    DigestMismatchError,
    ImageNotFoundError,
    InvalidImageError,
    UnsafeArchiveError,
    UsageError,
)
from kwasm.image.reference import Reference
from kwasm.image.store import MEDIA_OCI_CONFIG, MEDIA_OCI_LAYER_TAR, MEDIA_OCI_MANIFEST, ImageStore, sha256_digest

DEMO_WASM = Path(__file__).resolve().parents[1] / "examples" / "wasi-demo-app" / "wasi-demo-app.wasm"


def _layer(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in sorted(entries.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _put_image(store: ImageStore, layer: bytes, entrypoint: list[str]) -> str:
    layer_digest = store.put_blob(layer)
    config = json.dumps(
        {
            "os": "wasip1",
            "architecture": "wasm",
            "config": {"Entrypoint": entrypoint, "Env": ["A=1"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    config_digest = store.put_blob(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": MEDIA_OCI_LAYER_TAR, "digest": layer_digest, "size": len(layer)}],
        }
    ).encode()
    return store.put_blob(manifest)


def test_tag_resolve_and_run_path(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    digest = _put_image(store, _layer({"app.wasm": DEMO_WASM.read_bytes()}), ["/app.wasm"])
    store.tag("demo:1", digest)

    image = store.resolve("demo:1")
    assert image.manifest_digest == digest
    assert image.reference == Reference.parse("docker.io/library/demo:1")
    assert image.config.platform == "wasip1/wasm"
    assert image.config.env == ["A=1"]
    assert store.resolve(digest[7:19]).manifest_digest == digest
    assert store.resolve(f"demo@{digest}").manifest_digest == digest
    assert store.module_path(image).read_bytes() == DEMO_WASM.read_bytes()
    assert [i.reference.familiar() for i in store.images() if i.reference] == ["demo:1"]


def test_untag_removes_unshared_blobs(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    digest = _put_image(store, _layer({"app.wasm": b"\0asm\1\0\0\0"}), ["/app.wasm"])
    store.tag("a:1", digest)
    store.tag("b:1", digest)
    store.untag("a:1")
    assert store.has_blob(digest)
    store.untag("b:1")
    assert not store.has_blob(digest)
    assert list((tmp_path / "blobs" / "sha256").iterdir()) == []
    with pytest.raises(ImageNotFoundError, match="b:1 is not in the local store"):
        store.resolve("b:1")


def test_mismatched_blob_is_refused_and_not_stored(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    wrong = sha256_digest(b"something else")
    with pytest.raises(DigestMismatchError, match="does not match its digest"):
        store.put_blob_stream([b"payload"], wrong, 7)
    assert not store.has_blob(wrong)
    assert not any((tmp_path / "tmp").iterdir())


def test_failed_ingest_leaves_store_unchanged(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    kept = store.put_blob(b"already here")
    with pytest.raises(DigestMismatchError), store.ingest():
        store.put_blob(b"new blob")
        store.put_blob(b"already here")
        store.put_blob(b"bad", expected=sha256_digest(b"other"))
    assert sorted(p.name for p in (tmp_path / "blobs" / "sha256").iterdir()) == [kept[7:]]


def test_unpack_refuses_escaping_entries(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    digest = _put_image(store, _layer({"../evil.wasm": b"x"}), ["/evil.wasm"])
    store.tag("evil:1", digest)
    with pytest.raises(UnsafeArchiveError, match="unsafe layer entry"):
        store.module_path(store.resolve("evil:1"))
    assert not (tmp_path / "evil.wasm").exists()
    assert not (tmp_path / "rootfs").exists() or not any((tmp_path / "rootfs").iterdir())


def test_a_layer_that_is_not_a_tar_is_one_clear_error(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    store.tag("junk:1", _put_image(store, b"not a tar archive" * 64, ["/app.wasm"]))
    with pytest.raises(InvalidImageError, match="is not a readable tar") as caught:
        store.module_path(store.resolve("junk:1"))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "rootfs").exists() or not any((tmp_path / "rootfs").iterdir())


def test_a_config_that_is_not_an_object_is_an_invalid_image(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    config_digest = store.put_blob(b"[]")
    manifest = json.dumps(
        {"schemaVersion": 2, "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": 2}}
    ).encode()
    store.tag("odd:1", store.put_blob(manifest))
    with pytest.raises(InvalidImageError, match="not a JSON object"):
        store.resolve("odd:1")


def test_unknown_and_malformed_references(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(ImageNotFoundError, match="nope:latest is not in the local store"):
        store.resolve("nope")
    with pytest.raises(UsageError, match="invalid image reference"):
        store.resolve("Bad:Name:x")


def test_reference_forms() -> None:
    assert str(Reference.parse("app")) == "docker.io/library/app:latest"
    ref = Reference.parse("127.0.0.1:5000/team/app:2")
    assert (ref.registry, ref.repository, ref.tag) == ("127.0.0.1:5000", "team/app", "2")
    assert ref.familiar() == "127.0.0.1:5000/team/app:2"
    assert Reference.parse("ghcr.io/x/y").familiar() == "ghcr.io/x/y:latest"


def test_writers_wait_for_another_process_holding_the_store_lock(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    digest = _put_image(store, _layer({"app.wasm": DEMO_WASM.read_bytes()}), ["/app.wasm"])
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "store" / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        tagger = threading.Thread(target=store.tag, args=("app:1", digest))
        tagger.start()
        tagger.join(0.5)
        assert tagger.is_alive(), "tag went ahead while another process held the store lock"
        assert store.images() == []
    finally:
        holder.kill()
        holder.wait()
    tagger.join(10)
    assert [str(image.reference) for image in store.images()] == ["docker.io/library/app:1"]


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""
