#!/usr/bin/env bash
# `make run`: the service on your machine for trying the API by hand (README: "API walkthrough").
#
# Like `make demo` it starts what is missing: moto (S3 + IAM) unless AWS_ENDPOINT_URL is set,
# the Kubernetes emulator (namespaces zitadel and holos) unless KUBECONFIG is set; Postgres is
# the local one (scripts/install-deps.sh starts it). It migrates the database as bp_owner, runs
# `backup-provisioner serve` as bp_runtime in the foreground (its log on this terminal; Ctrl-C
# stops everything it started), and once /readyz answers writes the exports a second terminal
# needs to $RUN/env (default .run/env: API, TOKEN, BP_JWT_HS256_SECRET, PATH with the built
# binary, and the AWS/KUBECONFIG settings of the emulators) and prints
#   backup-provisioner: ready at http://127.0.0.1:8080
# Settings: BP_RUN_PORT (default 8080; a free port when 8080 is taken), BP_RUN_DIR (default
# .run), RUST_LOG (default info). With moto the database starts empty on every run (moto does);
# against real endpoints it is kept, one per target, like the demo's.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=${BP_RUN_DIR:-$ROOT/.run}
mkdir -p "$RUN"
RUN=$(cd "$RUN" && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/backup-provisioner/target}"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_taken() { python3 -c 'import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(("127.0.0.1",int(sys.argv[1]))) != 0)' "$1"; }
wait_http() { # url, what, pid to watch
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { echo "run: $2 exited" >&2; exit 1; }
    sleep 0.2
  done
  echo "run: $2 did not come up at $1" >&2; exit 1
}

say "building"
cargo build --quiet --workspace --bins
BIN=$CARGO_TARGET_DIR/debug
EXPORTS=()

start_moto() {
  local port; port=$(free_port)
  say "starting moto (S3 + IAM) on 127.0.0.1:$port (log: $RUN/moto.log)"
  "$ROOT/.venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$RUN/moto.log" 2>&1 &
  PIDS+=($!)
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo
  export AWS_REGION=us-east-1
  wait_http "$AWS_ENDPOINT_URL/moto-api/" moto "${PIDS[-1]}"
  EXPORTS+=("AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL" AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_REGION=us-east-1)
}

start_emulator() {
  local port; port=$(free_port)
  say "starting the Kubernetes API emulator on 127.0.0.1:$port (log: $RUN/kube-emulator.log)"
  rm -f "$RUN/kubeconfig"
  "$BIN/kube-emulator" --listen "127.0.0.1:$port" --namespace zitadel --namespace holos \
    --token demo-token --kubeconfig-out "$RUN/kubeconfig" >"$RUN/kube-emulator.log" 2>&1 &
  PIDS+=($!)
  export KUBECONFIG=$RUN/kubeconfig
  for _ in $(seq 1 100); do [ -s "$KUBECONFIG" ] && break; sleep 0.1; done
  [ -s "$KUBECONFIG" ] || { echo "run: the emulator wrote no kubeconfig" >&2; exit 1; }
  EXPORTS+=("KUBECONFIG=$KUBECONFIG")
}

USING_MOTO=no
# Real AWS only when asked for with AWS_ENDPOINT_URL, as in the demo.
[ -n "${AWS_ENDPOINT_URL:-}" ] || { USING_MOTO=yes; start_moto; }
[ -n "${KUBECONFIG:-}" ] || start_emulator

# The database: two roles as in production (README: Database roles); bp_owner migrates it.
DB=${BP_RUN_DATABASE:-backup_provisioner_run}
ADMIN="env PGOPTIONS=--client-min-messages=warning psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres"
if [ "$USING_MOTO" = yes ]; then
  # moto starts empty, so the database does too: no repository that moto never saw.
  $ADMIN -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" postgres
elif [ -z "${BP_RUN_DATABASE:-}" ]; then
  DB=${DB}_$(printf '%s' "$AWS_ENDPOINT_URL ${AWS_ACCESS_KEY_ID:-} ${AWS_PROFILE:-} $KUBECONFIG" | sha256sum | cut -c1-12)
fi
for role in bp_owner bp_runtime; do
  $ADMIN -tc "SELECT 1 FROM pg_roles WHERE rolname = '$role'" postgres | grep -q 1 \
    || $ADMIN -c "CREATE ROLE $role LOGIN" postgres
done
$ADMIN -tc "SELECT 1 FROM pg_database WHERE datname = '$DB'" postgres | grep -q 1 \
  || $ADMIN -c "CREATE DATABASE $DB OWNER bp_owner" postgres
say "migrating $DB as bp_owner (log: $RUN/migrate.log)"
BP_MIGRATION_DATABASE_URL="postgres://bp_owner@127.0.0.1:5432/$DB" \
  "$BIN/backup-provisioner" migrate --grant-to bp_runtime >"$RUN/migrate.log" 2>&1 \
  || { cat "$RUN/migrate.log" >&2; echo "run: migrate failed" >&2; exit 1; }

# Settings kept across runs (the demo's too), so tokens minted earlier stay valid.
[ -s "$RUN/encryption-key" ] || (umask 077; openssl rand -base64 32 >"$RUN/encryption-key")
[ -s "$RUN/jwt-secret" ] || (umask 077; openssl rand -hex 32 >"$RUN/jwt-secret")
export DATABASE_URL="postgres://bp_runtime@127.0.0.1:5432/$DB"
export BP_ENCRYPTION_KEY=$(cat "$RUN/encryption-key") BP_JWT_HS256_SECRET=$(cat "$RUN/jwt-secret")
export BP_CREDENTIAL_CHECK_BUDGET=${BP_CREDENTIAL_CHECK_BUDGET:-2m} RUST_LOG=${RUST_LOG:-info}
PORT=${BP_RUN_PORT:-8080}
if port_taken "$PORT"; then
  NEW=$(free_port); say "127.0.0.1:$PORT is taken: using 127.0.0.1:$NEW"; PORT=$NEW
fi
export BP_LISTEN_ADDR=127.0.0.1:$PORT
API=http://$BP_LISTEN_ADDR

say "starting backup-provisioner serve on $API (Ctrl-C stops it and what this script started)"
"$BIN/backup-provisioner" serve --workers 2 &
SERVICE=$!
PIDS+=("$SERVICE")
wait_http "$API/readyz" backup-provisioner "$SERVICE"

TOKEN=$("$BIN/backup-provisioner" token --sub alice@example.com --role operator --ttl 12h)
(
  umask 077
  echo "# Written by make run ($(date -u +%FT%TZ)). In a second terminal: source $RUN/env"
  echo "export API=$API"
  echo "export TOKEN=$TOKEN"
  echo "export BP_JWT_HS256_SECRET=$BP_JWT_HS256_SECRET"
  echo "export PATH=\"$BIN:\$PATH\""
  for e in "${EXPORTS[@]}"; do echo "export $e"; done
) >"$RUN/env"
cat >&2 <<BANNER

$(printf '\033[1m')backup-provisioner: ready at $API$(printf '\033[0m')
In a second terminal, from $ROOT:

  source ${RUN#"$ROOT"/}/env

It exports API=$API, TOKEN (an operator's, 12 h), BP_JWT_HS256_SECRET (to mint other tokens
with backup-provisioner token), PATH with $BIN, and the emulators' AWS_* and KUBECONFIG
(local, made for this run only):

$(grep '^export ' "$RUN/env" | sed 's/^/  /')

Then follow the README's "API walkthrough" (curl) or "Admin CLI" (backup-provisioner client).

BANNER
wait "$SERVICE"
