//! `mermin-aggregator`: parse the configuration, start the pipeline, run until SIGTERM/SIGINT,
//! then flush every pending flow into the durable outbox and stop.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use mermin_aggregator::{
    export::ExportConfig,
    ingest::IngestLimits,
    pipeline::{Aggregator, AggregatorConfig},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "mermin-aggregator",
    version,
    about = "Stitches the node agents' flow records into one span per connection interval and exports them over OTLP.",
    args_override_self = true
)]
struct Args {
    /// Address agents connect to (gRPC).
    #[arg(long, default_value = "0.0.0.0:4600")]
    listen: SocketAddr,
    /// OTLP/gRPC endpoint spans are exported to (Tempo or a collector).
    #[arg(
        long,
        env = "MERMIN_OTLP_ENDPOINT",
        default_value = "http://127.0.0.1:4317"
    )]
    otlp_endpoint: String,
    /// Directory of the durable store (agent batches, export outbox).
    #[arg(long, default_value = "mermin-data")]
    data_dir: PathBuf,
    /// How long a flow interval waits for the records of the other observation points.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// How long a closed connection is remembered for late records.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Print a summary line of every emitted flow on standard output.
    #[arg(long)]
    print_flows: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = AggregatorConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        export: ExportConfig::new(args.otlp_endpoint),
        limits: IngestLimits::default(),
        settle: args.settle,
        grace: args.grace,
        print_flows: args.print_flows,
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
