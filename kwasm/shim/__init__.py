"""containerd shim v2 (``containerd-shim-kwasm-v1``): containerd 1.6+ runs wasm tasks in one shared sandboxer."""
