#!/usr/bin/env bash
# Fails when the committed stubs differ from what the protos generate (stale stubs).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bash scripts/gen_protos.sh "$tmp"
status=0
while IFS= read -r f; do
  rel=${f#"$tmp"/}
  if ! cmp -s "$f" "$rel"; then
    echo "stale or missing generated stub: $rel (run: make protos)" >&2
    status=1
  fi
done < <(find "$tmp" -name '*_pb2*.py*' | sort)
[ $status -eq 0 ] && echo "generated stubs are up to date"
exit $status
