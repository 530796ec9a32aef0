//! What the tests of every crate share (a dev-dependency, never shipped): a test agent — one
//! `mermin.agent.v1` stream over real gRPC, with helpers to send and expect — records and whole
//! connections, bounded waits, the store reopened after a restart; `otlp`, an in-process OTLP
//! receiver; `http`, plain requests to the metrics endpoints; `certs`, test certificates;
//! `process`, a child process under test (killed on drop) and free ports; `netns`, network
//! namespaces and veth pairs the test creates and deletes; `page_cache`, whether written bytes
//! are on the device yet; `tmpfs`, a small disk the test mounts and fills.

use std::{net::SocketAddr, time::Duration};

use mermin_protocol::{
    agent::v1::{
        AgentMessage, AggregatorMessage, Batch, Hello, agent_message,
        agent_service_client::AgentServiceClient, aggregator_message,
    },
    flow::v1::{Direction, EndReason, FlowRecord},
};
use tokio::{sync::mpsc, time::timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

pub mod certs;
pub mod http;
pub mod netns;
pub mod otlp;
pub mod page_cache;
pub mod process;
pub mod tmpfs;

pub struct Stream {
    out: mpsc::Sender<AgentMessage>,
    answers: Streaming<AggregatorMessage>,
}

pub async fn connect(addr: SocketAddr) -> Stream {
    try_connect(addr).await.unwrap()
}

/// A stream to `addr`, or why there is none (a replica standing by has no agent endpoint).
pub async fn try_connect(addr: SocketAddr) -> Result<Stream, tonic::Status> {
    let mut client = AgentServiceClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (out, rx) = mpsc::channel(16);
    let answers = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    Ok(Stream { out, answers })
}

impl Stream {
    pub async fn send(&self, message: agent_message::Message) {
        assert!(self.try_send(message).await, "the stream is closed");
    }

    /// Sends `message`; false if the stream is gone.
    pub async fn try_send(&self, message: agent_message::Message) -> bool {
        self.out
            .send(AgentMessage {
                message: Some(message),
            })
            .await
            .is_ok()
    }

    pub async fn hello(&self, node: &str, boot_id: [u8; 16]) {
        self.send(agent_message::Message::Hello(Hello {
            protocol_version: 1,
            node_name: node.into(),
            agent_version: "test".into(),
            boot_id: boot_id.to_vec(),
        }))
        .await;
    }

    pub async fn batch(&self, sequence: u64, records: Vec<FlowRecord>) {
        self.send(agent_message::Message::Batch(Batch { sequence, records }))
            .await;
    }

    /// The next answer as it comes (no time limit: the caller bounds it); `None` if the stream
    /// ended or failed.
    pub async fn next_answer(&mut self) -> Option<aggregator_message::Message> {
        self.answers.message().await.ok()??.message
    }

    pub async fn answer(&mut self) -> Result<aggregator_message::Message, tonic::Status> {
        let next = timeout(Duration::from_secs(5), self.answers.message())
            .await
            .expect("answer within 5 s");
        Ok(next?.expect("stream open").message.expect("message set"))
    }

    pub async fn welcome(&mut self) -> u64 {
        match self.answer().await.unwrap() {
            aggregator_message::Message::Welcome(w) => w.last_durable_sequence,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub async fn ack(&mut self) -> u64 {
        match self.answer().await.unwrap() {
            aggregator_message::Message::Ack(a) => a.sequence,
            other => panic!("expected Ack, got {other:?}"),
        }
    }

    pub async fn status(&mut self) -> tonic::Status {
        match self.answer().await {
            Err(status) => status,
            Ok(other) => panic!("expected an error, got {other:?}"),
        }
    }
}

/// Opens a stream to `addr`, sends `messages` as they are (encoded `AgentMessage`s, or bytes
/// that are not one), and returns how the aggregator ended the stream (within 5 s).
pub async fn send_raw(addr: SocketAddr, messages: Vec<Vec<u8>>) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/mermin.agent.v1.AgentService/Stream",
    );
    let request = tonic::Request::new(tokio_stream::iter(messages));
    let ended = async {
        let mut answers = grpc.streaming(request, path, RawCodec).await?.into_inner();
        while answers.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    };
    match timeout(Duration::from_secs(5), ended)
        .await
        .expect("ended within 5 s")
    {
        Err(status) => status,
        Ok(()) => panic!("the stream ended without a status"),
    }
}

/// Writes bytes as they are; reads answers with prost.
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = AggregatorMessage;
    type Encoder = RawCodec;
    type Decoder = tonic_prost::ProstDecoder<AggregatorMessage>;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        out: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        out.put_slice(&item);
        Ok(())
    }
}

