#!/usr/bin/env bash
# Rebuild kwasm's C extension next to its source without disturbing running processes: the new .so
# is built elsewhere and renamed into place (a process that loaded the old one keeps its inode).
set -euo pipefail
cd "$(dirname "$0")/.."
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
python3 setup.py -q build_ext --build-lib "$build/lib" --build-temp "$build/tmp" 2>/dev/null
so=$(cd "$build/lib" && ls kwasm/runtime/_native*.so)
cp "$build/lib/$so" "$so.new" && mv -f "$so.new" "$so"
echo "built $so"
