#!/usr/bin/env bash
# `make demo`: run the service locally and provision the runbook's two repositories end to end.
#
# Starts moto (S3 + IAM) unless AWS_ENDPOINT_URL is set, the Kubernetes emulator unless
# KUBECONFIG is set, and the service; creates `zitadel` and `holos-server` through the API and
# reconciles them (so a repository an earlier run already made is provisioned again wherever
# the demo points now), follows the jobs to the end, then reads back the bucket settings from
# S3 and the Secrets' keys with values redacted: a missing bucket or Secret fails the run.
# The database is per target (AWS endpoint and identity, Kubernetes cluster and context), so
# one target's answers are never replayed for another. It has two roles, as in production
# (README: Database roles): bp_owner owns the schema and migrates it, the service runs as
# bp_runtime, which may append to the audit log but not rewrite it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/.run
mkdir -p "$RUN"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/backup-provisioner/target}"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url, what
  for _ in $(seq 1 150); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.2; done
  echo "demo: $2 did not come up at $1" >&2; exit 1
}

say "building"
cargo build --quiet --workspace --bins
BIN=$CARGO_TARGET_DIR/debug

USING_MOTO=no
# Real AWS only when asked for explicitly with AWS_ENDPOINT_URL: exported credentials alone
# never send the demo to a real account.
if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
  USING_MOTO=yes
  MOTO_PORT=$(free_port)
  say "starting moto (S3 + IAM) on 127.0.0.1:$MOTO_PORT"
  "$ROOT/.venv/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$RUN/moto.log" 2>&1 &
  PIDS+=($!)
  export AWS_ENDPOINT_URL="http://127.0.0.1:$MOTO_PORT" AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo
  export AWS_REGION=us-east-1
  wait_http "$AWS_ENDPOINT_URL/moto-api/" "moto"
fi

USING_EMULATOR=no
if [ -z "${KUBECONFIG:-}" ]; then
  USING_EMULATOR=yes
  KUBE_PORT=$(free_port)
  say "starting the Kubernetes API emulator on 127.0.0.1:$KUBE_PORT"
  "$BIN/kube-emulator" --listen "127.0.0.1:$KUBE_PORT" --namespace zitadel --namespace holos \
    --token demo-token --kubeconfig-out "$RUN/kubeconfig" >"$RUN/kube-emulator.log" 2>&1 &
  PIDS+=($!)
  export KUBECONFIG=$RUN/kubeconfig
  for _ in $(seq 1 100); do [ -s "$KUBECONFIG" ] && break; sleep 0.1; done
fi

# Names the Kubernetes cluster and context KUBECONFIG points at (the emulator is always new).
kube_target() {
  [ "$USING_EMULATOR" = yes ] && { echo emulator; return; }
  "$ROOT/.venv/bin/python" -c 'import os, yaml
c = yaml.safe_load(open(os.environ["KUBECONFIG"].split(":")[0]))
ctx = next(x["context"] for x in c["contexts"] if x["name"] == c["current-context"])
print(next(x["cluster"]["server"] for x in c["clusters"] if x["name"] == ctx["cluster"]), c["current-context"])' \
    2>/dev/null || echo "$KUBECONFIG"
}
DB=backup_provisioner_demo
if [ "$USING_MOTO" = yes ]; then
  # moto starts empty, so the demo starts from an empty database too.
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" postgres
else
  TARGET="$AWS_ENDPOINT_URL ${AWS_ACCESS_KEY_ID:-} ${AWS_PROFILE:-} $(kube_target)"
  DB=${DB}_$(printf '%s' "$TARGET" | sha256sum | cut -c1-12)
fi
# scripts/demo_retarget.sh keeps one database across targets on purpose.
DB=${BP_DEMO_DATABASE:-$DB}
ADMIN="psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres"
for role in bp_owner bp_runtime; do
  $ADMIN -tc "SELECT 1 FROM pg_roles WHERE rolname = '$role'" postgres | grep -q 1 \
    || $ADMIN -c "CREATE ROLE $role LOGIN" postgres
done
$ADMIN -tc "SELECT 1 FROM pg_database WHERE datname = '$DB'" postgres | grep -q 1 \
  || $ADMIN -c "CREATE DATABASE $DB OWNER bp_owner" postgres
# A database an earlier demo made with one role (postgres): bp_owner takes over its schema.
$ADMIN -c "ALTER DATABASE $DB OWNER TO bp_owner" postgres
$ADMIN -d "$DB" <<'SQL'
DO $$
DECLARE change record;
BEGIN
  FOR change IN
    SELECT format('ALTER TABLE %I.%I OWNER TO bp_owner', n.nspname, c.relname) AS sql
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relowner <> 'bp_owner'::regrole
    UNION ALL
    SELECT format('ALTER FUNCTION %s OWNER TO bp_owner', p.oid::regprocedure)
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = 'public' AND p.proowner <> 'bp_owner'::regrole
  LOOP
    EXECUTE change.sql;
  END LOOP;
END $$;
SQL
say "migrating as bp_owner, granting the service's role bp_runtime what it needs"
BP_MIGRATION_DATABASE_URL="postgres://bp_owner@127.0.0.1:5432/$DB" \
  "$BIN/backup-provisioner" migrate --grant-to bp_runtime >"$RUN/migrate.log" 2>&1 \
  || { cat "$RUN/migrate.log"; echo "demo: migrate failed" >&2; exit 1; }
