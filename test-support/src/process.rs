//! A child process under test (the aggregator binary): killed with SIGKILL when dropped, or
//! stopped as Kubernetes stops a pod; and free loopback ports for it to listen on.

use std::{
    net::SocketAddr,
    process::Child,
    time::{Duration, Instant},
};

use tokio::net::TcpListener;

/// A running child; SIGKILLed (and reaped) on drop.
pub struct Process(pub Child);

impl Process {
    /// Stops it as Kubernetes does (SIGTERM), waiting for the exit (bounded: 20 s).
    pub async fn stop(mut self) {
        let term = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.0.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "still running 20 s after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether something listens at `addr` (on loopback). A connection to a port nobody listens on
/// can succeed by meeting itself (TCP simultaneous open, when the kernel picks that very port as
/// the source of the attempt): that is no listener.
pub fn listening(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect(addr).is_ok_and(|s| s.local_addr().ok() != Some(addr))
}

/// A loopback address nothing listens on (free when asked; the caller binds it soon after).
pub async fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}
