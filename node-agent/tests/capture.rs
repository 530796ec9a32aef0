//! Capture tests against the real kernel: each test builds its own namespaces and veth pairs,
//! runs the agent binary attached inside one of them, generates traffic, and compares the records
//! with ground truth — the interfaces' own counters, or byte counts computed from first
//! principles. Needs root (CI runs as root).

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use support::*;

/// Two namespaces joined by a veth pair: `client` 10.77.0.1 (iface `c0`) ↔ `server` 10.77.0.2
/// (iface `s0`), static neighbours, IPv6 off.
struct Pair {
    client: Netns,
    server: Netns,
}

impl Pair {
    fn new(options: LinkOptions) -> Pair {
        let client = Netns::new();
        let server = Netns::new();
        {
            let (c, s) = link(&client, "c0", &server, "s0", options);
            c.addr("10.77.0.1/24");
            s.addr("10.77.0.2/24");
            c.neighbour("10.77.0.2", &s.mac);
            s.neighbour("10.77.0.1", &c.mac);
            if options.ipv6 {
                c.addr("fd77::1/64");
                s.addr("fd77::2/64");
                c.neighbour("fd77::2", &s.mac);
                s.neighbour("fd77::1", &c.mac);
            }
            c.up();
            s.up();
        }
        Pair { client, server }
    }
}

fn flow<'a>(records: &'a [Record], direction: &str, src: &str, dst: &str) -> Vec<&'a Record> {
    records
        .iter()
        .filter(|r| {
            r.is("c0", direction) && r.source_address == src && r.destination_address == dst
        })
        .collect()
}

const SYN: u32 = 0x02;
const FIN: u32 = 0x01;
const ACK: u32 = 0x10;

#[test]
fn tcp_transfer_matches_interface_counters_exactly() {
    let pair = Pair::new(LinkOptions::default());
    let agent = Agent::start(&pair.client, "c0", &["--tcp-close-timeout", "1s"]);
    let before = pair.client.counters("c0");

    let server: SocketAddr = "10.77.0.2:5001".parse().unwrap();
    let upload = 1_000_000;
    let download = 20_000;
    let exchange = tcp_exchange(&pair.client, &pair.server, server, upload, download);

    let records = agent.wait_for(Duration::from_secs(5), |r| {
        r.iter()
            .filter(|r| r.end_reason == "END_REASON_TCP_CLOSE")
            .count()
            >= 2
    });
    let delta = pair.client.counters("c0").since(&before);
    let (status, records) = {
        drop(records);
        agent.stop()
    };
    assert!(status.success(), "agent exit: {status}");

    assert_matches_interface(&records, "c0", &delta);

    let out = flow(&records, "DIRECTION_EGRESS", "10.77.0.1", "10.77.0.2");
    assert_eq!(out.len(), 1, "{out:#?}");
    let out = out[0];
    assert_eq!(out.source_port, u32::from(exchange.client.port()));
    assert_eq!(out.destination_port, 5001);
    assert_eq!(out.ip_protocol, 6);
    assert_eq!(out.first_tcp_flags, SYN);
    assert_eq!(out.tcp_flags & (SYN | FIN | ACK), SYN | FIN | ACK);
    assert_eq!(out.end_reason, "END_REASON_TCP_CLOSE");
    assert_eq!(out.node_name, "test-node");
    assert_eq!(out.interface_index, pair.client.ifindex("c0"));
    assert_tcp_side(out, &exchange.client_side, upload, 20);
    let back = flow(&records, "DIRECTION_INGRESS", "10.77.0.2", "10.77.0.1");
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].first_tcp_flags, SYN | ACK);
    assert_tcp_side(back[0], &exchange.server_side, download, 20);
}

#[test]
fn gso_super_packets_count_as_their_segments() {
    let pair = Pair::new(LinkOptions {
        no_gso: false,
        ..LinkOptions::default()
    });
    let agent = Agent::start(&pair.client, "c0", &[]);
    let before = pair.client.counters("c0");
    let upload = 4_000_000;
    let exchange = tcp_exchange(
        &pair.client,
        &pair.server,
        "10.77.0.2:5002".parse().unwrap(),
        upload,
        0,
    );
    let delta = pair.client.counters("c0").since(&before);
    let (_, records) = agent.stop();
    let out = flow(&records, "DIRECTION_EGRESS", "10.77.0.1", "10.77.0.2");
    assert_eq!(out.len(), 1);
    let out = out[0];
    // The stack sent fewer, larger skbs than wire segments...
    assert!(
        delta.tx_packets < out.delta_packets,
        "expected GSO: {} skbs for {} segments",
        delta.tx_packets,
        out.delta_packets
    );
    // ...and the record counts the wire: every segment, each with its own headers.
    assert_tcp_side(out, &exchange.client_side, upload, 20);
}

