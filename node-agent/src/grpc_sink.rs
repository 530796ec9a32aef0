//! The gRPC sink: streams records to the aggregator (`mermin.agent.v1`) with acknowledgements,
//! a bounded replay buffer and backpressure.
//!
//! The collector thread hands records to [`GrpcSink::send`], which cuts them into batches with
//! consecutive sequence numbers and appends them to the buffer. A task on the agent's runtime
//! keeps one stream to the aggregator: Hello; on Welcome it drops what the aggregator already
//! holds and (re)sends the rest in order, at most `max_in_flight_batches` unacknowledged; every
//! Ack frees the buffer up to that sequence. On any error it reconnects with backoff and replays.
//!
//! Nothing is dropped: when the buffer holds `capacity` unacknowledged batches, `send` waits. The
//! collector then stops swapping kernel tables, the kernel's overflow path takes over, and what
//! that cannot hold is counted by the kernel counters — backpressure with every loss counted.

use std::{
    collections::VecDeque,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use mermin_protocol::{
    agent::v1::{
        AgentMessage, Batch, Hello, agent_message, agent_service_client::AgentServiceClient,
        aggregator_message,
    },
    flow::v1::FlowRecord,
};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    metrics::Metrics,
    sink::{RecordSink, SinkError},
};

/// The protocol revision this agent speaks.
const PROTOCOL_VERSION: u32 = 1;
/// Records per batch (the aggregator's limit is larger).
const BATCH_RECORDS: usize = 1000;

#[derive(Debug, Clone)]
pub struct GrpcSinkConfig {
    /// `http://aggregator:4600`.
    pub endpoint: String,
    pub node_name: String,
    /// Unacknowledged batches held at most.
    pub capacity: usize,
}

struct Buffer {
    next_sequence: u64,
    /// Unacknowledged batches, in sequence order.
    unacked: VecDeque<Batch>,
}

struct Shared {
    buffer: Mutex<Buffer>,
    /// Signalled when acknowledgements free space (for `send`) or the buffer empties.
    space: Condvar,
    /// Signalled when a batch is appended (for the stream task).
    appended: Notify,
    capacity: usize,
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
        }),
        space: Condvar::new(),
        appended: Notify::new(),
        capacity: config.capacity.max(1),
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
}

impl RecordSink for GrpcSink {
    fn send(&mut self, mut records: Vec<FlowRecord>) -> Result<(), SinkError> {
        while !records.is_empty() {
            let rest = records.split_off(records.len().min(BATCH_RECORDS));
            let chunk = std::mem::replace(&mut records, rest);
            let mut buffer = self.shared.lock();
            if buffer.unacked.len() >= self.shared.capacity {
                self.metrics.sink_backpressure.inc();
                while buffer.unacked.len() >= self.shared.capacity {
                    buffer = self
                        .shared
                        .space
                        .wait(buffer)
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
            let sequence = buffer.next_sequence;
            buffer.next_sequence += 1;
            buffer.unacked.push_back(Batch {
                sequence,
                records: chunk,
            });
            drop(buffer);
            self.shared.appended.notify_one();
        }
        Ok(())
    }
}

async fn stream_forever(
    config: GrpcSinkConfig,
    boot_id: [u8; 16],
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        match stream_once(&config, boot_id, &shared).await {
            Ok(()) => delay = Duration::from_millis(100),
            Err(err) => {
                metrics.sink_reconnects.inc();
                tracing::warn!(endpoint = %config.endpoint, %err, ?delay, "aggregator stream failed; reconnecting");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// One stream: until it fails. Returns `Ok` if the aggregator ended it cleanly.
async fn stream_once(
    config: &GrpcSinkConfig,
    boot_id: [u8; 16],
    shared: &Shared,
) -> Result<(), String> {
    let mut client = AgentServiceClient::connect(config.endpoint.clone())
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let (out, rx) = mpsc::channel::<AgentMessage>(4);
    let mut answers = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let send = |message| {
        let out = out.clone();
        async move {
            out.send(AgentMessage {
                message: Some(message),
            })
            .await
            .map_err(|_| "stream closed".to_owned())
        }
    };
    send(agent_message::Message::Hello(Hello {
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
    shared.acknowledge_through(welcome.last_durable_sequence);
    let max_in_flight = u64::from(welcome.max_in_flight_batches.max(1));
    tracing::info!(endpoint = %config.endpoint, last_durable = welcome.last_durable_sequence, "streaming to the aggregator");

    let mut sent_through = welcome.last_durable_sequence;
    let mut acked_through = welcome.last_durable_sequence;
    loop {
        // Send what the window allows, oldest first (this replays after a reconnect).
        let to_send: Vec<Batch> = {
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
            send(agent_message::Message::Batch(batch)).await?;
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

async fn next(
    answers: &mut tonic::Streaming<mermin_protocol::agent::v1::AggregatorMessage>,
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
