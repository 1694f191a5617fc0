"""The registry HTTP client against hostile or broken loopback servers speaking raw HTTP/1.1.

Each server here is a script over a real socket on 127.0.0.1 (TLS where the case needs HTTPS), so
the tests can send what a well-behaved server never does: credentials-stealing redirects and
realms, negative or conflicting lengths, bad chunk framing, endless interim answers, and a
connection dropped after a POST. The client must refuse each with one error line, never leak
credentials, never resend a non-idempotent request, and never send a header that could be split.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from services import self_signed_certificate

from kwasm.errors import RegistryAuthError, RegistryError, RegistryUnreachableError
from kwasm.image.auth import Credentials
from kwasm.image.httpclient import FileBody, Session
from kwasm.image.registry_client import RegistryClient

BLOB = "sha256:" + "0" * 64
OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@dataclass
class Request:
    """One request a test server read: its request line, headers (lower-case names) and body."""

    line: str
    headers: dict[str, str]
    body: bytes


class _Raw(socketserver.ThreadingTCPServer):
    daemon_threads = True
    script: Callable[[_Peer], None]
    tls: ssl.SSLContext | None
    requests: list[Request]
    connections: int

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up on a hostile answer is expected here: no traceback."""


class _Peer(socketserver.StreamRequestHandler):
    server: _Raw

    def setup(self) -> None:
        if self.server.tls is not None:
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        super().setup()
        self.server.connections += 1

    def handle(self) -> None:
        self.server.script(self)

    def next_request(self, *, read_body: bool = True) -> Request | None:
        """The next request on this connection, or None when the client closed it."""
        line = self.rfile.readline()
        if not line:
            return None
        headers: dict[str, str] = {}
        while (field := self.rfile.readline()) not in (b"\r\n", b""):
            name, _, value = field.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        request = Request(line.decode("latin-1").strip(), headers, self.rfile.read(length) if read_body else b"")
        self.server.requests.append(request)
        return request

    def send(self, data: bytes) -> None:
        """Write raw bytes to the client."""
        self.wfile.write(data)


@contextmanager
def serving(script: Callable[[_Peer], None], tls: ssl.SSLContext | None = None) -> Iterator[_Raw]:
    """A loopback server running ``script`` for each connection."""
    server = _Raw(("127.0.0.1", 0), _Peer)
    server.script, server.tls, server.requests, server.connections = script, tls, [], 0
    with server:
        thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        thread.start()
        try:
            yield server
        finally:
            server.shutdown()
            thread.join(5)


def url(server: _Raw, path: str = "/v2/", scheme: str = "http") -> str:
    """``scheme://127.0.0.1:PORT/path`` of ``server``."""
    return f"{scheme}://127.0.0.1:{server.server_address[1]}{path}"


def answer_each(response: Callable[[Request], bytes]) -> Callable[[_Peer], None]:
    """A script answering every request on a connection with ``response(request)``."""

    def script(peer: _Peer) -> None:
        while (request := peer.next_request()) is not None:
            peer.send(response(request))

    return script


def answer_once(data: bytes) -> Callable[[_Peer], None]:
    """A script that reads one request, sends ``data`` and closes the connection."""

    def script(peer: _Peer) -> None:
        if peer.next_request() is not None:
            peer.send(data)

    return script


@pytest.fixture(scope="module")
def tls() -> ssl.SSLContext:
    """A server-side TLS context with a self-signed certificate for 127.0.0.1."""
    with tempfile.TemporaryDirectory() as directory:
        certificate, key = self_signed_certificate(Path(directory))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
    return context


def redirect_to(target: str) -> bytes:
    """A keep-alive 307 answer pointing at ``target``."""
    return f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n".encode()


def bearer_401(realm: str) -> bytes:
    """A 401 answer asking for a bearer token from ``realm``."""
    return (f'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm="{realm}",service="reg"\r\n'
            "Content-Length: 0\r\n\r\n").encode()  # fmt: skip


