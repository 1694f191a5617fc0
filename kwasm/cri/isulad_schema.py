"""Value types iSulad's daemon.json parser demands, and iSulad's shipped default file.

iSulad parses ``/etc/isulad/daemon.json`` with C code generated from lcr's
``isulad-daemon-configs.json`` schema: unknown keys are ignored, but one value of the wrong
JSON type makes the whole file fail to load and iSulad refuses to start. :func:`type_errors`
checks every key the schema knows against the type it declares.
"""

from __future__ import annotations

from typing import Any

# A value type: a scalar name, ("array", item), ("map", value) or ("object", {field: type}).
ValueType = str | tuple[str, Any]

_STR = "string"
_BOOL = "boolean"
_INT = "integer"
_UINT = "unsigned integer"
_STRINGS: ValueType = ("array", _STR)
_STRING_MAP: ValueType = ("map", _STR)

DAEMON_JSON_TYPES: dict[str, ValueType] = {
    "hosts": _STRINGS,
    "default-runtime": _STR,
    "group": _STR,
    "graph": _STR,
    "state": _STR,
    "log-level": _STR,
    "log-driver": _STR,
    "log-opts": _STRING_MAP,
    "cri-sandboxers": ("map", ("object", {"name": _STR, "address": _STR, "image-type": _STR})),
    "cri-runtimes": _STRING_MAP,
    "container-log": ("object", {"driver": _STR, "opts": _STRING_MAP}),
    "storage-driver": _STR,
    "storage-opts": _STRINGS,
    "storage-enable-remote-layer": _BOOL,
    "pidfile": _STR,
    "engine": _STR,
    "hook-spec": _STR,
    "start-timeout": _STR,
    "enable-plugins": _STR,
    "userns-remap": _STR,
    "cpu-rt-period": _INT,
    "cpu-rt-runtime": _INT,
    "sup-groups": ("array", _UINT),
    "registry-mirrors": _STRINGS,
    "insecure-registries": _STRINGS,
    "native.umask": _STR,
    "pod-sandbox-image": _STR,
    "network-plugin": _STR,
    "cni-bin-dir": _STR,
    "cni-conf-dir": _STR,
    "nri-support": _BOOL,
    "disable-connections": _BOOL,
    "plugin-config-path": _STR,
    "plugin-path": _STR,
    "nri-socket-path": _STR,
    "plugin-registration-timeout": _UINT,
    "plugin-requst-timeout": _UINT,
    "image-layer-check": _BOOL,
    "use-decrypted-key": _BOOL,
    "insecure-skip-verify-enforce": _BOOL,
    "tls": _BOOL,
    "tls-verify": _BOOL,
    "tls-config": ("object", {"CAFile": _STR, "CertFile": _STR, "KeyFile": _STR}),
    "authorization-plugin": _STR,
    "cgroup-parent": _STR,
    "websocket-server-listening-port": _INT,
    "default-ulimits": ("map", ("object", {"Name": _STR, "Hard": _INT, "Soft": _INT})),
    "runtimes": ("map", ("object", {"path": _STR, "runtime-args": _STRINGS})),
    "selinux-enabled": _BOOL,
    "metrics-port": _INT,
    "enable-cri-v1": _BOOL,
    "systemd-cgroup": _BOOL,
    "enable-pod-events": _BOOL,
    "cdi-spec-dirs": _STRINGS,
    "enable-cdi": _BOOL,
}

# iSulad's src/contrib/config/daemon.json, which its RPM installs as /etc/isulad/daemon.json.
SHIPPED_DEFAULT: dict[str, Any] = {
    "group": "isula",
    "default-runtime": "runc",
    "graph": "/var/lib/isulad",
    "state": "/var/run/isulad",
    "log-level": "ERROR",
    "pidfile": "/var/run/isulad.pid",
    "log-opts": {"log-file-mode": "0600", "log-path": "/var/lib/isulad", "max-file": "1", "max-size": "30KB"},
    "log-driver": "stdout",
    "container-log": {"driver": "json-file"},
    "hook-spec": "/etc/default/isulad/hooks/default.json",
    "start-timeout": "2m",
    "storage-driver": "overlay2",
    "storage-opts": ["overlay2.override_kernel_check=true"],
    "registry-mirrors": [],
    "insecure-registries": [],
    "pod-sandbox-image": "",
    "native.umask": "normal",
    "network-plugin": "",
    "cni-bin-dir": "",
    "cni-conf-dir": "",
    "image-layer-check": False,
    "use-decrypted-key": True,
    "insecure-skip-verify-enforce": False,
    "cri-runtimes": {"kata": "io.containerd.kata.v2"},
}


def _describe(value_type: ValueType) -> str:
    if isinstance(value_type, str):
        return value_type
    kind, inner = value_type
    if kind == "array":
        return f"array of {_describe(inner)}"
    if kind == "map":
        return f"object of {_describe(inner)} values"
    return "object"


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _matches_scalar(value: Any, scalar: str) -> bool:
    if scalar == _STR:
        return isinstance(value, str)
    if scalar == _BOOL:
        return isinstance(value, bool)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if scalar == _UINT:
        return is_int and value >= 0
    return is_int


def _check(path: str, value: Any, value_type: ValueType, errors: list[str]) -> None:
    if isinstance(value_type, str):
        if not _matches_scalar(value, value_type):
            errors.append(f"{path}: expected {value_type}, found {_json_kind(value)} {value!r}")
        return
    kind, inner = value_type
    expected_container = list if kind == "array" else dict
    if not isinstance(value, expected_container):
        errors.append(f"{path}: expected {_describe(value_type)}, found {_json_kind(value)} {value!r}")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check(f"{path}[{index}]", item, inner, errors)
    elif kind == "map":
        for key, item in value.items():
            _check(f"{path}.{key}", item, inner, errors)
    else:
        for key, item in value.items():
            if key in inner:
                _check(f"{path}.{key}", item, inner[key], errors)


def type_errors(config: dict[str, Any]) -> list[str]:
    """Every value in ``config`` whose JSON type iSulad's parser would reject, as ``key: reason`` lines."""
    errors: list[str] = []
    for key, value in config.items():
        if key in DAEMON_JSON_TYPES:
            _check(key, value, DAEMON_JSON_TYPES[key], errors)
    return errors
