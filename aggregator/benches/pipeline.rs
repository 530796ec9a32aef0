//! Aggregator benchmarks (figures and commands in BENCHMARKS.md):
//!
//! - `stitch`: records/s through validation and the flow table, memory per live flow (a counting
//!   allocator), and spans/s from stitching to encoded OTLP bytes — one core, no I/O.
//! - `ingest`: records/s over loopback gRPC into the real ingest endpoint with a sled store
//!   (durable append before every ack), one agent stream, batches of 1,000 records.
//!
//! `cargo bench -p mermin-aggregator --bench pipeline -- [stitch|ingest]`

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
    time::{Duration, Instant},
};

use mermin_aggregator::{
    flow_table::FlowTable,
    ingest::{Ingest, IngestLimits},
    observation::Observation,
    span::flow_spans,
    stitch::InterfaceKinds,
    store::Store,
};
use mermin_protocol::{
    agent::v1::{
        AgentMessage, Batch, Hello, agent_message, agent_service_client::AgentServiceClient,
        aggregator_message,
    },
    flow::v1::{Direction, EndReason, FlowRecord},
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

/// Counts live heap bytes, to measure memory per flow.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

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
    if all || which.iter().any(|w| w == "ingest") {
        ingest();
    }
}

/// The four records of one cross-node TCP connection (two nodes, each direction), connection `i`.
fn connection(i: u32, reason: EndReason) -> [FlowRecord; 4] {
    let client = [10, 1, (i >> 8) as u8, i as u8];
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
        first_seen_unix_nanos: 1_000,
        last_seen_unix_nanos: 2_000,
        first_tcp_flags: if out { 0x02 } else { 0x12 },
        tcp_flags: 0x1b,
        end_reason: reason as i32,
        ..FlowRecord::default()
    };
    [
        record("node-a", "vetha", Direction::Ingress, true),
        record("node-a", "vetha", Direction::Egress, false),
        record("node-b", "vethb", Direction::Egress, true),
        record("node-b", "vethb", Direction::Ingress, false),
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
    let before = LIVE.load(Ordering::Relaxed);
    let start = Instant::now();
    for record in &records {
        let observation = Observation::try_from(record).unwrap();
        table.apply(&observation, 0);
    }
    let ingest_time = start.elapsed();
    let per_flow = (LIVE.load(Ordering::Relaxed) - before) / i64::from(FLOWS) as isize;

    let start = Instant::now();
    let mut emitted = Vec::new();
    table.emit_due(2_000_000_000, &mut emitted);
    let request = ExportTraceServiceRequest {
        resource_spans: emitted
            .iter()
            .flat_map(|e| flow_spans(&e.flow, &e.interval))
            .collect(),
    };
    let bytes = request.encode_to_vec();
    let span_time = start.elapsed();
    let spans = emitted.len() * 2;

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
        bytes.len() as f64 / 1e6
    );
}

fn ingest() {
    const BATCHES: u64 = 300;
    const PER_BATCH: u32 = 1000;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let applied = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let consumer = {
            let applied = applied.clone();
            tokio::spawn(async move {
                let mut table = FlowTable::new(
                    InterfaceKinds::default(),
                    Duration::from_secs(60),
                    Duration::from_secs(60),
                );
                while let Some(batch) = rx.recv().await {
                    let batch: mermin_aggregator::ingest::AppliedBatch = batch;
                    for o in &batch.observations {
                        table.apply(o, 0);
                    }
                    applied.fetch_add(batch.observations.len(), Ordering::Relaxed);
                }
            })
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service =
            Ingest::new(store, IngestLimits::default(), tx, Default::default()).into_service();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
        });
        let mut client = AgentServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (out, rx_out) = tokio::sync::mpsc::channel(16);
        let mut answers = client
            .stream(ReceiverStream::new(rx_out))
            .await
            .unwrap()
            .into_inner();
        let send = |m| AgentMessage { message: Some(m) };
        out.send(send(agent_message::Message::Hello(Hello {
            protocol_version: 1,
            node_name: "node-a".into(),
            agent_version: "bench".into(),
            boot_id: vec![1; 16],
        })))
        .await
        .unwrap();
        let window = match answers.message().await.unwrap().unwrap().message {
            Some(aggregator_message::Message::Welcome(w)) => u64::from(w.max_in_flight_batches),
            other => panic!("{other:?}"),
        };
        let batches: Vec<Batch> = (1..=BATCHES)
            .map(|sequence| Batch {
                sequence,
                records: (0..PER_BATCH / 2)
                    .flat_map(|i| {
                        let [a, b, _, _] =
                            connection(sequence as u32 * PER_BATCH + i, EndReason::ActiveTimeout);
                        [a, b]
                    })
                    .map(|mut r| {
                        r.node_name = "node-a".into();
                        r
                    })
                    .collect(),
            })
            .collect();
        let start = Instant::now();
        let (mut sent, mut acked) = (0u64, 0u64);
        while acked < BATCHES {
            while sent < BATCHES && sent - acked < window {
                out.send(send(agent_message::Message::Batch(
                    batches[sent as usize].clone(),
                )))
                .await
                .unwrap();
                sent += 1;
            }
            match answers.message().await.unwrap().unwrap().message {
                Some(aggregator_message::Message::Ack(a)) => acked = a.sequence,
                other => panic!("{other:?}"),
            }

        }
        let elapsed = start.elapsed();
        // Acked batches were handed to the flow table before their ack.
        let expected = (BATCHES * u64::from(PER_BATCH)) as usize;
        let deadline = Instant::now() + Duration::from_secs(10);
        while applied.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.abort();
        consumer.abort();
        println!("| measure (loopback gRPC, sled append + flush per batch) | value |");
        println!("|---|---:|");
        println!(
            "| records acknowledged per second ({} batches of {PER_BATCH}, window {window}) | {:.0} k records/s |",
            BATCHES,
            (BATCHES * u64::from(PER_BATCH)) as f64 / elapsed.as_secs_f64() / 1e3
        );
        println!(
            "| mean time from batch sent to ack | {:.2} ms |",
            elapsed.as_secs_f64() * 1e3 / BATCHES as f64 * window as f64
        );
        assert_eq!(applied.load(Ordering::Relaxed), expected);
    });
}
