//! Restarts in the middle of a connection, with the real agent and the real aggregator binary:
//! the aggregator killed with SIGKILL while the agent holds unacknowledged batches, then
//! restarted; then the agent itself restarted. The connection's spans must add up to exactly what
//! the TCP stacks sent, and no span id may arrive twice with different content.

mod support;

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use support::{
    aggregator::{AggregatorProcess, left_to_export},
    otlp::{Receiver, int, serve, text},
    *,
};

/// One node namespace and two pods on it: the client (10.91.1.2, on `vethc`) and the server
/// (10.91.1.3, on `veths`).
struct OneNode {
    node: Netns,
    client: Netns,
    server: Netns,
}

fn one_node_two_pods() -> OneNode {
    let node = Netns::new();
    let client = Netns::new();
    let server = Netns::new();
    node.sysctl("net.ipv4.ip_forward", "1");
    let pod = |host_if: &str, pod_ns: &Netns, pod_ip: &str| {
        let (h, p) = link(&node, host_if, pod_ns, "eth0", LinkOptions::default());
        h.addr("10.91.1.1/32");
        p.addr(&format!("{pod_ip}/32"));
        h.neighbour(pod_ip, &p.mac);
        p.neighbour("10.91.1.1", &h.mac);
        h.up();
        p.up();
        node.ip(&["route", "add", pod_ip, "dev", host_if]);
        pod_ns.ip(&["route", "add", "10.91.1.1", "dev", "eth0"]);
        pod_ns.ip(&["route", "add", "default", "via", "10.91.1.1"]);
    };
    pod("vethc", &client, "10.91.1.2");
    pod("veths", &server, "10.91.1.3");
    OneNode {
        node,
        client,
        server,
    }
}

/// The agent on `node`'s veths, reporting as `name` to the aggregator at `listen`, with short
/// timeouts so that connections are reported within a second or two.
fn start_agent(node: &Netns, listen: SocketAddr, name: &str) -> Agent {
    let aggregator = format!("http://{listen}");
    let args = [
        "--aggregator",
        &aggregator,
        "--node-name",
        name,
        "--tcp-close-timeout",
        "1s",
        "--active-timeout",
        "1s",
    ];
    Agent::start(node, "veth*", &args)
}

/// What the TCP stacks put on the wire for `payload` bytes on one side (IPv4 + TCP headers with
/// timestamps, the handshake's longer SYN).
fn wire(side: &TcpSide, payload: u64) -> u64 {
    payload + side.bytes_retrans + 60 + (side.segments - 1) * 52
}

/// Bytes and packets of the CLIENT spans of connections to `port`, each way:
/// (sent, packets sent, received, packets received).
fn span_totals(receiver: &Receiver, port: i64) -> (u64, u64, u64, u64) {
    let mut totals = (0, 0, 0, 0);
    for (_, span) in receiver.spans_with_service() {
        if span.kind == SpanKind::Client as i32 && int(&span, "destination.port") == port {
            totals.0 += int(&span, "flow.bytes.sent") as u64;
            totals.1 += int(&span, "flow.packets.sent") as u64;
            totals.2 += int(&span, "flow.bytes.received") as u64;
            totals.3 += int(&span, "flow.packets.received") as u64;
        }
    }
    totals
}

