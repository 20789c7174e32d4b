#!/usr/bin/env bash
# Builds the runtime image with podman without any registry (`make image`, and CI through
# scripts/test-image.sh): the release binary is built on the host by the Dockerfile's own build
# stage script (scripts/image-build-stage.sh, cached in ~/.cache/backup-provisioner/target-image),
# then podman builds deploy/image/Containerfile.offline (FROM scratch) from a context holding only
# the runtime files.
#   scripts/build-image.sh [TAG]      TAG defaults to localhost/backup-provisioner:<version>
# Prints the image's tag on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every change of the crate rebuilds this release binary in CI (about 8 minutes of a warm run
# on 2 cores). Incremental compilation reuses the codegen units a change leaves alone; the
# binary is the same program, less inlined across units (256 of them instead of 16). Built in
# a target directory of its own: cargo counts `incremental` in the profile, so sharing
# $CARGO_TARGET_DIR/release with `make bench` would rebuild the crate at every switch. The
# Dockerfile's build (the image we ship) stays non-incremental.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-1}"
export CARGO_TARGET_DIR="${BP_IMAGE_TARGET_DIR:-$HOME/.cache/backup-provisioner/target-image}"

command -v podman >/dev/null || { echo "build-image: podman not found: run 'make deps'" >&2; exit 1; }
version=$(awk -F'"' '/^version = / { print $2; exit }' Cargo.toml)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# A tree with changes nobody committed is not that revision.
git diff --quiet HEAD -- src migrations vendor Cargo.toml Cargo.lock 2>/dev/null || revision="$revision-dirty"
tag=${1:-localhost/backup-provisioner:$version}

context=$(mktemp -d "${TMPDIR:-/tmp}/bp-image.XXXXXX")
trap 'rm -rf "$context"' EXIT
started=$(date +%s)
bash scripts/image-build-stage.sh release "$context/rootfs" >&2
bash scripts/image-build-stage.sh runtime-libs "$context/rootfs" >&2
echo "build-image: release binary and runtime files ready ($(( $(date +%s) - started ))s)" >&2

previous=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
# --layers=false: podman's layer cache ignores a changed --build-arg (a new REVISION would keep
# the old label, seen with podman 4.3); without layers there is no cache and no intermediate
# image, and the build takes seconds (FROM scratch, one COPY).
podman build --quiet --layers=false --file deploy/image/Containerfile.offline \
  --build-arg VERSION="$version" --build-arg REVISION="$revision" \
  --tag "$tag" "$context" >&2
current=$(podman image inspect --format '{{.Id}}' "$tag")
# The image this tag named before is garbage now (its layers stay otherwise).
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  podman rmi "$previous" >/dev/null 2>&1 || true
fi
size=$(podman image inspect --format '{{.Size}}' "$tag")
echo "build-image: $tag ($current), $size bytes ($(( size / 1024 / 1024 )) MiB)" >&2
echo "$tag"
