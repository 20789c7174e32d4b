#!/usr/bin/env bash
# Proves the real etcd and kube-apiserver built by scripts/build-kube.sh work: starts both on
# loopback (free ports, state in a temp dir), waits for /readyz, creates a namespace and a Secret
# with curl, reads the Secret back and stops both. These are the flags the Rust test harness uses.
#   scripts/kube-apiserver-smoke.sh            (KUBE_BIN_DIR may name the bin dir to use)
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "kube-apiserver-smoke: $*" >&2; exit 1; }
now_ms() { date +%s%3N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

bin="${KUBE_BIN_DIR:-$(bash scripts/build-kube.sh | tail -1)}"
[ -x "$bin/etcd" ] && [ -x "$bin/kube-apiserver" ] || fail "no etcd/kube-apiserver in '$bin'"
work=$(mktemp -d)
pids=() # etcd, kube-apiserver
# kube-apiserver first: it does not exit on SIGTERM while etcd is gone. SIGKILL after 10 s.
stop() {
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop "${pids[i]}"; done
  rm -rf "$work"
}
trap cleanup EXIT

# Serving certificate for 127.0.0.1, the service-account key pair and an admin bearer token.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 \
  -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
  -keyout "$work/serving.key" -out "$work/serving.crt" 2>/dev/null
openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
token=$(openssl rand -hex 24)
echo "$token,admin,admin,system:masters" >"$work/tokens.csv"

etcd_client=$(free_port)
etcd_peer=$(free_port)
etcd_http=$(free_port) # /health; gRPC alone on etcd_client
api_port=$(free_port)

started=$(now_ms)
"$bin/etcd" --name smoke --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_client" \
  --advertise-client-urls "http://127.0.0.1:$etcd_client" \
  --listen-client-http-urls "http://127.0.0.1:$etcd_http" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "smoke=http://127.0.0.1:$etcd_peer" \
  --unsafe-no-fsync --log-level warn >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$etcd_http/health" 2>/dev/null | grep -q '"health":"true"' && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$work/etcd.log" >&2; fail "etcd exited"; }
  sleep 0.1
done
curl -sf "http://127.0.0.1:$etcd_http/health" | grep -q '"health":"true"' \
  || { cat "$work/etcd.log" >&2; fail "etcd not healthy after 10s"; }
etcd_ready=$(now_ms)

"$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_client" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
  --tls-cert-file "$work/serving.crt" --tls-private-key-file "$work/serving.key" \
  --token-auth-file "$work/tokens.csv" \
  --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$work/sa.key" \
  --service-account-signing-key-file "$work/sa.key" \
  --service-cluster-ip-range 10.0.0.0/24 \
  --endpoint-reconciler-type none \
  --cert-dir "$work/certs" >"$work/kube-apiserver.log" 2>&1 &
pids+=($!)

api="https://127.0.0.1:$api_port"
k() { curl -ksS --fail-with-body -H "Authorization: Bearer $token" "$@"; }
ready=no
for _ in $(seq 1 600); do
  if [ "$(k "$api/readyz" 2>/dev/null)" = ok ]; then ready=yes; break; fi
  kill -0 "${pids[1]}" 2>/dev/null || { tail -30 "$work/kube-apiserver.log" >&2; fail "kube-apiserver exited"; }
  sleep 0.1
done
[ "$ready" = yes ] || { tail -30 "$work/kube-apiserver.log" >&2; k "$api/readyz?verbose" >&2 || true; fail "kube-apiserver not ready after 60s"; }
api_ready=$(now_ms)

k -X POST -H 'Content-Type: application/json' "$api/api/v1/namespaces" \
  -d '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"smoke"}}' >/dev/null \
  || fail "creating the namespace failed"
k -X POST -H 'Content-Type: application/json' "$api/api/v1/namespaces/smoke/secrets" \
  -d '{"apiVersion":"v1","kind":"Secret","metadata":{"name":"smoke-s3"},"stringData":{"s3.conf":"[global]\n"}}' \
  >/dev/null || fail "creating the Secret failed"
value=$(k "$api/api/v1/namespaces/smoke/secrets/smoke-s3" | python3 -c \
  'import base64, json, sys; print(base64.b64decode(json.load(sys.stdin)["data"]["s3.conf"]).decode(), end="")')
[ "$value" = "[global]" ] || fail "the Secret read back holds '$value'"
version=$(k "$api/version" | python3 -c 'import json, sys; print(json.load(sys.stdin)["gitVersion"])')
done_ms=$(now_ms)
stop "${pids[1]}"
stopped=$(now_ms)

echo "kube-apiserver-smoke: kube-apiserver $version on etcd $("$bin/etcd" --version | awk 'NR==1 {print $3}')"
echo "kube-apiserver-smoke: etcd healthy in $(( etcd_ready - started )) ms," \
  "kube-apiserver ready in $(( api_ready - etcd_ready )) ms," \
  "namespace + Secret round trip in $(( done_ms - api_ready )) ms," \
  "kube-apiserver stopped in $(( stopped - done_ms )) ms"
echo "kube-apiserver-smoke: ok"
