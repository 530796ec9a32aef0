//! `mermin-agent`: parse and validate the configuration, then hand over to [`agent::run`].
//!
//! Exit codes: 0 clean stop, 1 runtime failure, 2 invalid configuration, 3 environment (missing
//! privileges, no kernel BTF).

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use mermin_node_agent::{
    agent,
    config::{Args, Config},
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour only for people: log collectors read files and pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = match Config::from_args(Args::parse()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    match agent::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(if err.is_environment() { 3 } else { 1 })
        }
    }
}
