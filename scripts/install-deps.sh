#!/usr/bin/env bash
# Installs what `make test` and `make demo` need on a fresh Debian machine.
# Idempotent: every step checks first, so a warm machine pays almost nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

need_apt=()
command -v pgbackrest >/dev/null || need_apt+=(pgbackrest)
command -v nginx >/dev/null || need_apt+=(nginx-light)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v curl >/dev/null || need_apt+=(curl ca-certificates)
command -v jq >/dev/null || need_apt+=(jq)
# The backup freshness alerts' unit tests (tests/api/deploy_manifests.rs): promtool.
command -v promtool >/dev/null || need_apt+=(prometheus)
# The console's browser tests (tests/api/ui_console.rs): headless Chromium over WebDriver.
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
command -v cc >/dev/null || need_apt+=(build-essential)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# `make bench` (benches/load.rs): wrk drives the API; graphile-worker (npm), the queue's peer, runs on node.
command -v wrk >/dev/null || need_apt+=(wrk)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
# The image test (scripts/test-image.sh) builds and runs the runtime image with podman; runc runs
# it where crun cannot (hybrid cgroups); the image takes the CA certificates from the host.
command -v podman >/dev/null || need_apt+=(podman)
command -v runc >/dev/null || need_apt+=(runc)
[ -f /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)
# Rootless podman maps the image's user 10001 through /etc/subuid with newuidmap.
[ "$(id -u)" -eq 0 ] || command -v newuidmap >/dev/null || need_apt+=(uidmap)
command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The tests run their own nginx; the package's default server on :80 is not wanted.
  case " ${need_apt[*]} " in *" nginx-light "*) $SUDO service nginx stop >/dev/null 2>&1 || true ;; esac
fi

# Rust: the machine images ship a toolchain; a bare Debian gets rustup's stable one.
if ! command -v cargo >/dev/null; then
  echo "install-deps: installing the Rust toolchain with rustup"
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  echo "install-deps: run 'source \$HOME/.cargo/env' (or open a new shell) before make"
fi

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

# schemathesis, for tests/api/schemathesis.rs, in a venv of its own keyed the same way (the test
# finds it by the same hash of scripts/requirements-fuzz.txt).
FUZZ_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/backup-provisioner/venv-fuzz-$(sha256sum scripts/requirements-fuzz.txt | cut -c1-12)"
if [ ! -x "$FUZZ_VENV/bin/st" ]; then
  echo "install-deps: python venv with schemathesis in $FUZZ_VENV"
  rm -rf "$FUZZ_VENV"
  python3 -m venv "$FUZZ_VENV"
  "$FUZZ_VENV/bin/pip" install -q --disable-pip-version-check -r scripts/requirements-fuzz.txt
fi

# graphile-worker for the queue benchmark, outside the clone (keyed by its package-lock.json).
bash benches/graphile/install.sh >/dev/null

# Postgres: installed from Debian here when missing, and started if it is not running. Tests
# connect as postgres over 127.0.0.1 without a password, as on the CI machines: a cluster that
# asks for one (Debian's default scram-sha-256, also on a machine that had PostgreSQL already)
# is switched to trust on the loopback addresses and reloaded.
cluster_version=$(ls /etc/postgresql | sort -V | tail -1)
hba=/etc/postgresql/$cluster_version/main/pg_hba.conf
hba_changed=no
if $SUDO grep -qE '^(host\s+all\s+all\s+(127\.0\.0\.1/32|::1/128)|local\s+all\s+postgres)\s+(\S+\s+)?(scram-sha-256|md5|password|peer)\s*$' "$hba"; then
  $SUDO sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  $SUDO sed -i -E 's/^(local\s+all\s+postgres\s+)\S+/\1trust/' "$hba"
  hba_changed=yes
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "install-deps: starting PostgreSQL $cluster_version"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$cluster_version" main start
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
elif [ "$hba_changed" = yes ]; then
  echo "install-deps: PostgreSQL $cluster_version trusts 127.0.0.1 now (reloaded)"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$cluster_version" main reload
fi
