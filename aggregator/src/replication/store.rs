//! The store group: the storage seam ([`Storage`]) replicated by Raft. Every write of the seam
//! is an entry of the group's log ([`StoreCommand`]), committed on a quorum of replicas before
//! it returns — an agent's batch is acknowledged only once a majority holds it — and applied on
//! every replica to its own [`SledStore`] ([`StoreMachine`]). Reads are served by the local
//! copy, which on the leader holds every write it has returned.
//!
//! Determinism: what the local store would choose itself is taken from the log instead — the
//! outbox ids of an entry at index `i` are `i · 2¹⁶ + j`, the bind order of an agent process is
//! `i` — so every replica holds the same bytes. Every command applied again after a crash
//! changes nothing more (see `SledStore`'s apply methods), so the machine records the last
//! applied log id after the effect, without a flush per entry; a snapshot flushes first.
//!
//! Only the group's leader writes: on any other replica a write fails with
//! [`StoreError::Backend`] naming the leader, which the layers above treat as a failing disk
//! (batches refused, not ready). So does a write that no quorum took within [`WRITE_BOUND`]
//! (a leader cut off from its followers), and every write, pending or new, once the replica is
//! fenced ([`ReplicatedStore::fence`]: it stopped leading): nothing above the seam waits on a
//! quorum that is not there.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use futures_util::{FutureExt, future::BoxFuture};
use mermin_protocol::wire::read::BatchBytes;
use openraft::{
    BasicNode, EntryPayload, LogId, Raft, RaftLogId, RaftSnapshotBuilder, RaftTypeConfig, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    error::{ClientWriteError, RaftError},
    storage::RaftStateMachine,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::sync::watch;

use super::{ReplicaId, snapshot};
use crate::{
    placement::ShardId,
    store::{
        BootId, Change, Checkpoint, DurableDb, Recovered, Retirement, SledStore, Storage,
        StoreError,
    },
};

openraft::declare_raft_types!(
    /// The store group: its entries are [`StoreCommand`]s; its snapshots are files (`snapshot`).
    pub StoreGroup:
        D = StoreCommand,
        R = StoreAnswer,
        NodeId = ReplicaId,
        Node = BasicNode,
        SnapshotData = tokio::fs::File,
);

/// A write of the storage seam, as the store group's log carries it. Byte fields are written as
/// byte strings (`serde_bytes`): serde's default writes a `Vec<u8>` one number at a time, which
/// made encoding the log most of the replicated store's cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreCommand {
    Bind {
        boot_id: BootId,
        node: String,
    },
    Append {
        boot_id: BootId,
        sequence: u64,
        /// The batch, protobuf-encoded as the log stores it.
        #[serde(with = "serde_bytes")]
        batch: Vec<u8>,
    },
    /// One shard's checkpoint, as logs written before checkpoints were combined hold it.
    Checkpoint(ShardCheckpoint),
    Push {
        #[serde(with = "serde_bytes")]
        request: Vec<u8>,
    },
    Remove {
        id: u64,
    },
    Retire {
        /// The boot ids the leader's sessions keep (see `Storage::retire_superseded`).
        kept: Vec<BootId>,
    },
    /// The checkpoints of several shards, written together.
    Checkpoints(Vec<ShardCheckpoint>),
}

/// One shard's checkpoint in a log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCheckpoint {
    shard: ShardId,
    positions: Vec<(BootId, u64)>,
    changes: Vec<Change>,
    outbox: Vec<ByteBuf>,
}

/// What applying a command answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreAnswer {
    Done,
    Bound(Option<String>),
    Pushed(u64),
    Retired { retired: Vec<BootId>, known: usize },
    OutOfOrder { sequence: u64, last: u64 },
}

/// Outbox ids per log entry: an entry's requests are numbered from its index times this.
const IDS_PER_ENTRY: u64 = 1 << 16;

type Error = StorageError<ReplicaId>;
type Membership = StoredMembership<ReplicaId, BasicNode>;

const APPLIED: &[u8] = b"applied";
/// Present while a snapshot is being installed (its id): the store's trees are then neither the
/// old state nor the new one.
pub(super) const INSTALLING: &[u8] = b"installing";
pub(super) const MACHINE_TREE: &str = "raft/store/machine";

