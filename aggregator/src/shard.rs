//! Flow shards: the flow table divided by connection key into [`SHARDS`] fixed ranges, each range
//! owned by one actix actor ([`FlowShard`]) and nothing else.
//!
//! A connection belongs to the shard whose range holds the stable hash of its key
//! ([`shard_of`]), so every observation of one connection — from any agent — reaches the same
//! actor, which stitches them alone. The number of shards is fixed (it lays out stored state, and
//! it is the unit the replication issue places on replicas); how many threads run them is not:
//! shards are spread over the [`ActorRuntime`]'s arbiters ([`start`]).
//!
//! A shard's life: [`Apply`] messages (its part of one durable agent batch) arrive through a
//! bounded mailbox — a full mailbox makes the sending agent session wait, which stops that agent's
//! acks and so its draining. Every tick (`checkpoint_interval`) the shard emits the intervals that are due and writes
//! one checkpoint (its changed connections, its positions in the agents' batch logs, the emitted
//! spans), atomically and together with the other shards' of the same tick (the
//! [`CheckpointWriter`]); then it tells the exporter ([`OutboxChanged`]). [`Flush`] (shutdown)
//! emits every pending interval through a last checkpoint.
//!
//! Each shard records its own positions, so an agent batch can be applied by some shards and not
//! yet by others (the session sends each shard its part separately); recovery replays each part
//! to its shard only if that shard had not applied it.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use std::io::IsTerminal as _;

use mermin_protocol::{display::flow_line, wire::read::BatchBytes};

use crate::{
    actors::ActorRuntime,
    checkpoints::{CheckpointWriter, Part},
    clock::unix_now,
    connection_key::ConnectionKey,
    export::OutboxChanged,
    flow_table::{Emitted, EndNodes, EndPlace, FlowTable, ends_reported},
    ingest::{AppliedBatch, BatchSink, SinkClosed},
    metadata::{AttributeNaming, MetadataIndex, SharedIndex},
    metrics::{Metrics, ShardLabel},
    observation::Observation,
    observe::{ObserveHub, observed},
    otlp_wire::{MAX_REQUEST_BYTES, MAX_REQUEST_SPANS, RequestWriter},
    span::{Enrichment, SPANS_PER_INTERVAL, write_flow_spans},
    stitch::Reporter,
    store::{BootId, Change, Store, StoreError},
};
use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, Recipient,
    WrapFuture, fut::LocalBoxActorFuture,
};

pub use crate::placement::{SHARDS, ShardId, shard_of};

/// Parts of agent batches a shard's mailbox holds before senders wait.
const MAILBOX_CAPACITY: usize = 16;

/// A shard's part of one durable agent batch.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Apply(pub AppliedBatch);

/// Forget these agent processes: the store retired them (no batch of theirs will come again).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire(pub Arc<[BootId]>);

/// Emit everything pending, checkpoint, stop; then tell the sender.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flush(pub tokio::sync::oneshot::Sender<()>);

/// What every shard shares.
#[derive(Clone)]
pub struct ShardContext {
    /// Read for batches a shard missed (checkpoints go through `checkpoints`).
    pub store: Store,
    pub checkpoints: CheckpointWriter,
    pub metrics: Arc<Metrics>,
    /// Told after a checkpoint that queued spans.
    pub exporter: Recipient<OutboxChanged>,
    /// Print a one-line summary of every emitted interval on standard output.
    pub print_flows: bool,
    /// Where emitted intervals go for the admin API's observers (once durable).
    pub observe: ObserveHub,
    /// What spans are enriched with.
    pub metadata: SharedIndex,
    pub naming: AttributeNaming,
    /// How often the shard emits what is due and checkpoints (`checkpoint_interval`). A
    /// longer tick writes a connection whose nodes' reports arrive within one tick once (its
    /// end) instead of twice, and wakes the checkpoint writer less often.
    pub tick: Duration,
}

/// The nodes the metadata index places a connection's ends on, as of the flow's start.
struct IndexedEnds<'a>(&'a MetadataIndex);

