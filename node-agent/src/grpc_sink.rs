//! The gRPC sink: streams records to the aggregator (`mermin.agent.v1`) with acknowledgements,
//! a bounded replay buffer and backpressure.
//!
//! The collector thread hands records to [`GrpcSink::send`], which cuts them into batches with
//! consecutive sequence numbers (at most [`BATCH_RECORDS`] records, fewer if the aggregator's
//! Welcome says it takes fewer), encodes them (the buffer holds each batch's records as the
//! protobuf bytes they are sent as: sending or resending one copies bytes, never records) and
//! appends them to the buffer. A task on the agent's runtime keeps one stream to the aggregator
//! (`AgentCodec` writes a buffered batch into its `AgentMessage` without decoding it): Hello; on
//! Welcome it drops what the aggregator already holds and (re)sends the rest in order, at most
//! `max_in_flight_batches` unacknowledged; every Ack frees the buffer up to that sequence. On any
//! error it reconnects with backoff and replays.
//!
//! Nothing is dropped: when the buffer holds `capacity` unacknowledged batches, `send` waits. The
//! collector then stops swapping kernel tables, the kernel's overflow path takes over, and what
//! that cannot hold is counted by the kernel counters — backpressure with every loss counted.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::{BufMut, Bytes};
use mermin_protocol::{
    agent::v1::{AgentMessage, AggregatorMessage, Hello, agent_message, aggregator_message},
    flow::v1::FlowRecord,
    wire::Fields,
};
use prost::{
    Message as _,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint},
};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    clock::WallClock,
    metrics::Metrics,
    sink::{RecordSink, SinkError},
};

/// The protocol revision this agent speaks.
const PROTOCOL_VERSION: u32 = 1;
/// Records per batch at most (the aggregator's default limit is larger; a Welcome with a smaller
/// one lowers it). The aggregator makes each batch durable on its own before it acknowledges it,
/// so a busy node's scan goes in a few large batches rather than many small ones
/// (BENCHMARKS.md: batches of 1,000 cost the aggregator ~15% more CPU per connection at 5k
/// connections/s). A batch taken by `send` just before a Welcome lowered the limit may still be
/// larger: the aggregator refuses it, and the Welcome of the next stream cuts it.
const BATCH_RECORDS: usize = 4096;
/// How long a connection attempt waits, and how often a stream pings the aggregator and how
/// long it waits for the answer: a path that went silent (a node gone without a reset, a
/// replica forwarding to a leader it can no longer reach) ends the stream within
/// `KEEPALIVE + KEEPALIVE_WAIT`, and the agent reconnects and replays, instead of waiting on
/// the kernel's retransmissions for many minutes.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
const KEEPALIVE: Duration = Duration::from_secs(5);
const KEEPALIVE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct GrpcSinkConfig {
    /// `http://aggregator:4600`.
    pub endpoint: String,
    pub node_name: String,
    /// Unacknowledged batches held at most.
    pub capacity: usize,
    /// Mutual TLS (an https:// endpoint); the files are read at every connection.
    pub tls: Option<crate::config::ClientTls>,
}

/// A batch as the buffer holds it: its sequence, and its records encoded as the `records`
/// fields of a `Batch` message.
#[derive(Debug, Clone)]
struct EncodedBatch {
    sequence: u64,
    records: Bytes,
    /// How many records `records` holds.
    count: usize,
}

/// `Batch.records`, `AgentMessage.batch`, `Batch.sequence`.
const BATCH_RECORDS_FIELD: u32 = 2;
const AGENT_MESSAGE_BATCH_FIELD: u32 = 2;
const BATCH_SEQUENCE_FIELD: u32 = 1;
/// About what one encoded record takes (IPv4, a veth's name, a node name): the buffer's first
/// size, so that a batch is rarely copied while it is written.
const RECORD_BYTES_GUESS: usize = 112;