TOKEN_ANSWER = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"token":"tok"}'


# ------------------------------------------------------------------ credentials


def test_a_challenge_from_a_redirect_target_is_not_answered_with_the_registry_credentials() -> None:
    with (
        serving(answer_each(lambda _: TOKEN_ANSWER)) as token,
        serving(answer_each(lambda _: bearer_401(url(token, "/token")))) as storage,
        serving(answer_each(lambda _: redirect_to(url(storage, "/blob")))) as registry,
    ):
        client = RegistryClient(f"127.0.0.1:{registry.server_address[1]}", "r", credentials=Credentials("alice", "pw"))
        with pytest.raises(RegistryAuthError, match=r"\(not registry 127\.0\.0\.1:\d+ itself\) answered 401"):
            list(client.stream_blob(BLOB, 10))
        client.close()

    assert token.requests == [], "the redirect target's token service was asked (with the registry credentials)"
    assert [request.headers.get("authorization") for request in storage.requests] == [None]


def test_an_https_registry_naming_a_plain_http_token_service_is_refused(tls: ssl.SSLContext) -> None:
    with (
        serving(answer_each(lambda _: TOKEN_ANSWER)) as token,
        serving(answer_each(lambda _: bearer_401(url(token, "/token"))), tls) as registry,
    ):
        client = RegistryClient(f"127.0.0.1:{registry.server_address[1]}", "r",
                                credentials=Credentials("alice", "pw"), insecure=True)  # fmt: skip
        with pytest.raises(RegistryAuthError, match=r"names a token service that is not HTTPS: http://127\.0\.0\.1"):
            client.connect()
        client.close()

    assert token.requests == []


def test_a_redirect_from_https_to_plain_http_is_refused(tls: ssl.SSLContext) -> None:
    with (
        serving(answer_each(lambda _: OK_EMPTY)) as plain,
        serving(answer_each(lambda _: redirect_to(url(plain, "/blob"))), tls) as registry,
        pytest.raises(RegistryError, match="may not leave HTTPS"),
    ):
        Session(verify=False).request("GET", url(registry, "/v2/r/blobs/x", "https"), {"Authorization": "Bearer s"})

    assert plain.requests == []


@pytest.mark.parametrize("name", ["Authorization", "authorization", "AUTHORIZATION"])
def test_credentials_do_not_follow_a_redirect_to_another_host_whatever_their_case(name: str) -> None:
    with (
        serving(answer_each(lambda _: OK_EMPTY)) as storage,
        serving(answer_each(lambda _: redirect_to(url(storage, "/blob")))) as registry,
    ):
        Session().request("GET", url(registry, "/v2/r/blobs/x"), {name: "Bearer secret"}).close()

    assert registry.requests[0].headers["authorization"] == "Bearer secret"
    assert [request.line for request in storage.requests] == ["GET /blob HTTP/1.1"]
    assert "authorization" not in storage.requests[0].headers


BAD_VALUE, BAD_NAME = "has a line break or NUL", "is not a header name"


@pytest.mark.parametrize(
    ("name", "value", "refusal"),
    [("Authorization", "Bearer t\r\nX-Injected: 1", BAD_VALUE), ("Authorization", "Bearer t\nX: 1", BAD_VALUE),
     ("X-Token", "a\0b", BAD_VALUE), ("X-Bad: 1\r\nX-Injected", "1", BAD_NAME), ("X Bad", "1", BAD_NAME)],
)  # fmt: skip
def test_a_header_that_would_split_the_request_is_never_sent(name: str, value: str, refusal: str) -> None:
    with serving(answer_each(lambda _: OK_EMPTY)) as server, pytest.raises(RegistryError, match=refusal):
        Session().request("GET", url(server), {name: value})

    assert server.requests == []