impl EndNodes for IndexedEnds<'_> {
    fn all_reported(
        &self,
        key: &ConnectionKey,
        at_unix_nanos: u64,
        reporting: &mut dyn Iterator<Item = Reporter<'_>>,
    ) -> bool {
        let ends = [key.first, key.second].map(|end| {
            let found = self.0.lookup(end.address, end.port, at_unix_nanos)?;
            Some(EndPlace {
                node: found.node_name?,
                // A hostNetwork pod has no interface of its own: its node's report is its own.
                pod: found.pod_name.is_some() && !found.host_network,
            })
        });
        ends_reported(ends, reporting)
    }
}

/// The actor owning one shard's flow table.
pub struct FlowShard {
    id: ShardId,
    table: FlowTable,
    /// How far this shard has applied each agent's batches.
    positions: HashMap<BootId, u64>,
    /// Agents whose position moved since the last checkpoint (only those are written).
    moved: HashSet<BootId>,
    context: ShardContext,
    emitted: Vec<Emitted>,
    /// What the last checkpoints could not write (the store failed): written with the next one.
    unsaved: Unsaved,
}

/// Changes and spans not yet durable. Nothing here is dropped: a failed checkpoint keeps it, and
/// the next tick tries again, without holding the thread.
#[derive(Default)]
struct Unsaved {
    changes: Vec<Change>,
    outbox: Vec<Vec<u8>>,
    /// The intervals for `--print-flows` and the observers, published once their spans are
    /// durable.
    observed: Vec<Emitted>,
    intervals: u64,
}

impl Unsaved {
    fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.outbox.is_empty()
    }
}

impl Actor for FlowShard {
    type Context = Context<Self>;

    /// Ticks on a grid of wall-clock time that every shard shares, so that their checkpoints
    /// reach the store together and are made durable by one flush (the store groups them).
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        let tick = self.context.tick;
        ctx.run_later(until_next_tick(unix_now(), tick), move |shard, ctx| {
            shard.tick(ctx);
            ctx.run_interval(tick, Self::tick);
        });
    }
}

/// From `now_unix_nanos` to the next multiple of `tick`.
fn until_next_tick(now_unix_nanos: u64, tick: Duration) -> Duration {
    let tick = (tick.as_nanos() as u64).max(1);
    Duration::from_nanos(tick - now_unix_nanos % tick)
}

impl FlowShard {
    /// Emits what is due and writes the checkpoint; the shard takes no message until it is done.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.table.emit_due(unix_now(), &mut self.emitted);
        if let Some(checkpoint) = self.checkpoint() {
            ctx.wait(checkpoint);
        }
        self.context
            .metrics
            .shard_ticked(self.id, unix_now() / 1_000_000_000);
    }
}

impl Handler<Apply> for FlowShard {
    type Result = ();

    /// Applies the part, in sequence: a part this shard is already past is ignored (it was
    /// applied, or recovered from the log), and parts it never got (their session ended while
    /// this mailbox was full) are first read back from the batch log — on the blocking pool,
    /// the shard taking no other message until they and this part are applied.
    fn handle(&mut self, Apply(batch): Apply, ctx: &mut Context<Self>) {
        let applied = self.positions.get(&batch.boot_id).copied().unwrap_or(0);
        if batch.sequence <= applied {
            return;
        }
        if applied + 1 == batch.sequence {
            self.apply_part(&[], batch);
            return;
        }
        let (store, boot_id) = (self.context.store.clone(), batch.boot_id);
        let missed = applied + 1..batch.sequence;
        let read = tokio::task::spawn_blocking(move || {
            missed
                .map(|sequence| (sequence, store.batch(&boot_id, sequence)))
                .collect::<Vec<_>>()
        });
        ctx.wait(read.into_actor(self).map(move |read, shard, _| {
            let read = read.unwrap_or_else(|joined| {
                tracing::error!(shard = shard.id, %joined, "reading missed batches back failed");
                Vec::new()
            });
            shard.apply_part(&read, batch);
        }));
    }
}

/// Stored batches read back, by sequence.
type ReadBack = [(u64, Result<Option<BatchBytes>, StoreError>)];

