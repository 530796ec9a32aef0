//! The one settings model: every setting the aggregator has, as a command-line option and as an
//! HCL key, with its default (from [`crate::defaults`]) and its help text declared once, here.
//!
//! Precedence: the command line, then the environment (`MERMIN_OTLP_ENDPOINT`, ...), then the
//! file given with `--config`, then the default. A file value is checked by the same parser as
//! the option it stands for; its errors name the file and line. [`Settings::aggregator_config`]
//! turns the settings into the typed configuration the pipeline runs on, and
//! [`Settings::effective_json`] shows them (what `--check-config` prints).

use std::{ffi::OsString, net::SocketAddr, path::PathBuf};

use clap::{CommandFactory, FromArgMatches, Parser, parser::ValueSource};

use crate::{
    cluster::ClusterConfig,
    config::{self, ConfigError, FileSetting},
    defaults,
    export::{ExportConfig, ExportTls, OtlpHeader, OtlpProtocol},
    ingest::IngestLimits,
    metadata::{AttributeNaming, IndexSettings},
    pipeline::{AdminConfig, AggregatorConfig, MetadataConfig, ServerTlsConfig},
    replication::RaftTuning,
    store::{OutboxQuota, WhenFull},
    tls::TlsFiles,
};

/// Whether the agent endpoint and the admin API speak TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TlsMode {
    /// Mutual TLS: the server's certificate, and a client certificate from every client.
    #[default]
    Required,
    /// Plaintext, open to anyone who can reach the ports: only when asked for (the demo).
    Disabled,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Required => "required",
            TlsMode::Disabled => "disabled",
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable; coloured only when standard error is a terminal.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "mermin-aggregator",
    version,
    about = "Stitches the node agents' flow records into one span per connection interval and exports them over OTLP.",
    after_help = "Every option can also be set in the --config file (its HCL key is given in brackets); the command line and the environment win over the file.",
    args_override_self = true
)]
pub struct Settings {
    /// HCL configuration file; options given on the command line take precedence over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Check the configuration, print the effective settings as JSON and exit (0 if valid, 2
    /// with `file:line: message` if not). The files it names (TLS, metadata) are read at start.
    #[arg(long)]
    pub check_config: bool,

