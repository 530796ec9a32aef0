//! One replica: its sled databases, the membership and placement group and the store group on
//! them, and the gRPC server its peers reach it on.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use openraft::{
    BasicNode, ChangeMembers, Config, Raft, ServerState,
    error::{ClientWriteError, RaftError},
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;

use super::{
    PLACEMENT_GROUP, ReplicaId, ReplicationError, STORE_GROUP,
    log::SledLog,
    network::{Groups, GrpcNetwork},
    placement::{Placed, PlacementCommand, PlacementGroup, PlacementMachine, ShardMap, rebalance},
    store::{ReplicatedStore, StoreGroup, StoreMachine},
};
use crate::{placement::SHARDS, store::Store};

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
    store_group: Raft<StoreGroup>,
    store: Arc<ReplicatedStore>,
    server: JoinHandle<()>,
    membership: JoinHandle<()>,
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

/// Makes `raft`'s group a cluster of `members`, unless it has been initialised before.
async fn initialize<C>(
    raft: &Raft<C>,
    members: BTreeMap<ReplicaId, BasicNode>,
) -> Result<(), ReplicationError>
where
    C: openraft::RaftTypeConfig<NodeId = ReplicaId, Node = BasicNode>,
{
    if raft
        .is_initialized()
        .await
        .map_err(|e| ReplicationError::Raft(e.to_string()))?
    {
        return Ok(());
    }
    raft.initialize(members)
        .await
        .map_err(|e| ReplicationError::Raft(e.to_string()))
}

/// Adds replica `id` at `address` to `raft`'s group (on its leader): first as a learner that
/// catches up, then as a voter.
async fn add_voter<C>(
    raft: &Raft<C>,
    id: ReplicaId,
    node: BasicNode,
) -> Result<(), ReplicationError>
where
    C: openraft::RaftTypeConfig<
            NodeId = ReplicaId,
            Node = BasicNode,
            Responder = openraft::impls::OneshotResponder<C>,
        >,
{
    raft.add_learner(id, node, true)
        .await
        .map_err(write_error)?;
    raft.change_membership(ChangeMembers::AddVoterIds([id].into()), false)
        .await
        .map_err(write_error)?;
    Ok(())
}

/// The voters of a group and where they are.
fn voters(metrics: &openraft::RaftMetrics<ReplicaId, BasicNode>) -> BTreeMap<ReplicaId, BasicNode> {
    let membership = metrics.membership_config.membership();
    membership
        .voter_ids()
        .filter_map(|id| Some((id, membership.get_node(&id)?.clone())))
        .collect()
}

/// Keeps the store group's voters those of the membership group (which
/// [`Replica::add_member`] and [`Replica::remove_member`] change), on whichever replica leads
/// the store group; checks every `interval` and retries what failed.
async fn follow_membership(
    members: watch::Receiver<openraft::RaftMetrics<ReplicaId, BasicNode>>,
    store_group: Raft<StoreGroup>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let (leads, current) = {
            let metrics = store_group.metrics();
            let metrics = metrics.borrow();
            (metrics.state == ServerState::Leader, voters(&metrics))
        };
        let desired = voters(&members.borrow());
        if !leads || desired.is_empty() || desired == current {
            continue;
        }
        // A member that moved is taken out first and added again at its new address.
        let gone: BTreeSet<ReplicaId> = current
            .iter()
            .filter(|(id, node)| desired.get(id) != Some(node))
            .map(|(id, _)| *id)
            .collect();
        if !gone.is_empty() {
            let removed = store_group
                .change_membership(ChangeMembers::RemoveVoters(gone), false)
                .await;
            if let Err(e) = removed {
                tracing::warn!(error = %e, "taking replicas out of the store group");
                continue;
            }
        }
        for (id, node) in desired {
            if current.get(&id) == Some(&node) {
                continue;
            }
            if let Err(e) = add_voter(&store_group, id, node).await {
                tracing::warn!(replica = id, error = %e, "adding a replica to the store group");
            }
        }
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
        let config = Arc::new(
            Config {
                cluster_name: "mermin".to_owned(),
                heartbeat_interval: timings.heartbeat.as_millis() as u64,
                election_timeout_min: timings.election_timeout.0.as_millis() as u64,
                election_timeout_max: timings.election_timeout.1.as_millis() as u64,
                ..Config::default()
            }
            .validate()
            .map_err(|e| ReplicationError::Start(e.to_string()))?,
        );
        let machine = PlacementMachine::open(&db)?;
        let placement = Raft::new(
            id,
            config.clone(),
            GrpcNetwork::new(PLACEMENT_GROUP),
            SledLog::<PlacementGroup>::open(&db, PLACEMENT_GROUP)?,
            machine.clone(),
        )
        .await
        .map_err(|e| ReplicationError::Start(e.to_string()))?;
        // The store's own database: a snapshot of the store group carries all its trees.
        let store_machine = StoreMachine::open(sled::open(data_dir.join("store"))?)
            .map_err(|e| ReplicationError::Start(e.to_string()))?;
        let store_group = Raft::new(
            id,
            config,
            GrpcNetwork::new(STORE_GROUP),
            SledLog::<StoreGroup>::open(&db, STORE_GROUP)?,
            store_machine.clone(),
        )
        .await
        .map_err(|e| ReplicationError::Start(e.to_string()))?;
        let store = Arc::new(ReplicatedStore::new(store_group.clone(), store_machine));
        let groups = Groups::default();
        groups.add(PLACEMENT_GROUP, placement.clone());
        groups.add(STORE_GROUP, store_group.clone());
        let server = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(groups.service())
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the replica's Raft server stopped");
            }
        });
        let membership = tokio::spawn(follow_membership(
            placement.metrics(),
            store_group.clone(),
            timings.heartbeat * 2,
        ));
        Ok(Self {
            id,
            address,
            placement,
            machine,
            store_group,
            store,
            server,
            membership,
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
        let members = BTreeMap::from([(self.id, BasicNode::new(self.address))]);
        initialize(&self.placement, members.clone()).await?;
        initialize(&self.store_group, members).await
    }

    /// Adds replica `id` at `address` as a voter (on the membership group's leader): it first
    /// catches up as a learner, then joins the voters. The store group follows.
    pub async fn add_member(
        &self,
        id: ReplicaId,
        address: SocketAddr,
    ) -> Result<(), ReplicationError> {
        add_voter(&self.placement, id, BasicNode::new(address)).await
    }

    /// Removes replica `id` from the voters (on the membership group's leader); its shards are
    /// placed again by the next [`Replica::rebalance`]. The store group follows.
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

    /// The storage seam on the store group: what the aggregator runs on while this replica
    /// leads the group.
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// The store group's voters as this replica knows them.
    pub fn store_voters(&self) -> BTreeSet<ReplicaId> {
        voters(&self.store_group.metrics().borrow())
            .into_keys()
            .collect()
    }

    /// The store group's leader as this replica knows it.
    pub fn store_leader(&self) -> Option<ReplicaId> {
        self.store_group.metrics().borrow().current_leader
    }

    /// Stops the groups and the server; what is durable stays in the data dir.
    pub async fn shutdown(self) {
        if let Err(e) = self.placement.shutdown().await {
            tracing::warn!(error = %e, "stopping the placement group");
        }
        if let Err(e) = self.store_group.shutdown().await {
            tracing::warn!(error = %e, "stopping the store group");
        }
        for task in [self.membership, self.server] {
            task.abort();
            let _ = task.await;
        }
    }
}
