#!/usr/bin/env bash
# Builds the two local base images from Debian 12 packages, for machines that cannot reach a
# public image registry (real users build FROM python:3.11-slim-bookworm instead):
#   localhost/fibemrss-base:bookworm        Debian 12 minbase + python3 (3.11) + python3-venv
#   localhost/fibemrss-postgresql:15        Debian 12's postgresql (15) with deploy/images/postgresql
# mmdebstrap (from the Debian mirror the host's apt uses) -> rootfs.tar -> podman import.
# Usage: bash deploy/images/build_base.sh      (idempotent: an image already there is kept;
#        FORCE=1 rebuilds). Needs root, mmdebstrap and podman (or docker: ENGINE=docker).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/deploy/podman/containers.conf}"
ENGINE="${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}"
BASE="${BASE_IMAGE:-localhost/fibemrss-base:bookworm}"
PG="${PG_IMAGE:-localhost/fibemrss-postgresql:15}"
WORK="${WORK:-var/base-images}"
SUITE=bookworm
mkdir -p "$WORK"
# Keep documentation, man pages and locales out of the images.
SLIM=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
      --dpkgopt='path-exclude=/usr/share/info/*'
      --aptopt='APT::Install-Recommends "false"'
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*')
PATH_ENV="ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

have() { [[ -z "${FORCE:-}" ]] && "$ENGINE" image exists "$1" 2>/dev/null; }

start=$(date +%s)
if have "$BASE"; then
  echo "$BASE already built"
else
  echo "mmdebstrap $SUITE minbase + python3 python3-venv passwd -> $BASE"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,passwd "${SLIM[@]}" \
    "$SUITE" "$WORK/base-rootfs.tar"
  "$ENGINE" import --quiet --change "$PATH_ENV" --change 'CMD ["/usr/bin/python3"]' \
    "$WORK/base-rootfs.tar" "$BASE" >/dev/null
  rm -f "$WORK/base-rootfs.tar"
fi
if have "$PG"; then
  echo "$PG already built"
else
  if ! have localhost/fibemrss-postgresql-rootfs:15; then
    echo "mmdebstrap $SUITE minbase + postgresql -> $PG"
    mmdebstrap --quiet --variant=minbase --include=postgresql,passwd "${SLIM[@]}" \
      "$SUITE" "$WORK/pg-rootfs.tar"
    "$ENGINE" import --quiet --change "$PATH_ENV" "$WORK/pg-rootfs.tar" \
      localhost/fibemrss-postgresql-rootfs:15 >/dev/null
    rm -f "$WORK/pg-rootfs.tar"
  fi
  "$ENGINE" build --quiet --build-arg BASE_IMAGE=localhost/fibemrss-postgresql-rootfs:15 \
    -t "$PG" deploy/images/postgresql >/dev/null
  "$ENGINE" rmi localhost/fibemrss-postgresql-rootfs:15 >/dev/null || true
fi
echo "base images ready in $(( $(date +%s) - start )) s:"
"$ENGINE" images --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E 'fibemrss-(base|postgresql)' || true
