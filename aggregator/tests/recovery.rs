//! The aggregator binary killed with SIGKILL: what it acknowledged is exported after a restart,
//! exactly once, with exact counts; what it exported before is not exported again differently.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use support::{
    closed_connection as connection, connect,
    otlp::{Receiver, int, serve},
    process::{Process, free_port, listening},
};
use tokio::net::TcpListener;

use mermin_test_support as support;

async fn aggregator(listen: SocketAddr, otlp: SocketAddr, data: &Path, settle: &str) -> Process {
    let child = Command::new(env!("CARGO_BIN_EXE_mermin-aggregator"))
        .args(["--listen", &listen.to_string()])
        .args(["--otlp-endpoint", &format!("http://{otlp}")])
        .args(["--data-dir", &data.display().to_string()])
        .args(["--settle", settle])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--kubernetes=false", "--tls-mode=disabled"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Process(child);
    // Ready when it accepts connections (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(listen) {
        assert!(
            Instant::now() < deadline,
            "aggregator not listening within 10 s"
        );
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("the aggregator exited before listening on {listen}: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

async fn client_spans(receiver: &Receiver, want: usize, within: Duration) -> Vec<Span> {
    let deadline = Instant::now() + within;
    loop {
        let spans: Vec<Span> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.kind == SpanKind::Client as i32)
            .collect();
        if spans.len() >= want || Instant::now() >= deadline {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The CLIENT spans of the requests left in the outbox of a stopped aggregator.
async fn queued_client_spans(data: &Path) -> Vec<Span> {
    use prost::Message;
    let store = support::reopen(data).await;
    let mut spans = Vec::new();
    for (_, entry) in store.outbox_oldest(usize::MAX).unwrap() {
        let (_, request) = mermin_aggregator::export::split_entry(entry).unwrap();
        let request =
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                request,
            )
            .unwrap();
        let all = request
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans);
        spans.extend(
            all.flat_map(|s| s.spans)
                .filter(|s| s.kind == SpanKind::Client as i32),
        );
    }
    spans
}

/// Killed before the flow table's first checkpoint: recovery replays the batch log.
#[tokio::test]
async fn sigkill_before_a_checkpoint_replays_the_log() {
    sigkill_scenario(Duration::ZERO).await;
}

/// Killed after a checkpoint: recovery restores the table's stored state.
#[tokio::test]
async fn sigkill_after_a_checkpoint_restores_the_table() {
    sigkill_scenario(Duration::from_millis(600)).await;
}

async fn sigkill_scenario(before_kill: Duration) {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::default();
    let otlp_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = otlp_listener.local_addr().unwrap();
    let server = serve(receiver.clone(), otlp_listener).await;
    let listen = free_port().await;
    let boot = [42; 16];

    // 1. Connection A is acknowledged while the settle time (60 s) keeps it in the table; then the
    //    aggregator is killed.
    let first = aggregator(listen, otlp, data.path(), "60s").await;
    let mut agent = connect(listen).await;
    agent.hello("node-a", boot).await;
    assert_eq!(agent.welcome().await, 0);
    agent.batch(1, connection(40001)).await;
    assert_eq!(agent.ack().await, 1);
    tokio::time::sleep(before_kill).await; // checkpoints run every 250 ms
    drop(agent);
    drop(first); // SIGKILL

    // 2. Restarted with a short settle time: A comes out of recovery. Connection B is sent on the
    //    same boot id, after the agent learns what is durable.
    let second = aggregator(listen, otlp, data.path(), "200ms").await;
    let mut agent = connect(listen).await;
    agent.hello("node-a", boot).await;
    assert_eq!(
        agent.welcome().await,
        1,
        "batch 1 was acknowledged, so it is durable"
    );
    agent.batch(2, connection(40002)).await;
    assert_eq!(agent.ack().await, 2);
    let spans = client_spans(&receiver, 2, Duration::from_secs(10)).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    for span in &spans {
        assert_eq!(int(span, "flow.bytes.sent"), 9_000);
        assert_eq!(int(span, "flow.packets.sent"), 12);
        assert_eq!(int(span, "flow.bytes.received"), 48_000);
        assert_eq!(int(span, "flow.packets.received"), 10);
    }
    let mut ports: Vec<i64> = spans.iter().map(|s| int(s, "source.port")).collect();
    ports.sort_unstable();
    assert_eq!(ports, [40001, 40002]);
    drop(agent);
    drop(second); // SIGKILL again, after export

    // 3. Another restart: nothing is exported again with other content. Stopped, it has emitted
    // everything it held: what it did not deliver is still in its outbox (a request whose
    // removal the SIGKILL cut off is delivered again, identical).
    let third = aggregator(listen, otlp, data.path(), "200ms").await;
    third.stop().await;
    let mut after = client_spans(&receiver, 3, Duration::from_millis(10)).await;
    after.extend(queued_client_spans(data.path()).await);
    let mut ids: Vec<Vec<u8>> = after.iter().map(|s| s.span_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2, "no span id beyond the two connections");
    for span in &after {
        let first = spans.iter().find(|s| s.span_id == span.span_id).unwrap();
        assert_eq!(first, span, "a re-delivered span is identical");
    }
    server.abort();
}
