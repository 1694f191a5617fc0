"""The Dockerfile subset that wasm images use, parsed with Docker's own grammar (PyPI ``dockerfile``).

Accepted: ``FROM scratch`` (one stage), ``ADD``/``COPY`` of local files and directories (``--chmod``
allowed), ``ENTRYPOINT``/``CMD`` in exec and shell form, ``ENV``, ``LABEL``, ``WORKDIR`` and ``ARG``.
Everything else is refused with a :class:`~kwasm.errors.DockerfileError` that names the line and says
why. A wasm image has no shell, so the shell form of ``ENTRYPOINT``/``CMD`` is split into words the way
a POSIX shell would split it (there is no ``/bin/sh -c`` wrapper); as with Docker, a shell-form
``ENTRYPOINT`` makes the image ignore ``CMD``. Words go through Docker's variable
expansion (``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:+alt}``) and quote removal.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile

from kwasm.errors import DockerfileError, NotFoundError

_REFUSED = {
    "RUN": "a wasm image has no shell or Linux userland to run commands in; build the .wasm beforehand",
    "SHELL": "a wasm image has no shell",
    "ONBUILD": "wasm images are never used as base images",
    "HEALTHCHECK": "health checks run commands inside the container, which a wasm image cannot",
    "USER": "wasm guests have no users; files are owned by 0:0",
    "VOLUME": "declare host directories at run time instead (kwasm run -v HOST:GUEST)",
    "EXPOSE": "WASI preview 1 guests cannot listen on ports",
    "STOPSIGNAL": "wasm guests receive no signals; kwasm stops them itself",
    "MAINTAINER": "deprecated by Docker; use LABEL org.opencontainers.image.authors=...",
}
_ROOT_OWNERS = {"0", "root", "0:0", "root:root", "0:root", "root:0"}
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SUBSTITUTION = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\+)(.*))?", re.DOTALL)


@dataclass(frozen=True)
class CopyInstruction:
    """One ``ADD``/``COPY``: context-relative sources into an absolute image path."""

    line: int
    instruction: str
    sources: tuple[str, ...]
    destination: str
    chmod: int | None


@dataclass
class BuildRecipe:
    """What a Dockerfile asks for, with variables expanded and paths made absolute."""

    copies: list[CopyInstruction] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    workdirs: list[str] = field(default_factory=list)
    #: True when ENTRYPOINT used the shell form: Docker then ignores CMD, and so does the built image.
    shell_entrypoint: bool = False


def expand_word(word: str, variables: Mapping[str, str], escape: str = "\\") -> str:
    """Docker's word processing: quote removal, ``escape`` handling and ``$VAR`` expansion."""
    out: list[str] = []
    index = 0
    quote = ""
    while index < len(word):
        char = word[index]
        if quote == "'":
            if char == "'":
                quote = ""
            else:
                out.append(char)
        elif char == escape and index + 1 < len(word):
            following = word[index + 1]
            if quote == '"' and following not in ('"', "$", escape):
                out.append(char)
            out.append(following)
            index += 1
        elif char in "'\"" and not quote:
            quote = char
        elif char == '"' and quote == '"':
            quote = ""
        elif char == "$":
            value, index = _expand_variable(word, index, variables)
            out.append(value)
            continue
        else:
            out.append(char)
        index += 1
    if quote:
        raise ValueError(f"unterminated {quote} quote in {word!r}")
    return "".join(out)


def _expand_variable(word: str, start: int, variables: Mapping[str, str]) -> tuple[str, int]:
    """Expand the ``$NAME`` or ``${...}`` at ``word[start]``; return the value and the next index."""
    if word.startswith("${", start):
        end = _closing_brace(word, start + 2)
        body = word[start + 2 : end]
        match = _SUBSTITUTION.fullmatch(body)
        if match is None:
            raise ValueError(f"bad variable substitution ${{{body}}}")
        name, operator, alternative = match.group(1), match.group(2), match.group(3) or ""
        value = variables.get(name, "")
        if operator == ":-":
            value = value or expand_word(alternative, variables)
        elif operator == ":+":
            value = expand_word(alternative, variables) if value else ""
        return value, end + 1
    match = _VARIABLE.match(word, start + 1)
    if match is None:
        return "$", start + 1
    return variables.get(match.group(), ""), match.end()


