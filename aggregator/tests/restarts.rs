//! Per-agent state does not grow with agent restarts: every agent process has its own boot id,
//! and one a newer process of its node replaced is forgotten once all its batches are applied.
//! 1,000 restarts (each process sends a batch and goes) leave the state of one; a replaced
//! process whose stream was only briefly down keeps its place for `retire_after`.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use mermin_aggregator::{
    export::ExportConfig,
    ingest::IngestLimits,
    pipeline::{Aggregator, AggregatorConfig},
};
use support::{closed_connection, connect, http::metric, record, reopen};
use tokio::net::TcpListener;

use mermin_test_support as support;

const RESTARTS: u32 = 1_000;

fn boot_id(process: u32) -> [u8; 16] {
    let mut id = [7; 16];
    id[..4].copy_from_slice(&process.to_be_bytes());
    id
}

/// An aggregator on `data` whose replaced agent processes keep their place for `retire_after`,
/// and the address of its `/metrics`.
async fn start(data: &Path, retire_after: Duration) -> (Aggregator, SocketAddr) {
    let metrics_addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let aggregator = Aggregator::start(AggregatorConfig {
        metrics_listen: Some(metrics_addr),
        limits: IngestLimits {
            retire_after,
            ..IngestLimits::default()
        },
        // Nothing listens there: the spans stay queued, which does not matter here.
        ..AggregatorConfig::loopback(data.to_owned(), ExportConfig::new("http://127.0.0.1:9"))
    })
    .await
    .unwrap();
    (aggregator, metrics_addr)
}

/// Waits (bounded) until `/metrics` shows `retired` agent processes retired and `known` known.
async fn retirement_shows(metrics_addr: SocketAddr, retired: u64, known: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now_retired = metric(metrics_addr, "mermin_aggregator_agents_retired_total").await;
        let now_known = metric(metrics_addr, "mermin_aggregator_agents_known").await;
        if (now_retired, now_known) == (retired, known) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after 20 s: {now_retired} agent processes retired, {now_known} known; expected {retired} and {known}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_agent_restarts_leave_the_state_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Each process is gone for good once the next one starts: forgotten at the next pass.
    let (aggregator, metrics_addr) = start(&data, Duration::ZERO).await;
    for process in 0..RESTARTS {
        let mut agent = connect(aggregator.local_addr).await;
        agent.hello("node-a", boot_id(process)).await;
        assert_eq!(agent.welcome().await, 0, "process {process} is new");
        agent
            .batch(1, closed_connection(10_000 + process % 50_000))
            .await;
        assert_eq!(agent.ack().await, 1);
    }
    // Every process but the newest retired. (A pass during the restarts may already have seen
    // one process known: the gauge alone does not say the last pass has run.)
    retirement_shows(metrics_addr, u64::from(RESTARTS - 1), 1).await;
    // The newest process is kept: it reconnects where it was.
    let mut newest = connect(aggregator.local_addr).await;
    newest.hello("node-a", boot_id(RESTARTS - 1)).await;
    assert_eq!(newest.welcome().await, 1);
    drop(newest);
    aggregator.shutdown().await;

    let store = reopen(&data).await;
    let recovered = store.recover().unwrap();
    let mut agents: Vec<[u8; 16]> = recovered.positions.keys().map(|(_, id)| *id).collect();
    agents.sort();
    agents.dedup();
    assert_eq!(agents, [boot_id(RESTARTS - 1)]);
    assert_eq!(recovered.positions.len(), 8, "one position per shard");
    assert_eq!(store.last_sequence(&boot_id(0)).unwrap(), 0, "forgotten");
    assert_eq!(
        store.batches().count(),
        0,
        "every batch applied and dropped"
    );
}

/// A replaced agent process whose stream was only briefly down (a rollout that starts the new
/// process before the old one has finished, a path that went silent) keeps its place: it comes
/// back where it was, not as a stranger welcomed at 0, which would count its acknowledged
/// batches as lost. Once it has been without a stream for `retire_after`, it is forgotten as
/// any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_agent_briefly_cut_off_comes_back_where_it_was() {
    // Wide enough that the pass a second after a bind falls well inside it on a loaded machine.
    const RETIRE_AFTER: Duration = Duration::from_secs(10);
    let dir = tempfile::tempdir().unwrap();
    let (aggregator, metrics_addr) = start(&dir.path().join("data"), RETIRE_AFTER).await;
    let process = |node: &'static str, boot_id: [u8; 16]| async move {
        let mut agent = connect(aggregator.local_addr).await;
        agent.hello(node, boot_id).await;
        let last = agent.welcome().await;
        agent.batch(last + 1, vec![record(node, 1)]).await;
        assert_eq!(agent.ack().await, last + 1);
        (agent, last)
    };
    // Retirement begins `retire_after` after the start (when the streams of the processes the
    // store knew ended is not known): the first pass, after a first bind, shows it has begun.
    let (_other_node, _) = process("node-z", boot_id(100)).await;
    retirement_shows(metrics_addr, 0, 1).await;

    let (old, new) = (boot_id(1), boot_id(2));
    let (cut_off, welcomed) = process("node-a", old).await;
    assert_eq!(welcomed, 0);
    drop(cut_off);
    let (_newer, welcomed) = process("node-a", new).await;
    assert_eq!(welcomed, 0);
    // The pass after the newer process bound keeps the old one: its stream ended just now.
    retirement_shows(metrics_addr, 0, 3).await;
    let (back, welcomed) = process("node-a", old).await;
    assert_eq!(welcomed, 1, "the old process continues after its batch 1");
    drop(back);

    // Gone for `retire_after`, it is forgotten at the next pass (after a bind on another node).
    tokio::time::sleep(RETIRE_AFTER + Duration::from_secs(2)).await;
    let (_third_node, _) = process("node-b", boot_id(200)).await;
    retirement_shows(metrics_addr, 1, 3).await;
    let mut stranger = connect(aggregator.local_addr).await;
    stranger.hello("node-a", old).await;
    assert_eq!(stranger.welcome().await, 0, "forgotten");
    drop(stranger);
    aggregator.shutdown().await;
}
