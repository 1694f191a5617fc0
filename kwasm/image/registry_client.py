"""Talking to one OCI registry: oras-py's ``Registry`` with kwasm's transport rules.

oras-py provides the client (its ``requests`` session, TLS settings) and the basic and bearer-token
auth backends (token service negotiation from ``Www-Authenticate``). kwasm adds what a CLI needs:

* plain HTTP automatically for loopback registries, ``insecure`` to skip TLS verification;
* the auth scheme picked from the registry's challenge (``Basic`` → basic, ``Bearer`` → token),
  with credentials from the Docker config (oras-py would read only ``~/.docker/config.json``);
* no silent retries with growing sleeps (oras-py retries any exception five times, 3 s to 84 s
  apart, which turns "registry unreachable" into minutes of silence) and timeouts on every request;
* every failure becomes one :class:`~kwasm.errors.RegistryError` line.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import oras.auth
import oras.provider
import oras.utils
import requests

from kwasm.errors import (
    DigestMismatchError,
    ImageNotFoundError,
    RegistryAuthError,
    RegistryError,
    RegistryUnreachableError,
)
from kwasm.image.auth import Credentials

MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
TIMEOUT = (10.0, 120.0)  # connect, read (seconds)
_API_HOSTS = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}

# oras-py logs auth hiccups through stdlib logging, which would print them next to kwasm's own one-line
# errors; kwasm reports every failure itself.
logging.getLogger("oras.logger").addHandler(logging.NullHandler())


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


class _OrasRegistry(oras.provider.Registry):  # type: ignore[misc]
    """oras-py's client with timeouts, preemptive auth and no retry loop."""

    def do_request(
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
        stream: bool = False,
    ) -> requests.Response:
        """Send one request; answer one authentication challenge; map transport failures."""
        headers = dict(headers or {})
        headers.update(self._auth_header())
        response = self._send(method, url, data, headers, json, stream)
        challenge = response.headers.get("Www-Authenticate", "")
        if response.status_code != 401 or not challenge.lower().startswith("bearer"):
            return response  # basic credentials, if any, were sent already
        if not isinstance(self.auth, oras.auth.TokenAuth):
            return response
        self.auth.token = None  # a token for another scope: fetch one for this challenge
        try:
            retry_headers, changed = self.auth.authenticate_request(response, dict(headers))
        except requests.exceptions.RequestException as exc:
            raise RegistryAuthError(f"cannot get a token from the auth server of {url}: {exc}") from exc
        if not changed:
            return response
        if hasattr(data, "seek"):
            data.seek(0)
        return self._send(method, url, data, retry_headers, json, stream)

    def _auth_header(self) -> dict[str, str]:
        if isinstance(self.auth, oras.auth.BasicAuth) and getattr(self.auth, "_basic_auth", None):
            return dict(self.auth.get_auth_header())
        if isinstance(self.auth, oras.auth.TokenAuth) and self.auth.token:
            return dict(self.auth.get_auth_header())
        return {}

    def _send(
        self, method: str, url: str, data: Any, headers: dict[str, str], body: Any, stream: bool
    ) -> requests.Response:
        host = url.split("://", 1)[-1].split("/", 1)[0]
        try:
            response: requests.Response = self.session.request(
                method, url, data=data, json=body, headers=headers, stream=stream,
                verify=self._tls_verify, timeout=TIMEOUT,
            )  # fmt: skip
            return response
        except requests.exceptions.SSLError as exc:
            hint = (
                "use --plain-http for an HTTP registry"
                if "WRONG_VERSION" in str(exc)
                else ("use --insecure for a self-signed certificate")
            )
            raise RegistryUnreachableError(f"TLS handshake with registry {host} failed ({hint})") from exc
        except requests.exceptions.Timeout as exc:
            raise RegistryUnreachableError(f"registry {host} did not answer within {TIMEOUT[0]:.0f} s") from exc
        except requests.exceptions.ConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else "cannot connect"
            raise RegistryUnreachableError(f"cannot reach registry {host}: {reason}") from exc
        except requests.exceptions.RequestException as exc:
            raise RegistryError(f"request to registry {host} failed: {exc}") from exc


