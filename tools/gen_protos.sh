#!/usr/bin/env bash
# The one way generated protobuf code is made: from protos/ into keysvc/v1/.
# `tools/gen_protos.sh --check` regenerates into a temporary folder and fails
# when the committed code differs (CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=.
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/keysvc/v1"
"$python" -m grpc_tools.protoc -I protos \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  protos/keysvc/v1/*.proto
if [ "${1:-}" = "--check" ]; then
  for f in "$out"/keysvc/v1/*.py "$out"/keysvc/v1/*.pyi; do
    name=keysvc/v1/$(basename "$f")
    if ! cmp -s "$f" "$name"; then
      echo "generated code is stale: $name differs from protos/ (run tools/gen_protos.sh)" >&2
      exit 1
    fi
  done
  for f in keysvc/v1/*_pb2*.py keysvc/v1/*_pb2*.pyi; do
    [ -e "$out/$f" ] || { echo "generated code is stale: $f has no proto" >&2; exit 1; }
  done
  echo "generated code is up to date"
fi
