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
use prometheus_client::{encoding::text::encode, metrics::gauge::Gauge, registry::Registry};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
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
        Ok(()) if !*stop.borrow() => lead_when_elected(&replica, &config, stop).await,
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
    mut stop: watch::Receiver<bool>,
) -> Result<(), ClusterError> {
    let id = replica.id();
    let mut store = replica.store_metrics();
    loop {
        let standby = config
            .metrics_listen
            .map(|addr| standby_endpoint(addr, replica.store_metrics()));
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
        let aggregator = Aggregator::start_on(config.clone(), replica.store()).await?;
        tokio::select! {
            _ = until(&mut store, |m| m.current_leader != Some(id)) => {
                tracing::warn!(replica = id, "no longer leads the store group: stopping the aggregator");
            }
            _ = until(&mut stop, |stopped| *stopped) => {}
        }
        aggregator.shutdown().await;
        if *stop.borrow() {
            return Ok(());
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
fn standby_endpoint(
    addr: SocketAddr,
    store: watch::Receiver<RaftMetrics<ReplicaId, BasicNode>>,
) -> JoinHandle<()> {
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
        if let Err(err) = axum::serve(listener, standby_router(store)).await {
            tracing::error!(%err, "standby endpoint failed");
        }
    })
}

/// What a standby replica answers (see the module docs).
fn standby_router(store: watch::Receiver<RaftMetrics<ReplicaId, BasicNode>>) -> axum::Router {
    use axum::{http::StatusCode, routing::get};
    let metrics = Arc::new(StandbyMetrics::default());
    let live = store.clone();
    let ready = store.clone();
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
                let text = metrics.render(&store.borrow());
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

/// A standby replica's own metrics: where the store group stands as it sees it.
struct StandbyMetrics {
    registry: Registry,
    leader: Gauge,
    term: Gauge,
    last_applied: Gauge,
    voters: Gauge,
}

impl Default for StandbyMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mermin_aggregator_replica");
        let (leader, term, last_applied, voters) = (
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
        );
        registry.register(
            "store_leader",
            "The replica id that leads the store group as this replica knows it (-1: none)",
            leader.clone(),
        );
        registry.register(
            "store_term",
            "The store group's Raft term as this replica knows it",
            term.clone(),
        );
        registry.register(
            "store_last_applied",
            "The index of the store group's last log entry this replica applied",
            last_applied.clone(),
        );
        registry.register(
            "store_voters",
            "The store group's voters as this replica knows them (a quorum of them must be up)",
            voters.clone(),
        );
        Self {
            registry,
            leader,
            term,
            last_applied,
            voters,
        }
    }
}

impl StandbyMetrics {
    fn render(&self, store: &RaftMetrics<ReplicaId, BasicNode>) -> String {
        self.leader
            .set(store.current_leader.map_or(-1, |leader| leader as i64));
        self.term.set(store.current_term as i64);
        self.last_applied
            .set(store.last_applied.map_or(0, |id| id.index as i64));
        self.voters
            .set(store.membership_config.membership().voter_ids().count() as i64);
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}
