#!/usr/bin/env bash
# Builds the separate virtualenv in which `fibemrss bench round --flower` runs Flower's own
# SuperLink and SuperNodes (the bench extra). Separate because flwr needs protobuf < 7 and the
# project needs protobuf >= 7.35. Idempotent; needs PyPI once.
#   usage: scripts/flower_venv.sh [DIR]   (default var/flower-venv); prints DIR/bin
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-var/flower-venv}
PINS=("flwr==1.42.0" "numpy>=2,<3")
STAMP="$DIR/.pins"
if [ -x "$DIR/bin/flwr" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "${PINS[*]}" ]; then
  echo "$DIR/bin"
  exit 0
fi
BOOT=${FLOWER_VENV_PYTHON:-$(command -v python3.11 || command -v python3)}
rm -rf "$DIR"
"$BOOT" -m venv "$DIR"
"$DIR/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
printf '%s' "${PINS[*]}" > "$STAMP"
echo "$DIR/bin"
