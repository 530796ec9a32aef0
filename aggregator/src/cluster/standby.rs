//! What a replica serves while it does not run the pipeline: `/livez`, `/readyz` and `/metrics`
//! on the metrics port, and the agent and admin ports forwarded, connection by connection and
//! byte for byte, to the store group's leader — so that agents and operators reach the cluster
//! through any replica (one Kubernetes Service in front of all), TLS included (it ends at the
//! leader). A standby that knows a leader is Ready: it can take agent batches, for the leader.
//! The leader is reached at the host of its replication address, on the ports this replica
//! listens on (a StatefulSet's replicas all listen on the same ones).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

use super::view::{ReplicaMetrics, ReplicaView};
use crate::pipeline::AggregatorConfig;

/// How long a forwarded connection waits for the leader to accept it.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// The standby's endpoints, running until [`Standby::stop`].
pub struct Standby {
    tasks: JoinSet<()>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForwardLabel {
    endpoint: &'static str,
    outcome: &'static str,
}

/// Connections forwarded to the leader, by endpoint (`agent`, `admin`) and outcome
/// (`forwarded`; `no_leader`, `leader_unreachable` and `over_limit`: the connection was closed
/// at once, and the client tries again, as after any lost connection).
type Forwarded = Family<ForwardLabel, Counter>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: &'static str,
}

/// Connections being forwarded now, by endpoint.
type Forwarding = Family<EndpointLabel, Gauge>;

/// Connections forwarded at once per endpoint, at most (each holds two sockets): a cluster's
/// agents are spread over its replicas by the Service, so this is far above what one takes.
const MAX_FORWARDED: usize = 10_000;

/// What a forwarding endpoint counts.
#[derive(Clone, Default)]
struct ForwardMetrics {
    connections: Forwarded,
    open: Forwarding,
}

impl Standby {
    pub fn start(config: &AggregatorConfig, metrics: &ReplicaMetrics) -> Self {
        let view = metrics.view.clone();
        let forwarded = ForwardMetrics::default();
        let mut registry = Registry::with_prefix("mermin_aggregator");
        metrics.register(&mut registry);
        let replica = registry.sub_registry_with_prefix("replica");
        replica.register(
            "standby_connections",
            "Connections a standby replica took on the agent or admin port, by outcome",
            forwarded.connections.clone(),
        );
        replica.register(
            "standby_forwarding",
            "Connections a standby replica is forwarding to the leader now, by endpoint",
            forwarded.open.clone(),
        );
        let mut tasks = JoinSet::new();
        if let Some(addr) = config.metrics_listen {
            tasks.spawn(serve_probes(addr, view.clone(), Arc::new(registry)));
        }
        for (endpoint, addr) in [("agent", config.listen), ("admin", config.admin.listen)] {
            // Port 0 asks for any port: the leader's cannot be known.
            if addr.port() != 0 {
                tasks.spawn(forward(endpoint, addr, view.clone(), forwarded.clone()));
            }
        }
        Self { tasks }
    }

    /// Stops every endpoint and closes every forwarded connection.
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }
}

/// A listener on `addr`, bound again until it succeeds: the pipeline that served there may still
/// be letting go of it.
async fn bind(endpoint: &'static str, addr: SocketAddr) -> TcpListener {
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(err) => {
                tracing::warn!(endpoint, %addr, %err, "standby: binding again shortly");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Accepts on `addr` and splices each connection to the leader's `endpoint` port.
async fn forward(
    endpoint: &'static str,
    addr: SocketAddr,
    view: ReplicaView,
    counted: ForwardMetrics,
) {
    let listener = bind(endpoint, addr).await;
    // Dropped with this task: every spliced connection closes with it.
    let mut connections = JoinSet::new();
    loop {
        let mut inbound = match listener.accept().await {
            Ok((inbound, _)) => inbound,
            Err(err) => {
                tracing::warn!(endpoint, %err, "standby: accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_FORWARDED {
            count(&counted, endpoint, "over_limit");
            continue;
        }
        let Some((leader, target)) = view.leader_at(addr.port()) else {
            count(&counted, endpoint, "no_leader");
            continue;
        };
        let counted = counted.clone();
        connections.spawn(async move {
            let connected = tokio::time::timeout(CONNECT_WAIT, TcpStream::connect(&target)).await;
            let outcome = match connected {
                Ok(Ok(mut outbound)) => {
                    let _ = outbound.set_nodelay(true);
                    let _ = inbound.set_nodelay(true);
                    count(&counted, endpoint, "forwarded");
                    let open = counted.open.get_or_create(&EndpointLabel { endpoint }).clone();
                    open.inc();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    open.dec();
                    return;
                }
                Ok(Err(err)) => err.to_string(),
                Err(_) => format!("no answer within {} s", CONNECT_WAIT.as_secs()),
            };
            tracing::warn!(endpoint, leader, %target, reason = %outcome, "standby: the leader is out of reach");
            count(&counted, endpoint, "leader_unreachable");
        });
    }
}

fn count(counted: &ForwardMetrics, endpoint: &'static str, outcome: &'static str) {
    counted
        .connections
        .get_or_create(&ForwardLabel { endpoint, outcome })
        .inc();
}

/// Serves `/livez`, `/readyz` and `/metrics` on `addr`.
async fn serve_probes(addr: SocketAddr, view: ReplicaView, registry: Arc<Registry>) {
    let listener = bind("metrics", addr).await;
    if let Err(err) = axum::serve(listener, probes(view, registry)).await {
        tracing::error!(%err, "standby endpoint failed");
    }
}

/// What a standby replica answers (see the module docs).
fn probes(view: ReplicaView, registry: Arc<Registry>) -> axum::Router {
    use axum::{http::StatusCode, routing::get};
    let live = view.store.clone();
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
                let (known, voter) = {
                    let store = view.store.borrow();
                    let voters = store.membership_config.membership();
                    (store.current_leader, voters.voter_ids().any(|v| v == view.id))
                };
                let forwarding = view.leader_at(0).map(|(leader, _)| leader);
                let id = view.id;
                async move {
                    match (forwarding, known) {
                        _ if !voter => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "standing by: not a voter of the cluster (drained, or not admitted yet)\n"
                                .to_owned(),
                        ),
                        (Some(leader), _) => (
                            StatusCode::OK,
                            format!("ready: forwarding agents to replica {leader}, the store group's leader\n"),
                        ),
                        (None, Some(leader)) if leader == id => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "standing by: this replica leads the store group but no quorum of it answers\n"
                                .to_owned(),
                        ),
                        (None, _) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "standing by: the store group has no leader right now\n".to_owned(),
                        ),
                    }
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
