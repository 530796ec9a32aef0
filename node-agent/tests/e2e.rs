//! End to end on the real kernel: two "nodes" (network namespaces, an agent each), pods behind
//! veths on each, cross-node and same-node connections; the aggregator in this process over real
//! gRPC; an OTLP/gRPC receiver in this process. Every connection must arrive as exactly one
//! CLIENT span (with its SERVER child), client and server right, bytes per direction exact, both
//! ends named from a static metadata file — so that the seed's four TraceQL queries select
//! exactly the connections they should.

mod support;

use std::{
    collections::{HashMap, HashSet},
    net::UdpSocket,
    time::Duration,
};

use opentelemetry_proto::tonic::{
    common::v1::any_value::Value,
    trace::v1::{Span, span::SpanKind},
};
use support::{
    cluster::cluster,
    otlp::{int, text},
    system::System,
    *,
};

/// What Kubernetes would say about the pods (the static metadata file).
const ENDPOINTS: &str = r#"
endpoint "10.90.1.2" { pod = "nginx-7d9f4-abcde" namespace = "frontend" node = "node-a" workload_kind = "Deployment" workload = "nginx" }
endpoint "10.90.1.3" { pod = "cache-0" namespace = "frontend" node = "node-a" workload_kind = "StatefulSet" workload = "cache" }
endpoint "10.90.2.2" { pod = "api-0" namespace = "backend" node = "node-b" workload_kind = "StatefulSet" workload = "api" service = "api" }
"#;

/// A span attribute as TraceQL compares it: strings as strings, ints as ints; `None` if absent.
fn value(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone()?.value)
}

fn is_text(span: &Span, key: &str, expected: &str) -> bool {
    matches!(value(span, key), Some(Value::StringValue(s)) if s == expected)
}

