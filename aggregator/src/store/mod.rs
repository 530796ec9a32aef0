//! The storage seam: everything the aggregator keeps durably, behind one trait, [`Storage`],
//! that the layers above use as [`Store`] (`Arc<dyn Storage>`) and never see through.
//!
//! What is stored, and the promises every implementation keeps (the conformance suite in
//! `conformance` checks them against each implementation, reopening the store after every step
//! as a crash would):
//! - **Agents and the batch log.** For every agent boot id, the node it belongs to, the highest
//!   sequence made durable and the batches themselves. [`Storage::append`] returns once the batch
//!   and the new high-water mark are durable together — the moment the agent may be acknowledged
//!   — and refuses a sequence that is not the next one.
//! - **Shard checkpoints.** [`Storage::checkpoint`] writes, for each shard given and all of them
//!   atomically: the connections it changed, its position (boot id → last applied sequence) for
//!   the agents that moved, and the export requests it emitted (the shards' checkpoints of one
//!   tick are written together: one write and one flush, not one per shard). After a crash, each shard's checkpoint plus the
//!   batches after its positions rebuild exactly the table that produced the outbox. A batch
//!   that every shard's checkpoint is past is deleted. A connection belongs to one shard: the
//!   checkpoints of different shards never change the same key.
//! - **The outbox.** Export requests in the order queued, with their count and total size kept
//!   as they change (never counted by a scan).
//! - **Health.** Why the last write failed, until one succeeds ([`Storage::write_failure`]),
//!   and whether the implementation failed in a way only a restart clears ([`Storage::broken`]:
//!   `/livez` fails on it, so that the orchestrator restarts the process, which recovers from
//!   what is on disk).
//! - **Retirement.** Every agent process has its own boot id, so per-agent state would grow with
//!   every restart. A boot id that a newer boot id of the same node replaced, that its caller
//!   does not keep (a stream open, or closed only recently) and whose batches every shard's
//!   checkpoint is past, is forgotten
//!   ([`Storage::retire_superseded`]): the store holds one boot id per node plus those still
//!   being applied.
//!
//! One trait, not one per part, because a checkpoint spans three parts in one atomic write.
//! Writes an agent or the exporter waits for are async; the checkpoint and the reads are
//! blocking calls (checkpoints run on the checkpoint writer's thread; a read of a stored batch
//! may touch the disk). [`SledStore`] is the
//! implementation today (`sled`); the replication issue adds one on openraft. Integer keys are
//! big-endian so that scans run in order.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use futures_util::future::BoxFuture;
use mermin_protocol::wire::read::BatchBytes;

use crate::placement::ShardId;

mod sled;

pub(crate) use self::sled::value_log;
pub use self::sled::{DurableDb, SledStore};

#[cfg(test)]
pub(crate) mod conformance;
pub mod faults;

/// Length of an agent boot id.
pub const BOOT_ID_LEN: usize = 16;
pub type BootId = [u8; BOOT_ID_LEN];

/// The store as the aggregator's layers hold it.
pub type Store = Arc<dyn Storage>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("opening the store at {path}: {reason}")]
    Open { path: String, reason: String },
    /// The implementation's own failure (a full or failing disk, a lost quorum, ...).
    #[error("store: {0}")]
    Backend(String),
    /// The implementation's failure that lasts until the process restarts (sled 0.34 keeps its
    /// first I/O error for good): every later write fails the same way.
    #[error("store: {0}")]
    Broken(String),
    #[error("store: batch {sequence} of this agent is not the next one (last durable: {last})")]
    OutOfOrder { sequence: u64, last: u64 },
    #[error("store: corrupt entry: {0}")]
    Corrupt(String),
    /// A checkpoint was applied but could not be made durable (the disk failed after the write
    /// was taken): it must not be written again — its export requests would be queued twice —
    /// and it becomes durable with the next write that succeeds. Until then a crash loses it
    /// and a restart replays its batches from the log.
    #[error("store: written but not durable: {0}")]
    NotDurable(String),
}

/// A connection's serialized key and state (`None`: forgotten), as a checkpoint writes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    // As byte strings (not sequences of numbers) wherever serde writes them: the store group's
    // log carries them.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub state: Option<Vec<u8>>,
}

/// How much the export outbox may hold, and what happens when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxQuota {
    pub max_bytes: u64,
    pub when_full: WhenFull,
}

impl Default for OutboxQuota {
    fn default() -> Self {
        Self {
            max_bytes: crate::defaults::OUTBOX_MAX_BYTES,
            when_full: WhenFull::Backpressure,
        }
    }
}

/// The outbox-full policy. Either way, what happens is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenFull {
    /// Stop taking agent batches until the exporter makes room (agents keep them, bounded, and
    /// stop draining): nothing acknowledged is dropped. `streams_rejected{reason="resource_exhausted"}`.
    #[default]
    Backpressure,
    /// Delete the oldest queued requests to make room: the newest flows win.
    /// `spans_dropped{reason="outbox_full"}`.
    DropOldest,
}

impl WhenFull {
    pub const NAMES: &str = "\"backpressure\" or \"drop_oldest\"";

    pub fn as_str(self) -> &'static str {
        match self {
            WhenFull::Backpressure => "backpressure",
            WhenFull::DropOldest => "drop_oldest",
        }
    }
}

