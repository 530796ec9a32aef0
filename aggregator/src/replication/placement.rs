//! The membership and placement group's state machine: which replica leads which shard, with
//! an epoch per shard, replicated by Raft on every replica ([`PlacementMachine`]), and how a
//! new placement is chosen ([`rebalance`]).
//!
//! A placement change is a compare-and-set on each shard's epoch ([`Move::from_epoch`]): a
//! move computed from a map that has changed since (another leader's rebalance, a replica
//! that left) is skipped, not applied over the newer lease. Every applied move raises its
//! shard's epoch by one, so (shard, epoch) names one lease in the cluster's history.
//!
//! The machine's state is small (a lease per shard and the membership): it is written whole
//! to sled after every applied batch of entries, and a snapshot is that same value.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Cursor,
};

use openraft::{
    EntryPayload, LogId, RaftLogId, RaftSnapshotBuilder, RaftTypeConfig, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, storage::RaftStateMachine,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{ReplicaId, ReplicationError};
use crate::{placement::ShardId, store::DurableDb};

openraft::declare_raft_types!(
    /// The membership and placement group: its entries are [`PlacementCommand`]s.
    pub PlacementGroup:
        D = PlacementCommand,
        R = Placed,
        NodeId = ReplicaId,
        Node = openraft::BasicNode,
);

/// One shard's lease: the replica that leads it, and the lease's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub replica: ReplicaId,
    pub epoch: u64,
}

/// Every shard's current lease (shards never placed have none).
pub type ShardMap = BTreeMap<ShardId, Lease>;

/// Gives `shard` to `replica`, if its lease is still the one numbered `from_epoch` (0: never
/// placed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub shard: ShardId,
    pub from_epoch: u64,
    pub replica: ReplicaId,
}

/// An entry of the placement group's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementCommand {
    /// Moves applied together, each only if its shard's epoch still matches.
    Place(Vec<Move>),
}

/// What applying an entry did: the moves applied (those skipped were stale).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    pub applied: Vec<Move>,
}

/// The moves that give every one of `shards` shards to `replica` (those it leads already stay):
/// how leases follow the store group's leader while it leads every shard.
pub fn onto(map: &ShardMap, replica: ReplicaId, shards: ShardId) -> Vec<Move> {
    (0..shards)
        .filter(|shard| map.get(shard).is_none_or(|lease| lease.replica != replica))
        .map(|shard| Move {
            shard,
            from_epoch: map.get(&shard).map_or(0, |lease| lease.epoch),
            replica,
        })
        .collect()
}

/// The moves that spread `shards` shards evenly over `replicas` (each leads ⌊shards/n⌋ or one
/// more) while moving as few as possible: a shard stays where it is unless its replica is gone
/// or leads more than its share. Empty if the map is balanced already or there are no replicas.
pub fn rebalance(map: &ShardMap, replicas: &BTreeSet<ReplicaId>, shards: ShardId) -> Vec<Move> {
    if replicas.is_empty() {
        return Vec::new();
    }
    let count = replicas.len();
    let floor = usize::from(shards) / count;
    let mut larger_shares = usize::from(shards) % count;
    let mut kept: BTreeMap<ReplicaId, Vec<ShardId>> = replicas
        .iter()
        .map(|&replica| (replica, Vec::new()))
        .collect();
    let mut unplaced = Vec::new();
    for shard in 0..shards {
        match map.get(&shard) {
            Some(lease) if replicas.contains(&lease.replica) => {
                kept.get_mut(&lease.replica).expect("a member").push(shard)
            }
            _ => unplaced.push(shard),
        }
    }
    // Cap every replica at its share: ⌊shards/n⌋ + 1 for as many as there are larger shares
    // (those that hold that many already, in id order), ⌊shards/n⌋ for the rest.
    for held in kept.values_mut() {
        let share = if held.len() > floor && larger_shares > 0 {
            larger_shares -= 1;
            floor + 1
        } else {
            floor
        };
        if held.len() > share {
            unplaced.extend(held.drain(share..));
        }
    }
    // Fill the replicas that hold least, lowest id first on ties.
    let mut moves = Vec::new();
    unplaced.sort_unstable();
    for shard in unplaced {
        let (&replica, held) = kept
            .iter_mut()
            .min_by_key(|(replica, held)| (held.len(), **replica))
            .expect("replicas is not empty");
        held.push(shard);
        moves.push(Move {
            shard,
            from_epoch: map.get(&shard).map_or(0, |lease| lease.epoch),
            replica,
        });
    }
    moves
}

/// The machine's whole state, as stored and as a snapshot carries it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<ReplicaId>>,
    membership: StoredMembership<ReplicaId, openraft::BasicNode>,
    shards: ShardMap,
}

impl Applied {
    fn apply(&mut self, command: &PlacementCommand) -> Placed {
        let PlacementCommand::Place(moves) = command;
        let mut placed = Placed::default();
        for step in moves {
            let epoch = self.shards.get(&step.shard).map_or(0, |lease| lease.epoch);
            if epoch != step.from_epoch {
                continue;
            }
            self.shards.insert(
                step.shard,
                Lease {
                    replica: step.replica,
                    epoch: epoch + 1,
                },
            );
            placed.applied.push(*step);
        }
        placed
    }
}

