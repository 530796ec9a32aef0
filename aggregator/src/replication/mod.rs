//! Replication of the aggregator across replicas with Raft (openraft): the groups a replica
//! takes part in, their logs and state machines in the replica's sled database, and the
//! replica-to-replica transport.
//!
//! The design (ARCHITECTURE.md, "Replication"): one Raft group for membership and placement
//! (every replica a voter; its state machine is the shard map: which replica leads which shard,
//! with an epoch per shard) and one store group whose log carries every write of the storage
//! seam (a group per shard is the next step; ARCHITECTURE.md says why not yet).
//! - `log`: the Raft log of any group, in sled, large entries in a value log
//!   ([`log::SledLog`]).
//! - `placement`: the membership and placement state machine and how shards are spread.
//! - `store`: the store group's state machine, and the storage seam on it
//!   ([`store::ReplicatedStore`]: writes committed on a quorum, reads local); `snapshot`, its
//!   snapshots as files, never the whole store in memory.
//! - `network`: the gRPC transport (`mermin.replica.v1.Raft`), one service for every group.
//! - [`Replica`]: one replica's groups started on its data dir and served on its listener;
//!   bootstrap as a StatefulSet does it (replica 0 initialises, the others ask to join).

// openraft's storage error (~200 B) is what its storage traits return; the helpers return it
// as it is rather than boxing it only to unbox it at the trait.
#![expect(clippy::result_large_err)]

pub mod log;
pub mod network;
pub mod placement;
mod replica;
mod snapshot;
pub mod store;

pub use self::replica::{
    RaftTuning, Replica, ReplicaTls, identity, membership_settled, ordinal,
    start_over_if_half_installed, take_out,
};

/// A replica's Raft node id: its StatefulSet ordinal in the upper 32 bits, the incarnation of
/// its data dir in the lower ([`identity`]).
pub type ReplicaId = u64;

/// The membership and placement group's name on the wire.
pub const PLACEMENT_GROUP: &str = "placement";

/// The store group's name on the wire.
pub const STORE_GROUP: &str = "store";

/// A snapshot's name: the last log id it holds and its size in bytes (two snapshots of one
/// state have the same name on every replica).
fn snapshot_id(last_applied: Option<&openraft::LogId<ReplicaId>>, size: u64) -> String {
    match last_applied {
        Some(id) => format!("{}-{}-{size}", id.leader_id, id.index),
        None => format!("empty-{size}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replica store: {0}")]
    Store(#[from] sled::Error),
    #[error("replica store: corrupt {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("starting Raft: {0}")]
    Start(String),
    /// This replica does not lead the group; `leader` does, if one is known.
    #[error("not the leader of the group (leader: {leader:?})")]
    NotLeader { leader: Option<ReplicaId> },
    #[error("Raft: {0}")]
    Raft(String),
    /// A membership change the cluster did not make.
    #[error("membership: {0}")]
    Membership(String),
}