    /// Address agents connect to (gRPC) [listen].
    #[arg(long, default_value_t = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// Address of the /metrics, /livez and /readyz endpoints [metrics_listen].
    #[arg(long, default_value_t = defaults::METRICS_LISTEN)]
    pub metrics_listen: SocketAddr,
    /// Address of the admin API: gRPC status, agents, queues, observe (with health and
    /// reflection) [admin { listen }].
    #[arg(long, default_value_t = defaults::ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,
    /// Flows kept in memory for `mermin observe --last N` (0: none) [admin { observe_ring }].
    #[arg(long, default_value_t = defaults::OBSERVE_RING)]
    pub admin_observe_ring: usize,
    /// TLS on the agent endpoint and the admin API: required (mutual TLS; the default) or
    /// disabled (plaintext) [tls { mode }].
    #[arg(long, value_enum, default_value_t = TlsMode::Required)]
    pub tls_mode: TlsMode,
    /// The server's certificate chain (PEM) [tls { cert_file }].
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM) [tls { key_file }].
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that client certificates must chain to [tls { client_ca_file }].
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// The CA (PEM) that operators' client certificates chain to, for the admin API alone;
    /// unset, the admin API takes --tls-client-ca's, an agent's certificate included
    /// [tls { admin_client_ca_file }].
    #[arg(long)]
    pub tls_admin_client_ca: Option<PathBuf>,
    /// How often the TLS files are checked for changes (new connections get a new
    /// certificate without a restart) [tls { reload_interval }].
    #[arg(long, default_value_t = defaults::TLS_RELOAD_INTERVAL.into(), value_parser = positive_duration)]
    pub tls_reload_interval: humantime::Duration,
    /// Directory of the durable store [data_dir].
    #[arg(long, default_value = defaults::DATA_DIR)]
    pub data_dir: PathBuf,
    /// Log format: text or json [log_format].
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Print a summary line of every emitted flow on standard output [print_flows].
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub print_flows: bool,

    /// OTLP endpoint spans are exported to: Tempo or a collector [export "traces" { otlp = { endpoint } }].
    #[arg(long, env = "MERMIN_OTLP_ENDPOINT", default_value = defaults::OTLP_ENDPOINT, value_parser = endpoint)]
    pub otlp_endpoint: String,
    /// OTLP transport: grpc (port 4317) or http/protobuf (port 4318) [export "traces" { otlp = { protocol } }].
    #[arg(long, env = "MERMIN_OTLP_PROTOCOL", default_value_t = OtlpProtocol::Grpc)]
    pub otlp_protocol: OtlpProtocol,
    /// How long one export request may take [export "traces" { otlp = { timeout } }].
    #[arg(long, default_value_t = defaults::OTLP_TIMEOUT.into(), value_parser = positive_duration)]
    pub otlp_timeout: humantime::Duration,
    /// A header sent with every export request, name=value, comma-separated (a tenant:
    /// X-Scope-OrgID=dev; an API key, best from a Secret through the environment): replaces the
    /// file's [export "traces" { otlp = { headers = { name = value } } }].
    #[arg(
        long = "otlp-header",
        env = "MERMIN_OTLP_HEADERS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub otlp_headers: Vec<String>,
    /// The CA (PEM) an https:// endpoint's certificate must chain to, instead of the system's CA
    /// certificates [export "traces" { otlp = { tls = { ca_file } } }].
    #[arg(long)]
    pub otlp_ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM) for an https:// endpoint that asks for one (mutual TLS;
    /// with --otlp-key-file) [export "traces" { otlp = { tls = { cert_file } } }].
    #[arg(long)]
    pub otlp_cert_file: Option<PathBuf>,
    /// The client certificate's key (PEM) [export "traces" { otlp = { tls = { key_file } } }].
    #[arg(long)]
    pub otlp_key_file: Option<PathBuf>,
    /// Largest size of the durable export queue, in bytes [outbox_max_bytes].
    #[arg(long, default_value_t = defaults::OUTBOX_MAX_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub outbox_max_bytes: u64,
    /// When the export queue is full: backpressure (agents wait; nothing is lost) or
    /// drop_oldest (the oldest spans are deleted, counted) [outbox_when_full].
    #[arg(long, default_value_t = WhenFull::Backpressure)]
    pub outbox_when_full: WhenFull,

    /// How long a flow interval waits for the other observation points' records [settle].
    #[arg(long, default_value_t = defaults::SETTLE.into())]
    pub settle: humantime::Duration,
    /// How long a closed connection is remembered for late records [grace].
    #[arg(long, default_value_t = defaults::GRACE.into())]
    pub grace: humantime::Duration,
    /// How often the shards emit the intervals that are due and make them durable: shorter,
    /// spans sooner; longer, less CPU [checkpoint_interval].
    #[arg(long, default_value_t = defaults::CHECKPOINT_INTERVAL.into(), value_parser = checkpoint_interval)]
    pub checkpoint_interval: humantime::Duration,

    /// Static metadata file (HCL): names for addresses and CIDRs, without Kubernetes
    /// [metadata { static_file }].
    #[arg(long)]
    pub metadata_file: Option<PathBuf>,
    /// Span attribute names for both ends: seed (source.pod.name ...) or mermin
    /// (source.k8s.pod.name ...) [metadata { attribute_names }].
    #[arg(long, default_value_t = AttributeNaming::Seed)]
    pub attribute_names: AttributeNaming,
    /// Pod and namespace labels copied to spans, comma-separated [metadata { labels }].
    #[arg(long, value_delimiter = ',')]
    pub metadata_labels: Vec<String>,
    /// How long a deleted pod still names late flows [metadata { deleted_grace }].
    #[arg(long, default_value_t = defaults::DELETED_GRACE.into())]
    pub deleted_grace: humantime::Duration,
    /// Watch the Kubernetes API (in-cluster, or the kubeconfig) [metadata { kubernetes }].
    #[arg(long, num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub kubernetes: bool,
    /// How long start-up waits for the first full listing of Kubernetes objects
    /// [metadata { first_sync_wait }].
    #[arg(long, default_value_t = defaults::FIRST_SYNC_WAIT.into())]
    pub first_sync_wait: humantime::Duration,

    /// Unacknowledged batches an agent may send ahead [agents { max_in_flight_batches }].
    #[arg(long, default_value_t = defaults::MAX_IN_FLIGHT_BATCHES, value_parser = clap::value_parser!(u32).range(1..))]
    pub agents_max_in_flight_batches: u32,
    /// Records one agent batch may hold [agents { max_batch_records }].
    #[arg(long, default_value_t = defaults::MAX_BATCH_RECORDS, value_parser = clap::value_parser!(u32).range(1..))]
    pub agents_max_batch_records: u32,
    /// Largest agent message accepted, in bytes [agents { max_message_bytes }].
    #[arg(long, default_value_t = defaults::MAX_MESSAGE_BYTES)]
    pub agents_max_message_bytes: usize,
    /// A stream without a Hello within this is ended; so is a TCP connection that has made no
    /// request [agents { hello_timeout }].
    #[arg(long, default_value_t = defaults::HELLO_TIMEOUT.into(), value_parser = positive_duration)]
    pub agents_hello_timeout: humantime::Duration,
    /// An agent process its node replaced keeps its place this long after its last stream
    /// ended, so that one briefly cut off comes back where it was; then, every batch of it
    /// applied, it is forgotten [agents { retire_after }].
    #[arg(long, default_value_t = defaults::RETIRE_AFTER.into())]
    pub agents_retire_after: humantime::Duration,
    /// How long a batch waits for room in a full outbox before the stream is refused
    /// (backpressure policy) [agents { outbox_full_wait }].
    #[arg(long, default_value_t = defaults::OUTBOX_FULL_WAIT.into())]
    pub agents_outbox_full_wait: humantime::Duration,

    /// Run as replica N of a cluster instead of alone: the store is replicated with Raft and
    /// the replica that leads it runs the pipeline; replica 0 starts the cluster. N, or a
    /// StatefulSet pod name (`mermin-aggregator-2`: its ordinal) [replication { ordinal }].
    #[arg(long, env = "MERMIN_REPLICA_ORDINAL", value_parser = replica_ordinal)]
    pub replica_ordinal: Option<u32>,
    /// Address of the replica-to-replica service (Raft) [replication { listen }].
    #[arg(long, default_value_t = defaults::REPLICATION_LISTEN)]
    pub replication_listen: SocketAddr,
    /// Where the other replicas reach this one, host:port (the listen address if unset)
    /// [replication { advertise }].
    #[arg(long, env = "MERMIN_REPLICATION_ADVERTISE")]
    pub replication_advertise: Option<String>,
    /// Every replica's address, host:port, comma-separated (its own is skipped)
    /// [replication { peers }].
    #[arg(long, env = "MERMIN_REPLICATION_PEERS", value_delimiter = ',')]
    pub replication_peers: Vec<String>,
    /// Log entries a Raft group keeps before it snapshots its state and drops them: a replica
    /// that lags further, or a new one, is sent the snapshot (a file, streamed)
    /// [replication { snapshot_entries }].
    #[arg(long, default_value_t = defaults::REPLICATION_SNAPSHOT_ENTRIES)]
    pub replication_snapshot_entries: u64,
    /// This replica's certificate chain (PEM) for mutual TLS between replicas; with the key and
    /// the CA, replicas speak only TLS to each other (reloaded when it changes, every
    /// tls.reload_interval) [replication { tls { cert_file } }].
    #[arg(long)]
    pub replication_tls_cert: Option<PathBuf>,
    /// Its private key (PEM) [replication { tls { key_file } }].
    #[arg(long)]
    pub replication_tls_key: Option<PathBuf>,
    /// The CA (PEM) every replica's certificate must chain to [replication { tls { ca_file } }].
    #[arg(long)]
    pub replication_tls_ca: Option<PathBuf>,
}

