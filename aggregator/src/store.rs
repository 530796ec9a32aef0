//! The aggregator's durable log of agent batches, in sled, behind a small interface.
//!
//! What it owns: for every agent boot id, the highest sequence made durable, and the batches
//! themselves (prost-encoded, keyed by boot id ‖ big-endian sequence so that a scan returns them in
//! order). A batch and its agent's new high-water mark are written in one transaction and flushed
//! before [`Store::append`] returns — that is the moment an agent may be acknowledged.
//!
//! It also owns the export outbox: encoded OTLP export requests, keyed by a big-endian counter,
//! written (and flushed) before the flows they carry leave memory, deleted once delivered.
//!
//! sled 0.34 is the last stable release and is known for disk growth; it stays behind this
//! interface so that it can be replaced (the replication issue moves the log under openraft).
//! Truncating batches whose flows have been exported comes with the flow-table checkpoint.

use std::path::Path;

use mermin_protocol::agent::v1::Batch;
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
    batches: sled::Tree,
    outbox: sled::Tree,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            agents: db.open_tree("agents")?,
            batches: db.open_tree("batches")?,
            outbox: db.open_tree("outbox")?,
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
        match result {
            Ok(()) => {}
            Err(TransactionError::Abort(err)) => return Err(err),
            Err(TransactionError::Storage(err)) => return Err(err.into()),
        }
        self.db.flush_async().await?;
        Ok(())
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
    /// Queues an encoded export request durably; returns its outbox id.
    pub async fn outbox_push(&self, request: &[u8]) -> Result<u64, StoreError> {
        let id = self.db.generate_id()?;
        self.outbox.insert(id.to_be_bytes(), request)?;
        self.db.flush_async().await?;
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
        self.outbox.remove(id.to_be_bytes())?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Requests waiting in the outbox.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }
}

fn batch_key(boot_id: &BootId, sequence: u64) -> [u8; BOOT_ID_LEN + 8] {
    let mut key = [0; BOOT_ID_LEN + 8];
    key[..BOOT_ID_LEN].copy_from_slice(boot_id);
    key[BOOT_ID_LEN..].copy_from_slice(&sequence.to_be_bytes());
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
        let store = Store::open(dir.path()).unwrap();
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
