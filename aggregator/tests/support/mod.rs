//! A cluster of aggregator replicas, each in a network namespace of its own, for the chaos tests:
//! real processes (the binary under test), real Raft over gRPC between the namespaces, real
//! sled stores in temporary data dirs, and a network the test breaks on purpose.
//!
//! Layout: the test's own threads (the OTLP receiver, the agents, every probe) run in an
//! *observer* namespace that holds a bridge; each replica's namespace hangs on it by a veth pair.
//! Addresses, all on `10.77.0.0/24`: the observer `.1`, the OTLP receiver `.2` (a second address
//! of the bridge, so that one replica can lose the endpoint and keep everything else), replica
//! `i` at `.10 + i`. A partition is a pair of blackhole routes per peer (each side drops what it
//! would send to the other); healing deletes them. Everything is deleted when the [`Network`]
//! drops (also on a failed assertion), the processes are SIGKILLed when their handles drop.

use std::{
    collections::HashMap,
    fs::{self, OpenOptions},
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use mermin_protocol::{
    agent::v1::{Batch, Hello, agent_message::Message, aggregator_message::Message as Answer},
    flow::v1::{EndReason, FlowRecord},
};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use support::{
    certs::Ca,
    connection,
    http::try_get,
    metric_value,
    netns::{LinkOptions, Netns, link, unique},
    otlp::{Receiver, int, serve},
    process::Process,
    recent_nanos, try_connect,
};
use tokio::{sync::watch, task::JoinHandle, time::timeout};

use mermin_test_support as support;

/// Each wait of a scenario is bounded by this (a loaded CI runner elects slowly).
pub const WITHIN: Duration = Duration::from_secs(60);

const AGENTS_PORT: u16 = 4600;
const METRICS_PORT: u16 = 9090;
const REPLICATION_PORT: u16 = 4610;
const ADMIN_PORT: u16 = 4620;
const OTLP_PORT: u16 = 4317;
const OBSERVER: &str = "10.77.0.1";
const SHARDS: usize = mermin_aggregator::placement::SHARDS as usize;
const OTLP: &str = "10.77.0.2";

fn replica_ip(ordinal: usize) -> String {
    format!("10.77.0.{}", 10 + ordinal)
}

fn replica_addr(ordinal: usize, port: u16) -> SocketAddr {
    format!("{}:{port}", replica_ip(ordinal)).parse().unwrap()
}

/// One scenario at a time: three replicas each are all two cores can take.
static SERIAL: Mutex<()> = Mutex::new(());

/// Builds the network for `replicas`, and runs `scenario` on a runtime whose threads are in the
/// observer namespace; a panic in the scenario fails the test (after the network is deleted).
pub fn run<F, Fut>(replicas: usize, scenario: F)
where
    F: FnOnce(Arc<Network>) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    run_with(replicas, Security::Plaintext, scenario);
}

/// How the replicas speak to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    Plaintext,
    /// Mutual TLS: each replica's certificate (for its address) from one test CA.
    MutualTls,
}

/// As [`run`], with the replicas speaking as `security` says.
pub fn run_with<F, Fut>(replicas: usize, security: Security, scenario: F)
where
    F: FnOnce(Arc<Network>) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let network = Arc::new(Network::new(replicas, security));
    let inside = network.clone();
    let result = network
        .observer
        .spawn(move || {
            // Threads the runtime starts are created from this one: they share its namespace.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(scenario(inside));
        })
        .join();
    drop(network);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// The namespaces, the bridge and the links between them.
pub struct Network {
    observer: Netns,
    replicas: Vec<Netns>,
    dir: tempfile::TempDir,
    security: Security,
}

