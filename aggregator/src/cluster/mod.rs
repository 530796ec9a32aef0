//! The aggregator as one replica of a cluster (`replication { ordinal = N, peers = [...] }`).
//!
//! The replica joins its peers (`replication`); the pipeline (`pipeline::Aggregator`) runs on
//! the replica that leads the store group, on the replicated store. The others stand by
//! (`standby`): they forward the agents' and operators' connections to the leader, and the
//! first replica to lead after it fails takes over: it recovers every acknowledged flow from
//! the replicated store, as a restarted single aggregator does from its disk, and the agents
//! replay what was not yet acknowledged. A leader that loses its term, or hears from no quorum
//! for a while, stops its pipeline; what it had acknowledged is on a quorum already. `view`
//! is what each replica reports of the cluster, `admin` what the admin API shows and changes.

mod admin;
mod standby;
mod view;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};

use prometheus_client::metrics::{counter::Counter, family::Family};

use self::{
    admin::ReplicaAdmin,
    standby::Standby,
    view::{ReplicaMetrics, ReplicaView},
};
use crate::{
    metrics::{EndpointReasonLabel, Metrics},
    pipeline::{Aggregator, AggregatorConfig, ServerTlsConfig, StartError},
    replication::{
        RaftTuning, Replica, ReplicaTls, ReplicationError, identity, start_over_if_half_installed,
    },
};

/// How often a replica that is not yet a member asks its peers again.
const JOIN_RETRY: Duration = Duration::from_millis(500);

/// A replica's place in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The StatefulSet ordinal (`apps.kubernetes.io/pod-index`); ordinal 0 starts the cluster.
    pub ordinal: u32,
    /// Where the replica-to-replica service listens.
    pub listen: SocketAddr,
    /// Where the other replicas reach this one (host:port; `listen` if unset).
    pub advertise: Option<String>,
    /// The replicas' advertised addresses (this one's is skipped), for joining.
    pub peers: Vec<String>,
    pub timings: RaftTuning,
    /// Mutual TLS between replicas; `None`: plaintext.
    pub tls: Option<ServerTlsConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot listen for replicas on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Replication(#[from] ReplicationError),
    #[error("{0}")]
    Start(#[from] StartError),
}

impl ClusterError {
    /// The process exit code: 3 for the environment (a port, the data dir), else as the
    /// pipeline's start error says, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClusterError::Bind { .. }
            | ClusterError::Replication(ReplicationError::Store(_))
            | ClusterError::Replication(ReplicationError::Corrupt { .. }) => 3,
            ClusterError::Start(err) => err.exit_code(),
            ClusterError::Replication(_) => 1,
        }
    }
}

