# Release image (not built in CI here: this machine has no Docker engine). The deploy issue
# fills in deploy/ and verifies this file.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p backup-provisioner --bin backup-provisioner

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 backup-provisioner
COPY --from=build /src/target/release/backup-provisioner /usr/local/bin/backup-provisioner
USER 10001
ENV BP_LISTEN_ADDR=0.0.0.0:8080 BP_LOG_JSON=true
EXPOSE 8080
ENTRYPOINT ["backup-provisioner"]
CMD ["serve"]