impl std::fmt::Display for WhenFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WhenFull {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "backpressure" => Ok(WhenFull::Backpressure),
            "drop_oldest" => Ok(WhenFull::DropOldest),
            other => Err(format!(
                "unknown policy {other:?}; expected {}",
                WhenFull::NAMES
            )),
        }
    }
}

/// What one checkpoint of one shard writes (see the module docs).
#[derive(Clone, Copy)]
pub struct Checkpoint<'a> {
    pub shard: ShardId,
    pub positions: &'a HashMap<BootId, u64>,
    pub changes: &'a [Change],
    pub outbox: &'a [Vec<u8>],
}

impl Checkpoint<'_> {
    /// Refuses checkpoints that name a shard twice (one write holds one checkpoint per shard).
    pub fn one_per_shard(checkpoints: &[Checkpoint<'_>]) -> Result<(), StoreError> {
        let mut shards: Vec<ShardId> = checkpoints.iter().map(|c| c.shard).collect();
        shards.sort_unstable();
        match shards.windows(2).find(|pair| pair[0] == pair[1]) {
            Some(pair) => Err(StoreError::Backend(format!(
                "two checkpoints of shard {} in one write",
                pair[0]
            ))),
            None => Ok(()),
        }
    }
}

/// What a restart finds.
pub struct Recovered {
    /// Per shard: how far it had applied each agent's batches.
    pub positions: HashMap<(ShardId, BootId), u64>,
    /// Serialized connection states.
    pub connections: Vec<Vec<u8>>,
}

/// What a retirement pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Retirement {
    /// The boot ids forgotten.
    pub retired: Vec<BootId>,
    /// The boot ids still known.
    pub known: usize,
}

/// Everything durable (see the module docs).
pub trait Storage: Send + Sync + 'static {
    /// Highest durable sequence of `boot_id`; 0 if none.
    fn last_sequence(&self, boot_id: &BootId) -> Result<u64, StoreError>;

    /// Ties `boot_id` to `node` if it is new; returns the node it was tied to before, if any.
    /// A new boot id supersedes the node's earlier ones (see [`Storage::retire_superseded`]).
    fn bind_agent<'a>(
        &'a self,
        boot_id: &'a BootId,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>>;

    /// Forgets every boot id that a later-bound boot id of the same node superseded, that is not
    /// in `kept` (boot ids the caller keeps: a stream open, or closed only recently) and whose
    /// every batch every shard's checkpoint is past: its high-water mark, node and positions —
    /// and positions of boot ids already forgotten that a checkpoint racing the retirement
    /// wrote back. Blocking.
    fn retire_superseded(&self, kept: &HashSet<BootId>) -> Result<Retirement, StoreError>;

    /// Makes `batch` durable as the next batch of `boot_id` (its sequence must be the last + 1).
    /// The log keeps the batch's bytes as they are.
    fn append<'a>(
        &'a self,
        boot_id: &'a BootId,
        batch: &'a BatchBytes,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// One stored batch, if the log still holds it.
    fn batch(&self, boot_id: &BootId, sequence: u64) -> Result<Option<BatchBytes>, StoreError>;

    /// Every stored batch, in (boot id, sequence) order: what start-up replays.
    fn batches(&self) -> Box<dyn Iterator<Item = Result<(BootId, BatchBytes), StoreError>> + '_>;

    /// Writes the checkpoints of several shards (each at most once), all of them atomically
    /// and durably (blocking), then drops the batches every shard is past. Each checkpoint's
    /// `positions` holds the agents whose position moved; its requests take outbox ids after
    /// those of the checkpoints before it. An empty `checkpoints` changes nothing but lets the
    /// store find out whether it can write again (what the checkpoint writer asks, idle, while
    /// [`Storage::write_failure`] reports one: the sled store probes its disk and flushes). On
    /// [`StoreError::NotDurable`] the checkpoints are applied: write their positions again
    /// later (so that a write makes them durable), not their changes and requests.
    fn checkpoint(&self, checkpoints: &[Checkpoint<'_>]) -> Result<(), StoreError>;

    /// Every shard's last checkpoint: positions and connection states.
    fn recover(&self) -> Result<Recovered, StoreError>;

    /// Queues an encoded export request durably; returns its outbox id.
    fn outbox_push<'a>(&'a self, request: &'a [u8]) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Up to `max` queued requests, oldest first.
    fn outbox_oldest(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    /// Up to `max` queued requests with ids above `after`, oldest first.
    fn outbox_after(&self, after: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    /// Removes a delivered (or permanently refused) request. Readers no longer see it at once;
    /// it may become durable only with the next durable write: a crash before that delivers the
    /// request again, which is harmless (its spans are the same bytes, span ids included) and
    /// spares the exporter a flush per request.
    fn outbox_remove(&self, id: u64) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Requests waiting in the outbox (O(1)).
    fn outbox_len(&self) -> usize;

    /// Bytes of the requests waiting in the outbox (O(1); what its quota limits).
    fn outbox_bytes(&self) -> u64;

    /// Why the last write failed, while none has shown since that the store takes batches
    /// again (a full or failing disk; the sled store asks a write that succeeds for room for a
    /// batch too).
    fn write_failure(&self) -> Option<String>;

    /// Why no write can succeed again before the process restarts, once that is so.
    fn broken(&self) -> Option<String>;
}