impl EncodedBatch {
    fn encode(sequence: u64, records: &[FlowRecord]) -> Self {
        // Written by hand: prost's encoder took twice as long (BENCHMARKS.md).
        let mut buffer = Vec::with_capacity(records.len() * RECORD_BYTES_GUESS);
        let mut fields = Fields(&mut buffer);
        for record in records {
            fields.flow_record(BATCH_RECORDS_FIELD, record);
        }
        EncodedBatch {
            sequence,
            records: Bytes::from(buffer),
            count: records.len(),
        }
    }

    /// This batch's records in batches of at most `limit` (numbered later), cut between the
    /// encoded records without decoding them.
    fn split(self, limit: usize) -> impl Iterator<Item = EncodedBatch> {
        let mut rest = self.records;
        let mut left = self.count;
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let count = left.min(limit);
            let end = (0..count).fold(0, |at, _| at + encoded_field_len(&rest[at..]));
            left -= count;
            Some(EncodedBatch {
                sequence: 0,
                records: rest.split_to(end),
                count,
            })
        })
    }

    /// Writes the `AgentMessage` carrying this batch.
    fn write_message(&self, out: &mut impl BufMut) {
        let sequence_len = 1 + encoded_len_varint(self.sequence);
        encode_key(AGENT_MESSAGE_BATCH_FIELD, WireType::LengthDelimited, out);
        encode_varint((sequence_len + self.records.len()) as u64, out);
        encode_key(BATCH_SEQUENCE_FIELD, WireType::Varint, out);
        encode_varint(self.sequence, out);
        out.put_slice(&self.records);
    }
}

/// The length of the length-delimited field at the start of `bytes` (a record as
/// [`EncodedBatch::encode`] wrote it: a one-byte key, the length, the record).
fn encoded_field_len(mut bytes: &[u8]) -> usize {
    let all = bytes.len();
    bytes = &bytes[1..];
    let len = prost::encoding::decode_varint(&mut bytes).expect("a batch this agent encoded");
    all - bytes.len() + len as usize
}

struct Buffer {
    next_sequence: u64,
    /// Unacknowledged batches, in sequence order.
    unacked: VecDeque<EncodedBatch>,
    /// Set when the agent stops: a `send` waiting for room gives up at this instant.
    give_up_at: Option<Instant>,
}

