"""The registry client's HTTP transport against loopback servers written for the test.

What a real docker-registry does not show: blob downloads redirected to another host (object
storage behind Docker Hub, GHCR, Harbor), one keep-alive connection for a whole pull, a server
that drops idle keep-alive connections without saying so, bodies framed by chunked transfer
coding or by closing the connection instead of a Content-Length, and HTTP proxies from the
environment (absolute-form requests for HTTP, a CONNECT tunnel to a real TLS docker-registry).
"""

from __future__ import annotations

import base64
import http.server
import json
import socket
import socketserver
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import DEMO_WASM, KwasmRunner
from services import free_port, running_registry

from kwasm.image.builder import build_from_wasm
from kwasm.image.proxy import proxy_for
from kwasm.image.reference import Reference
from kwasm.image.store import ImageStore

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
USER, PASSWORD = "alice", "wonderland"


@dataclass
class Seen:
    """What one test server saw."""

    connections: int = 0
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, Authorization
    proxied: list[tuple[str, str]] = field(default_factory=list)  # absolute-form target, Proxy-Authorization


class _Server(http.server.ThreadingHTTPServer):
    content: dict[str, tuple[str, bytes]]
    seen: Seen
    redirect_blobs_to: str | None  # "http://host:port": blob GETs answer 307 there
    require_basic: bool
    drop_after_each_response: bool  # close the connection silently, as an idle timeout does
    framing: str  # "length", "chunked" (Transfer-Encoding) or "close" (the body ends with the connection)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.seen.connections += 1

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, *, with_body: bool) -> None:
        seen, authorization = self.server.seen, self.headers.get("Authorization", "")
        if self.path.startswith("http://"):  # we are the proxy too: note the request, serve it from the path
            seen.proxied.append((self.path, self.headers.get("Proxy-Authorization", "")))
            self.path = urllib.parse.urlsplit(self.path).path
        seen.requests.append((self.command, self.path, authorization))
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if self.server.require_basic and authorization != expected:
            self._send(401, "application/json", b'{"errors":[{"code":"UNAUTHORIZED"}]}', with_body,
                       {"WWW-Authenticate": 'Basic realm="kwasm-test"'})  # fmt: skip
            return
        if self.server.redirect_blobs_to and "/blobs/" in self.path:
            self._send(307, "text/plain", b"", with_body, {"Location": self.server.redirect_blobs_to + self.path})
            return
        media_type, body = self.server.content.get(self.path, ("application/json", b'{"errors":[]}'))
        self._send(200 if self.path in self.server.content else 404, media_type, body, with_body, {})

    def _send(self, status: int, media_type: str, body: bytes, with_body: bool, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        framing = self.server.framing if with_body and body else "length"
        if framing == "length":
            self.send_header("Content-Length", str(len(body)))
        elif framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if framing == "chunked":
            pieces = [body[offset : offset + 4000] for offset in range(0, len(body), 4000)]
            self.wfile.write(b"".join(b"%x;piece\r\n%s\r\n" % (len(piece), piece) for piece in pieces))
            self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        elif with_body:
            self.wfile.write(body)
        if self.server.drop_after_each_response:
            self.close_connection = True  # no "Connection: close" header: the client learns on its next request

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


@pytest.fixture
def servers() -> Iterator[tuple[_Server, _Server]]:
    """Two loopback HTTP/1.1 servers: the registry and a second host for redirected blobs."""
    started: list[tuple[_Server, threading.Thread]] = []
    for _ in range(2):
        server = _Server(("127.0.0.1", 0), _Handler)
        server.content, server.seen, server.redirect_blobs_to = {}, Seen(), None
        server.require_basic = server.drop_after_each_response = False
        server.framing = "length"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
    try:
        yield started[0][0], started[1][0]
    finally:
        for server, thread in started:
            server.shutdown()
            server.server_close()
            thread.join(5)


def _host(server: _Server) -> str:
    return f"127.0.0.1:{server.server_address[1]}"


def _assert_demo_stored(kwasm_root: Path, reference: str) -> None:
    """The pulled image is in the local store and its module is the demo app's, byte for byte."""
    image = ImageStore(kwasm_root).resolve(reference)
    assert ImageStore(kwasm_root).module_path(image).read_bytes() == DEMO_WASM.read_bytes()


def _serve_demo(tmp_path: Path, *servers: _Server) -> str:
    """Put the demo artifact's manifest and blobs on ``servers`` under repository ``demo``; its digest."""
    store = ImageStore(tmp_path / "source")
    built = build_from_wasm(store, DEMO_WASM, [Reference.parse("demo:1")], artifact=True)
    image = store.resolve("demo:1")
    manifest = store.read_blob(built.manifest_digest)
    content = {"/v2/": ("application/json", b"{}"), "/v2/demo/manifests/1": (MEDIA_OCI_MANIFEST, manifest)}
    for descriptor in [image.manifest["config"], *image.layers]:
        content[f"/v2/demo/blobs/{descriptor['digest']}"] = ("application/octet-stream",
                                                            store.read_blob(descriptor["digest"]))  # fmt: skip
    for server in servers:
        server.content = dict(content)
    return built.manifest_digest


def _login(docker_config: Path, host: str) -> None:
    docker_config.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (docker_config / "config.json").write_text(json.dumps({"auths": {host: {"auth": token}}}))


def test_redirected_blobs_are_fetched_without_the_registry_credentials(
    servers: tuple[_Server, _Server], kwasm: KwasmRunner, kwasm_root: Path, docker_config: Path, tmp_path: Path
) -> None:
    registry, storage = servers
    digest = _serve_demo(tmp_path, registry, storage)
    registry.require_basic = True
    registry.redirect_blobs_to = f"http://{_host(storage)}"
    _login(docker_config, _host(registry))

    pulled = json.loads(kwasm("pull", f"{_host(registry)}/demo:1", "--json", check=True).stdout)

    assert pulled["digest"] == digest
    _assert_demo_stored(kwasm_root, f"{_host(registry)}/demo:1")
    blob_gets = [path for method, path, _ in storage.seen.requests if method == "GET"]
    assert len(blob_gets) == 2, storage.seen.requests  # config + layer, both through the redirect
    assert all(auth == "" for _, _, auth in storage.seen.requests), "credentials leaked to another host"
    assert any(auth.startswith("Basic ") for _, _, auth in registry.seen.requests)


def test_a_pull_uses_one_keep_alive_connection(
    servers: tuple[_Server, _Server], kwasm: KwasmRunner, tmp_path: Path
) -> None:
    registry, _ = servers
    digest = _serve_demo(tmp_path, registry)

    pulled = json.loads(kwasm("pull", f"{_host(registry)}/demo:1", "--json", check=True).stdout)

    assert pulled["digest"] == digest
    assert [method for method, _, _ in registry.seen.requests] == ["GET"] * 4  # ping, manifest, config, layer
    assert registry.seen.connections == 1


def test_a_connection_the_server_dropped_while_idle_is_reopened(
    servers: tuple[_Server, _Server], kwasm: KwasmRunner, tmp_path: Path
) -> None:
    registry, _ = servers
    digest = _serve_demo(tmp_path, registry)
    registry.drop_after_each_response = True

    pulled = json.loads(kwasm("pull", f"{_host(registry)}/demo:1", "--json", check=True).stdout)

    assert pulled["digest"] == digest
    assert registry.seen.connections == 4, "one fresh connection per request, each after the old one broke"


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_bodies_without_a_content_length_are_read_to_their_end(
    servers: tuple[_Server, _Server], kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path, framing: str
) -> None:
    registry, _ = servers
    digest = _serve_demo(tmp_path, registry)
    registry.framing = framing

    pulled = json.loads(kwasm("pull", f"{_host(registry)}/demo:1", "--json", check=True).stdout)

    assert pulled["digest"] == digest
    _assert_demo_stored(kwasm_root, f"{_host(registry)}/demo:1")
    assert registry.seen.connections == (1 if framing == "chunked" else 4)


def test_plain_http_goes_through_http_proxy_with_its_credentials(
    servers: tuple[_Server, _Server], kwasm: KwasmRunner, tmp_path: Path
) -> None:
    registry, _ = servers
    digest = _serve_demo(tmp_path, registry)
    proxy_env = {"HTTP_PROXY": f"http://bob:s%40cret@{_host(registry)}", "NO_PROXY": "other.invalid"}

    pulled = kwasm("pull", "registry.invalid:5000/demo:1", "--plain-http", "--json", env=proxy_env)

    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["digest"] == digest
    assert len(registry.seen.proxied) == 4
    assert all(target.startswith("http://registry.invalid:5000/v2/") for target, _ in registry.seen.proxied)
    assert {auth for _, auth in registry.seen.proxied} == {"Basic " + base64.b64encode(b"bob:s@cret").decode()}


def test_no_proxy_and_loopback_registries_are_reached_directly(
    servers: tuple[_Server, _Server], kwasm: KwasmRunner, tmp_path: Path
) -> None:
    registry, _ = servers
    digest = _serve_demo(tmp_path, registry)
    dead_proxy = {"HTTP_PROXY": f"http://127.0.0.1:{free_port()}", "NO_PROXY": "localhost,.invalid"}

    direct = kwasm("pull", f"{_host(registry)}/demo:1", "--json", env=dead_proxy)
    assert direct.returncode == 0, direct.stderr
    assert json.loads(direct.stdout)["digest"] == digest
    bypassed = kwasm("pull", "registry.invalid:5000/demo:1", "--plain-http", env=dead_proxy)
    assert bypassed.returncode == 6 and "cannot reach registry registry.invalid:5000" in bypassed.stderr
    through = kwasm("pull", "registry.example:5000/demo:1", "--plain-http", env=dead_proxy)
    assert through.returncode == 6 and "cannot reach the proxy" in through.stderr and "$HTTP_PROXY" in through.stderr
    assert registry.seen.proxied == []


class _Tunnel(socketserver.ThreadingTCPServer):
    """A CONNECT-only proxy that sends every tunnel to ``upstream`` and records what it was asked for."""

    daemon_threads = True
    upstream: tuple[str, int]
    asked: list[str]


class _TunnelHandler(socketserver.StreamRequestHandler):
    server: _Tunnel

    def handle(self) -> None:
        request_line = self.rfile.readline().decode().strip()
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        self.server.asked.append(request_line)
        with socket.create_connection(self.server.upstream) as upstream:
            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            relay = threading.Thread(target=_pipe, args=(upstream, self.connection), daemon=True)
            relay.start()
            _pipe(self.connection, upstream)
            relay.join(5)


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def test_https_goes_through_a_connect_tunnel(kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path) -> None:
    build_from_wasm(ImageStore(kwasm_root), DEMO_WASM, [Reference.parse("demo:1")])
    with running_registry(tmp_path / "tls-registry", tls=True) as tls_registry:
        tunnel = _Tunnel(("127.0.0.1", 0), _TunnelHandler)
        tunnel.upstream, tunnel.asked = ("127.0.0.1", int(tls_registry.host.rsplit(":", 1)[1])), []
        thread = threading.Thread(target=tunnel.serve_forever, daemon=True)
        thread.start()
        try:
            env = {"HTTPS_PROXY": f"127.0.0.1:{tunnel.server_address[1]}"}
            pushed = kwasm("push", "demo:1", "registry.invalid/demo:1", "--insecure", "--json", env=env)
            pulled = kwasm("pull", "registry.invalid/demo:1", "--insecure", "--json",
                           env={**env, "KWASM_ROOT": str(tmp_path / "other")})  # fmt: skip
        finally:
            tunnel.shutdown()
            tunnel.server_close()
            thread.join(5)

    assert pushed.returncode == 0, pushed.stderr
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pushed.stdout)["digest"] == json.loads(pulled.stdout)["digest"]
    assert tunnel.asked == ["CONNECT registry.invalid:443 HTTP/1.1"] * 2, "one tunnel per kwasm process"


