"""A small HTTP/1.1 client on the standard library's ``socket`` (and ``ssl``) for registry traffic.

Every ``kwasm push``/``pull`` is a new process, measured against Go tools that start in ~10 ms, so
import time counts: oras-py on ``requests`` cost ~0.2 s to import, and even ``http.client`` costs
12-20 ms here (it imports the ``email`` package to parse headers, and ``ssl``). This module speaks
just the HTTP/1.1 a registry needs and imports ``ssl`` only for HTTPS:

* one keep-alive connection per host, reused for every request (a connection the server closed
  while idle is reopened once, for idempotent requests whose body can be sent again);
* request bodies as bytes, or sent from a file with ``sendfile(2)`` in 1 MiB blocks (progress per block);
* response bodies framed by ``Content-Length``, ``chunked`` transfer coding or connection close,
  read whole or streamed; a response not read to its end closes its connection;
* redirects followed for GET and HEAD (``Authorization`` is dropped when the scheme, host or port
  changes; a redirect from HTTPS to plain HTTP is refused);
* the answer parsed strictly (digits-only ``Content-Length`` and chunk sizes, bounded lines, header
  counts, 1xx answers and trailers), and no header with a line break or NUL is ever sent;
* HTTP proxies from the environment (:mod:`kwasm.image.proxy`);
* a connect timeout and a read timeout; TLS verified against the system CA store unless
  ``verify=False``; every transport failure becomes one :class:`~kwasm.errors.RegistryError` line.
"""

from __future__ import annotations

import socket
import sys
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from kwasm.errors import RegistryError, RegistryUnreachableError
from kwasm.image.proxy import CONNECT_TIMEOUT, Proxy, open_tcp, proxy_for

if TYPE_CHECKING:
    import ssl

READ_TIMEOUT = 120.0
BLOCK_BYTES = 1024 * 1024
MAX_REDIRECTS = 5
MAX_LINE = 64 * 1024
MAX_HEADERS = 200
MAX_INTERIM = 10  # 1xx answers before the final one
_DRAIN_BYTES = 64 * 1024
_REDIRECTS = {301, 302, 303, 307, 308}
_RETRIED = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}  # idempotent: safe to send again on a fresh connection
_HEX = b"0123456789abcdefABCDEF"


class _Stale(ConnectionError):
    """The server closed a kept-alive connection before answering."""


class _Malformed(Exception):
    """The server's answer is not HTTP/1.x."""


@dataclass
class FileBody:
    """A request body sent straight from an open file with ``sendfile(2)`` (no copy through Python)."""

    handle: BinaryIO
    size: int
    advance: Callable[[int], None] = field(default=lambda count: None)

    def send(self, sock: socket.socket) -> None:
        """Send all ``size`` bytes from the start of the file, reporting progress per block."""
        offset = 0
        while offset < self.size:
            sent = sock.sendfile(self.handle, offset, min(BLOCK_BYTES, self.size - offset))
            if sent == 0:
                raise RegistryError(f"{self.handle.name} ended after {offset} of its {self.size} bytes")
            offset += sent
            self.advance(sent)


Body = bytes | FileBody | None


