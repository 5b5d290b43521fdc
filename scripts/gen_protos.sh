#!/usr/bin/env bash
# Regenerates the committed Python stubs (with mypy typing stubs) from protos/.
# Every generated module lives under one generated folder, fibemrss/api/: the proto package
# fibemrss.emr.v1 (protos/fibemrss/emr/v1) becomes the Python package fibemrss.api.emr.v1. The wire
# names (proto packages, gRPC service names) stay as the protos say; only the Python imports that
# protoc writes are moved under api.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-.}  # another folder, to compare with the committed stubs (see check_stubs.sh)
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
mapfile -t files < <(find protos -name '*.proto' | sort)
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out="$gen" --grpc_python_out="$gen" \
  --mypy_out=quiet:"$gen" --mypy_grpc_out=quiet:"$gen" \
  "${files[@]}"
# protoc names modules after the proto paths (fibemrss.emr.v1...): point them at fibemrss.api.
find "$gen" -name '*_pb2*.py*' -print0 |
  xargs -0 perl -pi -e 's/(?<![\w.\/])fibemrss\.(emr|federation|inference|kserve)\.(v\d+)(?=\s+import|\.\w+_pb2)/fibemrss.api.$1.$2/g'
mkdir -p "$OUT/fibemrss/api"
[ -f "$OUT/fibemrss/api/__init__.py" ] || printf '"""Generated gRPC and protobuf stubs (scripts/gen_protos.sh); never edited by hand."""\n' > "$OUT/fibemrss/api/__init__.py"
for f in "${files[@]}"; do
  rel=${f#protos/fibemrss/}          # emr/v1/emr.proto
  d=$(dirname "$rel")
  mkdir -p "$OUT/fibemrss/api/$d"
  base=$(basename "$f" .proto)
  for g in "$gen/fibemrss/$d/${base}"_pb2*; do cp "$g" "$OUT/fibemrss/api/$d/"; done
  # Every generated folder must be an importable package.
  while [ "$d" != "." ]; do
    [ -f "$OUT/fibemrss/api/$d/__init__.py" ] || : > "$OUT/fibemrss/api/$d/__init__.py"
    d=$(dirname "$d")
  done
done
