"""The one exception hierarchy of kwasm.

Every error a user can cause or meet is a :class:`KwasmError` (or a child). The CLI turns
them into one line on stderr and the class's ``exit_code`` in one place
(:func:`kwasm.cli.main.main`); library callers catch the class they care about.
"""

from __future__ import annotations


class KwasmError(Exception):
    """Base of every kwasm error: its message is one line a user can act on."""

    exit_code = 1


class UsageError(KwasmError):
    """The command line or an argument is wrong (bad flag value, malformed reference)."""

    exit_code = 2


class NotFoundError(KwasmError):
    """Something named by the user does not exist (image, file, sandbox, task)."""

    exit_code = 3


class ImageNotFoundError(NotFoundError):
    """No image with that reference in the local store (or in the registry)."""


class InvalidImageError(KwasmError):
    """An image, layout or archive is malformed, unsafe, or not a wasm image."""

    exit_code = 4


class WasmValidationError(InvalidImageError):
    """A module is not wasm, is truncated, does not compile, or lacks what it must export."""


class DockerfileError(InvalidImageError):
    """A Dockerfile uses an instruction or form kwasm does not build (with its line number)."""


class DigestMismatchError(InvalidImageError):
    """Content does not match the digest or size that names it."""


class UnsafeArchiveError(InvalidImageError):
    """A tar entry would land outside its target (absolute path, ``..``, link escape)."""


class StoreError(KwasmError):
    """The local image store cannot be read or written."""

    exit_code = 5


class RegistryError(KwasmError):
    """A registry refused or failed a request."""

    exit_code = 6


class RegistryAuthError(RegistryError):
    """The registry rejected the credentials (or demanded some we do not have)."""


class RegistryUnreachableError(RegistryError):
    """The registry did not answer (refused, timed out, TLS failure)."""


class EngineError(KwasmError):
    """The wasm engine could not create or run a guest."""

    exit_code = 7


class SandboxerError(KwasmError):
    """The sandboxer daemon failed or is not reachable."""

    exit_code = 8


class ConfigFileError(KwasmError):
    """A configuration file (iSulad daemon.json, containerd config) is invalid or unwritable."""

    exit_code = 9


class ToolMissingError(KwasmError):
    """An external program kwasm needs (isula, crictl, ctr, docker engine) is missing or failed."""

    exit_code = 10
