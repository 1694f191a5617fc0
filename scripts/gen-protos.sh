#!/usr/bin/env bash
# Regenerate the Python modules (and .pyi stubs) for kwasm/api/*.proto. Run after editing a .proto.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m grpc_tools.protoc -I . \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  kwasm/api/*.proto
