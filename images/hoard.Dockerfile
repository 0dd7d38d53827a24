# syntax=docker/dockerfile:1
# hoard image: the CLI: hoard (local repository verbs) and kubectl-hoard (the kubectl plugin).
#
# Build from the repository root (the context must be the whole workspace):
#   docker build -f images/hoard.Dockerfile -t hoard/hoard:0.1.0 .
# Multi-stage: a Rust builder (Debian 12) compiles the release binaries; the runtime is
# distroless (gcr.io/distroless/cc-debian12): glibc, libgcc, the CA bundle and tzdata, no
# shell and no package manager. The binaries link only glibc and libgcc dynamically (TLS is
# rustls with aws-lc-rs compiled in, no OpenSSL), and the builder's Debian 12 matches the
# runtime's glibc. Runtime: the `:nonroot` variant (UID 65532).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# aws-lc-sys and zstd-sys build C code with the stock toolchain (cmake/clang not needed).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p hoard --bin hoard --bin kubectl-hoard \
 && mkdir -p /out && for b in hoard kubectl-hoard; do cp "target/release/$b" /out/; done

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/hoard /usr/local/bin/hoard
COPY --from=build /out/kubectl-hoard /usr/local/bin/kubectl-hoard
LABEL org.opencontainers.image.title="hoard" \
      org.opencontainers.image.description="hoard: the CLI: hoard (local repository verbs) and kubectl-hoard (the kubectl plugin)." \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/hoard"]
