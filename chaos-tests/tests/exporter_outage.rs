//! The OTLP endpoint down for a long time (ten minutes by default) while an agent keeps
//! reporting a closed connection every second: the aggregator keeps acknowledging (the outbox is
//! durable), retries with capped backoff, and once the endpoint is back delivers every span —
//! each connection exactly once, with its exact counts.
//!
//! `cargo test -p mermin-chaos-tests -- --ignored` (`MERMIN_CHAOS_OUTAGE_SECS` shortens it).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use mermin_aggregator::{
    export::ExportConfig,
    pipeline::{Aggregator, AggregatorConfig},
};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use support::{
    closed_connection, connect,
    otlp::{Receiver, int, serve},
};
use tokio::net::TcpListener;

use mermin_test_support as support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes the outage's length (ten minutes by default)"]
async fn ten_minutes_without_the_endpoint_lose_nothing() {
    let outage = Duration::from_secs(
        std::env::var("MERMIN_CHAOS_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600),
    );
    let dir = tempfile::tempdir().unwrap();
    // Reserve the endpoint's port, and leave it closed: the endpoint is down.
    let otlp = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let aggregator = Aggregator::start(AggregatorConfig {
        settle: Duration::from_millis(500),
        grace: Duration::from_secs(5),
        ..AggregatorConfig::loopback(
            dir.path().to_owned(),
            ExportConfig::new(format!("http://{otlp}")),
        )
    })
    .await
    .unwrap();

    // One closed connection per second, each acknowledged, all through the outage.
    let mut agent = connect(aggregator.local_addr).await;
    agent.hello("node-a", [8; 16]).await;
    assert_eq!(agent.welcome().await, 0);
    let started = Instant::now();
    let mut sequence = 0;
    while started.elapsed() < outage {
        sequence += 1;
        let port = 20_000 + sequence as u32;
        agent.batch(sequence, closed_connection(port)).await;
        assert_eq!(agent.ack().await, sequence);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let connections = sequence as usize;
    let exported = |metrics: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("mermin_aggregator_spans_exported_total ")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0u64)
    };
    assert_eq!(
        exported(&aggregator.metrics.render()),
        0,
        "the endpoint was down"
    );

    // The endpoint comes back: everything arrives within the capped backoff (30 s) and the time
    // to send it.
    let receiver = Receiver::default();
    let server = serve(receiver.clone(), TcpListener::bind(otlp).await.unwrap()).await;
    let back = Instant::now();
    let clients = || {
        receiver
            .spans()
            .into_iter()
            .filter(|s| s.kind == SpanKind::Client as i32)
            .collect::<Vec<_>>()
    };
    while clients().len() < connections && back.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let delivered_after = back.elapsed();
    let spans = clients();
    let mut by_port: HashMap<i64, usize> = HashMap::new();
    for span in &spans {
        *by_port.entry(int(span, "source.port")).or_default() += 1;
        assert_eq!(int(span, "flow.packets.sent"), 12);
        assert_eq!(int(span, "flow.bytes.sent"), 9_000);
        assert_eq!(int(span, "flow.packets.received"), 10);
        assert_eq!(int(span, "flow.bytes.received"), 48_000);
    }
    assert_eq!(by_port.len(), connections, "every connection delivered");
    assert!(by_port.values().all(|n| *n == 1), "each exactly once");
    assert_eq!(
        exported(&aggregator.metrics.render()),
        2 * connections as u64
    );
    eprintln!(
        "outage {outage:?}: {connections} connections acknowledged meanwhile; all {} spans delivered {delivered_after:?} after the endpoint came back",
        2 * connections
    );
    aggregator.shutdown().await;
    server.abort();
}
