//! The aggregator's running parts and how data moves between them:
//!
//! ```text
//! ingest (one task per agent stream) --part of each batch, bounded mailboxes--> flow shards
//!   (actix actors; every tick: due intervals -> spans; checkpoint (changes + positions + spans))
//!   --> store outbox --OutboxChanged--> exporter (actix actor) --> OTLP endpoint
//! ```
//!
//! Start-up first rebuilds every shard's table from its last checkpoint and replays the batches
//! after its positions, then opens the agent endpoint. [`Aggregator::shutdown`] stops accepting
//! agents, flushes every pending interval through each shard's final checkpoint and stops.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use actix::Actor as _;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    actors::ActorRuntime,
    admin::{Admin, AdminError, ClusterAdmin},
    checkpoints::{CheckpointWriter, WriterThread},
    clock::unix_now,
    export::{ExportConfig, ExportError, Exporter},
    flow_table::FlowTable,
    hcl::ConfigError,
    ingest::{Ingest, IngestLimits},
    metadata::{
        AttributeNaming, IndexSettings, MetadataIndex, SharedIndex, kube::KubeWatchers, static_file,
    },
    metrics::{EndpointReasonLabel, Metrics},
    observation::Observation,
    observe::ObserveHub,
    shard::{self, SHARDS, ShardContext, ShardState, Shards, shard_of},
    stitch::InterfaceKinds,
    store::{OutboxQuota, SledStore, Store, StoreError, WhenFull},
    tls::{ServerTls, TlsError, TlsFiles},
};

#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// Where agents connect (gRPC).
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub export: ExportConfig,
    pub limits: IngestLimits,
    /// The export outbox's size limit and full policy; applied by ingest (backpressure) or the
    /// exporter (drop oldest).
    pub outbox: OutboxQuota,
    /// How long an interval waits for the other observation points' records.
    pub settle: Duration,
    /// How long a closed connection is remembered for late records.
    pub grace: Duration,
    /// How often the shards emit what is due and checkpoint.
    pub checkpoint_interval: Duration,
    /// Print a one-line summary of every emitted flow on standard output.
    pub print_flows: bool,
    /// Where `/metrics`, `/livez` and `/readyz` are served; `None` for none.
    pub metrics_listen: Option<SocketAddr>,
    pub metadata: MetadataConfig,
    pub admin: AdminConfig,
    /// Mutual TLS on the agent endpoint and the admin API; `None`: plaintext.
    pub tls: Option<ServerTlsConfig>,
    /// The CA operators' client certificates chain to, for the admin API alone (with `tls`);
    /// `None`: the admin API takes the agents' client CA too, and so an agent's certificate.
    pub admin_client_ca: Option<PathBuf>,
}

/// A server's TLS files and how often they are checked for changes.
#[derive(Debug, Clone)]
pub struct ServerTlsConfig {
    pub files: TlsFiles,
    pub reload_interval: Duration,
}

/// The admin API's port and what it keeps.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Flows kept for `observe --last N`.
    pub observe_ring: usize,
}

/// Where the names of a flow's ends come from, and which attribute names they get.
#[derive(Debug, Clone, Default)]
pub struct MetadataConfig {
    pub naming: AttributeNaming,
    pub index: IndexSettings,
    /// The static metadata file (HCL), read before anything starts.
    pub static_file: Option<PathBuf>,
    /// Watch the Kubernetes API (in-cluster, or the kubeconfig). If no client can be made the
    /// aggregator runs on the static file alone and says so.
    pub kubernetes: bool,
    /// How long start-up waits for the watchers' first full listing before the flow shards
    /// start (recovered intervals are due within the settle time and should carry names).
    pub first_sync_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("recovering the flow table: {0}")]
    Recover(String),
    #[error("starting the actor system: {0}")]
    Actors(std::io::Error),
    #[error(transparent)]
    MetadataFile(#[from] ConfigError),
    #[error("the admin API: {0}")]
    Admin(#[from] AdminError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

impl StartError {
    /// The process exit code for this failure: 2 for configuration (a bad endpoint or its TLS
    /// files, a bad metadata file), 3 for the environment (a port taken or not permitted, a data directory
    /// that cannot be opened), 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::MetadataFile(_)
            | StartError::Export(ExportError::Endpoint { .. } | ExportError::Tls(_))
            | StartError::Tls(_) => 2,
            StartError::Bind { .. } | StartError::Store(StoreError::Open { .. }) => 3,
            _ => 1,
        }
    }
}

