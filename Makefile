# backup-provisioner: two set-up commands on a fresh Debian machine.
#   make demo   install what is missing, start Postgres, moto and the Kubernetes emulator,
#               run the service and provision two repositories end to end.
#   make run    start what is missing (as make demo does) and keep the service in the foreground;
#               a second terminal runs `source .run/env` and follows the README's walkthrough.
#   make install  cargo install the backup-provisioner binary (into ~/.cargo/bin).
#   make test   install and start what the tests need (and build the real kube-apiserver and
#               etcd once), then run every test.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/backup-provisioner/target

.PHONY: demo run install test deps kube kube-smoke build lint fmt openapi bench image image-test image-dockerfile-check

demo: deps
	bash scripts/demo.sh

run: deps
	bash scripts/run.sh

# The release binary into ~/.cargo/bin (on PATH with rustup), with the locked dependencies.
install:
	cargo install --path . --locked

test: deps kube
	bash scripts/test.sh

deps:
	bash scripts/install-deps.sh

# The real kube-apiserver and etcd, built once from Go modules into the cache outside the clone
# (tools/kube-apiserver, tools/etcd); kube-smoke starts both and writes a Secret with curl.
kube:
	bash scripts/build-kube.sh

kube-smoke: kube
	bash scripts/kube-apiserver-smoke.sh

build:
	cargo build --workspace --all-targets

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

# The runtime image, built with podman without any registry (deploy/image/Containerfile.offline
# from the release binary that scripts/image-build-stage.sh, the Dockerfile's build stage, makes);
# image-test also runs it (--version, migrate, serve /readyz) as UID 10001 on a read-only root.
image: deps
	bash scripts/build-image.sh

image-test: deps
	bash scripts/test-image.sh

# The Dockerfile's build stage run on the host instruction by instruction (no rust image can be
# pulled here): dependencies from the manifests alone, then the real release binary. Minutes.
image-dockerfile-check:
	bash scripts/check-dockerfile-build-stage.sh

# Regenerates openapi/openapi.json from the code.
openapi:
	cargo run --quiet -- openapi > openapi/openapi.json

# Release-mode benchmarks against Postgres, moto and the real kube-apiserver (BENCHMARKS.md).
bench: deps kube
	cargo bench --bench provisioning
	cargo bench --bench load
