//! Builds the `node-ebpf` kernel crate for the BPF target (nightly + bpf-linker, via aya-build) and
//! leaves the object in OUT_DIR, where `src/capture.rs` embeds it.
use std::{env, path::PathBuf, process::Command};

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("node-agent has no parent directory"))?;
    let ebpf_dir = workspace.join("node-ebpf");
    let common_dir = workspace.join("node-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    // Rebuild when bpf-linker is reinstalled: the object depends on it like on a compiler.
    println!("cargo:rerun-if-env-changed=PATH");
    if let Some(linker) = find_in_path("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // The kernel crate needs `-Z build-std=core`: nightly if installed, else the current toolchain
    // with RUSTC_BOOTSTRAP=1 (aya-build then passes -Z flags to it).
    let toolchain = if nightly_installed() {
        Toolchain::Nightly
    } else {
        println!("cargo:warning=no nightly toolchain; building node-ebpf with RUSTC_BOOTSTRAP=1");
        // SAFETY: build scripts are single-threaded; the variable is for aya-build's child cargo.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
        Toolchain::Custom(CURRENT_TOOLCHAIN)
    };
    aya_build::build_ebpf(
        [Package {
            name: "node-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        toolchain,
    )
}

/// rust-toolchain.toml pins this; keep the two in step.
const CURRENT_TOOLCHAIN: &str = "1.95.0";

fn nightly_installed() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
