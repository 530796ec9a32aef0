//! The `AgentService` endpoint, speaking `mermin.agent.v1`: one actix actor ([`Session`]) per
//! agent stream, placed round robin on the actor runtime's arbiters.
//!
//! Per stream: a `Hello` (protocol version, node, 16-byte boot id), answered by a `Welcome` with
//! the highest sequence already durable for that boot id; then `Batch`es. Each batch is checked
//! completely (sequence, size, every record) before anything happens, appended to the [`Store`]
//! (durable when `append` returns), handed to the flow shards ([`BatchSink`]), and only then
//! acknowledged. A batch
//! the store already holds is acknowledged again and not applied twice. Anything wrong ends this
//! stream — and only this stream — with a status whose message names the problem. One agent
//! process (boot id) has one stream: a newer one takes over, and the older ends ABORTED (the
//! agent gave it up; this side may not have noticed yet that its path went silent).
//!
//! Nothing here queues without bound: the answer channel holds `max_in_flight_batches` acks, the
//! shards' mailboxes are bounded, and a session takes the next message from its stream only after
//! it has handled the last (acked or refused it) — until then HTTP/2 flow control holds the agent.

use std::{collections::HashSet, future::Future, sync::Arc, time::Duration};

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, StreamHandler, WrapFuture,
};
use mermin_protocol::{
    agent::v1::{AggregatorMessage, Hello, Welcome, aggregator_message},
    json::hex,
    wire::read::{AgentMessageRead, BatchBytes},
};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

mod server;

pub use server::AgentStreamServer;
use server::{AgentStreams, Answers, Inbound};

use crate::{
    actors::Arbiters,
    defaults,
    metrics::{Metrics, ReasonLabel},
    observation::{Observation, PointCache},
    store::{BOOT_ID_LEN, BootId, Store, StoreError},
};

/// The protocol revision this aggregator speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// How often agent processes that are over are looked for, besides when a new one binds.
pub const RETIRE_EVERY: Duration = Duration::from_secs(60);

/// How long after a new agent process binds the ones it replaced are looked at.
const RETIRE_AFTER_BIND: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct IngestLimits {
    pub max_in_flight_batches: u32,
    pub max_batch_records: u32,
    /// Largest encoded message accepted (gRPC decoding limit).
    pub max_message_bytes: usize,
    /// The backpressure outbox policy's quota: while the export outbox holds more, batches wait
    /// (at most `outbox_full_wait`, then the stream ends with `RESOURCE_EXHAUSTED` and the agent
    /// retries later). `None` under the `drop_oldest` policy.
    pub pause_above_outbox_bytes: Option<u64>,
    pub outbox_full_wait: Duration,
    /// A stream whose Hello has not arrived within this is ended (`DEADLINE_EXCEEDED`).
    pub hello_timeout: Duration,
    /// An agent process its node replaced (a newer boot id) is forgotten only once its stream
    /// has been closed this long (and every batch of it applied): one whose stream was briefly
    /// down keeps its place, and comes back where it was instead of as a stranger (which it
    /// would count as batches lost). Retirement starts this long after the aggregator does.
    pub retire_after: Duration,
}

impl Default for IngestLimits {
    fn default() -> Self {
        Self {
            max_in_flight_batches: defaults::MAX_IN_FLIGHT_BATCHES,
            max_batch_records: defaults::MAX_BATCH_RECORDS,
            max_message_bytes: defaults::MAX_MESSAGE_BYTES,
            pause_above_outbox_bytes: None,
            outbox_full_wait: defaults::OUTBOX_FULL_WAIT,
            hello_timeout: defaults::HELLO_TIMEOUT,
            retire_after: defaults::RETIRE_AFTER,
        }
    }
}

/// One durable batch, validated, on its way to the flow table. The table records how far it has
/// applied each agent's batches, for recovery.
#[derive(Debug)]
pub struct AppliedBatch {
    pub boot_id: BootId,
    pub sequence: u64,
    pub observations: Vec<Observation>,
}

/// The flow table is gone (shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the flow table is not accepting batches")]
pub struct SinkClosed;

