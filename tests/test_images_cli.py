"""The image commands as a user drives them: build, images, inspect, tag, rmi, save, load.

The quick start and the Docker hand-over run as real ``kwasm`` processes; the rest go through the same
``kwasm.cli.main.main`` in-process (argv, exit code, stdout and stderr as a process would show them),
which keeps these tests quick on a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import KwasmRunner
from services import RunningDockerd
from test_build import DEMO_DIR, DEMO_WASM

from kwasm.cli.main import main
from kwasm.image.builder import build_from_wasm
from kwasm.image.reference import Reference
from kwasm.image.store import ImageStore


@pytest.fixture
def cli(kwasm_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> KwasmRunner:
    """Run ``kwasm ARGS...`` through ``kwasm.cli.main.main`` in this process, against the private root."""

    def run(*args: str, check: bool = False, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "argv", ["kwasm", *args])
        capsys.readouterr()
        code: int = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        out, err = capsys.readouterr()
        if check and code != 0:
            raise AssertionError(f"kwasm {' '.join(args)} exited {code}:\n{err}")
        return subprocess.CompletedProcess(["kwasm", *args], code, out, err)

    return run


def snapshot(root: Path) -> dict[str, bytes]:
    """The store's files (without staging dir and lock): equal snapshots mean 'store unchanged'."""
    if not root.exists():
        return {}
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.parts[len(root.parts)] not in ("tmp", ".lock")
    }


def test_quick_start_build_names_the_image_after_the_directory(kwasm: KwasmRunner, kwasm_root: Path) -> None:
    built = kwasm("build", str(DEMO_DIR), "--json", check=True)
    result = json.loads(built.stdout)
    assert result["reference"] == "wasi-demo-app:latest"
    assert result["manifest_digest"].startswith("sha256:") and result["size"] > DEMO_WASM.stat().st_size
    summary = [line for line in built.stderr.splitlines() if line.strip()]
    assert len(summary) == 1 and summary[0].startswith("Built wasi-demo-app:latest sha256:")

    listed = json.loads(kwasm("images", "--json", check=True).stdout)
    assert [(i["reference"], i["platform"], i["manifest_digest"]) for i in listed] == [
        ("wasi-demo-app:latest", "wasip1/wasm", result["manifest_digest"])
    ]
    table = kwasm("images", check=True).stdout
    assert "wasi-demo-app" in table and "latest" in table and result["config_digest"][7:19] in table

    (details,) = json.loads(kwasm("inspect", "wasi-demo-app", check=True).stdout)
    assert details["entrypoint"] == ["/wasi-demo-app.wasm"]
    assert details["id"] == result["config_digest"]
    store = ImageStore(kwasm_root)
    assert store.module_path(store.resolve("wasi-demo-app:latest")).read_bytes() == DEMO_WASM.read_bytes()

    missing = kwasm("inspect", "nosuch:1")
    assert missing.returncode == 3
    assert missing.stderr.strip() == "error: image nosuch:1 is not in the local store"


def test_wasm_flag_builds_without_a_dockerfile_and_writes_both_outputs(
    cli: KwasmRunner, kwasm_root: Path, tmp_path: Path
) -> None:
    app = tmp_path / "app.wasm"
    shutil.copy(DEMO_WASM, app)
    out = tmp_path / "app.tar"
    layout = tmp_path / "layout"
    cli("build", "--wasm", str(app), "-t", "app:1", "-o", str(out), "--oci-dir", str(layout), check=True)
    inspected = json.loads(
        subprocess.run(["skopeo", "inspect", "--config", f"oci-archive:{out}"], capture_output=True, check=True).stdout
    )
    assert inspected["config"]["Entrypoint"] == ["/app.wasm"]
    assert (layout / "index.json").is_file()
    again = json.loads(cli("build", "--wasm", str(app), "-t", "app:2", "--json", check=True).stdout)
    assert again["manifest_digest"] == json.loads(cli("inspect", "app:1", check=True).stdout)[0]["manifest_digest"]


def test_source_date_epoch_sets_created(cli: KwasmRunner) -> None:
    cli("build", "--wasm", str(DEMO_WASM), "-t", "dated", env={"SOURCE_DATE_EPOCH": "86400"}, check=True)
    assert json.loads(cli("inspect", "dated", check=True).stdout)[0]["created"] == "1970-01-02T00:00:00Z"