@pytest.mark.parametrize(
    ("scheme", "netloc", "environ", "expected"),
    [
        ("https", "ghcr.io", {"https_proxy": "http://p:3128"}, "p:3128"),
        ("https", "ghcr.io", {"HTTP_PROXY": "http://p:3128"}, None),  # HTTP_PROXY is for plain-HTTP registries
        ("http", "reg.lan:5000", {"ALL_PROXY": "p"}, "p:80"),
        ("https", "ghcr.io", {"HTTPS_PROXY": "p:1", "NO_PROXY": "example.com, ghcr.io"}, None),
        ("https", "a.b.example.com", {"HTTPS_PROXY": "p:1", "NO_PROXY": ".example.com"}, None),
        ("https", "notexample.com", {"HTTPS_PROXY": "p:1", "NO_PROXY": "example.com"}, "p:1"),
        ("https", "reg.lan:5000", {"HTTPS_PROXY": "p:1", "no_proxy": "reg.lan:5001"}, "p:1"),
        ("https", "reg.lan:5000", {"HTTPS_PROXY": "p:1", "no_proxy": "reg.lan:5000"}, None),
        ("https", "10.1.2.3:5000", {"HTTPS_PROXY": "p:1", "NO_PROXY": "10.0.0.0/8"}, None),
        ("https", "ghcr.io", {"HTTPS_PROXY": "p:1", "NO_PROXY": "*"}, None),
        ("https", "[::1]:5000", {"HTTPS_PROXY": "p:1"}, None),  # loopback: never proxied
        ("https", "[2001:db8::1]:5000", {"HTTPS_PROXY": "p:1", "NO_PROXY": "[2001:db8::1]:5000"}, None),
        ("https", "[2001:db8::1]:5000", {"HTTPS_PROXY": "p:1", "NO_PROXY": "[2001:db8::1]:5001"}, "p:1"),
        ("https", "[2001:db8::1]:5000", {"HTTPS_PROXY": "p:1", "NO_PROXY": "[2001:db8::1], x"}, None),
        ("https", "[2001:db8::1]:5000", {"HTTPS_PROXY": "p:1", "NO_PROXY": "2001:db8::/32"}, None),
    ],
)
def test_proxy_choice_follows_the_environment(
    scheme: str, netloc: str, environ: dict[str, str], expected: str | None
) -> None:
    chosen = proxy_for(scheme, netloc, environ)
    assert (f"{chosen.host}:{chosen.port}" if chosen else None) == expected


