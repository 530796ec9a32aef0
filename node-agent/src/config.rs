//! Command-line options and their validation into a typed [`Config`].
//!
//! Everything that can be wrong with the invocation is found here, before a program is loaded or
//! a port bound: bad interface patterns, a missing network namespace, nonsensical timeouts.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;

use crate::{flows::Timeouts, interfaces::InterfaceFilter};

/// Patterns that cover pod veths of the common CNIs and the node's uplinks.
pub const DEFAULT_INTERFACE_PATTERNS: &[&str] = &[
    "veth*", "cali*", "lxc*", "cni*", "flannel*", "cilium_*", "gke*", "eni*", "azv*", "eth*",
    "en*", "bond*",
];

#[derive(Debug, Parser)]
#[command(
    name = "mermin-agent",
    version,
    about = "Counts every flow crossing this node's interfaces and emits raw flow records.",
    args_override_self = true
)]
pub struct Args {
    /// Node name put in every record [default: the host name].
    #[arg(long, env = "MERMIN_NODE_NAME")]
    pub node_name: Option<String>,

    /// Interface name patterns to attach to (globs: `*`, `?`, `[...]`), comma-separated.
    #[arg(long, value_delimiter = ',', default_values = DEFAULT_INTERFACE_PATTERNS)]
    pub interfaces: Vec<String>,

    /// Attach inside this network namespace: a name under /run/netns, or a path.
    #[arg(long)]
    pub netns: Option<String>,

    /// Stream records to this aggregator (`http://host:4600`) instead of writing JSON lines.
    #[arg(long, env = "MERMIN_AGGREGATOR")]
    pub aggregator: Option<String>,

    /// Where to write JSON-lines records when no aggregator is given: a file path, or `-` for
    /// standard output.
    #[arg(long, default_value = "-")]
    pub output: String,

    /// With an https:// aggregator: the CA (PEM) its certificate must chain to.
    #[arg(long, env = "MERMIN_AGGREGATOR_CA")]
    pub aggregator_ca: Option<PathBuf>,
    /// With an https:// aggregator: this agent's client certificate (PEM).
    #[arg(long, env = "MERMIN_AGGREGATOR_CERT")]
    pub aggregator_cert: Option<PathBuf>,
    /// With an https:// aggregator: this agent's private key (PEM).
    #[arg(long, env = "MERMIN_AGGREGATOR_KEY")]
    pub aggregator_key: Option<PathBuf>,
    /// The name the aggregator's certificate must carry [default: the endpoint's host].
    #[arg(long)]
    pub aggregator_server_name: Option<String>,

    /// Batches (of up to 4,096 records) held for the aggregator until it acknowledges them; when
    /// full, the agent waits.
    #[arg(long, default_value_t = 64)]
    pub aggregator_buffer_batches: usize,

    /// Address of the /metrics, /livez and /readyz endpoints.
    #[arg(long, default_value = "0.0.0.0:9464")]
    pub metrics_listen: SocketAddr,

    /// How often the kernel flow table is swapped and read.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub scan_interval: Duration,

    /// A flow still active after this long gets an interim record (deltas since the last one).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub active_timeout: Duration,

    /// A TCP flow is closed after a FIN or RST and this long without packets.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub tcp_close_timeout: Duration,

    /// Idle timeout of TCP flows that saw no FIN or RST.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub tcp_idle_timeout: Duration,

    /// Idle timeout of UDP flows.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub udp_idle_timeout: Duration,

    /// Idle timeout of ICMP and ICMPv6 flows.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub icmp_idle_timeout: Duration,

    /// Idle timeout of flows of other IP protocols.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub other_idle_timeout: Duration,

    /// Entries of each of the two kernel flow tables (per scan interval).
    #[arg(long, default_value_t = 65_536)]
    pub kernel_table_entries: u32,

    /// Flows the agent tracks at most; beyond this the least recently seen are reported early.
    #[arg(long, default_value_t = 262_144)]
    pub max_tracked_flows: usize,
}