struct Shared {
    buffer: Mutex<Buffer>,
    /// Signalled when acknowledgements free space (for `send`) or the buffer empties.
    space: Condvar,
    /// Signalled when a batch is appended (for the stream task).
    appended: Notify,
    capacity: usize,
    /// Records per batch: [`BATCH_RECORDS`], or the aggregator's limit if that is smaller.
    batch_records: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every batch is acknowledged, at most `timeout`; returns how many are left.
    fn wait_acknowledged(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut buffer = self.lock();
        while !buffer.unacked.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            buffer = self
                .space
                .wait_timeout(buffer, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        buffer.unacked.len()
    }

    /// Takes the aggregator's word in a Welcome: everything through `last` is durable there. If
    /// the next batch it expects is not the next one this agent would send — it lost batches it
    /// had acknowledged (its disk was wiped), or it knows sequences this process never sent —
    /// the unacknowledged batches are renumbered to follow `last`, so the stream goes on instead
    /// of being refused forever. Batches larger than the aggregator's `max_batch_records` (0: not
    /// given) are cut to it and renumbered the same way (none of them is durable there), and
    /// later batches are cut to it from the start. Returns how many acknowledged batches the
    /// aggregator no longer has (counted by the caller: they are lost).
    fn welcome(&self, last: u64, max_batch_records: u32) -> u64 {
        let limit = match max_batch_records as usize {
            0 => BATCH_RECORDS,
            given => given.min(BATCH_RECORDS),
        };
        self.batch_records.store(limit, Ordering::Relaxed);
        let mut buffer = self.lock();
        // Durable there — unless the aggregator speaks of sequences this process never sent
        // (then none of ours is durable, and all are renumbered).
        if last < buffer.next_sequence {
            while buffer.unacked.front().is_some_and(|b| b.sequence <= last) {
                buffer.unacked.pop_front();
            }
        }
        let first = buffer
            .unacked
            .front()
            .map_or(buffer.next_sequence, |b| b.sequence);
        let oversized = buffer.unacked.iter().any(|b| b.count > limit);
        if first == last + 1 && !oversized {
            return 0;
        }
        if oversized {
            let batches = std::mem::take(&mut buffer.unacked);
            buffer.unacked = batches.into_iter().flat_map(|b| b.split(limit)).collect();
        }
        let lost = first.saturating_sub(last + 1);
        for (batch, sequence) in buffer.unacked.iter_mut().zip(last + 1..) {
            batch.sequence = sequence;
        }
        buffer.next_sequence = last + 1 + buffer.unacked.len() as u64;
        self.space.notify_all();
        lost
    }

    fn acknowledge_through(&self, sequence: u64) {
        let mut buffer = self.lock();
        while buffer
            .unacked
            .front()
            .is_some_and(|b| b.sequence <= sequence)
        {
            buffer.unacked.pop_front();
        }
        self.space.notify_all();
    }
}

pub struct GrpcSink {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
}

/// Starts the stream task on the current tokio runtime and returns the sink.
pub fn start(config: GrpcSinkConfig, metrics: Arc<Metrics>) -> Result<GrpcSink, SinkError> {
    let boot_id = boot_id().map_err(|source| SinkError::Open {
        path: "/proc/sys/kernel/random/uuid".into(),
        source,
    })?;
    let shared = Arc::new(Shared {
        buffer: Mutex::new(Buffer {
            next_sequence: 1,
            unacked: VecDeque::new(),
            give_up_at: None,
        }),
        space: Condvar::new(),
        appended: Notify::new(),
        capacity: config.capacity.max(1),
        batch_records: AtomicUsize::new(BATCH_RECORDS),
    });
    tokio::spawn(stream_forever(
        config,
        boot_id,
        shared.clone(),
        metrics.clone(),
    ));
    Ok(GrpcSink { shared, metrics })
}

impl GrpcSink {
    /// A handle for waiting on acknowledgements once the sink itself has moved to the collector.
    pub fn handle(&self) -> GrpcSinkHandle {
        GrpcSinkHandle(self.shared.clone())
    }
}

pub struct GrpcSinkHandle(Arc<Shared>);

impl GrpcSinkHandle {
    /// Waits until every batch is acknowledged, at most `timeout`; returns how many are left.
    pub fn wait_acknowledged(&self, timeout: Duration) -> usize {
        self.0.wait_acknowledged(timeout)
    }

