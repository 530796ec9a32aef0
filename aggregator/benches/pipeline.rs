//! Aggregator benchmarks (figures and commands in BENCHMARKS.md):
//!
//! - `stitch`: records/s through validation and the flow table, memory per live flow (a counting
//!   allocator), spans/s from stitching to encoded OTLP bytes, and spans/s of the encoding
//!   alone, a shard's tick at a time — one core, no I/O.
//! - `read`: an agent's batch from its bytes to validated observations, prost's decoding against
//!   the aggregator's (`mermin_protocol::wire::read`) — one core, no I/O.
//! - `tick`: one shard's work per 250 ms tick (due intervals emitted, changed connections
//!   serialized for the checkpoint) while it remembers a grace period's worth of connections,
//!   each on a 5-tuple of its own, then with each 5-tuple reused every 2 s.
//! - `ingest`: the whole aggregator (ingest with durable sled appends, flow shards, outbox,
//!   exporter) fed by agent streams over loopback gRPC (two, then four: pairs of nodes),
//!   exporting to an OTLP receiver in this process: records acknowledged per second, and last
//!   record acked → span received, p50/p99. The harness is lean (`lean`) so that the aggregator
//!   gets the machine.
//! - `replicated`: the same on the replicated store — one replica alone, then three replicas in
//!   this process (Raft over loopback gRPC): what a quorum write costs per record.
//!
//! `cargo bench -p mermin-aggregator --bench pipeline -- [stitch|read|tick|ingest|replicated]`

use std::{
    cell::RefCell,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use mermin_aggregator::{
    export::ExportConfig,
    flow_table::FlowTable,
    metadata::{AttributeNaming, IndexSettings, MetadataIndex},
    observation::{Observation, PointCache},
    pipeline::{Aggregator, AggregatorConfig},
    replication::{RaftTuning, Replica},
    shard::encode_requests,
    span::Enrichment,
    stitch::InterfaceKinds,
    store::{SledStore, Store},
};
use mermin_protocol::{
    agent::v1::{AgentMessage, Batch, Hello, agent_message, aggregator_message},
    flow::v1::{Direction, EndReason, FlowRecord},
};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

#[path = "support/counting.rs"]
mod counting;
use counting::{Counting, live_bytes};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let all = which.is_empty();
    if all || which.iter().any(|w| w == "stitch") {
        stitch();
    }
    if all || which.iter().any(|w| w == "read") {
        read();
    }
    if all || which.iter().any(|w| w == "tick") {
        println!("| measure (one shard, one core) | value |");
        println!("|---|---:|");
        tick(None);
        // A busy client's kernel reuses its ports: each 5-tuple carries a connection every 2 s,
        // and the table remembers ~30 per key through the grace period.
        tick(Some(2));
    }
    if all || which.iter().any(|w| w == "ingest") {
        ingest(Backend::Sled);
    }
    if all || which.iter().any(|w| w == "replicated") {
        ingest(Backend::Replicas(1));
        ingest(Backend::Replicas(3));
    }
}

/// What the aggregator under test stores in.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sled,
    /// The store group of this many replicas, all in this process; replica 0 leads.
    Replicas(usize),
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Sled => f.write_str("sled"),
            Backend::Replicas(n) => write!(f, "replicated, {n} replica(s)"),
        }
    }
}

