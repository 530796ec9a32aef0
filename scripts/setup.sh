#!/usr/bin/env bash
# Prepares a fresh machine to build and test Mermin; idempotent, so a second run takes seconds.
#   - Debian packages the tests and demo use (iproute2 for netns/veth, iputils-ping, procps)
#   - rust-src for the nightly toolchain (the eBPF crate is built with -Z build-std=core)
#   - bpf-linker, built against the LLVM that ships inside the Rust toolchain
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

need_apt=()
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v ping >/dev/null 2>&1 || need_apt+=(iputils-ping)
command -v pgrep >/dev/null 2>&1 || need_apt+=(procps)
# The NAT tests write kube-proxy's rules with iptables.
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
if ((${#need_apt[@]})); then
  log "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The eBPF crate is built with -Z build-std=core: on nightly, or (fallback, see
# node-agent/build.rs) on the pinned stable toolchain with RUSTC_BOOTSTRAP=1. Either needs rust-src.
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal || log "no nightly; falling back to stable + RUSTC_BOOTSTRAP"
fi
if rustup toolchain list | grep -q '^nightly'; then
  ebpf_toolchain=nightly
else
  ebpf_toolchain=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$(dirname "$0")/../rust-toolchain.toml")
fi
if ! rustup component list --toolchain "$ebpf_toolchain" --installed | grep -q '^rust-src'; then
  log "adding rust-src to $ebpf_toolchain"
  rustup component add rust-src --toolchain "$ebpf_toolchain"
fi

if ! command -v bpf-linker >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/bpf-linker" ]; then
  # bpf-linker links against libLLVM; the Rust toolchain carries one (libLLVM.so.22.1-rust-*).
  sysroot=$(rustc --print sysroot)
  so=$(find "$sysroot/lib" -maxdepth 1 -name 'libLLVM.so.*-rust-*' | head -n1)
  [ -n "$so" ] || { log "no libLLVM in $sysroot/lib"; exit 1; }
  major=$(basename "$so" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')
  prefix="${XDG_CACHE_HOME:-$HOME/.cache}/mermin/llvm-prefix"
  mkdir -p "$prefix/lib"
  ln -sf "$so" "$prefix/lib/libLLVM.so"
  ln -sf "$so" "$prefix/lib/$(basename "$so")"
  log "building bpf-linker against $(basename "$so") (about a minute)"
  LLVM_PREFIX="$prefix" LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo install bpf-linker --locked --no-default-features --features "llvm-$major"
fi
log "ready"
