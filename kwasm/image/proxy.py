"""HTTP proxies for registry traffic, taken from the environment as curl, requests and Docker take them,
and the TCP connection to a registry, direct or through its proxy (:func:`open_tcp`).

``HTTPS_PROXY`` (or ``https_proxy``) for HTTPS registries, ``HTTP_PROXY`` (``http_proxy``) for plain
HTTP ones, ``ALL_PROXY`` (``all_proxy``) for both; ``NO_PROXY`` (``no_proxy``) lists hosts, domains
(``example.com`` also covers its subdomains), ``host:port`` entries, CIDR ranges or ``*`` to reach
directly. Loopback registries are never proxied (Go's and so Docker's rule). The proxy itself is
spoken to in plain HTTP, with ``user:password@`` in its URL sent as ``Proxy-Authorization``:
HTTPS goes through a ``CONNECT`` tunnel, plain HTTP as absolute-form requests.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from kwasm.errors import RegistryUnreachableError

MAX_REPLY = 16 * 1024
CONNECT_TIMEOUT = 10.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``name[:port]``) is this machine: localhost, 127.0.0.0/8 or ::1."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Proxy:
    """Where the proxy listens, what to tell it, and how to name it in messages."""

    host: str
    port: int
    authorization: str | None
    label: str  # the proxy URL without its password, and the variable it came from

    def tunnel(self, sock: socket.socket, netloc: str) -> None:
        """Ask the proxy on ``sock`` for a tunnel to ``netloc`` (``CONNECT``); raise if it refuses."""
        head = f"CONNECT {netloc} HTTP/1.1\r\nHost: {netloc}\r\n"
        if self.authorization:
            head += f"Proxy-Authorization: {self.authorization}\r\n"
        sock.sendall(f"{head}\r\n".encode("latin-1"))
        reply = bytearray()
        while not reply.endswith(b"\r\n\r\n"):  # byte by byte: nothing after the reply may be consumed
            byte = sock.recv(1)
            if not byte or len(reply) > MAX_REPLY:
                raise RegistryUnreachableError(f"the proxy {self.label} closed the tunnel to {netloc}")
            reply += byte
        status = reply.split(b"\r\n", 1)[0].decode("latin-1")
        if status.split(" ")[1:2] != ["200"]:
            raise RegistryUnreachableError(f"the proxy {self.label} refused a tunnel to {netloc}: {status}")


def _setting(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    for key in (name.lower(), name.upper()):
        if environ.get(key):
            return key, environ[key]
    return None


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    host = host.lower().strip("[]")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if entry == "*":
            return True
        if entry.startswith("["):  # [v6] or [v6]:port
            entry_host, _, entry_port = entry[1:].partition("]")
            entry_port = entry_port.removeprefix(":")
        elif entry.count(":") == 1:  # host:port (a bare IPv6 address has more colons)
            entry_host, _, entry_port = entry.rpartition(":")
        else:
            entry_host, entry_port = entry, ""
        if not entry_host or (entry_port and entry_port != str(port)):
            continue
        entry_host = entry_host.lstrip("*").lstrip(".")
        if "/" in entry_host:
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry_host, strict=False):
                    return True
            except ValueError:
                pass
        elif host == entry_host or host.endswith("." + entry_host):
            return True
    return False


def proxy_for(scheme: str, netloc: str, environ: Mapping[str, str] = os.environ) -> Proxy | None:
    """The proxy to reach ``scheme://netloc`` through, or None to connect directly."""
    parts = urllib.parse.urlsplit(f"//{netloc}")
    host = parts.hostname or netloc
    if is_loopback(host):
        return None
    setting = _setting(environ, f"{scheme}_proxy") or _setting(environ, "all_proxy")
    if setting is None:
        return None
    variable, value = setting
    no_proxy = _setting(environ, "no_proxy")
    if no_proxy and _bypassed(host, parts.port or (443 if scheme == "https" else 80), no_proxy[1]):
        return None
    url = urllib.parse.urlsplit(value if "://" in value else f"http://{value}")
    try:
        port = url.port or 80
    except ValueError:
        port = 0
    if url.scheme != "http" or not url.hostname or not port:
        raise RegistryUnreachableError(f"${variable} must be an http://host:port proxy URL, not {value!r}")
    authorization = None
    if url.username is not None:
        pair = f"{urllib.parse.unquote(url.username)}:{urllib.parse.unquote(url.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy(url.hostname, port, authorization, f"http://{url.hostname}:{port} (${variable})")


def _connect(host: str, port: int) -> socket.socket:
    """A TCP connection to the first address of ``host`` that accepts (``socket.create_connection``'s rule).

    An ASCII host goes to getaddrinfo as bytes: a str would make it import the idna codec (~2 ms).
    """
    error: OSError | None = None
    name: str | bytes = host.encode() if host.isascii() else host
    for family, kind, proto, _, address in socket.getaddrinfo(name, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"no address for {host}")


def open_tcp(host: str, port: int, proxy: Proxy | None, netloc: str, *, tunnel: bool) -> socket.socket:
    """A TCP connection to ``host:port`` (registry ``netloc``), direct or to ``proxy``, tunnelled if ``tunnel``."""
    try:
        sock = _connect(proxy.host, proxy.port) if proxy else _connect(host, port)
    except OSError as exc:
        if proxy is None:
            raise
        raise RegistryUnreachableError(f"cannot reach the proxy {proxy.label} for registry {netloc}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if proxy is not None and tunnel:
            proxy.tunnel(sock, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")  # IPv6 in brackets
    except BaseException:
        sock.close()
        raise
    return sock
