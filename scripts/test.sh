#!/usr/bin/env bash
# Install everything the test suite needs (Debian packages + Python packages) and run it.
# Usage (as root, from the repository root):  ./scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  docker.io containerd docker-registry skopeo umoci buildah wabt apache2-utils
  rustc libstd-rust-dev-wasm32
  clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32
  nodejs
  gcc  # builds kwasm's C extension (native/*.c) during pip install
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "==> apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "==> pip install -e .[test]"
python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v -e '^WARNING' -e 'is ignored' || true

echo "==> ruff + mypy --strict"
python3 -m ruff check kwasm tests benchmarks
python3 -m mypy

echo "==> pytest"
exec python3 -m pytest "$@"