/// Waits until `done` (checked every 20 ms; at most 20 s, then fails naming `what`).
pub async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of `series` in a Prometheus text rendering (0 if absent).
pub fn metric_value(rendered: &str, series: &str) -> u64 {
    rendered
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// Opens the store in `path` once the previous handle's background threads let go of sled's
/// lock (they outlive the handle briefly); bounded.
pub async fn reopen(path: &std::path::Path) -> mermin_aggregator::store::Store {
    for _ in 0..100 {
        if let Ok(store) = mermin_aggregator::store::SledStore::open(path) {
            return store;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mermin_aggregator::store::SledStore::open(path).unwrap()
}

/// A fixed time of this test run (the aggregator refuses times more than a day from its clock):
/// the same for every record of the run, so equal records stay equal.
pub fn recent_nanos() -> u64 {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *START.get_or_init(mermin_aggregator::clock::unix_now)
}

pub fn record(node: &str, packets: u64) -> FlowRecord {
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
        first_seen_unix_nanos: recent_nanos(),
        last_seen_unix_nanos: recent_nanos() + 1,
        end_reason: EndReason::ActiveTimeout as i32,
        ..FlowRecord::default()
    }
}

/// Both directions of one TCP connection seen on one node's pod veth, closed.
pub fn closed_connection(port: u32) -> Vec<FlowRecord> {
    connection(
        [10, 0, 0, 1],
        port,
        [10, 0, 0, 2],
        443,
        6,
        (9_000, 48_000),
        EndReason::TcpClose,
        recent_nanos(),
    )
}

/// Both directions of one connection as node-a sees it on its pod veth `veth1` (12 packets
/// sent, 10 received; TCP with its handshake), starting `at`.
#[allow(clippy::too_many_arguments)]
pub fn connection(
    client: [u8; 4],
    client_port: u32,
    server: [u8; 4],
    server_port: u32,
    ip_protocol: u32,
    (sent, received): (u64, u64),
    end_reason: EndReason,
    at: u64,
) -> Vec<FlowRecord> {
    let tcp = ip_protocol == 6;
    let record = |outbound: bool| FlowRecord {
        node_name: "node-a".into(),
        interface_name: "veth1".into(),
        direction: if outbound {
            Direction::Ingress
        } else {
            Direction::Egress
        } as i32,
        source_address: if outbound { client } else { server }.to_vec(),
        destination_address: if outbound { server } else { client }.to_vec(),
        source_port: if outbound { client_port } else { server_port },
        destination_port: if outbound { server_port } else { client_port },
        ip_protocol,
        delta_packets: if outbound { 12 } else { 10 },
        delta_octets: if outbound { sent } else { received },
        first_seen_unix_nanos: at,
        last_seen_unix_nanos: at + 1_000,
        first_tcp_flags: match (tcp, outbound) {
            (true, true) => 0x02,
            (true, false) => 0x12,
            (false, _) => 0,
        },
        tcp_flags: if tcp { 0x1b } else { 0 },
        end_reason: end_reason as i32,
        ..FlowRecord::default()
    };
    vec![record(true), record(false)]
}