impl FlowShard {
    /// Applies the batches read back (`missed`, in sequence), then `batch`'s part, and moves
    /// the agent's position to it.
    fn apply_part(&mut self, missed: &ReadBack, batch: AppliedBatch) {
        let now = unix_now();
        let (late_before, reused_before, early_before, forgotten_before) = (
            self.table.late_ignored(),
            self.table.reused_keys(),
            self.table.complete_early(),
            self.table.forgotten_early(),
        );
        {
            let index = self.context.metadata.read();
            let ends = IndexedEnds(&index);
            for (sequence, read) in missed {
                for observation in self.read_back(*sequence, read) {
                    self.table.apply_knowing(&observation, now, &ends);
                }
            }
            for observation in &batch.observations {
                self.table.apply_knowing(observation, now, &ends);
            }
        }
        self.context
            .metrics
            .intervals_complete_early
            .inc_by(self.table.complete_early() - early_before);
        self.context
            .metrics
            .late_records_ignored
            .inc_by(self.table.late_ignored() - late_before);
        self.context
            .metrics
            .reused_tuples
            .inc_by(self.table.reused_keys() - reused_before);
        self.context
            .metrics
            .connections_forgotten_early
            .inc_by(self.table.forgotten_early() - forgotten_before);
        self.positions.insert(batch.boot_id, batch.sequence);
        self.moved.insert(batch.boot_id);
    }
}

impl Handler<Retire> for FlowShard {
    type Result = ();

    fn handle(&mut self, Retire(boot_ids): Retire, _: &mut Context<Self>) {
        for id in boot_ids.iter() {
            self.positions.remove(id);
            self.moved.remove(id);
        }
    }
}

impl Handler<Flush> for FlowShard {
    type Result = ();

    /// Emits everything pending through a last checkpoint and stops. If the store cannot take
    /// it, the shard stops anyway: what it held is still in the batch log (its positions did not
    /// move), and the next start replays it.
    fn handle(&mut self, Flush(done): Flush, ctx: &mut Context<Self>) {
        self.table.flush(unix_now(), &mut self.emitted);
        let checkpoint = self
            .checkpoint()
            .unwrap_or_else(|| actix::fut::ready(()).boxed_local());
        ctx.wait(checkpoint.map(move |(), _, ctx: &mut Context<Self>| {
            ctx.stop();
            let _ = done.send(());
        }));
    }
}

impl FlowShard {
    /// This shard's part of stored batch `sequence` that never reached it, as `read` from the
    /// log (a batch is deleted only once every shard's checkpoint is past it): every record read
    /// and validated first, so that a batch is applied whole or not at all; one that is missing
    /// or does not read is counted as lost.
    fn read_back(
        &self,
        sequence: u64,
        read: &Result<Option<BatchBytes>, StoreError>,
    ) -> Vec<Observation> {
        let lost = |reason: &str, why: &dyn std::fmt::Display| {
            tracing::error!(shard = self.id, sequence, %why, "a batch this shard missed is lost: {reason}");
            self.context.metrics.lost(reason, 1);
            Vec::new()
        };
        let batch = match read {
            Ok(Some(batch)) => batch,
            Ok(None) => return lost("batch_missing_from_log", &"not in the log"),
            Err(err) => return lost("batch_unreadable", err),
        };
        let mut observations = Vec::new();
        for record in batch.records() {
            // Validated before it was stored: one that no longer is, is corrupt.
            let observation = match record
                .map_err(|e| e.to_string())
                .and_then(|r| Observation::try_from(&r).map_err(|e| e.to_string()))
            {
                Ok(observation) => observation,
                Err(why) => return lost("batch_unreadable", &why),
            };
            if shard_of(&observation.key) == self.id {
                observations.push(observation);
            }
        }
        self.context.metrics.batches_read_back.inc();
        observations
    }

