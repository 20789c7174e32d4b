#!/usr/bin/env bash
# `make demo` pointed at another target after an earlier run must provision there, not answer
# from the earlier run's database: runs the demo against one moto, then against a second, empty
# moto with the same database (the create requests replay the first run's answers), and checks
# that the second moto holds both buckets. The demo's own read-back fails it when a bucket or a
# Secret is missing. Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p .run
export BP_DEMO_DATABASE=backup_provisioner_demo_retarget
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_REGION=us-east-1
PIDS=()
drop_db() { psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $BP_DEMO_DATABASE WITH (FORCE)" postgres; }
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; drop_db || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start_moto() { # prints the endpoint
  local port; port=$(free_port)
  "$ROOT/.venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$ROOT/.run/moto-retarget-$port.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 150); do curl -fsS -o /dev/null "http://127.0.0.1:$port/moto-api/" 2>/dev/null && break; sleep 0.2; done
  ENDPOINT="http://127.0.0.1:$port"
}
drop_db
for run in first second; do
  start_moto
  echo "demo_retarget: $run run against $ENDPOINT"
  if ! AWS_ENDPOINT_URL=$ENDPOINT bash "${DEMO:-scripts/demo.sh}" >".run/demo-retarget-$run.log" 2>&1; then
    tail -30 ".run/demo-retarget-$run.log"; echo "demo_retarget: the $run run failed"; exit 1
  fi
done
AWS_ENDPOINT_URL=$ENDPOINT "$ROOT/.venv/bin/python" scripts/show_bucket.py \
  holos-zitadel-backups holos-server-backups >/dev/null \
  || { echo "demo_retarget: the second target lacks a bucket"; exit 1; }
echo "demo_retarget: both runs provisioned their own target"