/// Where records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout,
    File(PathBuf),
    Aggregator {
        endpoint: String,
        buffer_batches: usize,
        /// Mutual TLS, for an https:// endpoint.
        tls: Option<ClientTls>,
    },
}

/// The files of the agent's mutual TLS to the aggregator, read again at every connection (so
/// a rotated certificate is used from the next reconnect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub server_name: Option<String>,
}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    pub node_name: String,
    pub interfaces: InterfaceFilter,
    /// Path of the network namespace to attach in; `None` for the agent's own.
    pub netns: Option<PathBuf>,
    pub output: Output,
    pub metrics_listen: SocketAddr,
    pub scan_interval: Duration,
    pub timeouts: Timeouts,
    pub kernel_table_entries: u32,
    pub max_tracked_flows: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid interface pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("no interface patterns given")]
    NoPatterns,
    #[error("network namespace {name:?} not found (looked for {path})")]
    NetnsNotFound { name: String, path: String },
    #[error("--{option} must be greater than zero")]
    Zero { option: &'static str },
    #[error("--scan-interval ({scan:?}) must not exceed --{option} ({timeout:?})")]
    ScanSlowerThanTimeout {
        scan: Duration,
        option: &'static str,
        timeout: Duration,
    },
    #[error("--aggregator {0:?} must start with http:// or https://")]
    AggregatorEndpoint(String),
    #[error(
        "--aggregator {0:?} is https://: give --aggregator-ca, --aggregator-cert and --aggregator-key (mutual TLS)"
    )]
    AggregatorTlsFiles(String),
    #[error(
        "--aggregator-ca, --aggregator-cert and --aggregator-key need an https:// --aggregator, not {0:?}"
    )]
    AggregatorPlaintext(String),
    #[error("cannot determine the host name for --node-name: {0}")]
    NodeName(std::io::Error),
}

impl Config {
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let interfaces = InterfaceFilter::new(&args.interfaces)?;
        let netns = args.netns.as_deref().map(resolve_netns).transpose()?;
        let node_name = match args.node_name {
            Some(name) => name,
            None => hostname().map_err(ConfigError::NodeName)?,
        };
        let output = match (args.aggregator, args.output.as_str()) {
            (Some(endpoint), _) => {
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    return Err(ConfigError::AggregatorEndpoint(endpoint));
                }
                let files = (
                    args.aggregator_ca,
                    args.aggregator_cert,
                    args.aggregator_key,
                );
                let tls = match (endpoint.starts_with("https://"), files) {
                    (true, (Some(ca), Some(cert), Some(key))) => Some(ClientTls {
                        ca,
                        cert,
                        key,
                        server_name: args.aggregator_server_name,
                    }),
                    (true, _) => return Err(ConfigError::AggregatorTlsFiles(endpoint)),
                    (false, (None, None, None)) => None,
                    (false, _) => return Err(ConfigError::AggregatorPlaintext(endpoint)),
                };
                Output::Aggregator {
                    endpoint,
                    buffer_batches: args.aggregator_buffer_batches.max(1),
                    tls,
                }
            }
            (None, "-") => Output::Stdout,
            (None, path) => Output::File(PathBuf::from(path)),
        };
        let timeouts = Timeouts {
            active: args.active_timeout,
            tcp_close: args.tcp_close_timeout,
            tcp_idle: args.tcp_idle_timeout,
            udp_idle: args.udp_idle_timeout,
            icmp_idle: args.icmp_idle_timeout,
            other_idle: args.other_idle_timeout,
        };
        check_durations(args.scan_interval, &timeouts)?;
        if args.kernel_table_entries == 0 {
            return Err(ConfigError::Zero {
                option: "kernel-table-entries",
            });
        }
        if args.max_tracked_flows == 0 {
            return Err(ConfigError::Zero {
                option: "max-tracked-flows",
            });
        }
        Ok(Self {
            node_name,
            interfaces,
            netns,
            output,
            metrics_listen: args.metrics_listen,
            scan_interval: args.scan_interval,
            timeouts,
            kernel_table_entries: args.kernel_table_entries,
            max_tracked_flows: args.max_tracked_flows,
        })
    }
}