/// Where durable batches go: the flow shards, or any bounded channel. Returns once the batch is
/// accepted; waiting here is how backpressure reaches the agent.
pub trait BatchSink: Clone + Send + Sync + Unpin + 'static {
    fn apply(&self, batch: AppliedBatch) -> impl Future<Output = Result<(), SinkClosed>> + Send;

    /// Forget the positions of these agent processes: the store retired them.
    fn retire(&self, boot_ids: Arc<[BootId]>) -> impl Future<Output = ()> + Send;
}

impl BatchSink for mpsc::Sender<AppliedBatch> {
    async fn apply(&self, batch: AppliedBatch) -> Result<(), SinkClosed> {
        self.send(batch).await.map_err(|_| SinkClosed)
    }

    /// A channel's reader keeps no positions.
    async fn retire(&self, _: Arc<[BootId]>) {}
}

#[derive(Clone)]
pub struct Ingest<S> {
    store: Store,
    limits: IngestLimits,
    flows: S,
    metrics: Arc<Metrics>,
    /// Where sessions run.
    arbiters: Arbiters,
    /// Turns true when the aggregator stops: every session ends its stream.
    stopping: watch::Receiver<bool>,
    /// The agents with an open stream.
    agents: Agents,
    /// Told when a new agent process binds: earlier ones of its node may be over.
    agent_bound: Arc<Notify>,
}

/// Over how long [`AgentInfo::records_per_second`] is measured.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The agents with a stream open — one stream per agent process (boot id) — and what the
/// admin API shows of them. Sessions write it; [`Agents::snapshot`] reads it.
#[derive(Clone, Default)]
pub struct Agents(Arc<std::sync::Mutex<AgentsInner>>);

#[derive(Default)]
struct AgentsInner {
    open: std::collections::HashMap<BootId, AgentInfo>,
    /// The open stream of each agent process: told to end when a newer one takes over.
    streams: std::collections::HashMap<BootId, Superseded>,
    /// Streams each node opened since start.
    streams_by_node: std::collections::HashMap<String, u64>,
    /// When each agent process without a stream lost its last one (kept for
    /// [`IngestLimits::retire_after`]).
    closed: std::collections::HashMap<BootId, tokio::time::Instant>,
}

/// One connected agent, as of the last batch it had acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentInfo {
    pub node: String,
    pub agent_version: String,
    pub boot_id: BootId,
    pub connected_unix_nanos: u64,
    pub last_acked_sequence: u64,
    /// At the last ack: how long before it the newest record of that batch ended.
    pub lag_millis: u64,
    /// Over the last [`RATE_WINDOW`] before the snapshot.
    pub records_per_second: f64,
    /// Streams its node opened since the aggregator started, beyond the first.
    pub reconnects: u64,
    pub records_accepted: u64,
    /// Records accepted per Unix second, the newest last (the last `RATE_WINDOW` only).
    recent: std::collections::VecDeque<(u64, u64)>,
}

impl Agents {
    fn lock(&self) -> std::sync::MutexGuard<'_, AgentsInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens `hello`'s stream, `stream`. A stream its boot id has open already is told to end
    /// (the agent gave it up: its path went silent, say, and the agent came back through
    /// another route before this side noticed); true if there was one.
    fn claim(
        &self,
        boot_id: BootId,
        hello: &Hello,
        last: u64,
        now: u64,
        stream: &Superseded,
    ) -> bool {
        let mut agents = self.lock();
        agents.closed.remove(&boot_id);
        let older = agents.streams.insert(boot_id, stream.clone());
        if let Some(older) = &older {
            older.send_replace(true);
        }
        let streams = agents
            .streams_by_node
            .entry(hello.node_name.clone())
            .or_insert(0);
        *streams += 1;
        let reconnects = *streams - 1;
        agents.open.insert(
            boot_id,
            AgentInfo {
                node: hello.node_name.clone(),
                agent_version: hello.agent_version.clone(),
                boot_id,
                connected_unix_nanos: now,
                last_acked_sequence: last,
                lag_millis: 0,
                records_per_second: 0.0,
                reconnects,
                records_accepted: 0,
                recent: Default::default(),
            },
        );
        older.is_some()
    }

