#!/usr/bin/env bash
# Regenerates metald/gen/ from proto/ with the official plugins (protoc-gen-py + protoc-gen-connectrpc)
# driven by grpcio-tools' protoc. Never edit metald/gen by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${VENV:-.venv}
GP=$("$V/bin/python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
rm -rf metald/gen && mkdir -p metald/gen
"$V/bin/python" -m grpc_tools.protoc -I proto -I "$GP" \
  --plugin=protoc-gen-py="$V/bin/protoc-gen-py" --py_out=metald/gen --py_opt=init_files=false \
  --plugin=protoc-gen-connectrpc="$V/bin/protoc-gen-connectrpc" --connectrpc_out=metald/gen \
  $(find proto -name '*.proto' | sort)
# Package markers only (init_files=false keeps protoc-gen-py from shadowing google.protobuf).
find metald/gen -type d -exec sh -c 'touch "$1/__init__.py"' _ {} \;
# A binary descriptor set for reflection-less tools (buf curl --schema, tests).
"$V/bin/python" -m grpc_tools.protoc -I proto -I "$GP" --include_imports \
  --descriptor_set_out=metald/gen/vmprovisioner.binpb $(find proto -name '*.proto' | sort)