/// How often the agent endpoint pings each connection, and how long it waits for the answer.
const AGENT_KEEPALIVE: Duration = Duration::from_secs(5);

/// How long a stop waits for the agent endpoint to close its streams.
const SERVER_STOP_WAIT: Duration = Duration::from_secs(10);
/// How long a stop waits for the checkpoint writer to end once the shards are gone.
const WRITER_STOP_WAIT: Duration = Duration::from_secs(5);

pub struct Aggregator {
    pub local_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    admin_server: JoinHandle<()>,
    shards: Shards,
    actors: ActorRuntime,
    checkpoint_writer: WriterThread,
    /// Held so that the watchers run as long as the aggregator.
    _watchers: Option<KubeWatchers>,
}

impl Aggregator {
    /// Starts on the sled store in `config.data_dir`.
    pub async fn start(config: AggregatorConfig) -> Result<Self, StartError> {
        let store = SledStore::open(&config.data_dir)?;
        Self::start_on(config, store).await
    }

    /// Starts on `store` (any implementation of the storage seam; `config.data_dir` unused).
    pub async fn start_on(config: AggregatorConfig, store: Store) -> Result<Self, StartError> {
        Self::start_with(config, store, Metrics::new(), None).await
    }

    /// As [`Aggregator::start_on`], as a replica of `cluster` (`None`: a single aggregator):
    /// serving `metrics` (with what the caller registered in it: the replica's view of its
    /// cluster) besides the pipeline's own, and the cluster in the admin API.
    pub async fn start_with(
        mut config: AggregatorConfig,
        store: Store,
        mut metrics: Metrics,
        cluster: Option<Arc<dyn ClusterAdmin>>,
    ) -> Result<Self, StartError> {
        match config.outbox.when_full {
            WhenFull::Backpressure => {
                config.limits.pause_above_outbox_bytes = Some(config.outbox.max_bytes)
            }
            WhenFull::DropOldest => {
                config.export.drop_oldest_above_bytes = Some(config.outbox.max_bytes)
            }
        }
        let mut index = MetadataIndex::new(&config.metadata.index);
        if let Some(path) = &config.metadata.static_file {
            index.set_static_entries(static_file::load(path)?);
        }
        let index = SharedIndex::new(index);
        let tls = match &config.tls {
            Some(tls) => Some((ServerTls::load(tls.files.clone())?, tls.reload_interval)),
            None => None,
        };
        // The admin API's own, when operators have a CA of their own.
        let admin_tls = match (&config.tls, &config.admin_client_ca) {
            (Some(tls), Some(client_ca)) => Some((
                ServerTls::load(TlsFiles {
                    client_ca: client_ca.clone(),
                    ..tls.files.clone()
                })?,
                tls.reload_interval,
            )),
            _ => None,
        };
        let watchers = if config.metadata.kubernetes {
            watch_kubernetes(index.clone(), &mut metrics).await
        } else {
            None
        };
        let metrics = Arc::new(metrics);
        let exporter = Exporter::new(store.clone(), config.export.clone(), metrics.clone())?;
        let bind_error = |what, addr| move |source| StartError::Bind { what, addr, source };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(bind_error("the agent endpoint", config.listen))?;
        let local_addr = listener
            .local_addr()
            .map_err(bind_error("the agent endpoint", config.listen))?;
        let admin_listener = TcpListener::bind(config.admin.listen)
            .await
            .map_err(bind_error("the admin endpoint", config.admin.listen))?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(bind_error("the admin endpoint", config.admin.listen))?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(bind_error("the metrics endpoint", addr))?,
            ),
            None => None,
        };
        let (stop, server_stop) = watch::channel(false);
        let states = recover(&store, config.settle, config.grace)?;
        if let Some(watchers) = &watchers {
            // Recovered intervals are due within the settle time: give the index its first full
            // listing first, so that their spans carry names (bounded: the API may be down).
            let mut synced = watchers.synced();
            let wait = config.metadata.first_sync_wait;
            if tokio::time::timeout(wait, synced.wait_for(|kinds| kinds.all()))
                .await
                .is_err()
            {
                tracing::warn!(
                    ?wait,
                    "Kubernetes metadata not synced yet; starting without it"
                );
            }
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let actors = ActorRuntime::start(threads).map_err(StartError::Actors)?;
        let exporter = Exporter::start_in_arbiter(actors.arbiters().get(0), move |_| exporter);
        let observe = ObserveHub::new(config.admin.observe_ring, index.clone(), metrics.clone());
        let (checkpoints, checkpoint_writer) =
            CheckpointWriter::start(store.clone(), usize::from(SHARDS));
        let shards = shard::start(
            &actors,
            states,
            ShardContext {
                store: store.clone(),
                checkpoints,
                metrics: metrics.clone(),
                exporter: exporter.recipient(),
                print_flows: config.print_flows,
                observe: observe.clone(),
                metadata: index,
                naming: config.metadata.naming,
                tick: config.checkpoint_interval,
            },
        );
        let ingest = Ingest::new(
            store.clone(),
            config.limits.clone(),
            shards.clone(),
            metrics.clone(),
            actors.arbiters().clone(),
        )
        .stop_when(server_stop.clone());
        tokio::spawn(ingest.clone().retire_superseded_agents());
        let admin = crate::admin::routes(Admin {
            started_unix_nanos: unix_now(),
            data_dir: config.data_dir.clone(),
            agent_endpoint: local_addr,
            store: store.clone(),
            metrics: metrics.clone(),
            agents: ingest.agents(),
            observe,
            outbox_max_bytes: config.outbox.max_bytes,
            kubernetes: watchers.as_ref().map(|w| w.metrics().clone()),
            static_metadata: config.metadata.static_file.is_some(),
            stopping: server_stop.clone(),
            cluster,
        })
        .await?;
        let agent_routes = tonic::service::Routes::new(ingest.into_service());
        let handshake_timeout = config.limits.hello_timeout;
        // Notice agents whose connection died without a word (a node gone, a standby that can
        // no longer reach this leader) within 10 s, so their sessions end.
        let agent_server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(AGENT_KEEPALIVE))
            .http2_keepalive_timeout(Some(AGENT_KEEPALIVE));
        let agent_incoming = crate::ingest::connections(listener, handshake_timeout);
        let admin_incoming = tokio_stream::wrappers::TcpListenerStream::new(admin_listener);
        let admin_server = tonic::transport::Server::builder();
        let handshakes = |(tls, reload_interval): (ServerTls, Duration), endpoint| {
            tls.watch(endpoint, reload_interval, server_stop.clone());
            Handshakes {
                tls,
                timeout: handshake_timeout,
                failures: metrics.tls_handshake_failures.clone(),
            }
        };
        let tls = tls.map(|tls| handshakes(tls, "agents"));
        let admin_tls = admin_tls.map(|tls| handshakes(tls, "admin"));
        let server = spawn_endpoint(
            "agents",
            agent_server,
            agent_routes,
            agent_incoming,
            tls.as_ref(),
            server_stop.clone(),
        );
        let admin_server = spawn_endpoint(
            "admin",
            admin_server,
            admin,
            admin_incoming,
            admin_tls.as_ref().or(tls.as_ref()),
            server_stop.clone(),
        );
        if let Some(listener) = metrics_listener {
            let router = crate::metrics::router(
                metrics.clone(),
                readiness(watchers.as_ref()),
                store.clone(),
            );
            let mut stopped = stop.subscribe();
            tokio::spawn(async move {
                let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                });
                if let Err(err) = serve.await {
                    tracing::error!(%err, "metrics endpoint failed");
                }
            });
        }
        tracing::info!(%local_addr, %admin_addr, endpoint = %config.export.endpoint, "aggregator ready");
        Ok(Self {
            local_addr,
            admin_addr,
            admin_server,
            metrics,
            stop,
            server,
            shards,
            actors,
            checkpoint_writer,
            _watchers: watchers,
        })
    }

    /// Stops accepting agents, writes every pending interval to the outbox, stops exporting
    /// (what the outbox still holds goes out after the next start).
    pub async fn shutdown(self) {
        self.stop_within(SERVER_STOP_WAIT).await;
    }

    /// Stops without waiting for the agents' and operators' connections to close: what a
    /// replica that stopped leading does (its writes fail already; a connection to a peer it
    /// cannot reach would hold a graceful stop for [`SERVER_STOP_WAIT`]).
    pub async fn abort(self) {
        self.stop_within(Duration::ZERO).await;
    }

    async fn stop_within(mut self, wait: Duration) {
        let _ = self.stop.send(true);
        // Sessions end their streams at once; an agent that does not read its answers cannot
        // hold the stop up for longer than `wait`.
        if tokio::time::timeout(wait, &mut self.server).await.is_err() {
            tracing::warn!("agent streams still open after {wait:?}; closing them");
            self.server.abort();
        }
        // Its streams end on the stop; only a client that reads nothing could hold it up.
        if tokio::time::timeout(wait, &mut self.admin_server)
            .await
            .is_err()
        {
            self.admin_server.abort();
        }
        self.shards.flush().await;
        self.actors.stop().await;
        // The shards are gone, and with them the writer's handles: it ends, letting go of the
        // store (which flushes when the last holder lets go).
        drop(self.shards);
        if !self.checkpoint_writer.finished(WRITER_STOP_WAIT).await {
            tracing::warn!("the checkpoint writer did not end within {WRITER_STOP_WAIT:?}");
        }
    }
}