/// The store of `backend` in `dir`, and the replicas it runs on (kept until the run ends).
async fn open_store(backend: Backend, dir: &std::path::Path) -> (Store, Vec<Replica>) {
    let Backend::Replicas(count) = backend else {
        return (SledStore::open(dir).unwrap(), Vec::new());
    };
    let mut replicas = Vec::new();
    for id in 0..count as u64 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let data = dir.join(format!("replica-{id}"));
        replicas.push(
            Replica::start(id, listener, None, &data, RaftTuning::default(), None)
                .await
                .unwrap(),
        );
    }
    replicas[0].bootstrap().await.unwrap();
    for replica in &replicas[1..] {
        replicas[0]
            .add_member(replica.id(), replica.address())
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while replicas[0].store_voters().map_or(0, |voters| voters.len()) != count
        || replicas[0].store_leader() != Some(0)
    {
        assert!(Instant::now() < deadline, "the store group did not form");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (replicas[0].store(), replicas)
}

/// The four records of one cross-node TCP connection (two nodes, each direction), connection `i`.
/// A fixed recent time (the aggregator refuses times more than a day from its clock).
fn recent_nanos() -> u64 {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *START.get_or_init(mermin_aggregator::clock::unix_now)
}

fn connection(i: u32, reason: EndReason) -> [FlowRecord; 4] {
    connection_between(i, reason, ["node-a", "node-b"])
}

/// [`connection`] between a client on node `nodes[0]` and a server on `nodes[1]`.
fn connection_between(i: u32, reason: EndReason, nodes: [&str; 2]) -> [FlowRecord; 4] {
    // The client's address spells `i`: 11.(i >> 16).(i >> 8).i.
    let client = [11, (i >> 16) as u8, (i >> 8) as u8, i as u8];
    let server = [10, 2, 0, 1];
    let record = |node: &str, interface: &str, direction: Direction, out: bool| FlowRecord {
        node_name: node.into(),
        interface_name: interface.into(),
        direction: direction as i32,
        source_address: if out {
            client.to_vec()
        } else {
            server.to_vec()
        },
        destination_address: if out {
            server.to_vec()
        } else {
            client.to_vec()
        },
        source_port: if out { 30000 + (i % 30000) } else { 443 },
        destination_port: if out { 443 } else { 30000 + (i % 30000) },
        ip_protocol: 6,
        delta_packets: 10,
        delta_octets: 5_000,
        first_seen_unix_nanos: recent_nanos(),
        last_seen_unix_nanos: recent_nanos() + 1_000,
        first_tcp_flags: if out { 0x02 } else { 0x12 },
        tcp_flags: 0x1b,
        end_reason: reason as i32,
        ..FlowRecord::default()
    };
    [
        record(nodes[0], "vetha", Direction::Ingress, true),
        record(nodes[0], "vetha", Direction::Egress, false),
        record(nodes[1], "vethb", Direction::Egress, true),
        record(nodes[1], "vethb", Direction::Ingress, false),
    ]
}

fn stitch() {
    const FLOWS: u32 = 100_000;
    let records: Vec<FlowRecord> = (0..FLOWS)
        .flat_map(|i| connection(i, EndReason::TcpClose))
        .collect();
    let mut table = FlowTable::new(
        InterfaceKinds::default(),
        Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let before = live_bytes();
    let start = Instant::now();
    for record in &records {
        let observation = Observation::try_from(record).unwrap();
        table.apply(&observation, 0);
    }
    let ingest_time = start.elapsed();
    let per_flow = (live_bytes() - before) / i64::from(FLOWS) as isize;

    let start = Instant::now();
    let mut emitted = Vec::new();
    table.emit_due(2_000_000_000, &mut emitted);
    // Nothing known about the ends: the metadata bench measures the join.
    let index = MetadataIndex::new(&IndexSettings::default());
    let enrichment = Enrichment {
        index: &index,
        naming: AttributeNaming::Seed,
    };
    let requests = encode_requests(&emitted, &enrichment);
    let span_time = start.elapsed();
    let bytes: usize = requests.iter().map(Vec::len).sum();
    let spans = emitted.len() * 2;
    // Encoding alone, as a shard does it: a tick's intervals at a time (one shard's share at
    // 5k connections/s), the least of five rounds over all of them.
    let encode_time = (0..5)
        .map(|_| {
            let start = Instant::now();
            for tick in emitted.chunks(156) {
                std::hint::black_box(encode_requests(tick, &enrichment));
            }
            start.elapsed()
        })
        .min()
        .expect("five rounds");

    println!("| measure (one core, no I/O) | value |");
    println!("|---|---:|");
    println!(
        "| records validated and applied to the flow table | {:.2} M records/s |",
        records.len() as f64 / ingest_time.as_secs_f64() / 1e6
    );
    println!("| heap per live flow (4 observation points) | {per_flow} B |");
    println!(
        "| flows stitched into spans and OTLP-encoded | {:.0} k spans/s ({} spans, {:.1} MB) |",
        spans as f64 / span_time.as_secs_f64() / 1e3,
        spans,
        bytes as f64 / 1e6
    );
    println!(
        "| spans OTLP-encoded, 156 intervals per request (least of five rounds) | {:.0} k spans/s |",
        spans as f64 / encode_time.as_secs_f64() / 1e3
    );
}

/// 100 batches of 2,000 records (500 connections seen at four points), each an encoded
/// `AgentMessage` as the gRPC codec hands it over, turned into validated observations: by prost
/// (what the aggregator did before `wire::read`), then read in place. Best of five rounds.
fn read() {
    use mermin_protocol::wire::read::AgentMessageRead;
    const BATCHES: u32 = 100;
    const CONNECTIONS_PER_BATCH: u32 = 500;
    let messages: Vec<Bytes> = (0..BATCHES)
        .map(|b| {
            let records = (0..CONNECTIONS_PER_BATCH)
                .flat_map(|i| connection(b * CONNECTIONS_PER_BATCH + i, EndReason::TcpClose))
                .collect();
            let batch = agent_message::Message::Batch(Batch {
                sequence: u64::from(b) + 1,
                records,
            });
            AgentMessage {
                message: Some(batch),
            }
            .encode_to_vec()
            .into()
        })
        .collect();
    let records = (BATCHES * CONNECTIONS_PER_BATCH * 4) as f64;
    let best = |observe: &dyn Fn(&Bytes) -> usize| {
        (0..5)
            .map(|_| {
                let start = Instant::now();
                let observed: usize = messages.iter().map(observe).sum();
                assert_eq!(observed as f64, records);
                start.elapsed().as_secs_f64() * 1e9 / records
            })
            .fold(f64::MAX, f64::min)
    };
    let prost = best(&|message| {
        let Some(agent_message::Message::Batch(batch)) =
            AgentMessage::decode(message.clone()).unwrap().message
        else {
            panic!("not a batch")
        };
        let observations: Vec<Observation> = batch
            .records
            .iter()
            .map(|r| Observation::try_from(r).unwrap())
            .collect();
        observations.len()
    });
    // A stream's points, made once each, as the session keeps them.
    let points = RefCell::new(PointCache::default());
    let in_place = best(&|message| {
        let Some(AgentMessageRead::Batch(batch)) = AgentMessageRead::read(message.clone()).unwrap()
        else {
            panic!("not a batch")
        };
        // As the session does: counted, then each record read and validated in one pass.
        let mut observations = Vec::with_capacity(batch.record_count());
        let points = &mut *points.borrow_mut();
        for record in batch.records() {
            observations.push(Observation::read(&record.unwrap(), points).unwrap());
        }
        observations.len()
    });
    println!("| an agent's batch → validated observations (one core, best of 5) | ns per record |");
    println!("|---|---:|");
    println!("| prost decoding, then validation | {prost:.0} |");
    println!("| read in place (`wire::read`), then validation | {in_place:.0} |");
}

/// One shard of eight at 5,000 new connections/s (625/s, 156 per 250 ms tick, each closed and
/// reported by both nodes), with the default 60 s grace: after a minute it remembers ~37.5k
/// connections. Measured over the next minute: the time of each tick's `emit_due` and
/// `take_changes` (what the shard does on its actor thread before handing the checkpoint over).
fn tick(reused_every_seconds: Option<u32>) {
    const TICK: u64 = 250_000_000;
    const PER_TICK: u32 = 156;
    const TICKS_PER_MINUTE: u64 = 240;
    // How many 5-tuples the connections take turns on (all distinct without reuse).
    let tuples = reused_every_seconds.map_or(u32::MAX, |s| s * 4 * PER_TICK);
    let mut table = FlowTable::new(
        InterfaceKinds::default(),
        Duration::from_secs(3),
        Duration::from_secs(60),
    );
    let (mut emitted, mut next, mut measured, mut changes) = (Vec::new(), 0u32, Duration::ZERO, 0);
    let mut bytes = 0u64;
    let start = recent_nanos();
    for step in 0..2 * TICKS_PER_MINUTE {
        let now = start + step * TICK;
        for _ in 0..PER_TICK {
            for mut record in connection(next % tuples, EndReason::TcpClose) {
                record.first_seen_unix_nanos = now - TICK;
                record.last_seen_unix_nanos = now - TICK / 2;
                table.apply(&Observation::try_from(&record).unwrap(), now);
            }
            next += 1;
        }
        let started = Instant::now();
        table.emit_due(now, &mut emitted);
        let taken = table.take_changes().unwrap();
        if step >= TICKS_PER_MINUTE {
            measured += started.elapsed();
            changes += taken.len();
            bytes += taken
                .iter()
                .map(|c| (c.key.len() + c.state.as_ref().map_or(0, Vec::len)) as u64)
                .sum::<u64>();
        }
        emitted.clear();
    }
    let shape = match reused_every_seconds {
        None => "every connection on a 5-tuple of its own".to_owned(),
        Some(s) => format!("each 5-tuple reused every {s} s"),
    };
    println!(
        "| {shape}: keys held at the end | {} ({} connections reused a key) |",
        table.len(),
        table.reused_keys()
    );
    println!(
        "| {shape}: emit_due + take_changes per tick | {:.0} µs ({} changes per tick, {} KiB) |",
        measured.as_secs_f64() * 1e6 / TICKS_PER_MINUTE as f64,
        changes as u64 / TICKS_PER_MINUTE,
        bytes / TICKS_PER_MINUTE / 1024
    );
}

/// Two agent streams (one per node) into the whole aggregator — ingest, sled, the flow shards,
/// the outbox and the exporter — and an OTLP receiver in this process: records acknowledged per
/// second, and for each connection the time from the ack of its last record to the arrival of its
/// span at the receiver.
fn ingest(backend: Backend) {
    const SETTLE: Duration = Duration::from_secs(1);
    println!("| measure (whole aggregator, loopback, settle {SETTLE:?}, {backend}) | value |");
    println!("|---|---:|");
    // As fast as the aggregator acknowledges: throughput (and latency under saturation). Two
    // streams (the bench's first shape), each waiting for one batch's durable append before the
    // next, leave the CPU idle while both wait on the disk; four keep it busy, as a cluster's
    // many agents do. The long run keeps going while the first spans are exported.
    for (streams, batches) in [(2, 150), (4, 75), (4, 300)] {
        let (records, elapsed, latency) = ingest_run(backend, streams, batches, None, SETTLE);
        println!(
            "| records acknowledged per second, unpaced, {streams} streams ({records} records in batches of 2000) | {:.0} k records/s |",
            records as f64 / elapsed.as_secs_f64() / 1e3
        );
        println!(
            "| last record acked → span received, p50 / p99, unpaced, {streams} streams, {records} records (queues full) | {:.0} ms / {:.0} ms |",
            latency(50).as_secs_f64() * 1e3,
            latency(99).as_secs_f64() * 1e3
        );
    }
    // Paced well below saturation (2 × 5 batches/s = 20k records/s): the latency a flow sees.
    let (_, _, latency) = ingest_run(backend, 2, 50, Some(Duration::from_millis(200)), SETTLE);
    println!(
        "| last record acked → span received, p50 / p99, at 20k records/s | {:.0} ms / {:.0} ms |",
        latency(50).as_secs_f64() * 1e3,
        latency(99).as_secs_f64() * 1e3
    );
}

/// One run of [`ingest`] against a fresh aggregator: `streams` agents (an even number: pairs of
/// nodes, each pair with connections of its own), `batches` per stream, one every `pace` if
/// given. Returns the records sent, the time until the last ack, and latency percentiles.
fn ingest_run(
    backend: Backend,
    streams: usize,
    batches: u32,
    pace: Option<Duration>,
    settle: Duration,
) -> (usize, Duration, impl Fn(usize) -> Duration) {
    const CONNECTIONS_PER_BATCH: u32 = 1000;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let receiver = ArrivalReceiver::default();
        let otlp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let otlp_addr = otlp.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(lean::TraceServer(receiver.clone()))
                .serve_with_incoming(TcpListenerStream::new(otlp)),
        );
        let dir = tempfile::tempdir().unwrap();
        let (store, replicas) = open_store(backend, dir.path()).await;
        let aggregator = Aggregator::start_on(
            AggregatorConfig {
                settle,
                grace: Duration::from_secs(60),
                ..AggregatorConfig::loopback(
                    dir.path().to_owned(),
                    ExportConfig::new(format!("http://{otlp_addr}")),
                )
            },
            store,
        )
        .await
        .unwrap();
        let endpoint = format!("http://{}", aggregator.local_addr);
        // Pair p's connections are p·batches·1000 .. (p + 1)·batches·1000; batch b of the
        // pair's client node (then server node) holds its two records of the pair's
        // connections b·1000 .. b·1000 + 999.
        let per_pair = batches * CONNECTIONS_PER_BATCH;
        let node_name = |node: usize| format!("node-{node}");
        let node_batches = |node: usize| -> Vec<Bytes> {
            let pair = node / 2;
            let names = [node_name(2 * pair), node_name(2 * pair + 1)];
            (0..batches)
                .map(|b| Batch {
                    sequence: u64::from(b) + 1,
                    records: (0..CONNECTIONS_PER_BATCH)
                        .flat_map(|i| {
                            let id = pair as u32 * per_pair + b * CONNECTIONS_PER_BATCH + i;
                            let records =
                                connection_between(id, EndReason::TcpClose, [&names[0], &names[1]]);
                            let [a_out, a_in, b_out, b_in] = records;
                            if node.is_multiple_of(2) {
                                [a_out, a_in]
                            } else {
                                [b_out, b_in]
                            }
                        })
                        .collect(),
                })
                .map(|batch| agent_message(agent_message::Message::Batch(batch)))
                .collect()
        };
        let encoded: Vec<Vec<Bytes>> = (0..streams).map(node_batches).collect();
        let start = Instant::now();
        let tasks: Vec<_> = encoded
            .into_iter()
            .enumerate()
            .map(|(node, batches)| {
                let (endpoint, name) = (endpoint.clone(), node_name(node));
                tokio::spawn(
                    async move { stream_batches(&endpoint, node, &name, batches, pace).await },
                )
            })
            .collect();
        let mut acked_at = Vec::new();
        for task in tasks {
            acked_at.push(task.await.unwrap());
        }
        let elapsed = start.elapsed();
        let connections = streams / 2 * per_pair as usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        while receiver.arrivals.lock().unwrap().len() < connections && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        aggregator.shutdown().await;
        for replica in replicas {
            replica.shutdown().await;
        }
        let arrivals = receiver.arrivals.lock().unwrap().clone();
        assert_eq!(
            arrivals.len(),
            connections,
            "every connection's span arrived"
        );
        let mut latencies: Vec<Duration> = arrivals
            .iter()
            .map(|(id, arrived)| {
                let (pair, batch) = (
                    (id / per_pair) as usize,
                    (id % per_pair / CONNECTIONS_PER_BATCH) as usize,
                );
                let ended = acked_at[2 * pair][batch].max(acked_at[2 * pair + 1][batch]);
                arrived.saturating_duration_since(ended)
            })
            .collect();
        latencies.sort();
        let percentile =
            move |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
        (4 * connections, elapsed, percentile)
    })
}

