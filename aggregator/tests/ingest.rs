//! The agent stream over real gRPC on loopback, with a real sled store in a temporary directory
//! (each test in its own actix system, where the session actors run):
//! acknowledgements only after durability, replays acknowledged but not applied twice, and every
//! bad input refused with a status that says what is wrong — without disturbing other streams.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use mermin_aggregator::{
    actors::Arbiters,
    ingest::{AppliedBatch, Ingest, IngestLimits},
    metrics::Metrics,
    store::Store,
};
use mermin_protocol::agent::v1::{AgentMessage, Batch, Hello, agent_message};
use support::{connect, metric_value, recent_nanos, record, reopen, until};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;

use mermin_test_support as support;

struct Aggregator {
    addr: SocketAddr,
    store: Store,
    metrics: Arc<Metrics>,
    flows: mpsc::Receiver<AppliedBatch>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn start(dir: &Path, limits: IngestLimits) -> Aggregator {
    start_until(dir, limits, watch::channel(false).1).await
}

/// An aggregator whose sessions stop when `stopping` turns true.
async fn start_until(
    dir: &Path,
    limits: IngestLimits,
    stopping: watch::Receiver<bool>,
) -> Aggregator {
    // A previous aggregator on this directory releases sled's lock once its last stream task
    // has ended.
    let store = reopen(dir).await;
    let (tx, flows) = mpsc::channel(16);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new());
    let service = Ingest::new(
        store.clone(),
        limits,
        tx,
        metrics.clone(),
        Arbiters::current(),
    )
    .stop_when(stopping)
    .into_service();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Aggregator {
        addr,
        store,
        metrics,
        flows,
        server,
    }
}

