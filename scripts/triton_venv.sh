#!/usr/bin/env bash
# Builds the separate virtualenv in which tests run NVIDIA's tritonclient (gRPC and HTTP) against our KServe API.
#
# Why separate: tritonclient needs protobuf < 7 and ships its own `inference` protos, while the
# project needs protobuf >= 7.35 and registers the same `inference.*` symbols; one process cannot
# hold both. Idempotent: reuses the venv while its pins are unchanged. Needs PyPI once.
#   usage: scripts/triton_venv.sh [DIR]   (default var/triton-venv); prints DIR/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-var/triton-venv}
PINS=("tritonclient[grpc,http]==2.73.0" "protobuf>=6.30,<7" "grpcio==1.85.1" "numpy>=2,<3")
STAMP="$DIR/.pins"
if [ -x "$DIR/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "${PINS[*]}" ]; then
  echo "$DIR/bin/python"
  exit 0
fi
# Any Python 3.11 will do; under `make` PATH starts with .venv/bin, whose python builds a venv
# on its base interpreter, not inside the project's venv.
BOOT=${TRITON_VENV_PYTHON:-$(command -v python3.11 || command -v python3)}
rm -rf "$DIR"
"$BOOT" -m venv "$DIR"
"$DIR/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
printf '%s' "${PINS[*]}" > "$STAMP"
echo "$DIR/bin/python"
