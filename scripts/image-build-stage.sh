#!/usr/bin/env bash
# The image's build stage, shared by the Dockerfile (run inside rust:…-bookworm where registries
# are reachable) and CI (scripts/build-image.sh, run on the host, which builds the runtime image
# offline from deploy/image/Containerfile.offline).
#
#   image-build-stage.sh deps
#       In a tree holding only the workspace's Cargo.toml files, Cargo.lock and vendor/ (patched
#       dependencies, whole crates): writes
#       placeholder sources for every target and builds the dependencies in release mode, so
#       that the Dockerfile caches them in a layer of their own (what cargo-chef does).
#   image-build-stage.sh release OUT
#       Builds the release binary (--locked) and lays out the runtime files under OUT:
#       OUT/usr/local/bin/backup-provisioner (stripped) and OUT/etc/{passwd,group} with the
#       service's user and group, 10001 (deploy/base/deployment.yaml runs as 10001).
#   image-build-stage.sh runtime-libs OUT
#       For a base with nothing in it (FROM scratch): adds the shared libraries the binary
#       links (ldd), the dynamic loader, the CA certificates and /etc/nsswitch.conf under OUT.
#
# CARGO_TARGET_DIR defaults to $HOME/.cache/backup-provisioner/target (the Makefile's), so the
# host's release build is cached between CI runs.
set -euo pipefail

BIN=backup-provisioner
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/backup-provisioner/target}"
# Left by `deps`: the release build that follows in the same tree must not trust the mtimes of
# the placeholder sources it replaces (COPY keeps the context's older mtimes).
DEPS_MARKER=.image-build-stage-deps

die() { echo "image-build-stage: $*" >&2; exit 1; }

# Placeholder sources for one package: src/main.rs, src/lib.rs, and every file a `path = "…"`
# or a `[[bench]]`/`[[test]]`/`[[example]]` name of its manifest declares.
placeholders_for() {
  local dir=$1 manifest=$1/Cargo.toml path section=""
  mkdir -p "$dir/src"
  [ -e "$dir/src/main.rs" ] || echo 'fn main() {}' >"$dir/src/main.rs"
  [ -e "$dir/src/lib.rs" ] || : >"$dir/src/lib.rs"
  while IFS= read -r line; do
    case "$line" in
      '[[bench]]') section=benches ;; '[[test]]') section=tests ;;
      '[[example]]') section=examples ;; '['*) section="" ;;
    esac
    if [[ "$line" =~ ^path[[:space:]]*=[[:space:]]*\"([^\"]+)\" ]]; then
      path=$dir/${BASH_REMATCH[1]}
    elif [ -n "$section" ] && [[ "$line" =~ ^name[[:space:]]*=[[:space:]]*\"([^\"]+)\" ]]; then
      path=$dir/$section/${BASH_REMATCH[1]}.rs
    else
      continue
    fi
    mkdir -p "$(dirname "$path")"
    [ -e "$path" ] || echo 'fn main() {}' >"$path"
  done <"$manifest"
}

# Never run `deps` in a real tree, nor with a target dir a real tree builds in: cargo names the
# workspace's own crates by their path relative to the workspace root, so the placeholders'
# build would pass for the real crate's, which then looks up to date (seen here).
build_deps() {
  [ -f Cargo.lock ] || die "deps: run in the workspace root (Cargo.toml and Cargo.lock)"
  [ ! -e src/main.rs ] || die "deps: src/main.rs exists: run in a tree of manifests only"
  local manifest
  while IFS= read -r manifest; do
    placeholders_for "$(dirname "$manifest")"
  done < <(find . -name Cargo.toml -not -path './target/*' -not -path './vendor/*')
  cargo build --release --locked -p "$BIN" --bin "$BIN"
  touch "$DEPS_MARKER"
}

build_release() {
  local out=${1:?usage: image-build-stage.sh release OUT}
  if [ -e "$DEPS_MARKER" ]; then
    # The real sources replaced the placeholders: make cargo see them as newer.
    find src -name '*.rs' -exec touch {} +
    rm -f "$DEPS_MARKER"
  fi
  cargo build --release --locked -p "$BIN" --bin "$BIN"
  install -D -m 0755 "$CARGO_TARGET_DIR/release/$BIN" "$out/usr/local/bin/$BIN"
  # The real binary, not a placeholder's build (see build_deps).
  [[ "$("$out/usr/local/bin/$BIN" --version)" == "$BIN "* ]] || die "release: the binary is not $BIN"
  command -v strip >/dev/null || die "strip not found (binutils): install build-essential"
  strip --strip-all "$out/usr/local/bin/$BIN"
  mkdir -p "$out/etc"
  # No shell for anyone: the image has none. HOME does not exist: the service writes no file.
  cat >"$out/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
backup-provisioner:x:10001:10001:backup-provisioner:/nonexistent:/sbin/nologin
EOF
  cat >"$out/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
backup-provisioner:x:10001:
EOF
}

# ldd prints `name => /path (addr)` or `/path (addr)` (the loader); `linux-vdso` has no file.
linked_files() {
  ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
}

add_runtime_libs() {
  local out=${1:?usage: image-build-stage.sh runtime-libs OUT} lib
  local bin=$out/usr/local/bin/$BIN ca=/etc/ssl/certs/ca-certificates.crt
  [ -x "$bin" ] || die "runtime-libs: run 'release $out' first"
  while IFS= read -r lib; do
    install -D -m 0644 "$(readlink -f "$lib")" "$out$lib"
  done < <(linked_files "$bin")
  chmod 0755 "$out"/lib*/ld-linux* 2>/dev/null || true
  [ -f "$ca" ] || die "runtime-libs: $ca missing: install ca-certificates (make deps)"
  install -D -m 0644 "$ca" "$out$ca"
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$out/etc/nsswitch.conf"
}

case "${1:-}" in
  deps) build_deps ;;
  release) build_release "${2:-}" ;;
  runtime-libs) add_runtime_libs "${2:-}" ;;
  *) die "usage: image-build-stage.sh deps | release OUT | runtime-libs OUT" ;;
esac
