//! The `mermin` binary against a whole aggregator running in this process, over real gRPC on
//! loopback: exact tables and JSON for a known state (two agents with known sequences, a known
//! outbox), `observe` with each filter receiving exactly the matching flows of a metadata-named
//! set, `--last N`, and the exit codes.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use mermin_aggregator::{
    clock::unix_now,
    export::ExportConfig,
    pipeline::{Aggregator, AggregatorConfig, MetadataConfig},
};
use mermin_protocol::{
    admin::v1::{ObserveRequest, QueuesRequest, admin_service_client::AdminServiceClient},
    flow::v1::{Direction, EndReason},
};
use tokio::net::TcpListener;

use mermin_test_support as support;

use support::connection;

/// Runs `mermin --endpoint http://ADMIN ARGS...`: exit code, stdout, stderr.
async fn mermin(admin: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mermin"));
    command
        .args(["--endpoint", &format!("http://{admin}")])
        .args(args);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

async fn admin_client(aggregator: &Aggregator) -> AdminServiceClient<tonic::transport::Channel> {
    AdminServiceClient::connect(format!("http://{}", aggregator.admin_addr))
        .await
        .unwrap()
}

/// Two agents with known sequences; one emitted interval waits in the outbox because the OTLP
/// endpoint takes connections but never answers (so no retry is counted either).
#[tokio::test]
async fn agents_and_queues_as_tables_and_json_for_a_known_state() {
    let silent_otlp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let aggregator = Aggregator::start(AggregatorConfig {
        settle: Duration::from_millis(500),
        ..AggregatorConfig::loopback(
            dir.path().to_owned(),
            ExportConfig {
                timeout: Duration::from_secs(3600),
                ..ExportConfig::new(format!("http://{}", silent_otlp.local_addr().unwrap()))
            },
        )
    })
    .await
    .unwrap();
    // An hour and a half ago: the lag and the outbox's age read "1h" for half an hour.
    let at = unix_now() - 90 * 60 * 1_000_000_000;
    let records = connection(
        [10, 0, 0, 1],
        40_000,
        [10, 0, 0, 2],
        443,
        6,
        (9_000, 48_000),
        EndReason::TcpClose,
        at,
    );
    let mut a = support::connect(aggregator.local_addr).await;
    a.hello("node-a", [1; 16]).await;
    assert_eq!(a.welcome().await, 0);
    for (sequence, record) in (1..).zip(&records) {
        a.batch(sequence, vec![record.clone()]).await;
        assert_eq!(a.ack().await, sequence);
    }
    // The same connection seen on node-b's uplink: the same interval, one outbox request.
    let mut b = support::connect(aggregator.local_addr).await;
    b.hello("node-b", [2; 16]).await;
    assert_eq!(b.welcome().await, 0);
    for sequence in 1..=3 {
        let mut record = records[0].clone();
        record.node_name = "node-b".into();
        record.interface_name = "eth0".into();
        record.direction = Direction::Egress as i32;
        record.delta_octets = 500;
        b.batch(sequence, vec![record]).await;
        assert_eq!(b.ack().await, sequence);
    }
    let mut client = admin_client(&aggregator).await;
    let mut waited = 0;
    while client
        .queues(QueuesRequest {})
        .await
        .unwrap()
        .into_inner()
        .outbox
        .unwrap()
        .requests
        == 0
    {
        waited += 1;
        assert!(waited < 500, "no outbox entry within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let admin = aggregator.admin_addr;

    let (code, agents, _) = mermin(admin, &["agents"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        agents,
        "NODE    VERSION  BOOT ID                           LAST ACK  LAG  RECORDS/S  RECORDS  RECONNECTS\n\
         node-a  test     01010101010101010101010101010101  2         1h   0.2        2        0\n\
         node-b  test     02020202020202020202020202020202  3         1h   0.3        3        0\n"
    );
    let (code, json, _) = mermin(admin, &["agents", "--output", "json"]).await;
    assert_eq!(code, 0);
    let mut json: serde_json::Value = serde_json::from_str(&json).unwrap();
    for agent in json["agents"].as_array_mut().unwrap() {
        // Times of this run: checked for range, then fixed for the comparison.
        let lag = agent["lag_millis"].as_u64().unwrap();
        assert!((90 * 60_000..91 * 60_000).contains(&lag), "{lag}");
        agent["lag_millis"] = 0.into();
        let connected = agent["connected_unix_nanos"].as_u64().unwrap();
        assert!(connected.abs_diff(unix_now()) < 60_000_000_000);
        agent["connected_unix_nanos"] = 0.into();
    }
    let agent = |node: &str, boot: &str, last: u64, rate: f64| {
        serde_json::json!({
            "node": node, "agent_version": "test", "boot_id": boot,
            "connected_unix_nanos": 0, "last_acked_sequence": last, "lag_millis": 0,
            "records_per_second": rate, "reconnects": 0, "records_accepted": last,
        })
    };
    assert_eq!(
        json,
        serde_json::json!({ "agents": [
            agent("node-a", "01010101010101010101010101010101", 2, 0.2),
            agent("node-b", "02020202020202020202020202020202", 3, 0.3),
        ]})
    );

    let (code, queues, _) = mermin(admin, &["queues"]).await;
    assert_eq!(code, 0);
    let (_, json, _) = mermin(admin, &["queues", "-o", "json"]).await;
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let outbox = &json["outbox"];
    let bytes = outbox["bytes"].as_u64().unwrap();
    assert_eq!(
        queues,
        format!(
            "QUEUE               STATE\n\
             shard mailboxes     0 0 0 0 0 0 0 0\n\
             outbox              1 requests, {} of 1.1 GB\n\
             outbox oldest span  1h ago\n\
             export retries      0\n\
             spans rejected      none\n\
             spans dropped       none\n\
             observe dropped     none\n",
            mermin_protocol::display::bytes(bytes)
        )
    );
    let age = outbox["oldest_age_seconds"].as_u64().unwrap();
    assert!((90 * 60..91 * 60).contains(&age), "{age}");
    let shards: Vec<serde_json::Value> = (0..8)
        .map(|shard| {
            let connections = json["shards"][shard]["connections"].clone();
            serde_json::json!({ "shard": shard, "mailbox_parts": 0, "connections": connections })
        })
        .collect();
    let connections: u64 = shards
        .iter()
        .map(|s| s["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(
        connections, 1,
        "the closed connection, kept for late records"
    );
    assert_eq!(
        json,
        serde_json::json!({
            "shards": shards,
            "outbox": {
                "requests": 1,
                "bytes": bytes,
                "max_bytes": 1_073_741_824u64,
                "oldest_span_end_unix_nanos": at + 1_000,
                "oldest_age_seconds": age,
            },
            "spans_rejected": [], "spans_dropped": [], "export_retries": 0,
            "observe_dropped": [],
        })
    );
    assert!(bytes > 1_000, "{bytes}: one request of two spans");
    aggregator.shutdown().await;
}

const ENDPOINTS: &str = r#"
endpoint "10.0.1.1" { pod = "web-1" namespace = "frontend" workload = "web" workload_kind = "Deployment" node = "node-a" }
endpoint "10.0.2.1" { pod = "api-0" namespace = "backend" workload = "api" workload_kind = "StatefulSet" node = "node-a" }
endpoint "10.0.3.1" { pod = "dns-0" namespace = "kube-system" workload = "dns" node = "node-c" }
"#;

const F1: &str = "frontend/web-1 → backend/api-0 TCP 443 sent 9.0 kB received 48.0 kB tcp_close\n";
const F2: &str =
    "frontend/web-1 → kube-system/dns-0 UDP 53 sent 300 B received 400 B idle_timeout\n";
const F3: &str = "backend/api-0 → 10.9.9.9 TCP 5432 sent 5.0 kB received 1.0 kB tcp_close\n";

async fn named_aggregator(dir: &Path) -> Aggregator {
    let endpoints = dir.join("endpoints.hcl");
    std::fs::write(&endpoints, ENDPOINTS).unwrap();
    Aggregator::start(AggregatorConfig {
        settle: Duration::from_millis(100),
        metadata: MetadataConfig {
            static_file: Some(endpoints),
            ..MetadataConfig::default()
        },
        ..AggregatorConfig::loopback(dir.join("data"), ExportConfig::new("http://127.0.0.1:9"))
    })
    .await
    .unwrap()
}

/// Three connections emitted one after the other (each waited for), so the ring holds them in
/// a known order; every filter is then asked for through the binary.
#[tokio::test]
async fn observe_filters_server_side_and_last_n() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = named_aggregator(dir.path()).await;
    let mut live = admin_client(&aggregator)
        .await
        .observe(ObserveRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut agent = support::connect(aggregator.local_addr).await;
    agent.hello("node-a", [3; 16]).await;
    assert_eq!(agent.welcome().await, 0);
    let at = support::recent_nanos();
    let flows = [
        connection(
            [10, 0, 1, 1],
            40_001,
            [10, 0, 2, 1],
            443,
            6,
            (9_000, 48_000),
            EndReason::TcpClose,
            at,
        ),
        connection(
            [10, 0, 1, 1],
            40_002,
            [10, 0, 3, 1],
            53,
            17,
            (300, 400),
            EndReason::IdleTimeout,
            at,
        ),
        connection(
            [10, 0, 2, 1],
            40_003,
            [10, 9, 9, 9],
            5432,
            6,
            (5_000, 1_000),
            EndReason::TcpClose,
            at,
        ),
    ];
    for (sequence, records) in (1..).zip(flows) {
        agent.batch(sequence, records).await;
        assert_eq!(agent.ack().await, sequence);
        tokio::time::timeout(Duration::from_secs(10), live.message())
            .await
            .expect("the flow emitted within 10 s")
            .unwrap()
            .expect("the stream open");
    }
    let admin = aggregator.admin_addr;
    let cases: &[(&[&str], String)] = &[
        (&[], [F1, F2, F3].concat()),
        (&["--namespace", "backend"], [F1, F3].concat()),
        (
            &["--namespace", "kube-system", "--namespace", "backend"],
            [F1, F2, F3].concat(),
        ),
        (&["--pod", "kube-system/dns-0"], F2.into()),
        (&["--pod", "frontend/api-0"], String::new()),
        (&["--workload", "web"], [F1, F2].concat()),
        (&["--node", "node-c"], F2.into()),
        (&["--address", "10.9.0.0/16"], F3.into()),
        (&["--address", "10.0.3.1"], F2.into()),
        (&["--port", "443"], F1.into()),
        (&["--protocol", "udp"], F2.into()),
        (&["--end-reason", "idle_timeout"], F2.into()),
        (&["--min-bytes", "10000"], F1.into()),
        (
            &[
                "--namespace",
                "backend",
                "--protocol",
                "tcp",
                "--port",
                "5432",
            ],
            F3.into(),
        ),
        (&["--last", "1"], F3.into()),
        (&["--last", "2"], [F2, F3].concat()),
        (&["--last", "1", "--workload", "web"], F2.into()),
    ];
    for (filters, expected) in cases {
        let mut args = vec!["observe"];
        args.extend_from_slice(filters);
        let (code, stdout, stderr) = mermin(admin, &args).await;
        assert_eq!((code, stderr.as_str()), (0, ""), "{filters:?}");
        assert_eq!(&stdout, expected, "{filters:?}");
    }

    let (code, json, _) = mermin(admin, &["observe", "--port", "53", "-o", "json"]).await;
    assert_eq!(code, 0);
    let flow: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
    assert_eq!(flow["client"]["address"], "10.0.1.1");
    assert_eq!(flow["server"]["pod"], "dns-0");
    assert_eq!(flow["server"]["node"], "node-c");
    assert_eq!(flow["end_reason"], "END_REASON_IDLE_TIMEOUT");
    assert_eq!(flow["client_rule"], "well_known_port");
    assert_eq!(
        (flow["sent_bytes"].clone(), flow["received_bytes"].clone()),
        (300.into(), 400.into())
    );

    let (code, _, stderr) = mermin(admin, &["observe", "--address", "10.0.0.1/8"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        format!(
            "error: http://{admin} answered InvalidArgument: address \"10.0.0.1/8\": host bits are set (the network is 10.0.0.0/8)\n"
        )
    );
    aggregator.shutdown().await;
}

#[tokio::test]
async fn exit_codes_say_who_failed() {
    let dir = tempfile::tempdir().unwrap();
    let aggregator = named_aggregator(dir.path()).await;
    let admin = aggregator.admin_addr;

    let (code, _, stderr) = mermin(admin, &["drain"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        format!(
            "error: http://{admin} answered FailedPrecondition: replication is not configured: this aggregator is a single replica\n"
        )
    );
    let (code, _, stderr) = mermin(admin, &["remove-member", "4294967296"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        format!(
            "error: http://{admin} answered FailedPrecondition: replication is not configured: this aggregator is a single replica\n"
        )
    );
    let (code, _, stderr) = mermin(admin, &["observe", "--protocol", "xyz"]).await;
    assert_eq!(code, 2);
    assert!(stderr.starts_with("error: invalid value 'xyz' for '--protocol <PROTOCOL>': expected tcp, udp, icmp, icmpv6, sctp or a number 0-255"), "{stderr}");

    // An endpoint that is not a URL is a usage error, not an unreachable endpoint.
    let bad = Command::new(env!("CARGO_BIN_EXE_mermin"))
        .args(["--endpoint", "127.0.0.1:9093", "status"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8(bad.stderr).unwrap();
    assert!(
        stderr.starts_with("error: invalid value '127.0.0.1:9093' for '--endpoint <ENDPOINT>': must start with http:// or https://"),
        "{stderr}"
    );

    let (code, shards, _) = mermin(admin, &["shards"]).await;
    assert_eq!(code, 0);
    let me = aggregator.local_addr.to_string();
    let mut expected = format!(
        "SHARD  LEADER{}  TERM  COMMIT LAG  MAILBOX  CONNECTIONS\n",
        " ".repeat(me.len() - 6)
    );
    for shard in 0..8 {
        expected.push_str(&format!("{shard:<5}  {me}  0     0           0        0\n"));
    }
    assert_eq!(shards, expected);

    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, _, stderr) = mermin(closed, &["status"]).await;
    assert_eq!(code, 3);
    assert_eq!(
        stderr,
        format!(
            "error: cannot reach http://{closed}: transport error: tcp connect error: Connection refused (os error 111)\n"
        )
    );
    aggregator.shutdown().await;
}
