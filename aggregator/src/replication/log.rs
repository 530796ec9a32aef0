//! The Raft log of one group on one replica: [`SledLog`] is openraft's `RaftLogStorage` for any
//! group whose entries serialize.
//!
//! Layout, named after the group:
//! - the tree `raft/<group>/entries` maps each entry's index (big-endian, so that scans run in
//!   order) to the entry (postcard): in the tree itself behind a one-byte tag when it is small,
//!   else as a pointer into the value log `<db>/log-values/<group>` (`store::value_log`). The
//!   store group's entries carry whole batches and checkpoints, and sled rewrites every value of
//!   a tree node each time the node changes (large ones as blob files of their own): kept in the
//!   tree, they were a third of a three-replica cluster's CPU;
//! - the tree `raft/<group>/meta` holds the vote, the committed log id and the last purged log
//!   id.
//!
//! An append returns to openraft (the `LogFlushed` callback) only once it is durable — its values
//! synced before their pointers are written, then sled flushed: an entry a replica has
//! acknowledged to its leader survives a crash of that replica. The value segments that purged
//! or truncated entries leave without a live value are deleted once a flush made the removal
//! durable. A log written before the value log (the tree `raft/<group>/log`, every entry in it)
//! is moved over when opened.

use std::{fmt::Debug, marker::PhantomData, ops::RangeBounds, sync::Arc};

