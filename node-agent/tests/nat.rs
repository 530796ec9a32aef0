//! Connections through address translation, end to end on the real kernel: kube-proxy's iptables
//! rules (as it writes them) in node-a's namespace translate a Service's ClusterIP (DNAT), a
//! NodePort from outside the cluster (DNAT + masquerade) and pods' traffic leaving the cluster
//! (masquerade); real agents on both nodes learn the translations from conntrack; the aggregator
//! in this process stitches the views before and after each translation. Every connection must be
//! one CLIENT span with the endpoint that served it as destination, the client as it sent, the
//! dialled address and the Service named, and its counts exactly once.

mod support;

use std::{net::SocketAddr, time::Duration};

use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use support::{
    cluster::cluster,
    otlp::{int, text},
    system::System,
    *,
};

/// What Kubernetes would say: the pods, the nodes' addresses, and the Service's ClusterIP (only
/// the file names it).
const ENDPOINTS: &str = r#"
endpoint "10.90.1.2" { pod = "nginx-7d9f4-abcde" namespace = "frontend" node = "node-a" }
endpoint "10.90.1.3" { pod = "cache-0" namespace = "frontend" node = "node-a" }
endpoint "10.90.2.2" { pod = "api-0" namespace = "backend" node = "node-b" }
endpoint "10.96.0.10" { service = "api" namespace = "backend" }
endpoint "10.90.0.1" { node = "node-a" }
endpoint "10.90.9.1" { node = "node-a" }
endpoint "10.90.0.2" { node = "node-b" }
"#;

/// The Service 10.96.0.10:80 → api-0 (10.90.2.2:8080), also as NodePort 30080 on node-a (whose
/// outside address is 10.90.9.1), and pods' traffic to the outside masqueraded — the chains
/// kube-proxy's iptables mode writes, and a CNI's masquerade rule.
const KUBE_PROXY_RULES: &[&[&str]] = &[
    &["-N", "KUBE-SERVICES"],
    &["-A", "PREROUTING", "-j", "KUBE-SERVICES"],
    &["-N", "KUBE-SVC-API"],
    &["-N", "KUBE-SEP-API0"],
    &[
        "-A",
        "KUBE-SERVICES",
        "-d",
        "10.96.0.10/32",
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--dport",
        "80",
        "-j",
        "KUBE-SVC-API",
    ],
    &[
        "-A",
        "KUBE-SVC-API",
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        "1.0",
        "-j",
        "KUBE-SEP-API0",
    ],
    &[
        "-A",
        "KUBE-SEP-API0",
        "-p",
        "tcp",
        "-m",
        "tcp",
        "-j",
        "DNAT",
        "--to-destination",
        "10.90.2.2:8080",
    ],
    &["-N", "KUBE-NODEPORTS"],
    &["-N", "KUBE-EXT-API"],
    &[
        "-A",
        "KUBE-SERVICES",
        "-m",
        "addrtype",
        "--dst-type",
        "LOCAL",
        "-j",
        "KUBE-NODEPORTS",
    ],
    &[
        "-A",
        "KUBE-NODEPORTS",
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--dport",
        "30080",
        "-j",
        "KUBE-EXT-API",
    ],
    &[
        "-A",
        "KUBE-EXT-API",
        "-j",
        "MARK",
        "--set-xmark",
        "0x4000/0x4000",
    ],
    &["-A", "KUBE-EXT-API", "-j", "KUBE-SVC-API"],
    &["-N", "KUBE-POSTROUTING"],
    &["-A", "POSTROUTING", "-j", "KUBE-POSTROUTING"],
    &[
        "-A",
        "KUBE-POSTROUTING",
        "-m",
        "mark",
        "--mark",
        "0x4000/0x4000",
        "-j",
        "MASQUERADE",
    ],
    &[
        "-A",
        "POSTROUTING",
        "-s",
        "10.90.1.0/24",
        "-o",
        "ext0",
        "-j",
        "MASQUERADE",
    ],
];

fn span_from<'a>(spans: &'a [Span], source: &str, source_port: u16) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| text(s, "source.address") == source)
        .filter(|s| int(s, "source.port") == i64::from(source_port))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one span from {source}:{source_port}: {spans:#?}"
    );
    found[0]
}

fn has(span: &Span, key: &str) -> bool {
    span.attributes.iter().any(|a| a.key == key)
}

/// Bytes on the wire of one side (see `assert_tcp_side`).
fn wire(side: &TcpSide, payload: usize) -> u64 {
    payload as u64 + side.bytes_retrans + 60 + (side.segments - 1) * 52
}

fn assert_counts(span: &Span, served: &Served, upload: usize, download: usize) {
    let (client, server) = (&served.exchange.client_side, &served.exchange.server_side);
    assert_eq!(
        (
            int(span, "flow.packets.sent") as u64,
            int(span, "flow.bytes.sent") as u64,
            int(span, "flow.packets.received") as u64,
            int(span, "flow.bytes.received") as u64,
        ),
        (
            client.segments,
            wire(client, upload),
            server.segments,
            wire(server, download)
        ),
        "{span:#?}"
    );
}

fn translated_port(served: &Served) -> i64 {
    i64::from(served.peer.port())
}

