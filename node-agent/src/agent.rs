//! Start-up and shutdown order of the agent's parts.
//!
//! Start: bind the metrics endpoint, check privileges and load the programs, install a flow
//! table, subscribe to conntrack (in the node's namespace), start the collector, start the interface watcher (which attaches to what is present),
//! report ready. Stop (SIGTERM/SIGINT, or a part failing): the watcher detaches every program,
//! then the collector drains the tables one last time and flushes every flow, then we exit.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use tokio::{net::TcpListener, signal::unix::SignalKind, sync::oneshot};

use crate::{
    capture::{self, CaptureError},
    clock::WallClock,
    collector::{Collector, RecordBuilder},
    config::{Config, Output},
    flows::FlowTracker,
    grpc_sink::{self, GrpcSinkConfig},
    interfaces::{self, InterfaceNames, WatchError},
    metrics::{self, Metrics},
    netns::NetnsError,
    sink::{JsonLines, RecordSink, SinkError},
    translations::Translations,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("binding the metrics endpoint {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("collector: {0}")]
    Collector(CaptureError),
    /// Setting up the process: `what` failed (the runtime, a thread, a signal handler).
    #[error("{what}: {source}")]
    Runtime {
        what: &'static str,
        source: std::io::Error,
    },
}

/// An [`AgentError::Runtime`] for `what`.
fn setting_up(what: &'static str) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Runtime { what, source }
}

impl AgentError {
    /// Errors the operator fixes in the environment (privileges, kernel), not in the agent.
    pub fn is_environment(&self) -> bool {
        matches!(
            self,
            AgentError::Capture(CaptureError::NoBtf | CaptureError::MissingCapability { .. })
                | AgentError::Watch(WatchError::Netns(NetnsError::NotPermitted { .. }))
        )
    }
}

/// How long a stopping agent waits for the aggregator to acknowledge its last batches.
const SHUTDOWN_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a translation is kept after the last record that used it: a flow's records are at
/// most the longest timeout (plus a scan) apart, and late packets of a finished flow come within
/// the close timeout.
fn translation_retention(config: &Config) -> std::time::Duration {
    let longest = config
        .timeouts
        .named()
        .into_iter()
        .map(|(_, timeout)| timeout)
        .max()
        .unwrap_or_default();
    longest + config.timeouts.tcp_close + 2 * config.scan_interval
}

pub fn run(config: Config) -> Result<(), AgentError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(setting_up("starting the async runtime"))?;
    runtime.block_on(run_async(config))
}

async fn run_async(config: Config) -> Result<(), AgentError> {
    let listener = TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| AgentError::Bind {
            addr: config.metrics_listen,
            source,
        })?;
    let metrics = Arc::new(Metrics::new());
    let capture = capture::load(config.kernel_table_entries)?;
    metrics
        .kernel_table_capacity
        .set(i64::from(capture.tables.entries()));
    let mut acknowledgements = None;
    let sink: Box<dyn RecordSink> = match &config.output {
        Output::Stdout => Box::new(JsonLines::new(std::io::stdout())),
        Output::File(path) => Box::new(JsonLines::create(path)?),
        Output::Aggregator {
            endpoint,
            buffer_batches,
            tls,
        } => {
            let sink = grpc_sink::start(
                GrpcSinkConfig {
                    endpoint: endpoint.clone(),
                    node_name: config.node_name.clone(),
                    capacity: *buffer_batches,
                    tls: tls.clone(),
                },
                metrics.clone(),
            )?;
            acknowledgements = Some(sink.handle());
            Box::new(sink)
        }
    };
    let names = InterfaceNames::default();
    let translations = match Translations::open(
        config.netns.as_deref(),
        translation_retention(&config),
        metrics.clone(),
        WallClock::kernel_now(),
    ) {
        Ok(translations) => Some(translations),
        Err(err) => {
            tracing::warn!(
                %err,
                "address translations unknown: a connection through a Service (DNAT) or a masquerade (SNAT) is reported as the views before and after it"
            );
            None
        }
    };

    let stop_collector = Arc::new(AtomicBool::new(false));
    let (collector_done_tx, collector_done) = oneshot::channel();
    let collector = Collector {
        tables: capture.tables,
        overflow: capture.overflow,
        counters: capture.counters,
        tracker: FlowTracker::new(config.timeouts.clone(), config.max_tracked_flows),
        sink,
        records: RecordBuilder {
            node_name: config.node_name.clone(),
            names: names.clone(),
        },
        built: Vec::new(),
        translations,
        metrics: metrics.clone(),
        scan_interval: config.scan_interval,
        clock: WallClock::measure(),
    };
    let collector_thread = {
        let stop = stop_collector.clone();
        thread::Builder::new()
            .name("mermin-collector".into())
            .spawn(move || {
                let result = collector.run(&stop);
                let _ = collector_done_tx.send(());
                result
            })
            .map_err(setting_up("starting the collector thread"))?
    };

    let stop_watcher = Arc::new(AtomicBool::new(false));
    let watcher = interfaces::spawn_watcher(
        capture.programs,
        config.interfaces,
        config.netns,
        names,
        metrics.clone(),
        stop_watcher.clone(),
    );
    let watcher = match watcher {
        Ok(watcher) => watcher,
        Err(err) => {
            stop_collector.store(true, Ordering::Relaxed);
            let _ = collector_thread.join();
            return Err(err.into());
        }
    };
    metrics.set_ready();
    tracing::info!(listen = %config.metrics_listen, node = %config.node_name, "mermin-agent ready");

    let stall_ns = (config.scan_interval * 10).as_nanos() as u64;
    let server = axum::serve(listener, metrics::router(metrics.clone(), stall_ns));
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .map_err(setting_up("handling SIGTERM"))?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())
        .map_err(setting_up("handling SIGINT"))?;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: stopping"),
        _ = sigint.recv() => tracing::info!("SIGINT: stopping"),
        _ = collector_done => tracing::error!("collector stopped unexpectedly"),
        result = server => if let Err(err) = result {
            tracing::error!(%err, "metrics endpoint failed");
        },
    }

    // Joins happen off the runtime's thread: the aggregator stream task runs on it meanwhile.
    stop_watcher.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || watcher.join()).await;
    stop_collector.store(true, Ordering::Relaxed);
    if let Some(acknowledgements) = &acknowledgements {
        // The last flush waits for room in a full buffer only this long.
        acknowledgements.stop_waiting_after(SHUTDOWN_ACK_TIMEOUT);
    }
    // A failed last scan is returned once what was flushed had its chance to be acknowledged.
    let collected = match tokio::task::spawn_blocking(move || collector_thread.join()).await {
        Ok(Ok(result)) => result.map_err(AgentError::Collector),
        _ => {
            tracing::error!("collector thread panicked");
            Ok(())
        }
    };
    if let Some(acknowledgements) = acknowledgements {
        // The stream task runs on this runtime: wait for it off the runtime's thread.
        let left = tokio::task::spawn_blocking(move || {
            acknowledgements.wait_acknowledged(SHUTDOWN_ACK_TIMEOUT)
        })
        .await
        .unwrap_or(usize::MAX);
        if left > 0 {
            tracing::error!(
                batches = left,
                "stopping with batches the aggregator has not acknowledged"
            );
        }
    }
    collected?;
    tracing::info!("stopped");
    Ok(())
}
