"""Interop with skopeo through a real registry, both ways."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import DEMO_WASM, KwasmRunner
from services import RunningRegistry

from kwasm.image.builder import build_from_wasm
from kwasm.image.reference import Reference
from kwasm.image.store import ImageStore


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("form", ["image", "artifact"])
def test_skopeo_reads_what_kwasm_pushed(
    registry: RunningRegistry, kwasm: KwasmRunner, kwasm_root: Path, tmp_path: Path, form: str
) -> None:
    built = build_from_wasm(
        ImageStore(kwasm_root), DEMO_WASM, [Reference.parse("demo:1")], artifact=form == "artifact"
    ).to_json()
    kwasm("push", "demo:1", registry.ref("demo", "1"), check=True)

    layout = tmp_path / "copied"
    _skopeo(
        "copy", "--preserve-digests", "--src-tls-verify=false",
        f"docker://{registry.ref('demo', '1')}", f"oci:{layout}:copied",
    )  # fmt: skip

    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == built["manifest_digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / built["manifest_digest"][7:]).read_text())
    assert manifest["config"]["digest"] == built["config_digest"]
    if form == "artifact":
        assert manifest["layers"][0]["mediaType"] == "application/wasm"
        module = layout / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]
        assert module.read_bytes() == DEMO_WASM.read_bytes()
    else:
        inspected = json.loads(
            _skopeo("inspect", "--config", "--tls-verify=false", f"docker://{registry.ref('demo', '1')}").stdout
        )
        assert inspected["os"] == "wasip1" and inspected["architecture"] == "wasm"
        assert inspected["config"]["Entrypoint"] == ["/wasi-demo-app.wasm"]


def test_kwasm_pulls_and_runs_what_skopeo_pushed(registry: RunningRegistry, kwasm: KwasmRunner, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    built = json.loads(
        kwasm("build", "--wasm", str(DEMO_WASM), "-t", "demo:7", "--oci-dir", str(layout), "--json", check=True).stdout
    )
    target = registry.ref("from-skopeo", "7")
    _skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:7", f"docker://{target}")
    # skopeo's usual copy gzips the layer: a different manifest, which kwasm must take as well
    gzipped = registry.ref("from-skopeo", "gzip")
    _skopeo("copy", "--dest-tls-verify=false", "--dest-compress", f"oci:{layout}:7", f"docker://{gzipped}")

    other_root = tmp_path / "puller"
    env = {"KWASM_ROOT": str(other_root)}
    pulled = json.loads(kwasm("pull", target, "--json", env=env, check=True).stdout)
    assert pulled["digest"] == built["manifest_digest"]
    kwasm("pull", gzipped, env=env, check=True)

    for ref in (target, gzipped):
        ran = kwasm("run", ref, "--", "echo", "hello", "from", "skopeo", env=env)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout == "hello from skopeo\n"
