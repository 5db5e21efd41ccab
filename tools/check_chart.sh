#!/usr/bin/env bash
# Chart checks with the real tools: helm lint --strict and helm template over
# the default values and every deploy/helm/ci-values/*.yaml, then
# kubernetes-validate --strict on each rendering. Fetches helm into .tools/bin
# when absent (tools/fetch_helm.py). Exits non-zero on the first failure.
#   bash tools/check_chart.sh            # KUBE_VERSIONS="1.31.0 1.35.0" to override
set -euo pipefail
cd "$(dirname "$0")/.."

CHART=deploy/helm/llada-serve
# The oldest Kubernetes the chart supports in practice and a current one.
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.31.0 1.35.0"}
HELM=${HELM:-.tools/bin/helm}
[ -x "$HELM" ] || HELM=$(python tools/fetch_helm.py)
command -v kubernetes-validate >/dev/null || { echo "check_chart: kubernetes-validate missing: pip install kubernetes-validate" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for values in default deploy/helm/ci-values/*.yaml; do
  name=$(basename "$values" .yaml)
  args=()
  [ "$values" = default ] || args=(-f "$values")
  echo "::: $name: helm lint --strict"
  "$HELM" lint --strict --quiet "$CHART" "${args[@]}"
  for kv in $KUBE_VERSIONS; do
    echo "::: $name: helm template + kubernetes-validate --strict -k $kv"
    "$HELM" template llada-serve "$CHART" --namespace llada --kube-version "$kv" "${args[@]}" > "$out/$name.yaml"
    # --no-warn: the KEDA and Prometheus Operator kinds have no schema here (tests/deploy checks them)
    kubernetes-validate --strict --quiet --no-warn -k "$kv" "$out/$name.yaml"
  done
done
echo "check_chart: all values files pass"