/// Each option that the file may set: its argument id (the field name) and its HCL path.
const FILE_KEYS: &[(&str, &str)] = &[
    ("listen", "listen"),
    ("metrics_listen", "metrics_listen"),
    ("data_dir", "data_dir"),
    ("log_format", "log_format"),
    ("print_flows", "print_flows"),
    ("settle", "settle"),
    ("grace", "grace"),
    ("checkpoint_interval", "checkpoint_interval"),
    ("outbox_max_bytes", "outbox_max_bytes"),
    ("outbox_when_full", "outbox_when_full"),
    ("otlp_endpoint", "export.traces.otlp.endpoint"),
    ("otlp_protocol", "export.traces.otlp.protocol"),
    ("otlp_timeout", "export.traces.otlp.timeout"),
    ("otlp_headers", "export.traces.otlp.headers"),
    ("otlp_ca_file", "export.traces.otlp.tls.ca_file"),
    ("otlp_cert_file", "export.traces.otlp.tls.cert_file"),
    ("otlp_key_file", "export.traces.otlp.tls.key_file"),
    ("attribute_names", "metadata.attribute_names"),
    ("metadata_file", "metadata.static_file"),
    ("metadata_labels", "metadata.labels"),
    ("deleted_grace", "metadata.deleted_grace"),
    ("kubernetes", "metadata.kubernetes"),
    ("first_sync_wait", "metadata.first_sync_wait"),
    (
        "agents_max_in_flight_batches",
        "agents.max_in_flight_batches",
    ),
    ("agents_max_batch_records", "agents.max_batch_records"),
    ("agents_max_message_bytes", "agents.max_message_bytes"),
    ("agents_hello_timeout", "agents.hello_timeout"),
    ("agents_retire_after", "agents.retire_after"),
    ("agents_outbox_full_wait", "agents.outbox_full_wait"),
    ("admin_listen", "admin.listen"),
    ("admin_observe_ring", "admin.observe_ring"),
    ("tls_mode", "tls.mode"),
    ("tls_cert", "tls.cert_file"),
    ("tls_key", "tls.key_file"),
    ("tls_client_ca", "tls.client_ca_file"),
    ("tls_admin_client_ca", "tls.admin_client_ca_file"),
    ("tls_reload_interval", "tls.reload_interval"),
    ("replica_ordinal", "replication.ordinal"),
    ("replication_listen", "replication.listen"),
    ("replication_advertise", "replication.advertise"),
    ("replication_peers", "replication.peers"),
    (
        "replication_snapshot_entries",
        "replication.snapshot_entries",
    ),
    ("replication_tls_cert", "replication.tls.cert_file"),
    ("replication_tls_key", "replication.tls.key_file"),
    ("replication_tls_ca", "replication.tls.ca_file"),
];

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Bad options (or `--help` / `--version`, which clap renders as an "error" to print).
    #[error("{0}")]
    Arguments(#[from] clap::Error),
    #[error("{0}")]
    File(#[from] ConfigError),
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Export(String),
}

impl Settings {
    /// Every default (no options, no file, no environment consulted for the file).
    pub fn defaults() -> Self {
        let matches = without_environment().get_matches_from(["mermin-aggregator"]);
        Self::from_arg_matches(&matches).expect("the defaults parse")
    }

    /// Parses `args` (the program name first), then the file they name with `--config`.
    pub fn load<I, T>(args: I) -> Result<Self, SettingsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let given = Self::command().try_get_matches_from(&args)?;
        let Some(path) = given.get_one::<PathBuf>("config").cloned() else {
            return Ok(Self::from_arg_matches(&given)?);
        };
        let known: Vec<&str> = FILE_KEYS.iter().map(|(_, path)| *path).collect();
        let file = path.display().to_string();
        let mut merged: Vec<OsString> = vec![args.first().cloned().unwrap_or_default()];
        for setting in config::load(&path, &known)? {
            let Some(id) = FILE_KEYS
                .iter()
                .find(|(_, p)| *p == setting.path)
                .map(|(id, _)| *id)
            else {
                continue;
            };
            if setting.value.is_empty() && !setting.quoted {
                continue; // an empty list: what every list setting defaults to
            }
            if matches!(
                given.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                continue; // the command line and the environment win
            }
            let option = file_option(id, &setting);
            check_file_value(&option, &setting, &file)?;
            if id == "otlp_headers" {
                check_file_headers(&setting, &file)?;
            }
            merged.push(option);
        }
        merged.extend(args.into_iter().skip(1));
        Ok(Self::from_arg_matches(
            &Self::command().try_get_matches_from(merged)?,
        )?)
    }

    /// The export headers, checked here rather than by the argument parser, whose errors would
    /// repeat the value (often a credential).
    fn export_headers(&self) -> Result<Vec<OtlpHeader>, SettingsError> {
        self.otlp_headers
            .iter()
            .map(|text| {
                text.parse().map_err(|why| {
                    SettingsError::Export(format!(
                        "an OTLP header (--otlp-header, MERMIN_OTLP_HEADERS, export \"traces\" {{ otlp = {{ headers }} }}): {why}"
                    ))
                })
            })
            .collect()
    }

    /// The exporter's TLS files; only an https:// endpoint takes them.
    fn export_tls(&self) -> Result<ExportTls, SettingsError> {
        let tls = ExportTls {
            ca_file: self.otlp_ca_file.clone(),
            client_cert_and_key: match (&self.otlp_cert_file, &self.otlp_key_file) {
                (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                (None, None) => None,
                _ => {
                    return Err(SettingsError::Tls(
                        "a client certificate for the OTLP endpoint needs both --otlp-cert-file and --otlp-key-file (export \"traces\" { otlp = { tls = { cert_file key_file } } })".into(),
                    ));
                }
            },
        };
        if tls.is_set() && !self.otlp_endpoint.starts_with("https://") {
            return Err(SettingsError::Tls(format!(
                "the OTLP endpoint {} is not https://, so its TLS files (--otlp-ca-file, --otlp-cert-file, --otlp-key-file) would not be used; use https:// or leave them out",
                self.otlp_endpoint
            )));
        }
        Ok(tls)
    }

    /// The typed configuration the pipeline runs on.
    pub fn aggregator_config(&self) -> Result<AggregatorConfig, SettingsError> {
        let tls = match self.tls_mode {
            TlsMode::Disabled if self.tls_admin_client_ca.is_some() => {
                return Err(SettingsError::Tls(
                    "--tls-admin-client-ca (tls.admin_client_ca_file) is given but TLS is disabled (tls.mode); the admin API would take any client".into(),
                ));
            }
            TlsMode::Disabled => None,
            TlsMode::Required => {
                let (Some(cert), Some(key), Some(client_ca)) =
                    (&self.tls_cert, &self.tls_key, &self.tls_client_ca)
                else {
                    return Err(SettingsError::Tls(
                        "TLS is required (tls.mode) but --tls-cert, --tls-key and --tls-client-ca are not all given; give them, or --tls-mode=disabled for plaintext".into(),
                    ));
                };
                Some(ServerTlsConfig {
                    files: TlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        client_ca: client_ca.clone(),
                    },
                    reload_interval: self.tls_reload_interval.into(),
                })
            }
        };
        Ok(AggregatorConfig {
            tls,
            admin_client_ca: self.tls_admin_client_ca.clone(),
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            export: ExportConfig {
                endpoint: self.otlp_endpoint.clone(),
                protocol: self.otlp_protocol,
                timeout: self.otlp_timeout.into(),
                min_backoff: defaults::EXPORT_MIN_BACKOFF,
                max_backoff: defaults::EXPORT_MAX_BACKOFF,
                drop_oldest_above_bytes: None,
                tls: self.export_tls()?,
                headers: self.export_headers()?,
            },
            limits: IngestLimits {
                max_in_flight_batches: self.agents_max_in_flight_batches,
                max_batch_records: self.agents_max_batch_records,
                max_message_bytes: self.agents_max_message_bytes,
                pause_above_outbox_bytes: None,
                outbox_full_wait: self.agents_outbox_full_wait.into(),
                hello_timeout: self.agents_hello_timeout.into(),
                retire_after: self.agents_retire_after.into(),
            },
            outbox: OutboxQuota {
                max_bytes: self.outbox_max_bytes,
                when_full: self.outbox_when_full,
            },
            settle: self.settle.into(),
            grace: self.grace.into(),
            checkpoint_interval: self.checkpoint_interval.into(),
            print_flows: self.print_flows,
            metrics_listen: Some(self.metrics_listen),
            admin: AdminConfig {
                listen: self.admin_listen,
                observe_ring: self.admin_observe_ring,
            },
            metadata: MetadataConfig {
                naming: self.attribute_names,
                index: IndexSettings {
                    label_keys: self.metadata_labels.clone(),
                    deleted_grace: self.deleted_grace.into(),
                },
                static_file: self.metadata_file.clone(),
                kubernetes: self.kubernetes,
                first_sync_wait: self.first_sync_wait.into(),
            },
        })
    }

    /// The effective settings, shaped as the HCL file is (what `--check-config` prints).
    pub fn effective_json(&self) -> serde_json::Value {
        let duration = |d: &humantime::Duration| d.to_string();
        serde_json::json!({
            "listen": self.listen.to_string(),
            "metrics_listen": self.metrics_listen.to_string(),
            "data_dir": self.data_dir.display().to_string(),
            "log_format": self.log_format.as_str(),
            "print_flows": self.print_flows,
            "settle": duration(&self.settle),
            "grace": duration(&self.grace),
            "checkpoint_interval": duration(&self.checkpoint_interval),
            "outbox_max_bytes": self.outbox_max_bytes,
            "outbox_when_full": self.outbox_when_full.as_str(),
            "export": { "traces": { "otlp": {
                "endpoint": self.otlp_endpoint,
                "protocol": self.otlp_protocol.as_str(),
                "timeout": duration(&self.otlp_timeout),
                // Names only: the values are often credentials.
                "headers": self.otlp_headers.iter().map(|h| header_name(h)).collect::<Vec<_>>(),
                "tls": {
                    "ca_file": self.otlp_ca_file.as_ref().map(|p| p.display().to_string()),
                    "cert_file": self.otlp_cert_file.as_ref().map(|p| p.display().to_string()),
                    "key_file": self.otlp_key_file.as_ref().map(|p| p.display().to_string()),
                },
            } } },
            "metadata": {
                "attribute_names": self.attribute_names.as_str(),
                "static_file": self.metadata_file.as_ref().map(|p| p.display().to_string()),
                "labels": self.metadata_labels,
                "deleted_grace": duration(&self.deleted_grace),
                "kubernetes": self.kubernetes,
                "first_sync_wait": duration(&self.first_sync_wait),
            },
            "agents": {
                "max_in_flight_batches": self.agents_max_in_flight_batches,
                "max_batch_records": self.agents_max_batch_records,
                "max_message_bytes": self.agents_max_message_bytes,
                "hello_timeout": duration(&self.agents_hello_timeout),
                "retire_after": duration(&self.agents_retire_after),
                "outbox_full_wait": duration(&self.agents_outbox_full_wait),
            },
            "admin": {
                "listen": self.admin_listen.to_string(),
                "observe_ring": self.admin_observe_ring,
            },
            "tls": {
                "mode": self.tls_mode.as_str(),
                "cert_file": self.tls_cert.as_ref().map(|p| p.display().to_string()),
                "key_file": self.tls_key.as_ref().map(|p| p.display().to_string()),
                "client_ca_file": self.tls_client_ca.as_ref().map(|p| p.display().to_string()),
                "admin_client_ca_file": self.tls_admin_client_ca.as_ref().map(|p| p.display().to_string()),
                "reload_interval": duration(&self.tls_reload_interval),
            },
            "replication": {
                "ordinal": self.replica_ordinal,
                "listen": self.replication_listen.to_string(),
                "advertise": self.replication_advertise,
                "peers": self.replication_peers,
                "snapshot_entries": self.replication_snapshot_entries,
                "tls": {
                    "cert_file": self.replication_tls_cert.as_ref().map(|p| p.display().to_string()),
                    "key_file": self.replication_tls_key.as_ref().map(|p| p.display().to_string()),
                    "ca_file": self.replication_tls_ca.as_ref().map(|p| p.display().to_string()),
                },
            },
        })
    }

    /// This aggregator's place in a cluster, if it runs as a replica (`--replica-ordinal`).
    pub fn cluster_config(&self) -> Result<Option<ClusterConfig>, SettingsError> {
        let Some(ordinal) = self.replica_ordinal else {
            return Ok(None);
        };
        let tls = match (
            &self.replication_tls_cert,
            &self.replication_tls_key,
            &self.replication_tls_ca,
        ) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(ServerTlsConfig {
                files: TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: ca.clone(),
                },
                reload_interval: self.tls_reload_interval.into(),
            }),
            _ => {
                return Err(SettingsError::Tls(
                    "TLS between replicas needs all of --replication-tls-cert, --replication-tls-key and --replication-tls-ca (replication { tls { cert_file key_file ca_file } }), or none of them for plaintext".into(),
                ));
            }
        };
        Ok(Some(ClusterConfig {
            ordinal,
            listen: self.replication_listen,
            advertise: self.replication_advertise.clone(),
            peers: self.replication_peers.clone(),
            timings: RaftTuning {
                snapshot_entries: self.replication_snapshot_entries,
                ..RaftTuning::default()
            },
            tls,
        }))
    }
}