#[test]
fn udp_request_response_exact_and_flushed_on_sigterm() {
    let pair = Pair::new(LinkOptions::default());
    let agent = Agent::start(&pair.client, "c0", &[]);
    let before = pair.client.counters("c0");
    let server = pair.server.spawn(|| {
        let socket = UdpSocket::bind("10.77.0.2:5353").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..5 {
            let (n, from) = socket.recv_from(&mut buf).unwrap();
            assert_eq!(n, 100);
            socket.send_to(&[9u8; 200], from).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    pair.client
        .spawn(|| {
            let socket = UdpSocket::bind("10.77.0.1:40000").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 2048];
            for _ in 0..5 {
                socket.send_to(&[1u8; 100], "10.77.0.2:5353").unwrap();
                assert_eq!(socket.recv(&mut buf).unwrap(), 200);
            }
        })
        .join()
        .unwrap();
    server.join().unwrap();
    let delta = pair.client.counters("c0").since(&before);
    // The UDP idle timeout (60 s) has not passed: only SIGTERM's flush reports these flows.
    let (status, records) = agent.stop();
    assert!(status.success());
    assert_matches_interface(&records, "c0", &delta);

    let out = flow(&records, "DIRECTION_EGRESS", "10.77.0.1", "10.77.0.2");
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].delta_packets, out[0].delta_octets),
        (5, 5 * (20 + 8 + 100))
    );
    assert_eq!((out[0].source_port, out[0].destination_port), (40000, 5353));
    assert_eq!(out[0].ip_protocol, 17);
    assert_eq!(out[0].end_reason, "END_REASON_AGENT_SHUTDOWN");
    let back = flow(&records, "DIRECTION_INGRESS", "10.77.0.2", "10.77.0.1");
    assert_eq!(back.len(), 1);
    assert_eq!(
        (back[0].delta_packets, back[0].delta_octets),
        (5, 5 * (20 + 8 + 200))
    );
    assert_eq!(
        (back[0].source_port, back[0].destination_port),
        (5353, 40000)
    );
}

#[test]
fn icmp_echo_and_arp_are_accounted() {
    // No static neighbours here: the ARP exchange must show up as skipped non-IP frames.
    let client = Netns::new();
    let server = Netns::new();
    {
        let (c, s) = link(&client, "c0", &server, "s0", LinkOptions::default());
        c.addr("10.77.0.1/24");
        s.addr("10.77.0.2/24");
        c.up();
        s.up();
    }
    let agent = Agent::start(&client, "c0", &["--icmp-idle-timeout", "1s"]);
    client.exec(&["ping", "-n", "-c", "4", "-i", "0.2", "-W", "2", "10.77.0.2"]);
    let records = agent.wait_for(Duration::from_secs(5), |r| {
        r.iter().filter(|r| r.ip_protocol == 1).count() >= 2
    });
    assert_eq!(
        agent.metric("mermin_agent_kernel_skipped_packets_total{reason=\"non_ip\"}"),
        Some(2),
        "one ARP request out, one reply in"
    );
    let (_, _) = agent.stop();
    let request = flow(&records, "DIRECTION_EGRESS", "10.77.0.1", "10.77.0.2");
    assert_eq!(request.len(), 1);
    let r = request[0];
    assert_eq!((r.icmp_type, r.icmp_code), (8, 0));
    assert_eq!((r.delta_packets, r.delta_octets), (4, 4 * 84));
    assert_eq!(r.end_reason, "END_REASON_IDLE_TIMEOUT");
    let reply = flow(&records, "DIRECTION_INGRESS", "10.77.0.2", "10.77.0.1");
    assert_eq!(reply.len(), 1);
    assert_eq!((reply[0].icmp_type, reply[0].delta_packets), (0, 4));
    assert_eq!(reply[0].delta_octets, 4 * 84);
}