    /// The checkpoint of everything unsaved, if there is anything: it persists the table's
    /// changes, the moved positions and the spans of the emitted intervals atomically, with the
    /// other shards' of this tick — on the checkpoint writer's thread, not this one, which other
    /// actors share — then wakes the exporter. Callers `wait` on it (the shard takes no message
    /// until it is done); a failed one leaves everything for the next tick. With nothing to
    /// write, the writer is told so (it need not wait for this shard).
    fn checkpoint(&mut self) -> Option<LocalBoxActorFuture<Self, ()>> {
        let metrics = &self.context.metrics;
        metrics
            .shard_connections
            .get_or_create(&ShardLabel { shard: self.id })
            .set(self.table.len() as i64);
        match self.table.take_changes() {
            Ok(changes) => self.unsaved.changes.extend(changes),
            Err(err) => {
                // The changes stay pending in the table for the next tick.
                tracing::error!(shard = self.id, %err, "cannot serialize flow state; checkpoint postponed");
                metrics.checkpoint_failures.inc();
                return None;
            }
        }
        if !self.emitted.is_empty() {
            let index = self.context.metadata.read();
            let enrichment = Enrichment {
                index: &index,
                naming: self.context.naming,
            };
            self.unsaved
                .outbox
                .extend(encode_requests(&self.emitted, &enrichment));
            self.unsaved.intervals += self.emitted.len() as u64;
            if self.context.print_flows || self.context.observe.wanted() {
                self.unsaved.observed.append(&mut self.emitted);
            } else {
                self.emitted.clear();
            }
        }
        if self.unsaved.is_empty() && self.moved.is_empty() {
            self.context.checkpoints.skip(self.id);
            return None;
        }
        let mut unsaved = std::mem::take(&mut self.unsaved);
        let part = Part {
            positions: self
                .moved
                .iter()
                .filter_map(|id| Some((*id, *self.positions.get(id)?)))
                .collect(),
            changes: std::mem::take(&mut unsaved.changes),
            outbox: std::mem::take(&mut unsaved.outbox),
        };
        let written = self.context.checkpoints.write(self.id, part);
        let done = written.into_actor(self).map(move |written, shard, _| {
            let metrics = &shard.context.metrics;
            let Ok((part, result)) = written else {
                // The writer is gone (its thread panicked): what it held is gone from memory,
                // not from the log (positions did not move), so a restart recovers it; `/livez`
                // fails from now on to get that restart.
                tracing::error!(shard = shard.id, "the checkpoint writer is gone");
                metrics.checkpoint_failures.inc();
                metrics.checkpoint_writer_died();
                return;
            };
            let Part {
                positions,
                changes,
                outbox,
            } = part;
            unsaved.changes = changes;
            unsaved.outbox = outbox;
            match result {
                Ok(()) => {
                    for (id, sequence) in &positions {
                        // Moved again while writing? Then it stays for the next checkpoint.
                        if shard.positions.get(id) == Some(sequence) {
                            shard.moved.remove(id);
                        }
                    }
                    shard.queued(unsaved);
                }
                Err(StoreError::NotDurable(err)) => {
                    // Applied: queued for export, durable with the next write that succeeds
                    // (the positions stay moved, so the next tick makes one).
                    tracing::error!(shard = shard.id, %err, "checkpoint written but not durable; the next one makes it so");
                    metrics.checkpoint_failures.inc();
                    shard.queued(unsaved);
                }
                Err(err) => {
                    tracing::error!(shard = shard.id, %err, "cannot write checkpoint; keeping it for the next tick");
                    metrics.checkpoint_failures.inc();
                    // Older first: changes made since then override these when written.
                    unsaved.changes.append(&mut shard.unsaved.changes);
                    unsaved.outbox.append(&mut shard.unsaved.outbox);
                    unsaved.observed.append(&mut shard.unsaved.observed);
                    unsaved.intervals += shard.unsaved.intervals;
                    shard.unsaved = unsaved;
                }
            }
        });
        Some(done.boxed_local())
    }
}

