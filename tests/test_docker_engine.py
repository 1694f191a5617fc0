"""Loading kwasm images into a real Docker engine (Debian docker.io 20.10, private data root and socket)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import docker
import pytest
from conftest import DEMO_WASM, KwasmRunner
from services import RunningDockerd, free_port

from kwasm.errors import ToolMissingError
from kwasm.image.builder import build_from_wasm
from kwasm.image.docker_engine import load_into_docker
from kwasm.image.reference import Reference
from kwasm.image.store import ImageStore

DOCKERFILE = """\
FROM scratch
ADD wasi-demo-app.wasm /
ENV GREETING=hello
LABEL org.example.team=wasm
WORKDIR /
ENTRYPOINT ["/wasi-demo-app.wasm"]
CMD ["echo", "hi"]
"""


def _context(tmp_path: Path) -> Path:
    context = tmp_path / "context"
    context.mkdir()
    shutil.copy(DEMO_WASM, context / "wasi-demo-app.wasm")
    (context / "Dockerfile").write_text(DOCKERFILE)
    return context


def _client(engine: RunningDockerd) -> docker.DockerClient:
    return docker.DockerClient(base_url=engine.base_url, version="auto")


def _assert_our_config(attrs: dict[str, object], platform: tuple[str, str]) -> None:
    config = attrs["Config"]
    assert isinstance(config, dict)
    assert (attrs["Os"], attrs["Architecture"]) == platform
    assert config["Entrypoint"] == ["/wasi-demo-app.wasm"]
    assert config["Cmd"] == ["echo", "hi"]
    assert "GREETING=hello" in config["Env"]
    assert config["Labels"] == {"org.example.team": "wasm"}


def test_docker_loads_the_linux_amd64_tar_with_the_same_image_id(
    dockerd: RunningDockerd, kwasm: KwasmRunner, tmp_path: Path
) -> None:
    archive = tmp_path / "image.tar"
    built = json.loads(
        kwasm(
            "build", str(_context(tmp_path)), "-t", "demo:amd", "--platform", "linux/amd64",
            "-o", str(archive), "--json", check=True,
        ).stdout
    )  # fmt: skip

    client = _client(dockerd)
    with archive.open("rb") as data:
        loaded = client.images.load(data)

    assert [image.id for image in loaded] == [built["config_digest"]]
    assert "demo:amd" in loaded[0].tags
    _assert_our_config(client.api.inspect_image("demo:amd"), ("linux", "amd64"))


def test_build_load_docker_and_load_into_docker_show_our_config(
    dockerd: RunningDockerd, kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path
) -> None:
    built = json.loads(
        kwasm(
            "build", str(_context(tmp_path)), "-t", "demo:amd", "--platform", "linux/amd64",
            "--load", "docker", "--json", check=True,
        ).stdout
    )  # fmt: skip
    assert built["docker_image_id"] == built["config_digest"]
    client = _client(dockerd)
    client.images.remove("demo:amd")

    loaded = json.loads(kwasm("load", "--into", "docker", "demo:amd", "--json", check=True).stdout)

    store = ImageStore(kwasm_root)
    assert loaded == [{"reference": "demo:amd", "docker_image_id": store.resolve("demo:amd").config_digest}]
    attrs = client.api.inspect_image("demo:amd")
    assert attrs["Id"] == built["config_digest"] and attrs["RepoTags"] == ["demo:amd"]
    _assert_our_config(attrs, ("linux", "amd64"))
    assert load_into_docker(store, store.resolve("demo:amd")) == built["config_digest"]


@pytest.mark.parametrize("artifact", [False, True], ids=["wasip1-image", "artifact"])
def test_a_wasm_platform_refusal_says_why_and_what_to_do(
    dockerd: RunningDockerd, kwasm: KwasmRunner, kwasm_root: Path, artifact: bool
) -> None:
    build_from_wasm(ImageStore(kwasm_root), DEMO_WASM, [Reference.parse("demo:wasm")], artifact=artifact)

    refused = kwasm("load", "--into", "docker", "demo:wasm")

    assert refused.returncode == 10, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert "refused demo:wasm" in refused.stderr
    assert "--platform linux/amd64" in refused.stderr and "containerd image store" in refused.stderr
    assert _client(dockerd).images.list() == []
    store = ImageStore(kwasm_root)
    with pytest.raises(ToolMissingError, match="containerd image store"):
        load_into_docker(store, store.resolve("demo:wasm"))


def test_an_unreachable_engine_is_one_line(kwasm_root: Path, kwasm: KwasmRunner) -> None:
    build_from_wasm(ImageStore(kwasm_root), DEMO_WASM, [Reference.parse("demo:amd")], platform="linux/amd64")
    host = f"tcp://127.0.0.1:{free_port()}"

    result = kwasm("load", "--into", "docker", "demo:amd", env={"DOCKER_HOST": host})

    assert result.returncode == 10, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert f"cannot reach the Docker engine at {host}: connection refused" in result.stderr
