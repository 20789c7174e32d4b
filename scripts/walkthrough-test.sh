#!/usr/bin/env bash
# The README's walkthrough, as a new user follows it: starts `make run` in the background (its
# own run directory, port and database; moto and the Kubernetes emulator), waits for its
# readiness line, then runs every ```sh block of README.md that follows a `<!-- walkthrough -->`
# line, in order and as written, in a directory whose .run/env is the one `make run` wrote (the
# blocks `source .run/env` as the README says). Every `curl` must succeed (it runs with
# --fail-with-body), every command must exit 0 (set -e), and at the end zitadel and holos-server
# are ready and zitadel-2 deleted. Run by scripts/test.sh; logs in .run/walkthrough/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/.run/walkthrough
rm -rf "$WORK"; mkdir -p "$WORK"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export BP_RUN_DIR=$WORK/.run BP_RUN_PORT=$(free_port) BP_RUN_DATABASE=backup_provisioner_walkthrough
# The walkthrough is written for the emulators `make run` starts.
unset AWS_ENDPOINT_URL KUBECONFIG
fail() { echo "walkthrough-test: $*" >&2; tail -30 "$WORK/run.log" >&2 || true; exit 1; }

# 1. The blocks, extracted from the README (so the test and the README cannot drift apart).
python3 - "$ROOT/README.md" >"$WORK/walkthrough.sh" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
blocks = re.findall(r"^<!-- walkthrough -->\n```sh\n(.*?)^```$", text, re.M | re.S)
if len(blocks) < 3 or "source .run/env" not in blocks[0]:
    sys.exit(f"README.md: expected the walkthrough blocks (found {len(blocks)})")
print("set -euo pipefail\ncurl() { command curl --fail-with-body \"$@\"; }\nset -x")
for block in blocks:
    print(block)
PY

# 2. make run, in its own process group, stopped however this script ends.
setsid make --no-print-directory run >"$WORK/run.log" 2>&1 &
RUN_PID=$!
stop() {
  kill -TERM -- "-$RUN_PID" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 -- "-$RUN_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$RUN_PID" 2>/dev/null || true
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $BP_RUN_DATABASE WITH (FORCE)" postgres 2>/dev/null || true
}
trap stop EXIT
deadline=$(( $(date +%s) + 600 ))
until grep -q "backup-provisioner: ready at" "$WORK/run.log" 2>/dev/null; do
  kill -0 "$RUN_PID" 2>/dev/null || fail "make run exited before it was ready"
  [ "$(date +%s)" -lt "$deadline" ] || fail "make run was not ready within 600 s"
  sleep 0.5
done
[ -s "$BP_RUN_DIR/env" ] || fail "make run wrote no $BP_RUN_DIR/env"

# 3. The README's commands, then what they must have left behind.
cat >>"$WORK/walkthrough.sh" <<'SH'
set +x
source .run/env
state() { command curl -fsS -H "Authorization: Bearer $TOKEN" "$API/v1/backup-repositories/$1" | jq -r .state; }
[ "$(state zitadel)" = ready ] && [ "$(state holos-server)" = ready ] && [ "$(state zitadel-2)" = deleted ] \
  || { echo "end state: zitadel $(state zitadel), holos-server $(state holos-server), zitadel-2 $(state zitadel-2)"; exit 1; }
SH
if ! (cd "$WORK" && timeout 600 bash walkthrough.sh >"$WORK/walkthrough.log" 2>&1); then
  tail -40 "$WORK/walkthrough.log" >&2
  fail "the README's walkthrough failed (log: $WORK/walkthrough.log)"
fi
echo "walkthrough-test: the README's walkthrough ran as written against make run ($(grep -c '^+ ' "$WORK/walkthrough.log") commands)"
