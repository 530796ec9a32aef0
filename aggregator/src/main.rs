//! `mermin-aggregator`: parse the configuration, start the pipeline, run until SIGTERM/SIGINT,
//! then flush every pending flow into the durable outbox and stop.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use mermin_aggregator::{
    config::{self, FileConfig},
    export::{ExportConfig, OtlpProtocol},
    ingest::IngestLimits,
    metadata::{AttributeNaming, IndexSettings},
    pipeline::{Aggregator, AggregatorConfig, MetadataConfig},
    store::{OutboxQuota, WhenFull},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

// The aggregator allocates many small, short-lived strings per span; glibc's allocator spends a
// third of span encoding consolidating them (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "mermin-aggregator",
    version,
    about = "Stitches the node agents' flow records into one span per connection interval and exports them over OTLP.",
    args_override_self = true
)]
struct Args {
    /// HCL configuration file; options given on the command line take precedence over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address agents connect to (gRPC) [default: 0.0.0.0:4600].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// OTLP/gRPC endpoint spans are exported to (Tempo or a collector)
    /// [default: http://127.0.0.1:4317].
    #[arg(long, env = "MERMIN_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// OTLP transport: grpc (port 4317) or http/protobuf (port 4318) [default: grpc].
    #[arg(long, env = "MERMIN_OTLP_PROTOCOL")]
    otlp_protocol: Option<OtlpProtocol>,
    /// Largest size of the durable export queue, in bytes [default: 1073741824].
    #[arg(long)]
    outbox_max_bytes: Option<u64>,
    /// What happens when the export queue is full: backpressure (agents wait; nothing is lost)
    /// or drop_oldest (the oldest spans are deleted, counted) [default: backpressure].
    #[arg(long)]
    outbox_when_full: Option<WhenFull>,
    /// Directory of the durable store [default: mermin-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How long a flow interval waits for the other observation points' records [default: 3s].
    #[arg(long, value_parser = humantime::parse_duration)]
    settle: Option<Duration>,
    /// How long a closed connection is remembered for late records [default: 60s].
    #[arg(long, value_parser = humantime::parse_duration)]
    grace: Option<Duration>,
    /// Print a summary line of every emitted flow on standard output.
    #[arg(long)]
    print_flows: bool,
    /// Static metadata file (HCL): names for addresses and CIDRs, without Kubernetes.
    #[arg(long)]
    metadata_file: Option<PathBuf>,
    /// Span attribute names for both ends: seed (source.pod.name ...) or mermin
    /// (source.k8s.pod.name ...) [default: seed].
    #[arg(long, value_parser = parse_naming)]
    attribute_names: Option<AttributeNaming>,
    /// Do not watch the Kubernetes API (by default it is watched when a client can be made:
    /// in-cluster, or from the kubeconfig).
    #[arg(long)]
    no_kubernetes: bool,
    /// Address of the /metrics, /livez and /readyz endpoints.
    #[arg(long, default_value = "0.0.0.0:9465")]
    metrics_listen: SocketAddr,
}

fn parse_naming(name: &str) -> Result<AttributeNaming, String> {
    AttributeNaming::from_name(name).ok_or_else(|| format!("{name:?}: expected seed or mermin"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let file = match &args.config {
        Some(path) => match config::load(path) {
            Ok(file) => file,
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::from(2);
            }
        },
        None => FileConfig::default(),
    };
    let config = AggregatorConfig {
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 4600))),
        data_dir: args
            .data_dir
            .or(file.data_dir.map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("mermin-data")),
        export: ExportConfig {
            protocol: args
                .otlp_protocol
                .or(file.otlp_protocol)
                .unwrap_or_default(),
            ..ExportConfig::new(
                args.otlp_endpoint
                    .or(file.otlp_endpoint)
                    .unwrap_or_else(|| "http://127.0.0.1:4317".into()),
            )
        },
        limits: IngestLimits::default(),
        outbox: OutboxQuota {
            max_bytes: args
                .outbox_max_bytes
                .or(file.outbox_max_bytes)
                .unwrap_or(OutboxQuota::default().max_bytes),
            when_full: args
                .outbox_when_full
                .or(file.outbox_when_full)
                .unwrap_or_default(),
        },
        settle: args
            .settle
            .or(file.settle)
            .unwrap_or(Duration::from_secs(3)),
        grace: args.grace.or(file.grace).unwrap_or(Duration::from_secs(60)),
        print_flows: args.print_flows,
        metrics_listen: Some(args.metrics_listen),
        metadata: MetadataConfig {
            naming: args
                .attribute_names
                .or(file.metadata.attribute_names)
                .unwrap_or_default(),
            index: IndexSettings {
                label_keys: file.metadata.labels.unwrap_or_default(),
                deleted_grace: file
                    .metadata
                    .deleted_grace
                    .unwrap_or(IndexSettings::default().deleted_grace),
            },
            static_file: args
                .metadata_file
                .or(file.metadata.static_file.map(PathBuf::from)),
            kubernetes: !args.no_kubernetes && file.metadata.kubernetes.unwrap_or(true),
            first_sync_wait: Duration::from_secs(30),
        },
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let aggregator = match Aggregator::start(config).await {
            Ok(aggregator) => aggregator,
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::from(2);
            }
        };
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            eprintln!("error: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping: flushing pending flows");
        aggregator.shutdown().await;
        ExitCode::SUCCESS
    })
}
