//! A replica's view of its cluster, as both Raft groups' metrics show it to this replica: what
//! `/metrics` reports (the standby's and the pipeline's), and where the store group's leader is.

use openraft::{BasicNode, RaftMetrics};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::Counter, family::Family, gauge::ConstGauge},
    registry::Registry,
};
use tokio::sync::watch;

use crate::{
    metrics::EndpointReasonLabel,
    replication::{
        ReplicaId, membership_settled,
        placement::{Lease, ShardMap},
    },
};

/// What every `/metrics` of a replica shows of it, under `mermin_aggregator_replica_`: its
/// [`ReplicaView`], and the handshakes its replication port refused (with TLS between
/// replicas), by reason.
#[derive(Debug, Clone)]
pub struct ReplicaMetrics {
    pub view: ReplicaView,
    pub handshake_failures: Family<EndpointReasonLabel, Counter>,
}

impl ReplicaMetrics {
    /// Registers them in `registry` (the standby's or the pipeline's).
    pub fn register(&self, registry: &mut Registry) {
        let replica = registry.sub_registry_with_prefix("replica");
        replica.register_collector(Box::new(self.view.clone()));
        replica.register(
            "tls_handshake_failures",
            "Replica connections refused in the TLS handshake, by reason",
            self.handshake_failures.clone(),
        );
    }
}

/// This replica's view of both Raft groups, read at each scrape of `/metrics` (the standby's
/// and the pipeline's): its own `id`, `shard_lease_{replica,epoch}{shard}` (the shard map),
/// `<group>_leader` (-1: none), `_term`, `_last_applied`, `_voters`, `_voters_changing`, and
/// on the store group's leader `store_replication_lag{replica}`, the entries each other
/// replica has yet to take.
#[derive(Debug, Clone)]
pub struct ReplicaView {
    pub id: ReplicaId,
    pub store: watch::Receiver<RaftMetrics<ReplicaId, BasicNode>>,
    pub membership: watch::Receiver<RaftMetrics<ReplicaId, BasicNode>>,
    /// The shard map as this replica applied it.
    pub shards: watch::Receiver<ShardMap>,
}

impl ReplicaView {
    /// The store group's leader, if this replica knows one other than itself, and where it
    /// listens on `port`: the host of its advertised replication address (the replicas of a
    /// StatefulSet all listen on the same ports).
    pub fn leader_at(&self, port: u16) -> Option<(ReplicaId, String)> {
        let metrics = self.store.borrow();
        let leader = metrics.current_leader.filter(|&leader| leader != self.id)?;
        let node = metrics.membership_config.membership().get_node(&leader)?;
        let (host, _) = node.addr.rsplit_once(':')?;
        Some((leader, format!("{host}:{port}")))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabel {
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: String,
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

impl Collector for ReplicaView {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Copied out at once: the watch's read lock must not be held (see `until`).
        let store = self.store.borrow().clone();
        let membership = self.membership.borrow().clone();
        gauge(
            &mut encoder,
            "id",
            "This replica's id: its ordinal in the upper 32 bits, its data dir's incarnation in the lower",
            self.id as i64,
        )?;
        for (group, name, metrics) in [
            ("store", "the store group", &store),
            (
                "membership",
                "the membership and placement group",
                &membership,
            ),
        ] {
            let as_seen = "as this replica knows it";
            gauge(
                &mut encoder,
                &format!("{group}_leader"),
                &format!("The replica id that leads {name} {as_seen} (-1: none)"),
                metrics.current_leader.map_or(-1, |leader| leader as i64),
            )?;
            gauge(
                &mut encoder,
                &format!("{group}_term"),
                &format!("The Raft term of {name} {as_seen}"),
                metrics.current_term as i64,
            )?;
            gauge(
                &mut encoder,
                &format!("{group}_last_applied"),
                &format!("The index of the last entry of {name} this replica applied"),
                metrics.last_applied.map_or(0, |id| id.index as i64),
            )?;
            gauge(
                &mut encoder,
                &format!("{group}_voters"),
                &format!("The voters of {name} {as_seen} (a quorum of them must be up)"),
                metrics.membership_config.membership().voter_ids().count() as i64,
            )?;
            gauge(
                &mut encoder,
                &format!("{group}_voters_changing"),
                &format!(
                    "1 while a change of {name}'s voters is under way {as_seen} (a joint configuration, or one not applied yet: `_voters` counts both sides)"
                ),
                i64::from(!membership_settled(metrics)),
            )?;
        }
        let shards = self.shards.borrow().clone();
        for (name, help, value) in [
            (
                "shard_lease_replica",
                "The replica that holds each shard's lease in the shard map as this replica applied it",
                (|lease: &Lease| lease.replica as i64) as fn(&Lease) -> i64,
            ),
            (
                "shard_lease_epoch",
                "Each shard's lease epoch (one more at every move) as this replica applied it",
                |lease: &Lease| lease.epoch as i64,
            ),
        ] {
            let gauge = ConstGauge::new(0i64);
            let mut family = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            for (shard, lease) in &shards {
                let label = ShardLabel {
                    shard: shard.to_string(),
                };
                ConstGauge::new(value(lease)).encode(family.encode_family(&label)?)?;
            }
        }
        if let Some(replication) = &store.replication {
            let last = store.last_log_index.unwrap_or(0);
            let lag = ConstGauge::new(0i64);
            let mut family = encoder.encode_descriptor(
                "store_replication_lag",
                "Entries of the store group's log a replica has yet to take (on the leader only)",
                None,
                lag.metric_type(),
            )?;
            for (replica, matched) in replication.iter().filter(|(r, _)| **r != self.id) {
                let behind = last.saturating_sub(matched.map_or(0, |m| m.index)) as i64;
                let label = ReplicaLabel {
                    replica: replica.to_string(),
                };
                ConstGauge::new(behind).encode(family.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}
