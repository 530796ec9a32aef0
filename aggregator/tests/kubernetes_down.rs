//! The aggregator with Kubernetes metadata on and an API server that refuses every connection:
//! it starts and serves, `/readyz` says what it is waiting for, the failures are counted per kind,
//! and a flow still becomes a span (named from the static file, the only source that answers).
//! Stopping it with the agent still connected ends the agent's stream with a status.

use std::time::{Duration, Instant};

use mermin_aggregator::{
    export::ExportConfig,
    pipeline::{Aggregator, AggregatorConfig, MetadataConfig},
};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use support::{
    closed_connection, connect,
    http::{get, metric},
    otlp::{Receiver, serve, text},
};
use tokio::net::TcpListener;

use mermin_test_support as support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_server_down_flows_still_go_out_and_readiness_says_why() {
    let dir = tempfile::tempdir().unwrap();
    // A kubeconfig whose server refuses connections (nothing listens on port 1).
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: down\nclusters:\n- name: down\n  cluster:\n    server: http://127.0.0.1:1\ncontexts:\n- name: down\n  context:\n    cluster: down\n    user: nobody\nusers:\n- name: nobody\n  user:\n    token: x\n",
    )
    .unwrap();
    // SAFETY: the only test in this binary; set before anything reads the environment.
    unsafe {
        std::env::remove_var("KUBERNETES_SERVICE_HOST");
        std::env::set_var("KUBECONFIG", &kubeconfig);
    }
    let endpoints = dir.path().join("endpoints.hcl");
    std::fs::write(
        &endpoints,
        "endpoint \"10.0.0.1\" { pod = \"web-1\" namespace = \"frontend\" }\n",
    )
    .unwrap();

    let otlp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_addr = otlp.local_addr().unwrap();
    let receiver = Receiver::default();
    let _server = serve(receiver.clone(), otlp).await;
    let metrics_addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let aggregator = Aggregator::start(AggregatorConfig {
        settle: Duration::from_millis(200),
        grace: Duration::from_secs(10),
        metrics_listen: Some(metrics_addr),
        metadata: MetadataConfig {
            static_file: Some(endpoints),
            kubernetes: true,
            first_sync_wait: Duration::from_millis(500),
            ..MetadataConfig::default()
        },
        ..AggregatorConfig::loopback(
            dir.path().join("data"),
            ExportConfig::new(format!("http://{otlp_addr}")),
        )
    })
    .await
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        metrics_addr,
        "mermin_aggregator_metadata_watch_errors_total{kind=\"Pod\",reason=\"watch\"}",
    )
    .await
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "no watch error counted within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(metrics_addr, "/readyz").await,
        (
            503,
            "waiting for the first sync of Kubernetes metadata\n".to_owned()
        )
    );
    assert_eq!(get(metrics_addr, "/livez").await.0, 200);
    assert_eq!(
        metric(
            metrics_addr,
            "mermin_aggregator_metadata_watch_synced{kind=\"Pod\"}"
        )
        .await,
        0
    );

    // A closed connection seen by one agent still becomes a span, with the static names.
    let mut stream = connect(aggregator.local_addr).await;
    stream.hello("node-a", [3; 16]).await;
    assert_eq!(stream.welcome().await, 0);
    stream.batch(1, closed_connection(40000)).await;
    assert_eq!(stream.ack().await, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = loop {
        let spans = receiver.spans();
        if let Some(span) = spans
            .into_iter()
            .find(|s| s.kind == SpanKind::Client as i32)
        {
            break span;
        }
        assert!(Instant::now() < deadline, "no span within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(text(&client, "source.pod.name"), "web-1");
    assert_eq!(text(&client, "source.namespace"), "frontend");
    assert_eq!(text(&client, "destination.address"), "10.0.0.2");
    // Stopping with an agent still connected ends its stream, telling it why.
    aggregator.shutdown().await;
    let status = stream.status().await;
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::Unavailable, "the aggregator is shutting down")
    );
}