impl FlowShard {
    /// What a checkpoint queued for export: counted, the exporter woken, shown.
    fn queued(&mut self, unsaved: Unsaved) {
        self.context
            .metrics
            .intervals_emitted
            .inc_by(unsaved.intervals);
        if !unsaved.outbox.is_empty() {
            // A full mailbox already holds a wake-up; one is enough.
            let _ = self.context.exporter.try_send(OutboxChanged);
        }
        if self.context.print_flows {
            let colour = std::io::stdout().is_terminal();
            let index = self.context.metadata.read();
            for flow in &unsaved.observed {
                println!("{}", flow_line(&observed(flow, &index), colour));
            }
        }
        if !unsaved.observed.is_empty() {
            self.context.observe.publish(unsaved.observed);
        }
    }
}

/// Intervals per export request at most.
pub const INTERVALS_PER_REQUEST: usize = (MAX_REQUEST_SPANS / SPANS_PER_INTERVAL) as usize;

/// About what an interval's two spans take in a request, Kubernetes names aside (1,070 bytes in
/// the `stitch` bench); a first size, not a limit.
const INTERVAL_BYTES_GUESS: usize = 1_100;

/// The outbox entries (encoded OTLP export requests) carrying the spans of `emitted`.
pub fn encode_requests(emitted: &[Emitted], enrichment: &Enrichment) -> Vec<Vec<u8>> {
    // Sized up front: growing a tick's request by doubling copied it and faulted in fresh
    // pages several times over (~5% of the aggregator's CPU at 5k connections/s).
    let capacity = |intervals: usize| {
        (intervals.min(INTERVALS_PER_REQUEST) * INTERVAL_BYTES_GUESS).min(MAX_REQUEST_BYTES)
    };
    let mut requests = Vec::new();
    let mut request = RequestWriter::with_capacity(capacity(emitted.len()));
    let mut intervals = 0;
    for (index, e) in emitted.iter().enumerate() {
        let before = request.request_len();
        write_flow_spans(&e.flow, &e.interval, enrichment, &mut request);
        // Over the limits with this interval: it starts the next request.
        if intervals > 0
            && (intervals == INTERVALS_PER_REQUEST || request.request_len() > MAX_REQUEST_BYTES)
        {
            let next =
                request.split_off(before, SPANS_PER_INTERVAL, capacity(emitted.len() - index));
            requests.push(std::mem::replace(&mut request, next).finish());
            intervals = 0;
        }
        intervals += 1;
    }
    if !request.is_empty() {
        requests.push(request.finish());
    }
    requests
}

/// The shards' addresses: where agent sessions send batches.
#[derive(Clone)]
pub struct Shards {
    addresses: Arc<[Addr<FlowShard>]>,
    /// Counts what each mailbox holds (`shard_mailbox_parts`).
    metrics: Arc<Metrics>,
}

impl BatchSink for Shards {
    /// Sends every shard its part of `batch` (possibly empty: a shard's position moves on either
    /// way), waiting while a mailbox is full.
    async fn apply(&self, batch: AppliedBatch) -> Result<(), SinkClosed> {
        // Each part allocated once at its size: observations are large, and growing eight
        // vectors by doubling copied each batch's observations once more.
        let shards: Vec<usize> = batch
            .observations
            .iter()
            .map(|observation| usize::from(shard_of(&observation.key)))
            .collect();
        let mut sizes = vec![0; self.addresses.len()];
        for &shard in &shards {
            sizes[shard] += 1;
        }
        let mut parts: Vec<Vec<Observation>> = sizes.into_iter().map(Vec::with_capacity).collect();
        for (observation, shard) in batch.observations.into_iter().zip(shards) {
            parts[shard].push(observation);
        }
        // `send` enqueues at once when there is room, so the shards work on their parts in
        // parallel while this waits for each in turn.
        let sends: Vec<_> = self
            .addresses
            .iter()
            .zip(parts)
            .enumerate()
            .map(|(shard, (address, observations))| {
                let queued = Queued::new(&self.metrics, shard as ShardId);
                let sent = address.send(Apply(AppliedBatch {
                    boot_id: batch.boot_id,
                    sequence: batch.sequence,
                    observations,
                }));
                (queued, sent)
            })
            .collect();
        for (queued, sent) in sends {
            // Resolves once the shard has applied the part (or is gone).
            let applied = sent.await;
            drop(queued);
            applied.map_err(|_| SinkClosed)?;
        }
        Ok(())
    }

