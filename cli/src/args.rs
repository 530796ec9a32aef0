//! The command line: global options (endpoint, output, TLS) and one subcommand per view.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use mermin_protocol::{admin::v1::ObserveRequest, display::end_reason_name, flow::v1::EndReason};

#[derive(Debug, Parser)]
#[command(
    name = "mermin",
    version,
    about = "Status, agents, shards, queues and live flows of a Mermin aggregator (its admin API).",
    after_help = "Exit codes: 0 ok, 1 the server returned an error, 2 usage, 3 cannot reach the endpoint (or TLS failed)."
)]
pub struct Cli {
    /// The aggregator's admin API.
    #[arg(
        long,
        global = true,
        env = "MERMIN_ADMIN_ENDPOINT",
        default_value = "http://127.0.0.1:9093",
        value_parser = endpoint
    )]
    pub endpoint: String,
    /// How answers are printed.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Mutual TLS to the admin API: used when the endpoint is https:// (or any of these is given).
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// The CA (PEM) the aggregator's certificate must chain to.
    #[arg(long, global = true, env = "MERMIN_ADMIN_CA")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), signed by a CA the aggregator trusts.
    #[arg(long, global = true, env = "MERMIN_ADMIN_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, global = true, env = "MERMIN_ADMIN_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name the aggregator's certificate must carry (default: the endpoint's host).
    #[arg(long, global = true)]
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns (for people).
    Table,
    /// JSON (one object per flow for `observe`).
    Json,
    /// YAML (one document per flow for `observe`).
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// This replica and its cluster: version, uptime, store health, members.
    Status,
    /// The agents connected to this replica.
    Agents,
    /// Every flow shard: leader, term, commit lag, mailbox, connections.
    Shards,
    /// Shard mailboxes, the export outbox and export errors.
    Queues,
    /// Consolidated flows as the shards emit them, filtered by the aggregator.
    Observe(Box<ObserveArgs>),
    /// Take the replica that answers (the leader: other replicas forward the admin port to it)
    /// out of the cluster: its shards move to the others and it stops taking agents; then scale
    /// the StatefulSet down (needs replication).
    Drain,
    /// Take a member out of the cluster by its id (as `status` lists it), e.g. one whose pod
    /// is gone for good (needs replication).
    RemoveMember {
        /// The member's id.
        id: String,
    },
}

/// Filters (all given must match; a repeated one matches any of its values; filters on ends
/// match either end).
#[derive(Debug, Args)]
pub struct ObserveArgs {
    #[arg(long)]
    pub namespace: Vec<String>,
    /// A pod name, or namespace/pod.
    #[arg(long)]
    pub pod: Vec<String>,
    #[arg(long)]
    pub workload: Vec<String>,
    /// The node of either end, or a node that observed the flow.
    #[arg(long)]
    pub node: Vec<String>,
    /// An address or CIDR (10.0.0.0/8, fd00::1).
    #[arg(long)]
    pub address: Vec<String>,
    #[arg(long)]
    pub port: Vec<u16>,
    /// tcp, udp, icmp, icmpv6, sctp, or a protocol number.
    #[arg(long, value_parser = protocol)]
    pub protocol: Vec<u32>,
    /// active_timeout, idle_timeout, tcp_close, table_pressure, agent_shutdown.
    #[arg(long, value_parser = end_reason)]
    pub end_reason: Vec<EndReason>,
    /// Bytes sent plus received at least this.
    #[arg(long, default_value_t = 0)]
    pub min_bytes: u64,
    /// Keep printing flows as they are emitted.
    #[arg(long, short)]
    pub follow: bool,
    /// First the last N matching flows the aggregator holds (default 20 without --follow).
    #[arg(long)]
    pub last: Option<u32>,
}

/// Flows shown by `observe` without `--follow` or `--last`.
const DEFAULT_LAST: u32 = 20;

impl ObserveArgs {
    pub fn request(&self) -> ObserveRequest {
        let last = match (self.last, self.follow) {
            (Some(last), _) => last,
            (None, true) => 0,
            (None, false) => DEFAULT_LAST,
        };
        ObserveRequest {
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            workload: self.workload.clone(),
            node: self.node.clone(),
            address: self.address.clone(),
            port: self.port.iter().map(|&p| u32::from(p)).collect(),
            ip_protocol: self.protocol.clone(),
            end_reason: self.end_reason.iter().map(|&r| r as i32).collect(),
            min_bytes: self.min_bytes,
            last,
            follow: self.follow,
        }
    }
}

fn protocol(text: &str) -> Result<u32, String> {
    match text.to_ascii_lowercase().as_str() {
        "icmp" => Ok(1),
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmpv6" => Ok(58),
        "sctp" => Ok(132),
        number => number
            .parse::<u8>()
            .map(u32::from)
            .map_err(|_| "expected tcp, udp, icmp, icmpv6, sctp or a number 0-255".into()),
    }
}

fn end_reason(text: &str) -> Result<EndReason, String> {
    const REASONS: [EndReason; 5] = [
        EndReason::ActiveTimeout,
        EndReason::IdleTimeout,
        EndReason::TcpClose,
        EndReason::TablePressure,
        EndReason::AgentShutdown,
    ];
    REASONS
        .into_iter()
        .find(|&r| end_reason_name(r) == text)
        .ok_or_else(|| {
            let names: Vec<&str> = REASONS.into_iter().map(end_reason_name).collect();
            format!("expected one of {}", names.join(", "))
        })
}

/// `--endpoint`: an http:// or https:// URL with a host (a usage error, exit 2, otherwise).
fn endpoint(text: &str) -> Result<String, String> {
    if !(text.starts_with("http://") || text.starts_with("https://")) {
        return Err("must start with http:// or https://".into());
    }
    let uri: tonic::transport::Uri = text.parse().map_err(|e| format!("not a valid URL ({e})"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err("names no host".into());
    }
    Ok(text.to_owned())
}
