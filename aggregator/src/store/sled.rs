//! The sled implementation of the storage seam ([`Storage`]): one sled database, a tree per
//! part (`agents`, `agent_nodes`, `node_agents`, `batches`, `shard_changes` (connection states
//! as per-shard change logs, see [`change_log`]), `positions`, `outbox`); cross-tree writes are
//! sled transactions, flushed before they count as durable — together when they arrive together
//! ([`group_commit`]).
//!
//! sled 0.34 is the last stable release, labelled beta and known for disk growth (openraft
//! dropped its sled store for that); it stays behind the seam so that it can be replaced.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use futures_util::{FutureExt, future::BoxFuture};
use mermin_protocol::wire::read::BatchBytes;
use prost::bytes::Bytes;
use sled::{
    Transactional,
    transaction::{ConflictableTransactionError, TransactionError},
};

mod change_log;
mod durable;
mod group_commit;
pub(crate) mod value_log;

pub use self::durable::DurableDb;
use self::{
    change_log::ChangeLogs,
    group_commit::GroupCommit,
    value_log::{Pointer, ValueLog},
};
use super::{BOOT_ID_LEN, BootId, Checkpoint, Recovered, Retirement, Storage, Store, StoreError};
use crate::placement::{SHARDS, ShardId};

impl From<sled::Error> for StoreError {
    fn from(err: sled::Error) -> Self {
        match err {
            // sled keeps its first I/O error and returns it from every later write.
            sled::Error::Io(_) => StoreError::Broken(err.to_string()),
            _ => StoreError::Backend(err.to_string()),
        }
    }
}

const BATCHES_TREE: &str = "batches";
const OUTBOX_TREE: &str = "outbox";
/// The trees whose values point into the value log (or are values stored inline by earlier
/// versions): what opening counts as live, and what a snapshot resolves.
const VALUE_TREES: [&str; 3] = [BATCHES_TREE, OUTBOX_TREE, change_log::TREE];

/// sled's page cache. Its default (1 GiB) only grows the process: what the aggregator reads back
/// (a batch replayed to a shard, the outbox's oldest requests) was written moments before.
const CACHE_BYTES: u64 = 64 << 20;

#[derive(Clone)]
pub struct SledStore {
    db: DurableDb,
    agents: sled::Tree,
    /// Boot id → the node name its first Hello gave (an agent process belongs to one node).
    agent_nodes: sled::Tree,
    /// (node, bind order) → boot id: a node's agent processes, the newest last.
    node_agents: sled::Tree,
    /// (boot id, sequence) → a pointer into `values` (or, written by an earlier version, the
    /// batch itself).
    batches: sled::Tree,
    /// Outbox id → a pointer into `values` (or the request itself).
    outbox: sled::Tree,
    /// The batches and export requests themselves (see [`value_log`]).
    values: Arc<ValueLog>,
    connections: Arc<ChangeLogs>,
    positions: sled::Tree,
    /// Sum of the outbox's request sizes (what its quota limits), and their number: kept as
    /// the outbox changes, never counted by a scan.
    outbox_bytes: Arc<AtomicU64>,
    outbox_count: Arc<AtomicU64>,
    /// Why the last write failed, until a write succeeds with room for a batch (for
    /// `/readyz`; see `observe_write`).
    write_failure: Arc<std::sync::Mutex<Option<String>>>,
    /// The first I/O error sled reported: it lasts until a restart (for `/livez`).
    broken: Arc<std::sync::OnceLock<String>>,
    /// Per agent, the first batch whose append failed after sled applied it in memory: from
    /// there on nothing counts as durable until it is written again.
    not_durable: Arc<std::sync::Mutex<HashMap<BootId, u64>>>,
    /// Per agent, the batch whose append is under way (written, its flush not returned yet):
    /// not durable as far as [`Storage::last_sequence`] (what a Welcome says) is concerned.
    appending: Arc<std::sync::Mutex<HashMap<BootId, u64>>>,
    /// Held while outbox ids are taken, so that a checkpoint's ids are one unbroken range:
    /// checkpoints of different shards run at once, and sled's ids are unique but not
    /// consecutive across threads (interleaved, two ranges would overlap and one checkpoint's
    /// requests overwrite the other's).
    outbox_ids: Arc<std::sync::Mutex<()>>,
    /// Every durable write flushes through it: writes that wait together, flush together.
    group_commit: Arc<GroupCommit>,
}

