//! The aggregator's durable log of agent batches, in sled, behind a small interface.
//!
//! What it owns: for every agent boot id, the highest sequence made durable, and the batches
//! themselves (prost-encoded, keyed by boot id ‖ big-endian sequence so that a scan returns them in
//! order). A batch and its agent's new high-water mark are written in one transaction and flushed
//! before [`Store::append`] returns — that is the moment an agent may be acknowledged.
//!
//! It also owns the flow shards' checkpoints and the export outbox. [`Store::checkpoint`] writes,
//! for one shard and in one transaction: the connections the shard changed, the shard's position
//! (boot id → last applied sequence) in every agent's batches, and the export requests the shard
//! emitted since its last checkpoint. After a crash, each shard's checkpoint plus the batches after
//! its positions rebuild exactly the table that produced the outbox — nothing acknowledged is lost
//! and nothing is emitted twice. A batch that every shard has checkpointed past is no longer
//! needed and is deleted.
//!
//! sled 0.34 is the last stable release and is known for disk growth; it stays behind this
//! interface so that it can be replaced (the replication issue moves the log under openraft).
//! Truncating batches whose flows have been exported comes with the flow-table checkpoint.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use mermin_protocol::agent::v1::Batch;

use crate::{
    flow_table::Change,
    shard::{SHARDS, ShardId},
};
use prost::Message;
use sled::{
    Transactional,
    transaction::{ConflictableTransactionError, TransactionError},
};

/// Length of an agent boot id.
pub const BOOT_ID_LEN: usize = 16;
pub type BootId = [u8; BOOT_ID_LEN];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: batch {sequence} of this agent is not the next one (last durable: {last})")]
    OutOfOrder { sequence: u64, last: u64 },
    #[error("store: corrupt entry: {0}")]
    Corrupt(String),
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    agents: sled::Tree,
    /// Boot id → the node name its first Hello gave (an agent process belongs to one node).
    agent_nodes: sled::Tree,
    batches: sled::Tree,
    outbox: sled::Tree,
    connections: sled::Tree,
    positions: sled::Tree,
    /// Sum of the outbox's request sizes (what its quota limits), and their number: kept as
    /// the outbox changes, never counted by a scan.
    outbox_bytes: Arc<AtomicU64>,
    outbox_count: Arc<AtomicU64>,
    /// Why the last write failed, until a write succeeds (for `/readyz`).
    write_failure: Arc<std::sync::Mutex<Option<String>>>,
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