    /// Lets `stream`'s claim on `boot_id` go, unless a newer stream took it over.
    fn release(&self, boot_id: &BootId, stream: &Superseded) {
        let mut agents = self.lock();
        if agents
            .streams
            .get(boot_id)
            .is_some_and(|open| Arc::ptr_eq(open, stream))
        {
            agents.streams.remove(boot_id);
            agents.open.remove(boot_id);
            agents.closed.insert(*boot_id, tokio::time::Instant::now());
        }
    }

    /// A batch of `records` records, the newest ending at `newest_end`, was acknowledged at `now`.
    fn acked(&self, boot_id: &BootId, sequence: u64, records: u64, newest_end: u64, now: u64) {
        let mut agents = self.lock();
        let Some(agent) = agents.open.get_mut(boot_id) else {
            return;
        };
        agent.last_acked_sequence = sequence;
        if records > 0 {
            agent.lag_millis = now.saturating_sub(newest_end) / 1_000_000;
        }
        agent.records_accepted += records;
        let second = now / 1_000_000_000;
        match agent.recent.back_mut() {
            Some((at, count)) if *at == second => *count += records,
            _ => agent.recent.push_back((second, records)),
        }
        let window = RATE_WINDOW.as_secs();
        while agent
            .recent
            .front()
            .is_some_and(|(at, _)| at + window <= second)
        {
            agent.recent.pop_front();
        }
    }

    /// Every connected agent at `now` (Unix nanoseconds), sorted by node then boot id.
    pub fn snapshot(&self, now: u64) -> Vec<AgentInfo> {
        let window = RATE_WINDOW.as_secs();
        let second = now / 1_000_000_000;
        let mut agents: Vec<AgentInfo> = self
            .lock()
            .open
            .values()
            .map(|agent| {
                let recent: u64 = agent
                    .recent
                    .iter()
                    .filter(|(at, _)| at + window > second)
                    .map(|(_, count)| count)
                    .sum();
                AgentInfo {
                    records_per_second: recent as f64 / window as f64,
                    ..agent.clone()
                }
            })
            .collect();
        agents.sort_by(|a, b| (&a.node, a.boot_id).cmp(&(&b.node, b.boot_id)));
        agents
    }

    /// The boot ids not to retire: those with a stream open, or closed less than `retire_after`
    /// ago (older closings are forgotten here).
    fn kept_from_retirement(&self, retire_after: Duration) -> HashSet<BootId> {
        let mut agents = self.lock();
        agents
            .closed
            .retain(|_, closed| closed.elapsed() < retire_after);
        agents
            .open
            .keys()
            .chain(agents.closed.keys())
            .copied()
            .collect()
    }
}

impl<S: BatchSink> Ingest<S> {
    pub fn new(
        store: Store,
        limits: IngestLimits,
        flows: S,
        metrics: Arc<Metrics>,
        arbiters: Arbiters,
    ) -> Self {
        Self {
            store,
            limits,
            flows,
            metrics,
            arbiters,
            // Never stops unless told (see `stop_when`).
            stopping: watch::channel(false).1,
            agents: Agents::default(),
            agent_bound: Arc::default(),
        }
    }

    /// The connected agents (for the admin API).
    pub fn agents(&self) -> Agents {
        self.agents.clone()
    }

    /// Ends every session (stream) once `stopping` turns true, with UNAVAILABLE: the agents
    /// reconnect and replay what was not acknowledged.
    pub fn stop_when(mut self, stopping: watch::Receiver<bool>) -> Self {
        self.stopping = stopping;
        self
    }