export DATABASE_URL="postgres://bp_runtime@127.0.0.1:5432/$DB"
[ -s "$RUN/encryption-key" ] || openssl rand -base64 32 >"$RUN/encryption-key"
[ -s "$RUN/jwt-secret" ] || openssl rand -hex 32 >"$RUN/jwt-secret"
export BP_ENCRYPTION_KEY=$(cat "$RUN/encryption-key") BP_JWT_HS256_SECRET=$(cat "$RUN/jwt-secret")
export BP_CREDENTIAL_CHECK_BUDGET=${BP_CREDENTIAL_CHECK_BUDGET:-2m} RUST_LOG=${RUST_LOG:-info}
API_PORT=$(free_port)
export BP_LISTEN_ADDR=127.0.0.1:$API_PORT
API=http://$BP_LISTEN_ADDR

say "starting backup-provisioner on $API (log: .run/service.log)"
"$BIN/backup-provisioner" serve --workers 2 >"$RUN/service.log" 2>&1 &
PIDS+=($!)
wait_http "$API/readyz" "backup-provisioner"

TOKEN=$("$BIN/backup-provisioner" token --sub demo@holos.run --role operator --ttl 1h)
provision() { # name namespace bucket; prints the id of the job to follow
  say "POST /v1/backup-repositories {name: $1, namespace: $2, bucket: $3}" >&2
  curl -sS -X POST "$API/v1/backup-repositories" -H "Authorization: Bearer $TOKEN" \
    -H 'Content-Type: application/json' -H "Idempotency-Key: demo-$1" \
    -d "{\"name\":\"$1\",\"namespace\":\"$2\",\"bucket\":\"$3\",\"region\":\"us-east-1\"}" \
    -D "$RUN/$1.headers" -o "$RUN/$1.json"
  { head -1 "$RUN/$1.headers"; grep -i '^location' "$RUN/$1.headers" || true; } >&2
  # The repository may exist from an earlier run (the create answers from it): reconcile, so
  # it is provisioned wherever the demo points now. 409: the create's own job is still going.
  say "POST /v1/backup-repositories/$1/reconcile" >&2
  local status
  status=$(curl -sS -X POST "$API/v1/backup-repositories/$1/reconcile" -H "Authorization: Bearer $TOKEN" \
    -o "$RUN/$1.reconcile.json" -w '%{http_code}')
  echo "HTTP $status" >&2
  case $status in
    202) jq -r '.job.id' "$RUN/$1.reconcile.json" ;;
    409) jq -r '.job.id' "$RUN/$1.json" ;;
    *) cat "$RUN/$1.reconcile.json" >&2; echo "demo: reconcile of $1 failed" >&2; echo none ;;
  esac
}
FAILED=0
follow() { # name job_id
  [ "$2" = none ] && { FAILED=1; return 0; }
  local last=""
  for _ in $(seq 1 60); do
    local view; view=$(curl -sS -H "Authorization: Bearer $TOKEN" "$API/v1/jobs/$2?wait=2s")
    local line; line=$(jq -r '"\(.state) attempt \(.attempts): " + ([.steps[] | "\(.name)=\(.state)"] | join(" "))' <<<"$view")
    [ "$line" != "$last" ] && echo "  $1: $line" && last=$line
    case $(jq -r .state <<<"$view") in
      succeeded) return 0 ;;
      failed|cancelled) echo "  $1: $(jq -r .last_error <<<"$view")"; FAILED=1; return 0 ;;
    esac
  done
  echo "  $1: still not finished"; FAILED=1
}
JOB_Z=$(provision zitadel zitadel holos-zitadel-backups)
JOB_H=$(provision holos-server holos holos-server-backups)
say "following both jobs"
follow zitadel "$JOB_Z"
follow holos-server "$JOB_H"

for name in zitadel holos-server; do
  say "GET /v1/backup-repositories/$name"
  curl -sS -H "Authorization: Bearer $TOKEN" "$API/v1/backup-repositories/$name" \
    | jq '{name, namespace, bucket, region, state, last_error, resources, pgbackrest}'
done

say "bucket settings as read back from S3"
"$ROOT/.venv/bin/python" "$ROOT/scripts/show_bucket.py" holos-zitadel-backups holos-server-backups \
  || { echo "demo: a bucket is missing at $AWS_ENDPOINT_URL"; FAILED=1; }

say "Secrets in the management cluster (values redacted)"
"$ROOT/.venv/bin/python" "$ROOT/scripts/show_secret.py" zitadel/holos-zitadel-backups holos/holos-server-backups \
  || { echo "demo: a Secret is missing in the cluster of $KUBECONFIG"; FAILED=1; }

say "the service's role cannot rewrite the audit log"
for statement in "UPDATE audit_events SET actor = 'someone else'" "ALTER TABLE audit_events DISABLE TRIGGER ALL"; do
  if refusal=$(psql -q -h 127.0.0.1 -U bp_runtime -d "$DB" -c "$statement" 2>&1); then
    echo "demo: bp_runtime could run: $statement"; FAILED=1
  else
    echo "  $statement: ${refusal#ERROR:  }"
  fi
done

say "audit log (last 12 entries)"
curl -sS -H "Authorization: Bearer $TOKEN" "$API/v1/audit?limit=200" \
  | jq -r '.items[-12:][] | "\(.at) \(.actor) \(.repository // "-") \(.action) \(.outcome)"'
echo
echo "demo: done (moto: $USING_MOTO, emulator: $USING_EMULATOR). Logs in .run/."
exit $FAILED
