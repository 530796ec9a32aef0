//! `mermin-aggregator`: read the settings, start the pipeline (alone, or as one replica of a
//! cluster with `--replica-ordinal`), run until SIGTERM/SIGINT, then flush every pending flow
//! into the durable outbox and stop. Exit codes: 0 clean stop, 1 runtime
//! failure, 2 invalid configuration, 3 environment (a port or the data directory).

use std::{io::IsTerminal, process::ExitCode};

use mermin_aggregator::{
    cluster,
    pipeline::Aggregator,
    settings::{LogFormat, Settings, SettingsError},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let settings = match Settings::load(std::env::args_os()) {
        Ok(settings) => settings,
        Err(SettingsError::Arguments(err)) => {
            // --help and --version come this way too, with their own exit code (0).
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { 2 } else { 0 });
        }
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let (config, cluster) = match (settings.aggregator_config(), settings.cluster_config()) {
        (Ok(config), Ok(cluster)) => (config, cluster),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    if settings.check_config {
        println!("{:#}", settings.effective_json());
        return ExitCode::SUCCESS;
    }
    init_logs(settings.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            eprintln!("error: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        let signalled = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("stopping: flushing pending flows");
            let _ = stop.send(true);
        };
        let ran = match cluster {
            Some(cluster) => {
                let replica = cluster::run(config, cluster, stopped);
                tokio::pin!(replica);
                tokio::select! {
                    ran = &mut replica => ran,
                    () = signalled => replica.await,
                }
                .map_err(|err| (err.to_string(), err.exit_code()))
            }
            None => match Aggregator::start(config).await {
                Ok(aggregator) => {
                    signalled.await;
                    aggregator.shutdown().await;
                    Ok(())
                }
                Err(err) => Err((err.to_string(), err.exit_code())),
            },
        };
        match ran {
            Ok(()) => ExitCode::SUCCESS,
            Err((message, code)) => {
                eprintln!("error: {message}");
                ExitCode::from(code)
            }
        }
    })
}

/// Logs on standard error: text (coloured only on a terminal) or JSON lines.
fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
}
