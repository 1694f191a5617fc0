"""Registry credentials, kept where Docker keeps them.

The file is ``$DOCKER_CONFIG/config.json`` (``~/.docker/config.json`` when ``DOCKER_CONFIG`` is
unset), the same one ``docker login`` writes: ``auths[<registry>].auth`` holds base64
``user:password``; ``credHelpers``/``credsStore`` name a ``docker-credential-<helper>`` program that
stores the secret instead. The registry client (:mod:`kwasm.image.registry_client`) gets the
credentials from here and sends them only to the registry they belong to.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kwasm.errors import ConfigFileError, RegistryAuthError

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_NAMES = {"docker.io", "index.docker.io", "registry-1.docker.io"}


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or identity token) for one registry."""

    username: str
    password: str


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    directory = os.environ.get("DOCKER_CONFIG")
    base = Path(directory) if directory else Path.home() / ".docker"
    return base / "config.json"


def config_key(registry: str) -> str:
    """The ``auths`` key Docker uses for ``registry`` (Docker Hub has a legacy URL as its key)."""
    return DOCKER_HUB_KEY if registry in _DOCKER_HUB_NAMES else registry


def _candidate_keys(registry: str) -> list[str]:
    key = config_key(registry)
    hosts = [key]
    if "localhost" in key:
        hosts.append(key.replace("localhost", "127.0.0.1"))
    elif "127.0.0.1" in key:
        hosts.append(key.replace("127.0.0.1", "localhost"))
    return [form for host in hosts for form in (host, f"https://{host}", f"http://{host}")]


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigFileError(f"cannot read Docker config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"cannot read Docker config {path}: not a JSON object")
    return data


def _decode_entry(registry: str, entry: dict[str, Any], path: Path) -> Credentials | None:
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(str(entry["auth"]), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ConfigFileError(f"credentials for {registry} in {path} are not base64 user:password") from exc
        if not sep:
            raise ConfigFileError(f"credentials for {registry} in {path} are not base64 user:password")
        return Credentials(user, password)
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]))
    return None


def _run_helper(helper: str, action: str, payload: str) -> str:
    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run([program, action], input=payload, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise RegistryAuthError(f"credential helper {program} (named in the Docker config) is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise RegistryAuthError(f"credential helper {program} did not answer within 30 s") from exc
    if done.returncode != 0:
        raise RegistryAuthError(
            f"credential helper {program} {action} failed: {done.stdout.strip() or done.stderr.strip()}"
        )
    return done.stdout


def _helper_for(config: dict[str, Any], registry: str) -> str | None:
    helpers = config.get("credHelpers") or {}
    for key in _candidate_keys(registry):
        if helpers.get(key):
            return str(helpers[key])
    store = config.get("credsStore")
    return str(store) if store else None


def load_credentials(registry: str, path: Path | None = None) -> Credentials | None:
    """The stored credentials for ``registry``, or None if there are none (anonymous access)."""
    path = path or docker_config_path()
    config = _read_config(path)
    auths = config.get("auths") or {}
    for key in _candidate_keys(registry):
        entry = auths.get(key)
        if isinstance(entry, dict) and (found := _decode_entry(registry, entry, path)) is not None:
            return found
    helper = _helper_for(config, registry)
    if helper is None:
        return None
    try:
        answer = json.loads(_run_helper(helper, "get", config_key(registry)))
    except RegistryAuthError:
        return None
    except ValueError as exc:
        raise RegistryAuthError(f"credential helper docker-credential-{helper} gave malformed output") from exc
    return Credentials(str(answer.get("Username", "")), str(answer.get("Secret", "")))


def store_credentials(registry: str, credentials: Credentials, path: Path | None = None) -> Path:
    """Save ``credentials`` for ``registry`` the way ``docker login`` does; return the config path.

    Other keys of the file are kept; it is replaced atomically and is readable by its owner only.
    """
    path = path or docker_config_path()
    config = _read_config(path)
    key = config_key(registry)
    auths = config.setdefault("auths", {})
    helper = _helper_for(config, registry)
    if helper is not None:
        payload = {"ServerURL": key, "Username": credentials.username, "Secret": credentials.password}
        _run_helper(helper, "store", json.dumps(payload))
        auths[key] = {}
    else:
        token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
        auths[key] = {"auth": token}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".config-", delete=False)  # noqa: SIM115
    try:
        with handle:
            os.fchmod(handle.fileno(), 0o600)
            json.dump(config, handle, indent="\t")
            handle.write("\n")
        os.replace(handle.name, path)
    except OSError as exc:
        Path(handle.name).unlink(missing_ok=True)
        raise ConfigFileError(f"cannot write Docker config {path}: {exc}") from exc
    return path