/// The options with no environment variables behind them.
fn without_environment() -> clap::Command {
    Settings::command().mut_args(|arg| arg.env(None::<&str>))
}

/// The option a file setting stands for: `--settle=3s`.
fn file_option(id: &str, setting: &FileSetting) -> OsString {
    let command = Settings::command();
    let long = command
        .get_arguments()
        .find(|arg| arg.get_id() == id)
        .and_then(|arg| arg.get_long())
        .unwrap_or(id);
    format!("--{long}={}", setting.value).into()
}

/// Parses one file value alone with its option's parser, so that an error names file and line.
fn check_file_value(
    option: &OsString,
    setting: &FileSetting,
    file: &str,
) -> Result<(), ConfigError> {
    let checked = without_environment()
        .try_get_matches_from([OsString::from("mermin-aggregator"), option.clone()]);
    let Err(err) = checked else {
        return Ok(());
    };
    let why = std::error::Error::source(&err)
        .map(ToString::to_string)
        .unwrap_or_else(|| clap_reason(&err));
    Err(ConfigError {
        file: file.to_owned(),
        line: setting.line,
        message: format!("{}: {why}", setting.written()),
    })
}

/// The export headers of the file, each `name=value` checked as the exporter will take it; an
/// error names the line, never a value (often a credential).
fn check_file_headers(setting: &FileSetting, file: &str) -> Result<(), ConfigError> {
    for header in setting.value.split(',') {
        header.parse::<OtlpHeader>().map_err(|why| ConfigError {
            file: file.to_owned(),
            line: setting.line,
            message: format!("headers: {why}"),
        })?;
    }
    Ok(())
}

