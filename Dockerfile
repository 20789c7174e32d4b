# backup-provisioner's release image, for CI systems that reach container registries:
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) -t backup-provisioner .
# The build stage runs scripts/image-build-stage.sh, the same script CI runs on the host to build
# the runtime image offline from deploy/image/Containerfile.offline (scripts/build-image.sh;
# README "Container image"). Both final stages declare the same user, labels, environment,
# entrypoint and command (scripts/test-image.sh checks that they agree).

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
# Debian 12's glibc and libgcc (the build stage is Debian 12 too), CA certificates, no shell.
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Dependencies first, in a layer of their own: only a change of Cargo.toml/Cargo.lock (or of a
# patched dependency in vendor/) rebuilds it (placeholder sources, like cargo-chef).
COPY Cargo.toml Cargo.lock ./
COPY tools/kube-emulator/Cargo.toml tools/kube-emulator/
# Patched dependencies (vendor/README.md) are dependencies: built with the others.
COPY vendor/ vendor/
COPY scripts/image-build-stage.sh scripts/
RUN bash scripts/image-build-stage.sh deps
# Then the sources (.dockerignore keeps target/, .git and local state out).
COPY . .
RUN bash scripts/image-build-stage.sh release /out

FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
COPY --from=build /out/ /
LABEL org.opencontainers.image.title="backup-provisioner" \
      org.opencontainers.image.description="Provisions pgBackRest S3 repositories (bucket, IAM user and key, s3.conf Secret) for PGO PostgresClusters through a REST API" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Holos platform team" \
      org.opencontainers.image.documentation="README.md, deploy/README.md" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
ENV BP_LISTEN_ADDR=0.0.0.0:8080 BP_LOG_JSON=true
# Numeric, so that Kubernetes' runAsNonRoot can check it (deploy/base/deployment.yaml: 10001).
# The service writes no file: it runs with a read-only root filesystem and no volume.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["backup-provisioner"]
CMD ["serve"]
