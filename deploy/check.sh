#!/usr/bin/env bash
# Offline checks of everything under deploy/ and the images' Dockerfile:
#   hadolint         Dockerfile (the root one: one target per service image)
#   helm lint        the chart, both roles (with the example values files)
#   helm template    both roles  -> kubernetes-validate --strict (k8s 1.30 and 1.35)
#   generate_base    the kustomize bases match the chart
#   kubectl kustomize each overlay -> kubernetes-validate --strict
#   checkov          the rendered manifests and the Dockerfile (deploy/checkov.yaml)
# Custom resources (the ServiceMonitor, the PrometheusRule) have no bundled schema:
# kubernetes-validate warns and skips them; any other skipped kind fails the check.
# Needs the tools of deploy/tools/install.sh (TOOLS, default var/deploy-tools); no cluster,
# no network. Rendered manifests are left in OUT (default var/deploy-check) for inspection.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="${TOOLS:-var/deploy-tools}"
OUT="${OUT:-var/deploy-check}"
K8S_VERSIONS=(1.30.0 1.35.0)
CHART=deploy/helm/fibemrss
HELM="$TOOLS/bin/helm"
KUBECTL="$TOOLS/bin/kubectl"
VENV="$TOOLS/venv/bin"

for tool in "$HELM" "$KUBECTL" "$VENV/hadolint" "$VENV/checkov" "$VENV/kubernetes-validate"; do
  if [[ ! -x "$tool" ]]; then
    echo "missing $tool: run bash deploy/tools/install.sh $TOOLS" >&2
    exit 2
  fi
done

rm -rf "$OUT"
mkdir -p "$OUT/manifests" "$OUT/logs"
declare -a RESULTS=()
FAILED=0

# step NAME COMMAND...: run one check, keep its log, record PASS/FAIL.
step() {
  local name="$1"; shift
  local log="$OUT/logs/${name//[^A-Za-z0-9_.-]/_}.log"
  if "$@" >"$log" 2>&1; then
    RESULTS+=("PASS  $name")
  else
    RESULTS+=("FAIL  $name   (log: $log)")
    FAILED=1
    sed 's/^/    | /' "$log" | tail -40
  fi
}

validate() {  # validate FILE: strict schema validation; only ServiceMonitor may lack a schema
  local file="$1" version out rc=0
  for version in "${K8S_VERSIONS[@]}"; do
    out="$("$VENV/kubernetes-validate" --strict --quiet -k "$version" "$file" 2>&1)" || rc=1
    echo "$out"
    if grep -v -E "Couldn't find schema for kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1" \
         <<<"$out" | grep -q .; then
      rc=1
    fi
  done
  echo "validated $(grep -c '^kind:' "$file") resources against k8s ${K8S_VERSIONS[*]}" \
       "(ServiceMonitor, PrometheusRule: no bundled schema, skipped)"
  return $rc
}

step "hadolint Dockerfile" "$VENV/hadolint" --config .hadolint.yaml Dockerfile

for role in central hospital; do
  values="$CHART/values-$role.yaml"
  [[ $role == hospital ]] && values="$CHART/values-hospital-example.yaml"
  ns="fibemrss-$role"; [[ $role == hospital ]] && ns=fibemrss-cleveland
  rendered="$OUT/manifests/helm-$role.yaml"
  step "helm lint ($role)" "$HELM" lint --strict "$CHART" -f "$values"
  step "helm template ($role)" sh -c '"$1" template fibemrss "$2" --namespace "$3" -f "$4" > "$5"' \
    _ "$HELM" "$CHART" "$ns" "$values" "$rendered"
  step "kubernetes-validate helm ($role)" validate "$rendered"
done

step "kustomize bases match the chart" "$VENV/python" deploy/k8s/generate_base.py --check --helm "$HELM"

for overlay in deploy/k8s/overlays/*/; do
  name="$(basename "$overlay")"
  rendered="$OUT/manifests/kustomize-$name.yaml"
  step "kubectl kustomize ($name)" sh -c '"$1" kustomize "$2" > "$3"' _ "$KUBECTL" "$overlay" "$rendered"
  step "kubernetes-validate kustomize ($name)" validate "$rendered"
done

step "checkov (rendered manifests)" "$VENV/checkov" --config-file deploy/checkov.yaml \
  --framework kubernetes -d "$OUT/manifests"
step "checkov (Dockerfile)" "$VENV/checkov" --config-file deploy/checkov.yaml \
  --framework dockerfile -f Dockerfile

echo
echo "deploy checks:"
printf '  %s\n' "${RESULTS[@]}"
passed=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^PASS')
failed=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^FAIL')
echo "deploy: $passed passed, $failed failed"
exit $FAILED