impl SledStore {
    /// Opens (or creates) the store in `path`, behind the seam.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Arc::new(Self::open_concrete(path)?))
    }

    fn open_concrete(path: &Path) -> Result<Self, StoreError> {
        let db = DurableDb::open(sled::Config::new().cache_capacity(CACHE_BYTES), path).map_err(
            |source| StoreError::Open {
                path: path.display().to_string(),
                reason: source.to_string(),
            },
        )?;
        let store = Self::on_db(db)?;
        store.values.hold_reserve();
        Ok(store)
    }

    /// The store kept in `db` (which may hold other trees too).
    pub(crate) fn on_db(db: DurableDb) -> Result<Self, StoreError> {
        let (mut outbox_bytes, mut outbox_count) = (0, 0);
        let mut pointers = Vec::new();
        for name in VALUE_TREES {
            for value in db.open_tree(name)?.iter().values() {
                let value = value?;
                if name == OUTBOX_TREE {
                    outbox_bytes += Pointer::value_len(&value);
                    outbox_count += 1;
                }
                pointers.extend(Pointer::decode(&value));
            }
        }
        let directory = db.path().ok_or_else(|| StoreError::Open {
            path: "(temporary)".into(),
            reason: "the store needs a directory for its value log".into(),
        })?;
        let values = Arc::new(ValueLog::open(&directory.join("values"), pointers)?);
        let store = Self {
            agents: db.open_tree("agents")?,
            agent_nodes: db.open_tree("agent_nodes")?,
            node_agents: db.open_tree("node_agents")?,
            batches: db.open_tree(BATCHES_TREE)?,
            outbox: db.open_tree(OUTBOX_TREE)?,
            connections: Arc::new(ChangeLogs::open(&db, values.clone())?),
            values,
            outbox_bytes: Arc::new(AtomicU64::new(outbox_bytes)),
            outbox_count: Arc::new(AtomicU64::new(outbox_count)),
            write_failure: Arc::default(),
            broken: Arc::default(),
            not_durable: Arc::default(),
            appending: Arc::default(),
            outbox_ids: Arc::default(),
            group_commit: Arc::default(),
            positions: db.open_tree("positions")?,
            db,
        };
        // A crash between a checkpoint and its clean-up leaves batches every shard is past;
        // an agent that never sends again would keep them for good.
        for boot_id in store.agents.iter().keys() {
            store.drop_applied_batches(&boot_id_of(&boot_id?)?)?;
        }
        // A retirement removes a boot id's batches with it; a store written before it did kept
        // them, and with the boot id's positions gone a recovery would apply them again (every
        // shard was past them, or the boot id would not have been retired).
        store.drop_entries_of_unknown_agents(&store.batches)?;
        Ok(store)
    }

    /// Notes the outcome of a write for [`Store::write_failure`]; passes it on. A write that
    /// succeeds clears a failure only with room for a batch on the data filesystem: on a full
    /// disk a small value still fits in a page the value log already holds, or in its reserve
    /// given back, and must not make the store look writable (ready).
    fn observe_write<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        let mut failure = self.write_failure.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) if failure.is_none() => {}
            Ok(_) => {
                if self.values.has_room() {
                    *failure = None;
                }
            }
            // Ordering conflicts are the caller's mistake, not the disk's.
            Err(StoreError::OutOfOrder { .. }) => {}
            Err(err) => {
                if let StoreError::Broken(why) = err {
                    self.broken.get_or_init(|| why.clone());
                }
                *failure = Some(err.to_string())
            }
        }
        result
    }

    fn write_checkpoints(&self, checkpoints: &[Checkpoint<'_>]) -> Result<(), StoreError> {
        let first_id = self.outbox_ids(checkpoints.iter().map(|c| c.outbox.len()).sum())?;
        self.apply_checkpoints(checkpoints, first_id)?;
        // Segments freed before this flush: it makes the removals that freed them durable.
        let free = self.values.take_dead();
        if let Err(err) = self.group_commit.flush_blocking(&self.db) {
            self.values.undelete(free);
            let why = err.to_string();
            if matches!(err, sled::Error::Io(_)) {
                self.broken.get_or_init(|| why.clone());
            }
            // Applied, not durable: written again it would be queued twice (see
            // `StoreError::NotDurable`).
            return Err(StoreError::NotDurable(why));
        }
        self.values.delete(free);
        // The checkpoints are durable now: an error of the clean-up must not make the caller
        // write them again (their requests would be queued twice).
        if let Err(err) = self.after_checkpoints(checkpoints) {
            tracing::warn!(%err, "cleaning up after a checkpoint failed; the batches it would have dropped go with a later checkpoint of their agent, or at the next start");
        }
        Ok(())
    }

    /// Flushes the database durably, then deletes the value segments freed before the flush
    /// (what a replica's state machine does when it builds a snapshot).
    pub(crate) async fn flush_and_free(&self) -> Result<(), StoreError> {
        let free = self.values.take_dead();
        if let Err(err) = self.db.flush_async().await {
            self.values.undelete(free);
            return Err(err.into());
        }
        self.values.delete(free);
        Ok(())
    }

    /// `value` of the entry of `tree` as a snapshot carries it: the batch or request itself
    /// where the tree holds a pointer to it (a pointer means nothing on another replica).
    pub(crate) fn snapshot_value(
        &self,
        tree: &[u8],
        value: sled::IVec,
    ) -> Result<sled::IVec, StoreError> {
        let holds_pointers = VALUE_TREES.iter().any(|name| tree == name.as_bytes());
        match Pointer::decode(&value) {
            Some(_) if holds_pointers => Ok(self.values.resolve(&value)?.as_ref().into()),
            _ => Ok(value),
        }
    }

    /// The first of `count` consecutive new outbox ids (one even for `count` 0). sled's ids
    /// are unique and rising (across restarts too); the outbox needs them only rising.
    fn outbox_ids(&self, count: usize) -> Result<u64, StoreError> {
        let _range = self.outbox_ids.lock().unwrap_or_else(|e| e.into_inner());
        let first = self.db.generate_id()?;
        for _ in 1..count {
            self.db.generate_id()?;
        }
        Ok(first)
    }

    /// Drops what written checkpoints made unneeded: change sets folded into the base, and
    /// the batches every shard is now past.
    fn after_checkpoints(&self, checkpoints: &[Checkpoint<'_>]) -> Result<(), StoreError> {
        for checkpoint in checkpoints.iter().filter(|c| !c.changes.is_empty()) {
            let mut log = self.connections.lock(checkpoint.shard);
            self.connections
                .compact_if_due(&self.db, checkpoint.shard, &mut log);
        }
        let moved: HashSet<&BootId> = checkpoints
            .iter()
            .flat_map(|c| c.positions.keys())
            .collect();
        for boot_id in moved {
            self.drop_applied_batches(boot_id)?;
        }
        Ok(())
    }

    /// Deletes the entries of `tree` (keyed by boot id first) whose boot id is no longer known.
    fn drop_entries_of_unknown_agents(&self, tree: &sled::Tree) -> Result<(), StoreError> {
        for key in tree.iter().keys() {
            let key = key?;
            let known = self
                .agents
                .contains_key(&key[..BOOT_ID_LEN.min(key.len())])?;
            if !known && let Some(removed) = tree.remove(key)? {
                self.values.release_stored(&removed);
            }
        }
        Ok(())
    }

    /// Deletes the batches of `boot_id` that every shard's checkpoint covers.
    fn drop_applied_batches(&self, boot_id: &BootId) -> Result<(), StoreError> {
        let mut shards = 0;
        let mut covered = u64::MAX;
        for entry in self.positions.scan_prefix(boot_id).values() {
            shards += 1;
            covered = covered.min(decode_u64(&entry?)?);
        }
        if shards < usize::from(SHARDS) {
            return Ok(()); // a shard has not checkpointed this agent yet
        }
        let applied = self
            .batches
            .range(batch_key(boot_id, 0)..=batch_key(boot_id, covered))
            .keys();
        for key in applied {
            if let Some(removed) = self.batches.remove(key?)? {
                self.values.release_stored(&removed);
            }
        }
        Ok(())
    }
}

impl SledStore {
    /// See [`Storage::retire_superseded`].
    fn retire(&self, kept: &HashSet<BootId>) -> Result<Retirement, StoreError> {
        let mut retirement = Retirement::default();
        let mut newest: Option<(Vec<u8>, sled::IVec)> = None;
        for entry in self.node_agents.iter() {
            let (key, boot_id) = entry?;
            let node = &key[..key.len().saturating_sub(8)];
            // Every entry but a node's last (newest) is superseded.
            if let Some((previous_key, previous)) = newest.take() {
                let same_node = &previous_key[..previous_key.len().saturating_sub(8)] == node;
                if same_node && self.retire_one(&previous_key, &previous, kept)? {
                    retirement.retired.push(boot_id_of(&previous)?);
                } else {
                    retirement.known += 1;
                }
            }
            newest = Some((key.to_vec(), boot_id));
        }
        retirement.known += usize::from(newest.is_some());
        // Positions written back by a checkpoint that raced an earlier retirement.
        self.drop_entries_of_unknown_agents(&self.positions)?;
        Ok(retirement)
    }

    /// Forgets one superseded boot id if it is not kept and every shard is past its last batch;
    /// whether it did.
    fn retire_one(
        &self,
        index_key: &[u8],
        boot_id: &[u8],
        kept: &HashSet<BootId>,
    ) -> Result<bool, StoreError> {
        let boot_id = boot_id_of(boot_id)?;
        if kept.contains(&boot_id) {
            return Ok(false);
        }
        let last = self.last_sequence(&boot_id)?;
        for shard in 0..SHARDS {
            let applied = match self.positions.get(position_key(&boot_id, shard))? {
                Some(bytes) => decode_u64(&bytes)?,
                None => 0,
            };
            if applied < last {
                return Ok(false);
            }
        }
        // Every shard is past them: its batches go with it (left behind, with its positions
        // gone, a recovery would apply them again).
        let batches = self
            .batches
            .range(batch_key(&boot_id, 0)..=batch_key(&boot_id, last))
            .keys()
            .collect::<Result<Vec<_>, _>>()?;
        let result: Result<Vec<sled::IVec>, TransactionError<StoreError>> = (
            &self.agents,
            &self.agent_nodes,
            &self.node_agents,
            &self.positions,
            &self.batches,
        )
            .transaction(|(agents, nodes, index, positions, log)| {
                let now = match agents.get(boot_id)? {
                    None => 0,
                    Some(bytes) => {
                        decode_u64(&bytes).map_err(ConflictableTransactionError::Abort)?
                    }
                };
                if now != last {
                    // A batch arrived since: not over after all.
                    return Err(ConflictableTransactionError::Abort(
                        StoreError::OutOfOrder {
                            sequence: now,
                            last,
                        },
                    ));
                }
                agents.remove(&boot_id[..])?;
                nodes.remove(&boot_id[..])?;
                index.remove(index_key)?;
                for shard in 0..SHARDS {
                    positions.remove(&position_key(&boot_id, shard)[..])?;
                }
                let mut removed = Vec::with_capacity(batches.len());
                for key in &batches {
                    removed.extend(log.remove(key)?);
                }
                Ok(removed)
            });
        match committed(result) {
            Ok(removed) => {
                for value in removed {
                    self.values.release_stored(&value);
                }
                Ok(true)
            }
            Err(StoreError::OutOfOrder { .. }) => Ok(false),
            Err(err) => Err(err),
        }
    }
}

/// The writes without their flush and with their ids given: what a replicated state machine
/// applies, in its log's order, on every replica. Each one, applied again with the same ids
/// after a crash, changes nothing more (outbox entries are keyed by their id and counted once,
/// an append of a sequence already there is refused, a bind keeps the first node).
impl SledStore {
    /// Writes `checkpoints` in one transaction, their requests with outbox ids `first_id`,
    /// `first_id + 1`, ... in order. Each shard at most once (its change log is locked
    /// throughout, in shard order).
    pub(crate) fn apply_checkpoints(
        &self,
        checkpoints: &[Checkpoint<'_>],
        first_id: u64,
    ) -> Result<(), StoreError> {
        Checkpoint::one_per_shard(checkpoints)?;
        let mut shards: Vec<ShardId> = checkpoints.iter().map(|c| c.shard).collect();
        shards.sort_unstable();
        let mut logs: HashMap<ShardId, _> = shards
            .iter()
            .map(|&shard| (shard, self.connections.lock(shard)))
            .collect();
        // (shard, key in the change tree, set)
        let change_sets: Vec<_> = checkpoints
            .iter()
            .filter(|checkpoint| !checkpoint.changes.is_empty())
            .map(|checkpoint| {
                let set = change_log::encode(
                    checkpoint
                        .changes
                        .iter()
                        .map(|c| (c.key.as_slice(), c.state.as_deref())),
                );
                let log = logs.get_mut(&checkpoint.shard).expect("locked above");
                let key = change_log::key(checkpoint.shard, log.take_number());
                (checkpoint.shard, key, set)
            })
            .collect();
        let requests = || checkpoints.iter().flat_map(|c| c.outbox);
        // The sets and the requests in the value log first (one sync for all): what sled
        // points to is durable.
        let mut set_pointers = self.values.append_all(
            change_sets
                .iter()
                .map(|(_, _, set)| set.as_slice())
                .chain(requests().map(Vec::as_slice)),
        )?;
        let pointers = set_pointers.split_off(change_sets.len());
        // Counted before the entries exist, so that the exporter removing one cannot take the
        // count below zero; taken back for entries that were there already (a replica applying
        // an entry again) and if the transaction fails.
        let outbox_bytes: u64 = requests().map(|r| r.len() as u64).sum();
        let outbox_count = requests().count() as u64;
        self.count_outbox(outbox_count, outbox_bytes);
        let result: Result<(u64, u64, Vec<sled::IVec>), TransactionError<StoreError>> =
            (self.connections.tree(), &self.positions, &self.outbox).transaction(
                |(connections, positions, outbox)| {
                    for ((_, key, _), pointer) in change_sets.iter().zip(&set_pointers) {
                        connections.insert(&key[..], &pointer.encode())?;
                    }
                    for checkpoint in checkpoints {
                        for (boot_id, sequence) in checkpoint.positions {
                            positions.insert(
                                &position_key(boot_id, checkpoint.shard)[..],
                                &sequence.to_be_bytes(),
                            )?;
                        }
                    }
                    let (mut present, mut present_bytes, mut replaced) = (0, 0, Vec::new());
                    for (id, pointer) in (first_id..).zip(&pointers) {
                        if let Some(was) = outbox.insert(&id.to_be_bytes(), &pointer.encode())? {
                            present += 1;
                            present_bytes += Pointer::value_len(&was);
                            replaced.push(was);
                        }
                    }
                    Ok((present, present_bytes, replaced))
                },
            );
        match committed(result) {
            Ok((present, present_bytes, replaced)) => {
                self.uncount_outbox(present, present_bytes);
                for was in replaced {
                    self.values.release_stored(&was);
                }
            }
            Err(err) => {
                self.uncount_outbox(outbox_count, outbox_bytes);
                self.values
                    .release_all(set_pointers.into_iter().chain(pointers));
                return Err(err);
            }
        }
        for (shard, _, set) in &change_sets {
            let log = logs.get_mut(shard).expect("locked above");
            log.written(set.len());
        }
        Ok(())
    }

    /// [`SledStore::apply_checkpoints`], then their clean-up (what a replica does once applied).
    pub(crate) fn apply_checkpoints_and_clean_up(
        &self,
        checkpoints: &[Checkpoint<'_>],
        first_id: u64,
    ) -> Result<(), StoreError> {
        self.apply_checkpoints(checkpoints, first_id)?;
        self.after_checkpoints(checkpoints)
    }

    /// Queues `request` as outbox entry `id`.
    pub(crate) fn apply_push(&self, id: u64, request: &[u8]) -> Result<(), StoreError> {
        self.insert_push(id, self.values.append(request)?)
    }

    /// Queues the request at `pointer` as outbox entry `id`.
    fn insert_push(&self, id: u64, pointer: Pointer) -> Result<(), StoreError> {
        // Counted first, as in `apply_checkpoint`.
        self.count_outbox(1, pointer.len());
        match self.outbox.insert(id.to_be_bytes(), &pointer.encode()) {
            Ok(None) => Ok(()),
            Ok(Some(was)) => {
                self.uncount_outbox(1, Pointer::value_len(&was));
                self.values.release_stored(&was);
                Ok(())
            }
            Err(err) => {
                self.uncount_outbox(1, pointer.len());
                self.values.release(pointer);
                Err(err.into())
            }
        }
    }

    /// Removes outbox entry `id`, if it is there.
    pub(crate) fn apply_remove(&self, id: u64) -> Result<(), StoreError> {
        if let Some(removed) = self.outbox.remove(id.to_be_bytes())? {
            self.uncount_outbox(1, Pointer::value_len(&removed));
            self.values.release_stored(&removed);
        }
        Ok(())
    }

    fn count_outbox(&self, requests: u64, bytes: u64) {
        self.outbox_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.outbox_count.fetch_add(requests, Ordering::Relaxed);
    }

    fn uncount_outbox(&self, requests: u64, bytes: u64) {
        self.outbox_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.outbox_count.fetch_sub(requests, Ordering::Relaxed);
    }

    /// Appends `batch` to the log of `boot_id` if it is the next one after `last`.
    pub(crate) fn apply_append(
        &self,
        boot_id: &BootId,
        sequence: u64,
        encoded: &[u8],
        not_durable_from: Option<u64>,
    ) -> Result<(), StoreError> {
        let pointer = self.values.append(encoded)?;
        self.insert_append(boot_id, sequence, pointer, not_durable_from)
    }

    /// [`SledStore::apply_append`] of a batch already in the value log, at `pointer`.
    fn insert_append(
        &self,
        boot_id: &BootId,
        sequence: u64,
        pointer: Pointer,
        not_durable_from: Option<u64>,
    ) -> Result<(), StoreError> {
        let result = (&self.agents, &self.batches).transaction(|(agents, batches)| {
            let stored = match agents.get(boot_id)? {
                None => 0,
                Some(bytes) => decode_u64(&bytes).map_err(ConflictableTransactionError::Abort)?,
            };
            // A batch whose write failed is there in memory but was never acknowledged: the
            // agent sends it again, and it is written again.
            let last = not_durable_from.map_or(stored, |from| stored.min(from - 1));
            if sequence != last + 1 {
                return Err(ConflictableTransactionError::Abort(
                    StoreError::OutOfOrder { sequence, last },
                ));
            }
            agents.insert(&boot_id[..], &sequence.to_be_bytes())?;
            Ok(batches.insert(batch_key(boot_id, sequence).as_slice(), &pointer.encode())?)
        });
        match committed(result) {
            Ok(replaced) => {
                if let Some(was) = replaced {
                    self.values.release_stored(&was);
                }
                Ok(())
            }
            Err(err) => {
                self.values.release(pointer);
                Err(err)
            }
        }
    }

    /// Ties `boot_id` to `node` as the node's agent process of bind order `order`, if it is new;
    /// the node it was tied to before, if any.
    pub(crate) fn apply_bind(
        &self,
        boot_id: &BootId,
        node: &str,
        order: u64,
    ) -> Result<Option<String>, StoreError> {
        let result = (&self.agent_nodes, &self.node_agents).transaction(|(nodes, index)| {
            if let Some(bound) = nodes.get(boot_id)? {
                return Ok(Some(String::from_utf8_lossy(&bound).into_owned()));
            }
            nodes.insert(&boot_id[..], node.as_bytes())?;
            index.insert(node_agent_key(node, order), &boot_id[..])?;
            Ok(None)
        });
        committed(result)
    }

    /// Forgets superseded boot ids (see [`Storage::retire_superseded`]).
    pub(crate) fn apply_retire(&self, kept: &HashSet<BootId>) -> Result<Retirement, StoreError> {
        self.retire(kept)
    }
}

fn boot_id_of(bytes: &[u8]) -> Result<BootId, StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("boot id of {} bytes", bytes.len())))
}

