//! `mermin`: the operator's command for an aggregator's admin API (`mermin.admin.v1`).
//!
//! `main` parses the command line (clap: a usage error exits 2), runs one subcommand and maps
//! its outcome to the exit code: 0 done, 1 the server answered with an error, 2 usage, 3 the
//! endpoint could not be reached (or TLS failed) — the message names the endpoint and why.

mod args;
mod client;
mod render;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let args = args::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(client::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