fn check_durations(scan: Duration, timeouts: &Timeouts) -> Result<(), ConfigError> {
    if scan.is_zero() {
        return Err(ConfigError::Zero {
            option: "scan-interval",
        });
    }
    for (option, timeout) in timeouts.named() {
        if timeout.is_zero() {
            return Err(ConfigError::Zero { option });
        }
        if scan > timeout {
            return Err(ConfigError::ScanSlowerThanTimeout {
                scan,
                option,
                timeout,
            });
        }
    }
    Ok(())
}

/// A name is looked up under /run/netns (where `ip netns add` puts it); anything with a `/` is a
/// path (for example /proc/PID/ns/net).
fn resolve_netns(name: &str) -> Result<PathBuf, ConfigError> {
    let path = if name.contains('/') {
        PathBuf::from(name)
    } else {
        Path::new("/run/netns").join(name)
    };
    if path.exists() {
        Ok(path)
    } else {
        Err(ConfigError::NetnsNotFound {
            name: name.to_owned(),
            path: path.display().to_string(),
        })
    }
}

fn hostname() -> std::io::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["mermin-agent", "--node-name", "n1"];
        argv.extend_from_slice(extra);
        Config::from_args(Args::parse_from(argv))
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.node_name, "n1");
        assert_eq!(config.output, Output::Stdout);
        assert_eq!(config.timeouts.active, Duration::from_secs(60));
        assert_eq!(config.timeouts.tcp_close, Duration::from_secs(5));
        assert!(config.interfaces.matches("veth1234"));
        assert!(config.interfaces.matches("eth0"));
        assert!(!config.interfaces.matches("lo"));
    }

    #[test]
    fn an_https_aggregator_takes_mutual_tls_files_and_only_it_does() {
        let tls = ["--aggregator-ca", "ca.crt", "--aggregator-cert", "a.crt"];
        let key = [
            "--aggregator-key",
            "a.key",
            "--aggregator-server-name",
            "agg",
        ];
        let args: Vec<&str> = ["--aggregator", "https://agg:4600"]
            .into_iter()
            .chain(tls)
            .chain(key)
            .collect();
        let Output::Aggregator {
            tls: Some(files), ..
        } = parse(&args).unwrap().output
        else {
            panic!("expected the aggregator output with TLS");
        };
        assert_eq!(
            files,
            ClientTls {
                ca: "ca.crt".into(),
                cert: "a.crt".into(),
                key: "a.key".into(),
                server_name: Some("agg".into()),
            }
        );
        assert_eq!(
            parse(&["--aggregator", "https://agg:4600"])
                .unwrap_err()
                .to_string(),
            "--aggregator \"https://agg:4600\" is https://: give --aggregator-ca, --aggregator-cert and --aggregator-key (mutual TLS)"
        );
        let plaintext: Vec<&str> = ["--aggregator", "http://agg:4600"]
            .into_iter()
            .chain(tls)
            .collect();
        assert_eq!(
            parse(&plaintext).unwrap_err().to_string(),
            "--aggregator-ca, --aggregator-cert and --aggregator-key need an https:// --aggregator, not \"http://agg:4600\""
        );
    }

    #[test]
    fn bad_pattern_is_named() {
        let err = parse(&["--interfaces", "eth[0"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid interface pattern \"eth[0\": invalid range pattern"
        );
    }

    #[test]
    fn missing_netns_names_the_path() {
        let err = parse(&["--netns", "no-such-ns-mermin"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "network namespace \"no-such-ns-mermin\" not found (looked for /run/netns/no-such-ns-mermin)"
        );
    }

    #[test]
    fn scan_interval_must_not_exceed_timeouts() {
        let err = parse(&["--scan-interval", "3s", "--tcp-close-timeout", "2s"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--scan-interval (3s) must not exceed --tcp-close-timeout (2s)"
        );
    }

    #[test]
    fn zero_table_is_rejected() {
        let err = parse(&["--kernel-table-entries", "0"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--kernel-table-entries must be greater than zero"
        );
    }
}
