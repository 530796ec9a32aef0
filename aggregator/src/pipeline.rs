//! The aggregator's running parts and how data moves between them:
//!
//! ```text
//! ingest (one task per agent stream) --part of each batch, bounded mailboxes--> flow shards
//!   (actix actors; every tick: due intervals -> spans; checkpoint (changes + positions + spans))
//!   --> store outbox --> exporter task
//! ```
//!
//! Start-up first rebuilds every shard's table from its last checkpoint and replays the batches
//! after its positions, then opens the agent endpoint. [`Aggregator::shutdown`] stops accepting
//! agents, flushes every pending interval through each shard's final checkpoint and stops.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    net::TcpListener,
    sync::{Notify, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::TcpListenerStream;

use crate::{
    export::{ExportConfig, ExportError, Exporter},
    flow_table::FlowTable,
    ingest::{Ingest, IngestLimits},
    metrics::Metrics,
    observation::Observation,
    shard::{SHARDS, ShardContext, ShardState, ShardSystem, shard_of, unix_now},
    stitch::InterfaceKinds,
    store::{Store, StoreError},
};

#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// Where agents connect (gRPC).
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub export: ExportConfig,
    pub limits: IngestLimits,
    /// How long an interval waits for the other observation points' records.
    pub settle: Duration,
    /// How long a closed connection is remembered for late records.
    pub grace: Duration,
    /// Print a one-line summary of every emitted flow on standard output.
    pub print_flows: bool,
    /// Where `/metrics`, `/livez` and `/readyz` are served; `None` for none.
    pub metrics_listen: Option<SocketAddr>,
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
    #[error("starting the flow shards: {0}")]
    Shards(std::io::Error),
}

pub struct Aggregator {
    pub local_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    shards: ShardSystem,
    exporter: JoinHandle<()>,
}

impl Aggregator {
    pub async fn start(config: AggregatorConfig) -> Result<Self, StartError> {
        let store = Store::open(&config.data_dir)?;
        let metrics = Arc::new(Metrics::new());
        let wake = Arc::new(Notify::new());
        let exporter = Exporter::new(
            store.clone(),
            config.export.clone(),
            metrics.clone(),
            wake.clone(),
        )?;
        let bind_error = |what, addr| move |source| StartError::Bind { what, addr, source };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(bind_error("the agent endpoint", config.listen))?;
        let local_addr = listener
            .local_addr()
            .map_err(bind_error("the agent endpoint", config.listen))?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(bind_error("the metrics endpoint", addr))?,
            ),
            None => None,
        };
        let (stop, stopped) = watch::channel(false);
        let shards = ShardSystem::start(
            recover(&store, &config)?,
            ShardContext {
                store: store.clone(),
                metrics: metrics.clone(),
                exporter: wake,
                print_flows: config.print_flows,
            },
        )
        .map_err(StartError::Shards)?;
        let service = Ingest::new(
            store,
            config.limits.clone(),
            shards.shards.clone(),
            metrics.clone(),
        )
        .into_service();
        let mut server_stop = stopped.clone();
        let server = tokio::spawn(async move {
            let shutdown = async move {
                let _ = server_stop.wait_for(|s| *s).await;
            };
            if let Err(err) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
            {
                tracing::error!(%err, "agent endpoint failed");
            }
        });
        if let Some(listener) = metrics_listener {
            let router = crate::metrics::router(metrics.clone());
            tokio::spawn(async move {
                if let Err(err) = axum::serve(listener, router).await {
                    tracing::error!(%err, "metrics endpoint failed");
                }
            });
        }
        let exporter = tokio::spawn(async move {
            if let Err(err) = exporter.run(stopped).await {
                tracing::error!(%err, "exporter failed");
            }
        });
        tracing::info!(%local_addr, endpoint = %config.export.endpoint, "aggregator ready");
        Ok(Self {
            local_addr,
            metrics,
            stop,
            server,
            shards,
            exporter,
        })
    }

    /// Stops accepting agents, writes every pending interval to the outbox, stops exporting.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        self.shards.stop().await;
        let _ = self.exporter.await;
    }
}

/// Every shard's table as its last checkpoint left it, with the batches after its positions
/// replayed. A replayed shard has then applied every stored batch, whatever its position was.
fn recover(store: &Store, config: &AggregatorConfig) -> Result<Vec<ShardState>, StartError> {
    let recovered = store.recover()?;
    let mut table = FlowTable::new(InterfaceKinds::default(), config.settle, config.grace);
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
        for record in &batch.records {
            // Validated before it was stored; a record that no longer validates is corrupt.
            let observation = Observation::try_from(record).map_err(|e| {
                StartError::Recover(format!("stored batch {}: {e}", batch.sequence))
            })?;
            let applied = positions[usize::from(shard_of(&observation.key))]
                .get(&boot_id)
                .copied()
                .unwrap_or(0);
            if batch.sequence > applied {
                table.apply(&observation, now);
            }
        }
        for shard in &mut positions {
            let position = shard.entry(boot_id).or_insert(0);
            *position = (*position).max(batch.sequence);
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