/// `message` as an agent stream carries it.
fn agent_message(message: agent_message::Message) -> Bytes {
    AgentMessage {
        message: Some(message),
    }
    .encode_to_vec()
    .into()
}

/// One agent stream sending `batches` (encoded `AgentMessage`s) with the Welcome's window (and
/// no faster than one per `pace`, if given); returns when each was acknowledged.
async fn stream_batches(
    endpoint: &str,
    node: usize,
    node_name: &str,
    batches: Vec<Bytes>,
    pace: Option<Duration>,
) -> Vec<Instant> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.unwrap();
    let (out, rx_out) = tokio::sync::mpsc::channel(16);
    out.send(agent_message(agent_message::Message::Hello(Hello {
        protocol_version: 1,
        node_name: node_name.into(),
        agent_version: "bench".into(),
        boot_id: vec![node as u8 + 1; 16],
    })))
    .await
    .unwrap();
    let mut answers = client
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx_out)),
            http::uri::PathAndQuery::from_static("/mermin.agent.v1.AgentService/Stream"),
            lean::PreEncoded,
        )
        .await
        .unwrap()
        .into_inner();
    let window = match answers.message().await.unwrap().unwrap().message {
        Some(aggregator_message::Message::Welcome(w)) => w.max_in_flight_batches as usize,
        other => panic!("{other:?}"),
    };
    let mut acked_at = Vec::with_capacity(batches.len());
    let mut sent = 0;
    let started = Instant::now();
    // Paced: one batch in flight, so that each ack is read (and timed) as it arrives.
    let window = if pace.is_some() { 1 } else { window };
    while acked_at.len() < batches.len() {
        while sent < batches.len() && sent - acked_at.len() < window {
            if let Some(pace) = pace {
                tokio::time::sleep_until((started + pace * sent as u32).into()).await;
            }
            out.send(batches[sent].clone()).await.unwrap();
            sent += 1;
        }
        match answers.message().await.unwrap().unwrap().message {
            Some(aggregator_message::Message::Ack(a)) => {
                while (acked_at.len() as u64) < a.sequence {
                    acked_at.push(Instant::now());
                }
            }
            other => panic!("{other:?}"),
        }
    }
    acked_at
}

