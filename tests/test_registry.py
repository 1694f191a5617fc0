"""`kwasm push`, `pull` and `login` against Debian's docker-registry (distribution 2.8) on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DEMO_WASM, KwasmRunner
from services import RunningRegistry, free_port, running_registry

from kwasm.image.builder import build_from_wasm, canonical_json
from kwasm.image.reference import Reference
from kwasm.image.registry import ensure_local, push
from kwasm.image.registry_client import RegistryClient
from kwasm.image.store import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER_TAR,
    MEDIA_OCI_MANIFEST,
    ImageStore,
    sha256_digest,
)


def _build(root: Path, tag: str, *, artifact: bool = False, platform: str = "wasip1/wasm") -> str:
    built = build_from_wasm(ImageStore(root), DEMO_WASM, [Reference.parse(tag)], artifact=artifact, platform=platform)
    return built.manifest_digest


def _one_line_error(result: object, code: int, *phrases: str) -> None:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.returncode == code, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    for phrase in phrases:
        assert phrase in stderr


def _stored_blobs(root: Path) -> list[str]:
    blobs = root / "blobs" / "sha256"
    return sorted(p.name for p in blobs.iterdir()) if blobs.is_dir() else []


def _refs(root: Path) -> dict[str, str]:
    path = root / "refs.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


@pytest.mark.parametrize("artifact", [False, True], ids=["image", "artifact"])
def test_push_then_pull_keeps_the_digest_and_second_push_uploads_nothing(
    registry: RunningRegistry, kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path, artifact: bool
) -> None:
    digest = _build(kwasm_root, "demo:1", artifact=artifact)
    destination = registry.ref("team/demo", "1")

    first = kwasm("push", "demo:1", destination, check=True)
    assert f"digest: {digest}" in first.stdout
    again = json.loads(kwasm("push", "demo:1", destination, "--json", check=True).stdout)
    assert again["digest"] == digest
    assert again["transferred"] == []
    assert len(again["skipped"]) == 2  # config + the one layer, both already in the registry

    other_root = tmp_path / "other-root"
    pulled = json.loads(kwasm("pull", destination, "--json", env={"KWASM_ROOT": str(other_root)}, check=True).stdout)
    assert pulled["digest"] == digest
    store = ImageStore(other_root)
    image = store.resolve(destination)
    assert image.manifest_digest == digest
    assert image.is_artifact is artifact
    assert store.module_path(image).read_bytes() == DEMO_WASM.read_bytes()
    assert store.read_blob(digest) == ImageStore(kwasm_root).read_blob(digest)


def test_push_artifact_converts_an_image_to_the_artifact_a_build_would_make(
    registry: RunningRegistry, kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path
) -> None:
    _build(kwasm_root, "demo:1")
    artifact_digest = _build(tmp_path / "reference-root", "demo:art", artifact=True)

    pushed = json.loads(kwasm("push", "demo:1", registry.ref("demo", "art"), "--artifact", "--json", check=True).stdout)
    other_root = tmp_path / "other-root"
    kwasm("pull", registry.ref("demo", "art"), env={"KWASM_ROOT": str(other_root)}, check=True)

    assert pushed["digest"] == artifact_digest
    pulled = ImageStore(other_root).resolve(registry.ref("demo", "art"))
    assert pulled.is_artifact and pulled.manifest_digest == artifact_digest
    assert ImageStore(kwasm_root).resolve("demo:1").is_artifact is False, "the local image keeps its form"


def test_basic_auth_login_push_pull_and_wrong_password(
    auth_registry: RunningRegistry, kwasm: KwasmRunner, kwasm_root: Path, docker_config: Path, tmp_path: Path
) -> None:
    host = auth_registry.host
    image_digest = _build(kwasm_root, "demo:1")
    artifact_digest = _build(kwasm_root, "demo:art", artifact=True)

    _one_line_error(kwasm("push", "demo:1", f"{host}/demo:1"), 6, "requires authentication", f"kwasm login {host}")

    wrong = kwasm("login", host, "-u", "alice", "--password-stdin", input="not-the-password\n")
    _one_line_error(wrong, 6, "rejected the credentials", "alice")
    assert not (docker_config / "config.json").exists()

    kwasm("login", host, "-u", "alice", "--password-stdin", input="wonderland\n", check=True)
    config_file = docker_config / "config.json"
    saved = json.loads(config_file.read_text())
    assert base64.b64decode(saved["auths"][host]["auth"]) == b"alice:wonderland"
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600

    other_root = tmp_path / "other-root"
    for tag, digest in (("1", image_digest), ("art", artifact_digest)):
        pushed = json.loads(kwasm("push", f"demo:{tag}", f"{host}/demo:{tag}", "--json", check=True).stdout)
        assert pushed["digest"] == digest
        pulled = kwasm("pull", f"{host}/demo:{tag}", "--json", env={"KWASM_ROOT": str(other_root)}, check=True)
        assert json.loads(pulled.stdout)["digest"] == digest

    # Credentials that have gone stale: a clean refusal, and nothing stored by the failed pull.
    saved["auths"][host]["auth"] = base64.b64encode(b"alice:stale").decode()
    config_file.write_text(json.dumps(saved))
    fresh_root = tmp_path / "fresh-root"
    _one_line_error(kwasm("pull", f"{host}/demo:1", env={"KWASM_ROOT": str(fresh_root)}), 6, "rejected the credentials")
    assert _stored_blobs(fresh_root) == [] and _refs(fresh_root) == {}


@pytest.fixture
def token_registry(tmp_path: Path, docker_config: Path) -> Iterator[RunningRegistry]:
    """docker-registry with bearer-token auth; a loopback token server knows user ``alice``."""
    with running_registry(tmp_path / "token-registry", {"alice": "wonderland"}, token_auth=True) as service:
        yield service


def test_token_auth_login_push_and_pull(
    token_registry: RunningRegistry, kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path
) -> None:
    host = token_registry.host
    digest = _build(kwasm_root, "demo:1")
    _one_line_error(kwasm("push", "demo:1", f"{host}/demo:1"), 6, "requires authentication")
    wrong = kwasm("login", host, "-u", "alice", "--password-stdin", input="nope\n")
    _one_line_error(wrong, 6, "rejected the credentials")

    kwasm("login", host, "-u", "alice", "--password-stdin", input="wonderland\n", check=True)
    pushed = json.loads(kwasm("push", "demo:1", f"{host}/demo:1", "--json", check=True).stdout)
    other_root = tmp_path / "other-root"
    pulled = kwasm("pull", f"{host}/demo:1", "--json", env={"KWASM_ROOT": str(other_root)}, check=True)

    assert pushed["digest"] == json.loads(pulled.stdout)["digest"] == digest
    assert token_registry.token_server is not None
    granted = [scope.split(":") for scope in token_registry.token_server.issued if scope.startswith("repository:")]
    assert any(name == "demo" and "push" in actions.split(",") for _, name, actions in granted), granted


def test_anonymous_pull_from_a_public_repository_with_token_auth(
    tmp_path: Path, docker_config: Path, kwasm: KwasmRunner, kwasm_root: Path
) -> None:
    with running_registry(tmp_path / "public", {"alice": "wonderland"}, token_auth=True, anonymous_pull=True) as public:
        digest = _build(kwasm_root, "demo:1")
        refused = kwasm("push", "demo:1", f"{public.host}/demo:1")
        _one_line_error(refused, 6, "requires authentication")
        kwasm("login", public.host, "-u", "alice", "--password-stdin", input="wonderland\n", check=True)
        kwasm("push", "demo:1", f"{public.host}/demo:1", check=True)
        (docker_config / "config.json").unlink()  # logged out: pulls are anonymous

        pulled = kwasm("pull", f"{public.host}/demo:1", "--json", env={"KWASM_ROOT": str(tmp_path / "anonymous")})

        assert pulled.returncode == 0, pulled.stderr
        assert json.loads(pulled.stdout)["digest"] == digest
        assert public.token_server is not None
        assert public.token_server.issued[-1] == "repository:demo:pull"


def test_unreachable_registry_and_unknown_repository_fail_with_one_line(
    registry: RunningRegistry, kwasm: KwasmRunner, kwasm_root: Path
) -> None:
    _build(kwasm_root, "demo:1")
    started = time.monotonic()
    _one_line_error(kwasm("push", "demo:1", f"127.0.0.1:{free_port()}/demo:1"), 6, "cannot reach registry")
    assert time.monotonic() - started < 15, "an unreachable registry must fail fast, not retry for minutes"

    before = _stored_blobs(kwasm_root)
    _one_line_error(kwasm("pull", f"{registry.host}/no/such-repo:1"), 3, "not found in registry")
    assert _stored_blobs(kwasm_root) == before


def _put_raw_image(store: ImageStore, os_name: str, architecture: str, entrypoint: list[str]) -> str:
    """A single-layer image with an arbitrary platform, put into the store blob by blob."""
    layer = DEMO_WASM.read_bytes()[:512] + bytes(512)  # not a tar: the pull refuses before looking at it
    layer_digest = store.put_blob(layer)
    config = canonical_json(
        {
            "architecture": architecture,
            "os": os_name,
            "config": {"Entrypoint": entrypoint},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": store.put_blob(config), "size": len(config)},
            "layers": [{"mediaType": MEDIA_OCI_LAYER_TAR, "digest": layer_digest, "size": len(layer)}],
        }
    )
    return store.put_blob(manifest)


def _push_index(registry: RunningRegistry, repository: str, entries: list[tuple[str, int, str]]) -> None:
    index = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_INDEX,
            "manifests": [
                {
                    "mediaType": MEDIA_OCI_MANIFEST,
                    "digest": digest,
                    "size": size,
                    "platform": {"os": platform.split("/")[0], "architecture": platform.split("/")[1]},
                }
                for digest, size, platform in entries
            ],
        }
    )
    client = RegistryClient(registry.host, repository)
    client.connect()
    client.put_manifest("multi", index, MEDIA_OCI_INDEX)


def test_pull_picks_the_wasm_platform_and_refuses_other_images(
    registry: RunningRegistry, kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path
) -> None:
    source = ImageStore(tmp_path / "source")
    wasm_digest = _build(source.root, "demo:wasm")
    linux_digest = _put_raw_image(source, "linux", "amd64", ["/bin/sh"])
    source.tag("demo:linux", linux_digest)
    for tag in ("wasm", "linux"):
        push(source, f"demo:{tag}", registry.ref("demo", tag))
    entries = [
        (linux_digest, len(source.read_blob(linux_digest)), "linux/amd64"),
        (wasm_digest, len(source.read_blob(wasm_digest)), "wasip1/wasm"),
    ]
    _push_index(registry, "demo", entries)

    pulled = json.loads(kwasm("pull", registry.ref("demo", "multi"), "--json", check=True).stdout)
    assert pulled["digest"] == wasm_digest
    assert ImageStore(kwasm_root).resolve(registry.ref("demo", "multi")).config.platform == "wasip1/wasm"

    before = (_stored_blobs(kwasm_root), _refs(kwasm_root))
    refused = kwasm("pull", registry.ref("demo", "linux"))
    _one_line_error(refused, 4, "neither a wasm image nor a wasm artifact", "linux/amd64", "/bin/sh")
    push(source, "demo:linux", registry.ref("linux-only", "x"))
    _push_index(registry, "linux-only", [entries[0]])
    _one_line_error(kwasm("pull", registry.ref("linux-only", "multi")), 4, "neither a wasm image", "linux/amd64")
    assert (_stored_blobs(kwasm_root), _refs(kwasm_root)) == before


def test_ensure_local_pulls_only_what_is_missing(registry: RunningRegistry, tmp_path: Path) -> None:
    source = ImageStore(tmp_path / "source")
    digest = _build(source.root, "demo:1")
    push(source, "demo:1", registry.ref("demo", "1"))

    store = ImageStore(tmp_path / "runner")
    image = ensure_local(store, registry.ref("demo", "1"))
    assert image.manifest_digest == digest
    assert store.module_path(image).read_bytes() == DEMO_WASM.read_bytes()
    assert ensure_local(store, registry.ref("demo", "1")).manifest_digest == digest
    assert sha256_digest(store.read_blob(digest)) == digest

    by_digest = ImageStore(tmp_path / "by-digest")
    assert ensure_local(by_digest, f"{registry.host}/demo@{digest}").manifest_digest == digest
    assert by_digest.images() == [], "pulled by digest only: stored untagged"
    both = ImageStore(tmp_path / "tag-and-digest")
    assert ensure_local(both, f"{registry.host}/demo:1@{digest}").manifest_digest == digest
    assert [image.reference for image in both.images()] == [Reference.parse(registry.ref("demo", "1"))]


def test_self_signed_tls_needs_insecure(tmp_path: Path, kwasm: KwasmRunner, kwasm_root: Path) -> None:
    digest = _build(kwasm_root, "demo:1")
    with running_registry(tmp_path / "tls-registry", tls=True) as tls_registry:
        destination = tls_registry.ref("demo", "1")
        _one_line_error(kwasm("push", "demo:1", destination), 6, "speaks HTTPS", "--https")
        _one_line_error(kwasm("push", "demo:1", destination, "--https"), 6, "TLS", "--insecure")

        pushed = json.loads(kwasm("push", "demo:1", destination, "--insecure", "--json", check=True).stdout)
        other_root = tmp_path / "other-root"
        pulled = kwasm("pull", destination, "--insecure", "--json", env={"KWASM_ROOT": str(other_root)}, check=True)

    assert pushed["digest"] == json.loads(pulled.stdout)["digest"] == digest


HELPER = """#!/bin/sh
# docker-credential-kwasmtest: keeps one secret in a file, speaking the credential-helper protocol.
store="$(dirname "$0")/secret.json"
case "$1" in
  store) cat > "$store" ;;
  get) cat "$store" ;;
  *) exit 1 ;;