class _Connection:
    """One TCP (or TLS) connection to ``netloc``, maybe through a proxy, with a buffered reader for responses."""

    def __init__(self, netloc: str, context: ssl.SSLContext | None, proxy: Proxy | None) -> None:
        parts = urllib.parse.urlsplit(f"//{netloc}")
        host = parts.hostname or netloc
        port = parts.port or (443 if context is not None else 80)
        sock = open_tcp(host, port, proxy, netloc, tunnel=context is not None)
        try:
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=host)
            sock.settimeout(READ_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.served = 0
        # plain HTTP through a proxy: absolute-form request targets, and the proxy's credentials on each request
        self.forward = proxy if proxy is not None and context is None else None

    def close(self) -> None:
        """Close the reader and the socket."""
        self.reader.close()
        self.sock.close()

    def dropped(self) -> bool:
        """Whether the server closed this idle connection: it is readable (EOF, or bytes nobody asked for)."""
        import select  # already loaded by ``socket`` (through ``selectors``): free here

        return bool(select.select([self.sock], [], [], 0)[0])

    def readline(self, what: str = "header line") -> bytes:
        """One line of the status line, headers or chunk framing, at most :data:`MAX_LINE` bytes."""
        line = self.reader.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise _Malformed(f"{what} longer than 64 KiB")
        return line


class Response:
    """Status, headers and the (unread) body of one HTTP response."""

    def __init__(self, session: Session, key: tuple[str, str], conn: _Connection, method: str, url: str) -> None:
        self._session = session
        self._key = key
        self._conn: _Connection | None = conn
        self.url = url  # the URL that answered: after redirects, the last one
        self.status, self.reason, self.headers, keep_alive = _read_head(conn)
        codings = [token.strip().lower() for value in self.headers.get("transfer-encoding", [])
                   for token in value.split(",")]  # fmt: skip
        lengths = {token.strip() for value in self.headers.get("content-length", []) for token in value.split(",")}
        self._keep_alive = keep_alive and not (codings and lengths)  # both framings: trust neither afterwards
        self._chunked = codings[-1:] == ["chunked"]  # any other last coding: the body ends with the connection
        self._remaining: int | None = None  # bytes left of a Content-Length body; None: chunked or until close
        if method == "HEAD" or self.status in (204, 304):
            self._remaining = 0
        elif not codings and lengths:
            length = lengths.pop() if len(lengths) == 1 else ""
            if not (length.isascii() and length.isdigit()):
                raise _Malformed(f"Content-Length {', '.join(self.headers['content-length'])!r}")
            self._remaining = int(length)
        if self._remaining is None and not self._chunked:
            self._keep_alive = False  # the body ends when the server closes the connection
        self._chunk_left = 0
        self._done = self._remaining == 0

    def header(self, name: str) -> str:
        """The first value of header ``name`` (case-insensitive), or ``""``."""
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    def chunks(self, size: int = BLOCK_BYTES) -> Iterator[bytes]:
        """The body in chunks of at most ``size`` bytes; a broken-off transfer raises RegistryUnreachableError."""
        try:
            while chunk := self._read_some(size):
                yield chunk
        except (OSError, _Malformed) as exc:
            self.close()
            raise RegistryUnreachableError(f"transfer from {self._key[1]} broke off: {exc}") from exc
        self.close()

    def _read_some(self, size: int) -> bytes:
        if self._done or self._conn is None:
            return b""
        reader = self._conn.reader
        if self._chunked:
            if self._chunk_left == 0:
                line = self._conn.readline("chunk size line")
                digits = line.split(b";", 1)[0].strip()
                if not digits or len(digits) > 16 or digits.strip(_HEX):
                    raise _Malformed(f"chunk size line {line[:40]!r}")
                self._chunk_left = int(digits, 16)
                if self._chunk_left == 0:
                    for _ in range(MAX_HEADERS + 1):
                        if self._conn.readline() in (b"\r\n", b"\n", b""):
                            break  # the end of the trailers
                    else:
                        raise _Malformed(f"more than {MAX_HEADERS} trailer lines")
                    self._done = True
                    return b""
            data = reader.read(min(size, self._chunk_left))
            if not data:
                raise _Malformed("connection closed inside a chunk")
            self._chunk_left -= len(data)
            if self._chunk_left == 0 and self._conn.readline("chunk end") != b"\r\n":
                raise _Malformed("chunk data not followed by CRLF")
            return data
        if self._remaining is None:
            data = reader.read1(size)
            self._done = not data
            return data
        data = reader.read(min(size, self._remaining))
        if len(data) < min(size, self._remaining):
            raise _Malformed(f"connection closed {self._remaining - len(data)} bytes before the end of the body")
        self._remaining -= len(data)
        self._done = self._remaining == 0
        return data

    def read(self, limit: int = 64 * 1024) -> bytes:
        """The body, at most ``limit`` bytes of it (the rest is dropped with the connection)."""
        received = bytearray()
        for chunk in self.chunks(min(limit, BLOCK_BYTES)):
            received += chunk
            if len(received) >= limit:
                break
        self.close()
        return bytes(received[:limit])

    def close(self) -> None:
        """Give the connection back if the body was read to its end, else close it."""
        if self._conn is None:
            return
        short = self._chunked or (self._remaining is not None and self._remaining <= _DRAIN_BYTES)
        if not self._done and short:
            drained = 0  # a short unread rest (an error document, the last chunk): read it to keep the connection
            try:
                while drained <= _DRAIN_BYTES and (data := self._read_some(_DRAIN_BYTES)):
                    drained += len(data)
            except (OSError, _Malformed):
                self._keep_alive = False
        conn, self._conn = self._conn, None
        if self._done and self._keep_alive:
            self._session.release(self._key, conn)
        else:
            conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_head(conn: _Connection) -> tuple[int, str, dict[str, list[str]], bool]:
    """Status, reason, headers (lower-case names) and keep-alive of the next final response on ``conn``."""
    for _ in range(MAX_INTERIM + 1):
        line = conn.readline()
        if not line:
            raise _Stale("the server closed the connection without answering")
        version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not (code.isascii() and code.isdigit()) or len(code) != 3:
            raise _Malformed(f"status line {line[:60]!r}")
        headers: dict[str, list[str]] = {}
        for _ in range(MAX_HEADERS + 1):
            field_line = conn.readline()
            if field_line in (b"\r\n", b"\n", b""):
                break
            name, sep, value = field_line.decode("latin-1").partition(":")
            if not sep:
                raise _Malformed(f"header line {field_line[:60]!r}")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        else:
            raise _Malformed(f"more than {MAX_HEADERS} headers")
        if not 100 <= int(code) < 200:
            break  # 1xx answers (100 Continue) precede the real one
    else:
        raise _Malformed(f"more than {MAX_INTERIM} interim (1xx) answers")
    tokens = {token.strip().lower() for value in headers.get("connection", []) for token in value.split(",")}
    keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
    return int(code), reason, headers, keep_alive


class Session:
    """Keep-alive HTTP(S) connections, one idle connection per scheme and host."""

    def __init__(self, *, verify: bool = True, user_agent: str = "kwasm") -> None:
        self._verify = verify
        self._user_agent = user_agent
        self._context: ssl.SSLContext | None = None
        self._idle: dict[tuple[str, str], _Connection] = {}

    def _tls_context(self) -> ssl.SSLContext:
        import ssl

        if self._context is None:
            if self._verify:
                self._context = ssl.create_default_context()
            else:
                self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
        return self._context

    def _connection(self, key: tuple[str, str]) -> _Connection:
        """An idle connection for ``key``, else a new one."""
        conn = self._idle.pop(key, None)
        if conn is not None:
            if not conn.dropped():
                return conn
            conn.close()  # closed while idle: noticed before sending, so even a POST can go on a fresh one
        scheme, netloc = key
        return _Connection(netloc, self._tls_context() if scheme == "https" else None, proxy_for(scheme, netloc))

    def release(self, key: tuple[str, str], conn: _Connection) -> None:
        """Keep ``conn`` for the next request to the same host."""
        previous = self._idle.pop(key, None)
        if previous is not None:
            previous.close()
        self._idle[key] = conn

    def close(self) -> None:
        """Close every idle connection."""
        for conn in self._idle.values():
            conn.close()
        self._idle.clear()

    def request(self, method: str, url: str, headers: Mapping[str, str] | None = None, body: Body = None) -> Response:
        """Send one request (following GET/HEAD redirects) and return the response with its body unread."""
        headers = dict(headers or {})
        for _ in range(MAX_REDIRECTS + 1):
            response = self._send(method, url, headers, body)
            location = response.header("Location")
            if not (method in ("GET", "HEAD") and response.status in _REDIRECTS and location):
                return response
            response.close()
            target = urllib.parse.urljoin(url, location)
            here, there = urllib.parse.urlsplit(url), urllib.parse.urlsplit(target)
            if there.scheme not in (("https",) if here.scheme == "https" else ("http", "https")):
                raise RegistryError(f"registry {here.netloc} redirected to {there.scheme}://{there.netloc}: "
                                    f"refused (a redirect may not leave HTTPS)")  # fmt: skip
            if _origin(here) != _origin(there):  # credentials go to the origin they were meant for only
                headers = {name: value for name, value in headers.items() if name.lower() != "authorization"}
            url = target
        raise RegistryError(f"too many redirects from {urllib.parse.urlsplit(url).netloc}")

    def _send(self, method: str, url: str, headers: dict[str, str], body: Body) -> Response:
        parts = urllib.parse.urlsplit(url)
        key = (parts.scheme, parts.netloc)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        length = len(body) if isinstance(body, bytes) else body.size if isinstance(body, FileBody) else 0
        fields = {"Host": parts.netloc, "User-Agent": self._user_agent, **headers}
        if body is not None or method in ("POST", "PUT", "PATCH"):
            fields["Content-Length"] = str(length)
        _check_fields(parts.netloc, target, fields)
        request = (method, target, url, fields)
        waited = CONNECT_TIMEOUT
        try:
            conn = self._connection(key)
            waited = READ_TIMEOUT
            try:
                return self._exchange(conn, key, request, body)
            except (_Stale, ConnectionResetError, BrokenPipeError):
                if not conn.served or isinstance(body, FileBody) or method not in _RETRIED:
                    raise
            waited = CONNECT_TIMEOUT  # the server closed the idle connection: one fresh try
            conn = self._connection(key)
            waited = READ_TIMEOUT
            return self._exchange(conn, key, request, body)
        except _Malformed as exc:
            raise RegistryError(f"request to registry {parts.netloc} failed: malformed answer ({exc})") from exc
        except TimeoutError as exc:
            raise RegistryUnreachableError(f"registry {parts.netloc} did not answer within {waited:.0f} s") from exc
        except ConnectionRefusedError as exc:
            raise RegistryUnreachableError(f"cannot reach registry {parts.netloc}: connection refused") from exc
        except OSError as exc:
            ssl_module = sys.modules.get("ssl")
            if ssl_module is not None and isinstance(exc, ssl_module.SSLError):
                hint = "use --plain-http for an HTTP registry" if "WRONG_VERSION" in str(exc) else (
                    "use --insecure for a self-signed certificate"
                )  # fmt: skip
                raise RegistryUnreachableError(f"TLS handshake with registry {parts.netloc} failed ({hint})") from exc
            raise RegistryUnreachableError(f"cannot reach registry {parts.netloc}: cannot connect") from exc

    def _exchange(self, conn: _Connection, key: tuple[str, str], request: tuple[str, str, str, dict[str, str]],
                  body: Body) -> Response:  # fmt: skip
        """Write one request on ``conn`` and read the head of its response (closing ``conn`` on failure)."""
        method, target, url, fields = request
        if conn.forward is not None:
            target = url  # absolute form, for the proxy
            if conn.forward.authorization:
                fields = {**fields, "Proxy-Authorization": conn.forward.authorization}
        lines = [f"{method} {target} HTTP/1.1\r\n", *(f"{k}: {v}\r\n" for k, v in fields.items()), "\r\n"]
        head = "".join(lines).encode("latin-1")
        try:
            early = False
            if isinstance(body, FileBody):
                conn.sock.sendall(head)
                try:
                    body.send(conn.sock)
                except (BrokenPipeError, ConnectionResetError):
                    early = True  # the server answered (401, 413, ...) and closed before taking the whole body
            else:
                conn.sock.sendall(head + (body or b""))
            response = Response(self, key, conn, method, url)
            response._keep_alive = response._keep_alive and not early
        except BaseException:
            conn.close()
            raise
        conn.served += 1
        return response


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, str]:
    """Scheme and lower-case ``host[:port]`` of a URL, without its scheme's default port."""
    return parts.scheme, parts.netloc.lower().removesuffix(":443" if parts.scheme == "https" else ":80")


def _check_fields(netloc: str, target: str, fields: Mapping[str, str]) -> None:
    """Refuse a request whose target or headers would break out of their line (CR, LF, NUL)."""
    if any(char in target for char in " \r\n\0"):
        raise RegistryError(f"request to registry {netloc} not sent: path {target[:60]!r} has a space or line break")
    for name, value in fields.items():
        if not name or any(char in name for char in ": \t\r\n\0"):
            raise RegistryError(f"request to registry {netloc} not sent: {name!r} is not a header name")
        if any(char in value for char in "\r\n\0"):
            raise RegistryError(f"request to registry {netloc} not sent: header {name!r} has a line break or NUL")