    /// Retires the agent processes that are over ([`crate::store::Storage::retire_superseded`]):
    /// replaced, without a stream for [`IngestLimits::retire_after`], every batch applied. A
    /// pass runs shortly after a new one binds and every [`RETIRE_EVERY`], until the stop; the
    /// shards forget their positions. Per-agent state stays at one boot id per node plus those
    /// still being applied or replaced only recently.
    pub async fn retire_superseded_agents(self) {
        let mut stop = std::pin::pin!(stopped(self.stopping.clone()));
        // When the streams of the processes the store knows ended before this start is not
        // known: none of them retires before `retire_after` has passed.
        let retire_after = self.limits.retire_after;
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(retire_after) => {}
        }
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = self.agent_bound.notified() => {
                    // By then a checkpoint has written where the shards are in the batches of
                    // the process it replaced; binds meanwhile make one pass. A stop preempts it.
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(RETIRE_AFTER_BIND) => {}
                    }
                }
                () = tokio::time::sleep(RETIRE_EVERY) => {}
            }
            let store = self.store.clone();
            let kept = self.agents.kept_from_retirement(retire_after);
            match tokio::task::spawn_blocking(move || store.retire_superseded(&kept)).await {
                Ok(Ok(retirement)) => {
                    // The retired count moves before the known gauge: whoever sees the gauge
                    // fall sees the retirements that made it fall.
                    if !retirement.retired.is_empty() {
                        self.metrics
                            .agents_retired
                            .inc_by(retirement.retired.len() as u64);
                        tracing::debug!(
                            retired = retirement.retired.len(),
                            "agent processes retired"
                        );
                        self.flows.retire(retirement.retired.into()).await;
                    }
                    self.metrics.agents_known.set(retirement.known as i64);
                }
                Ok(Err(err)) => {
                    tracing::warn!(%err, "cannot retire agent processes; trying again later")
                }
                Err(err) => tracing::error!(%err, "agent retirement task failed"),
            }
        }
    }

    /// The tonic service, with the message size limit applied.
    pub fn into_service(self) -> AgentStreamServer<Self> {
        let max = self.limits.max_message_bytes;
        AgentStreamServer::new(self, max)
    }
}

impl<S: BatchSink> AgentStreams for Ingest<S> {
    fn stream(&self, inbound: Streaming<Inbound>) -> Answers {
        // Room for a Welcome or an ack per batch in flight, and one slot kept for the status
        // that ends the stream (`Worker::end`): a full channel never loses it.
        let (answers, receiver) = mpsc::channel(self.limits.max_in_flight_batches as usize + 2);
        let last_word = answers.clone().try_reserve_owned().ok();
        let worker = Worker {
            ingest: self.clone(),
            answers,
            last_word: Arc::new(std::sync::Mutex::new(last_word)),
            claimed: Arc::default(),
            superseded: Arc::new(watch::Sender::new(false)),
        };
        Session::start_in_arbiter(self.arbiters.next(), move |ctx| {
            ctx.add_stream(inbound);
            Session {
                worker,
                agent: None,
                busy: false,
            }
        });
        ReceiverStream::new(receiver)
    }
}

/// The actor of one agent stream. It takes the stream's messages one at a time: each is handled
/// to the end (stored and acknowledged, or refused) before the next is read. A refusal ends the
/// stream with its status, and the actor; so does the aggregator stopping (UNAVAILABLE).
pub struct Session<S> {
    worker: Worker<S>,
    /// Known after the Hello.
    agent: Option<Agent>,
    /// A message is being handled.
    busy: bool,
}

impl<S: BatchSink> Actor for Session<S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // An idle session learns of the stop here; a busy one in `handle`, where the stop
        // preempts whatever the message is waiting for.
        let stopping = self.worker.ingest.stopping.clone();
        ctx.spawn(stopped(stopping).into_actor(self).map(|(), session, ctx| {
            session.worker.end(Status::unavailable(STOPPING));
            ctx.stop();
        }));
        let superseded = self.worker.superseded.subscribe();
        ctx.spawn(
            stopped(superseded)
                .into_actor(self)
                .map(|(), session, ctx| {
                    session.worker.refuse(Status::aborted(SUPERSEDED));
                    ctx.stop();
                }),
        );
        let hello_timeout = self.worker.ingest.limits.hello_timeout;
        ctx.run_later(hello_timeout, move |session, ctx| {
            if session.agent.is_none() && !session.busy {
                session.worker.count_refusal(tonic::Code::DeadlineExceeded);
                session.worker.end(Status::deadline_exceeded(format!(
                    "no Hello within {hello_timeout:?} of opening the stream"
                )));
                ctx.stop();
            }
        });
    }
}

