//! The shared in-process OTLP receiver (`mermin_test_support::otlp`), served from a synchronous
//! test on a runtime it is given.

#[allow(unused_imports)] // each test binary uses a different part of the harness
pub use mermin_test_support::otlp::{Receiver, int, text};

/// Serves `receiver` over OTLP/gRPC on a free loopback port of `runtime`; returns the address.
pub fn serve(receiver: &Receiver, runtime: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        mermin_test_support::otlp::serve(receiver.clone(), listener).await;
        addr
    })
}