/// Records when each connection's CLIENT span arrives (the connection id is spelled by the
/// client's address, see [`connection`]).
#[derive(Clone, Default)]
struct ArrivalReceiver {
    arrivals: Arc<Mutex<Vec<(u32, Instant)>>>,
}

impl ArrivalReceiver {
    fn record(&self, request: lean::ExportRequest) {
        let now = Instant::now();
        let mut arrivals = self.arrivals.lock().unwrap();
        for span in request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .filter(|s| s.kind == SpanKind::Client as i32)
        {
            let Some(address) = span
                .attributes
                .iter()
                .find(|a| a.key.as_ref() == b"source.address")
                .and_then(|a| a.value.as_ref())
            else {
                panic!("a CLIENT span without source.address");
            };
            let address: std::net::Ipv4Addr = std::str::from_utf8(&address.string_value)
                .unwrap()
                .parse()
                .unwrap();
            arrivals.push((u32::from(address) & 0x00ff_ffff, now));
        }
    }
}

/// The harness's own gRPC, lean so that the aggregator under test gets this 2-core machine:
/// the OTLP receiver decodes only the fields it reads (a receiver decoding whole requests took
/// ~28% of the bench's CPU), and the agents send batches encoded once, before the clock starts.
mod lean {
    use std::{convert::Infallible, task::Poll};

