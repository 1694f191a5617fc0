"""Real services for tests and benchmarks: Debian's ``docker-registry`` and ``dockerd``.

Each service listens on 127.0.0.1 (or a private unix socket), keeps all its state in a
private directory, and is stopped by its own pid. Use the context managers
:func:`running_registry` and :func:`running_dockerd`; the pytest fixtures in
``tests/conftest.py`` wrap them.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kwasm.sandboxer.launch import stop_process

START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


@dataclass
class RunningRegistry:
    """A distribution 2.8 registry on 127.0.0.1:<port> with its storage in ``root``."""

    host: str
    root: Path
    process: subprocess.Popen[bytes]
    users: dict[str, str] = field(default_factory=dict)
    token_server: TokenServer | None = None

    def ref(self, repository: str, tag: str = "latest") -> str:
        """An image reference in this registry, e.g. ``127.0.0.1:5123/demo:latest``."""
        return f"{self.host}/{repository}:{tag}"


class TokenServer:
    """A loopback bearer-token server for the registry token protocol (the part Docker Hub/GHCR use).

    ``GET /token?service=...&scope=repository:NAME:pull,push`` with basic credentials of one of
    ``users`` returns an RS256 JWT granting that scope; wrong credentials get 401. Without
    credentials, ``anonymous_pull`` grants the ``pull`` part of the scope (a public repository, as on
    Docker Hub), else 401. The signing key and its self-signed certificate (the registry's
    ``rootcertbundle``) are made with openssl.
    """

    SERVICE = "kwasm-test-registry"
    ISSUER = "kwasm-test-issuer"

    def __init__(self, root: Path, users: dict[str, str], anonymous_pull: bool = False) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.key = root / "key.pem"
        self.certificate = root / "cert.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=kwasm-test-token", "-keyout", str(self.key), "-out", str(self.certificate)],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.certificate), "-outform", "DER"], check=True, capture_output=True
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        self.users = users
        self.anonymous_pull = anonymous_pull
        self.issued: list[str] = []  # scopes granted, in order
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        """The token endpoint URL the registry sends clients to."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def __enter__(self) -> TokenServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def token(self, user: str, scope: str) -> str:
        """An RS256 JWT for ``user`` granting ``scope`` (``repository:NAME:ACTIONS``)."""
        access = []
        if scope.startswith("repository:"):
            _, name, actions = scope.rsplit(":", 2) if scope.count(":") >= 2 else ("", "", "")
            access.append({"type": "repository", "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.ISSUER, "sub": user, "aud": self.SERVICE, "exp": now + 300, "nbf": now - 10,
            "iat": now, "jti": os.urandom(8).hex(), "access": access,
        }  # fmt: skip
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        self.issued.append(scope)
        return f"{signing_input}.{_b64url(signature)}"

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                user, _, password = _basic_credentials(self.headers.get("Authorization", ""))
                scope = " ".join(query.get("scope", []))
                if not user and server.anonymous_pull:
                    kind, _, rest = scope.partition(":")
                    name, _, actions = rest.rpartition(":")
                    scope = f"{kind}:{name}:pull" if "pull" in actions.split(",") else ""
                elif server.users.get(user) != password or not user:
                    self._answer(401, {"details": "bad credentials"})
                    return
                self._answer(200, {"token": server.token(user, scope), "expires_in": 300})

            def _answer(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                """Keep test output quiet."""

        return Handler


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _basic_credentials(header: str) -> tuple[str, str, str]:
    if not header.lower().startswith("basic "):
        return "", "", ""
    try:
        return base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return "", "", ""


def self_signed_certificate(directory: Path, name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed TLS certificate and key for ``name`` (an IP address), made with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    certificate, key = directory / "tls-cert.pem", directory / "tls-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=IP:{name}", "-keyout", str(key), "-out", str(certificate)],
        check=True, capture_output=True,
    )  # fmt: skip
    return certificate, key


def _registry_config(
    root: Path, port: int, htpasswd: Path | None, token: TokenServer | None = None, tls: bool = False
) -> str:
    listen = f"http:\n  addr: 127.0.0.1:{port}\n"
    if tls:
        certificate, key = self_signed_certificate(root)
        listen += f"  tls:\n    certificate: {certificate}\n    key: {key}\n"
    auth = ""
    if htpasswd is not None:
        auth = f"auth:\n  htpasswd:\n    realm: kwasm-test\n    path: {htpasswd}\n"
    if token is not None:
        auth = (
            f"auth:\n  token:\n    realm: {token.realm}\n    service: {TokenServer.SERVICE}\n"
            f"    issuer: {TokenServer.ISSUER}\n    rootcertbundle: {token.certificate}\n"
        )
    return (
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n" + listen + auth
    )


def _wait_http(host: str, process: subprocess.Popen[bytes], log: Path, tls: bool) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    hostname, port = host.rsplit(":", 1)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {process.returncode}: {_log_tail(log)}")
        with contextlib.suppress(OSError):
            conn = (
                http.client.HTTPSConnection(hostname, int(port), timeout=1, context=ssl._create_unverified_context())
                if tls
                else http.client.HTTPConnection(hostname, int(port), timeout=1)
            )
            conn.request("GET", "/v2/")
            status = conn.getresponse().status
            conn.close()
            if status in (200, 401):
                return
        time.sleep(0.05)
    stop_process(process)
    raise RuntimeError(f"docker-registry did not answer on {host}: {_log_tail(log)}")


@contextlib.contextmanager
def running_registry(
    root: Path,
    users: dict[str, str] | None = None,
    *,
    token_auth: bool = False,
    anonymous_pull: bool = False,
    tls: bool = False,
) -> Iterator[RunningRegistry]:
    """Run ``docker-registry`` on a free 127.0.0.1 port.

    ``users`` turns on htpasswd basic auth; with ``token_auth=True`` the same users log in through
    a bearer-token server instead (the Docker registry token protocol, RS256 JWTs), which with
    ``anonymous_pull=True`` also lets anyone pull. ``tls=True``
    serves HTTPS with a self-signed certificate for 127.0.0.1.
    """
    root.mkdir(parents=True, exist_ok=True)
    if token_auth:
        with (
            TokenServer(root / "token", dict(users or {}), anonymous_pull) as token,
            _registry_process(root, None, token, users, tls) as registry,
        ):
            yield registry
        return
    htpasswd: Path | None = None
    if users:
        htpasswd = root / "htpasswd"
        for number, (user, password) in enumerate(users.items()):
            flags = "-bBc" if number == 0 else "-bB"
            subprocess.run(["htpasswd", flags, str(htpasswd), user, password], check=True, capture_output=True)
    with _registry_process(root, htpasswd, None, users, tls) as registry:
        yield registry


@contextlib.contextmanager
def _registry_process(
    root: Path, htpasswd: Path | None, token: TokenServer | None, users: dict[str, str] | None, tls: bool
) -> Iterator[RunningRegistry]:
    port = free_port()
    config = root / "config.yml"
    config.write_text(_registry_config(root, port, htpasswd, token, tls))
    log = root / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=out, stderr=subprocess.STDOUT, cwd=root
        )
    registry = RunningRegistry(f"127.0.0.1:{port}", root, process, dict(users or {}), token)
    try:
        _wait_http(registry.host, process, log, tls)
        yield registry
    finally:
        stop_process(process)


