"""Kubernetes manifests for wasm pods: a ``RuntimeClass`` for the CRI handler and a sample Pod using it."""

from __future__ import annotations

import json
import re

from kwasm.errors import UsageError

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _quote(value: str) -> str:
    """A YAML scalar that stays a string (JSON string syntax is valid YAML)."""
    return json.dumps(value)


def runtimeclass_manifests(handler: str, name: str, image: str, args: list[str]) -> str:
    """A two-document YAML stream: RuntimeClass ``name`` → ``handler``, and a Pod that runs ``image`` with it.

    The Pod uses the host network, matching the wasm pods ``kwasm cri-config`` writes, and
    ``imagePullPolicy: IfNotPresent`` so an image loaded with ``isula load`` is used as is.
    """
    for label, value in (("--handler", handler), ("--name", name)):
        if not _DNS_LABEL.match(value):
            raise UsageError(f"{label} {value!r} must be a DNS label (lowercase letters, digits, '-')")
    args_yaml = "[" + ", ".join(_quote(arg) for arg in args) + "]"
    return (
        "apiVersion: node.k8s.io/v1\n"
        "kind: RuntimeClass\n"
        "metadata:\n"
        f"  name: {name}\n"
        f"handler: {handler}  # a key of cri-runtimes and cri-sandboxers in iSulad's daemon.json\n"
        "---\n"
        "apiVersion: v1\n"
        "kind: Pod\n"
        "metadata:\n"
        f"  name: {name}-demo\n"
        "spec:\n"
        f"  runtimeClassName: {name}\n"
        "  hostNetwork: true\n"
        "  restartPolicy: Never\n"
        "  containers:\n"
        f"    - name: {name}-demo\n"
        f"      image: {_quote(image)}\n"
        "      imagePullPolicy: IfNotPresent\n"
        f"      args: {args_yaml}\n"
    )
