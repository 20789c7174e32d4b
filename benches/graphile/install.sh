#!/usr/bin/env bash
# Installs graphile-worker (the peer in `cargo bench --bench load`) from package-lock.json into
# a directory outside the clone, keyed by the lock file's hash (as scripts/install-deps.sh keys
# the Python venvs), and prints its node_modules directory. Quick when already installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${XDG_CACHE_HOME:-$HOME/.cache}/backup-provisioner/graphile-$(sha256sum "$here/package-lock.json" | cut -c1-12)"
if [ ! -f "$dir/node_modules/graphile-worker/package.json" ]; then
  echo "graphile/install.sh: npm ci graphile-worker into $dir" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  cp "$here/package.json" "$here/package-lock.json" "$dir/"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi
echo "$dir/node_modules"