#[test]
fn ipv6_tcp_matches_interface_counters_exactly() {
    let pair = Pair::new(LinkOptions {
        ipv6: true,
        ..LinkOptions::default()
    });
    // Let the MLD reports that follow address configuration pass before counting starts.
    std::thread::sleep(Duration::from_secs(3));
    let agent = Agent::start(&pair.client, "c0", &["--tcp-close-timeout", "1s"]);
    let before = pair.client.counters("c0");
    let upload = 300_000;
    let exchange = tcp_exchange(
        &pair.client,
        &pair.server,
        "[fd77::2]:6001".parse().unwrap(),
        upload,
        1000,
    );
    agent.wait_for(Duration::from_secs(5), |r| {
        r.iter()
            .filter(|r| r.end_reason == "END_REASON_TCP_CLOSE")
            .count()
            >= 2
    });
    let delta = pair.client.counters("c0").since(&before);
    let (_, records) = agent.stop();
    assert_matches_interface(&records, "c0", &delta);
    let out = flow(&records, "DIRECTION_EGRESS", "fd77::1", "fd77::2");
    assert_eq!(out.len(), 1, "{records:#?}");
    assert_eq!(out[0].destination_port, 6001);
    assert_eq!(out[0].end_reason, "END_REASON_TCP_CLOSE");
    assert_tcp_side(out[0], &exchange.client_side, upload, 40);
}