/// A snapshot as stored: its meta and the state it holds.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<ReplicaId, openraft::BasicNode>,
    data: Vec<u8>,
}

const APPLIED: &[u8] = b"applied";
const SNAPSHOT: &[u8] = b"snapshot";

/// The placement group's state machine on one replica (see the module docs).
#[derive(Clone)]
pub struct PlacementMachine {
    /// Flushes the tree.
    db: DurableDb,
    tree: sled::Tree,
    state: watch::Sender<Applied>,
}

type Error = StorageError<ReplicaId>;

impl PlacementMachine {
    /// The machine stored in `db` (empty if none was).
    pub fn open(db: &DurableDb) -> Result<Self, ReplicationError> {
        let tree = db.open_tree("raft/placement/machine")?;
        let applied = match tree.get(APPLIED)? {
            Some(bytes) => postcard::from_bytes(&bytes).map_err(|e| ReplicationError::Corrupt {
                what: "placement state",
                reason: e.to_string(),
            })?,
            None => Applied::default(),
        };
        Ok(Self {
            db: db.clone(),
            tree,
            state: watch::channel(applied).0,
        })
    }

    /// The shard map as applied on this replica now.
    pub fn shards(&self) -> ShardMap {
        self.state.borrow().shards.clone()
    }

    /// The shard map as applied on this replica, following every change.
    pub fn shard_map(&self) -> watch::Receiver<ShardMap> {
        let (sender, receiver) = watch::channel(self.state.borrow().shards.clone());
        let mut state = self.state.subscribe();
        tokio::spawn(async move {
            while state.changed().await.is_ok() {
                let shards = state.borrow_and_update().shards.clone();
                if sender.send(shards).is_err() {
                    return;
                }
            }
        });
        receiver
    }

    async fn store(&self, key: &[u8], bytes: Vec<u8>) -> Result<(), Error> {
        self.tree
            .insert(key, bytes)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(())
    }
}