def test_tag_rmi_save_load_cycle(cli: KwasmRunner, kwasm_root: Path, tmp_path: Path) -> None:
    cli("build", str(DEMO_DIR), check=True)
    cli("tag", "wasi-demo-app:latest", "127.0.0.1:5000/team/demo:v1", check=True)
    names = {i["reference"] for i in json.loads(cli("images", "--json", check=True).stdout)}
    assert names == {"wasi-demo-app:latest", "127.0.0.1:5000/team/demo:v1"}

    archive = tmp_path / "saved.tar"
    cli("save", "wasi-demo-app:latest", "127.0.0.1:5000/team/demo:v1", "-o", str(archive), check=True)
    image_id = json.loads(cli("inspect", "wasi-demo-app", check=True).stdout)[0]["id"][7:19]
    removed = cli("rmi", image_id, check=True)  # by ID: every name goes, and the blobs with them
    assert (
        "Untagged: wasi-demo-app:latest" in removed.stderr and "Untagged: 127.0.0.1:5000/team/demo:v1" in removed.stderr
    )
    assert json.loads(cli("images", "--json", check=True).stdout) == []
    assert not any((kwasm_root / "blobs" / "sha256").iterdir())

    loaded = json.loads(cli("load", "-i", str(archive), "--json", check=True).stdout)
    assert sorted(loaded[0]["references"]) == ["127.0.0.1:5000/team/demo:v1", "wasi-demo-app:latest"]
    cli("rmi", "127.0.0.1:5000/team/demo:v1", check=True)  # by name: only that name goes
    assert [i["reference"] for i in json.loads(cli("images", "--json", check=True).stdout)] == ["wasi-demo-app:latest"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["inspect", "nosuch:1"], 3, "image nosuch:1 is not in the local store"),
        (["save", "nosuch:1", "-o", "{tmp}/x.tar"], 3, "nosuch:1"),
        (["rmi", "nosuch:1"], 3, "nosuch:1"),
        (["tag", "nosuch:1", "other:1"], 3, "nosuch:1"),
        (["build", "--wasm", "{tmp}/not.wasm", "-t", "bad:1"], 4, "not a WebAssembly binary"),
        (["build", "--wasm", "{tmp}/cut.wasm", "-t", "bad:1"], 4, "truncated module"),
        (["build", "{tmp}/ctx", "-t", "bad:1"], 4, "line 2: RUN"),
        (["build", "--wasm", "{demo}", "--platform", "windows/amd64"], 2, "unsupported platform"),
        (["build", "--wasm", "{demo}", "-t", "Bad Name"], 2, "invalid image reference"),
        (["load", "-i", "{tmp}/evil.tar"], 4, "would land outside the target"),
        (["save", "existing:1"], 2, "-o IMAGE.tar"),
        (["build", "--wasm", "{demo}", "-t", "new:1", "-o", "{tmp}/missing/x.tar"], 3, "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_store_unchanged(
    cli: KwasmRunner, kwasm_root: Path, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    (tmp_path / "not.wasm").write_text("#!/bin/sh\n")
    (tmp_path / "cut.wasm").write_bytes(DEMO_WASM.read_bytes()[:4096])
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM scratch\nRUN make\n")
    with tarfile.open(tmp_path / "evil.tar", "w") as evil:
        evil.addfile(tarfile.TarInfo("../../evil"))
    build_from_wasm(ImageStore(kwasm_root), DEMO_WASM, [Reference.parse("existing:1")])
    before = snapshot(kwasm_root)

    result = cli(*[arg.format(tmp=tmp_path, demo=DEMO_WASM) for arg in args])
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert snapshot(kwasm_root) == before
    assert not (tmp_path / "x.tar").exists()


def test_every_command_has_help_with_an_example(cli: KwasmRunner) -> None:
    for command in ("build", "images", "inspect", "tag", "rmi", "save", "load"):
        shown = cli(command, "--help", check=True).stdout
        assert "Example" in shown and f"kwasm {command}" in shown, command


def test_two_kwasm_processes_build_into_one_store_at_once(kwasm_root: Path) -> None:
    env = {**os.environ, "KWASM_ROOT": str(kwasm_root)}
    builds = [
        subprocess.Popen(
            [sys.executable, "-m", "kwasm.cli.main", "build", "--wasm", str(DEMO_WASM),
             "-t", f"app:{platform.replace('/', '-')}", "--platform", platform],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for platform in ("wasip1/wasm", "linux/amd64", "wasi/wasm")
    ]  # fmt: skip
    for process in builds:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    store = ImageStore(kwasm_root)
    assert sorted(image.config.platform for image in store.images()) == ["linux/amd64", "wasi/wasm", "wasip1/wasm"]
    for image in store.images():
        assert store.module_path(image).read_bytes() == DEMO_WASM.read_bytes()


def test_build_load_docker_and_load_into_docker(kwasm: KwasmRunner, dockerd: RunningDockerd) -> None:
    env = {"DOCKER_HOST": dockerd.base_url}  # the fixture also sets it for the docker CLI below
    args = ("build", "--wasm", str(DEMO_WASM), "-t", "demo:amd64", "--platform", "linux/amd64")
    built = json.loads(kwasm(*args, "--load", "docker", "--json", env=env, check=True).stdout)
    assert built["docker_image_id"] == built["config_digest"]
    again = kwasm("load", "--into", "docker", "demo:amd64", "--json", env=env, check=True)
    assert json.loads(again.stdout) == [{"reference": "demo:amd64", "docker_image_id": built["config_digest"]}]
    engine = subprocess.run(["docker", "image", "inspect", "demo:amd64"], capture_output=True, text=True)
    assert json.loads(engine.stdout)[0]["Config"]["Entrypoint"] == ["/wasi-demo-app.wasm"]

    refused = kwasm("build", str(DEMO_DIR), "--load", "docker", env=env)  # wasip1/wasm: classic store says no
    assert refused.returncode == 10
    assert "--platform linux/amd64" in " ".join(refused.stderr.split()) and "Traceback" not in refused.stderr
    misuse = kwasm("load", "--into", "docker", "-i", "x.tar", env=env)
    assert misuse.returncode == 2 and "docker load -i" in misuse.stderr


def test_build_arg_takes_a_value_or_copies_it_from_the_callers_environment(
    kwasm: KwasmRunner, tmp_path: Path
) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    shutil.copy(DEMO_WASM, context / "app.wasm")
    (context / "Dockerfile").write_text(
        "FROM scratch\nARG MODE\nARG REGION\nARG UNSET=default\n"
        'ENV MODE=$MODE REGION=$REGION UNSET=$UNSET\nADD app.wasm /\nENTRYPOINT ["/app.wasm"]\n'
    )
    kwasm(
        "build", str(context), "-t", "args:1", "--build-arg", "MODE=fast", "--build-arg", "REGION",
        "--build-arg", "UNSET", env={"REGION": "eu-west"}, check=True,
    )
    (details,) = json.loads(kwasm("inspect", "args:1", check=True).stdout)
    assert details["env"] == ["MODE=fast", "REGION=eu-west", "UNSET=default"]
    refused = kwasm("build", str(context), "-t", "args:2", "--build-arg", "=x")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "error: --build-arg takes KEY=VALUE, not '=x'"


def test_a_corrupt_image_is_reported_not_fatal_and_can_be_removed(
    cli: KwasmRunner, kwasm_root: Path, tmp_path: Path
) -> None:
    cli("build", str(DEMO_DIR), "-t", "good:1", check=True)
    other = tmp_path / "other.wasm"  # another entrypoint name, so the two images share no config
    shutil.copy(DEMO_WASM, other)
    built = json.loads(cli("build", "--wasm", str(other), "-t", "bad:1", "--json", check=True).stdout)
    bad_config = kwasm_root / "blobs" / "sha256" / built["config_digest"].removeprefix("sha256:")
    bad_config.write_bytes(b"{not json")

    listed = cli("images", "--json", check=True)
    assert [image["reference"] for image in json.loads(listed.stdout)] == ["good:1"]
    assert listed.stderr.strip() == (
        f"warning: bad:1 cannot be read: stored blob {built['config_digest']} is corrupt (content does not match"
        " its digest) (remove it with: kwasm rmi bad:1)"
    )

    removed = cli("rmi", "bad:1", check=True)
    assert removed.stderr.strip() == "Untagged: bad:1"
    after = cli("images", "--json", check=True)
    assert [image["reference"] for image in json.loads(after.stdout)] == ["good:1"] and after.stderr == ""
    assert not bad_config.exists(), "the broken image's blobs are collected once nothing names it"
    assert cli("run", "good:1", "--", "echo", "still here").returncode == 0
