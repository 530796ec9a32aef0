# syntax=docker/dockerfile:1
# The node agent. Its build script compiles the eBPF programs (node-ebpf) into the binary, which
# needs nightly with rust-src and bpf-linker built against the toolchain's LLVM: scripts/setup.sh
# installs exactly that, here as on a developer's machine.
# Build from the repository root:  docker build -f deploy/docker/agent.Dockerfile -t mermin-agent .

FROM rust:1.95.0-bookworm AS build
WORKDIR /src
ENV RUSTUP_TOOLCHAIN=1.95.0
COPY rust-toolchain.toml ./
COPY scripts/setup.sh scripts/
RUN bash scripts/setup.sh
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mermin-node-agent \
    && install -D -m 0755 target/release/mermin-agent /out/mermin-agent

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/mermin-agent /usr/local/bin/mermin-agent
# Root (the base's default user is nonroot), with only the capabilities the chart adds (BPF, NET_ADMIN, PERFMON): loading and
# attaching TC programs is not possible as another user.
# hadolint ignore=DL3002
USER 0:0
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/mermin-agent"]