    async fn retire(&self, boot_ids: Arc<[BootId]>) {
        for address in self.addresses.iter() {
            // A stopped shard has nothing left to forget.
            let _ = address.send(Retire(boot_ids.clone())).await;
        }
    }
}

/// One part counted in its shard's `shard_mailbox_parts` until dropped (applied, or the
/// session gave up waiting).
struct Queued(prometheus_client::metrics::gauge::Gauge);

impl Queued {
    fn new(metrics: &Metrics, shard: ShardId) -> Self {
        let gauge = metrics
            .shard_mailbox_parts
            .get_or_create(&ShardLabel { shard })
            .clone();
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A recovered shard: its table and positions.
pub struct ShardState {
    pub table: FlowTable,
    pub positions: HashMap<BootId, u64>,
}

/// Starts one actor per state (shard `i` gets `states[i]`) on `runtime`'s arbiters.
pub fn start(runtime: &ActorRuntime, states: Vec<ShardState>, context: ShardContext) -> Shards {
    let metrics = context.metrics.clone();
    let addresses: Vec<Addr<FlowShard>> = states
        .into_iter()
        .enumerate()
        .map(|(index, state)| {
            let context = context.clone();
            FlowShard::start_in_arbiter(runtime.arbiters().get(index), move |_| FlowShard {
                id: index as ShardId,
                table: state.table,
                // Recovery may have moved the positions on: write them at the first tick.
                moved: state.positions.keys().copied().collect(),
                positions: state.positions,
                unsaved: Unsaved::default(),
                context,
                emitted: Vec::new(),
            })
        })
        .collect();
    Shards {
        addresses: addresses.into(),
        metrics,
    }
}

impl Shards {
    /// Emits every pending interval of every shard through a last checkpoint; the shards stop.
    pub async fn flush(&self) {
        for shard in self.addresses.iter() {
            let (done, flushed) = tokio::sync::oneshot::channel();
            if shard.send(Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;

    /// A part that never reached the shard (its session ended while the mailbox was full) is read
    /// back from the log when the next one arrives; the stale part arriving afterwards is ignored:
    /// each batch counts once.
    #[actix::test]
    async fn a_missed_part_is_read_back_from_the_log_and_a_stale_one_is_ignored() {
        use mermin_protocol::{agent::v1::Batch, flow::v1::EndReason, wire::read::BatchBytes};
        use opentelemetry_proto::tonic::common::v1::any_value::Value;

        use crate::{
            export::Exporter,
            metadata::{IndexSettings, MetadataIndex},
            stitch::InterfaceKinds,
            test_records::tcp_record,
        };

        let record = |packets, reason| tcp_record(40_000, 80, packets, reason);
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let boot = [6; 16];
        let batches = [
            record(3, EndReason::ActiveTimeout),
            record(4, EndReason::TcpClose),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, r)| Batch {
            sequence: i as u64 + 1,
            records: vec![r],
        })
        .collect::<Vec<_>>();
        for batch in &batches {
            store
                .append(&boot, &BatchBytes::encode(batch))
                .await
                .unwrap();
        }
        let part = |batch: &Batch| AppliedBatch {
            boot_id: boot,
            sequence: batch.sequence,
            observations: batch
                .records
                .iter()
                .map(|r| Observation::try_from(r).unwrap())
                .collect(),
        };
        let id = shard_of(&part(&batches[0]).observations[0].key);
        let metrics = Arc::new(Metrics::new());
        let exporter = Exporter::new(
            store.clone(),
            crate::export::ExportConfig::new("http://127.0.0.1:9"),
            metrics.clone(),
        )
        .unwrap()
        .start();
        let settle = Duration::from_secs(60);
        let (checkpoints, _writer) = CheckpointWriter::start(store.clone(), 1);
        let metadata = SharedIndex::new(MetadataIndex::new(&IndexSettings::default()));
        let shard = FlowShard {
            id,
            table: FlowTable::new(InterfaceKinds::default(), settle, settle),
            positions: HashMap::new(),
            moved: HashSet::new(),
            unsaved: Unsaved::default(),
            context: ShardContext {
                store: store.clone(),
                checkpoints,
                metrics: metrics.clone(),
                exporter: exporter.recipient(),
                print_flows: false,
                observe: ObserveHub::new(0, metadata.clone(), metrics.clone()),
                metadata,
                naming: AttributeNaming::Seed,
                tick: crate::defaults::CHECKPOINT_INTERVAL,
            },
            emitted: Vec::new(),
        }
        .start();
        shard.send(Apply(part(&batches[1]))).await.unwrap();
        shard.send(Apply(part(&batches[0]))).await.unwrap(); // stale: already read back
        // A part whose predecessor the log does not hold: that one is counted as lost.
        let after_a_gap = AppliedBatch {
            boot_id: boot,
            sequence: 4,
            observations: Vec::new(),
        };
        shard.send(Apply(after_a_gap)).await.unwrap();
        let (done, flushed) = tokio::sync::oneshot::channel();
        shard.send(Flush(done)).await.unwrap();
        flushed.await.unwrap();

        assert_eq!(metrics.batches_read_back.get(), 1);
        assert!(
            metrics
                .render()
                .contains("mermin_aggregator_lost_total{reason=\"batch_missing_from_log\"} 1\n"),
            "{}",
            metrics.render()
        );
        let entries = store.outbox_oldest(10).unwrap();
        assert_eq!(entries.len(), 1);
        let request =
            ExportTraceServiceRequest::decode(&entries[0].1[4..]).expect("an export request");
        let client = &request.resource_spans[0].scope_spans[0].spans[0];
        let sent = client
            .attributes
            .iter()
            .find(|a| a.key == "flow.packets.sent")
            .and_then(|a| a.value.clone()?.value);
        assert_eq!(sent, Some(Value::IntValue(7)), "batches 1 and 2, once each");
        let recovered = store.recover().unwrap();
        assert_eq!(recovered.positions[&(id, boot)], 4);
    }

    /// Requests are cut at 1,000 intervals, and every span arrives in exactly one of them.
    #[test]
    fn export_requests_hold_at_most_a_thousand_intervals_and_every_span_once() {
        use mermin_protocol::flow::v1::EndReason;

        use crate::{
            metadata::{IndexSettings, MetadataIndex},
            stitch::InterfaceKinds,
            test_records::tcp_record,
        };

        let mut table = FlowTable::new(
            InterfaceKinds::default(),
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        for port in 0..2_500u32 {
            let record = tcp_record(20_000 + port, 80, 1, EndReason::TcpClose);
            table.apply(&Observation::try_from(&record).unwrap(), 0);
        }
        let mut emitted = Vec::new();
        table.emit_due(u64::MAX / 2, &mut emitted);
        assert_eq!(emitted.len(), 2_500);
        let index = MetadataIndex::new(&IndexSettings::default());
        let enrichment = Enrichment {
            index: &index,
            naming: AttributeNaming::Seed,
        };
        let requests = encode_requests(&emitted, &enrichment);
        let spans: Vec<u32> = requests
            .iter()
            .map(|entry| u32::from_be_bytes(entry[..4].try_into().unwrap()))
            .collect();
        assert_eq!(spans, [2_000, 2_000, 1_000]);
        assert!(requests.iter().all(|r| r.len() < MAX_REQUEST_BYTES));
        // Each request decodes to the spans it counts, and every span is in exactly one.
        let mut span_ids = std::collections::HashSet::new();
        for entry in &requests {
            let request = ExportTraceServiceRequest::decode(&entry[4..]).unwrap();
            let counted = u32::from_be_bytes(entry[..4].try_into().unwrap()) as usize;
            assert_eq!(request.resource_spans.len(), counted);
            for resource_spans in request.resource_spans {
                assert!(span_ids.insert(resource_spans.scope_spans[0].spans[0].span_id.clone()));
            }
        }
        assert_eq!(span_ids.len(), 5_000);
    }
}
