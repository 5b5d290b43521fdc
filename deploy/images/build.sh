#!/usr/bin/env bash
# `make images`: the four service images from the root Dockerfile, with podman (or docker).
#   ENGINE      podman or docker (default: podman if installed, else docker)
#   BASE_IMAGE  the Dockerfile's base (default: localhost/fibemrss-base:bookworm, built here from
#               Debian packages by deploy/images/build_base.sh; real users with a registry set
#               BASE_IMAGE=python:3.11-slim-bookworm, and the local build is skipped)
#   TAG         image tag (default 0.1.0, the chart's appVersion); images are localhost/fibemrss-<S>:TAG
# Prints each image's size, whether the four share the virtualenv layer, and the build time;
# writes var/images.json ({"<image>": {"bytes": n}}).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/deploy/podman/containers.conf}"
ENGINE="${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}"
BASE_IMAGE="${BASE_IMAGE:-localhost/fibemrss-base:bookworm}"
TAG="${TAG:-0.1.0}"
SERVICES=(emr-gateway hospital-agent aggregator inference)
LIMIT=$((1200 * 1000 * 1000))   # 1.2 GB per image

start=$(date +%s)
if [[ "$BASE_IMAGE" == localhost/fibemrss-base:* ]]; then
  BASE_IMAGE="$BASE_IMAGE" bash deploy/images/build_base.sh
fi
bash deploy/images/wheelhouse.sh var/wheelhouse
# The images these tags named before this build: removed below once nothing names them.
old_ids=$("$ENGINE" image inspect --format '{{.Id}}' $(printf "localhost/fibemrss-%s:$TAG " "${SERVICES[@]}") \
  2>/dev/null || true)
for s in "${SERVICES[@]}"; do
  t0=$(date +%s)
  # podman/buildah and BuildKit both reuse the build and runtime stages for the 2nd..4th target.
  "$ENGINE" build --quiet --target "$s" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    -t "localhost/fibemrss-$s:$TAG" -f Dockerfile . >/dev/null
  echo "built localhost/fibemrss-$s:$TAG in $(( $(date +%s) - t0 )) s"
done
# The build stage (the wheelhouse and the virtualenv it installs, about 1.4 GB) is an image of its
# own that every build leaves behind untagged. The newest is tagged, so the next build reuses it;
# the older ones go, or a machine that builds again and again (CI) fills its disk.
"$ENGINE" build --quiet --target build --build-arg BASE_IMAGE="$BASE_IMAGE" \
  -t "localhost/fibemrss-build:$TAG" -f Dockerfile . >/dev/null
seconds=$(( $(date +%s) - start ))
for id in $old_ids; do
  "$ENGINE" rmi "$id" >/dev/null 2>&1 || true   # still tagged (unchanged) or used: kept
done
"$ENGINE" image prune -f --filter label=org.fibemrss.stage=build >/dev/null 2>&1 || true

"$ENGINE" image inspect --format '{{json .RootFS.Layers}}' \
  $(printf "localhost/fibemrss-%s:$TAG " "${SERVICES[@]}") > var/images-layers.txt
python3 - "$ENGINE" "$TAG" "$LIMIT" "$seconds" "${SERVICES[@]}" <<'PY'
import json, subprocess, sys
engine, tag, limit, seconds, services = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
out, bad = {}, []
layers = [json.loads(l) for l in open("var/images-layers.txt")]
for s in services:
    name = f"localhost/fibemrss-{s}:{tag}"
    size = int(subprocess.check_output([engine, "image", "inspect", "--format", "{{.Size}}", name]).strip())
    out[f"fibemrss-{s}"] = {"bytes": size}
    print(f"  {name:<42} {size / 1e6:8.1f} MB" + ("   OVER 1.2 GB" if size > limit else ""))
    bad += [name] if size > limit else []
common = set(layers[0]).intersection(*map(set, layers[1:]))
shared = [l for l in layers[0] if l in common]
print(f"  the four images share {len(shared)} of their {len(layers[0])}..{max(map(len, layers))} layers "
      f"(base, user, the one virtualenv layer); each adds only its labels and CMD")
json.dump(out, open("var/images.json", "w"), indent=2)
print(f"images built in {seconds} s (var/images.json)")
sys.exit(1 if bad else 0)
PY
