//! The admin API's view and operations of the cluster on a replica ([`ClusterAdmin`]): the
//! members and the shards as this replica's Raft groups show them, and draining or removing a
//! member through the membership group's leader.

use futures_util::{FutureExt, future::BoxFuture};
use mermin_protocol::admin::v1::{Cluster, Member, Role, ShardPlacement, ShardReplica};
use openraft::{BasicNode, RaftMetrics};
use tonic::Status;

use super::view::ReplicaView;
use crate::{
    admin::ClusterAdmin,
    placement::SHARDS,
    replication::{ReplicaId, network::Transport, take_out},
};

/// A replica's [`ClusterAdmin`]; members are shown at their host and this replica's agent port
/// (every replica of a StatefulSet listens on the same one).
pub struct ReplicaAdmin {
    pub view: ReplicaView,
    pub transport: Transport,
    pub agent_port: u16,
}

/// The voters and learners of a group, by id, with their role in it.
fn roles(metrics: &RaftMetrics<ReplicaId, BasicNode>) -> Vec<(ReplicaId, Role)> {
    let membership = metrics.membership_config.membership();
    let role = |id| match metrics.current_leader {
        Some(leader) if leader == id => Role::Leader,
        _ => Role::Follower,
    };
    let mut roles: Vec<(ReplicaId, Role)> =
        membership.voter_ids().map(|id| (id, role(id))).collect();
    roles.extend(membership.learner_ids().map(|id| (id, Role::Learner)));
    roles.sort_unstable();
    roles
}

impl ClusterAdmin for ReplicaAdmin {
    fn cluster(&self) -> Cluster {
        // Copied out at once: the watches' read locks must not be held.
        let store = self.view.store.borrow().clone();
        let membership = self.view.membership.borrow().clone();
        let leader = store.current_leader;
        let nodes = membership.membership_config.membership();
        let members = roles(&membership)
            .into_iter()
            .map(|(id, _)| Member {
                id: id.to_string(),
                address: nodes
                    .get_node(&id)
                    .and_then(|node| node.addr.rsplit_once(':'))
                    .map(|(host, _)| format!("{host}:{}", self.agent_port))
                    .unwrap_or_default(),
                leader_of_shards: if leader == Some(id) {
                    u32::from(SHARDS)
                } else {
                    0
                },
            })
            .collect();
        let last = store.last_log_index.unwrap_or(0);
        // The followers' lag, as `/metrics` shows it: the leader's own entry is its disk.
        let commit_lag = store.replication.as_ref().map_or(0, |followers| {
            followers
                .iter()
                .filter(|(follower, _)| **follower != self.view.id)
                .map(|(_, matched)| last.saturating_sub(matched.map_or(0, |m| m.index)))
                .max()
                .unwrap_or(0)
        });
        let replicas: Vec<ShardReplica> = roles(&store)
            .into_iter()
            .map(|(id, role)| ShardReplica {
                member: id.to_string(),
                role: role as i32,
            })
            .collect();
        Cluster {
            self_id: self.view.id.to_string(),
            members,
            shards: (0..SHARDS)
                .map(|shard| ShardPlacement {
                    shard: u32::from(shard),
                    leader: leader.map(|l| l.to_string()).unwrap_or_default(),
                    term: store.current_term,
                    commit_lag,
                    replicas: replicas.clone(),
                })
                .collect(),
        }
    }

    fn remove_member(&self, id: &str) -> BoxFuture<'static, Result<(), Status>> {
        let Ok(id) = id.parse::<ReplicaId>() else {
            let refused = Status::invalid_argument(format!(
                "{id:?} is not a member id (the ids `mermin status` lists)"
            ));
            return futures_util::future::ready(Err(refused)).boxed();
        };
        let (membership, transport) = (self.view.membership.clone(), self.transport.clone());
        async move {
            take_out(&transport, &membership, id)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))
        }
        .boxed()
    }

    fn drain(&self) -> BoxFuture<'static, Result<(), Status>> {
        self.remove_member(&self.view.id.to_string())
    }
}
