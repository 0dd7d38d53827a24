# syntax=docker/dockerfile:1
# hoard-agent image: the node agent (DaemonSet) and hoard-agent-cert (its init container). Runs as root: it reads other pods' volumes with CAP_DAC_READ_SEARCH, granted by the chart, not by this image.
#
# Build from the repository root (the context must be the whole workspace):
#   docker build -f images/hoard-agent.Dockerfile -t hoard/hoard-agent:0.1.0 .
# Multi-stage: a Rust builder (Debian 12) compiles the release binaries; the runtime is
# distroless (gcr.io/distroless/cc-debian12): glibc, libgcc, the CA bundle and tzdata, no
# shell and no package manager. The binaries link only glibc and libgcc dynamically (TLS is
# rustls with aws-lc-rs compiled in, no OpenSSL), and the builder's Debian 12 matches the
# runtime's glibc. Runtime: the root variant (no `:nonroot`): the agent must be UID 0 to use
# the capabilities the chart adds.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# aws-lc-sys and zstd-sys build C code with the stock toolchain (cmake/clang not needed).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p hoard-agent --bin hoard-agent --bin hoard-agent-cert \
 && mkdir -p /out && for b in hoard-agent hoard-agent-cert; do cp "target/release/$b" /out/; done

FROM gcr.io/distroless/cc-debian12
COPY --from=build /out/hoard-agent /usr/local/bin/hoard-agent
COPY --from=build /out/hoard-agent-cert /usr/local/bin/hoard-agent-cert
LABEL org.opencontainers.image.title="hoard-agent" \
      org.opencontainers.image.description="hoard: the node agent (DaemonSet) and hoard-agent-cert (its init container). Runs as root: it reads other pods' volumes with CAP_DAC_READ_SEARCH, granted by the chart, not by this image." \
      org.opencontainers.image.licenses="Apache-2.0"
USER 0:0
ENTRYPOINT ["/usr/local/bin/hoard-agent"]