/// A transaction's outcome as a store result.
fn committed<T>(result: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    match result {
        Ok(value) => Ok(value),
        Err(TransactionError::Abort(err)) => Err(err),
        Err(TransactionError::Storage(err)) => Err(err.into()),
    }
}

fn batch_key(boot_id: &BootId, sequence: u64) -> [u8; BOOT_ID_LEN + 8] {
    let mut key = [0; BOOT_ID_LEN + 8];
    key[..BOOT_ID_LEN].copy_from_slice(boot_id);
    key[BOOT_ID_LEN..].copy_from_slice(&sequence.to_be_bytes());
    key
}

fn position_key(boot_id: &BootId, shard: ShardId) -> [u8; BOOT_ID_LEN + 2] {
    let mut key = [0; BOOT_ID_LEN + 2];
    key[..BOOT_ID_LEN].copy_from_slice(boot_id);
    key[BOOT_ID_LEN..].copy_from_slice(&shard.to_be_bytes());
    key
}

/// A node's agent processes in bind order: the node's name, length first (a prefix of no other
/// node's keys), then the order.
fn node_agent_key(node: &str, order: u64) -> Vec<u8> {
    let mut key = node_prefix(node);
    key.extend_from_slice(&order.to_be_bytes());
    key
}

fn node_prefix(node: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + node.len() + 8);
    key.extend_from_slice(&(node.len() as u32).to_be_bytes());
    key.extend_from_slice(node.as_bytes());
    key
}

