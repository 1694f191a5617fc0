"""The Dockerfile subset: what kwasm build accepts, how words expand, and what it refuses (with line numbers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kwasm.errors import DockerfileError, NotFoundError
from kwasm.image.dockerfile import expand_word, parse_dockerfile, read_dockerfile


def test_every_supported_instruction_lands_in_the_recipe() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=scratch\n"
        "FROM ${BASE} AS wasm\n"
        "ARG VERSION=1.0\n"
        "ARG BASE\n"
        "LABEL org.opencontainers.image.version=$VERSION \"quoted key\"='single $VERSION'\n"
        'ENV GREETING="hello world" TARGET=${UNSET:-fallback}\n'
        "ENV LEGACY value with spaces\n"
        "WORKDIR /srv\n"
        "WORKDIR app\n"
        "COPY --chmod=0700 bin/*.wasm ./bin/\n"
        'ADD ["data dir", "/data/"]\n'
        'ENTRYPOINT ["/srv/app/bin/main.wasm"]\n'
        "CMD serve --port \"8080\" 'a b'\n"
    )
    recipe = parse_dockerfile(text, "Dockerfile", {})
    assert recipe.labels == {"org.opencontainers.image.version": "1.0", "quoted key": "single $VERSION"}
    assert recipe.env == {"GREETING": "hello world", "TARGET": "fallback", "LEGACY": "value with spaces"}
    assert recipe.working_dir == "/srv/app"
    assert recipe.workdirs == ["/srv", "/srv/app"]
    assert [(c.instruction, c.sources, c.destination, c.chmod) for c in recipe.copies] == [
        ("COPY", ("bin/*.wasm",), "/srv/app/bin/", 0o700),
        ("ADD", ("data dir",), "/data/", None),
    ]
    assert recipe.entrypoint == ["/srv/app/bin/main.wasm"]
    assert recipe.cmd == ["serve", "--port", "8080", "a b"]


def test_build_args_override_defaults_and_meta_args_reach_the_stage() -> None:
    text = 'ARG NAME=meta\nFROM scratch\nARG NAME\nARG OTHER=default\nENV N=$NAME O=$OTHER\nCMD ["/x.wasm"]\n'
    assert parse_dockerfile(text, "Dockerfile", {}).env == {"N": "meta", "O": "default"}
    assert parse_dockerfile(text, "Dockerfile", {"OTHER": "given", "NAME": "cli"}).env == {"N": "cli", "O": "given"}


def test_meta_args_are_invisible_after_from_unless_redeclared() -> None:
    text = 'ARG NAME=meta\nFROM scratch\nENV N="[$NAME]"\n'
    assert parse_dockerfile(text, "Dockerfile", {}).env == {"N": "[]"}


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("plain", "plain"),
        ('"double $A"', "double 1"),
        ("'single $A'", "single $A"),
        ("esc\\$A", "esc$A"),
        ("${A}x${B}", "1x"),
        ("${B:-dflt}", "dflt"),
        ("${A:+alt}${B:+never}", "alt"),
        ('"keep \\n backslash"', "keep \\n backslash"),
        ("a\\ b", "a b"),
        ("cost$", "cost$"),
        ("${B:-${A}}/x", "1/x"),
        ("${A:+[${A}]}", "[1]"),
    ],
)
def test_word_expansion_follows_docker(word: str, expected: str) -> None:
    assert expand_word(word, {"A": "1"}) == expected


def test_escape_directive_changes_the_escape_character() -> None:
    text = "# escape=`\nFROM scratch\nENV P=C:\\dir\\sub Q=`$HOME\nCOPY a `\n  b/\n"
    recipe = parse_dockerfile(text, "Dockerfile", {})
    assert recipe.env == {"P": "C:\\dir\\sub", "Q": "$HOME"}
    assert recipe.copies[0].destination == "/b/"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("FROM alpine:3.19\n", 1, "built FROM scratch"),
        ("FROM scratch\nRUN cargo build\n", 2, "no shell"),
        ("ARG A\nCOPY a b\nFROM scratch\n", 2, "must come after FROM"),
        ("FROM scratch\nFROM scratch\n", 2, "multi-stage"),
        ("FROM scratch\nCOPY --from=build /a /b\n", 2, "multi-stage"),
        ("FROM scratch\nEXPOSE 8080\n", 2, "ports"),
        ("FROM scratch\nUSER nobody\n", 2, "no users"),
        ("FROM scratch\nFROBNICATE x\n", 2, "unknown instruction"),
        ("FROM scratch\nADD https://example.com/app.wasm /\n", 2, "remote source"),
        ("FROM scratch\nCOPY a.wasm b.wasm /dir\n", 2, "must be a directory ending in /"),
        ("FROM scratch\nCOPY --chown=1000:1000 a /\n", 2, "owned by 0:0"),
        ('FROM scratch\nENTRYPOINT ["/app.wasm"\n', 2, "not a valid JSON array"),
        ('FROM scratch\nENV A="unterminated\n', 2, "unterminated"),
        ("FROM scratch\nCOPY <<EOF /x\nhi\nEOF\n", 2, "heredocs"),
        ("FROM --platform=linux/amd64 scratch\n", 1, "--platform"),
        ("FROM scratch\nCMD --port 8080\n", 2, "unknown flag --port"),
    ],
)
def test_refusals_name_the_line_and_the_reason(text: str, line: int, reason: str) -> None:
    with pytest.raises(DockerfileError) as caught:
        parse_dockerfile(text, "ctx/Dockerfile", {})
    message = str(caught.value)
    assert f"ctx/Dockerfile, line {line}:" in message
    assert reason in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "no instructions"), ("# only a comment\n", "no instructions"), ("ARG X=1\n", "no FROM line")],
)
def test_a_dockerfile_without_from_is_refused(text: str, reason: str) -> None:
    with pytest.raises(DockerfileError, match=reason):
        parse_dockerfile(text, "Dockerfile", {})


def test_missing_dockerfile_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no Dockerfile at"):
        read_dockerfile(tmp_path / "Dockerfile")


def test_shell_form_entrypoint_makes_the_image_ignore_cmd_as_docker_does() -> None:
    shell = parse_dockerfile("FROM scratch\nCMD [\"daemon\"]\nENTRYPOINT /app.wasm echo 'hi there'\n", "Dockerfile", {})
    assert shell.entrypoint == ["/app.wasm", "echo", "hi there"]
    assert shell.cmd == []
    exec_form = parse_dockerfile('FROM scratch\nENTRYPOINT ["/app.wasm"]\nCMD daemon\n', "Dockerfile", {})
    assert exec_form.cmd == ["daemon"]