def test_a_path_with_a_space_is_never_sent() -> None:
    with (
        serving(answer_each(lambda _: OK_EMPTY)) as server,
        pytest.raises(RegistryError, match=r"path '/v2/a b HTTP/1\.1' has a space"),
    ):
        Session().request("GET", url(server, "/v2/a b HTTP/1.1"))

    assert server.requests == []


def test_a_token_with_a_line_break_from_the_token_service_is_never_sent() -> None:
    evil = b'{"token":"t\\r\\nX-Injected: 1"}'
    token_answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(evil), evil)
    with (
        serving(answer_each(lambda _: token_answer)) as token,
        serving(answer_each(lambda _: bearer_401(url(token, "/token")))) as registry,
    ):
        client = RegistryClient(f"127.0.0.1:{registry.server_address[1]}", "r")
        with pytest.raises(RegistryError, match="header 'Authorization' has a line break"):
            list(client.stream_blob(BLOB, 10))
        client.close()

    assert len(registry.requests) == 1 and all("x-injected" not in r.headers for r in registry.requests)


# ---------------------------------------------------------------------- framing


def get(server: _Raw, limit: int = 1 << 20) -> bytes:
    """The body of a GET to ``server`` (read up to ``limit`` bytes)."""
    return Session().request("GET", url(server)).read(limit)


@pytest.mark.parametrize("length", ["-1", "+3", "1_0", "0x3", "3, 4"])
def test_a_content_length_that_is_not_one_decimal_number_is_malformed(length: str) -> None:
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n".encode()
    with (
        serving(answer_once(head + b"A" * (1 << 20))) as server,
        pytest.raises(RegistryError, match="malformed answer \\(Content-Length"),
    ):
        get(server, 100)