/// The first `max` entries of an outbox scan, with their ids.
fn outbox_entries(
    scan: sled::Iter,
    max: usize,
    values: &ValueLog,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    scan.take(max)
        .map(|entry| {
            let (key, value) = entry?;
            Ok((decode_u64(&key)?, values.resolve(&value)?.into_owned()))
        })
        .collect()
}

/// The batch `stored` holds or points to.
fn decode_batch(stored: &[u8], values: &ValueLog) -> Result<BatchBytes, StoreError> {
    BatchBytes::new(values.resolve(stored)?.into_owned().into())
        .map_err(|e| StoreError::Corrupt(format!("stored batch: {e}")))
}

fn decode_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt(format!("sequence of {} bytes", bytes.len())))
}

impl SledStore {
    /// Makes `batch` durable as the next batch of `boot_id` (its sequence must be the last + 1).
    async fn append_batch(&self, boot_id: &BootId, batch: &BatchBytes) -> Result<(), StoreError> {
        let sequence = batch.sequence();
        // Not the next one (an agent sending again what is stored): refused before it is written.
        let last = self.last_sequence(boot_id)?;
        if sequence != last + 1 {
            return Err(StoreError::OutOfOrder { sequence, last });
        }
        let pointer = match self.append_value(batch.bytes().clone()).await {
            Ok(pointer) => pointer,
            Err(err) => return self.observe_write(Err(err)),
        };
        // Marked before the agents tree says `sequence`: a Welcome meanwhile (the agent's new
        // stream superseding this one) must not report it durable before its flush returned.
        let mut appending = Appending::start(self, boot_id, sequence);
        let result = self.insert_append(boot_id, sequence, pointer, self.not_durable_from(boot_id));
        let written = match result {
            Ok(()) => self
                .group_commit
                .flush(&self.db)
                .await
                .map(drop)
                .map_err(Into::into),
            Err(err @ StoreError::OutOfOrder { .. }) => {
                appending.settled = true; // nothing written
                return Err(err);
            }
            // sled may fail a commit after applying it in memory.
            Err(err) => Err(err),
        };
        appending.settled = true;
        let mut pending = self.not_durable.lock().unwrap_or_else(|e| e.into_inner());
        match &written {
            Ok(()) => {
                pending.remove(boot_id);
            }
            Err(_) => {
                pending.entry(*boot_id).or_insert(sequence);
            }
        }
        drop(pending);
        self.observe_write(written)
    }

