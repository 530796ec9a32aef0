//! Three aggregator processes as one cluster (`--replica-ordinal`, real Raft over loopback gRPC,
//! real sled stores): the leader of the store group takes the agent's batches and exports; the
//! others stand by, not ready. The leader is killed with SIGKILL mid-stream: another replica
//! takes over within seconds, the agent carries on where its acknowledgements were, and every
//! acknowledged connection reaches the OTLP endpoint as one span with its exact counts — none
//! twice with different content. The killed replica comes back with its data and stands by.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use support::{
    closed_connection, connect,
    http::{metric, try_get},
    otlp::{Receiver, int, serve},
    process::{Process, free_port},
};

use mermin_test_support as support;

const REPLICAS: usize = 3;
const WITHIN: Duration = Duration::from_secs(60);

struct Ports {
    agents: SocketAddr,
    metrics: SocketAddr,
    replication: SocketAddr,
}

fn replica(ordinal: usize, ports: &[Ports], otlp: SocketAddr, data: &Path) -> Process {
    let peers: Vec<String> = ports.iter().map(|p| p.replication.to_string()).collect();
    let own = &ports[ordinal];
    let log = std::fs::File::create(data.with_extension("log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mermin-aggregator"))
        .args(["--replica-ordinal", &ordinal.to_string()])
        .args(["--replication-listen", &own.replication.to_string()])
        .args(["--replication-peers", &peers.join(",")])
        .args(["--listen", &own.agents.to_string()])
        .args(["--metrics-listen", &own.metrics.to_string()])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--data-dir", &data.display().to_string()])
        .args(["--otlp-endpoint", &format!("http://{otlp}")])
        .args(["--settle", "300ms", "--grace", "5s"])
        .args(["--kubernetes=false", "--tls-mode=disabled"])
        .env("RUST_LOG", "info,openraft=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Process(child)
}

/// The ordinal of the one replica whose `/readyz` answers 200, among `alive`, once the others
/// answer 503 "standing by"; bounded by [`WITHIN`].
async fn ready_leader(ports: &[Ports], alive: &[usize], log_dir: &Path) -> usize {
    let deadline = Instant::now() + WITHIN;
    loop {
        let mut ready = Vec::new();
        let mut standing_by = 0;
        for &ordinal in alive {
            match try_get(ports[ordinal].metrics, "/readyz").await {
                Some((200, _)) => ready.push(ordinal),
                Some((503, body)) if body.starts_with("standing by") => standing_by += 1,
                _ => {}
            }
        }
        if ready.len() == 1 && standing_by == alive.len() - 1 {
            return ready[0];
        }
        assert!(
            Instant::now() < deadline,
            "no single ready leader among {alive:?}: ready {ready:?}\n{}",
            logs(ports.len(), log_dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every replica's log (for a failure's message).
fn logs(replicas: usize, dir: &Path) -> String {
    (0..replicas)
        .map(|ordinal| {
            let path = dir.join(format!("replica-{ordinal}.log"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            format!("--- replica {ordinal}:\n{text}")
        })
        .collect()
}

fn client_spans(receiver: &Receiver) -> Vec<Span> {
    receiver
        .spans()
        .into_iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_mid_stream_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::default();
    let otlp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = otlp_listener.local_addr().unwrap();
    let server = serve(receiver.clone(), otlp_listener).await;
    let mut ports = Vec::new();
    for _ in 0..REPLICAS {
        ports.push(Ports {
            agents: free_port().await,
            metrics: free_port().await,
            replication: free_port().await,
        });
    }
    let data: Vec<_> = (0..REPLICAS)
        .map(|ordinal| dir.path().join(format!("replica-{ordinal}")))
        .collect();
    let mut processes: Vec<Option<Process>> = (0..REPLICAS)
        .map(|ordinal| Some(replica(ordinal, &ports, otlp, &data[ordinal])))
        .collect();
    let all: Vec<usize> = (0..REPLICAS).collect();
    let leader = ready_leader(&ports, &all, dir.path()).await;
    // Every replica a voter of the store group before one is killed (a quorum of two out of
    // three survives it).
    for standby in all.iter().filter(|&&o| o != leader) {
        let deadline = Instant::now() + WITHIN;
        while metric(
            ports[*standby].metrics,
            "mermin_aggregator_replica_store_voters",
        )
        .await
            != 3
        {
            assert!(
                Instant::now() < deadline,
                "replica {standby}: not three store voters"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // An agent reports 20 closed connections to the leader, each batch acknowledged.
    let boot = [21; 16];
    let mut agent = connect(ports[leader].agents).await;
    agent.hello("node-a", boot).await;
    assert_eq!(agent.welcome().await, 0);
    for sequence in 1..=20u64 {
        agent
            .batch(sequence, closed_connection(30_000 + sequence as u32))
            .await;
        assert_eq!(agent.ack().await, sequence);
    }

    // The leader is killed; another takes over, and the agent goes on where it was.
    drop(agent);
    let killed_at = Instant::now();
    processes[leader] = None; // SIGKILL
    let alive: Vec<usize> = all.iter().copied().filter(|&o| o != leader).collect();
    let next = ready_leader(&ports, &alive, dir.path()).await;
    let failover = killed_at.elapsed();
    let mut agent = connect(ports[next].agents).await;
    agent.hello("node-a", boot).await;
    assert_eq!(
        agent.welcome().await,
        20,
        "every acknowledged batch is on the next leader"
    );
    for sequence in 21..=40u64 {
        agent
            .batch(sequence, closed_connection(30_000 + sequence as u32))
            .await;
        assert_eq!(agent.ack().await, sequence);
    }

    // Every connection is one span with its exact counts; a span delivered twice (its removal
    // from the outbox cut off by the kill) is identical.
    let deadline = Instant::now() + WITHIN;
    let mut by_id: HashMap<Vec<u8>, Span> = HashMap::new();
    loop {
        for span in client_spans(&receiver) {
            match by_id.get(&span.span_id) {
                Some(first) => assert_eq!(first, &span, "a span id delivered with other content"),
                None => {
                    by_id.insert(span.span_id.clone(), span);
                }
            }
        }
        if by_id.len() >= 40 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ports_seen: Vec<i64> = by_id.values().map(|s| int(s, "source.port")).collect();
    ports_seen.sort_unstable();
    assert_eq!(ports_seen, (30_001..=30_040).collect::<Vec<i64>>());
    for span in by_id.values() {
        assert_eq!(int(span, "flow.bytes.sent"), 9_000);
        assert_eq!(int(span, "flow.packets.sent"), 12);
        assert_eq!(int(span, "flow.bytes.received"), 48_000);
        assert_eq!(int(span, "flow.packets.received"), 10);
    }

    // The killed replica comes back with its data and stands by.
    processes[leader] = Some(replica(leader, &ports, otlp, &data[leader]));
    assert_eq!(ready_leader(&ports, &all, dir.path()).await, next);
    eprintln!("failover: replica {next} ready {failover:?} after replica {leader} was killed");
    drop(agent);
    drop(processes);
    server.abort();
}