    use bytes::{BufMut, Bytes};
    use mermin_protocol::agent::v1::AggregatorMessage;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    use prost::Message;
    use tonic::{
        codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
        codegen::{Body, BoxFuture, StdError, http},
        server::{Grpc, NamedService, UnaryService},
    };

    use super::ArrivalReceiver;

    // The OTLP messages down to a span's kind and string attributes; prost skips the rest.
    #[derive(Clone, PartialEq, Message)]
    pub struct ExportRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct ResourceSpans {
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct ScopeSpans {
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct Span {
        #[prost(int32, tag = "6")]
        pub kind: i32,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct KeyValue {
        #[prost(bytes = "bytes", tag = "1")]
        pub key: Bytes,
        #[prost(message, optional, tag = "2")]
        pub value: Option<StringValue>,
    }
    #[derive(Clone, PartialEq, Message)]
    pub struct StringValue {
        #[prost(bytes = "bytes", tag = "1")]
        pub string_value: Bytes,
    }

    /// `opentelemetry.proto.collector.trace.v1.TraceService`, answering every call as Export.
    #[derive(Clone)]
    pub struct TraceServer(pub ArrivalReceiver);

    impl NamedService for TraceServer {
        const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    }

    impl<B> tower::Service<http::Request<B>> for TraceServer
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Infallible>;

        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<B>) -> Self::Future {
            let export = Export(self.0.clone());
            Box::pin(async move {
                let codec =
                    tonic_prost::ProstCodec::<ExportTraceServiceResponse, ExportRequest>::default();
                Ok(Grpc::new(codec).unary(export, request).await)
            })
        }
    }

