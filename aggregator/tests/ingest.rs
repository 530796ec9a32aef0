//! The agent stream over real gRPC on loopback, with a real sled store in a temporary directory:
//! acknowledgements only after durability, replays acknowledged but not applied twice, and every
//! bad input refused with a status that says what is wrong — without disturbing other streams.

use std::{net::SocketAddr, path::Path, time::Duration};

use mermin_aggregator::{
    ingest::{AppliedBatch, Ingest, IngestLimits},
    store::Store,
};
use mermin_protocol::{
    agent::v1::{
        AgentMessage, AggregatorMessage, Batch, Hello, agent_message,
        agent_service_client::AgentServiceClient, aggregator_message,
    },
    flow::v1::{Direction, EndReason, FlowRecord},
};
use tokio::{net::TcpListener, sync::mpsc, time::timeout};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Streaming};

struct Aggregator {
    addr: SocketAddr,
    flows: mpsc::Receiver<AppliedBatch>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn start(dir: &Path, limits: IngestLimits) -> Aggregator {
    // A previous aggregator on this directory releases sled's lock once its last stream task
    // has ended; wait for that (bounded).
    let mut attempts = 0;
    let store = loop {
        match Store::open(dir) {
            Ok(store) => break store,
            Err(_) if attempts < 100 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("{err}"),
        }
    };
    let (tx, flows) = mpsc::channel(16);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = Ingest::new(store, limits, tx).into_service();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Aggregator {
        addr,
        flows,
        server,
    }
}

struct Stream {
    out: mpsc::Sender<AgentMessage>,
    answers: Streaming<AggregatorMessage>,
}

async fn connect(addr: SocketAddr) -> Stream {
    let mut client = AgentServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (out, rx) = mpsc::channel(16);
    let answers = client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    Stream { out, answers }
}

impl Stream {
    async fn send(&self, message: agent_message::Message) {
        self.out
            .send(AgentMessage {
                message: Some(message),
            })
            .await
            .unwrap();
    }

    async fn hello(&self, node: &str, boot_id: [u8; 16]) {
        self.send(agent_message::Message::Hello(Hello {
            protocol_version: 1,
            node_name: node.into(),
            agent_version: "test".into(),
            boot_id: boot_id.to_vec(),
        }))
        .await;
    }

    async fn batch(&self, sequence: u64, records: Vec<FlowRecord>) {
        self.send(agent_message::Message::Batch(Batch { sequence, records }))
            .await;
    }

    async fn answer(&mut self) -> Result<aggregator_message::Message, tonic::Status> {
        let next = timeout(Duration::from_secs(5), self.answers.message())
            .await
            .expect("answer within 5 s");
        Ok(next?.expect("stream open").message.expect("message set"))
    }

    async fn welcome(&mut self) -> u64 {
        match self.answer().await.unwrap() {
            aggregator_message::Message::Welcome(w) => w.last_durable_sequence,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    async fn ack(&mut self) -> u64 {
        match self.answer().await.unwrap() {
            aggregator_message::Message::Ack(a) => a.sequence,
            other => panic!("expected Ack, got {other:?}"),
        }
    }

    async fn status(&mut self) -> tonic::Status {
        match self.answer().await {
            Err(status) => status,
            Ok(other) => panic!("expected an error, got {other:?}"),
        }
    }
}

fn record(node: &str, packets: u64) -> FlowRecord {
    FlowRecord {
        node_name: node.into(),
        interface_name: "eth0".into(),
        direction: Direction::Egress as i32,
        source_address: vec![10, 0, 0, 1],
        destination_address: vec![10, 0, 0, 2],
        source_port: 40000,
        destination_port: 443,
        ip_protocol: 6,
        delta_packets: packets,
        delta_octets: packets * 100,
        first_seen_unix_nanos: 1,
        last_seen_unix_nanos: 2,
        end_reason: EndReason::ActiveTimeout as i32,
        ..FlowRecord::default()
    }
}

#[tokio::test]
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
}

#[tokio::test]
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
    ];
    for (message, code, text) in cases {
        let mut bad = connect(agg.addr).await;
        bad.send(message).await;
        let status = bad.status().await;
        assert_eq!((status.code(), status.message()), (code, text));
    }

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
}
