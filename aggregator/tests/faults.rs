//! The whole aggregator on a store whose disk fills up (writes refused, as with ENOSPC) and
//! comes back, and on a slow one: batches are refused with a clear status while export of what
//! is stored goes on, `/readyz` says why, the aggregator recovers by itself when writes work
//! again, and stopping is bounded even while the disk is full. Everything acknowledged arrives
//! exactly once. A checkpoint writer that died fails `/livez`.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use mermin_aggregator::{
    export::{ExportConfig, outbox_entry},
    pipeline::{Aggregator, AggregatorConfig},
    store::{SledStore, faults::FaultyStore},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use support::{
    closed_connection, connect,
    http::{get, metric},
    otlp::{Receiver, serve},
    process::free_port,
    reopen, until,
};
use tokio::net::TcpListener;

use mermin_test_support as support;

/// An OTLP/gRPC receiver on loopback: its endpoint, what it received, its task.
async fn otlp_receiver() -> (String, Receiver, tokio::task::JoinHandle<()>) {
    let otlp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", otlp.local_addr().unwrap());
    let receiver = Receiver::default();
    let task = serve(receiver.clone(), otlp).await;
    (endpoint, receiver, task)
}

/// An export request holding one span with the given id.
fn request_with_span(id: u8) -> Vec<u8> {
    outbox_entry(&ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![id; 16],
                    span_id: vec![id; 8],
                    name: "queued before the disk filled".into(),
                    ..Span::default()
                }],
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_batches_keeps_exporting_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, receiver, _otlp) = otlp_receiver().await;
    let metrics_addr = free_port().await;

    let sled = SledStore::open(&dir.path().join("data")).unwrap();
    sled.outbox_push(&request_with_span(7)).await.unwrap();
    let (store, faults) = FaultyStore::wrap(sled);
    // The disk is full from the start (a restart onto a full disk).
    faults.fail_writes(true);
    let aggregator = Aggregator::start_on(
        AggregatorConfig {
            settle: Duration::from_millis(200),
            metrics_listen: Some(metrics_addr),
            ..AggregatorConfig::loopback(dir.path().join("data"), ExportConfig::new(endpoint))
        },
        store.clone(),
    )
    .await
    .unwrap();

    // What was stored goes out although the outbox cannot be updated.
    until("the queued span delivered", || receiver.spans().len() == 1).await;

    let mut refused = connect(aggregator.local_addr).await;
    refused.hello("node-a", [1; 16]).await;
    assert_eq!(refused.welcome().await, 0);
    refused.batch(1, closed_connection(40_000)).await;
    let status = refused.status().await;
    assert_eq!(
        (status.code(), status.message()),
        (
            tonic::Code::Unavailable,
            "the aggregator cannot store batches right now: store: No space left on device (injected)"
        )
    );
    assert_eq!(
        get(metrics_addr, "/readyz").await,
        (
            503,
            "the store cannot write: store: No space left on device (injected)\n".to_owned()
        )
    );
    assert_eq!(
        get(metrics_addr, "/livez").await.0,
        200,
        "the shards still tick"
    );

    // Space again: the next attempt goes through, without a restart.
    faults.fail_writes(false);
    let mut agent = connect(aggregator.local_addr).await;
    agent.hello("node-a", [2; 16]).await;
    assert_eq!(agent.welcome().await, 0);
    agent.batch(1, closed_connection(40_001)).await;
    assert_eq!(agent.ack().await, 1);
    until("the new connection's two spans", || {
        receiver.spans().len() == 3
    })
    .await;
    let ids: HashSet<Vec<u8>> = receiver.spans().into_iter().map(|s| s.span_id).collect();
    assert_eq!(ids.len(), 3, "every span exactly once");
    until("the delivered requests removed", || store.outbox_len() == 0).await;
    assert_eq!(get(metrics_addr, "/readyz").await.0, 200);
    assert_eq!(
        metric(
            metrics_addr,
            "mermin_aggregator_streams_rejected_total{reason=\"unavailable\"}"
        )
        .await,
        1
    );

    // Full again, and told to stop: the stop is bounded (what is not checkpointed stays in the
    // batch log for the next start).
    faults.fail_writes(true);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), aggregator.shutdown())
        .await
        .expect("shutdown within 15 s on a full disk");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// A store whose writes take two seconds holds up neither the export of what is already queued
