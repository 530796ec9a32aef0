//! Per-agent state does not grow with agent restarts: every agent process has its own boot id,
//! and one a newer process of its node replaced is forgotten once all its batches are applied.
//! 1,000 restarts (each process sends a batch and goes) leave the state of one.

use std::time::{Duration, Instant};

use mermin_aggregator::{
    export::ExportConfig,
    pipeline::{Aggregator, AggregatorConfig},
};
use support::{closed_connection, connect, http::metric, reopen};
use tokio::net::TcpListener;

use mermin_test_support as support;

const RESTARTS: u32 = 1_000;

fn boot_id(process: u32) -> [u8; 16] {
    let mut id = [7; 16];
    id[..4].copy_from_slice(&process.to_be_bytes());
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_agent_restarts_leave_the_state_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let metrics_addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let aggregator = Aggregator::start(AggregatorConfig {
        metrics_listen: Some(metrics_addr),
        // Nothing listens there: the spans stay queued, which does not matter here.
        ..AggregatorConfig::loopback(data.clone(), ExportConfig::new("http://127.0.0.1:9"))
    })
    .await
    .unwrap();
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let retired = metric(metrics_addr, "mermin_aggregator_agents_retired_total").await;
        let known = metric(metrics_addr, "mermin_aggregator_agents_known").await;
        if (retired, known) == (u64::from(RESTARTS - 1), 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 20 s: {retired} agent processes retired, {known} known"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
