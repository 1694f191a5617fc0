#!/usr/bin/env bash
# Rebuild wasi-demo-app.wasm from src/main.rs with Debian's rustc (packages: rustc libstd-rust-dev-wasm32).
# The rustup toolchain usually has no wasm32-wasi target, so this calls /usr/bin/rustc explicitly.
set -euo pipefail
cd "$(dirname "$0")"
RUSTC=${RUSTC:-/usr/bin/rustc}
"$RUSTC" --target wasm32-wasi -C opt-level=s -C lto -C strip=symbols -C codegen-units=1 --edition 2021 \
  -o wasi-demo-app.wasm src/main.rs
ls -l wasi-demo-app.wasm
