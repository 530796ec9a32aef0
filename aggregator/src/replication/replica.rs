//! One replica: its sled database, the membership and placement group on it, and the gRPC
//! server its peers reach it on.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use openraft::{
    BasicNode, ChangeMembers, Config, Raft,
    error::{ClientWriteError, RaftError},
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;

use super::{
    PLACEMENT_GROUP, ReplicaId, ReplicationError,
    log::SledLog,
    network::{Groups, GrpcNetwork},
    placement::{Placed, PlacementCommand, PlacementGroup, PlacementMachine, ShardMap, rebalance},
};
use crate::placement::SHARDS;

/// Raft's clock: how often a leader shows it is alive, and how long a follower waits before
/// it stands for election (a random time in the range, so that two rarely stand at once).
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub heartbeat: Duration,
    pub election_timeout: (Duration, Duration),
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(200),
            election_timeout: (Duration::from_millis(1000), Duration::from_millis(2000)),
        }
    }
}

/// One replica (see the module docs).
pub struct Replica {
    id: ReplicaId,
    address: SocketAddr,
    placement: Raft<PlacementGroup>,
    machine: PlacementMachine,
    server: JoinHandle<()>,
}

fn raft_error<E: std::error::Error>(error: RaftError<ReplicaId, E>) -> ReplicationError {
    ReplicationError::Raft(error.to_string())
}

fn write_error(
    error: RaftError<ReplicaId, ClientWriteError<ReplicaId, BasicNode>>,
) -> ReplicationError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            ReplicationError::NotLeader {
                leader: forward.leader_id,
            }
        }
        other => raft_error(other),
    }
}

impl Replica {
    /// Opens (or creates) the replica's database in `data_dir`, starts its Raft groups and
    /// serves them on `listener`. A replica that has state rejoins with it.
    pub async fn start(
        id: ReplicaId,
        listener: TcpListener,
        data_dir: &Path,
        timings: Timings,
    ) -> Result<Self, ReplicationError> {
        let address = listener
            .local_addr()
            .map_err(|e| ReplicationError::Start(format!("the replica's listener: {e}")))?;
        let db = sled::open(data_dir.join("replica"))?;
        let config = Config {
            cluster_name: "mermin".to_owned(),
            heartbeat_interval: timings.heartbeat.as_millis() as u64,
            election_timeout_min: timings.election_timeout.0.as_millis() as u64,
            election_timeout_max: timings.election_timeout.1.as_millis() as u64,
            ..Config::default()
        }
        .validate()
        .map_err(|e| ReplicationError::Start(e.to_string()))?;
        let machine = PlacementMachine::open(&db)?;
        let placement = Raft::new(
            id,
            Arc::new(config),
            GrpcNetwork::new(PLACEMENT_GROUP),
            SledLog::<PlacementGroup>::open(&db, PLACEMENT_GROUP)?,
            machine.clone(),
        )
        .await
        .map_err(|e| ReplicationError::Start(e.to_string()))?;
        let groups = Groups::default();
        groups.add(PLACEMENT_GROUP, placement.clone());
        let server = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(groups.service())
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the replica's Raft server stopped");
            }
        });
        Ok(Self {
            id,
            address,
            placement,
            machine,
            server,
        })
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }

    /// Where peers reach this replica.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Makes this replica a cluster of one, if it has never been part of a cluster (what
    /// replica 0 does on its first start; a no-op on every later start).
    pub async fn bootstrap(&self) -> Result<(), ReplicationError> {
        if self
            .placement
            .is_initialized()
            .await
            .map_err(|e| ReplicationError::Raft(e.to_string()))?
        {
            return Ok(());
        }
        let members = BTreeMap::from([(self.id, BasicNode::new(self.address))]);
        self.placement
            .initialize(members)
            .await
            .map_err(|e| match e {
                RaftError::APIError(e) => ReplicationError::Raft(e.to_string()),
                RaftError::Fatal(e) => ReplicationError::Raft(e.to_string()),
            })
    }

    /// Adds replica `id` at `address` as a voter (on the leader): it first catches up as a
    /// learner, then joins the voters.
    pub async fn add_member(
        &self,
        id: ReplicaId,
        address: SocketAddr,
    ) -> Result<(), ReplicationError> {
        self.placement
            .add_learner(id, BasicNode::new(address), true)
            .await
            .map_err(write_error)?;
        self.placement
            .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
            .await
            .map_err(write_error)?;
        Ok(())
    }

    /// Removes replica `id` from the voters (on the leader); its shards are placed again by the
    /// next [`Replica::rebalance`].
    pub async fn remove_member(&self, id: ReplicaId) -> Result<(), ReplicationError> {
        self.placement
            .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
            .await
            .map_err(write_error)?;
        Ok(())
    }

    /// Spreads the shards over the current voters (on the leader), moving as few as possible;
    /// returns the moves applied.
    pub async fn rebalance(&self) -> Result<Placed, ReplicationError> {
        let voters = self
            .placement
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        let moves = rebalance(&self.machine.shard_map().borrow(), &voters, SHARDS);
        if moves.is_empty() {
            return Ok(Placed::default());
        }
        let written = self
            .placement
            .client_write(PlacementCommand::Place(moves))
            .await
            .map_err(write_error)?;
        Ok(written.data)
    }

    /// The shard map as this replica has applied it, following every change.
    pub fn shard_map(&self) -> watch::Receiver<ShardMap> {
        self.machine.shard_map()
    }

    /// The membership group's leader as this replica knows it.
    pub fn leader(&self) -> Option<ReplicaId> {
        self.placement.metrics().borrow().current_leader
    }

    /// This replica's Raft metrics for the membership group (term, leader, log indexes).
    pub fn metrics(&self) -> watch::Receiver<openraft::RaftMetrics<ReplicaId, BasicNode>> {
        self.placement.metrics()
    }

    /// Stops the groups and the server; what is durable stays in the data dir.
    pub async fn shutdown(self) {
        if let Err(e) = self.placement.shutdown().await {
            tracing::warn!(error = %e, "stopping the placement group");
        }
        self.server.abort();
        let _ = self.server.await;
    }
}