    /// Writes `value` to the value log on the blocking pool (a `pwrite` and an `fdatasync`). If
    /// the caller is gone by the time it is written (its stream superseded), the value is
    /// released there, so that its segment does not stay pinned until a restart.
    async fn append_value(&self, value: Bytes) -> Result<Pointer, StoreError> {
        let values = self.values.clone();
        let (written, pointer) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            if let Err(Ok(unwanted)) = written.send(values.append(&value)) {
                values.release(unwanted);
            }
        });
        pointer.await.map_err(|_| {
            StoreError::Backend("value log: the write ended before it answered".into())
        })?
    }

    /// The first sequence of `boot_id` not durable: its write failed (in memory only), or it is
    /// being appended.
    fn not_durable_yet(&self, boot_id: &BootId) -> Option<u64> {
        let appending = self
            .appending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(boot_id)
            .copied();
        match (self.not_durable_from(boot_id), appending) {
            (Some(failed), Some(under_way)) => Some(failed.min(under_way)),
            (failed, under_way) => failed.or(under_way),
        }
    }

    /// The first sequence of `boot_id` whose write failed (in memory, not durable), if any.
    fn not_durable_from(&self, boot_id: &BootId) -> Option<u64> {
        self.not_durable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(boot_id)
            .copied()
    }

    /// Queues an encoded export request durably; returns its outbox id.
    async fn push_request(&self, request: &[u8]) -> Result<u64, StoreError> {
        let id = self.outbox_ids(1)?;
        let pushed = match self.append_value(Bytes::copy_from_slice(request)).await {
            Ok(pointer) => self.insert_push(id, pointer),
            Err(err) => Err(err),
        };
        if let Err(err) = pushed {
            return self.observe_write(Err(err));
        }
        if let Err(err) = self.group_commit.flush(&self.db).await {
            // Not durable: not queued either (the caller keeps the request).
            let _ = self.apply_remove(id);
            return self.observe_write(Err(err.into()));
        }
        Ok(id)
    }

    /// Removes a delivered (or permanently rejected) request; durable with the next durable
    /// write (see [`Storage::outbox_remove`]).
    fn remove_request(&self, id: u64) -> Result<(), StoreError> {
        // A removal in memory says nothing of whether the disk takes writes: only its failure
        // is noted.
        self.apply_remove(id)
            .or_else(|err| self.observe_write(Err(err)))
    }

    /// Every stored batch, in (boot id, sequence) order: what start-up replays.
    pub(crate) fn stored_batches(
        &self,
    ) -> impl Iterator<Item = Result<(BootId, BatchBytes), StoreError>> + 'static {
        let values = self.values.clone();
        self.batches.iter().map(move |entry| {
            let (key, value) = entry?;
            let boot_id: BootId = key[..BOOT_ID_LEN]
                .try_into()
                .map_err(|_| StoreError::Corrupt("short batch key".into()))?;
            Ok((boot_id, decode_batch(&value, &values)?))
        })
    }
}

