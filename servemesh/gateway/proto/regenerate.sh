#!/usr/bin/env bash
# Regenerate the Python code for grpc_predict_v2.proto (the Open Inference Protocol / KServe v2 gRPC API):
# grpc_predict_v2_pb2.py, grpc_predict_v2_pb2.pyi and grpc_predict_v2_pb2_grpc.py, next to the .proto.
#
# protoc runs from the repo root with -I. so that the generated _pb2_grpc.py imports
# `from servemesh.gateway.proto import grpc_predict_v2_pb2`. Needs grpcio-tools (the dev extra);
# set PYTHON to pick the interpreter (default: python). tests/unit/test_gateway_proto.py checks
# that the checked-in files are what this produces.
#
# The generated code checks versions at import: grpcio >= the grpcio-tools that generated it and
# protobuf >= its gencode version. After regenerating with a newer grpcio-tools, raise the grpcio
# and protobuf lower bounds in pyproject.toml to match (see GRPC_GENERATED_VERSION in the _pb2_grpc.py
# and "Protobuf Python Version" in the _pb2.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
PYTHON="${PYTHON:-python}"
"$PYTHON" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
    servemesh/gateway/proto/grpc_predict_v2.proto
