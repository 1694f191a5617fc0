"""A registry that serves content not matching its digest or size: the pull is refused, nothing is stored.

The registry here is a tiny loopback HTTP server written for the test, because a real registry
never serves corrupt blobs.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DEMO_WASM, KwasmRunner

from kwasm.image.builder import canonical_json
from kwasm.image.store import MEDIA_WASM_CONFIG, MEDIA_WASM_LAYER, sha256_digest

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _artifact() -> tuple[bytes, bytes, bytes]:
    module = DEMO_WASM.read_bytes()
    config = canonical_json(
        {"architecture": "wasm", "os": "wasip1", "layerDigests": [sha256_digest(module)], "component": None}
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_WASM_CONFIG, "digest": sha256_digest(config), "size": len(config)},
            "layers": [{"mediaType": MEDIA_WASM_LAYER, "digest": sha256_digest(module), "size": len(module)}],
        }
    )
    return manifest, config, module


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves /v2/evil/{manifests,blobs}/... from ``self.server.content`` (path → (type, body))."""

    def do_GET(self) -> None:
        content: dict[str, tuple[str, bytes]] = self.server.content  # type: ignore[attr-defined]
        media_type, body = content.get(self.path, ("application/json", b'{"errors":[{"code":"NOT_FOUND"}]}'))
        self.send_response(200 if self.path in content else 404)
        self.send_header("Content-Type", media_type)
        announced: dict[str, str] = getattr(self.server, "announced", {})
        if self.path in announced:
            self.send_header("Docker-Content-Digest", announced[self.path])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.send_response(404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


@pytest.fixture
def evil_registry() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _serve(server: http.server.ThreadingHTTPServer, manifest: bytes, config: bytes, layer: bytes) -> None:
    parsed = json.loads(manifest)
    server.content = {  # type: ignore[attr-defined]
        "/v2/": ("application/json", b"{}"),
        "/v2/evil/manifests/1": (MEDIA_OCI_MANIFEST, manifest),
        f"/v2/evil/manifests/{sha256_digest(manifest)}": (MEDIA_OCI_MANIFEST, manifest),
        f"/v2/evil/blobs/{parsed['config']['digest']}": ("application/octet-stream", config),
        f"/v2/evil/blobs/{parsed['layers'][0]['digest']}": ("application/octet-stream", layer),
    }


def _tampered(data: bytes) -> bytes:
    return data[:-8] + b"tampered"


CASES = {
    "layer-content": lambda m, c, w: (m, c, _tampered(w)),
    "layer-too-long": lambda m, c, w: (m, c, w + b"extra"),
    "config-content": lambda m, c, w: (m, c[:-1] + b" ", w),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_blob_is_caught_and_nothing_is_stored(
    evil_registry: http.server.ThreadingHTTPServer, kwasm: KwasmRunner, kwasm_root: Path, case: str
) -> None:
    _serve(evil_registry, *CASES[case](*_artifact()))
    host = f"127.0.0.1:{evil_registry.server_address[1]}"

    result = kwasm("pull", f"{host}/evil:1")

    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "digest" in result.stderr or "larger than" in result.stderr
    blobs = kwasm_root / "blobs" / "sha256"
    assert not blobs.is_dir() or not any(blobs.iterdir()), "a failed pull must not leave blobs behind"
    assert not (kwasm_root / "refs.json").exists() or json.loads((kwasm_root / "refs.json").read_text()) == {}
    tmp = kwasm_root / "tmp"
    assert not tmp.is_dir() or not any(tmp.iterdir())


def test_manifest_not_matching_the_requested_digest_is_refused(
    evil_registry: http.server.ThreadingHTTPServer, kwasm: KwasmRunner, kwasm_root: Path
) -> None:
    manifest, config, module = _artifact()
    _serve(evil_registry, manifest, config, module)
    host = f"127.0.0.1:{evil_registry.server_address[1]}"
    claimed = sha256_digest(b"some other manifest")
    evil_registry.content[f"/v2/evil/manifests/{claimed}"] = (MEDIA_OCI_MANIFEST, manifest)  # type: ignore[attr-defined]

    result = kwasm("pull", f"{host}/evil@{claimed}")

    assert result.returncode == 4, result.stderr
    assert "does not match its digest" in result.stderr
    assert not (kwasm_root / "blobs").exists() or not any((kwasm_root / "blobs" / "sha256").iterdir())

    good = kwasm("pull", f"{host}/evil@{sha256_digest(manifest)}", check=True)
    assert sha256_digest(manifest) in good.stdout


def test_manifest_not_matching_the_digest_the_registry_announces_is_refused(
    evil_registry: http.server.ThreadingHTTPServer, kwasm: KwasmRunner, kwasm_root: Path
) -> None:
    _serve(evil_registry, *_artifact())
    evil_registry.announced = {"/v2/evil/manifests/1": sha256_digest(b"what the registry claims")}  # type: ignore[attr-defined]
    host = f"127.0.0.1:{evil_registry.server_address[1]}"

    result = kwasm("pull", f"{host}/evil:1")

    assert result.returncode == 4, result.stderr
    assert "does not match the digest the registry announced" in result.stderr
    assert not (kwasm_root / "refs.json").exists()
