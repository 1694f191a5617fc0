"""Builds kwasm's one C extension (the engine's wake-up hot path); everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kwasm.runtime._native",
            ["kwasm/runtime/_native.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