/// clap's message without its `error: ` prefix and usage lines.
fn clap_reason(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let first = rendered.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").to_owned()
}

/// A duration that must not be zero (a period, a timeout: zero would panic a timer or fail
/// every attempt at once).
fn positive_duration(text: &str) -> Result<humantime::Duration, String> {
    let duration: humantime::Duration = text.parse().map_err(|e| format!("{e}"))?;
    if duration.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(duration)
}

/// A checkpoint interval: at least 10 ms (every tick is a store write and a flush).
fn checkpoint_interval(text: &str) -> Result<humantime::Duration, String> {
    let duration = positive_duration(text)?;
    if *duration < std::time::Duration::from_millis(10) {
        return Err("must be at least 10ms".to_owned());
    }
    Ok(duration)
}

/// The name of the export header `text` (`name=value`), as sent: lower case.
fn header_name(text: &str) -> String {
    text.split_once('=')
        .map_or("", |(name, _)| name)
        .trim()
        .to_ascii_lowercase()
}

/// A replica's ordinal: a number, or a StatefulSet pod name ending in `-<ordinal>`.
fn replica_ordinal(text: &str) -> Result<u32, String> {
    let number = text.rsplit('-').next().unwrap_or(text);
    number.parse().map_err(|_| {
        format!("{text:?} is neither an ordinal nor a StatefulSet pod name ending in -<ordinal>")
    })
}

