#!/usr/bin/env bash
# Renders a kustomization of deploy/ to stdout, as CI does (tests/api/deploy_manifests.rs):
#   scripts/render-manifests.sh [DIR]        DIR defaults to deploy/overlays/example
# With `kubectl kustomize` (the machine images ship kubectl); where kubectl is missing, or with
# RENDER_WITH=kustomize, with a pinned kustomize built once from Go modules into
# ~/.cache/backup-provisioner/kustomize-<version> (a cold build takes about a minute).
set -euo pipefail

# The version kubectl v1.32 embeds, so both ways render alike.
KUSTOMIZE_VERSION=v5.5.0

fail() { echo "render-manifests: $*" >&2; exit 1; }

dir="${1:-$(dirname "$0")/../deploy/overlays/example}"
[ -f "$dir/kustomization.yaml" ] || fail "no kustomization.yaml in $dir"

if [ "${RENDER_WITH:-}" != kustomize ] && command -v kubectl >/dev/null; then
  exec kubectl kustomize "$dir"
fi

root="${XDG_CACHE_HOME:-$HOME/.cache}/backup-provisioner/kustomize-$KUSTOMIZE_VERSION"
if [ ! -x "$root/kustomize" ]; then
  command -v go >/dev/null || fail "neither kubectl nor go is installed"
  mkdir -p "$root"
  exec 9>"$root/.lock"
  flock 9 # another test may be building it
  if [ ! -x "$root/kustomize" ]; then
    echo "render-manifests: building kustomize $KUSTOMIZE_VERSION into $root" >&2
    GOBIN="$root" GOFLAGS=-trimpath nice -n 10 go install \
      "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" >&2 \
      || fail "go install of kustomize $KUSTOMIZE_VERSION failed (output above)"
  fi
fi
exec "$root/kustomize" build "$dir"