impl Network {
    fn new(replicas: usize, security: Security) -> Self {
        let observer = Netns::new();
        observer.ip(&["link", "add", "br0", "type", "bridge"]);
        for address in [OBSERVER, OTLP] {
            observer.ip(&["addr", "add", &format!("{address}/24"), "dev", "br0"]);
        }
        observer.ip(&["link", "set", "br0", "up"]);
        let replicas = (0..replicas)
            .map(|ordinal| {
                let ns = Netns::new();
                let port = unique("rp");
                let options = LinkOptions {
                    ipv6: false,
                    no_gso: false,
                };
                let (inside, outside) = link(&ns, "eth0", &observer, &port, options);
                inside.addr(&format!("{}/24", replica_ip(ordinal)));
                inside.up();
                observer.ip(&["link", "set", &port, "master", "br0"]);
                outside.up();
                ns
            })
            .collect();
        let network = Self {
            observer,
            replicas,
            dir: tempfile::tempdir().unwrap(),
            security,
        };
        if security == Security::MutualTls {
            let ca = Ca::new("mermin replicas");
            fs::write(network.dir.path().join("ca.crt"), ca.pem()).unwrap();
            for ordinal in 0..network.replicas.len() {
                let (cert, key) = ca.issue_for(&[&replica_ip(ordinal)], false);
                fs::write(network.tls_file(ordinal, "crt"), cert).unwrap();
                fs::write(network.tls_file(ordinal, "key"), key).unwrap();
            }
        }
        network
    }

    /// Replica `ordinal`'s certificate (`crt`) or key (`key`) file.
    fn tls_file(&self, ordinal: usize, kind: &str) -> PathBuf {
        self.dir.path().join(format!("replica-{ordinal}.{kind}"))
    }

    /// Cuts `ordinal` off from every other replica (both ways); the agents and the OTLP
    /// endpoint still reach it.
    pub fn partition(&self, ordinal: usize) {
        self.blackholes(ordinal, "add");
    }

    pub fn heal(&self, ordinal: usize) {
        self.blackholes(ordinal, "del");
    }

    fn blackholes(&self, ordinal: usize, verb: &str) {
        for peer in (0..self.replicas.len()).filter(|&p| p != ordinal) {
            for (from, to) in [(ordinal, peer), (peer, ordinal)] {
                self.replicas[from].ip(&[
                    "route",
                    verb,
                    "blackhole",
                    &format!("{}/32", replica_ip(to)),
                ]);
            }
        }
    }

    /// Makes the OTLP endpoint unreachable from `ordinal` (`false`: reachable again).
    pub fn cut_export(&self, ordinal: usize, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        self.replicas[ordinal].ip(&["route", verb, "blackhole", &format!("{OTLP}/32")]);
    }

    pub fn otlp(&self) -> SocketAddr {
        format!("{OTLP}:{OTLP_PORT}").parse().unwrap()
    }

    pub fn agents(&self, ordinal: usize) -> SocketAddr {
        replica_addr(ordinal, AGENTS_PORT)
    }

    /// Replica `ordinal`'s replication address (host:port).
    pub fn replication(&self, ordinal: usize) -> String {
        format!("{}:{REPLICATION_PORT}", replica_ip(ordinal))
    }

    pub fn admin(&self, ordinal: usize) -> SocketAddr {
        replica_addr(ordinal, ADMIN_PORT)
    }

    pub fn metrics(&self, ordinal: usize) -> SocketAddr {
        replica_addr(ordinal, METRICS_PORT)
    }

    fn data(&self, ordinal: usize) -> PathBuf {
        self.dir.path().join(format!("replica-{ordinal}"))
    }

    fn log(&self, ordinal: usize) -> PathBuf {
        self.dir.path().join(format!("replica-{ordinal}.log"))
    }

    /// Every replica's log, for a failure's message.
    pub fn logs(&self) -> String {
        (0..self.replicas.len())
            .map(|ordinal| {
                let text = fs::read_to_string(self.log(ordinal)).unwrap_or_default();
                format!("--- replica {ordinal}:\n{text}")
            })
            .collect()
    }
}

