#!/usr/bin/env bash
# Builds the real kube-apiserver (tools/kube-apiserver) and etcd (tools/etcd) from Go modules,
# once, into a cache directory outside the clone, keyed by both versions and a hash of the two
# modules' go.mod/go.sum; later runs (and fresh clones) reuse it. The last line of stdout is the
# bin directory:  KUBE_BIN_DIR=$(scripts/build-kube.sh | tail -1)
# A cold build takes about 6 minutes on 2 cores (tools/README.md has the costs); a warm run is instant.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "build-kube: $*" >&2; exit 1; }

k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2 }' tools/kube-apiserver/go.mod)
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2 }' tools/etcd/go.mod)
[ -n "$k8s_version" ] && [ -n "$etcd_version" ] || fail "cannot read the pinned versions from tools/*/go.mod"

# The version a release build stamps in (kube-apiserver reports it at /version and derives its
# binary version for compatibility checks from it).
minor=$(echo "$k8s_version" | cut -d. -f2)
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.gitCommit="
key=$( (cat tools/kube-apiserver/go.mod tools/kube-apiserver/go.sum tools/etcd/go.mod tools/etcd/go.sum
  echo "-trimpath $ldflags") | sha256sum | cut -c1-12)
root="${XDG_CACHE_HOME:-$HOME/.cache}/backup-provisioner/kube"
dir="$root/$k8s_version-$etcd_version-$key"

if [ -x "$dir/bin/kube-apiserver" ] && [ -x "$dir/bin/etcd" ]; then echo "$dir/bin"; exit 0; fi

command -v go >/dev/null || fail "the go command is not installed (Go >= 1.26 is needed)"
go_minor=$(go env GOVERSION | sed -nE 's/^go1\.([0-9]+).*/\1/p')
[ "${go_minor:-0}" -ge 26 ] || fail "Go >= 1.26 is needed to build Kubernetes $k8s_version, found $(go env GOVERSION)"

mkdir -p "$root"
exec 9>"$root/.lock"
flock 9 # another run may be building the same binaries
if [ -x "$dir/bin/kube-apiserver" ] && [ -x "$dir/bin/etcd" ]; then echo "$dir/bin"; exit 0; fi

tmp="$dir.partial"
rm -rf "$tmp"
mkdir -p "$tmp/bin"
trap 'rm -rf "$tmp"' EXIT
started=$(date +%s)
echo "build-kube: building kube-apiserver $k8s_version and etcd $etcd_version into $dir (cold: ~6 min)" >&2

(cd tools/kube-apiserver && nice -n 10 go build -trimpath -ldflags="$ldflags" \
  -o "$tmp/bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver) >&2 \
  || fail "go build of kube-apiserver $k8s_version failed (output above)"
(cd tools/etcd && nice -n 10 go build -trimpath -ldflags="-s -w" \
  -o "$tmp/bin/etcd" go.etcd.io/etcd/server/v3) >&2 \
  || fail "go build of etcd $etcd_version failed (output above)"

"$tmp/bin/kube-apiserver" --version >/dev/null || fail "the built kube-apiserver does not run"
"$tmp/bin/etcd" --version >/dev/null || fail "the built etcd does not run"
{
  echo "kubernetes $k8s_version"
  echo "etcd $etcd_version"
  echo "key $key"
  echo "go $(go env GOVERSION)"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(( $(date +%s) - started ))s"
  "$tmp/bin/kube-apiserver" --version
  "$tmp/bin/etcd" --version
} >"$tmp/VERSION"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
echo "build-kube: done in $(( $(date +%s) - started ))s" >&2
echo "$dir/bin"
