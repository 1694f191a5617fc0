"""kwasm: package WebAssembly (WASI) programs as OCI images and run them as container sandboxes."""

__version__ = "0.1.0"
