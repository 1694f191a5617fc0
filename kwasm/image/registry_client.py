"""Talking to one OCI registry: the distribution API calls kwasm uses, with kwasm's transport rules.

The client speaks HTTP through :mod:`kwasm.image.httpclient` (on the standard library's ``socket``,
one keep-alive connection per host) rather than a third-party SDK, because every
``kwasm push``/``pull`` is a new process and importing oras-py with requests and jsonschema cost
more start-up time than the transfer itself. What it does:

* plain HTTP automatically for loopback registries, ``insecure`` to skip TLS verification;
* the auth scheme picked from the registry's challenge: ``Basic`` → the stored credentials,
  ``Bearer`` → a token from the ``realm`` of the challenge for its ``service`` and ``scope``
  (with the credentials as basic auth, or anonymously), fetched again for each new scope;
* credentials from the Docker config (:mod:`kwasm.image.auth`), sent only to the registry's own
  scheme and host, a challenge answered only when the registry itself (not a redirect target) sent
  it, and never a token request to a plain-HTTP realm for an HTTPS registry;
* HTTP proxies from the environment (:mod:`kwasm.image.proxy`);
* no silent retries and timeouts on every request;
* every failure becomes one :class:`~kwasm.errors.RegistryError` line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

from kwasm import __version__
from kwasm.errors import (
    DigestMismatchError,
    ImageNotFoundError,
    RegistryAuthError,
    RegistryError,
    RegistryUnreachableError,
)
from kwasm.image.auth import Credentials
from kwasm.image.httpclient import BLOCK_BYTES, Body, FileBody, Response, Session
from kwasm.image.proxy import is_loopback

MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_TOKEN_BYTES = 1024 * 1024
_API_HOSTS = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """The scheme (lower case) and parameters of a ``WWW-Authenticate`` header.

    ``Bearer realm="https://auth.example/token",service="registry",scope="repository:app:pull"``
    gives ``("bearer", {"realm": ..., "service": ..., "scope": ...})``.
    """
    scheme, _, rest = header.strip().partition(" ")
    params = {
        match[1].lower(): match[2].replace('\\"', '"') if match[3] is None else match[3]
        for match in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def _error_detail(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors") or []
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
        self._api_host = _API_HOSTS.get(registry, registry)
        self._session = Session(verify=not insecure, user_agent=f"kwasm/{__version__}")
        self._base = f"{'http' if http else 'https'}://{self._api_host}/v2/"
        self._repo_url = f"{self._base}{repository}/"
        self._basic = False  # the registry asked for basic auth: send the credentials with every request
        self._token: str | None = None  # the bearer token of the last scope the registry asked for

    def close(self) -> None:
        """Close the client's connections."""
        self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------- transport + auth

    def _authorization(self) -> dict[str, str]:
        if self._token is not None:
            return {"Authorization": f"Bearer {self._token}"}
        if self._basic and self.credentials is not None:
            return {"Authorization": f"Basic {self._basic_token()}"}
        return {}

    def _basic_token(self) -> str:
        assert self.credentials is not None
        pair = f"{self.credentials.username}:{self.credentials.password}"
        return base64.b64encode(pair.encode()).decode()

    def _request(self, method: str, url: str, headers: dict[str, str] | None = None, body: Body = None) -> Response:
        """Send one request; answer one authentication challenge (basic or bearer) and send it again."""
        headers = headers or {}
        auth = self._authorization() if self._is_registry(url) else {}
        response = self._session.request(method, url, {**headers, **auth}, body)
        if response.status != 401 or not self._is_registry(response.url):
            return response  # a 401 from a redirect target: its realm is not trusted with the credentials
        scheme, params = parse_challenge(response.header("WWW-Authenticate"))
        if scheme == "bearer":
            response.close()  # frees the connection (the token service may live on the same host)
            token = self._fetch_token(params)
            if token is None:
                return response  # the 401 (its body is not needed: the error line says what to do)
            self._token = token
        elif scheme == "basic" and self.credentials is not None and not self._basic:
            self._basic = True
            response.close()
        else:
            return response
        return self._session.request(method, url, {**headers, **self._authorization()}, body)

    def _is_registry(self, url: str) -> bool:
        """Whether ``url`` is on the registry's API host, with the scheme the client speaks to it."""
        return urllib.parse.urlsplit(url)[:2] == urllib.parse.urlsplit(self._base)[:2]

    def _fetch_token(self, challenge: dict[str, str]) -> str | None:
        """A bearer token from the challenge's realm (with the credentials, if any), or None if refused."""
        realm = challenge.get("realm")
        if not realm:
            return None
        scheme = self._base.split("://", 1)[0]
        if "://" not in realm:
            realm = f"{scheme}://{realm}"
        if urllib.parse.urlsplit(realm).scheme not in (("https",) if scheme == "https" else ("http", "https")):
            raise RegistryAuthError(f"registry {self.registry} names a token service that is not HTTPS: {realm}")
        query = urllib.parse.urlencode({key: challenge[key] for key in ("service", "scope") if challenge.get(key)})
        url = f"{realm}{'&' if '?' in realm else '?'}{query}" if query else realm
        headers = {"Accept": "application/json"}
        if self.credentials is not None:
            headers["Authorization"] = f"Basic {self._basic_token()}"
        try:
            with self._session.request("GET", url, headers) as response:
                if response.status != 200:
                    return None
                answer = json.loads(response.read(MAX_TOKEN_BYTES))
        except RegistryError as exc:
            raise RegistryAuthError(f"cannot get a token from the auth server {realm}: {exc}") from exc
        except ValueError as exc:
            raise RegistryAuthError(f"the auth server {realm} answered with something other than JSON") from exc
        token = (answer.get("token") or answer.get("access_token")) if isinstance(answer, dict) else None
        return str(token) if token else None

    # ----------------------------------------------------------- connection

    def connect(self) -> None:
        """Ping ``/v2/``, learn the auth scheme from the challenge, and check the credentials."""
        with self._request("GET", self._base) as response:
            if response.status == 401:
                scheme, _ = parse_challenge(response.header("WWW-Authenticate"))
                if self.credentials is not None or scheme == "basic":
                    self._check(response, "log in to")
                # bearer without credentials: repositories may still grant anonymous tokens
            elif response.status == 400 and b"HTTPS" in response.read():
                raise RegistryUnreachableError(
                    f"registry {self.registry} speaks HTTPS: use --https (and --insecure for a self-signed certificate)"
                )
            else:
                self._check(response, "reach")

    def _check(self, response: Response, action: str, subject: str = "") -> None:
        status = response.status
        if status < 300:
            return
        where = subject or self.registry
        detail = _error_detail(response.read())
        if status in (401, 403) and not self._is_registry(response.url):  # a redirect target or upload host
            host = urllib.parse.urlsplit(response.url).netloc
            raise RegistryAuthError(f"{host} (not registry {self.registry} itself) answered {status} "
                                    f"{response.reason}: cannot {action} {where}")  # fmt: skip
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
        with self._request("GET", url, {"Accept": MANIFEST_ACCEPT}) as response:
            self._check(response, "pull", f"{self.repository}:{reference}".replace(":sha256:", "@sha256:"))
            received = bytearray()
            for chunk in response.chunks():
                received += chunk
                if len(received) > MAX_MANIFEST_BYTES:
                    raise RegistryError(f"manifest {reference} from {self.registry} is larger than 4 MiB")
        body = bytes(received)
        announced = response.header("Docker-Content-Digest")
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if announced.startswith("sha256:") and announced != actual:
            raise DigestMismatchError(
                f"manifest {reference} from {self.registry} does not match the digest the registry announced "
                f"({announced}, content is {actual})"
            )
        media_type = response.header("Content-Type").split(";")[0].strip()
        try:
            media_type = str(json.loads(body).get("mediaType") or media_type)
        except (ValueError, AttributeError) as exc:
            raise RegistryError(f"manifest {reference} from {self.registry} is not JSON") from exc
        return body, media_type

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> None:
        """Upload manifest bytes as-is under ``reference`` (a tag or digest); the registry must keep them."""
        url = f"{self._repo_url}manifests/{reference}"
        with self._request("PUT", url, {"Content-Type": media_type}, data) as response:
            self._check(response, "push", f"{self.repository}:{reference}")
        stored = response.header("Docker-Content-Digest")
        expected = "sha256:" + hashlib.sha256(data).hexdigest()
        if stored and stored != expected:
            raise DigestMismatchError(f"registry {self.registry} stored the manifest as {stored}, not {expected}")

    # ---------------------------------------------------------------- blobs

    def has_blob(self, digest: str) -> bool:
        """Whether the repository already holds blob ``digest``."""
        with self._request("HEAD", f"{self._repo_url}blobs/{digest}") as response:
            if response.status == 404:
                return False
            self._check(response, "check", f"blob {digest}")
        return True

    def stream_blob(self, digest: str, limit: int) -> Iterator[bytes]:
        """The bytes of blob ``digest`` in chunks; stops with an error past ``limit`` bytes."""
        with self._request("GET", f"{self._repo_url}blobs/{digest}") as response:
            self._check(response, "download", f"blob {digest}")
            received = 0
            try:
                for chunk in response.chunks(BLOCK_BYTES):
                    received += len(chunk)
                    if received > limit:
                        raise DigestMismatchError(
                            f"blob {digest} from {self.registry} is larger than the {limit} bytes its descriptor says"
                        )
                    yield chunk
            except RegistryUnreachableError as exc:
                raise RegistryUnreachableError(f"download of blob {digest} from {self.registry} broke off") from exc

    def upload_blob(self, digest: str, size: int, path: Path, advance: Callable[[int], None]) -> None:
        """Upload the file ``path`` as blob ``digest`` (monolithic POST + PUT), reporting bytes sent."""
        url = f"{self._repo_url}blobs/uploads/"
        with self._request("POST", url) as started:
            self._check(started, "push", f"blob {digest}")
        location = started.header("Location")
        if not location:
            raise RegistryError(f"registry {self.registry} started an upload without a Location header")
        target = urllib.parse.urljoin(url, location)
        target += ("&" if urllib.parse.urlsplit(target).query else "?") + urllib.parse.urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream"}
        with path.open("rb") as handle, self._request("PUT", target, headers, FileBody(handle, size, advance)) as done:
            self._check(done, "push", f"blob {digest}")