/// Waits (bounded: 30 s) until the spans to `port` carry `sent` bytes. (Whatever should not
/// come is caught at the end: after a graceful stop nothing may be left to export.)
fn wait_for_bytes_sent(receiver: &Receiver, port: i64, sent: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while span_totals(receiver, port).0 < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_connection_survives_an_aggregator_kill_and_an_agent_restart() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let receiver = Receiver::default();
    let otlp = serve(&receiver, &runtime);
    let data = tempfile::tempdir().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut aggregator = Some(AggregatorProcess::start(listen, otlp, data.path()));

    let OneNode {
        node,
        client,
        server,
    } = one_node_two_pods();
    let mut agent = Some(start_agent(&node, listen, "node-r"));

    const PART: usize = 150_000;
    let exchange = tcp_conversation(
        &client,
        &server,
        "10.91.1.3:9000".parse().unwrap(),
        &[PART, PART, PART],
        20_000,
        |pause| match pause {
            // Killed with records of part 1 reported and more on their way: the agent keeps
            // them until an aggregator acknowledges them.
            0 => {
                std::thread::sleep(Duration::from_millis(1500));
                aggregator.take().unwrap().kill();
            }
            // Part 2 went while no aggregator ran. Restart it, then restart the agent (it
            // reports what it holds before it exits).
            _ => {
                aggregator = Some(AggregatorProcess::start(listen, otlp, data.path()));
                let (status, _) = agent.take().unwrap().stop();
                assert!(status.success(), "agent exit: {status}");
                agent = Some(start_agent(&node, listen, "node-r"));
            }
        },
    );

    let sent = wire(&exchange.client_side, 3 * PART as u64);
    let received = wire(&exchange.server_side, 20_000 + 2);
    wait_for_bytes_sent(&receiver, 9000, sent);
    agent.take().unwrap().stop();
    aggregator.take().unwrap().stop();
    assert_eq!(
        left_to_export(data.path()),
        0,
        "spans still queued after the stop"
    );

    let spans = receiver.spans_with_service();
    let mut by_id = HashMap::new();
    let mut duplicates = 0;
    for (_, span) in &spans {
        if let Some(earlier) = by_id.insert(span.span_id.clone(), span) {
            assert_eq!(
                earlier, span,
                "span id exported twice with different content"
            );
            duplicates += 1;
        }
    }
    let clients: Vec<_> = spans
        .iter()
        .filter(|(_, s)| s.kind == SpanKind::Client as i32)
        .map(|(_, s)| s)
        .collect();
    assert!(
        clients
            .iter()
            .all(|s| text(s, "source.address") == "10.91.1.2"
                && int(s, "source.port") == i64::from(exchange.client.port())
                && text(s, "flow.client_rule") == "tcp_handshake"),
        "client and server stay right across the restarts: {clients:#?}"
    );
    assert_eq!(
        span_totals(&receiver, 9000),
        (
            sent,
            exchange.client_side.segments,
            received,
            exchange.server_side.segments
        ),
        "{} CLIENT spans ({duplicates} re-deliveries): {clients:#?}",
        clients.len()
    );
}

#[test]
fn an_aggregator_that_lost_its_data_dir_takes_the_agent_on_again() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let receiver = Receiver::default();
    let otlp = serve(&receiver, &runtime);
    let data = tempfile::tempdir().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let aggregator = AggregatorProcess::start(listen, otlp, data.path());
    let OneNode {
        node,
        client,
        server,
    } = one_node_two_pods();
    let agent = start_agent(&node, listen, "node-w");
    let before = tcp_exchange(
        &client,
        &server,
        "10.91.1.3:9000".parse().unwrap(),
        30_000,
        3_000,
    );
    wait_for_bytes_sent(&receiver, 9000, wire(&before.client_side, 30_000));

    // The replica loses its disk: killed, its data dir gone, started again empty.
    aggregator.kill();
    std::fs::remove_dir_all(data.path()).unwrap();
    std::fs::create_dir(data.path()).unwrap();
    let aggregator = AggregatorProcess::start(listen, otlp, data.path());
    let after = tcp_exchange(
        &client,
        &server,
        "10.91.1.3:9001".parse().unwrap(),
        40_000,
        4_000,
    );
    let sent = wire(&after.client_side, 40_000);
    wait_for_bytes_sent(&receiver, 9001, sent);

    let lost = agent.metric("mermin_agent_sink_batches_lost_total");
    let (status, _) = agent.stop();
    aggregator.stop();
    assert_eq!(
        left_to_export(data.path()),
        0,
        "spans still queued after the stop"
    );
    assert!(status.success(), "agent exit: {status}");
    assert!(
        lost.is_some_and(|lost| lost >= 1),
        "the batches acknowledged before the wipe are counted as lost: {lost:?}"
    );
    assert_eq!(
        span_totals(&receiver, 9001),
        (
            sent,
            after.client_side.segments,
            wire(&after.server_side, 4_000),
            after.server_side.segments
        ),
        "the connection after the wipe arrives whole: nothing the agent sent was refused"
    );
}