/// The replicas' processes, by ordinal (`None`: not running).
pub struct Cluster {
    pub network: Arc<Network>,
    processes: Vec<Option<Process>>,
    /// The OTLP receiver every replica exports to, in the observer namespace.
    pub receiver: Receiver,
    server: JoinHandle<()>,
}

impl Cluster {
    /// Starts the OTLP receiver and every replica, and waits until one leads with every
    /// replica a voter.
    pub async fn start(network: Arc<Network>) -> Self {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind(network.otlp()).await.unwrap();
        let server = serve(receiver.clone(), listener).await;
        let mut cluster = Self {
            processes: (0..network.replicas.len()).map(|_| None).collect(),
            network,
            receiver,
            server,
        };
        for ordinal in 0..cluster.size() {
            cluster.start_replica(ordinal);
        }
        cluster.converged().await;
        cluster
    }

    /// [`Cluster::start`], then `agents` agents reporting ([`Load`]), once each had 20 batches
    /// acknowledged.
    pub async fn start_under_load(network: Arc<Network>, agents: usize) -> (Self, Load) {
        let cluster = Self::start(network.clone()).await;
        let load = Load::start(&network, agents);
        load.advance(20, &cluster).await;
        (cluster, load)
    }

    pub fn size(&self) -> usize {
        self.network.replicas.len()
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.size())
            .filter(|&o| self.processes[o].is_some())
            .collect()
    }

    pub fn start_replica(&mut self, ordinal: usize) {
        assert!(self.processes[ordinal].is_none(), "replica {ordinal} runs");
        let network = &self.network;
        let peers: Vec<String> = (0..self.size()).map(|o| network.replication(o)).collect();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(network.log(ordinal))
            .unwrap();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &network.replicas[ordinal].name])
            .arg(env!("CARGO_BIN_EXE_mermin-aggregator"))
            .args(["--replica-ordinal", &ordinal.to_string()])
            .args(["--replication-listen", &peers[ordinal]])
            .args(["--replication-peers", &peers.join(",")])
            .args(["--listen", &format!("0.0.0.0:{AGENTS_PORT}")])
            .args(["--metrics-listen", &format!("0.0.0.0:{METRICS_PORT}")])
            .args(["--admin-listen", &format!("0.0.0.0:{ADMIN_PORT}")])
            .args(["--data-dir", &network.data(ordinal).display().to_string()])
            .args(["--otlp-endpoint", &format!("http://{}", network.otlp())])
            .args(["--settle", "300ms", "--grace", "5s"])
            // Snapshots every few seconds under the agents' load (built, and sent to a
            // replica that lags when the log it needs is gone).
            .args(["--replication-snapshot-entries", "200"])
            .args(["--kubernetes=false", "--tls-mode=disabled"]);
        if network.security == Security::MutualTls {
            command
                .arg("--replication-tls-cert")
                .arg(network.tls_file(ordinal, "crt"))
                .arg("--replication-tls-key")
                .arg(network.tls_file(ordinal, "key"))
                .arg("--replication-tls-ca")
                .arg(network.dir.path().join("ca.crt"));
        }
        let child = command
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.processes[ordinal] = Some(Process(child));
    }

    /// SIGKILLs `ordinal`.
    pub fn kill(&mut self, ordinal: usize) {
        assert!(
            self.processes[ordinal].take().is_some(),
            "replica {ordinal} is not running"
        );
    }

    /// Deletes `ordinal`'s data dir (it must not be running): the disk it had is lost.
    pub fn wipe(&self, ordinal: usize) {
        assert!(self.processes[ordinal].is_none(), "replica {ordinal} runs");
        fs::remove_dir_all(self.network.data(ordinal)).unwrap();
    }

    /// The ordinal of the running replica that leads: the one that runs the pipeline (its
    /// `/readyz` answers 200 "ready"), once every other running replica is Ready forwarding to
    /// it; bounded by [`WITHIN`].
    pub async fn ready_leader(&self) -> usize {
        self.ready_leader_among(&self.running()).await
    }

    /// As [`Cluster::ready_leader`], among the running replicas but `ordinal` (cut off,
    /// drained).
    pub async fn ready_leader_except(&self, ordinal: usize) -> usize {
        let others: Vec<usize> = self
            .running()
            .into_iter()
            .filter(|&o| o != ordinal)
            .collect();
        self.ready_leader_among(&others).await
    }

    /// As [`Cluster::ready_leader`], among `ordinals` only (the others may be cut off).
    pub async fn ready_leader_among(&self, ordinals: &[usize]) -> usize {
        let deadline = Instant::now() + WITHIN;
        loop {
            let mut leading = Vec::new();
            let mut forwarding_to = Vec::new();
            for &ordinal in ordinals {
                match try_get(self.network.metrics(ordinal), "/readyz").await {
                    Some((200, body)) if body == "ready\n" => leading.push(ordinal),
                    Some((200, body)) => forwarding_to.push(
                        body.strip_prefix("ready: forwarding agents to replica ")
                            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
                            .map(self::ordinal),
                    ),
                    _ => {}
                }
            }
            if let [leader] = leading[..]
                && forwarding_to.len() == ordinals.len() - 1
                && forwarding_to.iter().all(|to| *to == Some(leader))
            {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no single leader among {ordinals:?}: leading {leading:?}, the others forwarding \
                 to {forwarding_to:?}\n{}",
                self.network.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `ordinal` stands by, not Ready (bounded by [`WITHIN`]); returns its reason.
    pub async fn standing_by(&self, ordinal: usize) -> String {
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Some((503, body)) = try_get(self.network.metrics(ordinal), "/readyz").await {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "replica {ordinal} still Ready\n{}",
                self.network.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `ordinal`'s view of the cluster, from its `/metrics` (`None` while it does not answer).
    pub async fn view(&self, ordinal: usize) -> Option<View> {
        let (status, text) = try_get(self.network.metrics(ordinal), "/metrics").await?;
        (status == 200).then(|| View {
            id: metric_value(&text, "mermin_aggregator_replica_id"),
            store_leader: metric_value(&text, "mermin_aggregator_replica_store_leader"),
            membership_leader: metric_value(&text, "mermin_aggregator_replica_membership_leader"),
            store_voters: metric_value(&text, "mermin_aggregator_replica_store_voters"),
            membership_voters: metric_value(&text, "mermin_aggregator_replica_membership_voters"),
            store_last_applied: metric_value(&text, "mermin_aggregator_replica_store_last_applied"),
            voters_changing: metric_value(&text, "mermin_aggregator_replica_store_voters_changing")
                + metric_value(
                    &text,
                    "mermin_aggregator_replica_membership_voters_changing",
                )
                > 0,
            shard_map: shard_map(&text),
        })
    }

    /// Waits until every running replica sees the same leaders of both groups, as many voters
    /// in each as there are replicas and the same shard map — every shard leased to the store
    /// group's leader — and has applied the store group's log at least as
    /// far as the furthest replica had when they first agreed (it caught up); returns the view
    /// of the first running replica. Bounded by [`WITHIN`].
    pub async fn converged(&self) -> View {
        self.converged_with(self.size() as u64).await
    }

    /// As [`Cluster::converged`], with `voters` voters in each group.
    pub async fn converged_with(&self, voters: u64) -> View {
        let deadline = Instant::now() + WITHIN;
        let mut caught_up_at = None;
        loop {
            let mut views = Vec::new();
            for ordinal in self.running() {
                views.push(self.view(ordinal).await);
            }
            let agreed: Option<Vec<View>> = views.iter().cloned().collect();
            if let Some(agreed) = agreed.filter(|v| {
                v.iter().all(|view| {
                    view.agrees_with(&v[0])
                        && view.store_voters == voters
                        && view.membership_voters == voters
                        && !view.voters_changing
                        && view.shard_map.len() == SHARDS
                        && view
                            .shard_map
                            .iter()
                            .all(|(_, replica, _)| *replica == view.store_leader)
                })
            }) {
                let furthest = agreed
                    .iter()
                    .map(|v| v.store_last_applied)
                    .max()
                    .unwrap_or(0);
                let target = *caught_up_at.get_or_insert(furthest);
                if agreed.iter().all(|v| v.store_last_applied >= target) {
                    return agreed[0].clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "the replicas' views did not converge: {views:?}\n{}",
                self.network.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every client span the receiver got, by span id; fails if one id came with two contents.
    pub fn spans_by_id(&self) -> HashMap<Vec<u8>, Span> {
        let mut by_id: HashMap<Vec<u8>, Span> = HashMap::new();
        for span in self.receiver.spans() {
            if span.kind != SpanKind::Client as i32 {
                continue;
            }
            match by_id.get(&span.span_id) {
                Some(first) => assert_eq!(first, &span, "a span id delivered with other content"),
                None => {
                    by_id.insert(span.span_id.clone(), span);
                }
            }
        }
        by_id
    }

    /// The client spans by id ([`Cluster::spans_by_id`]) once there are at least `count`, or
    /// after [`WITHIN`] (the caller asserts what it got).
    pub async fn spans_eventually(&self, count: usize) -> Vec<Span> {
        let deadline = Instant::now() + WITHIN;
        loop {
            let by_id = self.spans_by_id();
            if by_id.len() >= count || Instant::now() > deadline {
                return by_id.into_values().collect();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the receiver has more than `spans` spans (bounded by [`WITHIN`]).
    pub async fn exports_beyond(&self, spans: usize) {
        let deadline = Instant::now() + WITHIN;
        while self.receiver.spans().len() <= spans {
            assert!(
                Instant::now() < deadline,
                "no span exported\n{}",
                self.network.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(mut self) {
        for process in self.processes.iter_mut().filter_map(Option::take) {
            process.stop().await;
        }
        self.server.abort();
    }
}

/// What one replica reports about the cluster (ids as `/metrics` shows them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The replica's own id (ordinal and incarnation).
    pub id: u64,
    pub store_leader: u64,
    pub membership_leader: u64,
    pub store_voters: u64,
    pub membership_voters: u64,
    pub store_last_applied: u64,
    /// A change of either group's voters under way (a joint configuration, or not applied).
    pub voters_changing: bool,
    /// Each shard's lease: (shard, replica, epoch), by shard.
    pub shard_map: Vec<(u64, u64, u64)>,
}

/// The shard map in a `/metrics` text: (shard, replica, epoch) for every shard with a lease.
fn shard_map(text: &str) -> Vec<(u64, u64, u64)> {
    let series = |name: &str| -> std::collections::BTreeMap<u64, u64> {
        let prefix = format!("mermin_aggregator_replica_shard_lease_{name}{{shard=\"");
        text.lines()
            .filter_map(|line| {
                let (shard, value) = line.strip_prefix(&prefix)?.split_once("\"} ")?;
                Some((shard.parse().ok()?, value.parse().ok()?))
            })
            .collect()
    };
    let epochs = series("epoch");
    series("replica")
        .into_iter()
        .map(|(shard, replica)| (shard, replica, epochs.get(&shard).copied().unwrap_or(0)))
        .collect()
}

impl View {
    /// Whether both views see the same leaders, voters and shard map.
    fn agrees_with(&self, other: &View) -> bool {
        self.shard_map == other.shard_map && self.same_groups(other)
    }

    fn same_groups(&self, other: &View) -> bool {
        (
            self.store_leader,
            self.membership_leader,
            self.store_voters,
            self.membership_voters,
        ) == (
            other.store_leader,
            other.membership_leader,
            other.store_voters,
            other.membership_voters,
        )
    }
}

/// The ordinal of a replica id (its upper 32 bits).
pub fn ordinal(id: u64) -> usize {
    (id >> 32) as usize
}

/// Agents reporting one closed connection per batch, each to whichever replica takes it (a
/// standby forwards it to the leader): a refused connection, a stream that fails or an
/// acknowledgement later than 5 s sends the agent to the next replica, where it carries on
/// after the batch that replica says it has.
pub struct Load {
    stop: watch::Sender<bool>,
    agents: Vec<JoinHandle<u64>>,
    /// Each agent's last acknowledged sequence, as it goes.
    acked: Arc<Vec<AtomicU64>>,
}

/// The client port of `agent`'s connection in batch `sequence`: unique per batch.
fn client_port(agent: usize, sequence: u64) -> u32 {
    (10_000 * (agent as u64 + 1) + sequence) as u32
}

/// Payload bytes the client of batch `sequence` sends (different per batch, so that a batch
/// counted into another's span shows).
pub fn sent_bytes(sequence: u64) -> u64 {
    1_000 + sequence
}

pub const RECEIVED_BYTES: u64 = 48_000;

impl Load {
    pub fn start(network: &Arc<Network>, agents: usize) -> Self {
        let (stop, stopped) = watch::channel(false);
        let replicas: Vec<SocketAddr> = (0..network.replicas.len())
            .map(|o| network.agents(o))
            .collect();
        let acked: Arc<Vec<AtomicU64>> = Arc::new((0..agents).map(|_| AtomicU64::new(0)).collect());
        let agents = (0..agents)
            .map(|agent| {
                let progress = Progress {
                    acked: acked.clone(),
                    agent,
                };
                tokio::spawn(report(progress, replicas.clone(), stopped.clone()))
            })
            .collect();
        Self {
            stop,
            agents,
            acked,
        }
    }

    /// Waits until every agent has had `batches` more batches acknowledged (bounded by
    /// [`WITHIN`]): the cluster takes batches again.
    pub async fn advance(&self, batches: u64, cluster: &Cluster) {
        let target: Vec<u64> = self
            .acked
            .iter()
            .map(|a| a.load(Relaxed) + batches)
            .collect();
        let deadline = Instant::now() + WITHIN;
        while self
            .acked
            .iter()
            .zip(&target)
            .any(|(a, t)| a.load(Relaxed) < *t)
        {
            assert!(
                Instant::now() < deadline,
                "the agents did not get {batches} more batches acknowledged\n{}",
                cluster.network.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the agents after the batch each is on is acknowledged; returns each agent's last
    /// acknowledged sequence.
    pub async fn stop(self) -> Vec<u64> {
        self.stop.send_replace(true);
        let mut last = Vec::new();
        for agent in self.agents {
            last.push(
                timeout(WITHIN, agent)
                    .await
                    .expect("an agent did not stop")
                    .unwrap(),
            );
        }
        last
    }

    /// Stops the agents, waits until the replicas converge, and asserts that everything
    /// acknowledged was exported ([`Load::assert_exported`]); returns each agent's last
    /// sequence and the converged view.
    pub async fn finish(self, cluster: &Cluster) -> (Vec<u64>, View) {
        let last = self.stop().await;
        let view = cluster.converged().await;
        Self::assert_exported(cluster, &last).await;
        (last, view)
    }

    /// Waits until every acknowledged batch of every agent (`last[agent]` the last) is one span
    /// with its exact counts, and nothing else is; bounded by [`WITHIN`].
    pub async fn assert_exported(cluster: &Cluster, last: &[u64]) {
        let mut expected: Vec<i64> = last
            .iter()
            .enumerate()
            .flat_map(|(agent, &last)| (1..=last).map(move |s| client_port(agent, s) as i64))
            .collect();
        expected.sort_unstable();
        let spans = cluster.spans_eventually(expected.len()).await;
        let mut ports: Vec<i64> = spans.iter().map(|s| int(s, "source.port")).collect();
        ports.sort_unstable();
        assert_eq!(
            ports.len(),
            expected.len(),
            "spans: one per acknowledged connection\n{}",
            cluster.network.logs()
        );
        assert_eq!(ports, expected);
        for span in &spans {
            let port = int(span, "source.port") as u64;
            let sequence = port % 10_000;
            assert_eq!(
                int(span, "flow.bytes.sent") as u64,
                sent_bytes(sequence),
                "port {port}"
            );
            assert_eq!(int(span, "flow.packets.sent"), 12, "port {port}");
            assert_eq!(
                int(span, "flow.bytes.received") as u64,
                RECEIVED_BYTES,
                "port {port}"
            );
            assert_eq!(int(span, "flow.packets.received"), 10, "port {port}");
        }
    }
}

/// Where one agent publishes its last acknowledged sequence.
struct Progress {
    acked: Arc<Vec<AtomicU64>>,
    agent: usize,
}

/// One agent (see [`Load`]); returns its last acknowledged sequence.
async fn report(progress: Progress, replicas: Vec<SocketAddr>, stop: watch::Receiver<bool>) -> u64 {
    let agent = progress.agent;
    let node = format!("node-{agent}");
    let mut acked = 0;
    // Agent `i` tries replica `i` first: the agents start on different replicas.
    let mut target = (agent + replicas.len() - 1) % replicas.len();
    // A batch sent and not acknowledged: the next Welcome says whether it is stored (so it
    // will be exported), even after the stop.
    let mut in_doubt = false;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !*stop.borrow() || in_doubt {
        assert!(Instant::now() < deadline, "agent {agent}: no end");
        target = (target + 1) % replicas.len();
        let Ok(Ok(mut stream)) =
            timeout(Duration::from_secs(1), try_connect(replicas[target])).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let hello = Message::Hello(Hello {
            protocol_version: 1,
            node_name: node.clone(),
            agent_version: "chaos".into(),
            boot_id: vec![agent as u8 + 1; 16],
        });
        if !stream.try_send(hello).await {
            continue;
        }
        let Ok(Some(Answer::Welcome(welcome))) = timeout(ANSWER, stream.next_answer()).await else {
            continue;
        };
        let welcome = welcome.last_durable_sequence;
        assert!(
            welcome == acked || (in_doubt && welcome == acked + 1),
            "agent {agent}: replica {target} has batches up to {welcome}, {acked} were acknowledged"
        );
        acked = welcome;
        in_doubt = false;
        progress.acked[agent].store(acked, Relaxed);
        while !*stop.borrow() {
            let sequence = acked + 1;
            let batch = Message::Batch(Batch {
                sequence,
                records: records(&node, agent, sequence),
            });
            in_doubt = true;
            if !stream.try_send(batch).await {
                break;
            }
            match timeout(ANSWER, stream.next_answer()).await {
                Ok(Some(Answer::Ack(ack))) if ack.sequence == sequence => {
                    acked = sequence;
                    in_doubt = false;
                    progress.acked[agent].store(acked, Relaxed);
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    acked
}

/// How long an agent waits for a Welcome or an Ack before it tries the next replica.
const ANSWER: Duration = Duration::from_secs(5);

/// Both directions of `agent`'s connection in batch `sequence`, closed, as `node` sees them on
/// the client's pod veth.
fn records(node: &str, agent: usize, sequence: u64) -> Vec<FlowRecord> {
    client_side(
        node,
        [10, 1, agent as u8, 1],
        client_port(agent, sequence),
        sequence,
    )
}

/// Both directions of a closed connection from `client`:`port` to 10.2.0.1:443, as `node` sees
/// them on the client's pod veth (`sent_bytes(sequence)` sent, [`RECEIVED_BYTES`] received).
pub fn client_side(node: &str, client: [u8; 4], port: u32, sequence: u64) -> Vec<FlowRecord> {
    let mut records = connection(
        client,
        port,
        [10, 2, 0, 1],
        443,
        6,
        (sent_bytes(sequence), RECEIVED_BYTES),
        EndReason::TcpClose,
        recent_nanos(),
    );
    for record in &mut records {
        record.node_name = node.to_owned();
    }
    records
}