/// Runs this replica until `stop` turns true (see the module docs).
pub async fn run(
    config: AggregatorConfig,
    cluster: ClusterConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ClusterError> {
    start_over_if_half_installed(&config.data_dir)?;
    let id = identity(&config.data_dir, cluster.ordinal)?;
    let listener =
        TcpListener::bind(cluster.listen)
            .await
            .map_err(|source| ClusterError::Bind {
                addr: cluster.listen,
                source,
            })?;
    // Counted in both the standby's and the pipeline's metrics.
    let handshake_failures = Family::<EndpointReasonLabel, Counter>::default();
    let tls = cluster.tls.clone().map(|tls| ReplicaTls {
        files: tls.files,
        reload_interval: tls.reload_interval,
        failures: handshake_failures.clone(),
    });
    let replica = Replica::start(
        id,
        listener,
        cluster.advertise.clone(),
        &config.data_dir,
        cluster.timings,
        tls,
    )
    .await?;
    tracing::info!(replica = id, address = replica.address(), "replica started");
    let joined = tokio::select! {
        joined = replica.join(&cluster.peers, JOIN_RETRY) => joined.map_err(ClusterError::from),
        _ = until(&mut stop, |stopped| *stopped) => Ok(()),
    };
    let result = match joined {
        Ok(()) if !*stop.borrow() => tokio::select! {
            led = lead_when_elected(&replica, &config, cluster.timings, handshake_failures, stop) => led,
            never = lease_shards(&replica, cluster.timings) => match never {},
        },
        other => other,
    };
    replica.shutdown().await;
    result
}

/// Stands by until this replica leads the store group, runs the pipeline while it does, and
/// again, until `stop`.
async fn lead_when_elected(
    replica: &Replica,
    config: &AggregatorConfig,
    timings: RaftTuning,
    handshake_failures: Family<EndpointReasonLabel, Counter>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ClusterError> {
    let id = replica.id();
    let view = ReplicaView {
        id,
        store: replica.store_metrics(),
        membership: replica.membership_metrics(),
        shards: replica.shard_map(),
    };
    let replica_metrics = ReplicaMetrics {
        view: view.clone(),
        handshake_failures,
    };
    let mut store = replica.store_metrics();
    loop {
        let standby = Standby::start(config, &replica_metrics);
        let elected = tokio::select! {
            _ = until(&mut store, |m| m.current_leader == Some(id)) => replica.lead_store().await.is_ok(),
            _ = until(&mut stop, |stopped| *stopped) => false,
        };
        standby.stop().await;
        if *stop.borrow() {
            return Ok(());
        }
        if !elected {
            continue;
        }
        tracing::info!(
            replica = id,
            "leading the store group: starting the aggregator"
        );
        replica.fence_store(false);
        let mut metrics = Metrics::new();
        metrics.register(|registry| replica_metrics.register(registry));
        let cluster = Arc::new(ReplicaAdmin {
            view: view.clone(),
            transport: replica.transport(),
            agent_port: config.listen.port(),
        });
        let aggregator =
            Aggregator::start_with(config.clone(), replica.store(), metrics, Some(cluster)).await?;
        let deposed = tokio::select! {
            _ = until(&mut store, |m| m.current_leader != Some(id)) => {
                tracing::warn!(replica = id, "no longer leads the store group: stopping the aggregator");
                true
            }
            _ = quorum_lost(replica, timings) => {
                tracing::warn!(
                    replica = id,
                    "no quorum of the store group answers: stopping the aggregator"
                );
                true
            }
            _ = until(&mut stop, |stopped| *stopped) => false,
        };
        // Writes still waiting for a quorum fail now, so the stop waits on none of them.
        replica.fence_store(true);
        if deposed {
            aggregator.abort().await;
        } else {
            aggregator.shutdown().await;
        }
        if *stop.borrow() {
            return Ok(());
        }
    }
}

/// Keeps the shard map saying that the store group's leader leads every shard (acts on the
/// membership group's leader only; checks every second).
async fn lease_shards(replica: &Replica, timings: RaftTuning) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(timings.heartbeat * 5).await;
        match replica.lease_shards_to_store_leader().await {
            Ok(placed) if !placed.applied.is_empty() => tracing::info!(
                moved = placed.applied.len(),
                to = ?placed.applied.first().map(|m| m.replica),
                "shards leased to the store group's leader"
            ),
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "leasing the shards to the store group's leader"),
        }
    }
}

/// Returns once this replica, leading the store group, has not heard from a quorum of it for
/// twice the longest election timeout: by then the others have elected another leader, which
/// exports from now on (so two replicas export at once for at most that long, the same spans).
/// Checked by a heartbeat round every second, not a read: a busy leader whose applying lags
/// is not taken for a cut-off one.
async fn quorum_lost(replica: &Replica, timings: RaftTuning) {
    let bound = timings.election_timeout.1 * 2;
    loop {
        tokio::time::sleep(timings.heartbeat * 5).await;
        let confirmed = tokio::time::timeout(bound, replica.confirm_store_leadership()).await;
        if !matches!(confirmed, Ok(Ok(()))) {
            return;
        }
    }
}

/// Waits until `value` satisfies `done` (or its sender is gone). The watch's read lock is let go
/// before this returns: held on (as `wait_for`'s guard would be, through a `select!` arm), it
/// would block the Raft core's next metrics update, and with it the core.
async fn until<T>(value: &mut watch::Receiver<T>, done: impl FnMut(&T) -> bool) {
    let _ = value.wait_for(done).await.map(drop);
}