def test_a_proxy_url_that_is_not_http_is_refused_with_one_line(kwasm: KwasmRunner) -> None:
    result = kwasm("pull", "ghcr.io/demo:1", env={"HTTPS_PROXY": "socks5://127.0.0.1:1080"})
    assert result.returncode == 6 and len(result.stderr.strip().splitlines()) == 1
    assert "$HTTPS_PROXY must be an http://host:port proxy URL" in result.stderr


def test_progress_bars_on_a_terminal_and_plain_result_lines_for_scripts(
    servers: tuple[_Server, _Server], kwasm: KwasmRunner, tmp_path: Path
) -> None:
    registry, _ = servers
    digest = _serve_demo(tmp_path, registry)
    terminal = {"TTY_COMPATIBLE": "1", "FORCE_COLOR": "1"}  # rich's ways to treat a pipe as a terminal

    drawn = kwasm("pull", f"{_host(registry)}/demo:1", env=terminal)
    scripted = kwasm("pull", f"{_host(registry)}/demo:1", env={"KWASM_ROOT": str(tmp_path / "scripted")})

    assert drawn.returncode == 0, drawn.stderr
    layer = [path for path in registry.content if "/blobs/" in path and registry.content[path][1].startswith(b"\0asm")]
    assert f"pull   {layer[0].rsplit(':', 1)[1][:12]}" in drawn.stderr  # the layer's progress bar
    assert scripted.returncode == 0 and scripted.stderr == ""
    assert scripted.stdout == f"pulled {_host(registry)}/demo:1\ndigest: {digest}\n"
