#!/usr/bin/env bash
# Regenerates the committed Python stubs (with mypy typing stubs) from protos/.
# The proto folder path equals the Python package path, so fibemrss.emr.v1 lands in fibemrss/emr/v1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-.}  # another folder, to compare with the committed stubs (see check_stubs.sh)
mkdir -p "$OUT"
mapfile -t files < <(find protos -name '*.proto' | sort)
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  --mypy_out=quiet:"$OUT" --mypy_grpc_out=quiet:"$OUT" \
  "${files[@]}"
# Every generated folder must be an importable package.
for f in "${files[@]}"; do
  d=$(dirname "${f#protos/}")
  while [ "$d" != "." ]; do
    [ -f "$OUT/$d/__init__.py" ] || : > "$OUT/$d/__init__.py"
    d=$(dirname "$d")
  done
done