const STOPPING: &str = "the aggregator is shutting down";

impl<S> Drop for Session<S> {
    fn drop(&mut self) {
        if let Some(boot_id) = self.worker.claimed.get() {
            self.worker
                .ingest
                .agents
                .release(boot_id, &self.worker.superseded);
        }
    }
}

/// Resolves once `stopping` turns true; never if nobody can say so any more.
async fn stopped(mut stopping: watch::Receiver<bool>) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl<S: BatchSink> StreamHandler<Result<Inbound, Status>> for Session<S> {
    fn handle(&mut self, message: Result<Inbound, Status>, ctx: &mut Context<Self>) {
        let worker = self.worker.clone();
        let mut agent = self.agent.take();
        self.busy = true;
        let stopping = worker.ingest.stopping.clone();
        let superseded = worker.superseded.subscribe();
        let handled = async move {
            let outcome = tokio::select! {
                outcome = worker.handle(&mut agent, message) => outcome,
                // A stop preempts every wait (a full shard mailbox, a full outbox), and so
                // does a newer stream of the same agent.
                () = stopped(stopping) => Err(Status::unavailable(STOPPING)),
                () = stopped(superseded) => Err(Status::aborted(SUPERSEDED)),
            };
            match &outcome {
                // The agent went away (its stream reset or closed) or the aggregator stops:
                // an end, not a refusal.
                Err(status) if ends_without_refusal(status) => {
                    tracing::info!(code = ?status.code(), message = status.message(), "agent stream ended");
                    worker.end(status.clone());
                }
                Err(status) => worker.refuse(status.clone()),
                Ok(()) => {}
            }
            (agent, outcome.is_ok())
        };
        // `wait`: no other message is read until this one is handled.
        ctx.wait(
            handled
                .into_actor(self)
                .map(|(agent, accepted), session, ctx| {
                    session.agent = agent;
                    session.busy = false;
                    if !accepted {
                        ctx.stop();
                    }
                }),
        );
    }
}

/// What a session does, apart from the actor plumbing; cheap to clone into each step.
#[derive(Clone)]
struct Worker<S> {
    ingest: Ingest<S>,
    answers: mpsc::Sender<Result<AggregatorMessage, Status>>,
    /// The answer slot kept for the status that ends the stream (taken once).
    last_word: Arc<std::sync::Mutex<Option<LastWord>>>,
    /// This stream holds its boot id in `agents` (released when the session stops).
    claimed: Arc<std::sync::OnceLock<BootId>>,
    /// Turns true when a newer stream of the same agent process takes over.
    superseded: Superseded,
}

/// The answer slot kept for a stream's ending status.
type LastWord = mpsc::OwnedPermit<Result<AggregatorMessage, Status>>;

/// A stream's handle in [`Agents`]: turned true when a newer stream of its agent takes over.
type Superseded = Arc<watch::Sender<bool>>;

const SUPERSEDED: &str = "a newer stream of this agent process (same boot id) took over";

/// What the session knows about its agent after the Hello.
struct Agent {
    node: String,
    boot_id: BootId,
    last: u64,
    /// The points its records name, made once each.
    points: PointCache,
}

/// The longest node name (Kubernetes node names are DNS subdomains).
const MAX_NODE_NAME_BYTES: usize = 253;