/// How an endpoint's connections become TLS streams.
struct Handshakes {
    tls: ServerTls,
    timeout: Duration,
    failures: prometheus_client::metrics::family::Family<
        EndpointReasonLabel,
        prometheus_client::metrics::counter::Counter,
    >,
}

/// Serves `routes` on the `accepted` connections — over TLS with `tls`, else plaintext — until
/// `stop` turns true.
fn spawn_endpoint<S, E>(
    endpoint: &'static str,
    server: tonic::transport::Server,
    routes: tonic::service::Routes,
    accepted: impl futures_util::Stream<Item = Result<S, E>> + Send + 'static,
    tls: Option<&Handshakes>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()>
where
    S: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    S::ConnectInfo: Clone + Send + Sync + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + std::fmt::Display + Send + 'static,
{
    match tls {
        None => tokio::spawn(serve(endpoint, server, routes, accepted, stop)),
        Some(h) => {
            let incoming = h
                .tls
                .incoming(accepted, endpoint, h.timeout, h.failures.clone());
            tokio::spawn(serve(endpoint, server, routes, incoming, stop))
        }
    }
}

/// Serves `routes` on `incoming` until `stop` turns true.
async fn serve<I, IO, IE>(
    endpoint: &'static str,
    mut server: tonic::transport::Server,
    routes: tonic::service::Routes,
    incoming: I,
    mut stop: watch::Receiver<bool>,
) where
    I: futures_util::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(err) = server
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
    {
        tracing::error!(%err, endpoint, "endpoint failed");
    }
}

