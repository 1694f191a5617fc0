"""The build context: turning ``ADD``/``COPY`` instructions into the files of the image being built.

Semantics follow Docker: sources are relative to the context (a leading ``/`` too) and may be globs;
a directory source copies its contents; a destination ending in ``/`` (or an existing directory) takes
files under their own names; ``.dockerignore`` patterns (with ``**`` and ``!`` exceptions) are honoured.
Sources may not leave the context, not even through a symbolic link. Symbolic links to files inside the
context are copied as the file they point to; links to directories are refused.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from kwasm.errors import DockerfileError
from kwasm.image.dockerfile import CopyInstruction

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class TreeEntry:
    """One file (``data`` set) or directory (``data`` is None) of the image, with its mode bits."""

    data: bytes | None
    mode: int


class ImageTree:
    """The image's file system, keyed by path without a leading slash (``app.wasm``, ``etc/conf``)."""

    def __init__(self) -> None:
        self.entries: dict[str, TreeEntry] = {}

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` (absolute or relative) is a directory of the image (``/`` always is)."""
        key = path.strip("/")
        return not key or (key in self.entries and self.entries[key].data is None)

    def file(self, path: str) -> bytes | None:
        """The content of the file at ``path``, or None if there is no file there."""
        entry = self.entries.get(path.strip("/"))
        return entry.data if entry is not None else None

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        """Create directory ``path`` and its parents (existing directories keep their mode)."""
        key = path.strip("/")
        if not key:
            return
        self.add_dir(posixpath.dirname(key))
        existing = self.entries.get(key)
        if existing is not None and existing.data is not None:
            raise ValueError(f"/{key} is a file, cannot create a directory there")
        if existing is None:
            self.entries[key] = TreeEntry(None, mode)

    def add_file(self, path: str, data: bytes, mode: int) -> None:
        """Create or replace the file at ``path``, creating its parent directories."""
        key = path.strip("/")
        if self.is_dir(key):
            raise ValueError(f"/{key} is a directory, cannot replace it with a file")
        self.add_dir(posixpath.dirname(key))
        self.entries[key] = TreeEntry(data, mode)


class DockerIgnore:
    """``.dockerignore`` rules: the last matching pattern decides; ``!pattern`` re-includes."""

    def __init__(self, lines: list[str]) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
            self.rules.append((include, re.compile(_glob_to_regex(pattern))))

    @classmethod
    def for_context(cls, context: Path) -> DockerIgnore:
        """The rules of ``context/.dockerignore`` (none if the file is absent)."""
        path = context / ".dockerignore"
        return cls(path.read_text(encoding="utf-8").splitlines() if path.is_file() else [])

    def ignored(self, relative: str) -> bool:
        """Whether the context-relative path (or one of its parent directories) is excluded."""
        parts = relative.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for include, regex in self.rules:
            if any(regex.fullmatch(candidate) for candidate in candidates):
                excluded = not include
        return excluded


def _glob_to_regex(pattern: str) -> str:
    """Translate a Docker path pattern (``*``, ``?``, ``[...]``, ``**``) to a regular expression."""
    out: list[str] = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            out.append(".*")
            index += 2
        elif pattern[index] == "*":
            out.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            out.append("[^/]")
            index += 1
        else:
            out.append(re.escape(pattern[index]))
            index += 1
    return "".join(out)


class BuildContext:
    """A directory whose files ``ADD``/``COPY`` may use."""

    def __init__(self, root: Path, dockerfile_name: str) -> None:
        self.root = root.resolve()
        self.dockerfile_name = dockerfile_name
        self.ignore = DockerIgnore.for_context(self.root)

    def _fail(self, copy: CopyInstruction, why: str) -> DockerfileError:
        return DockerfileError(f"{self.dockerfile_name}, line {copy.line}: {copy.instruction}: {why}")

    def _matches(self, copy: CopyInstruction, source: str) -> list[str]:
        """Context-relative paths named by one source (a path or a glob)."""
        relative = posixpath.normpath(source.lstrip("/"))
        if relative == ".." or relative.startswith("../"):
            raise self._fail(copy, f"{source}: outside the build context")
        if not _GLOB_CHARS.search(relative):
            if not os.path.lexists(self.root / relative):
                raise self._fail(copy, f"{source}: no such file or directory in the build context {self.root}")
            return [relative]
        found = sorted(
            str(path.relative_to(self.root)) for path in self.root.glob(relative) if path.is_relative_to(self.root)
        )
        found = [path for path in found if fnmatch.fnmatchcase(path, relative) and not self.ignore.ignored(path)]
        if not found:
            raise self._fail(copy, f"{source}: no files in the build context match")
        return found

    def _real(self, copy: CopyInstruction, relative: str) -> Path:
        """The real path of a context entry, refusing links that leave the context."""
        path = self.root / relative if relative != "." else self.root
        real = path.resolve()
        if not real.is_relative_to(self.root):
            raise self._fail(copy, f"{relative}: points outside the build context")
        if path.is_symlink() and real.is_dir():
            raise self._fail(copy, f"{relative}: symbolic links to directories are not supported")
        return real

    def apply(self, tree: ImageTree, copy: CopyInstruction) -> None:
        """Copy the sources of one instruction into ``tree``."""
        sources = [match for source in copy.sources for match in self._matches(copy, source)]
        into_dir = copy.destination.endswith("/") or len(sources) > 1 or tree.is_dir(copy.destination)
        try:
            for relative in sources:
                real = self._real(copy, relative)
                if real.is_dir():
                    tree.add_dir(copy.destination, copy.chmod or 0o755)
                    self._copy_dir(copy, tree, relative, copy.destination)
                    continue
                if self.ignore.ignored(relative):
                    raise self._fail(copy, f"{relative}: excluded by .dockerignore")
                target = copy.destination
                if into_dir:
                    target = posixpath.join(copy.destination, posixpath.basename(relative))
                self._copy_file(copy, tree, real, target)
        except ValueError as exc:
            raise self._fail(copy, str(exc)) from None

    def _copy_dir(self, copy: CopyInstruction, tree: ImageTree, relative: str, destination: str) -> None:
        base = self.root / relative if relative != "." else self.root
        for directory, subdirs, files in os.walk(base):
            subdirs.sort()
            here = Path(directory)
            for name in [*subdirs, *sorted(files)]:
                path = here / name
                inner = str(path.relative_to(self.root))
                if self.ignore.ignored(inner):
                    continue
                target = posixpath.join(destination, str(path.relative_to(base)))
                real = self._real(copy, inner)
                if real.is_dir():
                    tree.add_dir(target, copy.chmod or 0o755)
                else:
                    self._copy_file(copy, tree, real, target)

    def _copy_file(self, copy: CopyInstruction, tree: ImageTree, real: Path, target: str) -> None:
        try:
            info = real.stat()
        except OSError as exc:
            raise self._fail(copy, f"{real}: {exc.strerror or exc} (a broken symbolic link?)") from None
        if not stat.S_ISREG(info.st_mode):
            raise self._fail(copy, f"{real}: not a regular file")
        try:
            if copy.instruction == "ADD" and tarfile.is_tarfile(real):
                why = "ADD would unpack this archive, which kwasm does not do; use COPY to add it as is"
                raise self._fail(copy, f"{real.name}: {why}")
            data = real.read_bytes()
        except OSError as exc:
            raise self._fail(copy, f"{real}: cannot read: {exc.strerror or exc}") from None
        executable = target.endswith(".wasm") or bool(info.st_mode & 0o111)
        tree.add_file(target, data, copy.chmod or (0o755 if executable else 0o644))
