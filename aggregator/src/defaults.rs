//! Every default of the aggregator's settings, in one place. The command line (`--help` shows
//! them), the HCL file and the library's `Default` implementations all take them from here; this
//! module depends on nothing.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

/// Where agents connect (gRPC).
pub const LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 4600));
/// Where `/metrics`, `/livez` and `/readyz` are served.
pub const METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9465));
/// Where the replica-to-replica service (Raft) listens, when the aggregator runs as a replica.
pub const REPLICATION_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 4610));
/// Log entries a replica's Raft group keeps before it snapshots its state and drops them.
pub const REPLICATION_SNAPSHOT_ENTRIES: u64 = 5_000;
/// Where the admin API (gRPC, with health and reflection) is served: loopback unless asked.
pub const ADMIN_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9093));
/// Flows the admin API keeps for `mermin observe --last N`.
pub const OBSERVE_RING: usize = 10_000;
/// How often the TLS certificate, key and client CA files are checked for changes.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
pub const DATA_DIR: &str = "mermin-data";
pub const OTLP_ENDPOINT: &str = "http://127.0.0.1:4317";
pub const OTLP_TIMEOUT: Duration = Duration::from_secs(10);
pub const EXPORT_MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const EXPORT_MAX_BACKOFF: Duration = Duration::from_secs(30);
pub const OUTBOX_MAX_BYTES: u64 = 1 << 30;
pub const SETTLE: Duration = Duration::from_secs(3);
pub const GRACE: Duration = Duration::from_secs(60);
/// How often the shards emit what is due and checkpoint: a quarter second keeps a connection's
/// span quick; half a second costs ~10% less CPU at 1k connections/s (BENCHMARKS.md).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
pub const DELETED_GRACE: Duration = Duration::from_secs(300);
pub const FIRST_SYNC_WAIT: Duration = Duration::from_secs(30);
pub const MAX_IN_FLIGHT_BATCHES: u32 = 8;
pub const MAX_BATCH_RECORDS: u32 = 10_000;
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
pub const OUTBOX_FULL_WAIT: Duration = Duration::from_secs(5);
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent process its node replaced keeps its place after its last stream ended.
pub const RETIRE_AFTER: Duration = Duration::from_secs(300);