impl<S: BatchSink> Worker<S> {
    /// One message of the stream (or the transport's error): the Hello first, then batches.
    async fn handle(
        &self,
        agent: &mut Option<Agent>,
        message: Result<Inbound, Status>,
    ) -> Result<(), Status> {
        match (agent.as_mut(), message?) {
            (None, Some(AgentMessageRead::Hello(hello))) => {
                *agent = Some(self.welcome(hello).await?);
                Ok(())
            }
            (None, Some(_)) => Err(Status::invalid_argument(
                "the first message of a stream must be a Hello",
            )),
            (Some(agent), Some(AgentMessageRead::Batch(batch))) => self.batch(agent, batch).await,
            (Some(_), Some(AgentMessageRead::Hello(_))) => Err(Status::invalid_argument(
                "a stream carries exactly one Hello",
            )),
            (_, None) => Err(Status::invalid_argument("empty AgentMessage")),
        }
    }

    /// Ends the stream with `status`, counted by its code. Never waits: an agent that does not
    /// read its answers cannot hold a refusal (or a stop) up.
    fn refuse(&self, status: Status) {
        tracing::warn!(code = ?status.code(), message = status.message(), "agent stream rejected");
        self.count_refusal(status.code());
        self.end(status);
    }

    fn count_refusal(&self, code: tonic::Code) {
        self.ingest
            .metrics
            .streams_rejected
            .get_or_create(&ReasonLabel {
                reason: code_name(code).to_owned(),
            })
            .inc();
    }

    /// Ends the stream with `status` without waiting, in the slot kept for it (a full channel,
    /// an agent that stopped reading, cannot make the stream end OK instead); the first status
    /// wins.
    fn end(&self, status: Status) {
        let permit = self
            .last_word
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(permit) = permit {
            permit.send(Err(status));
        }
    }

