//! The Raft log of one group on one replica, in sled: [`SledLog`] is openraft's
//! `RaftLogStorage` for any group whose entries serialize.
//!
//! Layout, in two trees named after the group: `raft/<group>/log` maps each entry's index
//! (big-endian, so that scans run in order) to the entry (postcard); `raft/<group>/meta` holds
//! the vote, the committed log id and the last purged log id. An append returns to openraft
//! (the `LogFlushed` callback) only once sled has flushed it: an entry a replica has
//! acknowledged to its leader survives a crash of that replica.

use std::{fmt::Debug, marker::PhantomData, ops::RangeBounds};

use openraft::{
    LogId, LogState, OptionalSend, RaftLogId, RaftLogReader, RaftTypeConfig, StorageError,
    StorageIOError, Vote,
    storage::{LogFlushed, RaftLogStorage},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::store::DurableDb;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// One group's Raft log (see the module docs). Cloning shares the trees.
pub struct SledLog<C: RaftTypeConfig> {
    /// Flushes the trees (every flush of the database is one of all its trees).
    db: DurableDb,
    entries: sled::Tree,
    meta: sled::Tree,
    config: PhantomData<C>,
}

impl<C: RaftTypeConfig> Clone for SledLog<C> {
    fn clone(&self) -> Self {
        Self {
            db: self.db.clone(),
            entries: self.entries.clone(),
            meta: self.meta.clone(),
            config: PhantomData,
        }
    }
}

impl<C> SledLog<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
{
    /// The log of `group` in `db` (created empty if the group has none yet).
    pub fn open(db: &DurableDb, group: &str) -> Result<Self, sled::Error> {
        Ok(Self {
            db: db.clone(),
            entries: db.open_tree(format!("raft/{group}/log"))?,
            meta: db.open_tree(format!("raft/{group}/meta"))?,
            config: PhantomData,
        })
    }

    #[expect(
        clippy::result_large_err,
        reason = "openraft's error type, which its storage traits return"
    )]
    fn read_meta<T: DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageIOError<C::NodeId>> {
        let Some(bytes) = self.meta.get(key).map_err(|e| StorageIOError::read(&e))? else {
            return Ok(None);
        };
        postcard::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| StorageIOError::read(&e))
    }

    async fn write_meta<T: Serialize>(
        &self,
        key: &[u8],
        value: &T,
        failed: fn(openraft::AnyError) -> StorageIOError<C::NodeId>,
    ) -> Result<(), StorageError<C::NodeId>> {
        let bytes = postcard::to_allocvec(value).map_err(|e| StorageIOError::write(&e))?;
        self.meta
            .insert(key, bytes)
            .map_err(|e| failed(openraft::AnyError::from(&e)))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| failed(openraft::AnyError::from(&e)))?;
        Ok(())
    }

    #[expect(
        clippy::result_large_err,
        reason = "openraft's error type, which its storage traits return"
    )]
    fn last_entry_id(&self) -> Result<Option<LogId<C::NodeId>>, StorageIOError<C::NodeId>> {
        let Some((_, bytes)) = self
            .entries
            .last()
            .map_err(|e| StorageIOError::read_logs(&e))?
        else {
            return Ok(None);
        };
        let entry: C::Entry =
            postcard::from_bytes(&bytes).map_err(|e| StorageIOError::read_logs(&e))?;
        Ok(Some(entry.get_log_id().clone()))
    }
}

impl<C> RaftLogReader<C> for SledLog<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
{
    #[expect(
        clippy::result_large_err,
        reason = "openraft's error type, which its storage traits return"
    )]
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        let start = range.start_bound().map(|index| index.to_be_bytes());
        let end = range.end_bound().map(|index| index.to_be_bytes());
        self.entries
            .range((start, end))
            .map(|item| {
                let (_, bytes) = item.map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(postcard::from_bytes(&bytes).map_err(|e| StorageIOError::read_logs(&e))?)
            })
            .collect()
    }
}

impl<C> RaftLogStorage<C> for SledLog<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<C::NodeId>> {
        let last_purged_log_id = self.read_meta(LAST_PURGED)?;
        let last_log_id = self.last_entry_id()?.or_else(|| last_purged_log_id.clone());
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        self.write_meta(VOTE, vote, StorageIOError::write_vote)
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, StorageError<C::NodeId>> {
        Ok(self.read_meta(VOTE)?)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<C::NodeId>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        self.write_meta(COMMITTED, &committed, StorageIOError::write)
            .await
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        Ok(self
            .read_meta::<Option<LogId<C::NodeId>>>(COMMITTED)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let index = entry.get_log_id().index;
            let bytes =
                postcard::to_allocvec(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.insert(&index.to_be_bytes(), bytes);
        }
        self.entries
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let flushed = self.db.flush_async().await;
        callback.log_io_completed(flushed.map(drop).map_err(std::io::Error::other));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        self.remove_range(log_id.index..).await
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        // The purge point first: a crash between the two leaves entries below it, which
        // `get_log_state` does not report and the next purge removes.
        self.write_meta(LAST_PURGED, &log_id, StorageIOError::write_logs)
            .await?;
        self.remove_range(..=log_id.index).await
    }
}

impl<C> SledLog<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
{
    async fn remove_range(
        &self,
        range: impl RangeBounds<u64>,
    ) -> Result<(), StorageError<C::NodeId>> {
        let start = range.start_bound().map(|index| index.to_be_bytes());
        let end = range.end_bound().map(|index| index.to_be_bytes());
        let mut batch = sled::Batch::default();
        for key in self.entries.range((start, end)).keys() {
            batch.remove(key.map_err(|e| StorageIOError::write_logs(&e))?);
        }
        self.entries
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
