//! The aggregator binary as a child process, for tests and benches that run the whole system.
//! `cargo test` builds it for its own package's tests; it is found next to this executable (and
//! built if it is missing).

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
        let child = Command::new(aggregator_binary())
            .args(["--listen", &listen.to_string()])
            .args(["--otlp-endpoint", &format!("http://{otlp}")])
            .args(["--data-dir", &data.display().to_string()])
            .args(["--settle", "1s", "--grace", "30s"])
            .args(["--metrics-listen", "127.0.0.1:0", "--kubernetes=false"])
            .args(["--admin-listen", "127.0.0.1:0", "--tls-mode=disabled"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(listen).is_err() {
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
    let binary = profile_dir.join("mermin-aggregator");
    if !binary.exists() {
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
        let status = build.status().unwrap();
        assert!(status.success(), "building the aggregator binary failed");
    }
    binary
}