    async fn welcome(&self, hello: Hello) -> Result<Agent, Status> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported; this aggregator speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            )));
        }
        if hello.node_name.is_empty() {
            return Err(Status::invalid_argument("Hello.node_name is empty"));
        }
        // Kept per node (and stored): a name no node can have must not cost more than one.
        if hello.node_name.len() > MAX_NODE_NAME_BYTES {
            return Err(Status::invalid_argument(format!(
                "Hello.node_name is {} bytes; a node name is at most {MAX_NODE_NAME_BYTES} (a DNS name)",
                hello.node_name.len()
            )));
        }
        let boot_id: BootId = hello.boot_id.as_slice().try_into().map_err(|_| {
            Status::invalid_argument(format!(
                "Hello.boot_id is {} bytes, expected {BOOT_ID_LEN}",
                hello.boot_id.len()
            ))
        })?;
        match self
            .ingest
            .store
            .bind_agent(&boot_id, &hello.node_name)
            .await
            .map_err(internal)?
        {
            None => self.ingest.agent_bound.notify_one(),
            Some(node) if node != hello.node_name => {
                return Err(Status::invalid_argument(format!(
                    "Hello.boot_id {} belongs to node {node:?}, not {:?}: every agent process needs its own boot id",
                    hex(&boot_id),
                    hello.node_name
                )));
            }
            _ => {}
        }
        let last = self
            .ingest
            .store
            .last_sequence(&boot_id)
            .map_err(internal)?;
        let now = crate::clock::unix_now();
        if self
            .ingest
            .agents
            .claim(boot_id, &hello, last, now, &self.superseded)
        {
            tracing::info!(
                node = %hello.node_name,
                boot_id = %hex(&boot_id),
                "agent reconnected while its older stream was open: the older one is ended"
            );
        }
        let _ = self.claimed.set(boot_id);
        self.send(aggregator_message::Message::Welcome(Welcome {
            last_durable_sequence: last,
            max_in_flight_batches: self.ingest.limits.max_in_flight_batches,
            max_batch_records: self.ingest.limits.max_batch_records,
        }))
        .await?;
        tracing::info!(node = %hello.node_name, agent_version = %hello.agent_version, last, "agent connected");
        Ok(Agent {
            node: hello.node_name,
            boot_id,
            last,
            points: PointCache::default(),
        })
    }

    async fn batch(&self, agent: &mut Agent, batch: BatchBytes) -> Result<(), Status> {
        let sequence = batch.sequence();
        if sequence != 0 && sequence <= agent.last {
            // Already durable (a replay after reconnect): acknowledge again, apply nothing —
            // if it is the same batch. The log may have dropped it already (every shard applied
            // it); then there is nothing left to compare with.
            // Read on the blocking pool: the store may read it from disk.
            let (store, boot_id) = (self.ingest.store.clone(), agent.boot_id);
            let stored = tokio::task::spawn_blocking(move || store.batch(&boot_id, sequence))
                .await
                .map_err(|joined| Status::internal(joined.to_string()))?
                .map_err(internal)?;
            if let Some(stored) = stored
                && !stored.same_content(&batch)
            {
                self.ingest.metrics.batches_conflicting.inc();
                return Err(Status::already_exists(format!(
                    "batch {sequence} was already stored with different content; a replay must resend the same records"
                )));
            }
            self.ingest.metrics.batches_duplicate.inc();
            return self.ack(sequence).await;
        }
        if sequence != agent.last + 1 {
            return Err(Status::invalid_argument(format!(
                "batch sequence {sequence} does not follow {}: sequences start at 1 and increase by one",
                agent.last
            )));
        }
        // Counted before they are read: a message of tiny records takes no memory beyond it.
        let limit = self.ingest.limits.max_batch_records as usize;
        let count = batch.record_count();
        if count > limit {
            return Err(Status::invalid_argument(format!(
                "batch {sequence} has {count} records; the limit is {limit}"
            )));
        }
        // Each record read, checked and turned into an observation in one pass.
        let mut observations = Vec::with_capacity(count);
        let now = crate::clock::unix_now();
        for (index, record) in batch.records().enumerate() {
            let record = record
                .map_err(|err| Status::invalid_argument(format!("batch {sequence}, {err}")))?;
            if record.node_name != agent.node {
                return Err(Status::invalid_argument(format!(
                    "batch {sequence}, record {index}: node_name {:?} is not the stream's node {:?}",
                    record.node_name, agent.node
                )));
            }
            let observation = Observation::read(&record, &mut agent.points)
                .and_then(|o| o.check_time(now).map(|()| o))
                .map_err(|err| {
                    Status::invalid_argument(format!("batch {sequence}, record {index}: {err}"))
                })?;
            observations.push(observation);
        }
        self.wait_for_outbox_room().await?;
        match self.ingest.store.append(&agent.boot_id, &batch).await {
            Ok(()) => {}
            Err(StoreError::OutOfOrder { .. }) => {
                return Err(Status::aborted(
                    "another stream of this agent (same boot id) is active",
                ));
            }
            Err(err) => {
                self.ingest.metrics.store_write_failed("append");
                return Err(internal(err));
            }
        }
        agent.last = sequence;
        self.ingest.metrics.batches_accepted.inc();
        self.ingest
            .metrics
            .records_accepted
            .inc_by(observations.len() as u64);
        let newest_end = observations
            .iter()
            .map(|o| o.counts.last_seen_unix_nanos)
            .max()
            .unwrap_or(0);
        self.ingest
            .flows
            .apply(AppliedBatch {
                boot_id: agent.boot_id,
                sequence,
                observations,
            })
            .await
            .map_err(|_| Status::unavailable("the aggregator is shutting down"))?;
        self.ingest.agents.acked(
            &agent.boot_id,
            sequence,
            count as u64,
            newest_end,
            crate::clock::unix_now(),
        );
        self.ack(sequence).await
    }

    /// The backpressure policy (see [`IngestLimits::pause_above_outbox_bytes`]).
    async fn wait_for_outbox_room(&self) -> Result<(), Status> {
        let Some(max) = self.ingest.limits.pause_above_outbox_bytes else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + self.ingest.limits.outbox_full_wait;
        let mut held = None;
        loop {
            let queued = self.ingest.store.outbox_bytes();
            if queued <= max {
                return Ok(());
            }
            held.get_or_insert_with(|| Held::new(&self.ingest.metrics.batches_held));
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::resource_exhausted(format!(
                    "the export outbox is full ({queued} bytes queued, quota {max}): the OTLP endpoint is not keeping up; retry later"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ack(&self, sequence: u64) -> Result<(), Status> {
        self.send(aggregator_message::Message::Ack(
            mermin_protocol::agent::v1::Ack { sequence },
        ))
        .await
    }

    async fn send(&self, message: aggregator_message::Message) -> Result<(), Status> {
        self.answers
            .send(Ok(AggregatorMessage {
                message: Some(message),
            }))
            .await
            .map_err(|_| Status::cancelled("the agent went away"))
    }
}

/// Counts a batch in `batches_held` while it is held back (whichever way the wait ends).
struct Held(prometheus_client::metrics::gauge::Gauge);

impl Held {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The agent endpoint's TCP connections, each of which must make its first request (an agent
/// stream) within `deadline` of being accepted or is closed: a connection that sends nothing,
/// a byte, or only the HTTP/2 preface and then pings cannot hold a slot forever. (Once a stream
/// runs, its keepalive and the Hello timeout take over.)
pub fn connections(
    listener: tokio::net::TcpListener,
    deadline: Duration,
) -> impl futures_util::Stream<Item = std::io::Result<FirstRequestDeadline>> {
    use futures_util::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |accepted| {
        accepted.map(|stream| FirstRequestDeadline {
            stream,
            deadline: Some(Box::pin(tokio::time::sleep(deadline))),
            started: Arc::default(),
        })
    })
}

/// A TCP stream whose reads fail with `TimedOut` once its deadline passed before the
/// connection's first request (see [`connections`]).
pub struct FirstRequestDeadline {
    stream: tokio::net::TcpStream,
    /// Until the first request.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Set by the service at the connection's first request ([`AgentConnection::started`]).
    started: Arc<std::sync::atomic::AtomicBool>,
}

/// What the service learns of the connection a request came on (tonic puts it in the
/// request's extensions, inside `TlsConnectInfo` over TLS).
#[derive(Clone)]
pub struct AgentConnection {
    pub tcp: tonic::transport::server::TcpConnectInfo,
    started: Arc<std::sync::atomic::AtomicBool>,
}

impl AgentConnection {
    /// The connection made a request: its deadline no longer applies.
    pub fn started(&self) {
        self.started
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The connection of a request, as its extensions carry it (plaintext or TLS).
    pub fn of(extensions: &http::Extensions) -> Option<&AgentConnection> {
        extensions.get::<AgentConnection>().or_else(|| {
            extensions
                .get::<tonic::transport::server::TlsConnectInfo<AgentConnection>>()
                .map(|tls| tls.get_ref())
        })
    }
}

impl tokio::io::AsyncRead for FirstRequestDeadline {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        if self.deadline.is_some() && self.started.load(std::sync::atomic::Ordering::Relaxed) {
            self.deadline = None;
        }
        let read = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        if read.is_pending()
            && let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection made no request in time",
            )));
        }
        read
    }
}