    /// The agent is stopping: a `send` that waits for room in the full buffer gives up after
    /// `bound` from now (its records counted as dropped), so that a stop never waits on an
    /// aggregator out of reach for longer.
    pub fn stop_waiting_after(&self, bound: Duration) {
        self.0.lock().give_up_at = Some(Instant::now() + bound);
        self.0.space.notify_all();
    }
}

/// How often a `send` waiting for room tells the liveness probe that it is alive.
const WAIT_HEARTBEAT: Duration = Duration::from_secs(1);

impl RecordSink for GrpcSink {
    fn send(&mut self, records: &[FlowRecord]) -> Result<(), SinkError> {
        let batch_records = self.shared.batch_records.load(Ordering::Relaxed);
        for (index, chunk) in records.chunks(batch_records).enumerate() {
            // Encoded outside the lock; numbered inside it.
            let mut batch = EncodedBatch::encode(0, chunk);
            let mut buffer = self.shared.lock();
            if buffer.unacked.len() >= self.shared.capacity {
                self.metrics.sink_backpressure.inc();
                // Waiting on the aggregator is not a stall: the liveness probe hears from this
                // loop, so that an outage does not get the agent (and its buffer) restarted.
                while buffer.unacked.len() >= self.shared.capacity {
                    self.metrics.waiting_on_sink(WallClock::kernel_now());
                    let wait = match buffer.give_up_at {
                        Some(at) => match at.checked_duration_since(Instant::now()) {
                            Some(left) if !left.is_zero() => left.min(WAIT_HEARTBEAT),
                            _ => {
                                return Err(SinkError::GaveUp {
                                    unsent: records.len() - index * batch_records,
                                });
                            }
                        },
                        None => WAIT_HEARTBEAT,
                    };
                    buffer = self
                        .shared
                        .space
                        .wait_timeout(buffer, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            batch.sequence = buffer.next_sequence;
            buffer.next_sequence += 1;
            buffer.unacked.push_back(batch);
            drop(buffer);
            self.shared.appended.notify_one();
        }
        Ok(())
    }
}

/// Reconnect delays: exponential from 100 ms to 10 s, each jittered between half and all of it
/// (so that the agents of a cluster do not reconnect in lockstep after an aggregator restart;
/// backon's own jitter would add up to the whole delay again, past the maximum), from the start
/// again after every stream that got as far as a Welcome.
fn reconnect_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .without_max_times()
        .build()
        .map(|delay| delay.mul_f64(0.5 + fastrand::f64() / 2.0))
}

async fn stream_forever(
    config: GrpcSinkConfig,
    boot_id: [u8; 16],
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
) {
    let mut delays = reconnect_delays();
    loop {
        let mut welcomed = false;
        let err = stream_once(&config, boot_id, &shared, &metrics, &mut welcomed).await;
        if welcomed {
            delays = reconnect_delays();
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(10));
        metrics.sink_reconnects.inc();
        tracing::warn!(endpoint = %config.endpoint, %err, ?delay, "aggregator stream ended; reconnecting");
        tokio::time::sleep(delay).await;
    }
}

/// One stream, until it fails (it never ends otherwise); says why. `welcomed` turns true once
/// the aggregator answered the Hello.
async fn stream_once(
    config: &GrpcSinkConfig,
    boot_id: [u8; 16],
    shared: &Shared,
    metrics: &Metrics,
    welcomed: &mut bool,
) -> String {
    match stream_until_error(config, boot_id, shared, metrics, welcomed).await {
        Ok(never) => match never {},
        Err(err) => err,
    }
}

/// The TLS configuration from `tls`'s files, as they are now.
fn client_tls(tls: &crate::config::ClientTls) -> Result<tonic::transport::ClientTlsConfig, String> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
    };
    let mut config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(&tls.ca)?))
        .identity(tonic::transport::Identity::from_pem(
            read(&tls.cert)?,
            read(&tls.key)?,
        ));
    if let Some(name) = &tls.server_name {
        config = config.domain_name(name.clone());
    }
    Ok(config)
}