    struct Export(ArrivalReceiver);

    impl UnaryService<ExportRequest> for Export {
        type Response = ExportTraceServiceResponse;
        type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;

        fn call(&mut self, request: tonic::Request<ExportRequest>) -> Self::Future {
            self.0.record(request.into_inner());
            std::future::ready(Ok(tonic::Response::new(
                ExportTraceServiceResponse::default(),
            )))
        }
    }

    /// An agent stream's codec: sends `AgentMessage`s encoded beforehand, decodes answers.
    #[derive(Clone, Copy, Default)]
    pub struct PreEncoded;

    impl Codec for PreEncoded {
        type Encode = Bytes;
        type Decode = AggregatorMessage;
        type Encoder = PreEncoded;
        type Decoder = PreEncoded;

        fn encoder(&mut self) -> PreEncoded {
            PreEncoded
        }

        fn decoder(&mut self) -> PreEncoded {
            PreEncoded
        }
    }

    impl Encoder for PreEncoded {
        type Item = Bytes;
        type Error = tonic::Status;

        fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            dst.put(item);
            Ok(())
        }
    }

    impl Decoder for PreEncoded {
        type Item = AggregatorMessage;
        type Error = tonic::Status;

        fn decode(
            &mut self,
            src: &mut DecodeBuf<'_>,
        ) -> Result<Option<AggregatorMessage>, tonic::Status> {
            AggregatorMessage::decode(src)
                .map(Some)
                .map_err(|e| tonic::Status::internal(e.to_string()))
        }
    }
}
