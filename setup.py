"""Builds kwasm's one C extension (the engine's wake-up hot path, native/); everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kwasm.runtime._native",
            ["native/cells.c", "native/hostcalls.c", "native/timers.c", "native/module.c"],
            depends=["native/kwasm_native.h"],
            include_dirs=["native"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