def _error_detail(response: requests.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        return "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError):
        return ""


class RegistryClient:
    """One repository in one registry, authenticated, over HTTP(S)."""

    def __init__(
        self,
        registry: str,
        repository: str = "",
        *,
        credentials: Credentials | None = None,
        plain_http: bool | None = None,
        insecure: bool = False,
    ) -> None:
        self.registry = registry
        self.repository = repository
        self.credentials = credentials
        http = (is_loopback(registry) and not insecure) if plain_http is None else plain_http
        api_host = _API_HOSTS.get(registry, registry)
        self._client = _OrasRegistry(hostname=api_host, insecure=http, tls_verify=not insecure)
        self._prefix = "http" if http else "https"
        self._base = f"{self._prefix}://{api_host}/v2/"
        self._repo_url = f"{self._base}{repository}/"

    # ----------------------------------------------------------- connection

    def connect(self) -> None:
        """Ping ``/v2/``, choose basic or token auth from the challenge, and check the credentials."""
        url = self._base
        response = self._client.do_request(url, "GET")
        challenge = response.headers.get("Www-Authenticate", "")
        if response.status_code == 401 and challenge.lower().startswith("basic"):
            backend = oras.auth.get_auth_backend(
                "basic", self._client.session, self._prefix == "http", tls_verify=self._client._tls_verify
            )
            self._client.auth = backend
        if self.credentials is not None:
            self._client.auth.set_basic_auth(self.credentials.username, self.credentials.password)
        if response.status_code == 401:
            if self.credentials is not None:
                response = self._client.do_request(url, "GET")
                self._check(response, "log in to")
            elif isinstance(self._client.auth, oras.auth.BasicAuth):
                self._check(response, "log in to")
        elif response.status_code == 400 and "HTTPS" in response.text:
            raise RegistryUnreachableError(
                f"registry {self.registry} speaks HTTPS: use --https (and --insecure for a self-signed certificate)"
            )
        else:
            self._check(response, "reach")

    def _check(self, response: requests.Response, action: str, subject: str = "") -> None:
        status = response.status_code
        if status < 300:
            return
        where = subject or self.registry
        detail = _error_detail(response)
        if status == 401:
            if self.credentials is None:
                raise RegistryAuthError(
                    f"registry {self.registry} requires authentication: run `kwasm login {self.registry}`"
                )
            raise RegistryAuthError(
                f"registry {self.registry} rejected the credentials of user {self.credentials.username!r}"
            )
        if status == 403:
            raise RegistryAuthError(f"registry {self.registry} denied access: cannot {action} {where}")
        if status == 404 and action == "pull":
            raise ImageNotFoundError(
                f"{where} not found in registry {self.registry}" + (f" ({detail})" if detail else "")
            )
        message = f"registry {self.registry} answered {status} {response.reason}: cannot {action} {where}"
        raise RegistryError(message + (f" ({detail})" if detail else ""))

    # ------------------------------------------------------------ manifests

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        """The raw bytes and media type of manifest ``reference`` (a tag or digest)."""
        url = f"{self._repo_url}manifests/{reference}"
        response = self._client.do_request(url, "GET", headers={"Accept": MANIFEST_ACCEPT}, stream=True)
        with response:
            self._check(response, "pull", f"{self.repository}:{reference}".replace(":sha256:", "@sha256:"))
            received = bytearray()
            for chunk in response.iter_content(CHUNK_BYTES):
                received += chunk
                if len(received) > MAX_MANIFEST_BYTES:
                    raise RegistryError(f"manifest {reference} from {self.registry} is larger than 4 MiB")
        body = bytes(received)
        announced = response.headers.get("Docker-Content-Digest")
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if announced and announced.startswith("sha256:") and announced != actual:
            raise DigestMismatchError(
                f"manifest {reference} from {self.registry} does not match the digest the registry announced "
                f"({announced}, content is {actual})"
            )
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            media_type = str(json.loads(body).get("mediaType") or media_type)
        except (ValueError, AttributeError) as exc:
            raise RegistryError(f"manifest {reference} from {self.registry} is not JSON") from exc
        return body, media_type

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> None:
        """Upload manifest bytes as-is under ``reference`` (a tag or digest); the registry must keep them."""
        url = f"{self._repo_url}manifests/{reference}"
        response = self._client.do_request(url, "PUT", data=data, headers={"Content-Type": media_type})
        self._check(response, "push", f"{self.repository}:{reference}")
        stored = response.headers.get("Docker-Content-Digest")
        expected = "sha256:" + hashlib.sha256(data).hexdigest()
        if stored and stored != expected:
            raise DigestMismatchError(f"registry {self.registry} stored the manifest as {stored}, not {expected}")

    # ---------------------------------------------------------------- blobs

    def has_blob(self, digest: str) -> bool:
        """Whether the repository already holds blob ``digest``."""
        url = f"{self._repo_url}blobs/{digest}"
        response = self._client.do_request(url, "HEAD")
        if response.status_code == 404:
            return False
        self._check(response, "check", f"blob {digest}")
        return True

    def stream_blob(self, digest: str, limit: int) -> Iterator[bytes]:
        """The bytes of blob ``digest`` in chunks; stops with an error past ``limit`` bytes."""
        url = f"{self._repo_url}blobs/{digest}"
        response = self._client.do_request(url, "GET", stream=True)
        with response:
            self._check(response, "download", f"blob {digest}")
            received = 0
            try:
                for chunk in response.iter_content(CHUNK_BYTES):
                    received += len(chunk)
                    if received > limit:
                        raise DigestMismatchError(
                            f"blob {digest} from {self.registry} is larger than the {limit} bytes its descriptor says"
                        )
                    yield chunk
            except requests.exceptions.RequestException as exc:
                raise RegistryUnreachableError(f"download of blob {digest} from {self.registry} broke off") from exc

    def upload_blob(self, digest: str, size: int, path: Path, advance: Callable[[int], None]) -> None:
        """Upload the file ``path`` as blob ``digest`` (monolithic POST + PUT), reporting bytes sent."""
        url = f"{self._repo_url}blobs/uploads/"
        started = self._client.do_request(url, "POST", headers={"Content-Length": "0"})
        self._check(started, "push", f"blob {digest}")
        location = started.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {self.registry} started an upload without a Location header")
        target = oras.utils.append_url_params(urllib.parse.urljoin(url, location), {"digest": digest})
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        with path.open("rb") as handle:
            body = _ProgressReader(handle, advance)
            response = self._client.do_request(target, "PUT", data=body, headers=headers)
        self._check(response, "push", f"blob {digest}")


class _ProgressReader:
    """A file wrapper that reports how many bytes ``requests`` has read from it."""

    def __init__(self, handle: BinaryIO, advance: Callable[[int], None]) -> None:
        self._handle = handle
        self._advance = advance

    def read(self, size: int = -1) -> bytes:
        """Read like the file and report the bytes read."""
        data = self._handle.read(size)
        self._advance(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        """Rewind for a retried request."""
        return self._handle.seek(offset, whence)

    def __len__(self) -> int:
        position = self._handle.tell()
        end = self._handle.seek(0, 2)
        self._handle.seek(position)
        return end - position