impl RaftSnapshotBuilder<PlacementGroup> for PlacementMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<PlacementGroup>, Error> {
        let (data, meta) = {
            let state = self.state.borrow();
            let data = postcard::to_allocvec(&*state)
                .map_err(|e| StorageIOError::read_state_machine(&e))?;
            let snapshot_id = super::snapshot_id(state.last_applied.as_ref(), data.len() as u64);
            let meta = SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.membership.clone(),
                snapshot_id,
            };
            (data, meta)
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let bytes = postcard::to_allocvec(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.store(SNAPSHOT, bytes).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<PlacementGroup> for PlacementMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<ReplicaId>>,
            StoredMembership<ReplicaId, openraft::BasicNode>,
        ),
        Error,
    > {
        let state = self.state.borrow();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Placed>, Error>
    where
        I: IntoIterator<Item = <PlacementGroup as RaftTypeConfig>::Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut next = self.state.borrow().clone();
        let mut answers = Vec::new();
        for entry in entries {
            next.last_applied = Some(*entry.get_log_id());
            answers.push(match &entry.payload {
                EntryPayload::Blank => Placed::default(),
                EntryPayload::Normal(command) => next.apply(command),
                EntryPayload::Membership(membership) => {
                    next.membership =
                        StoredMembership::new(Some(*entry.get_log_id()), membership.clone());
                    Placed::default()
                }
            });
        }
        let bytes =
            postcard::to_allocvec(&next).map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.store(APPLIED, bytes).await?;
        self.state.send_replace(next);
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<ReplicaId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        let data = snapshot.into_inner();
        let installed: Applied = postcard::from_bytes(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let bytes = postcard::to_allocvec(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.store(SNAPSHOT, bytes).await?;
        let bytes = postcard::to_allocvec(&installed)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.store(APPLIED, bytes).await?;
        self.state.send_replace(installed);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<PlacementGroup>>, Error> {
        let Some(bytes) = self
            .tree
            .get(SNAPSHOT)
            .map_err(|e| StorageIOError::read_state_machine(&e))?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot =
            postcard::from_bytes(&bytes).map_err(|e| StorageIOError::read_state_machine(&e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(leases: &[(ShardId, ReplicaId, u64)]) -> ShardMap {
        leases
            .iter()
            .map(|&(shard, replica, epoch)| (shard, Lease { replica, epoch }))
            .collect()
    }

    fn applied(map: &ShardMap, moves: &[Move]) -> ShardMap {
        let mut state = Applied {
            shards: map.clone(),
            ..Applied::default()
        };
        state.apply(&PlacementCommand::Place(moves.to_vec()));
        state.shards
    }

    fn held(map: &ShardMap) -> BTreeMap<ReplicaId, Vec<ShardId>> {
        let mut held: BTreeMap<ReplicaId, Vec<ShardId>> = BTreeMap::new();
        for (shard, lease) in map {
            held.entry(lease.replica).or_default().push(*shard);
        }
        held
    }

    #[test]
    fn shards_spread_evenly_and_only_the_shards_of_a_gone_replica_or_a_surplus_move() {
        // First placement: one replica takes everything, every lease at epoch 1.
        let one = applied(
            &ShardMap::new(),
            &rebalance(&ShardMap::new(), &[0].into(), 8),
        );
        assert_eq!(held(&one), BTreeMap::from([(0, (0..8).collect())]));
        assert!(one.values().all(|lease| lease.epoch == 1));

        // Two replicas join: replica 0 keeps its first three, the rest go to the emptiest.
        let moves = rebalance(&one, &[0, 1, 2].into(), 8);
        assert_eq!(moves.len(), 5);
        let three = applied(&one, &moves);
        assert_eq!(
            held(&three),
            BTreeMap::from([(0, vec![0, 1, 2]), (1, vec![3, 5, 7]), (2, vec![4, 6])])
        );
        assert_eq!(three[&3].epoch, 2);
        assert_eq!(three[&0].epoch, 1);
        assert!(rebalance(&three, &[0, 1, 2].into(), 8).is_empty());

        // Replica 1 is gone: only its three shards move.
        let two = applied(&three, &rebalance(&three, &[0, 2].into(), 8));
        assert_eq!(
            held(&two),
            BTreeMap::from([(0, vec![0, 1, 2, 5]), (2, vec![3, 4, 6, 7])])
        );
        assert_eq!(
            two[&5],
            Lease {
                replica: 0,
                epoch: 3
            }
        );
        assert_eq!(
            two[&4],
            Lease {
                replica: 2,
                epoch: 2
            }
        );
        assert!(rebalance(&two, &BTreeSet::new(), 8).is_empty());
    }

    #[test]
    fn a_move_computed_from_an_older_map_is_skipped() {
        let current = map(&[(0, 1, 4), (1, 1, 2)]);
        let mut state = Applied {
            shards: current,
            ..Applied::default()
        };
        let placed = state.apply(&PlacementCommand::Place(vec![
            Move {
                shard: 0,
                from_epoch: 3,
                replica: 2,
            },
            Move {
                shard: 1,
                from_epoch: 2,
                replica: 2,
            },
            Move {
                shard: 2,
                from_epoch: 0,
                replica: 2,
            },
        ]));
        assert_eq!(
            placed.applied.iter().map(|m| m.shard).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(state.shards, map(&[(0, 1, 4), (1, 2, 3), (2, 2, 1)]));
    }

    /// Builds the sled log (keeping entries of up to `inline_max` bytes in its tree) and this
    /// machine.
    struct SledBuilder {
        inline_max: usize,
    }

    impl
        openraft::testing::StoreBuilder<
            PlacementGroup,
            crate::replication::log::SledLog<PlacementGroup>,
            PlacementMachine,
            tempfile::TempDir,
        > for SledBuilder
    {
        async fn build(
            &self,
        ) -> Result<
            (
                tempfile::TempDir,
                crate::replication::log::SledLog<PlacementGroup>,
                PlacementMachine,
            ),
            Error,
        > {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let db = DurableDb::open(sled::Config::new(), dir.path()).expect("a sled database");
            let log =
                crate::replication::log::SledLog::open_inlining(&db, "placement", self.inline_max)
                    .expect("the log's trees");
            let machine = PlacementMachine::open(&db).expect("the machine's tree");
            Ok((dir, log, machine))
        }
    }

    #[test]
    fn every_shard_onto_one_replica_moves_only_those_it_does_not_lead() {
        let map = ShardMap::from([
            (
                0,
                Lease {
                    replica: 7,
                    epoch: 3,
                },
            ),
            (
                1,
                Lease {
                    replica: 9,
                    epoch: 1,
                },
            ),
        ]);
        assert_eq!(
            onto(&map, 7, 3),
            [
                Move {
                    shard: 1,
                    from_epoch: 1,
                    replica: 7
                },
                Move {
                    shard: 2,
                    from_epoch: 0,
                    replica: 7
                },
            ]
        );
        let all: ShardMap = (0..3)
            .map(|s| {
                (
                    s,
                    Lease {
                        replica: 7,
                        epoch: 1,
                    },
                )
            })
            .collect();
        assert_eq!(onto(&all, 7, 3), []);
    }

    /// openraft's own storage suite, against the sled log and this machine.
    #[test]
    fn the_log_and_the_machine_pass_openraft_s_storage_suite() {
        openraft::testing::Suite::test_all(SledBuilder {
            inline_max: crate::replication::log::INLINE_MAX,
        })
        .expect("every storage check passes");
    }

    /// The same with every entry in the log's value log.
    #[test]
    fn the_log_with_every_entry_in_its_value_log_passes_openraft_s_storage_suite() {
        openraft::testing::Suite::test_all(SledBuilder { inline_max: 0 })
            .expect("every storage check passes");
    }
}
