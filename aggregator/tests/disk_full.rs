//! The whole aggregator on a real disk that fills up: its data dir on a small tmpfs (mounted by
//! the test, unmounted on every exit), filled by another file until the kernel says ENOSPC, then
//! freed. Batches are refused with a clear status while the disk is full, `/readyz` says why
//! while `/livez` stays healthy, a refused batch is not reported durable, readiness returns by
//! itself once space is back (no restart, no traffic needed), the refused batch is then taken,
//! every acknowledged connection is exported exactly once, and the stop is bounded. (The value
//! log takes the disk's refusal before sled writes anything: sled, which keeps its first I/O
//! error for good, is not broken by it.) Needs root (mount); skipped otherwise.

use std::{collections::HashSet, fs, time::Duration};

use mermin_aggregator::{
    export::ExportConfig,
    pipeline::{Aggregator, AggregatorConfig},
};
use support::{
    closed_connection, connect,
    http::{get, metric},
    otlp::{Receiver, serve},
    reopen,
    tmpfs::{Tmpfs, fill},
    until,
};
use tokio::net::TcpListener;

use mermin_test_support as support;

const CONNECTIONS_PER_BATCH: usize = 100;

/// Batch `sequence`'s closed connections, each on its own port.
fn connections(sequence: u64) -> Vec<mermin_protocol::flow::v1::FlowRecord> {
    let first = 10_000 + sequence as u32 * CONNECTIONS_PER_BATCH as u32;
    (first..first + CONNECTIONS_PER_BATCH as u32)
        .flat_map(closed_connection)
        .collect()
}

/// The aggregator on the tmpfs (once a previous one on it has let go of the store).
async fn start(disk: &Tmpfs, endpoint: &str, metrics: std::net::SocketAddr) -> Aggregator {
    let data = disk.mountpoint.join("data");
    let store = reopen(&data).await;
    Aggregator::start_on(
        AggregatorConfig {
            settle: Duration::from_millis(200),
            metrics_listen: Some(metrics),
            ..AggregatorConfig::loopback(data, ExportConfig::new(endpoint))
        },
        store,
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_full_disk_refuses_batches_and_recovers_when_space_returns() {
    let Some(disk) = Tmpfs::mount("16m") else {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    let otlp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", otlp.local_addr().unwrap());
    let receiver = Receiver::default();
    let _otlp = serve(receiver.clone(), otlp).await;
    let metrics_addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let aggregator = start(&disk, &endpoint, metrics_addr).await;

    let mut before = connect(aggregator.local_addr).await;
    before.hello("node-a", [1; 16]).await;
    assert_eq!(before.welcome().await, 0);
    before.batch(1, closed_connection(41_000)).await;
    assert_eq!(before.ack().await, 1);
    until("the first connection's spans", || {
        receiver.spans().len() == 2
    })
    .await;
    let delivered_before: HashSet<Vec<u8>> =
        receiver.spans().into_iter().map(|s| s.span_id).collect();

    let filler = disk.mountpoint.join("filler");
    let filled = fill(&filler, 16 << 20);
    assert!(filled > 0, "the filler wrote something");
    // sled writes into space it already holds until it needs a new segment: send until refused.
    let mut sequence = 1;
    let status = loop {
        sequence += 1;
        assert!(sequence < 200, "never refused");
        before.batch(sequence, connections(sequence)).await;
        match before.answer().await {
            Ok(_) => {}
            Err(status) => break status,
        }
    };
    let refused = sequence;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("the aggregator cannot store batches right now: store: ")
            && status.message().contains("No space left on device"),
        "{status:?}"
    );
    let (ready, why) = get(metrics_addr, "/readyz").await;
    assert_eq!(ready, 503);
    assert!(
        why.starts_with("the store cannot write: store: value log: writing a value: ")
            && why.contains("No space left"),
        "{why}"
    );
    assert_eq!(
        metric(
            metrics_addr,
            "mermin_aggregator_store_write_failures_total{reason=\"append\"}"
        )
        .await,
        1,
        "the one refused batch"
    );
    // Not broken: nothing a restart would fix.
    assert_eq!(get(metrics_addr, "/livez").await, (200, "ok\n".to_owned()));

    // The refused batch is not counted as durable: a reconnecting agent is told to send it.
    let mut retry = connect(aggregator.local_addr).await;
    retry.hello("node-a", [1; 16]).await;
    assert_eq!(retry.welcome().await, refused - 1);
    drop(retry);
    assert!(
        metric(
            metrics_addr,
            "mermin_aggregator_streams_rejected_total{reason=\"unavailable\"}"
        )
        .await
            >= 1
    );

    // Space again: ready again by itself (the checkpoint writer's idle probe), with no restart
    // and no batch sent.
    fs::remove_file(&filler).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while get(metrics_addr, "/readyz").await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready within 20 s of space coming back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut agent = connect(aggregator.local_addr).await;
    agent.hello("node-a", [1; 16]).await;
    assert_eq!(agent.welcome().await, refused - 1);
    agent.batch(refused, connections(refused)).await;
    assert_eq!(agent.ack().await, refused);
    let spans = 2 + 2 * CONNECTIONS_PER_BATCH * (refused as usize - 1);
    until("every acknowledged connection's spans", || {
        receiver.spans().len() >= spans
    })
    .await;
    assert_eq!(get(metrics_addr, "/readyz").await.0, 200);
    assert_eq!(get(metrics_addr, "/livez").await, (200, "ok\n".to_owned()));
    tokio::time::timeout(Duration::from_secs(15), aggregator.shutdown())
        .await
        .expect("shutdown within 15 s");
    // Every span arrived; the only repeats are identical copies of spans delivered before the
    // disk filled, whose removal from the outbox never became durable.
    let mut first_copies = std::collections::HashMap::new();
    let mut repeated = HashSet::new();
    for span in receiver.spans() {
        if let Some(first) = first_copies.insert(span.span_id.clone(), span.clone()) {
            assert_eq!(
                first, span,
                "a span id exported twice with different content"
            );
            repeated.insert(span.span_id);
        }
    }
    assert_eq!(
        first_copies.len(),
        spans,
        "every acknowledged connection's spans"
    );
    assert!(repeated.is_subset(&delivered_before), "{repeated:?}");
    drop(disk);
}