/// What a restart finds.
pub struct Recovered {
    /// Per shard: how far it had applied each agent's batches.
    pub positions: HashMap<(ShardId, BootId), u64>,
    /// Serialized connection states.
    pub connections: Vec<Vec<u8>>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let outbox = db.open_tree("outbox")?;
        let (mut outbox_bytes, mut outbox_count) = (0, 0);
        for value in outbox.iter().values() {
            outbox_bytes += value?.len() as u64;
            outbox_count += 1;
        }
        Ok(Self {
            agents: db.open_tree("agents")?,
            agent_nodes: db.open_tree("agent_nodes")?,
            batches: db.open_tree("batches")?,
            outbox,
            outbox_bytes: Arc::new(AtomicU64::new(outbox_bytes)),
            outbox_count: Arc::new(AtomicU64::new(outbox_count)),
            write_failure: Arc::default(),
            connections: db.open_tree("connections")?,
            positions: db.open_tree("positions")?,
            db,
        })
    }

    /// Highest durable sequence of `boot_id`; 0 if none.
    pub fn last_sequence(&self, boot_id: &BootId) -> Result<u64, StoreError> {
        match self.agents.get(boot_id)? {
            None => Ok(0),
            Some(bytes) => decode_u64(&bytes),
        }
    }

    /// Ties `boot_id` to `node` if it is new; returns the node it was tied to before, if any.
    pub fn bind_agent(&self, boot_id: &BootId, node: &str) -> Result<Option<String>, StoreError> {
        let before =
            self.agent_nodes
                .compare_and_swap(boot_id, None::<&[u8]>, Some(node.as_bytes()))?;
        Ok(before
            .err()
            .and_then(|conflict| conflict.current)
            .map(|node| String::from_utf8_lossy(&node).into_owned()))
    }

    /// Makes `batch` durable as the next batch of `boot_id` (its sequence must be the last + 1).
    pub async fn append(&self, boot_id: &BootId, batch: &Batch) -> Result<(), StoreError> {
        let encoded = batch.encode_to_vec();
        let sequence = batch.sequence;
        let result = (&self.agents, &self.batches).transaction(|(agents, batches)| {
            let last = match agents.get(boot_id)? {
                None => 0,
                Some(bytes) => decode_u64(&bytes).map_err(ConflictableTransactionError::Abort)?,
            };
            if sequence != last + 1 {
                return Err(ConflictableTransactionError::Abort(
                    StoreError::OutOfOrder { sequence, last },
                ));
            }
            agents.insert(&boot_id[..], &sequence.to_be_bytes())?;
            batches.insert(batch_key(boot_id, sequence).as_slice(), encoded.as_slice())?;
            Ok(())
        });
        self.observe_write(committed(result))?;
        self.observe_write(self.db.flush_async().await.map(drop).map_err(Into::into))
    }

    /// Notes the outcome of a write for [`Store::write_failure`]; passes it on.
    fn observe_write<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        let mut failure = self.write_failure.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) => *failure = None,
            // Ordering conflicts are the caller's mistake, not the disk's.
            Err(StoreError::OutOfOrder { .. }) => {}
            Err(err) => *failure = Some(err.to_string()),
        }
        result
    }

    /// Why the last write failed, while no write has succeeded since (a full or failing disk).
    pub fn write_failure(&self) -> Option<String> {
        self.write_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One stored batch, if the log still holds it.
    pub fn batch(&self, boot_id: &BootId, sequence: u64) -> Result<Option<Batch>, StoreError> {
        self.batches
            .get(batch_key(boot_id, sequence))?
            .map(|value| {
                Batch::decode(value.as_ref()).map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .transpose()
    }

    /// Every stored batch, in (boot id, sequence) order: what start-up replays.
    pub fn batches(&self) -> impl Iterator<Item = Result<(BootId, Batch), StoreError>> + '_ {
        self.batches.iter().map(|entry| {
            let (key, value) = entry?;
            let boot_id: BootId = key[..BOOT_ID_LEN]
                .try_into()
                .map_err(|_| StoreError::Corrupt("short batch key".into()))?;
            let batch =
                Batch::decode(value.as_ref()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok((boot_id, batch))
        })
    }
}

impl Store {
    /// Writes a shard's checkpoint atomically and durably, then drops the batches every shard
    /// is past. Blocking: callers run it on the blocking pool. `positions` holds only the agents
    /// whose position moved since the shard's last checkpoint.
    pub fn checkpoint(&self, checkpoint: Checkpoint<'_>) -> Result<(), StoreError> {
        let result = self.write_checkpoint(checkpoint);
        self.observe_write(result)
    }

    fn write_checkpoint(&self, checkpoint: Checkpoint<'_>) -> Result<(), StoreError> {
        let ids = checkpoint
            .outbox
            .iter()
            .map(|_| self.db.generate_id())
            .collect::<Result<Vec<u64>, _>>()?;
        // Counted before the entries exist, so that the exporter removing one cannot take the
        // count below zero; taken back if the transaction fails.
        let outbox_bytes: u64 = checkpoint.outbox.iter().map(|r| r.len() as u64).sum();
        let outbox_count = checkpoint.outbox.len() as u64;
        self.outbox_bytes.fetch_add(outbox_bytes, Ordering::Relaxed);
        self.outbox_count.fetch_add(outbox_count, Ordering::Relaxed);
        let result: Result<(), TransactionError<StoreError>> =
            (&self.connections, &self.positions, &self.outbox).transaction(
                |(connections, positions, outbox)| {
                    for change in checkpoint.changes {
                        match &change.state {
                            Some(state) => {
                                connections.insert(change.key.as_slice(), state.as_slice())?
                            }
                            None => connections.remove(change.key.as_slice())?,
                        };
                    }
                    for (boot_id, sequence) in checkpoint.positions {
                        positions.insert(
                            &position_key(boot_id, checkpoint.shard)[..],
                            &sequence.to_be_bytes(),
                        )?;
                    }
                    for (id, request) in ids.iter().zip(checkpoint.outbox) {
                        outbox.insert(&id.to_be_bytes(), request.as_slice())?;
                    }
                    Ok(())
                },
            );
        if let Err(err) = committed(result) {
            self.outbox_bytes.fetch_sub(outbox_bytes, Ordering::Relaxed);
            self.outbox_count.fetch_sub(outbox_count, Ordering::Relaxed);
            return Err(err);
        }
        self.db.flush()?;
        for boot_id in checkpoint.positions.keys() {
            self.drop_applied_batches(boot_id)?;
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
            self.batches.remove(key?)?;
        }
        Ok(())
    }

    /// The last checkpoint: agent positions and connection states.
    pub fn recover(&self) -> Result<Recovered, StoreError> {
        let mut positions = HashMap::new();
        for entry in self.positions.iter() {
            let (key, value) = entry?;
            let corrupt = || StoreError::Corrupt("position key".into());
            let (boot_id, shard) = key.split_at_checked(BOOT_ID_LEN).ok_or_else(corrupt)?;
            let boot_id: BootId = boot_id.try_into().map_err(|_| corrupt())?;
            let shard = ShardId::from_be_bytes(shard.try_into().map_err(|_| corrupt())?);
            positions.insert((shard, boot_id), decode_u64(&value)?);
        }
        let connections = self
            .connections
            .iter()
            .values()
            .map(|v| Ok(v?.to_vec()))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Recovered {
            positions,
            connections,
        })
    }

    /// Queues an encoded export request durably; returns its outbox id.
    pub async fn outbox_push(&self, request: &[u8]) -> Result<u64, StoreError> {
        let id = self.db.generate_id()?;
        self.outbox_bytes
            .fetch_add(request.len() as u64, Ordering::Relaxed);
        self.outbox_count.fetch_add(1, Ordering::Relaxed);
        if let Err(err) = self.outbox.insert(id.to_be_bytes(), request) {
            self.outbox_bytes
                .fetch_sub(request.len() as u64, Ordering::Relaxed);
            self.outbox_count.fetch_sub(1, Ordering::Relaxed);
            return self.observe_write(Err(err.into()));
        }
        self.observe_write(self.db.flush_async().await.map(drop).map_err(Into::into))?;
        Ok(id)
    }

    /// Up to `max` queued requests, oldest first.
    pub fn outbox_oldest(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.outbox
            .iter()
            .take(max)
            .map(|entry| {
                let (key, value) = entry?;
                Ok((decode_u64(&key)?, value.to_vec()))
            })
            .collect()
    }

    /// Removes a delivered (or permanently rejected) request.
    pub async fn outbox_remove(&self, id: u64) -> Result<(), StoreError> {
        if let Some(removed) =
            self.observe_write(self.outbox.remove(id.to_be_bytes()).map_err(Into::into))?
        {
            self.outbox_bytes
                .fetch_sub(removed.len() as u64, Ordering::Relaxed);
            self.outbox_count.fetch_sub(1, Ordering::Relaxed);
        }
        self.observe_write(self.db.flush_async().await.map(drop).map_err(Into::into))
    }

    /// Requests waiting in the outbox (kept as it changes: O(1)).
    pub fn outbox_len(&self) -> usize {
        self.outbox_count.load(Ordering::Relaxed) as usize
    }

    /// Bytes of the requests waiting in the outbox.
    pub fn outbox_bytes(&self) -> u64 {
        self.outbox_bytes.load(Ordering::Relaxed)
    }
}

/// A transaction's outcome as a store result.
fn committed(result: Result<(), TransactionError<StoreError>>) -> Result<(), StoreError> {
    match result {
        Ok(()) => Ok(()),
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

fn decode_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt(format!("sequence of {} bytes", bytes.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store again once the previous handle's background threads let go of sled's
    /// lock (they outlive the handle briefly); bounded.
    fn reopen(path: &Path) -> Store {
        for _ in 0..100 {
            match Store::open(path) {
                Ok(store) => return store,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        Store::open(path).unwrap()
    }

    fn batch(sequence: u64) -> Batch {
        Batch {
            sequence,
            records: vec![mermin_protocol::flow::v1::FlowRecord {
                delta_packets: sequence,
                ..Default::default()
            }],
        }
    }

    #[tokio::test]
    async fn batches_survive_reopening_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = [1; BOOT_ID_LEN];
        let b = [2; BOOT_ID_LEN];
        {
            let store = Store::open(dir.path()).unwrap();
            store.append(&b, &batch(1)).await.unwrap();
            store.append(&a, &batch(1)).await.unwrap();
            store.append(&a, &batch(2)).await.unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(store.last_sequence(&a).unwrap(), 2);
        assert_eq!(store.last_sequence(&b).unwrap(), 1);
        assert_eq!(store.last_sequence(&[3; BOOT_ID_LEN]).unwrap(), 0);
        let replayed: Vec<(u8, u64)> = store
            .batches()
            .map(|r| r.unwrap())
            .map(|(id, batch)| (id[0], batch.records[0].delta_packets))
            .collect();
        assert_eq!(replayed, [(1, 1), (1, 2), (2, 1)]);
    }

    #[tokio::test]
    async fn checkpoints_are_recovered_and_a_batch_goes_once_every_shard_is_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let id = [4; BOOT_ID_LEN];
        {
            let store = Store::open(dir.path()).unwrap();
            for sequence in 1..=3 {
                store.append(&id, &batch(sequence)).await.unwrap();
            }
            let changes = [
                Change {
                    key: vec![1],
                    state: Some(vec![10, 11]),
                },
                Change {
                    key: vec![2],
                    state: None,
                },
            ];
            let at = |sequence| HashMap::from([(id, sequence)]);
            store
                .checkpoint(Checkpoint {
                    shard: 0,
                    positions: &at(2),
                    changes: &changes,
                    outbox: &[vec![7, 7]],
                })
                .unwrap();
            let left: Vec<u64> = store.batches().map(|b| b.unwrap().1.sequence).collect();
            assert_eq!(left, [1, 2, 3], "the other shards have not checkpointed");
            for shard in 1..SHARDS {
                store
                    .checkpoint(Checkpoint {
                        shard,
                        positions: &at(if shard == 5 { 1 } else { 3 }),
                        changes: &[],
                        outbox: &[],
                    })
                    .unwrap();
            }
        }
        let store = reopen(dir.path());
        let recovered = store.recover().unwrap();
        assert_eq!(recovered.positions.len(), usize::from(SHARDS));
        assert_eq!(recovered.positions[&(0, id)], 2);
        assert_eq!(recovered.positions[&(5, id)], 1);
        assert_eq!(recovered.positions[&(7, id)], 3);
        assert_eq!(recovered.connections, [vec![10, 11]]);
        let left: Vec<u64> = store.batches().map(|b| b.unwrap().1.sequence).collect();
        assert_eq!(left, [2, 3], "shard 5 still needs batch 2, shard 0 batch 3");
        assert_eq!(store.outbox_oldest(10).unwrap()[0].1, [7, 7]);
        assert_eq!(store.last_sequence(&id).unwrap(), 3);
    }

    #[tokio::test]
    async fn a_gap_or_a_repeat_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = [9; BOOT_ID_LEN];
        store.append(&id, &batch(1)).await.unwrap();
        let gap = store.append(&id, &batch(3)).await.unwrap_err();
        assert_eq!(
            gap.to_string(),
            "store: batch 3 of this agent is not the next one (last durable: 1)"
        );
        assert!(matches!(
            store.append(&id, &batch(1)).await,
            Err(StoreError::OutOfOrder {
                sequence: 1,
                last: 1
            })
        ));
        assert_eq!(store.batches().count(), 1);
    }
}
