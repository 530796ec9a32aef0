//! Connections to the agent endpoint that make no request are closed, so they cannot hold the
//! endpoint's slots: a TCP connection that sends nothing within the Hello timeout, and one that
//! sends HTTP/2's preface and settings but opens no stream.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use mermin_aggregator::{
    export::ExportConfig,
    pipeline::{Aggregator, AggregatorConfig},
};

/// HTTP/2's client preface and an empty SETTINGS frame: a connection, no request.
const PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_that_sends_nothing_is_closed() {
    closed_in_time(b"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_opens_no_stream_is_closed() {
    closed_in_time(PREFACE_AND_SETTINGS).await;
}

/// A connection that sends `first` and nothing more is closed by the aggregator within the
/// 300 ms Hello timeout, well before 5 s.
async fn closed_in_time(first: &'static [u8]) {
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
        silent.write_all(first).unwrap();
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
