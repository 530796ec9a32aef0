//! The agent's stream to an aggregator that requires mutual TLS (no root needed): with a
//! certificate from the aggregator's client CA its batches are acknowledged; with one from
//! another CA they are not, and the aggregator counts the refusal.

use std::{sync::Arc, time::Duration};

use mermin_aggregator::{
    export::ExportConfig,
    pipeline::{Aggregator, AggregatorConfig, ServerTlsConfig},
    tls::TlsFiles,
};
use mermin_node_agent::{
    config::ClientTls,
    grpc_sink::{self, GrpcSinkConfig},
    metrics::Metrics,
    sink::RecordSink as _,
};

use mermin_test_support::certs;

/// Batches left unacknowledged after sending one with `client`'s certificate and waiting.
async fn unacknowledged(
    aggregator: &Aggregator,
    dir: &std::path::Path,
    name: &str,
    client: (String, String),
    wait: Duration,
) -> usize {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, client.0).unwrap();
    std::fs::write(&key, client.1).unwrap();
    let mut sink = grpc_sink::start(
        GrpcSinkConfig {
            endpoint: format!("https://127.0.0.1:{}", aggregator.local_addr.port()),
            node_name: "node-a".into(),
            capacity: 4,
            tls: Some(ClientTls {
                ca: dir.join("ca.crt"),
                cert,
                key,
                server_name: Some("localhost".into()),
            }),
        },
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let handle = sink.handle();
    sink.send(&[mermin_test_support::record("node-a", 1)])
        .unwrap();
    tokio::task::spawn_blocking(move || handle.wait_acknowledged(wait))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_flow_with_a_trusted_certificate_and_not_with_a_foreign_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, other) = (
        certs::Ca::new("mermin test CA"),
        certs::Ca::new("another CA"),
    );
    std::fs::write(d.join("ca.crt"), ca.pem()).unwrap();
    let (server_cert, server_key) = ca.issue(false);
    std::fs::write(d.join("tls.crt"), server_cert).unwrap();
    std::fs::write(d.join("tls.key"), server_key).unwrap();
    let aggregator = Aggregator::start(AggregatorConfig {
        tls: Some(ServerTlsConfig {
            files: TlsFiles {
                cert: d.join("tls.crt"),
                key: d.join("tls.key"),
                client_ca: d.join("ca.crt"),
            },
            reload_interval: Duration::from_secs(60),
        }),
        ..AggregatorConfig::loopback(d.join("data"), ExportConfig::new("http://127.0.0.1:9"))
    })
    .await
    .unwrap();

    let trusted = unacknowledged(
        &aggregator,
        d,
        "trusted",
        ca.issue(false),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(trusted, 0, "acknowledged within 10 s");
    let foreign = unacknowledged(
        &aggregator,
        d,
        "foreign",
        other.issue(false),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(foreign, 1, "never acknowledged");
    assert!(
        aggregator
            .metrics
            .render()
            .lines()
            .any(|l| l.starts_with("mermin_aggregator_tls_handshake_failures_total{endpoint=\"agents\",reason=\"unknown_issuer\"}")),
        "the refusal is counted"
    );
    aggregator.shutdown().await;
}