def _closing_brace(word: str, start: int) -> int:
    """Index of the ``}`` closing a ``${`` whose body starts at ``start`` (nested ``${...}`` allowed)."""
    depth = 1
    for index in range(start, len(word)):
        if word.startswith("${", index):
            depth += 1
        elif word[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"missing '}}' in {word!r}")


def _escape_directive(text: str) -> str:
    """The escape character from a leading ``# escape=`` parser directive (default backslash)."""
    for line in text.splitlines():
        match = re.fullmatch(r"#\s*escape\s*=\s*(\S)\s*", line.strip())
        if match:
            return match.group(1)
        if not re.fullmatch(r"#\s*\w+\s*=.*", line.strip()):
            break
    return "\\"


def read_dockerfile(path: Path, build_args: Mapping[str, str] | None = None) -> BuildRecipe:
    """Parse the Dockerfile at ``path`` into a :class:`BuildRecipe` (or raise :class:`DockerfileError`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"no Dockerfile at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DockerfileError(f"{path}: cannot read: {exc}") from None
    return parse_dockerfile(text, str(path), build_args or {})


def parse_dockerfile(text: str, name: str, build_args: Mapping[str, str]) -> BuildRecipe:
    """Parse Dockerfile ``text`` (reported as ``name`` in errors) into a :class:`BuildRecipe`."""
    try:
        commands = dockerfile.parse_string(text)
    except dockerfile.GoParseError as exc:
        raise DockerfileError(f"{name}: cannot parse: {exc}") from None
    parser = _RecipeBuilder(name, build_args, _escape_directive(text))
    for command in commands:
        parser.apply(command)
    if not parser.seen_from:
        raise DockerfileError(f"{name}: no FROM line (a wasm image starts with FROM scratch)")
    if parser.recipe.shell_entrypoint:
        parser.recipe.cmd = []
    return parser.recipe


class _RecipeBuilder:
    """Applies parsed instructions one by one, tracking ARG/ENV scope like Docker does."""

    def __init__(self, name: str, build_args: Mapping[str, str], escape: str) -> None:
        self.name = name
        self.build_args = dict(build_args)
        self.escape = escape
        self.meta_args: dict[str, str] = {}
        self.stage_args: dict[str, str] = {}
        self.seen_from = False
        self.recipe = BuildRecipe()

    def fail(self, command: dockerfile.Command, why: str) -> DockerfileError:
        """A :class:`DockerfileError` naming the file, line and instruction."""
        return DockerfileError(f"{self.name}, line {command.start_line}: {command.cmd.upper()}: {why}")

    def variables(self) -> dict[str, str]:
        """Variables visible to the current instruction (ENV wins over ARG)."""
        if not self.seen_from:
            return dict(self.meta_args)
        return {**self.stage_args, **self.recipe.env}

    def expand(self, command: dockerfile.Command, word: str) -> str:
        """Expand one word of ``command``, turning syntax errors into :class:`DockerfileError`."""
        try:
            return expand_word(word, self.variables(), self.escape)
        except ValueError as exc:
            raise self.fail(command, str(exc)) from None

    def apply(self, command: dockerfile.Command) -> None:
        """Apply one parsed instruction to the recipe."""
        instruction = command.cmd.upper()
        if command.heredocs:
            raise self.fail(command, "heredocs are not supported; put the content in a file in the context")
        if instruction in _REFUSED:
            raise self.fail(command, f"not supported: {_REFUSED[instruction]}")
        if instruction == "ARG":
            self._arg(command)
            return
        if instruction == "FROM":
            self._from(command)
            return
        if not self.seen_from:
            raise self.fail(command, "must come after FROM scratch")
        if command.flags and instruction not in ("ADD", "COPY"):
            raise self.fail(command, f"unknown flag {command.flags[0]} (use the exec form for arguments like it)")
        handler = {
            "ADD": self._copy,
            "COPY": self._copy,
            "ENTRYPOINT": self._program,
            "CMD": self._program,
            "ENV": self._env,
            "LABEL": self._label,
            "WORKDIR": self._workdir,
        }.get(instruction)
        if handler is None:
            raise self.fail(command, "unknown instruction")
        handler(command)

    def _arg(self, command: dockerfile.Command) -> None:
        for item in command.value:
            key, has_default, default = item.partition("=")
            if not _VARIABLE.fullmatch(key):
                raise self.fail(command, f"bad argument name {key!r}")
            scope = self.stage_args if self.seen_from else self.meta_args
            if key in self.build_args:
                scope[key] = self.build_args[key]
            elif has_default:
                scope[key] = self.expand(command, default)
            elif self.seen_from and key in self.meta_args:
                scope[key] = self.meta_args[key]

    def _from(self, command: dockerfile.Command) -> None:
        if self.seen_from:
            raise self.fail(command, "multi-stage builds are not supported (one FROM scratch stage)")
        if command.flags:
            raise self.fail(command, f"flag {command.flags[0]} is not supported (use kwasm build --platform)")
        words = [self.expand(command, word) for word in command.value]
        if not words or words[0] != "scratch":
            base = words[0] if words else ""
            raise self.fail(command, f"base image {base!r} is not supported: a wasm image is built FROM scratch")
        if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
            raise self.fail(command, "expected FROM scratch [AS name]")
        self.seen_from = True

    def _copy(self, command: dockerfile.Command) -> None:
        chmod: int | None = None
        for flag in command.flags:
            option, _, value = flag.partition("=")
            if option == "--chmod" and re.fullmatch(r"[0-7]{3,4}", value):
                chmod = int(value, 8)
            elif option == "--chown" and value in _ROOT_OWNERS:
                continue
            elif option == "--chown":
                raise self.fail(command, f"{flag}: image files are always owned by 0:0")
            elif option == "--link":
                continue
            elif option == "--from":
                raise self.fail(command, f"{flag}: multi-stage builds are not supported")
            else:
                raise self.fail(command, f"flag {flag} is not supported (only --chmod=OCTAL)")
        words = [self.expand(command, word) for word in command.value]
        if len(words) < 2:
            raise self.fail(command, "needs at least one source and a destination")
        *sources, destination = words
        for source in sources:
            if re.match(r"^[a-z][a-z0-9+.-]*://|^git@", source):
                raise self.fail(command, f"remote source {source!r} is not supported; add a local file")
        names_dir = destination.endswith("/") or posixpath.basename(destination) in (".", "..")
        if len(sources) > 1 and not names_dir:
            raise self.fail(command, "with more than one source the destination must be a directory ending in /")
        absolute = posixpath.join(self.recipe.working_dir or "/", destination)
        normalized = "/" + posixpath.normpath(absolute).lstrip("/")
        if names_dir and normalized != "/":
            normalized += "/"
        self.recipe.copies.append(
            CopyInstruction(command.start_line, command.cmd.upper(), tuple(sources), normalized, chmod)
        )

    def _program(self, command: dockerfile.Command) -> None:
        if command.json:
            words = list(command.value)
        else:
            line = " ".join(command.value).strip()
            if line.startswith("["):
                raise self.fail(command, "looks like the exec form but is not a valid JSON array of strings")
            try:
                words = shlex.split(line)
            except ValueError as exc:
                raise self.fail(command, f"cannot split into words: {exc}") from None
        if command.cmd.upper() == "ENTRYPOINT":
            self.recipe.entrypoint = words
            self.recipe.shell_entrypoint = not command.json
        else:
            self.recipe.cmd = words

    def _pairs(self, command: dockerfile.Command) -> list[tuple[str, str]]:
        values = list(command.value)
        if len(values) % 2:
            raise self.fail(command, "expected KEY=VALUE pairs")
        return [
            (self.expand(command, values[i]), self.expand(command, values[i + 1])) for i in range(0, len(values), 2)
        ]

    def _env(self, command: dockerfile.Command) -> None:
        for key, value in self._pairs(command):
            if not key or "=" in key:
                raise self.fail(command, f"bad variable name {key!r}")
            self.recipe.env[key] = value

    def _label(self, command: dockerfile.Command) -> None:
        for key, value in self._pairs(command):
            if not key:
                raise self.fail(command, "empty label key")
            self.recipe.labels[key] = value

    def _workdir(self, command: dockerfile.Command) -> None:
        words = [self.expand(command, word) for word in command.value]
        if len(words) != 1 or not words[0]:
            raise self.fail(command, "expected one directory")
        path = posixpath.normpath(posixpath.join(self.recipe.working_dir or "/", words[0]))
        self.recipe.working_dir = path
        if path != "/":
            self.recipe.workdirs.append(path)
