//! Connection states as the sled store keeps them: per shard, a log of change sets (one value
//! per checkpoint that changed connections), compacted into one base set once the changes since
//! the base outgrow it. A checkpoint is one sequential write however many connections it
//! changed; one B-tree insert per connection cost a third of the aggregator's CPU (sled copies
//! a node on every insert and reads the old value back to return it).
//!
//! The sets themselves are in the value log (`value_log`), the tree holds pointers to them
//! (sets written by earlier versions are inline: a pointer is 25 bytes beginning with 0, and an
//! inline set that short begins with a key length below 256, never 0).
//!
//! A change set is a sequence of `key length (u32 LE), key, state length (u32 LE; u32::MAX:
//! removed), state`. Keys of different shards never meet (a key belongs to one shard), so
//! replaying every shard's log in order rebuilds the states whatever the shards' order.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use sled::Transactional;

use super::{
    DurableDb, committed,
    value_log::{Pointer, ValueLog},
};
use crate::{
    connection_key::ConnectionKey,
    placement::{SHARDS, ShardId, shard_of},
    store::StoreError,
};

/// The tree of change sets, keyed by shard and number.
pub(super) const TREE: &str = "shard_changes";
/// Where connection states lived before (one entry per connection), migrated at open.
const LEGACY_TREE: &str = "connections";
/// A shard's log is compacted once its changes since the base exceed the base and this.
const COMPACT_ABOVE_BYTES: u64 = 8 << 20;
const REMOVED: u32 = u32::MAX;

/// One shard's log, as the store tracks it between writes.
#[derive(Debug, Default)]
pub(super) struct ShardLog {
    /// Number of the next change set.
    next: u64,
    /// Size of the oldest change set (the base after a compaction).
    base_bytes: u64,
    /// Size of every change set after it.
    since_base_bytes: u64,
}

impl ShardLog {
    /// The number of the next change set (never handed out twice, written or not).
    pub(super) fn take_number(&mut self) -> u64 {
        self.next += 1;
        self.next - 1
    }

    /// Notes a change set of `bytes` written.
    pub(super) fn written(&mut self, bytes: usize) {
        if self.base_bytes == 0 && self.since_base_bytes == 0 {
            self.base_bytes = bytes as u64;
        } else {
            self.since_base_bytes += bytes as u64;
        }
    }

    fn needs_compaction(&self) -> bool {
        self.since_base_bytes > self.base_bytes.max(COMPACT_ABOVE_BYTES)
    }
}

/// Every shard's log of change sets.
pub(super) struct ChangeLogs {
    tree: sled::Tree,
    values: Arc<ValueLog>,
    shards: Vec<Mutex<ShardLog>>,
}

impl ChangeLogs {
    /// Opens the logs, first moving states stored by an earlier version into them.
    pub(super) fn open(db: &DurableDb, values: Arc<ValueLog>) -> Result<Self, StoreError> {
        let tree = db.open_tree(TREE)?;
        if db
            .tree_names()
            .iter()
            .any(|name| name == LEGACY_TREE.as_bytes())
        {
            migrate(db, &tree)?;
        }
        let mut shards: Vec<ShardLog> = (0..SHARDS).map(|_| ShardLog::default()).collect();
        for entry in tree.iter() {
            let (key, value) = entry?;
            let (shard, number) = parse_key(&key)?;
            let log = shards
                .get_mut(usize::from(shard))
                .ok_or_else(|| StoreError::Corrupt(format!("change set of shard {shard}")))?;
            log.next = number + 1;
            log.written(Pointer::value_len(&value) as usize);
        }
        Ok(Self {
            tree,
            values,
            shards: shards.into_iter().map(Mutex::new).collect(),
        })
    }