/// Starts the Kubernetes watchers on `index`, with their metrics; `None` (logged) without a
/// client — the aggregator then runs on what the static file knows.
async fn watch_kubernetes(index: SharedIndex, metrics: &mut Metrics) -> Option<KubeWatchers> {
    match kube::Client::try_default().await {
        Ok(client) => {
            let watchers = KubeWatchers::spawn(client, index);
            metrics.register(|registry| watchers.metrics().register(registry));
            tracing::info!("watching the Kubernetes API for metadata");
            Some(watchers)
        }
        Err(err) => {
            tracing::warn!(%err, "no Kubernetes client: flows get the static metadata file's names only");
            None
        }
    }
}

/// Ready once every watched kind has been listed (at once without watchers).
fn readiness(watchers: Option<&KubeWatchers>) -> watch::Receiver<bool> {
    let (ready, readiness) = watch::channel(watchers.is_none());
    if let Some(watchers) = watchers {
        let mut synced = watchers.synced();
        tokio::spawn(async move {
            if synced.wait_for(|kinds| kinds.all()).await.is_ok() {
                let _ = ready.send(true);
            }
        });
    }
    readiness
}

/// Every shard's table as its last checkpoint left it, with the batches after its positions
/// replayed. A replayed shard has then applied every stored batch, whatever its position was.
fn recover(
    store: &Store,
    settle: Duration,
    grace: Duration,
) -> Result<Vec<ShardState>, StartError> {
    let recovered = store.recover()?;
    let mut table = FlowTable::new(InterfaceKinds::default(), settle, grace);
    let now = unix_now();
    let restored = table
        .restore(recovered.connections, now)
        .map_err(|e| StartError::Recover(e.to_string()))?;
    let mut positions: Vec<HashMap<_, _>> = vec![HashMap::new(); usize::from(SHARDS)];
    for ((shard, boot_id), sequence) in recovered.positions {
        if let Some(shard) = positions.get_mut(usize::from(shard)) {
            shard.insert(boot_id, sequence);
        }
    }
    let mut replayed = 0;
    for entry in store.batches() {
        let (boot_id, batch) = entry?;
        let corrupt = |e: &dyn std::fmt::Display| {
            StartError::Recover(format!("stored batch {}: {e}", batch.sequence()))
        };
        for record in batch.records() {
            // Validated before it was stored; a record that no longer reads or validates is
            // corrupt (and the start fails: nothing half-applied outlives it).
            let record = record.map_err(|e| corrupt(&e))?;
            let observation = Observation::try_from(&record).map_err(|e| corrupt(&e))?;
            let applied = positions[usize::from(shard_of(&observation.key))]
                .get(&boot_id)
                .copied()
                .unwrap_or(0);
            if batch.sequence() > applied {
                table.apply(&observation, now);
            }
        }
        for shard in &mut positions {
            let position = shard.entry(boot_id).or_insert(0);
            *position = (*position).max(batch.sequence());
        }
        replayed += 1;
    }
    tracing::info!(
        connections = restored,
        batches = replayed,
        "flow table recovered"
    );
    let tables = table.split(usize::from(SHARDS), |key| usize::from(shard_of(key)));
    Ok(tables
        .into_iter()
        .zip(positions)
        .map(|(table, positions)| ShardState { table, positions })
        .collect())
}

