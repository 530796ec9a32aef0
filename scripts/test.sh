#!/usr/bin/env bash
# Sets up a fresh machine (idempotent) and runs every check CI runs: formatting, lints (host
# crates and the eBPF crate) and all tests, including the ones that attach real eBPF programs in
# network namespaces (root needed).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the capture tests create network namespaces and load eBPF; run as root" >&2
  exit 1
fi

bash scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy (host crates)"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo clippy (node-ebpf, BPF target)"
if rustup toolchain list | grep -q '^nightly'; then
  cargo +nightly clippy -p node-ebpf --target bpfel-unknown-none -Z build-std=core --release \
    --locked -- -D warnings
fi
echo "== cargo test"
cargo test --locked
echo "== chart tests"
bash scripts/chart-test.sh