/// nor the Welcome of another agent's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_stalls_neither_export_nor_other_streams() {
    let dir = tempfile::tempdir().unwrap();
    let otlp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", otlp.local_addr().unwrap());
    let receiver = Receiver::default();
    let (store, faults) = FaultyStore::wrap(SledStore::open(&dir.path().join("data")).unwrap());
    for id in 1..=5 {
        store.outbox_push(&request_with_span(id)).await.unwrap();
    }
    faults.delay_writes(Duration::from_secs(2));
    let aggregator = Aggregator::start_on(
        AggregatorConfig::loopback(dir.path().join("data"), ExportConfig::new(endpoint)),
        store,
    )
    .await
    .unwrap();
    // A batch whose append will take 2 s.
    let mut slow = connect(aggregator.local_addr).await;
    slow.hello("node-a", [3; 16]).await;
    assert_eq!(slow.welcome().await, 0);
    slow.batch(1, closed_connection(40_002)).await;
    let sent = Instant::now();
    let _otlp = serve(receiver.clone(), otlp).await;
    let mut other = connect(aggregator.local_addr).await;
    other.hello("node-b", [4; 16]).await;
    assert_eq!(other.welcome().await, 0);
    until("the five queued spans", || receiver.spans().len() == 5).await;
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "the queue and the other stream waited for the slow write ({:?})",
        sent.elapsed()
    );
    assert_eq!(slow.ack().await, 1, "the slow write completes");
    aggregator.shutdown().await;
}

/// A checkpoint writer that died (a bug in the store panicked its thread): nothing can become
/// durable any more, so `/livez` fails and the orchestrator restarts the aggregator, which
/// recovers what was acknowledged from its store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_checkpoint_writer_fails_liveness() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = free_port().await;
    let (store, faults) = FaultyStore::wrap(SledStore::open(&dir.path().join("data")).unwrap());
    faults.panic_on_checkpoint(true);
    let aggregator = Aggregator::start_on(
        AggregatorConfig {
            metrics_listen: Some(metrics_addr),
            ..AggregatorConfig::loopback(
                dir.path().join("data"),
                ExportConfig::new("http://127.0.0.1:9".to_owned()),
            )
        },
        store,
    )
    .await
    .unwrap();
    assert_eq!(get(metrics_addr, "/livez").await.0, 200);
    let mut agent = connect(aggregator.local_addr).await;
    agent.hello("node-a", [5; 16]).await;
    assert_eq!(agent.welcome().await, 0);
    agent.batch(1, closed_connection(40_003)).await;
    assert_eq!(
        agent.ack().await,
        1,
        "acknowledged: durable in the batch log"
    );
    // The shard's checkpoint at its next tick (250 ms) finds the writer gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let answer = get(metrics_addr, "/livez").await;
        if answer.0 != 200 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(answer.0, 503, "{}", answer.1);
    assert_eq!(
        answer.1,
        "the store cannot write until a restart: the checkpoint writer is gone \
         (the restart recovers from the data on disk)\n"
    );
    aggregator.shutdown().await;
}

/// A store broken until a restart exports nothing (what its outbox holds may not be durable);
/// the restart on the same data delivers what was queued, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_store_exports_nothing_until_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, receiver, _otlp) = otlp_receiver().await;
    let metrics_addr = free_port().await;
    let config = || AggregatorConfig {
        metrics_listen: Some(metrics_addr),
        ..AggregatorConfig::loopback(dir.path().join("data"), ExportConfig::new(endpoint.clone()))
    };
    {
        let sled = SledStore::open(&dir.path().join("data")).unwrap();
        sled.outbox_push(&request_with_span(9)).await.unwrap();
        let (store, faults) = FaultyStore::wrap(sled);
        faults.break_for_good("Input/output error (injected)");
        let aggregator = Aggregator::start_on(config(), store).await.unwrap();
        let series = "mermin_aggregator_export_paused_total";
        let deadline = Instant::now() + Duration::from_secs(20);
        while metric(metrics_addr, series).await == 0 {
            assert!(Instant::now() < deadline, "no export attempt within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            receiver.spans().is_empty(),
            "nothing sent from a broken store"
        );
        assert_eq!(get(metrics_addr, "/livez").await.0, 503);
        aggregator.shutdown().await;
    }
    // Its database is free once the stopped aggregator's last handle goes.
    let store = reopen(&dir.path().join("data")).await;
    let restarted = AggregatorConfig {
        metrics_listen: None,
        ..config()
    };
    let aggregator = Aggregator::start_on(restarted, store).await.unwrap();
    until("the queued span delivered", || receiver.spans().len() == 1).await;
    assert_eq!(receiver.spans()[0].span_id, vec![9; 8]);
    aggregator.shutdown().await;
}