/// Applies `command`, the entry at `index`, to `store`.
fn apply(store: &SledStore, index: u64, command: &StoreCommand) -> Result<StoreAnswer, StoreError> {
    let answer = match command {
        StoreCommand::Bind { boot_id, node } => {
            StoreAnswer::Bound(store.apply_bind(boot_id, node, index)?)
        }
        StoreCommand::Append {
            boot_id,
            sequence,
            batch,
        } => match store.apply_append(boot_id, *sequence, batch, None) {
            Ok(()) => StoreAnswer::Done,
            Err(StoreError::OutOfOrder { sequence, last }) => {
                StoreAnswer::OutOfOrder { sequence, last }
            }
            Err(err) => return Err(err),
        },
        StoreCommand::Checkpoint(checkpoint) => {
            apply_checkpoints(store, index, std::slice::from_ref(checkpoint))?
        }
        StoreCommand::Checkpoints(checkpoints) => apply_checkpoints(store, index, checkpoints)?,
        StoreCommand::Push { request } => {
            store.apply_push(index * IDS_PER_ENTRY, request)?;
            StoreAnswer::Pushed(index * IDS_PER_ENTRY)
        }
        StoreCommand::Remove { id } => {
            store.apply_remove(*id)?;
            StoreAnswer::Done
        }
        StoreCommand::Retire { kept } => {
            let Retirement { retired, known } =
                store.apply_retire(&kept.iter().copied().collect())?;
            StoreAnswer::Retired { retired, known }
        }
    };
    Ok(answer)
}

/// Applies the checkpoints of the entry at `index`: its requests take the entry's outbox ids.
fn apply_checkpoints(
    store: &SledStore,
    index: u64,
    checkpoints: &[ShardCheckpoint],
) -> Result<StoreAnswer, StoreError> {
    type Owned = (HashMap<BootId, u64>, Vec<Vec<u8>>);
    let parts: Vec<Owned> = checkpoints
        .iter()
        .map(|c| {
            (
                c.positions.iter().copied().collect(),
                c.outbox.iter().map(|r| r.to_vec()).collect(),
            )
        })
        .collect();
    let checkpoints: Vec<Checkpoint<'_>> = checkpoints
        .iter()
        .zip(&parts)
        .map(|(c, (positions, outbox))| Checkpoint {
            shard: c.shard,
            positions,
            changes: &c.changes,
            outbox,
        })
        .collect();
    store.apply_checkpoints_and_clean_up(&checkpoints, index * IDS_PER_ENTRY)?;
    Ok(StoreAnswer::Done)
}

/// The store group's state machine on one replica (see the module docs).
#[derive(Clone)]
pub struct StoreMachine {
    db: DurableDb,
    meta: sled::Tree,
    current: Arc<RwLock<Arc<SledStore>>>,
    /// Where snapshot files are made (anonymous: see `snapshot`).
    snapshots: PathBuf,
    /// The last snapshot built or installed, which `get_current_snapshot` hands out (a handle
    /// of its own each time): openraft asks for it on its state-machine worker, which applying
    /// waits for, so it must not be built there.
    latest: Arc<Mutex<Option<KeptSnapshot>>>,
    /// Held by `apply` and by a snapshot's build: a snapshot is one state, that of its last
    /// applied entry. (Applying waits for a build: every `snapshot_entries` entries, for as
    /// long as writing the store to a file takes.)
    applying: Arc<tokio::sync::Mutex<()>>,
}

/// A snapshot's meta and its (anonymous) file.
type KeptSnapshot = (SnapshotMeta<ReplicaId, BasicNode>, std::fs::File);

fn io_error(e: impl std::fmt::Display) -> Error {
    StorageIOError::write_state_machine(&StoreError::Backend(e.to_string())).into()
}

/// Whether the store database at `path` was cut short while it installed a snapshot (a crash
/// between clearing its trees and the end): then it holds neither the old state nor the new,
/// and no log replayed over it can make it right.
pub fn half_installed(path: &std::path::Path) -> Result<bool, sled::Error> {
    if !path.exists() {
        return Ok(false);
    }
    let db = sled::Config::new().path(path).open()?;
    db.open_tree(MACHINE_TREE)?.contains_key(INSTALLING)
}