/// A batch's append under way (see `SledStore::appending`). Dropped unsettled — the append's
/// future dropped mid-flush, a superseded stream's session ended — it leaves the batch marked
/// not durable, as a failed flush does: the agent is told to send it again, and it is written
/// again.
struct Appending<'a> {
    store: &'a SledStore,
    boot_id: BootId,
    sequence: u64,
    settled: bool,
    /// Whether this append made the mark (another one of the same agent may hold it: a stream
    /// superseding one whose append is under way tries the same sequence, and is refused).
    marked: bool,
}

impl<'a> Appending<'a> {
    fn start(store: &'a SledStore, boot_id: &BootId, sequence: u64) -> Self {
        let mut appending = lock_map(&store.appending);
        let marked = !appending.contains_key(boot_id);
        if marked {
            appending.insert(*boot_id, sequence);
        }
        Appending {
            store,
            boot_id: *boot_id,
            sequence,
            settled: false,
            marked,
        }
    }
}

impl Drop for Appending<'_> {
    fn drop(&mut self) {
        if !self.settled {
            lock_map(&self.store.not_durable)
                .entry(self.boot_id)
                .or_insert(self.sequence);
        }
        if self.marked {
            lock_map(&self.store.appending).remove(&self.boot_id);
        }
    }
}

fn lock_map(
    map: &std::sync::Mutex<HashMap<BootId, u64>>,
) -> std::sync::MutexGuard<'_, HashMap<BootId, u64>> {
    map.lock().unwrap_or_else(|e| e.into_inner())
}

impl Storage for SledStore {
    /// Highest durable sequence of `boot_id`; 0 if none.
    fn last_sequence(&self, boot_id: &BootId) -> Result<u64, StoreError> {
        let stored = match self.agents.get(boot_id)? {
            None => 0,
            Some(bytes) => decode_u64(&bytes)?,
        };
        Ok(self
            .not_durable_yet(boot_id)
            .map_or(stored, |from| stored.min(from - 1)))
    }