use openraft::{
    LogId, LogState, OptionalSend, RaftLogId, RaftLogReader, RaftTypeConfig, StorageError,
    StorageIOError, Vote,
    storage::{LogFlushed, RaftLogStorage},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::store::{
    DurableDb, StoreError,
    value_log::{Pointer, ValueLog},
};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// The tag of an entry kept in the tree; a pointer into the value log starts with 0.
const INLINE: u8 = 1;

/// Entries up to this size (encoded) stay in the tree: blank and membership entries, placement
/// moves, agent binds, outbox removals.
pub(super) const INLINE_MAX: usize = 1024;

/// One group's Raft log (see the module docs). Cloning shares the trees and the value log.
pub struct SledLog<C: RaftTypeConfig> {
    /// Flushes the trees (every flush of the database is one of all its trees).
    db: DurableDb,
    entries: sled::Tree,
    meta: sled::Tree,
    values: Arc<ValueLog>,
    /// Entries encoded to more bytes than this go to the value log.
    inline_max: usize,
    config: PhantomData<C>,
}

impl<C: RaftTypeConfig> Clone for SledLog<C> {
    fn clone(&self) -> Self {
        Self {
            db: self.db.clone(),
            entries: self.entries.clone(),
            meta: self.meta.clone(),
            values: self.values.clone(),
            inline_max: self.inline_max,
            config: PhantomData,
        }
    }
}

impl<C> SledLog<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
{
    /// The log of `group` in `db` (created empty if the group has none yet; `db` needs a
    /// directory, which holds the value log).
    pub fn open(db: &DurableDb, group: &str) -> Result<Self, StoreError> {
        Self::open_inlining(db, group, INLINE_MAX)
    }

    /// [`Self::open`], keeping entries of up to `inline_max` bytes in the tree.
    pub(super) fn open_inlining(
        db: &DurableDb,
        group: &str,
        inline_max: usize,
    ) -> Result<Self, StoreError> {
        let directory = db.path().ok_or_else(|| StoreError::Open {
            path: "(temporary)".into(),
            reason: "a Raft log needs a directory for its value log".into(),
        })?;
        let entries = db.open_tree(format!("raft/{group}/entries"))?;
        let mut pointers = Vec::new();
        for stored in entries.iter().values() {
            pointers.extend(Pointer::decode(&stored?));
        }
        let values = ValueLog::open(&directory.join("log-values").join(group), pointers)?;
        let log = Self {
            db: db.clone(),
            entries,
            meta: db.open_tree(format!("raft/{group}/meta"))?,
            values: Arc::new(values),
            inline_max,
            config: PhantomData,
        };
        log.move_inline_log(&format!("raft/{group}/log"))?;
        Ok(log)
    }

    /// Moves the entries of a log written before the value log (every entry in the tree
    /// `name`, untagged) over, then drops that tree.
    fn move_inline_log(&self, name: &str) -> Result<(), StoreError> {
        if !self
            .db
            .tree_names()
            .iter()
            .any(|tree| tree == name.as_bytes())
        {
            return Ok(());
        }
        let old = self.db.open_tree(name)?;
        for item in old.iter() {
            let (index, entry) = item?;
            let stored = self.stored(entry.to_vec())?;
            // Moved before, by a start that stopped half-way: the earlier copy goes.
            if let Some(was) = self.entries.insert(index, stored)? {
                self.values.release_all(Pointer::decode(&was));
            }
        }
        self.db.flush()?;
        self.db.drop_tree(name)?;
        self.db.flush()?;
        Ok(())
    }

    /// What the tree holds for an entry encoded as `encoded`: the entry itself behind its tag,
    /// or a pointer to it in the value log (written and synced).
    fn stored(&self, encoded: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        Ok(self.stored_all(vec![encoded])?.pop().expect("one entry"))
    }

    /// [`Self::stored`] of each of `encoded`, the large ones written with one sync.
    fn stored_all(&self, encoded: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, StoreError> {
        let large = encoded
            .iter()
            .filter(|entry| entry.len() > self.inline_max)
            .map(Vec::as_slice);
        let mut pointers = self.values.append_all(large)?.into_iter();
        Ok(encoded
            .into_iter()
            .map(|entry| match entry.len() > self.inline_max {
                true => pointers
                    .next()
                    .expect("one per large entry")
                    .encode()
                    .to_vec(),
                false => {
                    let mut stored = Vec::with_capacity(1 + entry.len());
                    stored.push(INLINE);
                    stored.extend_from_slice(&entry);
                    stored
                }
            })
            .collect())
    }

    /// The entry the tree holds as `stored`.
    #[expect(
        clippy::result_large_err,
        reason = "openraft's error type, which its storage traits return"
    )]
    fn entry(&self, stored: &[u8]) -> Result<C::Entry, StorageIOError<C::NodeId>> {
        let encoded = match stored.split_first() {
            Some((&INLINE, entry)) => std::borrow::Cow::Borrowed(entry),
            _ => {
                let pointer = Pointer::decode(stored).ok_or_else(|| {
                    StorageIOError::read_logs(&StoreError::Corrupt(format!(
                        "a log entry of {} bytes that is neither inline nor a pointer",
                        stored.len()
                    )))
                })?;
                let value = self
                    .values
                    .read(pointer)
                    .map_err(|e| StorageIOError::read_logs(&e))?;
                std::borrow::Cow::Owned(value)
            }
        };
        postcard::from_bytes(&encoded).map_err(|e| StorageIOError::read_logs(&e))
    }

    /// Flushes durably, then deletes the value segments freed before the flush. Blocking.
    fn flush_and_free(&self) -> Result<(), StoreError> {
        let free = self.values.take_dead();
        if let Err(err) = self.db.flush() {
            self.values.undelete(free);
            return Err(err.into());
        }
        self.values.delete(free);
        Ok(())
    }

    /// Runs `write` and then [`Self::flush_and_free`] on the blocking pool.
    async fn write_durably<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Self) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError>
    where
        C: 'static,
    {
        let log = self.clone();
        tokio::task::spawn_blocking(move || {
            let written = write(&log)?;
            log.flush_and_free()?;
            Ok(written)
        })
        .await
        .map_err(|joined| StoreError::Backend(format!("a Raft log write: {joined}")))?
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
        key: &'static [u8],
        value: &T,
        failed: fn(openraft::AnyError) -> StorageIOError<C::NodeId>,
    ) -> Result<(), StorageError<C::NodeId>> {
        let bytes = postcard::to_allocvec(value).map_err(|e| StorageIOError::write(&e))?;
        self.write_durably(move |log| {
            log.meta.insert(key, bytes)?;
            Ok(())
        })
        .await
        .map_err(|e| failed(openraft::AnyError::from(&e)))?;
        Ok(())
    }

    #[expect(
        clippy::result_large_err,
        reason = "openraft's error type, which its storage traits return"
    )]
    fn last_entry_id(&self) -> Result<Option<LogId<C::NodeId>>, StorageIOError<C::NodeId>> {
        let Some((_, stored)) = self
            .entries
            .last()
            .map_err(|e| StorageIOError::read_logs(&e))?
        else {
            return Ok(None);
        };
        Ok(Some(self.entry(&stored)?.get_log_id().clone()))
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
                let (_, stored) = item.map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(self.entry(&stored)?)
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
        let mut indexes = Vec::new();
        let mut encoded = Vec::new();
        for entry in entries {
            indexes.push(entry.get_log_id().index.to_be_bytes());
            encoded
                .push(postcard::to_allocvec(&entry).map_err(|e| StorageIOError::write_logs(&e))?);
        }
        let written = self
            .write_durably(move |log| {
                let stored = log.stored_all(encoded)?;
                let written: Vec<Pointer> =
                    stored.iter().filter_map(|s| Pointer::decode(s)).collect();
                let mut batch = sled::Batch::default();
                // An index written again lets go of the value it had.
                let mut replaced = Vec::new();
                for (index, stored) in indexes.iter().zip(stored) {
                    match log.entries.get(index) {
                        Ok(was) => replaced.extend(was.as_deref().and_then(Pointer::decode)),
                        Err(err) => {
                            log.values.release_all(written);
                            return Err(err.into());
                        }
                    }
                    batch.insert(index, stored);
                }
                if let Err(err) = log.entries.apply_batch(batch) {
                    log.values.release_all(written);
                    return Err(err.into());
                }
                log.values.release_all(replaced);
                Ok(())
            })
            .await;
        callback.log_io_completed(written.map_err(std::io::Error::other));
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
        let written = self
            .write_durably(move |log| {
                let mut batch = sled::Batch::default();
                let mut freed = Vec::new();
                for item in log.entries.range((start, end)) {
                    let (index, stored) = item?;
                    freed.extend(Pointer::decode(&stored));
                    batch.remove(index);
                }
                log.entries.apply_batch(batch)?;
                // Deleted only once a flush made the removal durable.
                log.values.release_all(freed);
                Ok(())
            })
            .await;
        written.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, storage::RaftLogStorageExt};

    use super::*;
    use crate::replication::store::{StoreCommand, StoreGroup};

    fn entry(index: u64, payload: EntryPayload<StoreGroup>) -> Entry<StoreGroup> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload,
        }
    }

    fn append(index: u64, batch_bytes: usize) -> Entry<StoreGroup> {
        entry(
            index,
            EntryPayload::Normal(StoreCommand::Append {
                boot_id: [index as u8; 16],
                sequence: index,
                batch: vec![index as u8; batch_bytes],
            }),
        )
    }

    async fn read_all(log: &mut SledLog<StoreGroup>) -> Vec<Entry<StoreGroup>> {
        log.try_get_log_entries(..).await.unwrap()
    }

    #[tokio::test]
    async fn large_entries_live_in_the_value_log_and_go_with_their_segment_once_purged() {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(sled::Config::new(), &dir.path().join("db")).unwrap();
        let written = vec![
            entry(1, EntryPayload::Blank),
            append(2, 10_000),
            append(3, 100),
        ];
        let mut log = SledLog::<StoreGroup>::open(&db, "store").unwrap();
        log.blocking_append(written.clone()).await.unwrap();
        let tags: Vec<u8> = (1..=3u64)
            .map(|index| log.entries.get(index.to_be_bytes()).unwrap().unwrap()[0])
            .collect();
        // The blank entry and the small batch in the tree, the 10 kB batch a pointer (tag 0).
        assert_eq!(tags, [INLINE, 0, INLINE]);
        assert_eq!(read_all(&mut log).await, written);
        drop(log);

        // Reopened (as after a restart): the same entries, a new segment begun.
        let mut log = SledLog::<StoreGroup>::open(&db, "store").unwrap();
        assert_eq!(read_all(&mut log).await, written);
        assert_eq!(log.values.segments(), [1, 2]);

        // Purged: the first segment holds no live entry any more and is deleted.
        log.purge(written[2].log_id).await.unwrap();
        assert_eq!(log.values.segments(), [2]);
        assert_eq!(read_all(&mut log).await, []);
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(written[2].log_id));
        assert_eq!(state.last_log_id, Some(written[2].log_id));
    }

    #[tokio::test]
    async fn a_truncated_entry_written_again_reads_back_as_written_the_second_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(sled::Config::new(), dir.path()).unwrap();
        let mut log = SledLog::<StoreGroup>::open_inlining(&db, "store", 0).unwrap();
        log.blocking_append([append(1, 100), append(2, 200)])
            .await
            .unwrap();
        log.truncate(LogId::new(CommittedLeaderId::new(1, 0), 2))
            .await
            .unwrap();
        let again = vec![append(1, 100), append(2, 300)];
        log.blocking_append([again[1].clone()]).await.unwrap();
        assert_eq!(read_all(&mut log).await, again);
    }

    #[tokio::test]
    async fn a_log_written_before_the_value_log_is_moved_over() {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(sled::Config::new(), dir.path()).unwrap();
        let written = vec![append(1, 10), append(2, 10_000)];
        // As the version before the value log wrote it: untagged entries in `raft/store/log`.
        let old = db.open_tree("raft/store/log").unwrap();
        for entry in &written {
            let encoded = postcard::to_allocvec(entry).unwrap();
            old.insert(entry.log_id.index.to_be_bytes(), encoded)
                .unwrap();
        }
        drop(old);
        let mut log = SledLog::<StoreGroup>::open(&db, "store").unwrap();
        assert_eq!(read_all(&mut log).await, written);
        let tags: Vec<u8> = (1..=2u64)
            .map(|index| log.entries.get(index.to_be_bytes()).unwrap().unwrap()[0])
            .collect();
        assert_eq!(tags, [INLINE, 0], "the large entry moved to the value log");
        assert!(
            !db.tree_names()
                .iter()
                .any(|name| name == b"raft/store/log".as_slice()),
            "the old tree is dropped"
        );
        drop(log);
        let mut log = SledLog::<StoreGroup>::open(&db, "store").unwrap();
        assert_eq!(read_all(&mut log).await, written);
    }
}
