//! Connections to the agent endpoint that never start talking are closed, so they cannot hold
//! the endpoint's slots: a TCP connection that sends nothing within the Hello timeout.

use std::{
    io::Read,
    net::TcpStream,
    time::{Duration, Instant},
};

use mermin_aggregator::{
    export::ExportConfig,
    pipeline::{Aggregator, AggregatorConfig},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_that_sends_nothing_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = AggregatorConfig::loopback(
        dir.path().join("data"),
        ExportConfig::new("http://127.0.0.1:9"),
    );
    config.limits.hello_timeout = Duration::from_millis(300);
    let aggregator = Aggregator::start(config).await.unwrap();
    let addr = aggregator.local_addr;
    let (read, waited) = tokio::task::spawn_blocking(move || {
        let mut silent = TcpStream::connect(addr).unwrap();
        silent
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let started = Instant::now();
        // The server speaks first (its HTTP/2 settings); read until it closes.
        let mut everything = Vec::new();
        let read = silent.read_to_end(&mut everything).map_err(|e| e.kind());
        (read.map(|_| 0), started.elapsed())
    })
    .await
    .unwrap();
    // Closed by the aggregator (end of stream, or a reset), not by the 5 s read timeout
    // (which would be WouldBlock or TimedOut).
    assert!(
        matches!(read, Ok(0) | Err(std::io::ErrorKind::ConnectionReset)),
        "{read:?}"
    );
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    aggregator.shutdown().await;
}
