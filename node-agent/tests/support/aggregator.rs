//! The aggregator binary as a child process, for tests and benches that run the whole system.
//! It is built (if it is not current) and found next to this executable.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The aggregator binary as a child process; killed on drop.
pub struct AggregatorProcess(Child);

impl AggregatorProcess {
    pub fn start(listen: SocketAddr, otlp: SocketAddr, data: &Path) -> Self {
        Self::start_with(listen, otlp, data, &["--settle", "1s", "--grace", "30s"])
    }

    /// [`start`](Self::start) with `settings` instead of a 1 s settle and a 30 s grace.
    pub fn start_with(
        listen: SocketAddr,
        otlp: SocketAddr,
        data: &Path,
        settings: &[&str],
    ) -> Self {
        let child = Command::new(aggregator_binary())
            .args(["--listen", &listen.to_string()])
            .args(["--otlp-endpoint", &format!("http://{otlp}")])
            .args(["--data-dir", &data.display().to_string()])
            .args(settings)
            .args(["--metrics-listen", "127.0.0.1:0", "--kubernetes=false"])
            .args(["--admin-listen", "127.0.0.1:0", "--tls-mode=disabled"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !mermin_test_support::process::listening(listen) {
            assert!(
                Instant::now() < deadline,
                "aggregator not listening within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn kill(mut self) {
        self.0.kill().unwrap(); // SIGKILL
        self.0.wait().unwrap();
    }

    /// Stops it as Kubernetes does (SIGTERM), waiting for the exit (bounded: 20 s).
    pub fn stop(mut self) {
        // SAFETY: sends a signal to our own child, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.0.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "aggregator still running 20 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Export requests an aggregator that stopped (gracefully) left in the store in `data`. When
/// it stops, every shard emits what it holds; so 0 means that nothing more would ever be
/// exported — the event "nothing more arrives" waits for, instead of sleeping.
pub fn left_to_export(data: &Path) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // sled's background threads let go of its lock shortly after the process or handle.
        match mermin_aggregator::store::SledStore::open(data) {
            Ok(store) => return store.outbox_len(),
            Err(err) => assert!(Instant::now() < deadline, "reopening the store: {err}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for AggregatorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn aggregator_binary() -> PathBuf {
    // target/<profile>/deps/<test>-<hash> → target/<profile>/mermin-aggregator
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    // Built once per process (a no-op when it is current): another package's binary is not
    // rebuilt by this package's `cargo test`, and a stale one would test old code.
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| build_aggregator(profile_dir));
    profile_dir.join("mermin-aggregator")
}

fn build_aggregator(profile_dir: &Path) {
    let mut build = Command::new(env!("CARGO"));
    build.args([
        "build",
        "-p",
        "mermin-aggregator",
        "--bin",
        "mermin-aggregator",
    ]);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    // Without the variables cargo set for this test binary: build scripts that read them (ring
    // reads CARGO_MANIFEST_DIR and OUT_DIR) would see them change between this build and one
    // from a shell, and each would rebuild half the dependency tree after the other.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
            || matches!(
                &*name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            )
        {
            build.env_remove(&*name);
        }
    }
    let status = build.status().unwrap();
    assert!(status.success(), "building the aggregator binary failed");
}