@dataclass
class RunningDockerd:
    """A private Docker engine: its own data root, exec root and unix socket, no host networking."""

    socket_path: Path
    root: Path
    process: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        """The value for ``DOCKER_HOST`` / ``docker.DockerClient(base_url=...)``."""
        return f"unix://{self.socket_path}"


def _wait_socket(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dockerd exited with {process.returncode}: {_log_tail(log)}")
        if path.exists():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(str(path))
                sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                if sock.recv(64).split(b"\r\n", 1)[0].endswith(b" 200 OK"):
                    return
        time.sleep(0.1)
    stop_process(process)
    raise RuntimeError(f"dockerd did not answer on {path}: {_log_tail(log)}")


@contextlib.contextmanager
def running_dockerd(root: Path) -> Iterator[RunningDockerd]:
    """Run ``dockerd`` (vfs storage, no bridge, no iptables) with all state under ``root``.

    The socket lives in a short directory under /tmp because unix socket paths are limited
    to 107 bytes; it is removed afterwards.
    """
    root.mkdir(parents=True, exist_ok=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="kwd", dir="/tmp"))
    socket_path = sock_dir / "docker.sock"
    config = root / "daemon.json"
    config.write_text(json.dumps({}))
    log = root / "dockerd.log"
    command = [
        "dockerd",
        "--config-file", str(config),
        "--data-root", str(root / "data"),
        "--exec-root", str(sock_dir / "exec"),
        "--pidfile", str(root / "dockerd.pid"),
        "--host", f"unix://{socket_path}",
        "--bridge", "none",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-masq=false",
        "--storage-driver", "vfs",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    try:
        _wait_socket(socket_path, process, log)
        yield RunningDockerd(socket_path, root, process)
    finally:
        stop_process(process, timeout=20)
        shutil.rmtree(sock_dir, ignore_errors=True)
