#!/usr/bin/env bash
# CI's image test (run by scripts/test.sh): builds the runtime image offline
# (scripts/build-image.sh: the release build is cached, so a warm run only re-tags) and runs it
# as the Deployment does, as UID 10001 with a read-only root filesystem and no writable /tmp:
#   1. the Dockerfile's runtime stage and deploy/image/Containerfile.offline agree line for line;
#      the image's user, entrypoint, command and OCI labels are what they say;
#   2. `--version`;
#   3. `migrate --grant-to <runtime role>` into a scratch database of the test Postgres;
#   4. `serve` (as the runtime role, no workers) answering /healthz and /readyz, its process
#      checked to be UID/GID 10001 on a read-only root, then stopped with SIGTERM (exit 0).
# How the image runs: `podman run` where the sandbox lets it (plain, then with lowered rlimits,
# then with runc), else `podman image mount` and `chroot --userspec` into the image's root
# bind-mounted read-only. BP_IMAGE_RUN=podman|podman-rlimits|podman-runc|chroot forces one.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/backup-provisioner/target}"
PG="${TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}"
PG_HOSTPORT=${PG#*@}
PG_HOSTPORT=${PG_HOSTPORT%%/*}

say() { echo "image-test: $*"; }
fail() { echo "image-test: FAILED: $*" >&2; exit 1; }
# Prints a command as CI runs it (secrets masked) on the script's stdout (fd 3: even from
# inside $(...)); run: and runs it.
exec 3>&1
show() {
  local arg line=""
  for arg in "$@"; do
    [[ "$arg" == *SECRET=* ]] && arg="${arg%%=*}=***"
    if [[ "$arg" =~ ^[[:alnum:]_./:=,@%+-]+$ ]]; then line+="$arg "; else line+="'${arg//\'/\'\\\'\'}' "; fi
  done
  say "\$ $line" >&3
}
run() { show "$@"; "$@"; }

command -v podman >/dev/null ||
  fail "podman not found: run 'make deps' (scripts/install-deps.sh installs podman and runc)"
for tool in jq curl psql; do
  command -v "$tool" >/dev/null || fail "$tool not found: run 'make deps'"
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bp-image-test.XXXXXX")
CLEANUP=()
cleanup() {
  local i
  for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[$i]}" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# The runtime stage of a Containerfile: its instructions after the last FROM, continuation
# lines joined, without comments, COPY (where the files come from differs) and ENV PATH (set by
# the distroless base, by hand on scratch).
runtime_stage() {
  sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$1" | grep -Ev '^[[:space:]]*(#|$)' |
    awk '/^FROM /{ stage = ""; next } /^COPY |^ENV PATH=/{ next } { stage = stage $0 "\n" }
         END { printf "%s", stage }'
}

check_containerfiles() {
  diff <(runtime_stage Dockerfile) <(runtime_stage deploy/image/Containerfile.offline) ||
    fail "the Dockerfile's runtime stage and deploy/image/Containerfile.offline differ (above)"
  [ "$(grep -c '^FROM ' Dockerfile)" -ge 2 ] || fail "the Dockerfile is not multi-stage"
  # Dependencies are built (and cached) before the sources are copied in.
  local order
  order=$(grep -n 'image-build-stage.sh deps\|^COPY \. \.\|image-build-stage.sh release' Dockerfile |
    cut -d: -f2- | tr '\n' '|')
  [[ "$order" =~ deps.*\|COPY\ \.\ \..*\|.*release ]] ||
    fail "the Dockerfile must run image-build-stage.sh deps, then COPY . ., then release"
  say "Dockerfile: multi-stage, dependencies cached apart from the sources, runtime stage = Containerfile.offline"
}

VERSION=$(awk -F'"' '/^version = / { print $2; exit }' Cargo.toml)

check_image_config() {
  local config
  config=$(podman image inspect --format '{{json .Config}}' "$TAG")
  jq -e '.User == "10001:10001" and .Entrypoint == ["backup-provisioner"] and .Cmd == ["serve"]' \
    <<<"$config" >/dev/null || fail "image config: $(jq -c '{User, Entrypoint, Cmd}' <<<"$config")"
  jq -e --arg v "$VERSION" '.Labels as $l | ["title", "description", "licenses", "version", "revision"]
      | all($l["org.opencontainers.image." + .] // "" | length > 0)
      and $l["org.opencontainers.image.version"] == $v' <<<"$config" >/dev/null ||
    fail "OCI labels missing: $(jq -c .Labels <<<"$config")"
  local revision
  revision=$(jq -r '.Labels["org.opencontainers.image.revision"]' <<<"$config")
  [[ "$revision" == "$(git rev-parse HEAD)"* ]] || fail "revision label $revision is not HEAD's"
  SIZE=$(podman image inspect --format '{{.Size}}' "$TAG")
  say "image $TAG: user 10001:10001, ENTRYPOINT [backup-provisioner], CMD [serve], OCI labels (revision $revision)"
  say "image size: $SIZE bytes ($(awk -v s="$SIZE" 'BEGIN { printf "%.1f", s / 1048576 }') MiB)"
}

# --- How the image runs -------------------------------------------------------------------
# Flags every podman variant shares: the Deployment's securityContext, the host's loopback
# (Postgres, the probe), no tmpfs anywhere (--read-only-tmpfs=false: as in the pod, no volume).
PODMAN_FLAGS=(--read-only --read-only-tmpfs=false --user 10001:10001 --cap-drop ALL
  --security-opt no-new-privileges --network host)
# The sandbox here refuses to raise rlimits and crun refuses hybrid cgroups: the later variants.
LOW_RLIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
podman_variant() {
  case "$1" in
    podman) PODMAN=(podman run) ;;
    podman-rlimits) PODMAN=(podman run "${LOW_RLIMITS[@]}") ;;
    podman-runc) PODMAN=(podman --runtime runc run "${LOW_RLIMITS[@]}") ;;
  esac
}

# The chroot fallback: the image's root (podman image mount, itself mounted ro) bind-mounted
# read-only again in a mount namespace of its own (so that the root stays read-only whatever
# podman does), the image's environment, user and entrypoint, nothing of the host's.
chroot_prepare() {
  [ "$(id -u)" -eq 0 ] || fail "the chroot fallback needs root: run this script under 'podman unshare'"
  IMAGE_ROOT=$(podman image mount "$TAG")
  CLEANUP+=("podman image unmount $TAG")
  RO_ROOT=$WORK/root
  mkdir -p "$RO_ROOT"
  mapfile -t IMAGE_ENV < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$TAG" | grep .)
}
# chroot_command ENV... -- ARGS...: the command line that runs the image's entrypoint.
chroot_command() {
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  # shellcheck disable=SC2016 # the inner script's own arguments
  CHROOT=(unshare --mount --propagation private -- bash -c
    'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 && exec "$@"'
    _ "$IMAGE_ROOT" "$RO_ROOT" env -i "${IMAGE_ENV[@]}" "${envs[@]}"
    /usr/sbin/chroot --userspec=10001:10001 "$RO_ROOT" backup-provisioner "$@")
}

# image_run ENV... -- ARGS...: runs the image in the foreground with the chosen path.
image_run() {
  local envs=() flags=()
  while [ "$1" != -- ]; do envs+=("$1"); flags+=(--env "$1"); shift; done
  shift
  if [ "$RUN_PATH" = chroot ]; then
    chroot_command "${envs[@]}" -- "$@"
    run "${CHROOT[@]}"
  else
    run "${PODMAN[@]}" --rm "${PODMAN_FLAGS[@]}" "${flags[@]}" "$TAG" "$@"
  fi
}

choose_run_path() {
  local candidate out
  for candidate in ${BP_IMAGE_RUN:-podman podman-rlimits podman-runc chroot}; do
    RUN_PATH=$candidate
    case "$candidate" in
      chroot) chroot_prepare ;;
      podman-runc) command -v runc >/dev/null || { say "no runc: run 'make deps'"; continue; } ;&
      *) podman_variant "$candidate" ;;
    esac
    if image_run -- --version >/dev/null 2>"$WORK/probe.err"; then
      say "run path: $candidate"
      return
    fi
    say "run path $candidate does not work here: $(tail -1 "$WORK/probe.err")"
  done
  fail "no way to run the image worked"
}

# --- The checks ---------------------------------------------------------------------------
check_version() {
  local out
  out=$(image_run -- --version 2>"$WORK/version.err") || { cat "$WORK/version.err"; fail "--version"; }
  [ "$out" = "backup-provisioner $VERSION" ] || fail "--version printed '$out'"
  say "--version: $out"
}

SCRATCH_DB=bp_image_test_$$
RUNTIME_ROLE=bp_image_rt_$$
psql_admin() { psql -X -q -v ON_ERROR_STOP=1 "$PG/${2:-postgres}" -c "$1"; }

# The runtime role (LOGIN, owns nothing) and a database owned by postgres; cleaned up in the
# reverse order (the database's grants go with it, then the role can go).
scratch_database() {
  psql_admin "CREATE ROLE $RUNTIME_ROLE LOGIN"
  CLEANUP+=("psql_admin 'DROP ROLE IF EXISTS $RUNTIME_ROLE'")
  psql_admin "CREATE DATABASE $SCRATCH_DB"
  CLEANUP+=("psql_admin 'DROP DATABASE IF EXISTS $SCRATCH_DB WITH (FORCE)'")
}

check_migrate() {
  local applied expected
  image_run "BP_MIGRATION_DATABASE_URL=postgres://postgres@$PG_HOSTPORT/$SCRATCH_DB" \
    -- migrate --grant-to "$RUNTIME_ROLE" >"$WORK/migrate.log" 2>&1 ||
    { cat "$WORK/migrate.log"; fail "migrate failed"; }
  applied=$(psql -X -tA "$PG/$SCRATCH_DB" -c 'SELECT count(*) FROM _sqlx_migrations WHERE success')
  expected=$(find migrations -name '*.sql' | wc -l)
  [ "$applied" -eq "$expected" ] || fail "migrate applied $applied of $expected migrations"
  say "migrate --grant-to $RUNTIME_ROLE: $applied migrations applied to $SCRATCH_DB"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Starts `serve` in the background; sets SERVICE_PID (the service's process, seen from here).
start_serve() {
  PORT=$(free_port)
  local envs=("DATABASE_URL=postgres://$RUNTIME_ROLE@$PG_HOSTPORT/$SCRATCH_DB"
    "BP_JWT_HS256_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    "BP_LISTEN_ADDR=127.0.0.1:$PORT" BP_WORKERS=0 BP_SHUTDOWN_GRACE=5s HOSTNAME=image-test)
  if [ "$RUN_PATH" = chroot ]; then
    chroot_command "${envs[@]}" -- serve
    show "${CHROOT[@]}"
    # A simple command in the background: $! is the service itself (unshare, bash, env and
    # chroot exec one another).
    "${CHROOT[@]}" >"$WORK/serve.log" 2>&1 &
    SERVICE_PID=$!
    CLEANUP+=("kill -KILL $SERVICE_PID")
  else
    local flags=() e
    for e in "${envs[@]}"; do flags+=(--env "$e"); done
    run "${PODMAN[@]}" -d --name "bp-image-test-$$" "${PODMAN_FLAGS[@]}" "${flags[@]}" "$TAG" >/dev/null
    CLEANUP+=("podman rm -f bp-image-test-$$")
    SERVICE_PID=$(podman inspect --format '{{.State.Pid}}' "bp-image-test-$$")
  fi
}

serve_log() {
  if [ "$RUN_PATH" = chroot ]; then cat "$WORK/serve.log"; else podman logs "bp-image-test-$$"; fi
}

wait_ready() {
  local deadline=$((SECONDS + 30)) body=""
  while [ $SECONDS -lt $deadline ]; do
    body=$(curl -fsS --max-time 2 "http://127.0.0.1:$PORT/readyz" 2>/dev/null) && break
    kill -0 "$SERVICE_PID" 2>/dev/null || { serve_log; fail "serve exited before it was ready"; }
    sleep 0.2
  done
  [ "$body" = ready ] || { serve_log; fail "/readyz did not answer 'ready' within 30 s"; }
  [ "$(curl -fsS --max-time 2 "http://127.0.0.1:$PORT/healthz")" = ok ] || fail "/healthz"
  say "serve: /readyz answered '$body', /healthz 'ok'"
}

# The serving process itself: UID/GID 10001, its root mounted read-only, logs as JSON lines (the
# image's BP_LOG_JSON=true).
check_process() {
  local uid gid root_options first_line
  uid=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$SERVICE_PID/status")
  gid=$(awk '/^Gid:/ { print $2, $3, $4, $5 }' "/proc/$SERVICE_PID/status")
  [ "$uid $gid" = "10001 10001 10001 10001 10001 10001 10001 10001" ] ||
    fail "serve runs as uid '$uid' gid '$gid'"
  root_options=$(awk '$5 == "/" { print $6 }' "/proc/$SERVICE_PID/mountinfo" | tail -1)
  [[ "$root_options" == ro* ]] || fail "serve's root filesystem is mounted '$root_options'"
  first_line=$(serve_log | sed -n 1p)
  jq -e .level <<<"$first_line" >/dev/null || fail "serve does not log JSON: $first_line"
  say "serve: process $SERVICE_PID runs as uid/gid 10001 on a root mounted '$root_options', logs JSON"
}

stop_serve() {
  local status
  if [ "$RUN_PATH" = chroot ]; then
    kill -TERM "$SERVICE_PID"
    status=0
    wait "$SERVICE_PID" || status=$?
  else
    podman stop --time 15 "bp-image-test-$$" >/dev/null
    status=$(podman inspect --format '{{.State.ExitCode}}' "bp-image-test-$$")
  fi
  [ "$status" -eq 0 ] || { serve_log; fail "serve exited with $status after SIGTERM"; }
  say "serve: stopped by SIGTERM, exit code 0"
}

started=$(date +%s)
check_containerfiles
TAG=$(bash scripts/build-image.sh | tail -1)
check_image_config
choose_run_path
check_version
scratch_database
check_migrate
start_serve
wait_ready
check_process
stop_serve
say "passed with run path '$RUN_PATH' in $(($(date +%s) - started)) s (image $TAG, $SIZE bytes)"
