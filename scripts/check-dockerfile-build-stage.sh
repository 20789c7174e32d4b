#!/usr/bin/env bash
# Runs the Dockerfile's build stage on the host, instruction by instruction, as a container
# build would (no registry here to pull rust:…-bookworm): WORKDIR, COPY (files keep their mtimes,
# as COPY does; `COPY . .` copies what git knows minus .dockerignore) and RUN, in an empty
# directory, with a target dir of its own seeded from the host's release cache. Checks that the
# dependency step builds from the manifests (and vendor/) alone and that the release step then builds the real
# binary (not the placeholders': cargo trusts mtimes) into /out. Not part of `make test`: it
# compiles the crate in release once more (minutes). `make image-dockerfile-check`.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d "${TMPDIR:-/tmp}/bp-dockerfile.XXXXXX")
trap 'rm -rf "$work"' EXIT
export CARGO_TARGET_DIR=$work/target
cache="${CARGO_TARGET_DIR_CACHE:-$HOME/.cache/backup-provisioner/target}/release"
if [ -d "$cache" ]; then
  mkdir -p "$CARGO_TARGET_DIR" && cp -a --reflink=auto "$cache" "$CARGO_TARGET_DIR/release"
fi
# Build output goes to $work/out instead of /out.
root=$work/root
mkdir -p "$root"

# The build stage: from `FROM … AS build` to the next FROM, continuation lines joined.
stage=$(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' Dockerfile | grep -Ev '^[[:space:]]*(#|$)' |
  awk '/^FROM .* AS build$/ { on = 1; next } /^FROM / { on = 0 } on')

context_files() {
  git ls-files -co --exclude-standard | while IFS= read -r f; do
    [ -e "$f" ] || continue
    case "$f" in target/* | .git/* | .venv | .run/* | tools/kube-apiserver/kube-apiserver | \
      tools/etcd/etcd | tools/etcd/v3) continue ;; esac
    echo "$f"
  done
}

dir=/
set -f
while IFS= read -r line; do
  # shellcheck disable=SC2086 # instructions split into words as the Dockerfile's shell form
  set -- $line
  instruction=$1
  shift
  case "$instruction" in
    WORKDIR) dir=$1; mkdir -p "$root$dir" ;;
    COPY)
      dest=${*: -1}
      if [ "$1 $dest" = ". ." ]; then
        context_files | tar -cf - -T - | tar -C "$root$dir" -xpf -
      else
        for src in "${@:1:$#-1}"; do
          mkdir -p "$root$dir/$dest"
          # A directory's contents, as COPY copies them.
          if [ -d "$repo/$src" ]; then
            cp -pr "$repo/$src/." "$root$dir/$dest"
          else
            cp -p "$repo/$src" "$root$dir/$dest"
          fi
        done
      fi ;;
    RUN)
      echo "check-dockerfile: RUN $*"
      (cd "$root$dir" && bash -c "${*//\/out/$work/out}") ;;
    *) echo "check-dockerfile: unexpected instruction in the build stage: $line" >&2; exit 1 ;;
  esac
done <<<"$stage"

binary=$work/out/usr/local/bin/backup-provisioner
[[ "$("$binary" --version)" == "backup-provisioner "* ]] || { echo "check-dockerfile: no real binary in /out" >&2; exit 1; }
grep -q '^backup-provisioner:x:10001:10001:' "$work/out/etc/passwd"
echo "check-dockerfile: the Dockerfile's build stage built $("$binary" --version) and /etc/passwd with 10001"
