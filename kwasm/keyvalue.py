"""``KEY=VALUE`` command-line pairs (``-e``, ``--build-arg``), parsed by one rule everywhere: Docker's.

``KEY=VALUE`` sets ``KEY``; a bare ``KEY`` takes its value from kwasm's own environment and is left
out when that has no ``KEY`` (as ``docker run -e KEY`` and ``docker build --build-arg KEY`` do).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from kwasm.errors import UsageError


def parse_pairs(values: Iterable[str], option: str, environment: Mapping[str, str] | None = None) -> dict[str, str]:
    """``values`` as a dict; a bare ``KEY`` reads ``environment`` (default: ``os.environ``)."""
    source = os.environ if environment is None else environment
    pairs: dict[str, str] = {}
    for value in values:
        key, equals, setting = value.partition("=")
        if not key:
            raise UsageError(f"{option} takes KEY=VALUE, not {value!r}")
        if equals:
            pairs[key] = setting
        elif key in source:
            pairs[key] = source[key]
    return pairs
