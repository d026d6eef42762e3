#!/usr/bin/env bash
# Regenerate src/dist_exec/rpc/v1 from proto/. The generated files are committed; CI reruns this
# and fails when the result differs from what is committed (make proto-check).
set -euo pipefail
cd "$(dirname "$0")/.."
out=src/dist_exec/rpc/v1
find "$out" -name '*_pb2*' -delete
python -m grpc_tools.protoc -I proto \
  --python_out=src --pyi_out=src --grpc_python_out=src --mypy_grpc_out=src \
  proto/dist_exec/rpc/v1/*.proto