#[actix::test]
async fn batches_are_acked_after_they_are_durable_and_replays_are_not_applied_twice() {
    let dir = tempfile::tempdir().unwrap();
    let boot = [7; 16];
    {
        let mut agg = start(dir.path(), IngestLimits::default()).await;
        let mut s = connect(agg.addr).await;
        s.hello("node-a", boot).await;
        assert_eq!(s.welcome().await, 0);
        s.batch(1, vec![record("node-a", 3), record("node-a", 4)])
            .await;
        assert_eq!(s.ack().await, 1);
        let applied = agg.flows.recv().await.unwrap();
        assert_eq!((applied.boot_id, applied.sequence), (boot, 1));
        let applied = applied.observations;
        assert_eq!(
            applied.iter().map(|o| o.counts.packets).collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!(applied[0].counts.bytes, 300);
        assert_eq!(applied[0].point.node, "node-a");
    }
    // A restarted aggregator on the same store: the agent reconnects and resends batch 1.
    let mut agg = start(dir.path(), IngestLimits::default()).await;
    let mut s = connect(agg.addr).await;
    s.hello("node-a", boot).await;
    assert_eq!(s.welcome().await, 1, "batch 1 was durable before its ack");
    s.batch(1, vec![record("node-a", 3), record("node-a", 4)])
        .await;
    assert_eq!(s.ack().await, 1);
    s.batch(2, vec![record("node-a", 5)]).await;
    assert_eq!(s.ack().await, 2);
    let applied = agg.flows.recv().await.unwrap().observations;
    assert_eq!(
        applied.len(),
        1,
        "the replayed batch 1 was not applied again"
    );
    assert_eq!(applied[0].counts.packets, 5);
    let text = agg.metrics.render();
    assert!(
        text.lines()
            .any(|l| l == "mermin_aggregator_batches_duplicate_total 1"),
        "{text}"
    );
}

#[actix::test]
async fn bad_input_is_refused_with_a_clear_status_and_other_streams_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let limits = IngestLimits {
        max_batch_records: 2,
        max_message_bytes: 4096,
        ..IngestLimits::default()
    };
    let mut agg = start(dir.path(), limits).await;

    // A healthy agent keeps streaming while the others misbehave.
    let mut good = connect(agg.addr).await;
    good.hello("node-good", [1; 16]).await;
    assert_eq!(good.welcome().await, 0);

    let hello = |version, boot_id: Vec<u8>| {
        agent_message::Message::Hello(Hello {
            protocol_version: version,
            node_name: "node-bad".into(),
            boot_id,
            ..Hello::default()
        })
    };
    let cases = [
        (
            agent_message::Message::Batch(Batch::default()),
            Code::InvalidArgument,
            "the first message of a stream must be a Hello",
        ),
        (
            hello(2, vec![2; 16]),
            Code::FailedPrecondition,
            "protocol version 2 is not supported; this aggregator speaks 1",
        ),
        (
            hello(1, vec![2; 5]),
            Code::InvalidArgument,
            "Hello.boot_id is 5 bytes, expected 16",
        ),
        (
            agent_message::Message::Hello(Hello {
                protocol_version: 1,
                node_name: "n".repeat(254),
                boot_id: vec![3; 16],
                ..Hello::default()
            }),
            Code::InvalidArgument,
            "Hello.node_name is 254 bytes; a node name is at most 253 (a DNS name)",
        ),
    ];
    for (message, code, text) in cases {
        let mut bad = connect(agg.addr).await;
        bad.send(message).await;
        let status = bad.status().await;
        assert_eq!((status.code(), status.message()), (code, text));
    }

    // Bytes that are not an AgentMessage, and a batch whose second record is not a record.
    let garbage = support::send_raw(agg.addr, vec![vec![0x12, 0x05, 0x08]]).await;
    assert_eq!(
        (garbage.code(), garbage.message()),
        (Code::InvalidArgument, "AgentMessage: truncated message")
    );
    let encode = |message| {
        prost::Message::encode_to_vec(&AgentMessage {
            message: Some(message),
        })
    };
    let mut not_a_record = encode(agent_message::Message::Batch(Batch {
        sequence: 1,
        records: vec![record("node-bad", 1)],
    }));
    // A second part of the same batch (protobuf merges them), holding a record whose
    // `source_port` is a string.
    not_a_record.extend([0x12, 0x04, 0x12, 0x02, 0x3a, 0x00]);
    let status =
        support::send_raw(agg.addr, vec![encode(hello(1, vec![9; 16])), not_a_record]).await;
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            "batch 1, record 1: field 7: wire type 2, expected 0"
        )
    );

    let mut bad = connect(agg.addr).await;
    bad.hello("node-x", [3; 16]).await;
    assert_eq!(bad.welcome().await, 0);
    let mut broken = record("node-x", 1);
    broken.source_address = vec![1, 2, 3];
    bad.batch(1, vec![record("node-x", 1), broken]).await;
    let status = bad.status().await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "batch 1, record 1: source_address: 3 bytes, expected 4 (IPv4) or 16 (IPv6)"
    );

    let mut gap = connect(agg.addr).await;
    gap.hello("node-y", [4; 16]).await;
    gap.welcome().await;
    gap.batch(2, vec![record("node-y", 1)]).await;
    assert_eq!(
        gap.status().await.message(),
        "batch sequence 2 does not follow 0: sequences start at 1 and increase by one"
    );

    let mut big = connect(agg.addr).await;
    big.hello("node-z", [5; 16]).await;
    big.welcome().await;
    big.batch(1, vec![record("node-z", 1); 3]).await;
    assert_eq!(
        big.status().await.message(),
        "batch 1 has 3 records; the limit is 2"
    );

    let mut foreign = connect(agg.addr).await;
    foreign.hello("node-w", [6; 16]).await;
    foreign.welcome().await;
    foreign.batch(1, vec![record("node-v", 1)]).await;
    assert_eq!(
        foreign.status().await.message(),
        "batch 1, record 0: node_name \"node-v\" is not the stream's node \"node-w\""
    );

    let mut huge = connect(agg.addr).await;
    huge.hello("node-h", [8; 16]).await;
    huge.welcome().await;
    let mut fat = record("node-h", 1);
    fat.interface_name = "x".repeat(10_000);
    huge.batch(1, vec![fat]).await;
    let status = huge.status().await;
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(
        status.message().contains("the limit is: 4096 bytes"),
        "{}",
        status.message()
    );

    // None of that touched the healthy stream.
    good.batch(1, vec![record("node-good", 9)]).await;
    assert_eq!(good.ack().await, 1);
    let applied = agg.flows.recv().await.unwrap().observations;
    assert_eq!(applied[0].point.node, "node-good");
    assert!(agg.flows.try_recv().is_err(), "no bad batch was applied");
    let text = agg.metrics.render();
    for line in [
        "mermin_aggregator_streams_rejected_total{reason=\"invalid_argument\"} 9",
        "mermin_aggregator_streams_rejected_total{reason=\"failed_precondition\"} 1",
        "mermin_aggregator_streams_rejected_total{reason=\"out_of_range\"} 1",
        "mermin_aggregator_batches_accepted_total 1",
        "mermin_aggregator_records_accepted_total 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

/// The backpressure outbox policy: while the export outbox is over quota a batch waits; it goes
/// through once there is room, and a stream that waits too long is refused with a clear status.
#[actix::test]
async fn a_full_outbox_holds_batches_back_then_refuses_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let limits = IngestLimits {
        pause_above_outbox_bytes: Some(10),
        outbox_full_wait: Duration::from_millis(1500),
        ..IngestLimits::default()
    };
    let mut agg = start(dir.path(), limits).await;
    let store = agg.store.clone();
    let queued = store.outbox_push(&[0; 11]).await.unwrap();

    let mut s = connect(agg.addr).await;
    s.hello("node-a", [5; 16]).await;
    assert_eq!(s.welcome().await, 0);
    s.batch(1, vec![record("node-a", 1)]).await;
    let held = || metric_value(&agg.metrics.render(), "mermin_aggregator_batches_held");
    until("the batch is held back", || held() == 1).await;
    assert!(agg.flows.try_recv().is_err(), "held back while over quota");
    assert_eq!(store.last_sequence(&[5; 16]).unwrap(), 0, "not stored yet");
    store.outbox_remove(queued).await.unwrap();
    assert_eq!(s.ack().await, 1, "accepted once the exporter made room");
    assert_eq!(agg.flows.recv().await.unwrap().sequence, 1);

    store.outbox_push(&[0; 11]).await.unwrap();
    s.batch(2, vec![record("node-a", 2)]).await;
    let status = s.status().await;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "the export outbox is full (11 bytes queued, quota 10): the OTLP endpoint is not keeping up; retry later"
    );
    assert_eq!(
        store.last_sequence(&[5; 16]).unwrap(),
        1,
        "batch 2 not stored"
    );
    assert!(
        agg.metrics
            .render()
            .lines()
            .any(|l| l
                == "mermin_aggregator_streams_rejected_total{reason=\"resource_exhausted\"} 1")
    );
}