impl StoreMachine {
    /// The machine kept in `db` (a database of its own: a snapshot carries all its trees),
    /// making its snapshot files in `snapshots`.
    pub fn open(db: DurableDb, snapshots: PathBuf) -> Result<Self, StoreError> {
        let meta = db.open_tree(MACHINE_TREE)?;
        let store = SledStore::on_db(db.clone())?;
        Ok(Self {
            db,
            meta,
            current: Arc::new(RwLock::new(Arc::new(store))),
            snapshots,
            latest: Arc::default(),
            applying: Arc::default(),
        })
    }

    /// The local store as applied so far.
    pub fn store(&self) -> Arc<SledStore> {
        self.current.read().expect("store lock").clone()
    }

    fn applied(&self) -> Result<(Option<LogId<ReplicaId>>, Membership), Error> {
        match self.meta.get(APPLIED).map_err(io_error)? {
            Some(bytes) => postcard::from_bytes(&bytes).map_err(io_error),
            None => Ok((None, Membership::default())),
        }
    }

    fn set_applied(&self, applied: &(Option<LogId<ReplicaId>>, Membership)) -> Result<(), Error> {
        let bytes = postcard::to_allocvec(applied).map_err(io_error)?;
        self.meta.insert(APPLIED, bytes).map_err(io_error)?;
        Ok(())
    }

    /// The trees a snapshot carries: all but the machine's own and sled's default one.
    fn store_trees(&self) -> Vec<sled::IVec> {
        self.db
            .tree_names()
            .into_iter()
            .filter(|name| &name[..] != MACHINE_TREE.as_bytes() && &name[..] != b"__sled__default")
            .collect()
    }
}

impl RaftSnapshotBuilder<StoreGroup> for StoreMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<StoreGroup>, Error> {
        // One consistent state: openraft builds snapshots beside `apply`, and a tree read while
        // entries are applied could miss one applied after it was passed, or hold a later one
        // whose entry, applied again over the snapshot, would be refused as out of order. So
        // no entry is applied until the trees are written (`applying`). What the snapshot says
        // is applied is then on disk before the log below it goes, with the value segments
        // freed before it.
        let _exclusive = self.applying.lock().await;
        let (last_log_id, last_membership) = self.applied()?;
        let store = self.store();
        store.flush_and_free().await.map_err(io_error)?;
        let (db, trees, dir) = (self.db.clone(), self.store_trees(), self.snapshots.clone());
        let resolve = move |tree: &[u8], value| {
            store
                .snapshot_value(tree, value)
                .map_err(std::io::Error::other)
        };
        let (file, size) =
            tokio::task::spawn_blocking(move || snapshot::write(&db, &trees, &dir, &resolve))
                .await
                .map_err(io_error)?
                .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let snapshot_id = super::snapshot_id(last_log_id.as_ref(), size);
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let handed = snapshot::reopen(&file).map_err(io_error)?;
        self.keep_latest(&meta, file);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(handed)),
        })
    }
}

impl StoreMachine {
    fn keep_latest(&self, meta: &SnapshotMeta<ReplicaId, BasicNode>, file: std::fs::File) {
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        // Built while another was installed (or the other way round): the later one stays.
        if latest
            .as_ref()
            .is_none_or(|(kept, _)| kept.last_log_id <= meta.last_log_id)
        {
            *latest = Some((meta.clone(), file));
        }
    }
}

