//! The aggregator's running parts and how data moves between them:
//!
//! ```text
//! ingest (one task per agent stream) --bounded channel--> flow table task
//!   --every tick: due intervals -> spans; checkpoint (table changes + positions + spans)-->
//!   store --> exporter task
//! ```
//!
//! Start-up first rebuilds the flow table from the last checkpoint and replays the batches after
//! it, then opens the agent endpoint. [`Aggregator::shutdown`] flushes every pending interval
//! through a final checkpoint and stops.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tokio::{
    net::TcpListener,
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::TcpListenerStream;

use crate::{
    export::{ExportConfig, ExportError, Exporter},
    flow_table::{Emitted, FlowTable},
    ingest::{AppliedBatch, Ingest, IngestLimits},
    metrics::Metrics,
    observation::Observation,
    span::flow_spans,
    stitch::InterfaceKinds,
    store::{BootId, Checkpoint, Store, StoreError},
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
}

pub struct Aggregator {
    pub local_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    table: JoinHandle<()>,
    exporter: JoinHandle<()>,
}

/// How often the flow table looks for due intervals.
const TICK: Duration = Duration::from_millis(250);

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
        let (flows_tx, flows_rx) = mpsc::channel(64);

        let service = Ingest::new(
            store.clone(),
            config.limits.clone(),
            flows_tx,
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
        let (table_state, positions) = recover(&store, &config)?;
        let table = tokio::spawn(run_table(
            table_state,
            positions,
            flows_rx,
            store,
            wake,
            config.print_flows,
            stopped.clone(),
        ));
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
            table,
            exporter,
        })
    }

    /// Stops accepting agents, writes every pending interval to the outbox, stops exporting.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        let _ = self.table.await;
        let _ = self.exporter.await;
    }
}

/// The flow table as the last checkpoint left it, with the batches after it replayed.
fn recover(
    store: &Store,
    config: &AggregatorConfig,
) -> Result<(FlowTable, HashMap<BootId, u64>), StartError> {
    let recovered = store.recover()?;
    let mut table = FlowTable::new(InterfaceKinds::default(), config.settle, config.grace);
    let now = unix_now();
    let restored = table
        .restore(recovered.connections, now)
        .map_err(|e| StartError::Recover(e.to_string()))?;
    let mut positions = recovered.positions;
    let mut replayed = 0;
    for entry in store.batches() {
        let (boot_id, batch) = entry?;
        if batch.sequence <= positions.get(&boot_id).copied().unwrap_or(0) {
            continue;
        }
        for record in &batch.records {
            // Validated before it was stored; a record that no longer validates is corrupt.
            let observation = Observation::try_from(record).map_err(|e| {
                StartError::Recover(format!("stored batch {}: {e}", batch.sequence))
            })?;
            table.apply(&observation, now);
        }
        positions.insert(boot_id, batch.sequence);
        replayed += 1;
    }
    tracing::info!(
        connections = restored,
        batches = replayed,
        "flow table recovered"
    );
    Ok((table, positions))
}

async fn run_table(
    mut table: FlowTable,
    mut positions: HashMap<BootId, u64>,
    mut flows: mpsc::Receiver<AppliedBatch>,
    store: Store,
    wake: Arc<Notify>,
    print_flows: bool,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(TICK);
    let mut emitted = Vec::new();
    loop {
        tokio::select! {
            batch = flows.recv() => match batch {
                Some(batch) => {
                    let now = unix_now();
                    for observation in &batch.observations {
                        table.apply(observation, now);
                    }
                    positions.insert(batch.boot_id, batch.sequence);
                    continue;
                }
                None => break,
            },
            _ = tick.tick() => table.emit_due(unix_now(), &mut emitted),
            _ = stop.wait_for(|s| *s) => break,
        }
        checkpoint(&mut table, &positions, &store, &wake, &emitted, print_flows).await;
        emitted.clear();
    }
    table.flush(unix_now(), &mut emitted);
    checkpoint(&mut table, &positions, &store, &wake, &emitted, print_flows).await;
}

/// Persists the table's changes, the agents' positions and the spans of `emitted` in one
/// transaction, then lets the exporter know.
async fn checkpoint(
    table: &mut FlowTable,
    positions: &HashMap<BootId, u64>,
    store: &Store,
    wake: &Notify,
    emitted: &[Emitted],
    print_flows: bool,
) {
    let changes = match table.take_changes() {
        Ok(changes) => changes,
        Err(err) => {
            tracing::error!(%err, "cannot serialize flow state; checkpoint skipped");
            return;
        }
    };
    if changes.is_empty() && emitted.is_empty() {
        return;
    }
    let outbox: Vec<Vec<u8>> = if emitted.is_empty() {
        Vec::new()
    } else {
        let request = ExportTraceServiceRequest {
            resource_spans: emitted
                .iter()
                .flat_map(|e| flow_spans(&e.flow, &e.interval))
                .collect(),
        };
        vec![request.encode_to_vec()]
    };
    let checkpoint = Checkpoint {
        positions,
        changes: &changes,
        outbox: &outbox,
    };
    // The checkpoint is the only way out for spans: keep trying until it is written.
    while let Err(err) = store.checkpoint(checkpoint).await {
        tracing::error!(%err, "cannot write checkpoint; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if !outbox.is_empty() {
        wake.notify_one();
    }
    if print_flows {
        for e in emitted {
            println!("{}", summary(e));
        }
    }
}

/// One line per flow interval, for people watching the aggregator.
fn summary(e: &Emitted) -> String {
    let f = &e.flow;
    let counts = |m: &Option<crate::stitch::Measured>| {
        m.as_ref()
            .map_or((0, 0), |m| (m.counts.packets, m.counts.bytes))
    };
    let (sent_packets, sent_bytes) = counts(&f.client_to_server);
    let (received_packets, received_bytes) = counts(&f.server_to_client);
    format!(
        "span {proto:<6} {client:<22} -> {server:<22} sent {sent_packets} pkts / {sent_bytes} B, received {received_packets} pkts / {received_bytes} B, client by {rule}, {reason:?}, {points} points, interval {index}",
        proto = match f.key.protocol {
            6 => "TCP".to_owned(),
            17 => "UDP".to_owned(),
            1 => "ICMP".to_owned(),
            58 => "ICMPv6".to_owned(),
            p => p.to_string(),
        },
        client = format!("{}:{}", f.client.address, f.client.port),
        server = format!("{}:{}", f.server.address, f.server.port),
        rule = f.client_rule.as_str(),
        reason = f.end_reason,
        points = f.points.len(),
        index = e.interval.index,
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
