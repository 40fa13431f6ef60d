#!/usr/bin/env bash
# The one way the committed stubs are made. tests/unit/test_proto_fresh.py fails when they are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -f proto/lepton/v1/*_pb2.py proto/lepton/v1/*_pb2_grpc.py proto/lepton/v1/*_pb2.pyi
"$PY" -m grpc_tools.protoc -I proto --python_out=proto --grpc_python_out=proto --pyi_out=proto proto/lepton/v1/*.proto
