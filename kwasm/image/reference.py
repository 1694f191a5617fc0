"""Image references (``[registry/]repository[:tag][@digest]``), parsed the way Docker and containerd do."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from kwasm.errors import UsageError

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_REGISTRY = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")


@dataclass(frozen=True)
class Reference:
    """A parsed image reference; ``str()`` gives the full form, :meth:`familiar` the short one."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``text``; a bare name gets ``docker.io/library/`` and tag ``latest``."""
        original = text
        if not text or text != text.strip():
            raise UsageError(f"invalid image reference {original!r}: empty or surrounded by spaces")
        digest: str | None = None
        if "@" in text:
            text, digest = text.split("@", 1)
            if not _DIGEST.fullmatch(digest):
                raise UsageError(f"invalid image reference {original!r}: bad digest {digest!r}")
        tag: str | None = None
        slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > slash:
            text, tag = text[:colon], text[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise UsageError(f"invalid image reference {original!r}: bad tag {tag!r}")
        registry = DEFAULT_REGISTRY
        first, sep, rest = text.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            if not _REGISTRY.fullmatch(first):
                raise UsageError(f"invalid image reference {original!r}: bad registry {first!r}")
            registry, text = first, rest
        if not text or not all(_COMPONENT.fullmatch(part) for part in text.split("/")):
            raise UsageError(
                f"invalid image reference {original!r}: repository names use lowercase letters, digits "
                "and separators (. _ -)"
            )
        if registry == DEFAULT_REGISTRY and "/" not in text:
            text = f"library/{text}"
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry=registry, repository=text, tag=tag, digest=digest)

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}{self._suffix()}"

    def name(self) -> str:
        """The full name without tag or digest: ``docker.io/library/app``."""
        return f"{self.registry}/{self.repository}"

    def familiar(self) -> str:
        """The short form users type: ``app:latest``, ``127.0.0.1:5000/team/app:1``."""
        repository = self.repository
        if self.registry == DEFAULT_REGISTRY:
            repository = repository.removeprefix("library/")
            return f"{repository}{self._suffix()}"
        return f"{self.registry}/{repository}{self._suffix()}"

    def with_tag(self, tag: str) -> Reference:
        """The same repository with ``tag`` (and no digest)."""
        if not _TAG.fullmatch(tag):
            raise UsageError(f"invalid tag {tag!r}")
        return replace(self, tag=tag, digest=None)

    def _suffix(self) -> str:
        suffix = f":{self.tag}" if self.tag else ""
        return suffix + (f"@{self.digest}" if self.digest else "")