impl tokio::io::AsyncWrite for FirstRequestDeadline {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for FirstRequestDeadline {
    type ConnectInfo = AgentConnection;

    fn connect_info(&self) -> AgentConnection {
        AgentConnection {
            tcp: self.stream.connect_info(),
            started: self.started.clone(),
        }
    }
}

/// Whether a stream ending with `status` ended by no one's refusal: the agent went away (the
/// transport's error, or its answers no longer read) or the aggregator stops.
fn ends_without_refusal(status: &Status) -> bool {
    matches!(status.code(), tonic::Code::Cancelled | tonic::Code::Unknown)
        || (status.code() == tonic::Code::Unavailable && status.message() == STOPPING)
}

/// The gRPC status code as a metric label.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::InvalidArgument => "invalid_argument",
        Code::FailedPrecondition => "failed_precondition",
        Code::OutOfRange => "out_of_range",
        Code::Aborted => "aborted",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Unavailable => "unavailable",
        Code::Cancelled => "cancelled",
        Code::AlreadyExists => "already_exists",
        Code::DeadlineExceeded => "deadline_exceeded",
        _ => "other",
    }
}

fn internal(err: StoreError) -> Status {
    tracing::error!(%err, "store failure");
    Status::unavailable(format!(
        "the aggregator cannot store batches right now: {err}"
    ))
}
