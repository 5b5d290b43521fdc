#!/usr/bin/env bash
# Prepares the wheelhouse the image build installs from (the build itself has no network):
# the project as a wheel plus every dependency, resolved with the project's constraints.txt.
# Usage: bash deploy/images/wheelhouse.sh [DIR]   (DIR defaults to var/wheelhouse)
# The wheels must fit the image's Python: CPython 3.11 on glibc x86_64 (Debian 12's python3 and
# python:3.11-slim-bookworm both are). A wheel of the project is rebuilt every run, so the image
# always holds the working tree's code, whatever its package layout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
DIR="${1:-var/wheelhouse}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3.11 || command -v python3)"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "the wheelhouse needs CPython 3.11 (the images' Python)" >&2; exit 2; }
mkdir -p "$DIR"
rm -f "$DIR"/fibemrss-*.whl
# pip reuses the wheels already in DIR (--find-links) and fetches only what is missing.
"$PY" -m pip wheel --quiet --disable-pip-version-check -c constraints.txt \
  --find-links "$DIR" -w "$DIR" . 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
rm -rf build fibemrss.egg-info   # setuptools' leftovers of the project wheel
ls "$DIR"/fibemrss-0.1.0-*.whl >/dev/null
echo "wheelhouse $DIR: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1)"