    pub(super) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The log of `shard`, held while a checkpoint of that shard writes.
    pub(super) fn lock(&self, shard: ShardId) -> std::sync::MutexGuard<'_, ShardLog> {
        self.shards[usize::from(shard)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Every connection's last state (what start-up restores).
    pub(super) fn replay(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut states = HashMap::new();
        for value in self.tree.iter().values() {
            apply(&self.values.resolve(&value?)?, &mut states)?;
        }
        Ok(states.into_values().collect())
    }

    /// Compacts `shard`'s log into one change set if the changes since its base outgrew it.
    /// An optimisation: a failure leaves the log as it was, and is retried after the next
    /// checkpoint.
    pub(super) fn compact_if_due(&self, db: &DurableDb, shard: ShardId, log: &mut ShardLog) {
        if !log.needs_compaction() {
            return;
        }
        if let Err(err) = self.compact(db, shard, log) {
            tracing::warn!(shard, %err, "compacting the shard's connection states failed; retried after the next checkpoint");
        }
    }

    fn compact(
        &self,
        db: &DurableDb,
        shard: ShardId,
        log: &mut ShardLog,
    ) -> Result<(), StoreError> {
        let mut states = HashMap::new();
        let (mut keys, mut replaced) = (Vec::new(), Vec::new());
        for entry in self.tree.scan_prefix(shard.to_be_bytes()) {
            let (key, value) = entry?;
            apply(&self.values.resolve(&value)?, &mut states)?;
            keys.push(key);
            replaced.push(value);
        }
        // The base takes the newest set's key: sets written later sort after it.
        let Some(newest) = keys.pop() else {
            return Ok(());
        };
        let base = encode(
            states
                .iter()
                .map(|(k, v)| (k.as_slice(), Some(v.as_slice()))),
        );
        let pointer = self.values.append(&base)?;
        let written = committed(self.tree.transaction(|tree| {
            for key in &keys {
                tree.remove(key)?;
            }
            tree.insert(&newest, &pointer.encode())?;
            Ok(())
        }));
        if let Err(err) = written {
            self.values.release(pointer);
            return Err(err);
        }
        for value in replaced {
            self.values.release_stored(&value);
        }
        db.flush()?;
        *log = ShardLog {
            next: log.next,
            base_bytes: base.len() as u64,
            since_base_bytes: 0,
        };
        Ok(())
    }
}

/// A change set's key: shard, then number (big-endian: scans run in order).
pub(super) fn key(shard: ShardId, number: u64) -> [u8; 10] {
    let mut key = [0; 10];
    key[..2].copy_from_slice(&shard.to_be_bytes());
    key[2..].copy_from_slice(&number.to_be_bytes());
    key
}

fn parse_key(key: &[u8]) -> Result<(ShardId, u64), StoreError> {
    let corrupt = || StoreError::Corrupt(format!("change set key of {} bytes", key.len()));
    let (shard, number) = key.split_at_checked(2).ok_or_else(corrupt)?;
    Ok((
        ShardId::from_be_bytes(shard.try_into().map_err(|_| corrupt())?),
        u64::from_be_bytes(number.try_into().map_err(|_| corrupt())?),
    ))
}

/// Encodes a change set (see the module docs), in a buffer sized up front: sets of a busy
/// tick are megabytes, and growing by doubling copied them and faulted in fresh pages.
pub(super) fn encode<'a>(
    changes: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone,
) -> Vec<u8> {
    let len = changes
        .clone()
        .map(|(key, state)| 8 + key.len() + state.map_or(0, <[u8]>::len))
        .sum();
    let mut out = Vec::with_capacity(len);
    for (key, state) in changes {
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        match state {
            Some(state) => {
                out.extend_from_slice(&(state.len() as u32).to_le_bytes());
                out.extend_from_slice(state);
            }
            None => out.extend_from_slice(&REMOVED.to_le_bytes()),
        }
    }
    out
}

/// Applies a change set to `states`, in order.
fn apply(mut set: &[u8], states: &mut HashMap<Vec<u8>, Vec<u8>>) -> Result<(), StoreError> {
    fn take<'a>(set: &mut &'a [u8], len: usize) -> Result<&'a [u8], StoreError> {
        let (taken, rest) = set
            .split_at_checked(len)
            .ok_or_else(|| StoreError::Corrupt("truncated change set".into()))?;
        *set = rest;
        Ok(taken)
    }
    fn length(set: &mut &[u8]) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(
            take(set, 4)?.try_into().unwrap_or_default(),
        ))
    }
    while !set.is_empty() {
        let key_len = length(&mut set)? as usize;
        let key = take(&mut set, key_len)?.to_vec();
        match length(&mut set)? {
            REMOVED => {
                states.remove(&key);
            }
            state_len => {
                let state = take(&mut set, state_len as usize)?.to_vec();
                states.insert(key, state);
            }
        }
    }
    Ok(())
}