esac
"""


def test_login_honours_docker_config_helpers_and_keeps_other_keys(
    auth_registry: RunningRegistry,
    kwasm: KwasmRunner,
    kwasm_root: Path,
    docker_config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = auth_registry.host
    helpers = tmp_path / "bin"
    helpers.mkdir()
    helper = helpers / "docker-credential-kwasmtest"
    helper.write_text(HELPER)
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helpers}:{os.environ['PATH']}")
    docker_config.mkdir()
    original = {"credHelpers": {host: "kwasmtest"}, "HttpHeaders": {"User-Agent": "team-tool"}}
    (docker_config / "config.json").write_text(json.dumps(original))
    digest = _build(kwasm_root, "demo:1")

    kwasm("login", host, "-u", "alice", "--password-stdin", input="wonderland\n", check=True)

    saved = json.loads((docker_config / "config.json").read_text())
    assert saved["HttpHeaders"] == original["HttpHeaders"] and saved["credHelpers"] == original["credHelpers"]
    assert saved["auths"][host] == {}, "the secret belongs to the helper, not the file"
    assert json.loads((helpers / "secret.json").read_text())["Secret"] == "wonderland"
    pushed = json.loads(kwasm("push", "demo:1", f"{host}/demo:1", "--json", check=True).stdout)
    assert pushed["digest"] == digest


def test_run_of_a_registry_reference_pulls_it_first(
    registry: RunningRegistry, kwasm: KwasmRunner, tmp_path: Path
) -> None:
    pusher_root = tmp_path / "pusher"
    _build(pusher_root, "demo:1")
    destination = registry.ref("team/run-me", "1")
    pushed = kwasm("push", "demo:1", destination, env={"KWASM_ROOT": str(pusher_root)})
    assert pushed.returncode == 0, pushed.stderr

    ran = kwasm("run", destination, "--", "echo", "pulled", "and", "ran")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "pulled and ran\n"
    listed = json.loads(kwasm("images", "--json", check=True).stdout)
    assert [entry["reference"] for entry in listed] == [destination]

    unknown = kwasm("run", registry.ref("team/absent", "1"), "--", "echo", "x")
    _one_line_error(unknown, 3, "team/absent")