/// One agent process is one boot id on one node with one stream (a newer one takes over); it says
/// Hello promptly, replays exactly what it sent, and reports times its node's clock can have.
#[actix::test]
async fn agents_that_misuse_their_identity_or_the_clock_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let limits = IngestLimits {
        hello_timeout: Duration::from_millis(300),
        ..IngestLimits::default()
    };
    let mut agg = start(dir.path(), limits).await;

    let mut silent = connect(agg.addr).await;
    let status = silent.status().await;
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::DeadlineExceeded,
            "no Hello within 300ms of opening the stream"
        )
    );

    // A second stream of one agent process takes over; the older one ends.
    let boot = [9; 16];
    let mut older = connect(agg.addr).await;
    older.hello("node-a", boot).await;
    assert_eq!(older.welcome().await, 0);
    let mut first = connect(agg.addr).await;
    first.hello("node-a", boot).await;
    assert_eq!(first.welcome().await, 0);
    let status = older.status().await;
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::Aborted,
            "a newer stream of this agent process (same boot id) took over"
        )
    );
    let mut other_node = connect(agg.addr).await;
    other_node.hello("node-b", boot).await;
    let status = other_node.status().await;
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::InvalidArgument,
            "Hello.boot_id 09090909090909090909090909090909 belongs to node \"node-a\", not \"node-b\": every agent process needs its own boot id"
        )
    );

    first.batch(1, vec![record("node-a", 3)]).await;
    assert_eq!(first.ack().await, 1);
    first.batch(1, vec![record("node-a", 3)]).await;
    assert_eq!(first.ack().await, 1, "the same batch again: acknowledged");
    first.batch(1, vec![record("node-a", 4)]).await;
    let status = first.status().await;
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::AlreadyExists,
            "batch 1 was already stored with different content; a replay must resend the same records"
        )
    );
    assert_eq!(
        agg.flows.recv().await.unwrap().observations[0]
            .counts
            .packets,
        3
    );
    assert!(agg.flows.try_recv().is_err(), "neither replay was applied");

    let mut skewed = connect(agg.addr).await;
    skewed.hello("node-c", [10; 16]).await;
    skewed.welcome().await;
    let mut future = record("node-c", 1);
    future.last_seen_unix_nanos = recent_nanos() + 2 * 86_400 * 1_000_000_000;
    skewed.batch(1, vec![future.clone()]).await;
    let status = skewed.status().await;
    assert_eq!(status.code(), Code::InvalidArgument);
    let expected = format!(
        "batch 1, record 0: last_seen_unix_nanos ({}) is not within a day of the aggregator's clock (",
        future.last_seen_unix_nanos
    );
    assert!(
        status.message().starts_with(&expected),
        "{}",
        status.message()
    );

    let text = agg.metrics.render();
    for line in [
        "mermin_aggregator_streams_rejected_total{reason=\"deadline_exceeded\"} 1",
        "mermin_aggregator_streams_rejected_total{reason=\"aborted\"} 1",
        "mermin_aggregator_streams_rejected_total{reason=\"already_exists\"} 1",
        "mermin_aggregator_streams_rejected_total{reason=\"invalid_argument\"} 2",
        "mermin_aggregator_batches_conflicting_total 1",
        "mermin_aggregator_batches_duplicate_total 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

/// A stop ends a session that is waiting for room in a full outbox at once with UNAVAILABLE; the
/// batch it held is not acknowledged (the agent keeps and replays it).
#[actix::test]
async fn a_stop_ends_a_session_waiting_on_a_full_outbox_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let limits = IngestLimits {
        pause_above_outbox_bytes: Some(10),
        outbox_full_wait: Duration::from_secs(60),
        ..IngestLimits::default()
    };
    let (stop, stopping) = watch::channel(false);
    let mut agg = start_until(dir.path(), limits, stopping).await;
    agg.store.outbox_push(&[0; 11]).await.unwrap();
    let mut s = connect(agg.addr).await;
    s.hello("node-a", [11; 16]).await;
    assert_eq!(s.welcome().await, 0);
    s.batch(1, vec![record("node-a", 1)]).await;
    // The batch is waiting (nothing else can answer it for 60 s); then the stop comes.
    assert!(agg.flows.try_recv().is_err());
    let stopped_at = std::time::Instant::now();
    stop.send(true).unwrap();
    let status = s.status().await;
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unavailable, "the aggregator is shutting down")
    );
    assert!(
        stopped_at.elapsed() < Duration::from_secs(1),
        "ended {:?} after the stop",
        stopped_at.elapsed()
    );
    assert_eq!(
        agg.store.last_sequence(&[11; 16]).unwrap(),
        0,
        "not stored, not acked"
    );
}