impl RaftStateMachine<StoreGroup> for StoreMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<ReplicaId>>, Membership), Error> {
        self.applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<StoreAnswer>, Error>
    where
        I: IntoIterator<Item = <StoreGroup as RaftTypeConfig>::Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        // Not while a snapshot is being written (see `build_snapshot`).
        let _applying = self.applying.lock().await;
        let store = self.store();
        let mut applied = self.applied()?;
        let mut answers = Vec::new();
        for entry in entries {
            let log_id = *entry.get_log_id();
            answers.push(match &entry.payload {
                EntryPayload::Blank => StoreAnswer::Done,
                EntryPayload::Normal(command) => apply(&store, log_id.index, command)
                    .map_err(|e| StorageIOError::apply(log_id, &e))?,
                EntryPayload::Membership(membership) => {
                    applied.1 = StoredMembership::new(Some(log_id), membership.clone());
                    StoreAnswer::Done
                }
            });
            applied.0 = Some(log_id);
        }
        self.set_applied(&applied)?;
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, Error> {
        let file = snapshot::anonymous(&self.snapshots)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<ReplicaId, BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), Error> {
        // Not while this replica's own snapshot is being written from the trees cleared here.
        let _exclusive = self.applying.lock().await;
        let file = snapshot.into_std().await;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let kept = snapshot::reopen(&file).map_err(io_error)?;
        // Durable before the first tree is cleared: a crash from here until the marker goes
        // leaves a store that is neither the old state nor the new (see `half_installed`).
        self.meta
            .insert(INSTALLING, meta.snapshot_id.as_bytes())
            .map_err(io_error)?;
        self.db.flush_async().await.map_err(io_error)?;
        let (db, trees) = (self.db.clone(), self.store_trees());
        tokio::task::spawn_blocking(move || {
            for name in trees {
                db.open_tree(&name)
                    .and_then(|tree| tree.clear())
                    .map_err(std::io::Error::other)?;
            }
            snapshot::read(file, &db)
        })
        .await
        .map_err(io_error)?
        .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        self.set_applied(&(meta.last_log_id, meta.last_membership.clone()))?;
        self.meta.remove(INSTALLING).map_err(io_error)?;
        self.db.flush_async().await.map_err(io_error)?;
        // The local store's counts and change-log numbers are read from the trees at open.
        let reopened = SledStore::on_db(self.db.clone()).map_err(io_error)?;
        *self.current.write().expect("store lock") = Arc::new(reopened);
        self.keep_latest(meta, kept);
        tracing::info!(
            bytes = size,
            up_to = ?meta.last_log_id.map(|id| id.index),
            "installed a snapshot of the store group"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<StoreGroup>>, Error> {
        let latest = {
            let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
            latest
                .as_ref()
                .map(|(meta, file)| (meta.clone(), snapshot::reopen(file)))
        };
        match latest {
            Some((meta, handed)) => Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(tokio::fs::File::from_std(handed.map_err(io_error)?)),
            })),
            // None built since this replica started: one is built now, once (the state as
            // applied now is as good a snapshot as the last one).
            None if self.applied()?.0.is_some() => self.build_snapshot().await.map(Some),
            None => Ok(None),
        }
    }
}

/// The longest a write waits for a quorum before it fails (a commit takes milliseconds; this
/// long means the followers are out of reach).
pub const WRITE_BOUND: Duration = Duration::from_secs(10);

/// The storage seam on the store group (see the module docs).
pub struct ReplicatedStore {
    raft: Raft<StoreGroup>,
    machine: StoreMachine,
    write_failure: Mutex<Option<String>>,
    fenced: watch::Sender<bool>,
}

impl ReplicatedStore {
    pub fn new(raft: Raft<StoreGroup>, machine: StoreMachine) -> Self {
        Self {
            raft,
            machine,
            write_failure: Mutex::default(),
            fenced: watch::Sender::new(false),
        }
    }

    /// Fences the store (`true`): every pending write fails at once, and every new one, until
    /// `fence(false)`. A replica that stops leading fences its store before it stops the
    /// pipeline, so the pipeline's stop waits on no write.
    pub fn fence(&self, fenced: bool) {
        self.fenced.send_replace(fenced);
    }

    async fn propose(&self, command: StoreCommand) -> Result<StoreAnswer, StoreError> {
        let mut fenced = self.fenced.subscribe();
        let written = tokio::select! {
            // The fence first: a fenced store proposes nothing (a write it refuses while one is
            // pending may still be committed, as any write whose answer was lost).
            biased;
            // The watch's guard is let go inside the arm's future.
            _ = async { drop(fenced.wait_for(|f| *f).await) } => Err(StoreError::Backend(
                "this replica stopped leading the store group".to_owned(),
            )),
            written = self.raft.client_write(command) => written.map(|r| r.data).map_err(write_error),
            _ = tokio::time::sleep(WRITE_BOUND) => Err(StoreError::Backend(format!(
                "no quorum of the store group took the write within {} s",
                WRITE_BOUND.as_secs()
            ))),
        };
        *self.write_failure.lock().unwrap_or_else(|e| e.into_inner()) =
            written.as_ref().err().map(ToString::to_string);
        written
    }