async fn stream_until_error(
    config: &GrpcSinkConfig,
    boot_id: [u8; 16],
    shared: &Shared,
    metrics: &Metrics,
    welcomed: &mut bool,
) -> Result<std::convert::Infallible, String> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(config.endpoint.clone())
        .map_err(|e| format!("endpoint: {e}"))?
        .connect_timeout(CONNECT_WAIT)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE_WAIT)
        .keep_alive_while_idle(true);
    if let Some(tls) = &config.tls {
        endpoint = endpoint
            .tls_config(client_tls(tls)?)
            .map_err(|e| format!("TLS: {e}"))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(": {c}"));
        format!("connecting: {e}{cause}")
    })?;
    let mut client = tonic::client::Grpc::new(channel);
    let (out, rx) = mpsc::channel::<Outgoing>(4);
    client
        .ready()
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let mut answers = client
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/mermin.agent.v1.AgentService/Stream",
            ),
            AgentCodec,
        )
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let send = |message| {
        let out = out.clone();
        async move {
            out.send(message)
                .await
                .map_err(|_| "stream closed".to_owned())
        }
    };
    send(Outgoing::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        node_name: config.node_name.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        boot_id: boot_id.to_vec(),
    }))
    .await?;
    let welcome = match next(&mut answers).await? {
        aggregator_message::Message::Welcome(w) => w,
        other => return Err(format!("expected Welcome, got {other:?}")),
    };
    *welcomed = true;
    let lost = shared.welcome(welcome.last_durable_sequence, welcome.max_batch_records);
    if lost > 0 {
        metrics.sink_batches_lost.inc_by(lost);
        tracing::error!(
            lost,
            last_durable = welcome.last_durable_sequence,
            "the aggregator no longer has batches it acknowledged (its store was lost); continuing after its last durable batch"
        );
    }
    let max_in_flight = u64::from(welcome.max_in_flight_batches.max(1));
    tracing::info!(endpoint = %config.endpoint, last_durable = welcome.last_durable_sequence, "streaming to the aggregator");

    let mut sent_through = welcome.last_durable_sequence;
    let mut acked_through = welcome.last_durable_sequence;
    loop {
        // Send what the window allows, oldest first (this replays after a reconnect).
        let to_send: Vec<EncodedBatch> = {
            let buffer = shared.lock();
            buffer
                .unacked
                .iter()
                .filter(|b| b.sequence > sent_through)
                .take((max_in_flight - (sent_through - acked_through)) as usize)
                .cloned()
                .collect()
        };
        for batch in to_send {
            sent_through = batch.sequence;
            send(Outgoing::Batch(batch)).await?;
        }
        tokio::select! {
            answer = next(&mut answers) => match answer? {
                aggregator_message::Message::Ack(ack) => {
                    acked_through = acked_through.max(ack.sequence);
                    shared.acknowledge_through(ack.sequence);
                }
                other => return Err(format!("unexpected {other:?}")),
            },
            _ = shared.appended.notified() => {}
        }
    }
}

/// What the stream sends: the Hello, then buffered batches.
enum Outgoing {
    Hello(Hello),
    Batch(EncodedBatch),
}

/// The agent stream's codec: writes a buffered batch into its `AgentMessage` as it is (see
/// [`EncodedBatch`]); decodes the aggregator's answers with prost.
struct AgentCodec;

impl tonic::codec::Codec for AgentCodec {
    type Encode = Outgoing;
    type Decode = AggregatorMessage;
    type Encoder = AgentCodec;
    type Decoder = tonic_prost::ProstDecoder<AggregatorMessage>;

    fn encoder(&mut self) -> AgentCodec {
        AgentCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(tonic::codec::BufferSettings::default())
    }
}

impl tonic::codec::Encoder for AgentCodec {
    type Item = Outgoing;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Outgoing,
        out: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        match item {
            Outgoing::Hello(hello) => AgentMessage {
                message: Some(agent_message::Message::Hello(hello)),
            }
            .encode(out)
            .map_err(|e| tonic::Status::internal(format!("encoding the Hello: {e}"))),
            Outgoing::Batch(batch) => {
                batch.write_message(out);
                Ok(())
            }
        }
    }
}

