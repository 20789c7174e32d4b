#!/usr/bin/env bash
# Runs every test of the workspace against real Postgres, moto, the real kube-apiserver and etcd
# (started by the tests themselves, tests/api/support/kube_apiserver.rs) and pgBackRest.
# `make test` installs and starts the others first (scripts/install-deps.sh); `make demo`, run
# here as a smoke test, uses the Kubernetes emulator.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/backup-provisioner/target}"
export TEST_POSTGRES_URL="${TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}"
export RUST_BACKTRACE=1
# The integration tests drive whole services in one test thread: debug builds need more than
# libtest's 2 MiB stack for their deepest futures.
# The console's browser test saves a screenshot of each page here: the test run's artifacts.
export BP_UI_SCREENSHOTS="${BP_UI_SCREENSHOTS:-$PWD/.run/ui-screenshots}"
export RUST_MIN_STACK="${RUST_MIN_STACK:-8388608}"
# The real kube-apiserver and etcd (scripts/build-kube.sh; instant once built).
KUBE_BIN_DIR="${KUBE_BIN_DIR:-$(bash scripts/build-kube.sh | tail -1)}"
export KUBE_BIN_DIR
started=$(date +%s)
# The README's first command, end to end, as a smoke test (its output goes to .run/demo.log).
mkdir -p .run
if ! bash scripts/demo.sh >.run/demo.log 2>&1; then
  tail -40 .run/demo.log; echo "make test: make demo failed"; exit 1
fi
echo "make test: make demo provisioned both repositories ($(( $(date +%s) - started ))s)"
# The demo pointed at another target provisions there (issue 12; .run/demo-retarget-*.log).
if ! bash scripts/demo_retarget.sh >.run/demo-retarget.log 2>&1; then
  tail -40 .run/demo-retarget.log; echo "make test: make demo against a second target failed"; exit 1
fi
echo "make test: make demo provisioned a second target ($(( $(date +%s) - started ))s)"
# The README's walkthrough (curl and the admin CLI), as written, against `make run`.
if ! bash scripts/walkthrough-test.sh >.run/walkthrough-test.log 2>&1; then
  tail -60 .run/walkthrough-test.log; echo "make test: the README's walkthrough failed against make run"; exit 1
fi
echo "make test: the README's walkthrough ran against make run ($(( $(date +%s) - started ))s)"
# The runtime image, built offline with podman from the cached release build and run as the
# Deployment runs it: UID 10001, read-only root (scripts/test-image.sh; .run/image.log).
if ! bash scripts/test-image.sh >.run/image.log 2>&1; then
  tail -60 .run/image.log; echo "make test: the image test failed"; exit 1
fi
grep '^image-test:' .run/image.log
echo "make test: the image builds and runs ($(( $(date +%s) - started ))s)"
# Formatting is part of the contract (cargo fmt --all).
cargo fmt --all -- --check
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
echo "make test: console screenshots (artifacts) in $BP_UI_SCREENSHOTS:"
ls -l "$BP_UI_SCREENSHOTS" 2>/dev/null || true