/// `--otlp-endpoint`: an http:// or https:// URL with a host.
fn endpoint(text: &str) -> Result<String, String> {
    if !(text.starts_with("http://") || text.starts_with("https://")) {
        return Err("must start with http:// or https://".into());
    }
    let uri: http::Uri = text.parse().map_err(|e| format!("not a valid URL ({e})"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err("names no host".into());
    }
    Ok(text.to_owned())
}

impl AggregatorConfig {
    /// Agents and the admin API on free loopback ports in plaintext, no metrics endpoint, no
    /// metadata source, everything else at the defaults: for embedding the aggregator (tests,
    /// benchmarks).
    pub fn loopback(data_dir: PathBuf, export: ExportConfig) -> Self {
        let mut settings = Settings::defaults();
        settings.tls_mode = TlsMode::Disabled;
        let mut config = settings
            .aggregator_config()
            .expect("plaintext settings are complete");
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.data_dir = data_dir;
        config.export = export;
        config.metrics_listen = None;
        config.metadata.kubernetes = false;
        config
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn load_file(text: &str, args: &[&str]) -> Result<Settings, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mermin.hcl");
        std::fs::write(&path, text).unwrap();
        let mut argv = vec![
            "mermin-aggregator".to_owned(),
            "--config".to_owned(),
            path.display().to_string(),
        ];
        argv.extend(args.iter().map(|a| a.to_string()));
        Settings::load(argv).map_err(|e| {
            e.to_string()
                .replace(&path.display().to_string(), "mermin.hcl")
        })
    }

    /// Operators may have a CA of their own: the admin API then takes only their certificates
    /// (an agent's, signed by the agents' CA, opens the agent endpoint alone).
    #[test]
    fn the_admin_api_takes_its_own_client_ca_from_the_tls_block() {
        let text = r#"
tls {
  cert_file            = "/tls/tls.crt"
  key_file             = "/tls/tls.key"
  client_ca_file       = "/tls/agents-ca.crt"
  admin_client_ca_file = "/tls/operators-ca.crt"
}
"#;
        let s = load_file(text, &[]).unwrap();
        let config = s.aggregator_config().unwrap();
        assert_eq!(
            config.tls.unwrap().files.client_ca,
            PathBuf::from("/tls/agents-ca.crt")
        );
        assert_eq!(
            config.admin_client_ca,
            Some(PathBuf::from("/tls/operators-ca.crt"))
        );
        assert_eq!(
            s.effective_json()["tls"]["admin_client_ca_file"],
            "/tls/operators-ca.crt"
        );
        let plaintext = load_file(text, &["--tls-mode=disabled"]).unwrap();
        assert_eq!(
            plaintext.aggregator_config().unwrap_err().to_string(),
            "--tls-admin-client-ca (tls.admin_client_ca_file) is given but TLS is disabled (tls.mode); the admin API would take any client"
        );
    }

    #[test]
    fn defaults_come_from_the_defaults_module() {
        let settings = Settings::defaults();
        assert_eq!(settings.listen, defaults::LISTEN);
        assert_eq!(Duration::from(settings.settle), defaults::SETTLE);
        assert_eq!(
            Duration::from(settings.checkpoint_interval),
            defaults::CHECKPOINT_INTERVAL
        );
        assert_eq!(settings.outbox_max_bytes, defaults::OUTBOX_MAX_BYTES);
        assert!(settings.kubernetes);
        assert!(!settings.print_flows);
        let help = Settings::command().render_long_help().to_string();
        assert!(help.contains("[default: 3s]"), "{help}");
        assert!(help.contains("[default: 0.0.0.0:4600]"), "{help}");
    }

    #[test]
    fn headers_are_a_map_in_the_otlp_block_and_their_values_are_not_shown() {
        let text = r#"export "traces" {
  otlp = {
    endpoint = "http://tempo:4317"
    headers  = { "X-Scope-OrgID" = "tenant-a", Authorization = "Bearer s3cr3t" }
  }
}
tls { mode = "disabled" }
"#;
        let settings = load_file(text, &[]).unwrap();
        let export = settings.aggregator_config().unwrap().export;
        let headers: Vec<(&str, &[u8])> = export
            .headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_bytes()))
            .collect();
        assert_eq!(
            headers,
            [
                ("x-scope-orgid", b"tenant-a".as_slice()),
                ("authorization", b"Bearer s3cr3t".as_slice())
            ]
        );
        let json = settings.effective_json().to_string();
        assert!(
            json.contains(r#""headers":["x-scope-orgid","authorization"]"#),
            "{json}"
        );
        assert!(!json.contains("s3cr3t"), "{json}");

        assert_eq!(
            load_file(
                "export \"traces\" {\n  otlp = {\n    headers = { tenant = 1 }\n  }\n}\n",
                &[]
            )
            .unwrap_err(),
            "mermin.hcl:3: headers must map names to strings"
        );
        assert_eq!(
            load_file(
                "export \"traces\" {\n  otlp = {\n    headers = { a = \"b,c\" }\n  }\n}\n",
                &[]
            )
            .unwrap_err(),
            "mermin.hcl:3: headers: the value of \"a\" holds a comma, which a map value cannot"
        );
        assert_eq!(
            load_file(
                "export \"traces\" {\n  otlp = {\n    headers = { \"bad name\" = \"s3cr3t\" }\n  }\n}\n",
                &[]
            )
            .unwrap_err(),
            "mermin.hcl:3: headers: \"bad name\" is not a header name"
        );
        assert_eq!(
            load_file(
                "export \"traces\" {\n  otlp = {\n    headers = { a = \"1\", Host = \"x\" }\n  }\n}\n",
                &[]
            )
            .unwrap_err(),
            "mermin.hcl:3: headers: \"host\" is set by the exporter itself"
        );
        let bad = Settings::load([
            "mermin-aggregator",
            "--tls-mode=disabled",
            "--otlp-header",
            "bad name=s3cr3t",
        ])
        .unwrap();
        assert_eq!(
            bad.aggregator_config().unwrap_err().to_string(),
            "an OTLP header (--otlp-header, MERMIN_OTLP_HEADERS, export \"traces\" { otlp = { headers } }): \"bad name\" is not a header name"
        );
    }

    #[test]
    fn an_https_endpoint_s_tls_files_are_given_in_the_otlp_block() {
        let (ca, cert, key) = (
            PathBuf::from("/etc/otlp/ca.pem"),
            PathBuf::from("/etc/otlp/c.pem"),
            PathBuf::from("/etc/otlp/k.pem"),
        );
        let text = format!(
            r#"export "traces" {{
  otlp = {{
    endpoint = "https://otlp.example.com:443"
    protocol = "http/protobuf"
    tls = {{ ca_file = "{}" cert_file = "{}" key_file = "{}" }}
  }}
}}
tls {{ mode = "disabled" }}
"#,
            ca.display(),
            cert.display(),
            key.display()
        );
        let settings = load_file(&text, &[]).unwrap();
        let tls = settings.aggregator_config().unwrap().export.tls;
        assert_eq!(tls.ca_file, Some(ca.clone()));
        assert_eq!(tls.client_cert_and_key, Some((cert.clone(), key)));
        assert_eq!(
            settings.effective_json()["export"]["traces"]["otlp"]["tls"]["ca_file"],
            ca.display().to_string()
        );

        // TLS files for a plaintext endpoint, half a client identity.
        let plaintext = Settings::load([
            "mermin-aggregator",
            "--tls-mode=disabled",
            "--otlp-endpoint=http://tempo:4317",
            &format!("--otlp-ca-file={}", ca.display()),
        ])
        .unwrap();
        assert_eq!(
            plaintext.aggregator_config().unwrap_err().to_string(),
            "the OTLP endpoint http://tempo:4317 is not https://, so its TLS files (--otlp-ca-file, --otlp-cert-file, --otlp-key-file) would not be used; use https:// or leave them out"
        );
        let half = Settings::load([
            "mermin-aggregator",
            "--tls-mode=disabled",
            "--otlp-endpoint=https://tempo:4317",
            &format!("--otlp-cert-file={}", cert.display()),
        ])
        .unwrap();
        assert_eq!(
            half.aggregator_config().unwrap_err().to_string(),
            "a client certificate for the OTLP endpoint needs both --otlp-cert-file and --otlp-key-file (export \"traces\" { otlp = { tls = { cert_file key_file } } })"
        );
    }

    #[test]
    fn the_seed_block_as_pasted_and_every_setting_from_the_file() {
        let text = r#"export "traces" { otlp = { endpoint = "http://tempo:4317" protocol = "grpc" } }
listen = "127.0.0.1:4600"
data_dir = "/var/lib/mermin"
settle = "2s"
grace = "1m"
checkpoint_interval = "500ms"
outbox_max_bytes = 5000000
outbox_when_full = "drop_oldest"
print_flows = true
log_format = "json"
metadata {
  attribute_names = "mermin"
  static_file = "/etc/m.hcl"
  labels = ["app", "team"]
  deleted_grace = "2m"
  kubernetes = false
}
agents { max_in_flight_batches = 4 hello_timeout = "3s" retire_after = "10m" }
admin { listen = "0.0.0.0:9093" observe_ring = 50 }
"#;
        let s = load_file(text, &[]).unwrap();
        assert_eq!(s.otlp_endpoint, "http://tempo:4317");
        assert_eq!(s.otlp_protocol, OtlpProtocol::Grpc);
        assert_eq!(s.listen, "127.0.0.1:4600".parse().unwrap());
        assert_eq!(s.data_dir, PathBuf::from("/var/lib/mermin"));
        assert_eq!(Duration::from(s.settle), Duration::from_secs(2));
        assert_eq!(Duration::from(s.grace), Duration::from_secs(60));
        assert_eq!(
            Duration::from(s.checkpoint_interval),
            Duration::from_millis(500)
        );
        assert_eq!(s.outbox_max_bytes, 5_000_000);
        assert_eq!(s.outbox_when_full, WhenFull::DropOldest);
        assert!(s.print_flows);
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.attribute_names, AttributeNaming::Mermin);
        assert_eq!(s.metadata_file, Some(PathBuf::from("/etc/m.hcl")));
        assert_eq!(s.metadata_labels, ["app", "team"]);
        assert_eq!(Duration::from(s.deleted_grace), Duration::from_secs(120));
        assert!(!s.kubernetes);
        assert_eq!(s.agents_max_in_flight_batches, 4);
        assert_eq!(
            Duration::from(s.agents_hello_timeout),
            Duration::from_secs(3)
        );
        let json = s.effective_json();
        assert_eq!(
            json["export"]["traces"]["otlp"]["endpoint"],
            "http://tempo:4317"
        );
        assert_eq!(
            json["metadata"]["labels"],
            serde_json::json!(["app", "team"])
        );
        assert_eq!(json["grace"], "1m");
        assert_eq!(json["agents"]["hello_timeout"], "3s");
        assert_eq!(
            Duration::from(s.agents_retire_after),
            Duration::from_secs(600)
        );
        assert_eq!(json["agents"]["retire_after"], "10m");
        assert_eq!(s.admin_listen, "0.0.0.0:9093".parse().unwrap());
        assert_eq!(s.admin_observe_ring, 50);
        assert_eq!(json["admin"]["listen"], "0.0.0.0:9093");
    }

    #[test]
    fn an_empty_list_sets_no_labels() {
        let s = load_file("metadata {\n  labels = []\n}\n", &[]).unwrap();
        assert!(s.metadata_labels.is_empty());
        assert_eq!(
            s.effective_json()["metadata"]["labels"],
            serde_json::json!([])
        );
    }

    #[test]
    fn the_replication_block_and_an_ordinal_from_a_pod_name() {
        let text = "replication {\n  ordinal = \"mermin-aggregator-2\"\n  listen = \"0.0.0.0:4610\"\n  advertise = \"mermin-aggregator-2.peers.ns.svc:4610\"\n  peers = [\"a:4610\", \"b:4610\"]\n}\n";
        let cluster = load_file(text, &[])
            .unwrap()
            .cluster_config()
            .unwrap()
            .unwrap();
        assert_eq!(cluster.ordinal, 2);
        assert_eq!(cluster.listen, "0.0.0.0:4610".parse().unwrap());
        assert_eq!(
            cluster.advertise.as_deref(),
            Some("mermin-aggregator-2.peers.ns.svc:4610")
        );
        assert_eq!(cluster.peers, ["a:4610", "b:4610"]);
        let alone = load_file("", &[]).unwrap();
        assert!(
            alone.cluster_config().unwrap().is_none(),
            "no ordinal: alone"
        );
        let tls = "replication {\n  ordinal = 1\n  tls {\n    cert_file = \"/p/tls.crt\"\n    key_file = \"/p/tls.key\"\n    ca_file = \"/p/ca.crt\"\n  }\n}\n";
        let files = load_file(tls, &[])
            .unwrap()
            .cluster_config()
            .unwrap()
            .unwrap()
            .tls;
        assert_eq!(
            files.map(|tls| tls.files),
            Some(TlsFiles {
                cert: "/p/tls.crt".into(),
                key: "/p/tls.key".into(),
                client_ca: "/p/ca.crt".into(),
            })
        );
        let half = tls.replace("    key_file = \"/p/tls.key\"\n", "");
        let half = load_file(&half, &[]).unwrap();
        assert_eq!(
            half.cluster_config().unwrap_err().to_string(),
            "TLS between replicas needs all of --replication-tls-cert, --replication-tls-key and --replication-tls-ca (replication { tls { cert_file key_file ca_file } }), or none of them for plaintext"
        );
        let err = load_file("replication {\n  ordinal = \"leader\"\n}\n", &[]).unwrap_err();
        assert!(
            err.contains(
                "\"leader\" is neither an ordinal nor a StatefulSet pod name ending in -<ordinal>"
            ),
            "{err}"
        );
    }

    #[test]
    fn the_command_line_wins_over_the_file() {
        let text = "settle = \"2s\"\nmetadata {\n  kubernetes = true\n}\n";
        let s = load_file(text, &["--settle", "5s", "--kubernetes=false"]).unwrap();
        assert_eq!(Duration::from(s.settle), Duration::from_secs(5));
        assert!(!s.kubernetes);
        let s = load_file(text, &[]).unwrap();
        assert_eq!(Duration::from(s.settle), Duration::from_secs(2));
        assert!(s.kubernetes);
    }

    #[test]
    fn bad_file_values_point_at_file_and_line() {
        assert_eq!(
            load_file("listen = \"0.0.0.0:4600\"\n\nsettle = \"soon\"\n", &[]).unwrap_err(),
            "mermin.hcl:3: settle = \"soon\": expected number at 0"
        );
        assert_eq!(
            load_file(
                "export \"traces\" {\n  otlp = {\n    endpoint = \"tempo:4317\"\n  }\n}\n",
                &[]
            )
            .unwrap_err(),
            "mermin.hcl:3: endpoint = \"tempo:4317\": must start with http:// or https://"
        );
        assert_eq!(
            load_file(
                "export \"traces\" {\n  otlp = {\n    endpoint = \"http://\"\n  }\n}\n",
                &[]
            )
            .unwrap_err(),
            "mermin.hcl:3: endpoint = \"http://\": not a valid URL (empty string)"
        );
        assert_eq!(
            load_file("tls {\n  reload_interval = \"0s\"\n}\n", &[]).unwrap_err(),
            "mermin.hcl:2: reload_interval = \"0s\": must be longer than zero"
        );
        assert_eq!(
            load_file("\ncheckpoint_interval = \"0s\"\n", &[]).unwrap_err(),
            "mermin.hcl:2: checkpoint_interval = \"0s\": must be longer than zero"
        );
        assert_eq!(
            load_file("checkpoint_interval = \"5ms\"\n", &[]).unwrap_err(),
            "mermin.hcl:1: checkpoint_interval = \"5ms\": must be at least 10ms"
        );
        assert_eq!(
            load_file("", &["--otlp-timeout", "0s"]).unwrap_err(),
            "error: invalid value '0s' for '--otlp-timeout <OTLP_TIMEOUT>': must be longer than zero\n\nFor more information, try '--help'.\n"
        );
        assert_eq!(
            load_file("outbox_max_bytes = \"1GB\"\n", &[]).unwrap_err(),
            "mermin.hcl:1: outbox_max_bytes = \"1GB\": invalid digit found in string"
        );
        assert_eq!(
            load_file("outbox_when_full = \"block\"\n", &[]).unwrap_err(),
            "mermin.hcl:1: outbox_when_full = \"block\": unknown policy \"block\"; expected \"backpressure\" or \"drop_oldest\""
        );
        assert_eq!(
            load_file("metadata {\n  attribute_names = \"otel\"\n}\n", &[]).unwrap_err(),
            "mermin.hcl:2: attribute_names = \"otel\": \"otel\": expected seed or mermin"
        );
        assert_eq!(
            load_file("bogus = 1\n", &[]).unwrap_err(),
            "mermin.hcl:1: unknown key `bogus` (known: listen, metrics_listen, data_dir, log_format, print_flows, settle, grace, checkpoint_interval, outbox_max_bytes, outbox_when_full, export \"traces\", metadata, agents, admin, tls, replication)"
        );
    }
}