#[test]
fn long_flow_gets_interim_records_that_sum_to_the_total() {
    let pair = Pair::new(LinkOptions::default());
    let agent = Agent::start(
        &pair.client,
        "c0",
        &["--active-timeout", "1s", "--udp-idle-timeout", "1s"],
    );
    let sent = pair
        .client
        .spawn(|| {
            let socket = UdpSocket::bind("10.77.0.1:41000").unwrap();
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < Duration::from_millis(3500) && sent < 1000 {
                socket.send_to(&[5u8; 300], "10.77.0.2:9").unwrap();
                sent += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            sent
        })
        .join()
        .unwrap();
    let records = agent.wait_for(Duration::from_secs(5), |r| {
        r.iter()
            .any(|r| r.end_reason == "END_REASON_IDLE_TIMEOUT" && r.source_port == 41000)
    });
    agent.stop();
    let flow = flow(&records, "DIRECTION_EGRESS", "10.77.0.1", "10.77.0.2");
    assert!(flow.len() >= 3, "expected interim records: {flow:#?}");
    let (packets, bytes) = totals(flow.iter().copied());
    assert_eq!(packets, sent);
    assert_eq!(bytes, sent * (20 + 8 + 300));
    let start = flow[0].flow_start_unix_nanos;
    for (i, r) in flow.iter().enumerate() {
        assert_eq!(r.record_sequence, i as u64);
        assert_eq!(r.flow_start_unix_nanos, start);
        let expected = if i + 1 == flow.len() {
            "END_REASON_IDLE_TIMEOUT"
        } else {
            "END_REASON_ACTIVE_TIMEOUT"
        };
        assert_eq!(r.end_reason, expected);
    }
}

/// Waits (bounded) for the TCP connection between 10.77.0.1 and 10.77.0.2 at `c0` to be
/// reported closed in both directions, each by one TCP_CLOSE record; all records so far.
fn closed_both_ways(agent: &Agent) -> Vec<Record> {
    let records = agent.wait_for(Duration::from_secs(10), |r| {
        r.iter()
            .filter(|r| r.end_reason == "END_REASON_TCP_CLOSE")
            .count()
            >= 2
    });
    let out = flow(&records, "DIRECTION_EGRESS", "10.77.0.1", "10.77.0.2");
    let back = flow(&records, "DIRECTION_INGRESS", "10.77.0.2", "10.77.0.1");
    assert_eq!((out.len(), back.len()), (1, 1), "{records:#?}");
    assert_eq!(out[0].end_reason, "END_REASON_TCP_CLOSE");
    assert_eq!(back[0].end_reason, "END_REASON_TCP_CLOSE");
    records
}

#[test]
fn a_completed_fin_exchange_is_reported_at_the_next_scan_not_after_the_close_timeout() {
    let pair = Pair::new(LinkOptions::default());
    // A close timeout far beyond the wait below: only the fast close can report the flow.
    let agent = Agent::start(&pair.client, "c0", &["--tcp-close-timeout", "300s"]);
    let exchange = tcp_exchange(
        &pair.client,
        &pair.server,
        "10.77.0.2:5003".parse().unwrap(),
        10_000,
        10_000,
    );
    let records = closed_both_ways(&agent);
    let out = flow(&records, "DIRECTION_EGRESS", "10.77.0.1", "10.77.0.2");
    let back = flow(&records, "DIRECTION_INGRESS", "10.77.0.2", "10.77.0.1");
    assert_tcp_side(out[0], &exchange.client_side, 10_000, 20);
    assert_tcp_side(back[0], &exchange.server_side, 10_000, 20);
}

#[test]
fn a_reset_connection_is_reported_at_the_next_scan_with_every_packet() {
    let pair = Pair::new(LinkOptions::default());
    let agent = Agent::start(&pair.client, "c0", &["--tcp-close-timeout", "300s"]);
    let before = pair.client.counters("c0");
    let server: SocketAddr = "10.77.0.2:5005".parse().unwrap();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let served = pair.server.spawn(move || {
        let listener = TcpListener::bind(server).unwrap();
        bound_tx.send(()).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut received = vec![0u8; 5_000];
        conn.read_exact(&mut received).unwrap();
        conn.write_all(&[1]).unwrap();
        // The client resets the connection.
        let error = conn.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    });
    bound_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    pair.client
        .spawn(move || {
            let mut conn = TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            conn.write_all(&[7u8; 5_000]).unwrap();
            conn.read_exact(&mut [0u8]).unwrap();
            // Closing with a zero linger sends a RST instead of a FIN.
            socket2::SockRef::from(&conn)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        })
        .join()
        .unwrap();
    served.join().unwrap();
    // A close timeout far beyond the wait: only the fast close can report the flow.
    let records = closed_both_ways(&agent);
    let out = flow(&records, "DIRECTION_EGRESS", "10.77.0.1", "10.77.0.2");
    assert_ne!(out[0].tcp_flags & 0x04, 0, "the client's RST");
    assert_matches_interface(&records, "c0", &pair.client.counters("c0").since(&before));
}

/// Sums the records of one direction at `c0` by the flow they belong to (`flow_start`), in
/// the order the flows started.
fn connections(records: &[Record], direction: &str, src: &str, dst: &str) -> Vec<Record> {
    let mut flows: Vec<Record> = Vec::new();
    for r in flow(records, direction, src, dst) {
        match flows
            .iter_mut()
            .find(|f| f.flow_start_unix_nanos == r.flow_start_unix_nanos)
        {
            Some(f) => {
                f.delta_packets += r.delta_packets;
                f.delta_octets += r.delta_octets;
            }
            None => flows.push(r.clone()),
        }
    }
    flows.sort_by_key(|f| f.flow_start_unix_nanos);
    flows
}

#[test]
fn connections_reusing_one_tuple_are_flows_of_their_own_with_exact_counts() {
    let pair = Pair::new(LinkOptions::default());
    let agent = Agent::start(&pair.client, "c0", &["--tcp-close-timeout", "300s"]);
    let sizes = [
        (1_000, 50_000),
        (200_000, 3_000),
        (10, 10),
        (64_000, 64_000),
    ];
    let client: SocketAddr = "10.77.0.1:41000".parse().unwrap();
    let server: SocketAddr = "10.77.0.2:5004".parse().unwrap();
    let exchanges = tcp_reused_tuple(&pair.client, &pair.server, client, server, &sizes);
    let records = agent.wait_for(Duration::from_secs(10), |r| {
        r.iter()
            .filter(|r| r.end_reason == "END_REASON_TCP_CLOSE")
            .count()
            >= 2 * sizes.len()
    });
    assert_eq!(
        agent.metric("mermin_agent_kernel_connections_merged_total"),
        Some(0)
    );
    let (status, records) = {
        drop(records);
        agent.stop()
    };
    assert!(status.success(), "agent exit: {status}");
    let out = connections(&records, "DIRECTION_EGRESS", "10.77.0.1", "10.77.0.2");
    let back = connections(&records, "DIRECTION_INGRESS", "10.77.0.2", "10.77.0.1");
    assert_eq!(
        (out.len(), back.len()),
        (sizes.len(), sizes.len()),
        "{records:#?}"
    );
    for (i, ((upload, download), exchange)) in sizes.iter().zip(&exchanges).enumerate() {
        assert_eq!(out[i].source_port, 41000);
        assert_eq!(out[i].first_tcp_flags, SYN, "connection {i}");
        assert_eq!(back[i].first_tcp_flags, SYN | ACK, "connection {i}");
        assert_tcp_side(&out[i], &exchange.client_side, *upload, 20);
        assert_tcp_side(&back[i], &exchange.server_side, *download, 20);
    }
}

#[test]
fn interface_created_later_is_attached_within_a_second() {
    let node = Netns::new();
    let peer = Netns::new();
    let agent = Agent::start(&node, "late*", &["--icmp-idle-timeout", "1s"]);
    assert_eq!(agent.metric("mermin_agent_attached_interfaces"), Some(0));

    let created = Instant::now();
    let (n, p) = link(&node, "late0", &peer, "p0", LinkOptions::default());
    let deadline = created + Duration::from_secs(3);
    while agent.metric("mermin_agent_attached_interfaces") != Some(1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let attach_time = created.elapsed();
    assert!(
        attach_time < Duration::from_secs(1),
        "attached after {attach_time:?}"
    );

    n.addr("10.78.0.1/24");
    p.addr("10.78.0.2/24");
    n.neighbour("10.78.0.2", &p.mac);
    p.neighbour("10.78.0.1", &n.mac);
    n.up();
    p.up();
    node.exec(&["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", "10.78.0.2"]);
    let records = agent.wait_for(Duration::from_secs(5), |r| r.len() >= 2);
    let request = records
        .iter()
        .find(|r| r.is("late0", "DIRECTION_EGRESS") && r.icmp_type == 8)
        .unwrap_or_else(|| panic!("no echo request on late0: {records:#?}"));
    assert_eq!(request.delta_packets, 2);
}

/// A tun device (no link-layer header, as WireGuard's) that matches the patterns is skipped and
/// counted; the veth next to it is attached.
#[test]
fn an_interface_without_an_ethernet_header_is_skipped() {
    let node = Netns::new();
    let peer = Netns::new();
    node.ip(&["tuntap", "add", "dev", "late-tun", "mode", "tun"]);
    let _veth = link(&node, "late0", &peer, "p0", LinkOptions::default());
    let agent = Agent::start(&node, "late*", &[]);
    assert_eq!(agent.metric("mermin_agent_attached_interfaces"), Some(1));
    assert_eq!(
        agent.metric("mermin_agent_interfaces_skipped_total"),
        Some(1)
    );
    assert_eq!(agent.metric("mermin_agent_attach_errors_total"), Some(0));
}

#[test]
fn same_node_pod_to_pod_is_seen_once_at_each_of_two_points() {
    // Node namespace routes between two pod namespaces over two veths.
    let node = Netns::new();
    let pod1 = Netns::new();
    let pod2 = Netns::new();
    node.sysctl("net.ipv4.ip_forward", "1");
    let (n1, p1) = link(&node, "vethp1", &pod1, "eth0", LinkOptions::default());
    let (n2, p2) = link(&node, "vethp2", &pod2, "eth0", LinkOptions::default());
    n1.addr("10.81.1.1/24");
    p1.addr("10.81.1.2/24");
    n2.addr("10.81.2.1/24");
    p2.addr("10.81.2.2/24");
    n1.neighbour("10.81.1.2", &p1.mac);
    p1.neighbour("10.81.1.1", &n1.mac);
    n2.neighbour("10.81.2.2", &p2.mac);
    p2.neighbour("10.81.2.1", &n2.mac);
    for end in [&n1, &p1, &n2, &p2] {
        end.up();
    }
    pod1.ip(&["route", "add", "default", "via", "10.81.1.1"]);
    pod2.ip(&["route", "add", "default", "via", "10.81.2.1"]);

    let agent = Agent::start(&node, "veth*", &["--tcp-close-timeout", "1s"]);
    let before1 = node.counters("vethp1");
    let before2 = node.counters("vethp2");
    let upload = 200_000;
    let exchange = tcp_exchange(
        &pod1,
        &pod2,
        "10.81.2.2:7000".parse().unwrap(),
        upload,
        5000,
    );
    agent.wait_for(Duration::from_secs(5), |r| {
        r.iter()
            .filter(|r| r.end_reason == "END_REASON_TCP_CLOSE")
            .count()
            >= 4
    });
    let d1 = node.counters("vethp1").since(&before1);
    let d2 = node.counters("vethp2").since(&before2);
    let (_, records) = agent.stop();
    assert_matches_interface(&records, "vethp1", &d1);
    assert_matches_interface(&records, "vethp2", &d2);

    let upload_flow = |interface: &str, direction: &str| -> Vec<&Record> {
        records
            .iter()
            .filter(|r| {
                r.is(interface, direction)
                    && r.source_address == "10.81.1.2"
                    && r.destination_address == "10.81.2.2"
            })
            .collect()
    };
    // Pod 1 → pod 2 enters the node on vethp1 and leaves it on vethp2: two points, once each.
    let at_p1 = upload_flow("vethp1", "DIRECTION_INGRESS");
    let at_p2 = upload_flow("vethp2", "DIRECTION_EGRESS");
    assert_eq!((at_p1.len(), at_p2.len()), (1, 1));
    assert_eq!(at_p1[0].delta_packets, at_p2[0].delta_packets);
    assert_eq!(at_p1[0].delta_octets, at_p2[0].delta_octets);
    assert_tcp_side(at_p1[0], &exchange.client_side, upload, 20);
    assert!(upload_flow("vethp1", "DIRECTION_EGRESS").is_empty());
    assert!(upload_flow("vethp2", "DIRECTION_INGRESS").is_empty());
}
