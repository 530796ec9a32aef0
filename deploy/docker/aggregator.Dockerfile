# syntax=docker/dockerfile:1
# The aggregator: a static-enough Rust binary on distroless, as a non-root user.
# Build from the repository root:  docker build -f deploy/docker/aggregator.Dockerfile -t mermin-aggregator .

FROM rust:1.95.0-bookworm AS build
WORKDIR /src
# rust-toolchain.toml pins 1.95.0 (the image's toolchain); clippy/rustfmt are not needed here.
ENV RUSTUP_TOOLCHAIN=1.95.0
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mermin-aggregator \
    && install -D -m 0755 target/release/mermin-aggregator /out/mermin-aggregator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/mermin-aggregator /usr/local/bin/mermin-aggregator
# The nonroot user of distroless (uid/gid 65532); the chart runs the pod as the same ids.
USER 65532:65532
EXPOSE 4600 9465
ENTRYPOINT ["/usr/local/bin/mermin-aggregator"]