#[test]
fn every_connection_becomes_one_exact_span() {
    let system = System::start(ENDPOINTS);
    let c = cluster();
    let args_a = system.agent_args("node-a");
    let args_b = system.agent_args("node-b");
    let agent_a = Agent::start(
        &c.node_a,
        "veth*,eth0",
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let agent_b = Agent::start(
        &c.node_b,
        "veth*,eth0",
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    let cross = tcp_exchange(
        &c.a1,
        &c.b1,
        "10.90.2.2:443".parse().unwrap(),
        1_200_000,
        40_000,
    );
    let same = tcp_exchange(
        &c.a1,
        &c.a2,
        "10.90.1.3:8080".parse().unwrap(),
        50_000,
        2_000,
    );
    c.b1.spawn(|| {
        let s = UdpSocket::bind("10.90.2.2:5353").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        for _ in 0..3 {
            let (n, from) = s.recv_from(&mut buf).unwrap();
            s.send_to(&buf[..n * 2], from).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    c.a1.spawn(|| {
        let s = UdpSocket::bind("10.90.1.2:40053").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        for _ in 0..3 {
            s.send_to(&[1u8; 100], "10.90.2.2:5353").unwrap();
            assert_eq!(s.recv(&mut buf).unwrap(), 200);
        }
    })
    .join()
    .unwrap();
    c.a1.exec(&["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", "10.90.2.2"]);
    // Three more connections, one after another on one 5-tuple: three traces.
    let reuse_sizes = [(30_000, 1_000), (500, 90_000), (7, 7)];
    let reused = tcp_reused_tuple(
        &c.a1,
        &c.b1,
        "10.90.1.2:41000".parse().unwrap(),
        "10.90.2.2:8443".parse().unwrap(),
        &reuse_sizes,
    );

    // Seven connections: wait (bounded) until each has its CLIENT span. Nothing more may
    // arrive (no duplicates): `stop` checks that nothing is left to export.
    system.wait_for_clients(7, Duration::from_secs(20));
    let all = system.stop(vec![agent_a, agent_b]);
    let spans: Vec<Span> = all
        .iter()
        .filter(|(_, s)| s.kind == SpanKind::Client as i32)
        .map(|(_, s)| s.clone())
        .collect();
    assert_eq!(spans.len(), 7, "one CLIENT span per connection: {spans:#?}");
    let (mut reuse, spans): (Vec<Span>, Vec<Span>) = spans
        .into_iter()
        .partition(|s| int(s, "destination.port") == 8443);
    let by_server: HashMap<String, &Span> = spans
        .iter()
        .map(|s| {
            (
                format!(
                    "{}:{}",
                    text(s, "destination.address"),
                    int(s, "destination.port")
                ),
                s,
            )
        })
        .collect();
    assert_eq!(by_server.len(), 4);

    let tcp = by_server["10.90.2.2:443"];
    assert_eq!(text(tcp, "network.protocol"), "TCP");
    assert_eq!(text(tcp, "source.address"), "10.90.1.2");
    assert_eq!(int(tcp, "source.port"), i64::from(cross.client.port()));
    assert_eq!(text(tcp, "flow.client_rule"), "tcp_handshake");
    assert_eq!(text(tcp, "flow.end_reason"), "tcp_close");
    let wire = |side: &TcpSide, payload: usize| {
        payload as u64 + side.bytes_retrans + 60 + (side.segments - 1) * 52
    };
    assert_eq!(
        int(tcp, "flow.packets.sent") as u64,
        cross.client_side.segments
    );
    assert_eq!(
        int(tcp, "flow.bytes.sent") as u64,
        wire(&cross.client_side, 1_200_000)
    );
    assert_eq!(
        int(tcp, "flow.packets.received") as u64,
        cross.server_side.segments
    );
    assert_eq!(
        int(tcp, "flow.bytes.received") as u64,
        wire(&cross.server_side, 40_000)
    );
    // Counted where the packets left their pods.
    assert_eq!(
        text(tcp, "flow.sent.observation_point"),
        "node-a/vetha1/ingress"
    );
    assert_eq!(
        text(tcp, "flow.received.observation_point"),
        "node-b/vethb1/ingress"
    );

    // The reused tuple: one trace per connection, each with its own exact counts.
    reuse.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(reuse.len(), reuse_sizes.len());
    let traces: HashSet<&[u8]> = reuse.iter().map(|s| s.trace_id.as_slice()).collect();
    assert_eq!(traces.len(), reuse_sizes.len(), "one trace per connection");
    // What a failure needs to be understood: every span of the tuple and every exchange.
    let seen = || {
        let spans: Vec<String> = reuse
            .iter()
            .map(|s| {
                let attributes: Vec<String> = s
                    .attributes
                    .iter()
                    .map(|a| {
                        format!(
                            "{}={:?}",
                            a.key,
                            a.value.as_ref().and_then(|v| v.value.as_ref())
                        )
                    })
                    .collect();
                format!(
                    "start {} end {}: {}",
                    s.start_time_unix_nano,
                    s.end_time_unix_nano,
                    attributes.join(", ")
                )
            })
            .collect();
        let exchanges: Vec<String> = reused
            .iter()
            .map(|e| format!("client {:?} server {:?}", e.client_side, e.server_side))
            .collect();
        format!(
            "spans:\n{}\nexchanges:\n{}",
            spans.join("\n"),
            exchanges.join("\n")
        )
    };
    for ((span, (upload, download)), exchange) in reuse.iter().zip(reuse_sizes).zip(&reused) {
        assert_eq!(int(span, "source.port"), 41000);
        assert_eq!(text(span, "flow.end_reason"), "tcp_close");
        assert_eq!(
            (
                int(span, "flow.packets.sent") as u64,
                int(span, "flow.bytes.sent") as u64
            ),
            (
                exchange.client_side.segments,
                wire(&exchange.client_side, upload)
            ),
            "{}",
            seen()
        );
        assert_eq!(
            (
                int(span, "flow.packets.received") as u64,
                int(span, "flow.bytes.received") as u64
            ),
            (
                exchange.server_side.segments,
                wire(&exchange.server_side, download)
            ),
            "{}",
            seen()
        );
    }

    let local = by_server["10.90.1.3:8080"];
    assert_eq!(
        int(local, "flow.bytes.sent") as u64,
        wire(&same.client_side, 50_000)
    );
    assert_eq!(
        int(local, "flow.bytes.received") as u64,
        wire(&same.server_side, 2_000)
    );
    assert_eq!(
        text(local, "flow.sent.observation_point"),
        "node-a/vetha1/ingress"
    );
    assert_eq!(
        text(local, "flow.received.observation_point"),
        "node-a/vetha2/ingress"
    );

    let udp = by_server["10.90.2.2:5353"];
    assert_eq!(text(udp, "network.protocol"), "UDP");
    assert_eq!(int(udp, "source.port"), 40053);
    assert_eq!(
        (int(udp, "flow.packets.sent"), int(udp, "flow.bytes.sent")),
        (3, 3 * 128)
    );
    assert_eq!(
        (
            int(udp, "flow.packets.received"),
            int(udp, "flow.bytes.received")
        ),
        (3, 3 * 228)
    );

    let icmp = by_server["10.90.2.2:0"];
    assert_eq!(text(icmp, "network.protocol"), "ICMP");
    assert_eq!(text(icmp, "flow.client_rule"), "icmp_request");
    assert_eq!(
        (int(icmp, "flow.packets.sent"), int(icmp, "flow.bytes.sent")),
        (2, 2 * 84)
    );

    // Both ends named, on every span.
    for span in &spans {
        assert_eq!(text(span, "source.pod.name"), "nginx-7d9f4-abcde");
        assert_eq!(text(span, "source.namespace"), "frontend");
        assert_eq!(text(span, "source.workload.name"), "nginx");
        assert_eq!(text(span, "source.node.name"), "node-a");
    }
    assert_eq!(text(tcp, "destination.pod.name"), "api-0");
    assert_eq!(text(tcp, "destination.service.name"), "api");
    assert_eq!(text(local, "destination.pod.name"), "cache-0");
    assert_eq!(text(local, "destination.workload.kind"), "StatefulSet");

    // The seed's TraceQL queries (in the form Tempo accepts), each with the connections it must
    // select — by server address:port.
    let selected = |query: &dyn Fn(&Span) -> bool| {
        let mut servers: Vec<&str> = by_server
            .iter()
            .filter(|(_, span)| query(span))
            .map(|(server, _)| server.as_str())
            .collect();
        servers.sort();
        servers
    };
    // { span.source.pod.name =~ "nginx-.*" }
    assert_eq!(
        selected(
            &|s| matches!(value(s, "source.pod.name"), Some(Value::StringValue(p)) if p.starts_with("nginx-"))
        ),
        [
            "10.90.1.3:8080",
            "10.90.2.2:0",
            "10.90.2.2:443",
            "10.90.2.2:5353"
        ]
    );
    // { span.flow.bytes.sent > 1000000 }
    assert_eq!(
        selected(
            &|s| matches!(value(s, "flow.bytes.sent"), Some(Value::IntValue(n)) if n > 1_000_000)
        ),
        ["10.90.2.2:443"]
    );
    // { span.network.protocol = "TCP" && span.destination.port = 443 }
    assert_eq!(
        selected(&|s| is_text(s, "network.protocol", "TCP")
            && matches!(value(s, "destination.port"), Some(Value::IntValue(443)))),
        ["10.90.2.2:443"]
    );
    // { span.source.namespace = "frontend" && span.destination.namespace = "backend" }
    assert_eq!(
        selected(&|s| is_text(s, "source.namespace", "frontend")
            && is_text(s, "destination.namespace", "backend")),
        ["10.90.2.2:0", "10.90.2.2:443", "10.90.2.2:5353"]
    );

    // Every CLIENT span has its SERVER child in the same trace; each side's resource is named by
    // its workload (Tempo's service graph draws nginx -> api and nginx -> cache).
    for client in &spans {
        let (client_service, _) = all
            .iter()
            .find(|(_, s)| s.span_id == client.span_id)
            .unwrap();
        assert_eq!(client_service, "nginx");
        let (server_service, child) = all
            .iter()
            .find(|(_, s)| s.kind == SpanKind::Server as i32 && s.parent_span_id == client.span_id)
            .unwrap_or_else(|| panic!("no SERVER child for {}", client.name));
        assert_eq!(child.trace_id, client.trace_id);
        let expected = if text(client, "destination.address") == "10.90.1.3" {
            "cache"
        } else {
            "api"
        };
        assert_eq!(server_service, expected);
    }
}