#[cfg(test)]
mod tests {
    use mermin_protocol::{
        agent::v1::Batch,
        flow::v1::{EndReason, FlowRecord},
        wire::read::BatchBytes,
    };

    use crate::{shard::ShardId, store::Checkpoint, test_records::tcp_record};

    use super::*;

    fn record(client_port: u32, packets: u64) -> FlowRecord {
        tcp_record(client_port, 443, packets, EndReason::TcpClose)
    }

    fn shard_of_record(record: &FlowRecord) -> ShardId {
        shard_of(&Observation::try_from(record).unwrap().key)
    }

    /// One shard applied and checkpointed batch 1, another had not when the aggregator died:
    /// recovery gives the batch to the second shard only, so each connection counts it once.
    #[tokio::test]
    async fn recovery_replays_a_batch_only_to_the_shards_that_had_not_applied_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let boot = [3; 16];
        let first = record(40_000, 3);
        let second = (40_001..)
            .map(|port| record(port, 5))
            .find(|r| shard_of_record(r) != shard_of_record(&first))
            .unwrap();
        let batch = BatchBytes::encode(&Batch {
            sequence: 1,
            records: vec![first.clone(), second.clone()],
        });
        store.append(&boot, &batch).await.unwrap();
        let settle = Duration::from_secs(3);
        let grace = Duration::from_secs(30);
        let mut applied = FlowTable::new(InterfaceKinds::default(), settle, grace);
        applied.apply(&Observation::try_from(&first).unwrap(), 0);
        store
            .checkpoint(&[Checkpoint {
                shard: shard_of_record(&first),
                positions: &HashMap::from([(boot, 1)]),
                changes: &applied.take_changes().unwrap(),
                outbox: &[],
            }])
            .unwrap();

        let shards = recover(&store, settle, grace).unwrap();
        assert_eq!(shards.len(), usize::from(SHARDS));
        let mut packets_by_port = Vec::new();
        for (index, mut shard) in shards.into_iter().enumerate() {
            assert_eq!(shard.positions, HashMap::from([(boot, 1)]), "shard {index}");
            let mut emitted = Vec::new();
            shard.table.flush(unix_now(), &mut emitted);
            for e in emitted {
                let sent = e.flow.client_to_server.unwrap().packets;
                packets_by_port.push((index as ShardId, e.flow.client.port, sent));
            }
        }
        packets_by_port.sort();
        let mut expected = vec![
            (shard_of_record(&first), 40_000, 3),
            (shard_of_record(&second), second.source_port as u16, 5),
        ];
        expected.sort();
        assert_eq!(packets_by_port, expected);
    }
}