#[test]
fn connections_through_nat_are_one_span_each_with_the_endpoint_and_the_service() {
    let system = System::start(ENDPOINTS);
    let c = cluster();
    // A host outside the cluster, behind node-a's second interface.
    let outside = Netns::new();
    point_to_point(
        (&c.node_a, "ext0", "10.90.9.1/30"),
        (&outside, "eth0", "10.90.9.2/30"),
    );
    outside.ip(&["route", "add", "default", "via", "10.90.9.1"]);
    for rule in KUBE_PROXY_RULES {
        let mut args = vec!["iptables", "-t", "nat"];
        args.extend_from_slice(rule);
        c.node_a.exec(&args);
    }

    let args_a = system.agent_args("node-a");
    let args_b = system.agent_args("node-b");
    let agent_a = Agent::start(
        &c.node_a,
        "veth*,eth0,ext0",
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let agent_b = Agent::start(
        &c.node_b,
        "veth*,eth0",
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // Two pods dial the Service at once; a host outside dials the NodePort.
    let service: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let node_port: SocketAddr = "10.90.9.1:30080".parse().unwrap();
    let to_api = tcp_exchanges(
        &c.b1,
        "10.90.2.2:8080".parse().unwrap(),
        &[
            Dial {
                from: &c.a1,
                bind: None,
                to: service,
                upload: 300_000,
                download: 20_000,
            },
            Dial {
                from: &c.a2,
                bind: None,
                to: service,
                upload: 40_000,
                download: 900_000,
            },
            Dial {
                from: &outside,
                bind: None,
                to: node_port,
                upload: 5_000,
                download: 60_000,
            },
        ],
    );
    // Two pods leave the cluster from the same port, one after the other (at once, the two
    // masquerades can race for the port and conntrack drops one SYN — a retransmission the
    // byte count here does not model): the node's address outside, two ports, never merged.
    let outbound: Vec<Served> = [
        (&c.a1, "10.90.1.2", 1_000, 2_000),
        (&c.a2, "10.90.1.3", 3_000, 4_000),
    ]
    .into_iter()
    .flat_map(|(pod, address, upload, download)| {
        tcp_exchanges(
            &outside,
            "10.90.9.2:9000".parse().unwrap(),
            &[Dial {
                from: pod,
                bind: Some(format!("{address}:40500").parse().unwrap()),
                to: "10.90.9.2:9000".parse().unwrap(),
                upload,
                download,
            }],
        )
    })
    .collect();

    system.wait_for_clients(5, Duration::from_secs(20));
    let all = system.stop(vec![agent_a, agent_b]);
    let spans: Vec<Span> = all
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    assert_eq!(spans.len(), 5, "one CLIENT span per connection: {spans:#?}");

    // The Service: the endpoint that served it, the Service named, counted where the packets
    // left the pods — before the translation for the requests, after it for the answers.
    for (served, pod, (upload, download)) in [
        (&to_api[0], "nginx-7d9f4-abcde", (300_000, 20_000)),
        (&to_api[1], "cache-0", (40_000, 900_000)),
    ] {
        let client = served.exchange.client;
        let span = span_from(&spans, &client.ip().to_string(), client.port());
        assert_eq!(text(span, "destination.address"), "10.90.2.2");
        assert_eq!(int(span, "destination.port"), 8080);
        assert_eq!(text(span, "flow.dialled.address"), "10.96.0.10");
        assert_eq!(int(span, "flow.dialled.port"), 80);
        assert_eq!(text(span, "destination.service.name"), "api");
        assert_eq!(text(span, "destination.pod.name"), "api-0");
        assert_eq!(text(span, "source.pod.name"), pod);
        assert!(!has(span, "flow.translated.source.address"), "{span:#?}");
        assert_eq!(text(span, "flow.client_rule"), "tcp_handshake");
        assert_eq!(text(span, "flow.end_reason"), "tcp_close");
        let pod_veth = if pod == "cache-0" { "vetha2" } else { "vetha1" };
        assert_eq!(
            text(span, "flow.sent.observation_point"),
            format!("node-a/{pod_veth}/ingress")
        );
        assert_eq!(
            text(span, "flow.received.observation_point"),
            "node-b/vethb1/ingress"
        );
        assert_counts(span, served, upload, download);
    }

    // The NodePort: the outside client as it sent, the node's address as api-0 saw it.
    let from_outside = &to_api[2];
    let span = span_from(&spans, "10.90.9.2", from_outside.exchange.client.port());
    assert_eq!(text(span, "destination.address"), "10.90.2.2");
    assert_eq!(int(span, "destination.port"), 8080);
    assert_eq!(text(span, "flow.dialled.address"), "10.90.9.1");
    assert_eq!(int(span, "flow.dialled.port"), 30080);
    assert_eq!(from_outside.peer.ip().to_string(), "10.90.0.1");
    assert_eq!(text(span, "flow.translated.source.address"), "10.90.0.1");
    assert_eq!(
        int(span, "flow.translated.source.port"),
        translated_port(from_outside)
    );
    // Host-side egress ranks before host-side ingress (see `stitch`): counted after the NAT.
    assert_eq!(
        text(span, "flow.sent.observation_point"),
        "node-a/eth0/egress"
    );
    assert_counts(span, from_outside, 5_000, 60_000);

    // Leaving the cluster: each pod its own span, though both used port 40500 and share the
    // node's address outside.
    assert_ne!(outbound[0].peer.port(), outbound[1].peer.port());
    for (served, pod, (upload, download)) in [
        (&outbound[0], "10.90.1.2", (1_000, 2_000)),
        (&outbound[1], "10.90.1.3", (3_000, 4_000)),
    ] {
        let span = span_from(&spans, pod, 40500);
        assert_eq!(text(span, "destination.address"), "10.90.9.2");
        assert_eq!(int(span, "destination.port"), 9000);
        assert!(!has(span, "flow.dialled.address"), "{span:#?}");
        assert_eq!(text(span, "flow.translated.source.address"), "10.90.9.1");
        assert_eq!(
            int(span, "flow.translated.source.port"),
            translated_port(served)
        );
        assert_counts(span, served, upload, download);
    }
}