    /// Ties `boot_id` to `node` if it is new; returns the node it was tied to before, if any.
    /// Not flushed: the agent's first append makes it durable.
    fn bind_agent<'a>(
        &'a self,
        boot_id: &'a BootId,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let bound = (|| {
            if let Some(bound) = self.agent_nodes.get(boot_id)? {
                return Ok(Some(String::from_utf8_lossy(&bound).into_owned()));
            }
            let order = self.db.generate_id()?;
            self.apply_bind(boot_id, node, order)
        })();
        futures_util::future::ready(bound).boxed()
    }

    /// Not noted for [`Storage::write_failure`]: removals that succeed say nothing of whether
    /// the disk can take batches.
    fn retire_superseded(&self, kept: &HashSet<BootId>) -> Result<Retirement, StoreError> {
        self.retire(kept)
    }

    /// One stored batch, if the log still holds it.
    fn batch(&self, boot_id: &BootId, sequence: u64) -> Result<Option<BatchBytes>, StoreError> {
        self.batches
            .get(batch_key(boot_id, sequence))?
            .map(|value| decode_batch(&value, &self.values))
            .transpose()
    }

    /// Writes a shard's checkpoint atomically and durably, then drops the batches every shard
    /// is past. Blocking: it runs on the checkpoint writer's thread. `positions` holds only the agents
    /// whose position moved since the shard's last checkpoint.
    fn checkpoint(&self, checkpoints: &[Checkpoint<'_>]) -> Result<(), StoreError> {
        if self.write_failure().is_some() {
            // The disk refused a write. sled keeps its first I/O error for good, so it is
            // written only with room: room for a batch, or the value log's reserve given back
            // (once) for this checkpoint, whose flush makes removals durable and deletes the
            // segments they freed. Without either nothing is written (nor any space taken)
            // until there is room.
            if !self.values.has_room() && !self.values.release_reserve() {
                return Err(StoreError::Backend(
                    "no room on the data filesystem: nothing is written until there is".into(),
                ));
            }
            let writes_values = checkpoints
                .iter()
                .any(|c| !c.changes.is_empty() || !c.outbox.is_empty());
            if !writes_values && let Err(err) = self.values.probe() {
                // A write that puts nothing in the value log first (which would take a
                // failing device's refusal) goes to sled only once a page written there shows
                // it takes writes again.
                return self.observe_write(Err(err));
            }
        }
        let result = self.write_checkpoints(checkpoints);
        let result = self.observe_write(result);
        if self.write_failure().is_none() {
            // A reserve a full disk took is put back once there is room: here, on the
            // checkpoint writer's thread (one atomic load while it is in place).
            self.values.keep_reserve();
        }
        result
    }

    /// The last checkpoint: agent positions and connection states.
    fn recover(&self) -> Result<Recovered, StoreError> {
        let mut positions = HashMap::new();
        for entry in self.positions.iter() {
            let (key, value) = entry?;
            let corrupt = || StoreError::Corrupt("position key".into());
            let (boot_id, shard) = key.split_at_checked(BOOT_ID_LEN).ok_or_else(corrupt)?;
            let boot_id: BootId = boot_id.try_into().map_err(|_| corrupt())?;
            let shard = ShardId::from_be_bytes(shard.try_into().map_err(|_| corrupt())?);
            positions.insert((shard, boot_id), decode_u64(&value)?);
        }
        Ok(Recovered {
            positions,
            connections: self.connections.replay()?,
        })
    }

    /// Up to `max` queued requests, oldest first.
    fn outbox_oldest(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        outbox_entries(self.outbox.iter(), max, &self.values)
    }

    fn outbox_after(&self, after: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        outbox_entries(
            self.outbox.range(after.saturating_add(1).to_be_bytes()..),
            max,
            &self.values,
        )
    }

    /// Requests waiting in the outbox (kept as it changes: O(1)).
    fn outbox_len(&self) -> usize {
        self.outbox_count.load(Ordering::Relaxed) as usize
    }

    /// Bytes of the requests waiting in the outbox.
    fn outbox_bytes(&self) -> u64 {
        self.outbox_bytes.load(Ordering::Relaxed)
    }

    /// Why the last write failed, while no write has succeeded since with room for a batch (a
    /// full or failing disk).
    fn write_failure(&self) -> Option<String> {
        self.write_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn broken(&self) -> Option<String> {
        self.broken.get().cloned()
    }

    fn append<'a>(
        &'a self,
        boot_id: &'a BootId,
        batch: &'a BatchBytes,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.append_batch(boot_id, batch).boxed()
    }

    fn batches(&self) -> Box<dyn Iterator<Item = Result<(BootId, BatchBytes), StoreError>> + '_> {
        Box::new(self.stored_batches())
    }

    fn outbox_push<'a>(&'a self, request: &'a [u8]) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.push_request(request).boxed()
    }

    fn outbox_remove(&self, id: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        futures_util::future::ready(self.remove_request(id)).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value whose append's caller went away before the write answered (a superseded
    /// stream) is released once written: its segment is not pinned until a restart.
    #[test]
    fn a_value_whose_append_was_dropped_is_released() {
        use futures_util::FutureExt as _;
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open_concrete(dir.path()).unwrap();
        let before = store.values.live_values();
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let dropping = runtime();
        dropping.block_on(async {
            // Polled once (the write starts on the blocking pool), then dropped.
            let appending = store.append_value(Bytes::from(vec![1; 4000]));
            assert!(
                appending.now_or_never().is_none(),
                "answered before it was written"
            );
        });
        drop(dropping); // waits for the write on its blocking pool
        assert_eq!(store.values.live_values(), before);
        // One that is awaited stays live.
        runtime()
            .block_on(store.append_value(Bytes::from(vec![2; 4000])))
            .unwrap();
        assert_eq!(store.values.live_values(), before + 1);
    }

    /// What a Welcome reads while a batch's append is under way, and after its future was
    /// dropped mid-flush (the agent's stream superseded): not durable, so the agent sends it
    /// again, and then it is written again and durable.
    #[tokio::test]
    async fn a_batch_is_not_reported_durable_before_its_flush_returned() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open_concrete(dir.path()).unwrap();
        let agent = [7; BOOT_ID_LEN];
        store.bind_agent(&agent, "node-a").await.unwrap();
        store.append_batch(&agent, &batch(1)).await.unwrap();
        let under_way = Appending::start(&store, &agent, 2);
        let pointer = store.values.append(batch(2).bytes()).unwrap();
        store.insert_append(&agent, 2, pointer, None).unwrap();
        assert_eq!(
            store.agents.get(agent).unwrap().map(|v| v.to_vec()),
            Some(2u64.to_be_bytes().to_vec())
        );
        assert_eq!(
            store.last_sequence(&agent).unwrap(),
            1,
            "written, not flushed"
        );
        drop(under_way);
        assert_eq!(store.last_sequence(&agent).unwrap(), 1, "dropped mid-flush");
        store.append_batch(&agent, &batch(2)).await.unwrap();
        assert_eq!(store.last_sequence(&agent).unwrap(), 2);
        // A settled append leaves no mark.
        store.append_batch(&agent, &batch(3)).await.unwrap();
        assert_eq!(store.last_sequence(&agent).unwrap(), 3);
        assert!(lock_map(&store.appending).is_empty());
        assert!(lock_map(&store.not_durable).is_empty());
    }

    fn batch(sequence: u64) -> BatchBytes {
        BatchBytes::encode(&mermin_protocol::agent::v1::Batch {
            sequence,
            records: vec![mermin_protocol::flow::v1::FlowRecord::default()],
        })
    }

    fn batch_ids(store: &SledStore) -> Vec<(u8, u64)> {
        store
            .stored_batches()
            .map(|b| {
                let (id, batch) = b.unwrap();
                (id[0], batch.sequence())
            })
            .collect()
    }

    /// The interleaving a CI run found: a retirement between a checkpoint's write of the last
    /// shard's position and its clean-up of the batches that made possible. The batches must
    /// go with the boot id, or a recovery (every position gone) would apply them again.
    #[tokio::test]
    async fn a_retired_boot_id_takes_its_batches_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (old, newest) = ([1; BOOT_ID_LEN], [2; BOOT_ID_LEN]);
        {
            let store = SledStore::open_concrete(dir.path()).unwrap();
            for id in [old, newest] {
                store.bind_agent(&id, "node-a").await.unwrap();
                store.append_batch(&id, &batch(1)).await.unwrap();
            }
            // Every shard's position written, the clean-up not yet run.
            for shard in 0..SHARDS {
                let key = position_key(&old, shard);
                store.positions.insert(key, &1u64.to_be_bytes()).unwrap();
            }
            let retirement = store.retire(&HashSet::new()).unwrap();
            assert_eq!(retirement.retired, [old]);
            assert_eq!(batch_ids(&store), [(2, 1)], "old's batch went with it");
            // A store written before retirements did this: an unknown boot id's batch.
            store
                .batches
                .insert(batch_key(&old, 2), batch(2).bytes().to_vec())
                .unwrap();
            store.db.flush().unwrap();
        }
        let store = SledStore::open_concrete(dir.path()).unwrap();
        assert_eq!(batch_ids(&store), [(2, 1)], "dropped at open");
    }

    /// What a CI run found: a disk full but for a little space (here the value log's reserve,
    /// given back; in CI sled freed some, or a page the log already held) takes a small change
    /// set, so its checkpoint went through — and made the store look writable (ready) though no
    /// batch could be stored. And the reserve: a full disk still takes one checkpoint (its
    /// flush deletes the segments freed), then nothing until there is room.
    #[tokio::test]
    async fn on_a_full_disk_checkpoints_go_on_but_only_room_for_a_batch_clears_the_failure() {
        use mermin_test_support::tmpfs::{Tmpfs, fill};
        let Some(disk) = Tmpfs::mount("8m") else {
            eprintln!("skipped: cannot mount a tmpfs (needs root)");
            return;
        };
        let store = SledStore::open_concrete(&disk.mountpoint.join("data")).unwrap();
        let id = [1; BOOT_ID_LEN];
        store.bind_agent(&id, "node-a").await.unwrap();
        store.append_batch(&id, &batch(1)).await.unwrap();
        let filler = disk.mountpoint.join("filler");
        assert!(fill(&filler, 8 << 20) > 0);
        let large = BatchBytes::encode(&mermin_protocol::agent::v1::Batch {
            sequence: 2,
            records: vec![mermin_protocol::flow::v1::FlowRecord {
                node_name: "n".repeat(100_000),
                ..Default::default()
            }],
        });
        let refused = store.append_batch(&id, &large).await.unwrap_err();
        assert_eq!(
            refused.to_string(),
            "store: value log: writing a value: No space left on device (os error 28)"
        );
        assert_eq!(store.write_failure(), Some(refused.to_string()));
        let changes = [crate::store::Change {
            key: vec![1],
            state: Some(vec![10, 11]),
        }];
        let positions = HashMap::new();
        let small = Checkpoint {
            shard: 0,
            positions: &positions,
            changes: &changes,
            outbox: &[],
        };
        // Written, on the reserve given back, and flushed...
        assert!(store.values.reserve_path().exists());
        store.checkpoint(&[small]).unwrap();
        assert!(!store.values.reserve_path().exists(), "given back");
        assert_eq!(
            store.write_failure(),
            Some(refused.to_string()),
            "written, but a batch would not be"
        );
        // ...and then nothing, not even a probe, until there is room.
        let waiting = store.checkpoint(&[]).unwrap_err();
        assert_eq!(
            waiting.to_string(),
            "store: no room on the data filesystem: nothing is written until there is"
        );
        assert_eq!(store.write_failure(), Some(refused.to_string()));
        std::fs::remove_file(&filler).unwrap();
        store.checkpoint(&[]).unwrap();
        assert_eq!(store.write_failure(), None);
        assert!(store.values.reserve_path().exists(), "held back again");
        store.append_batch(&id, &large).await.unwrap();
        assert_eq!(batch_ids(&store), [(1, 1), (1, 2)]);
    }
}