    /// [`ReplicatedStore::propose`] from a blocking caller (the blocking pool, or a worker of
    /// a multi-threaded runtime).
    fn propose_blocking(&self, command: StoreCommand) -> Result<StoreAnswer, StoreError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| StoreError::Backend(format!("a store write outside a runtime: {e}")))?;
        tokio::task::block_in_place(|| runtime.block_on(self.propose(command)))
    }
}

fn write_error(error: RaftError<ReplicaId, ClientWriteError<ReplicaId, BasicNode>>) -> StoreError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            StoreError::Backend(format!(
                "this replica does not lead the store group (leader: {})",
                forward
                    .leader_id
                    .map_or("unknown".to_owned(), |id| format!("replica {id}"))
            ))
        }
        other => StoreError::Backend(other.to_string()),
    }
}

fn unexpected(answer: StoreAnswer) -> StoreError {
    StoreError::Corrupt(format!("the store group answered {answer:?}"))
}

impl Storage for ReplicatedStore {
    fn last_sequence(&self, boot_id: &BootId) -> Result<u64, StoreError> {
        self.machine.store().last_sequence(boot_id)
    }

    fn bind_agent<'a>(
        &'a self,
        boot_id: &'a BootId,
        node: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        async move {
            let command = StoreCommand::Bind {
                boot_id: *boot_id,
                node: node.to_owned(),
            };
            match self.propose(command).await? {
                StoreAnswer::Bound(bound) => Ok(bound),
                other => Err(unexpected(other)),
            }
        }
        .boxed()
    }

    fn retire_superseded(&self, kept: &HashSet<BootId>) -> Result<Retirement, StoreError> {
        let command = StoreCommand::Retire {
            kept: kept.iter().copied().collect(),
        };
        match self.propose_blocking(command)? {
            StoreAnswer::Retired { retired, known } => Ok(Retirement { retired, known }),
            other => Err(unexpected(other)),
        }
    }

    fn append<'a>(
        &'a self,
        boot_id: &'a BootId,
        batch: &'a BatchBytes,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let command = StoreCommand::Append {
                boot_id: *boot_id,
                sequence: batch.sequence(),
                batch: batch.bytes().to_vec(),
            };
            match self.propose(command).await? {
                StoreAnswer::Done => Ok(()),
                StoreAnswer::OutOfOrder { sequence, last } => {
                    Err(StoreError::OutOfOrder { sequence, last })
                }
                other => Err(unexpected(other)),
            }
        }
        .boxed()
    }

    fn batch(&self, boot_id: &BootId, sequence: u64) -> Result<Option<BatchBytes>, StoreError> {
        self.machine.store().batch(boot_id, sequence)
    }

    fn batches(&self) -> Box<dyn Iterator<Item = Result<(BootId, BatchBytes), StoreError>> + '_> {
        Box::new(self.machine.store().stored_batches())
    }

    fn checkpoint(&self, checkpoints: &[Checkpoint<'_>]) -> Result<(), StoreError> {
        // Refused here, not when applied: an entry must apply on every replica.
        Checkpoint::one_per_shard(checkpoints)?;
        let requests: usize = checkpoints.iter().map(|c| c.outbox.len()).sum();
        if requests as u64 >= IDS_PER_ENTRY {
            return Err(StoreError::Backend(format!(
                "checkpoints of {requests} export requests; at most {} fit one entry",
                IDS_PER_ENTRY - 1
            )));
        }
        let command = StoreCommand::Checkpoints(
            checkpoints
                .iter()
                .map(|checkpoint| ShardCheckpoint {
                    shard: checkpoint.shard,
                    positions: checkpoint.positions.iter().map(|(k, v)| (*k, *v)).collect(),
                    changes: checkpoint.changes.to_vec(),
                    outbox: checkpoint
                        .outbox
                        .iter()
                        .map(|request| ByteBuf::from(request.clone()))
                        .collect(),
                })
                .collect(),
        );
        match self.propose_blocking(command)? {
            StoreAnswer::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    fn recover(&self) -> Result<Recovered, StoreError> {
        self.machine.store().recover()
    }

    fn outbox_push<'a>(&'a self, request: &'a [u8]) -> BoxFuture<'a, Result<u64, StoreError>> {
        async move {
            let command = StoreCommand::Push {
                request: request.to_vec(),
            };
            match self.propose(command).await? {
                StoreAnswer::Pushed(id) => Ok(id),
                other => Err(unexpected(other)),
            }
        }
        .boxed()
    }

    fn outbox_oldest(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.machine.store().outbox_oldest(max)
    }

    fn outbox_after(&self, after: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.machine.store().outbox_after(after, max)
    }

    fn outbox_remove(&self, id: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            match self.propose(StoreCommand::Remove { id }).await? {
                StoreAnswer::Done => Ok(()),
                other => Err(unexpected(other)),
            }
        }
        .boxed()
    }

    fn outbox_len(&self) -> usize {
        self.machine.store().outbox_len()
    }

    fn outbox_bytes(&self) -> u64 {
        self.machine.store().outbox_bytes()
    }

    fn write_failure(&self) -> Option<String> {
        self.write_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn broken(&self) -> Option<String> {
        match &self.raft.metrics().borrow().running_state {
            Ok(()) => self.machine.store().broken(),
            Err(fatal) => Some(format!("the store group stopped: {fatal}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use mermin_protocol::wire::read::BatchBytes;
    use tokio::net::TcpListener;

    use crate::{
        replication::{RaftTuning, Replica},
        store::{Store, conformance},
    };

    /// The storage suite against the store group of a one-replica cluster, started again on
    /// its data dir for every reopen (as a restarted pod would be).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_replicated_store_passes_the_storage_suite() {
        let running: std::sync::Mutex<Option<Replica>> = std::sync::Mutex::new(None);
        let open = |path: &Path| -> Store {
            let runtime = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| {
                runtime.block_on(async {
                    let previous = running.lock().unwrap().take();
                    if let Some(previous) = previous {
                        previous.shutdown().await;
                    }
                    let replica = leading(path).await;
                    let store = replica.store();
                    *running.lock().unwrap() = Some(replica);
                    store
                })
            })
        };
        conformance::run(&open).await;
        let last = running.lock().unwrap().take();
        if let Some(last) = last {
            last.shutdown().await;
        }
    }

    /// A snapshot carries the whole store: a machine that installs it holds the same batches,
    /// positions and outbox (ids and bytes) as the one that built it, and goes on from there.
    #[tokio::test]
    async fn a_snapshot_installed_elsewhere_holds_the_same_store() {
        use openraft::{
            CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder,
            storage::RaftStateMachine,
        };

        use super::{StoreCommand, StoreMachine};
        use crate::store::Storage;
        let entry = |index: u64, command: StoreCommand| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Normal(command),
        };
        let (from_dir, to_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let open = |dir: &Path| {
            let db =
                crate::store::DurableDb::open(sled::Config::new(), &dir.join("store")).unwrap();
            StoreMachine::open(db, dir.to_owned()).unwrap()
        };
        let mut from = open(from_dir.path());
        let boot_id = [3; 16];
        let batch = BatchBytes::encode(&mermin_protocol::agent::v1::Batch {
            sequence: 1,
            records: vec![mermin_protocol::flow::v1::FlowRecord {
                delta_packets: 7,
                ..Default::default()
            }],
        });
        from.apply([
            entry(
                1,
                StoreCommand::Bind {
                    boot_id,
                    node: "node-a".into(),
                },
            ),
            entry(
                2,
                StoreCommand::Append {
                    boot_id,
                    sequence: 1,
                    batch: batch.bytes().to_vec(),
                },
            ),
            entry(
                3,
                StoreCommand::Push {
                    request: vec![0xab; 3000],
                },
            ),
        ])
        .await
        .unwrap();
        let snapshot = from.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id.map(|id| id.index), Some(3));
        // What a lagging follower is sent later is the one built, not one built on openraft's
        // worker: the same meta after more entries, each handle reading it whole on its own.
        from.apply([entry(
            4,
            StoreCommand::Push {
                request: vec![1; 10],
            },
        )])
        .await
        .unwrap();
        let mut current = Vec::new();
        for _ in 0..2 {
            let mut sent = from.get_current_snapshot().await.unwrap().unwrap();
            assert_eq!(sent.meta, snapshot.meta);
            let mut bytes = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut sent.snapshot, &mut bytes)
                .await
                .unwrap();
            current.push(bytes);
        }
        assert_eq!(current[0], current[1]);
        assert_eq!(
            current[0].len() as u64,
            snapshot.snapshot.metadata().await.unwrap().len()
        );

        let mut to = open(to_dir.path());
        to.install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert!(
            !to.meta.contains_key(super::INSTALLING).unwrap(),
            "installed whole"
        );
        let installed = to.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(installed.meta, snapshot.meta, "kept as the current one");
        let store = to.store();
        assert_eq!(store.last_sequence(&boot_id).unwrap(), 1);
        assert_eq!(store.batch(&boot_id, 1).unwrap(), Some(batch));
        assert_eq!(
            store.outbox_oldest(10).unwrap(),
            [(3 << 16, vec![0xab; 3000])]
        );
        assert_eq!((store.outbox_len(), store.outbox_bytes()), (1, 3000));
        let (applied, _) = to.applied_state().await.unwrap();
        assert_eq!(applied.map(|id| id.index), Some(3));
        // It goes on from there: the next sequence is the only one it takes.
        let answers = to
            .apply([entry(
                4,
                StoreCommand::Append {
                    boot_id,
                    sequence: 3,
                    batch: Vec::new(),
                },
            )])
            .await
            .unwrap();
        assert_eq!(
            answers,
            [super::StoreAnswer::OutOfOrder {
                sequence: 3,
                last: 1
            }]
        );
    }

    /// A fenced store fails every write at once, naming why, and reports it as its write
    /// failure (what `/readyz` shows); lifted, it writes again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fenced_store_refuses_writes_until_the_fence_is_lifted() {
        use crate::store::BootId;
        let dir = tempfile::tempdir().unwrap();
        let replica = leading(dir.path()).await;
        let store = replica.store();
        let boot_id: BootId = [7; 16];
        let batch = |sequence| {
            BatchBytes::encode(&mermin_protocol::agent::v1::Batch {
                sequence,
                records: Vec::new(),
            })
        };
        store.bind_agent(&boot_id, "node-a").await.unwrap();
        store.append(&boot_id, &batch(1)).await.unwrap();

        replica.fence_store(true);
        let refused = store.append(&boot_id, &batch(2)).await.unwrap_err();
        let why = "store: this replica stopped leading the store group";
        assert_eq!(refused.to_string(), why);
        assert_eq!(store.write_failure().as_deref(), Some(why));
        assert_eq!(store.last_sequence(&boot_id).unwrap(), 1);

        replica.fence_store(false);
        store.append(&boot_id, &batch(2)).await.unwrap();
        assert_eq!(store.write_failure(), None);
        assert_eq!(store.last_sequence(&boot_id).unwrap(), 2);
        replica.shutdown().await;
    }

    /// Replica 0 started on `path`, a cluster of one, once it leads its store group (bounded).
    async fn leading(path: &Path) -> Replica {
        let replica = start_again(path).await;
        replica.bootstrap().await.unwrap();
        for _ in 0..200 {
            if replica.store_leader() == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(replica.store_leader(), Some(0), "no leader after 5 s");
        replica
    }

    /// Starts replica 0 on `path`; the previous process's sled handles let go of their locks
    /// shortly after it stops: retried, bounded.
    async fn start_again(path: &Path) -> Replica {
        let timings = RaftTuning {
            heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(150), Duration::from_millis(300)),
            ..RaftTuning::default()
        };
        let mut last_error = None;
        for _ in 0..100 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            match Replica::start(0, listener, None, path, timings, None).await {
                Ok(replica) => return replica,
                Err(e) => last_error = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("replica 0 did not start again: {last_error:?}");
    }
}
