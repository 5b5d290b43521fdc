#!/usr/bin/env bash
# What the console's browser tests need (tests/browser, docs/console.md): Debian's chromium and
# chromedriver, installed when missing (CI runs as root on Debian 12, as for podman in .ci/run),
# and the test OpenID Connect provider and axe-core from npm, at the versions of
# tests/browser/provider/package-lock.json. Without root or node the tests skip, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "browser-tools: installing chromium and chromium-driver from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  else
    echo "browser-tools: chromium/chromedriver missing and cannot be installed here (not root on Debian)"
  fi
fi

dir=tests/browser/provider
if command -v npm >/dev/null; then
  if [ ! -f "$dir/node_modules/.package-lock.json" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  fi
else
  echo "browser-tools: npm missing: the browser tests will skip"
fi