/// Moves the states an earlier version kept one per connection into one change set per shard.
fn migrate(db: &DurableDb, tree: &sled::Tree) -> Result<(), StoreError> {
    let legacy = db.open_tree(LEGACY_TREE)?;
    let mut by_shard: HashMap<ShardId, Vec<(sled::IVec, sled::IVec)>> = HashMap::new();
    for entry in legacy.iter() {
        let (key, state) = entry?;
        let connection: ConnectionKey = postcard::from_bytes(&key)
            .map_err(|e| StoreError::Corrupt(format!("stored connection key: {e}")))?;
        by_shard
            .entry(shard_of(&connection))
            .or_default()
            .push((key, state));
    }
    let sets: Vec<([u8; 10], Vec<u8>)> = by_shard
        .iter()
        .map(|(shard, states)| {
            let set = encode(states.iter().map(|(k, v)| (k.as_ref(), Some(v.as_ref()))));
            (key(*shard, 0), set)
        })
        .collect();
    committed((tree, &legacy).transaction(|(tree, legacy)| {
        for (key, set) in &sets {
            tree.insert(&key[..], set.as_slice())?;
        }
        for states in by_shard.values() {
            for (key, _) in states {
                legacy.remove(key)?;
            }
        }
        Ok(())
    }))?;
    db.flush()?;
    db.drop_tree(LEGACY_TREE)?;
    tracing::info!(
        connections = by_shard.values().map(Vec::len).sum::<usize>(),
        "connection states moved to the per-shard change logs"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection_key::Endpoint;

    fn temporary() -> DurableDb {
        DurableDb::temporary().unwrap()
    }

    fn value_log(dir: &tempfile::TempDir) -> Arc<ValueLog> {
        Arc::new(ValueLog::open(dir.path(), []).unwrap())
    }

    /// Writes one change set of `shard` as a checkpoint does.
    fn write(db: &DurableDb, logs: &ChangeLogs, shard: ShardId, changes: &[(Vec<u8>, Vec<u8>)]) {
        let mut log = logs.lock(shard);
        let set = encode(
            changes
                .iter()
                .map(|(k, v)| (k.as_slice(), Some(v.as_slice()))),
        );
        logs.tree
            .insert(key(shard, log.take_number()), set.as_slice())
            .unwrap();
        log.written(set.len());
        logs.compact_if_due(db, shard, &mut log);
    }

    #[test]
    fn compaction_keeps_a_shards_log_short_and_its_states_exact() {
        let db = temporary();
        let dir = tempfile::tempdir().unwrap();
        let values = value_log(&dir);
        let logs = ChangeLogs::open(&db, values.clone()).unwrap();
        // 40 sets of 100 states of 10 kB (40 MB), over 20 keys of shard 2 and one of shard 5.
        for round in 0..40u8 {
            let changes: Vec<(Vec<u8>, Vec<u8>)> = (0..100u8)
                .map(|i| (vec![i % 20], vec![round; 10_000]))
                .collect();
            write(&db, &logs, 2, &changes);
        }
        write(&db, &logs, 5, &[(b"other".to_vec(), b"x".to_vec())]);
        let sets = logs.tree.scan_prefix(2u16.to_be_bytes()).count();
        assert!(sets < 40, "{sets} change sets: never compacted");
        let mut states = logs.replay().unwrap();
        states.sort();
        let mut expected = vec![vec![39u8; 10_000]; 20];
        expected.push(b"x".to_vec());
        expected.sort();
        assert!(states == expected, "the states after compaction differ");
        // Reopened, numbering goes on after the newest set.
        let base = logs.tree.scan_prefix(2u16.to_be_bytes()).values().next();
        let base = base.unwrap().unwrap();
        assert!(
            Pointer::decode(&base).is_some(),
            "the base is in the value log"
        );
        drop(logs);
        let logs = ChangeLogs::open(&db, values).unwrap();
        let newest = logs.tree.scan_prefix(2u16.to_be_bytes()).keys().last();
        let (_, number) = parse_key(&newest.unwrap().unwrap()).unwrap();
        assert_eq!(logs.lock(2).next, number + 1);
    }

    #[test]
    fn states_of_an_earlier_version_move_into_their_shards_logs() {
        let db = temporary();
        let legacy = db.open_tree(LEGACY_TREE).unwrap();
        let connection = |port| ConnectionKey {
            protocol: 6,
            first: Endpoint {
                address: "10.0.0.1".parse().unwrap(),
                port,
            },
            second: Endpoint {
                address: "10.0.0.2".parse().unwrap(),
                port: 443,
            },
        };
        for port in [40_000, 40_001, 40_002] {
            let key = postcard::to_allocvec(&connection(port)).unwrap();
            legacy.insert(key, &port.to_be_bytes()).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let logs = ChangeLogs::open(&db, value_log(&dir)).unwrap();
        let mut states = logs.replay().unwrap();
        states.sort();
        assert_eq!(states, [[156, 64], [156, 65], [156, 66]]);
        assert!(!db.tree_names().iter().any(|n| n == LEGACY_TREE.as_bytes()));
        for entry in logs.tree.iter() {
            let (key, set) = entry.unwrap();
            let (shard, number) = parse_key(&key).unwrap();
            assert_eq!(number, 0);
            let mut states = HashMap::new();
            apply(&set, &mut states).unwrap();
            for key in states.keys() {
                let connection: ConnectionKey = postcard::from_bytes(key).unwrap();
                assert_eq!(shard_of(&connection), shard);
            }
        }
    }

    #[test]
    fn a_change_set_round_trips_and_applies_in_order() {
        let set = encode(
            [
                (&b"a"[..], Some(&b"1"[..])),
                (b"b", Some(b"")),
                (b"a", None),
                (b"c", Some(b"33")),
            ]
            .into_iter(),
        );
        // Eight length words, four 1-byte keys, three state bytes.
        assert_eq!(set.len(), 8 * 4 + 4 + 3);
        let mut states = HashMap::from([(b"z".to_vec(), b"9".to_vec())]);
        apply(&set, &mut states).unwrap();
        let mut states: Vec<_> = states.into_iter().collect();
        states.sort();
        assert_eq!(
            states,
            [
                (b"b".to_vec(), b"".to_vec()),
                (b"c".to_vec(), b"33".to_vec()),
                (b"z".to_vec(), b"9".to_vec())
            ]
        );
        let err = apply(&set[..set.len() - 1], &mut HashMap::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "store: corrupt entry: truncated change set"
        );
    }
}