async fn next(
    answers: &mut tonic::Streaming<AggregatorMessage>,
) -> Result<aggregator_message::Message, String> {
    match answers.message().await {
        Ok(Some(message)) => message
            .message
            .ok_or_else(|| "empty message from the aggregator".to_owned()),
        Ok(None) => Err("the aggregator closed the stream".into()),
        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// 16 random bytes from the kernel (a random UUID).
fn boot_id() -> std::io::Result<[u8; 16]> {
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")?;
    let hex: String = uuid.trim().chars().filter(|c| *c != '-').collect();
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(next_sequence: u64, unacked: std::ops::Range<u64>) -> Shared {
        shared_with(
            next_sequence,
            unacked
                .map(|sequence| EncodedBatch::encode(sequence, &[]))
                .collect(),
        )
    }

    fn shared_with(next_sequence: u64, unacked: VecDeque<EncodedBatch>) -> Shared {
        Shared {
            buffer: Mutex::new(Buffer {
                next_sequence,
                unacked,
                give_up_at: None,
            }),
            space: Condvar::new(),
            appended: Notify::new(),
            capacity: 64,
            batch_records: AtomicUsize::new(BATCH_RECORDS),
        }
    }

    /// Each buffered batch: its sequence and its records' source ports.
    fn batches(shared: &Shared) -> Vec<(u64, Vec<u32>)> {
        let buffer = shared.lock();
        buffer
            .unacked
            .iter()
            .map(|b| {
                let records = mermin_protocol::agent::v1::Batch::decode(&b.records[..])
                    .unwrap()
                    .records;
                assert_eq!(records.len(), b.count);
                (b.sequence, records.iter().map(|r| r.source_port).collect())
            })
            .collect()
    }

    fn records(ports: std::ops::RangeInclusive<u32>) -> Vec<FlowRecord> {
        ports
            .map(|port| FlowRecord {
                node_name: "node-a".into(),
                interface_name: "veth-with-a-long-name".into(),
                source_address: vec![10, 0, 0, 1],
                source_port: port,
                // Records of more than 127 bytes: two-byte lengths.
                destination_address: vec![0xfd; 100],
                ..FlowRecord::default()
            })
            .collect()
    }

    fn sequences(shared: &Shared) -> (Vec<u64>, u64) {
        let buffer = shared.lock();
        (
            buffer.unacked.iter().map(|b| b.sequence).collect(),
            buffer.next_sequence,
        )
    }

    /// A buffered batch goes out as the message prost would write for it, under the sequence it
    /// has when sent (a Welcome may have renumbered it).
    #[test]
    fn a_buffered_batch_is_sent_as_the_message_of_its_records() {
        let record = |port: u32, interface: &str| FlowRecord {
            node_name: "node-a".into(),
            interface_name: interface.into(),
            source_address: vec![10, 0, 0, 1],
            destination_address: vec![0xfd; 16],
            source_port: port,
            delta_packets: u64::MAX,
            translation: Some(mermin_protocol::flow::v1::Translation::default()),
            ..FlowRecord::default()
        };
        let records = [
            record(40_000, "veth1"),
            record(1, ""),
            FlowRecord::default(),
        ];
        let mut batch = EncodedBatch::encode(7, &records);
        batch.sequence = 300; // renumbered: two bytes of varint
        let mut wire = Vec::new();
        batch.write_message(&mut wire);
        let expected = AgentMessage {
            message: Some(agent_message::Message::Batch(
                mermin_protocol::agent::v1::Batch {
                    sequence: 300,
                    records: records.to_vec(),
                },
            )),
        };
        assert_eq!(wire, expected.encode_to_vec());
        assert_eq!(AgentMessage::decode(&wire[..]).unwrap(), expected);
    }

    #[test]
    fn a_welcome_after_a_reconnect_drops_what_is_durable_and_keeps_the_rest() {
        let s = shared(111, 108..111);
        assert_eq!(s.welcome(108, 0), 0);
        assert_eq!(sequences(&s), (vec![109, 110], 111));
    }

    #[test]
    fn an_aggregator_that_lost_its_store_gets_the_rest_renumbered_and_the_loss_is_counted() {
        // Batches 1..=107 were acknowledged; the aggregator's data dir was wiped.
        let s = shared(111, 108..111);
        assert_eq!(s.welcome(0, 0), 107);
        assert_eq!(sequences(&s), (vec![1, 2, 3], 4));
        // Nothing unacknowledged: the next batch simply follows the aggregator's last.
        let s = shared(51, 51..51);
        assert_eq!(s.welcome(20, 0), 30);
        assert_eq!(sequences(&s), (vec![], 21));
    }

    /// An aggregator that takes fewer records per batch than this agent buffered: the batches it
    /// has not acknowledged are cut to its limit between records, in order, renumbered after its
    /// last; the next ones are cut to it from the start.
    #[test]
    fn a_welcome_with_a_smaller_batch_limit_cuts_the_buffered_batches_to_it() {
        let buffered = [
            EncodedBatch::encode(4, &records(100..=101)),
            EncodedBatch::encode(5, &records(1..=5)),
            EncodedBatch::encode(6, &records(6..=7)),
        ];
        let s = shared_with(7, buffered.into());
        assert_eq!(s.welcome(4, 2), 0);
        assert_eq!(
            batches(&s),
            [
                (5, vec![1, 2]),
                (6, vec![3, 4]),
                (7, vec![5]),
                (8, vec![6, 7])
            ]
        );
        assert_eq!(sequences(&s).1, 9);
        let mut sink = GrpcSink {
            shared: Arc::new(s),
            metrics: Arc::new(Metrics::new()),
        };
        sink.send(&records(8..=10)).unwrap();
        assert_eq!(
            batches(&sink.shared)[4..],
            [(9, vec![8, 9]), (10, vec![10])]
        );
        // A Welcome without a limit (0) or with a larger one: batches of BATCH_RECORDS again.
        assert_eq!(sink.shared.welcome(10, 0), 0);
        let many = records(1..=BATCH_RECORDS as u32 + 1);
        sink.send(&many).unwrap();
        let counts: Vec<usize> = sink.shared.lock().unacked.iter().map(|b| b.count).collect();
        assert_eq!(counts, [BATCH_RECORDS, 1]);
    }

    /// A stop while the buffer is full (the aggregator out of reach): the waiting `send` gives
    /// up at the bound, saying how many records it could not buffer, and until then it keeps
    /// the liveness probe answered.
    #[test]
    fn a_stop_ends_the_wait_for_room_and_says_what_was_not_sent() {
        let mut s = shared(2, 1..2);
        s.capacity = 2;
        s.batch_records.store(2, Ordering::Relaxed);
        let metrics = Arc::new(Metrics::new());
        let mut sink = GrpcSink {
            shared: Arc::new(s),
            metrics: metrics.clone(),
        };
        let handle = sink.handle();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            handle.stop_waiting_after(Duration::from_millis(50));
        });
        let started = Instant::now();
        let refused = sink.send(&records(1..=5)).unwrap_err();
        stopper.join().unwrap();
        // [1, 2] took the last room; [3, 4] and [5] did not get any.
        assert!(
            matches!(refused, SinkError::GaveUp { unsent: 3 }),
            "{refused}"
        );
        assert_eq!(refused.lost(5), 3);
        assert_eq!(batches(&sink.shared), [(1, vec![]), (2, vec![1, 2])]);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(metrics.sink_backpressure.get(), 1);
        // No scan since the metrics were made (≥ 150 ms ago): alive by the wait's heartbeat.
        assert!(metrics.is_alive(WallClock::kernel_now(), 100_000_000));
    }

    #[test]
    fn sequences_the_aggregator_knows_but_this_process_never_sent_are_skipped() {
        let s = shared(4, 2..4);
        assert_eq!(s.welcome(9, 0), 0);
        assert_eq!(sequences(&s), (vec![10, 11], 12));
    }

    /// An aggregator that accepts the connection and then says nothing (a silent path): the
    /// stream ends once a ping goes unanswered, instead of waiting for ever.
    #[tokio::test]
    async fn a_silent_aggregator_ends_the_stream_when_a_ping_goes_unanswered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let config = GrpcSinkConfig {
            endpoint: format!("http://{addr}"),
            node_name: "node-a".into(),
            capacity: 4,
            tls: None,
        };
        let (shared, metrics) = (shared(1, 1..1), Metrics::new());
        let mut welcomed = false;
        let bound = KEEPALIVE + KEEPALIVE_WAIT + Duration::from_secs(5);
        let ended = tokio::time::timeout(
            bound,
            stream_once(&config, [1; 16], &shared, &metrics, &mut welcomed),
        )
        .await
        .expect("the stream ends within the keepalive bound");
        assert!(!welcomed);
        assert!(ended.starts_with("Unavailable: "), "{ended}");
        silent.abort();
    }

    #[test]
    fn reconnect_delays_grow_with_jitter_and_stay_bounded() {
        let delays: Vec<Duration> = reconnect_delays().take(40).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        assert!(delays[30..].iter().all(|d| *d >= Duration::from_secs(5)));
        let again: Vec<Duration> = reconnect_delays().take(40).collect();
        assert_ne!(delays, again, "jittered: two agents do not wait alike");
    }
}
