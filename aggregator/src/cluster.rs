//! The aggregator as one replica of a cluster (`replication { ordinal = N, peers = [...] }`).
//!
//! The replica joins its peers (`replication`); the pipeline (`pipeline::Aggregator`) runs on
//! the replica that leads the store group, on the replicated store. The others stand by:
//! `/livez` answers ok while their Raft groups run, `/readyz` answers 503 naming the leader —
//! so that the agents' Service sends them to the leader only — and the first replica to lead
//! after it fails takes over: it recovers every acknowledged flow from the replicated store, as
//! a restarted single aggregator does from its disk, and the agents replay what was not yet
//! acknowledged. A leader that loses its term stops its pipeline at once; what it had
//! acknowledged is on a quorum already.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use openraft::{BasicNode, RaftMetrics};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::gauge::ConstGauge,
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    metrics::Metrics,
    pipeline::{Aggregator, AggregatorConfig, StartError},
    replication::{Replica, ReplicaId, ReplicationError, Timings, identity},
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
    pub timings: Timings,
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
    let id = identity(&config.data_dir, cluster.ordinal)?;
    let listener =
        TcpListener::bind(cluster.listen)
            .await
            .map_err(|source| ClusterError::Bind {
                addr: cluster.listen,
                source,
            })?;
    let replica = Replica::start(
        id,
        listener,
        cluster.advertise.clone(),
        &config.data_dir,
        cluster.timings,
    )
    .await?;
    tracing::info!(replica = id, address = replica.address(), "replica started");
    let joined = tokio::select! {
        joined = replica.join(&cluster.peers, JOIN_RETRY) => joined.map_err(ClusterError::from),
        _ = until(&mut stop, |stopped| *stopped) => Ok(()),
    };
    let result = match joined {
        Ok(()) if !*stop.borrow() => {
            lead_when_elected(&replica, &config, cluster.timings, stop).await
        }
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
    timings: Timings,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ClusterError> {
    let id = replica.id();
    let view = ReplicaView {
        id,
        store: replica.store_metrics(),
        membership: replica.membership_metrics(),
    };
    let mut store = replica.store_metrics();
    loop {
        let standby = config
            .metrics_listen
            .map(|addr| standby_endpoint(addr, view.clone()));
        let elected = tokio::select! {
            _ = until(&mut store, |m| m.current_leader == Some(id)) => replica.lead_store().await.is_ok(),
            _ = until(&mut stop, |stopped| *stopped) => false,
        };
        if let Some(standby) = standby {
            standby.abort();
            let _ = standby.await;
        }
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
        metrics.register(|registry| {
            registry
                .sub_registry_with_prefix("replica")
                .register_collector(Box::new(view.clone()))
        });
        let aggregator = Aggregator::start_with(config.clone(), replica.store(), metrics).await?;
        tokio::select! {
            _ = until(&mut store, |m| m.current_leader != Some(id)) => {
                tracing::warn!(replica = id, "no longer leads the store group: stopping the aggregator");
            }
            _ = quorum_lost(replica, timings) => {
                tracing::warn!(
                    replica = id,
                    "no quorum of the store group answers: stopping the aggregator"
                );
            }
            _ = until(&mut stop, |stopped| *stopped) => {}
        }
        // Writes still waiting for a quorum fail now, so the stop waits on none of them.
        replica.fence_store(true);
        aggregator.shutdown().await;
        if *stop.borrow() {
            return Ok(());
        }
    }
}

/// Returns once this replica, leading the store group, has not heard from a quorum of it for
/// twice the longest election timeout: by then the others have elected another leader, which
/// exports from now on (so two replicas export at once for at most that long, the same spans).
async fn quorum_lost(replica: &Replica, timings: Timings) {
    let bound = timings.election_timeout.1 * 2;
    loop {
        tokio::time::sleep(timings.heartbeat * 5).await;
        if !matches!(
            tokio::time::timeout(bound, replica.lead_store()).await,
            Ok(Ok(()))
        ) {
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

/// Serves the standby's `/livez`, `/readyz` and `/metrics` on `addr` until aborted (a failed
/// bind is logged and retried: the pipeline that served there may still be letting go of it).
fn standby_endpoint(addr: SocketAddr, view: ReplicaView) -> JoinHandle<()> {
    tokio::spawn(async move {
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(err) => {
                    tracing::warn!(%addr, %err, "standby endpoint: binding again shortly");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        if let Err(err) = axum::serve(listener, standby_router(view)).await {
            tracing::error!(%err, "standby endpoint failed");
        }
    })
}

/// What a standby replica answers (see the module docs).
fn standby_router(view: ReplicaView) -> axum::Router {
    use axum::{http::StatusCode, routing::get};
    let mut registry = Registry::with_prefix("mermin_aggregator");
    registry
        .sub_registry_with_prefix("replica")
        .register_collector(Box::new(view.clone()));
    let registry = Arc::new(registry);
    let live = view.store.clone();
    let ready = view.store.clone();
    let id = view.id;
    axum::Router::new()
        .route(
            "/livez",
            get(move || {
                let running = live.borrow().running_state.clone();
                async move {
                    match running {
                        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
                        Err(fatal) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("the store group stopped: {fatal}\n"),
                        ),
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let leader = ready.borrow().current_leader;
                async move {
                    let why = match leader {
                        Some(leader) if leader == id => {
                            "standing by: this replica leads the store group but no quorum of it answers\n"
                                .to_owned()
                        }
                        Some(leader) => format!(
                            "standing by: replica {leader} leads the store group and takes the agents' batches\n"
                        ),
                        None => "standing by: the store group has no leader right now\n".to_owned(),
                    };
                    (StatusCode::SERVICE_UNAVAILABLE, why)
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let mut text = String::new();
                // Writing to a String cannot fail.
                let _ = encode(&mut text, &registry);
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
}

/// This replica's view of both Raft groups, read at each scrape of `/metrics` (the standby's
/// and the pipeline's): its own `id`, `<group>_leader` (-1: none), `_term`, `_last_applied`, `_voters`, and
/// on the store group's leader `store_replication_lag{replica}`, the entries each other
/// replica has yet to take.
#[derive(Debug, Clone)]
struct ReplicaView {
    id: ReplicaId,
    store: watch::Receiver<RaftMetrics<ReplicaId, BasicNode>>,
    membership: watch::Receiver<RaftMetrics<ReplicaId, BasicNode>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabel {
    replica: String,
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
