#!/usr/bin/env bash
# Installs what `make test` and `make demo` need on a fresh Debian machine.
# Idempotent: every step checks first, so a warm machine pays almost nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v pgbackrest >/dev/null || need_apt+=(pgbackrest)
command -v nginx >/dev/null || need_apt+=(nginx-light)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v curl >/dev/null || need_apt+=(curl)
command -v jq >/dev/null || need_apt+=(jq)
command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# nginx-light's package may start a default server on :80; the tests run their own nginx.
pkill -f 'nginx: master process /usr/sbin/nginx' 2>/dev/null || true

# The virtualenv lives outside the clone (keyed by the pinned requirements), so fresh CI
# clones reuse it; .venv in the repository is a symlink to it.
VENV_HOME="${XDG_CACHE_HOME:-$HOME/.cache}/backup-provisioner/venv-$(sha256sum scripts/requirements-moto.txt | cut -c1-12)"
if [ ! -x "$VENV_HOME/bin/moto_server" ]; then
  echo "install-deps: python venv with moto in $VENV_HOME"
  rm -rf "$VENV_HOME"
  python3 -m venv "$VENV_HOME"
  "$VENV_HOME/bin/pip" install -q --disable-pip-version-check -r scripts/requirements-moto.txt
fi
if [ "$(readlink .venv 2>/dev/null)" != "$VENV_HOME" ]; then
  rm -rf .venv
  ln -s "$VENV_HOME" .venv
fi

# Postgres: the machine image runs it; a fresh Debian box may not.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "install-deps: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