def test_conflicting_content_lengths_are_malformed_and_equal_ones_are_read() -> None:
    with (
        serving(answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde")) as server,
        pytest.raises(RegistryError, match="malformed answer"),
    ):
        get(server)
    with serving(answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3, 3\r\n\r\nabc")) as server:
        assert get(server) == b"abc"


@pytest.mark.parametrize(
    "chunks",
    [b"-1\r\n" + b"C" * 100_000, b"+2\r\nab\r\n0\r\n\r\n", b"0x2\r\nab\r\n0\r\n\r\n", b"1_0\r\n" + b"x" * 16,
     b"1\r\nAXY\r\n0\r\n\r\n", b"1\r\nA" + b"B" * 200_000 + b"\r\n0\r\n\r\n"],
    ids=["negative", "plus", "0x", "underscore", "data-longer-than-size", "200k-line-after-data"],
)  # fmt: skip
def test_bad_chunk_framing_breaks_the_transfer_off(chunks: bytes) -> None:
    with (
        serving(answer_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)) as server,
        pytest.raises(RegistryUnreachableError, match="broke off: chunk"),
    ):
        get(server)


def test_a_status_code_that_is_not_three_ascii_digits_is_malformed() -> None:
    with (
        serving(answer_once("HTTP/1.1 2\u00b20 OK\r\nContent-Length: 0\r\n\r\n".encode("latin-1"))) as server,
        pytest.raises(RegistryError, match="malformed answer \\(status line"),
    ):
        get(server)


def test_endless_interim_answers_and_trailers_are_malformed() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" * 1000 + OK_EMPTY
    with serving(answer_once(interim)) as server, pytest.raises(RegistryError, match="interim"):
        get(server)
    trailers = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nA\r\n0\r\n" + b"X: y\r\n" * 1000 + b"\r\n"
    with serving(answer_once(trailers)) as server, pytest.raises(RegistryUnreachableError, match="trailer lines"):
        get(server)
    few = (
        b"HTTP/1.1 100 Continue\r\n\r\n" * 2
        + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nA\r\n0\r\nX: y\r\n\r\n"
    )
    with serving(answer_once(few)) as server:
        assert get(server) == b"A"


def test_chunked_is_recognised_only_as_the_last_transfer_coding() -> None:
    with serving(answer_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, x-custom\r\n\r\nraw body")) as server:
        assert get(server) == b"raw body"  # not chunked: the body ends with the connection
    last = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: x-custom, CHUNKED\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    with serving(answer_once(last)) as server:
        assert get(server) == b"ok"


def test_an_answer_with_both_length_and_chunked_framing_closes_its_connection() -> None:
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    with serving(answer_each(lambda _: both)) as server:
        session = Session()
        assert [session.request("GET", url(server)).read() for _ in range(2)] == [b"ok", b"ok"]
        session.close()

    assert server.connections == 2


# ----------------------------------------------------------------------- retries


def _drop_the_second_request(peer: _Peer) -> None:
    """Answer the first request on the first connection, then read the second and hang up unanswered."""
    first = peer.server.connections == 1
    while peer.next_request() is not None:
        if first and len(peer.server.requests) == 2:
            return  # read but never answered: the server dropped the kept-alive connection just then
        peer.send(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize(("method", "sent"), [("POST", 1), ("PATCH", 1), ("PUT", 2), ("DELETE", 2)])
def test_only_idempotent_requests_are_sent_again_after_a_dropped_connection(method: str, sent: int) -> None:
    with serving(_drop_the_second_request) as server:
        session = Session()
        session.request("GET", url(server)).close()
        if sent == 1:
            with pytest.raises(RegistryUnreachableError, match="cannot connect"):
                session.request(method, url(server, "/v2/r/blobs/uploads/"), body=b"data")
        else:
            assert session.request(method, url(server, "/v2/r/x"), body=b"data").status == 202
        session.close()

    assert [request.line.split()[0] for request in server.requests] == ["GET"] + [method] * sent
    assert [request.body for request in server.requests[1:]] == [b"data"] * sent


def test_a_post_after_the_server_closed_the_idle_connection_goes_on_a_fresh_one() -> None:
    closed = threading.Event()

    def answer_then_hang_up(peer: _Peer) -> None:
        if peer.next_request() is not None:
            peer.send(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
        peer.connection.shutdown(socket.SHUT_RDWR)  # as an idle timeout does, without "Connection: close"
        closed.set()

    with serving(answer_then_hang_up) as server:
        session = Session()
        session.request("GET", url(server)).close()
        assert closed.wait(10)
        assert session.request("POST", url(server, "/v2/r/blobs/uploads/"), body=b"").status == 202
        session.close()

    assert [request.line.split()[0] for request in server.requests] == ["GET", "POST"]
    assert server.connections == 2


def test_an_upload_refused_before_its_body_arrived_reports_the_answer(tmp_path: Path) -> None:
    def refuse(peer: _Peer) -> None:
        if peer.next_request(read_body=False) is not None:
            peer.send(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            peer.connection.shutdown(socket.SHUT_WR)
            peer.connection.recv(1 << 16)  # then hang up with the rest of the body unread

    blob = tmp_path / "blob"
    blob.write_bytes(b"\0" * (32 << 20))
    with serving(refuse) as server, blob.open("rb") as handle:
        response = Session().request("PUT", url(server, "/v2/r/blobs/uploads/1"), body=FileBody(handle, 32 << 20))
        response.close()

    assert response.status == 413


# ------------------------------------------------------------------------- proxy


def test_an_ipv6_registry_is_tunnelled_with_a_bracketed_authority(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse_tunnel(peer: _Peer) -> None:
        if peer.next_request() is not None:
            peer.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    with serving(refuse_tunnel) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        with pytest.raises(RegistryUnreachableError, match="refused a tunnel to \\[2001:db8::1\\]:5000"):
            Session().request("GET", "https://[2001:db8::1]:5000/v2/")

    assert [request.line for request in proxy.requests] == ["CONNECT [2001:db8::1]:5000 HTTP/1.1"]
    assert proxy.requests[0].headers["host"] == "[2001:db8::1]:5000"
