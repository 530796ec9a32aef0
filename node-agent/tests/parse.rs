//! The kernel parser on synthetic frames, run through BPF_PROG_TEST_RUN: header shapes that the
//! namespace tests cannot easily produce (VLAN tags, IPv4 options and fragments, IPv6 extension
//! headers, other protocols, padding, non-IP and malformed frames). Needs root.

mod support;

use mermin_node_agent::capture::{self, Hook};
use node_common::{Counter, FlowKey, FlowStats, direction};
use support::frames::*;

/// Runs `frame` once through the program of `hook`; returns the flow table and kernel counters.
fn observe(
    hook: Hook,
    frame: &[u8],
) -> (Vec<(FlowKey, FlowStats)>, [u64; Counter::COUNT as usize]) {
    let mut capture = capture::load(64).expect("load (needs root)");
    capture.programs.test_run(hook, frame, 1).unwrap();
    let mut flows = Vec::new();
    capture.tables.swap_and_drain(&mut flows).unwrap();
    (flows, capture.counters.read().unwrap())
}

fn only_flow(hook: Hook, frame: &[u8]) -> (FlowKey, FlowStats) {
    let (flows, counters) = observe(hook, frame);
    assert_eq!(
        counters,
        [0; Counter::COUNT as usize],
        "no counter expected"
    );
    assert_eq!(flows.len(), 1, "{flows:?}");
    flows[0]
}

fn addr4(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&a);
    out
}

#[test]
fn ipv4_tcp_with_options() {
    let l4 = tcp(40000, 443, 0x02, 0);
    let frame = ethernet(
        &[],
        ETH_P_IP,
        &ipv4(6, V4_A, V4_B, &[1, 1, 1, 1, 1, 1, 1, 0], 0, &l4),
    );
    let (key, stats) = only_flow(Hook::Egress, &frame);
    assert_eq!(key.src_addr, addr4(V4_A));
    assert_eq!(key.dst_addr, addr4(V4_B));
    assert_eq!((key.src_port, key.dst_port), (40000, 443));
    assert_eq!(
        (key.ip_version, key.protocol, key.direction),
        (4, 6, direction::EGRESS)
    );
    assert_eq!((stats.packets, stats.bytes), (1, 28 + 20));
    assert_eq!((stats.tcp_flags, stats.first_tcp_flags), (0x02, 0x02));
}

#[test]
fn vlan_and_qinq_tags_are_skipped() {
    let ip = ipv4(17, V4_A, V4_B, &[], 0, &udp(53, 5353, 10));
    for vlans in [
        vec![(ETH_P_8021Q, 100)],
        vec![(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)],
    ] {
        let (key, stats) = only_flow(Hook::Ingress, &ethernet(&vlans, ETH_P_IP, &ip));
        assert_eq!((key.src_port, key.dst_port, key.protocol), (53, 5353, 17));
        assert_eq!(key.direction, direction::INGRESS);
        assert_eq!(stats.bytes, 20 + 8 + 10);
    }
}

#[test]
fn short_datagrams_are_flows_not_malformed() {
    let empty_udp = ethernet(&[], ETH_P_IP, &ipv4(17, V4_A, V4_B, &[], 0, &udp(5, 6, 0)));
    let (key, stats) = only_flow(Hook::Egress, &empty_udp);
    assert_eq!((key.src_port, key.dst_port, stats.bytes), (5, 6, 28));
}

/// The program loads headers from the packet a 64-bit word at a time; a header whose last word
/// would run past the frame is copied by `bpf_skb_load_bytes` instead, byte-exact.
#[test]
fn headers_in_the_last_bytes_of_a_frame_are_read_exactly() {
    // A TCP header cut after its flags byte (the 14 bytes the parser reads), and an ICMP header
    // of its type and code only: the frame ends inside the word that holds them.
    let cut_tcp = &tcp(40000, 443, 0x11, 0)[..14];
    let (key, stats) = only_flow(
        Hook::Egress,
        &ethernet(&[], ETH_P_IP, &ipv4(6, V4_A, V4_B, &[], 0, cut_tcp)),
    );
    assert_eq!((key.src_port, key.dst_port, key.protocol), (40000, 443, 6));
    assert_eq!((stats.packets, stats.bytes, stats.tcp_flags), (1, 34, 0x11));
    let cut_icmp = &icmp(8, 0, 0)[..2];
    let (key, stats) = only_flow(
        Hook::Ingress,
        &ethernet(&[], ETH_P_IP, &ipv4(1, V4_A, V4_B, &[], 0, cut_icmp)),
    );
    assert_eq!((key.icmp_type, key.icmp_code, key.protocol), (8, 0, 1));
    assert_eq!((key.src_addr, key.dst_addr), (addr4(V4_A), addr4(V4_B)));
    assert_eq!((stats.packets, stats.bytes), (1, 22));
}

#[test]
fn ethernet_padding_is_not_counted() {
    let mut frame = ethernet(&[], ETH_P_IP, &ipv4(17, V4_A, V4_B, &[], 0, &udp(1, 2, 0)));
    frame.resize(60, 0); // minimum Ethernet frame
    let (_, stats) = only_flow(Hook::Egress, &frame);
    assert_eq!(stats.bytes, 28);
}

#[test]
fn ipv4_fragments_after_the_first_have_no_ports() {
    let first = ipv4(17, V4_A, V4_B, &[], 0x2000, &udp(7, 9, 100)); // MF, offset 0
    let (key, _) = only_flow(Hook::Egress, &ethernet(&[], ETH_P_IP, &first));
    assert_eq!((key.src_port, key.dst_port), (7, 9));
    let later = ipv4(17, V4_A, V4_B, &[], 0x000e, &[0u8; 100]); // offset 14 * 8
    let (key, stats) = only_flow(Hook::Egress, &ethernet(&[], ETH_P_IP, &later));
    assert_eq!((key.src_port, key.dst_port, key.protocol), (0, 0, 17));
    assert_eq!(stats.bytes, 120);
}

#[test]
fn ipv6_extension_headers_are_skipped() {
    // Hop-by-hop (8 bytes) -> destination options (16 bytes) -> TCP.
    let mut ext = vec![60, 0, 0, 0, 0, 0, 0, 0];
    ext.extend_from_slice(&[6, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let l4 = tcp(5000, 80, 0x12, 100);
    let frame = ethernet(&[], ETH_P_IPV6, &ipv6(0, V6_A, V6_B, &ext, &l4));
    let (key, stats) = only_flow(Hook::Ingress, &frame);
    assert_eq!((key.src_addr, key.dst_addr), (V6_A, V6_B));
    assert_eq!((key.ip_version, key.protocol), (6, 6));
    assert_eq!((key.src_port, key.dst_port), (5000, 80));
    assert_eq!(stats.bytes, 40 + 24 + 120);
    assert_eq!(stats.tcp_flags, 0x12);
}

#[test]
fn ipv6_fragments() {
    // Fragment header: next = UDP, offset 0 with M flag (first) / offset 100 (later).
    let first = ipv6(
        44,
        V6_A,
        V6_B,
        &[17, 0, 0, 1, 0, 0, 0, 9],
        &udp(1000, 2000, 50),
    );
    let (key, _) = only_flow(Hook::Egress, &ethernet(&[], ETH_P_IPV6, &first));
    assert_eq!((key.protocol, key.src_port, key.dst_port), (17, 1000, 2000));
    let later = ipv6(44, V6_A, V6_B, &[17, 0, 0x03, 0x20, 0, 0, 0, 9], &[0u8; 50]);
    let (key, stats) = only_flow(Hook::Egress, &ethernet(&[], ETH_P_IPV6, &later));
    assert_eq!((key.protocol, key.src_port, key.dst_port), (17, 0, 0));
    assert_eq!(stats.bytes, 40 + 8 + 50);
}

#[test]
fn icmp_and_icmpv6_carry_type_and_code() {
    let v4 = ethernet(&[], ETH_P_IP, &ipv4(1, V4_A, V4_B, &[], 0, &icmp(3, 3, 28)));
    let (key, stats) = only_flow(Hook::Ingress, &v4);
    assert_eq!((key.protocol, key.icmp_type, key.icmp_code), (1, 3, 3));
    assert_eq!((key.src_port, key.dst_port), (0, 0));
    assert_eq!(stats.bytes, 20 + 8 + 28);
    let v6 = ethernet(
        &[],
        ETH_P_IPV6,
        &ipv6(58, V6_A, V6_B, &[], &icmp(128, 0, 56)),
    );
    let (key, _) = only_flow(Hook::Egress, &v6);
    assert_eq!((key.protocol, key.icmp_type, key.icmp_code), (58, 128, 0));
}

#[test]
fn other_protocols_are_flows_by_address_and_protocol() {
    let gre = ethernet(&[], ETH_P_IP, &ipv4(47, V4_A, V4_B, &[], 0, &[0u8; 40]));
    let (key, stats) = only_flow(Hook::Egress, &gre);
    assert_eq!((key.protocol, key.src_port, key.dst_port), (47, 0, 0));
    assert_eq!(stats.bytes, 60);
}

#[test]
fn non_ip_and_malformed_frames_are_counted_not_flows() {
    let (flows, counters) = observe(Hook::Ingress, &ethernet(&[], ETH_P_ARP, &[0u8; 28]));
    assert!(flows.is_empty());
    assert_eq!(counters[Counter::NonIp as usize], 1);
    let mut bad = ipv4(6, V4_A, V4_B, &[], 0, &tcp(1, 2, 0, 0));
    bad[0] = 0x43; // header length 12 bytes: impossible
    let (flows, counters) = observe(Hook::Ingress, &ethernet(&[], ETH_P_IP, &bad));
    assert!(flows.is_empty());
    assert_eq!(counters[Counter::Malformed as usize], 1);
    let mut wrong_version = ipv6(17, V6_A, V6_B, &[], &udp(1, 2, 0));
    wrong_version[0] = 0x40;
    let (flows, counters) = observe(Hook::Ingress, &ethernet(&[], ETH_P_IPV6, &wrong_version));
    assert!(flows.is_empty());
    assert_eq!(counters[Counter::Malformed as usize], 1);
}

#[test]
fn repeated_packets_accumulate_in_one_entry() {
    let mut capture = capture::load(64).unwrap();
    let frame = ethernet(&[], ETH_P_IP, &ipv4(17, V4_A, V4_B, &[], 0, &udp(9, 9, 72)));
    capture
        .programs
        .test_run(Hook::Egress, &frame, 1000)
        .unwrap();
    let mut flows = Vec::new();
    capture.tables.swap_and_drain(&mut flows).unwrap();
    assert_eq!(flows.len(), 1);
    assert_eq!((flows[0].1.packets, flows[0].1.bytes), (1000, 100 * 1000));
    // The retired table is empty after the drain; the new active one has seen nothing.
    flows.clear();
    assert_eq!(capture.tables.swap_and_drain(&mut flows).unwrap(), 0);
}

#[test]
fn a_full_table_overflows_to_the_ring_without_losing_a_packet() {
    let mut capture = capture::load(4).unwrap();
    for port in 0..10u16 {
        let frame = ethernet(
            &[],
            ETH_P_IP,
            &ipv4(17, V4_A, V4_B, &[], 0, &udp(port, 9, 0)),
        );
        capture.programs.test_run(Hook::Egress, &frame, 3).unwrap();
    }
    let mut flows = Vec::new();
    capture.tables.swap_and_drain(&mut flows).unwrap();
    assert_eq!(flows.len(), 4);
    assert_eq!(flows.iter().map(|(_, s)| s.packets).sum::<u64>(), 12);
    let mut ring_packets = 0;
    while let Some(item) = capture.overflow.next() {
        let event = capture::decode_packet_event(&item).unwrap();
        assert_eq!(event.bytes, 28);
        ring_packets += event.packets;
    }
    assert_eq!(ring_packets, 18);
    let counters = capture.counters.read().unwrap();
    assert_eq!(counters[Counter::OverflowEvents as usize], 18);
    assert_eq!(counters[Counter::OverflowLost as usize], 0);
}

#[test]
fn an_ack_after_a_fin_in_the_same_direction_marks_the_close_acknowledged() {
    const FIN_ACK: u8 = 0x11;
    const ACK: u8 = 0x10;
    let frame = |flags| {
        ethernet(
            &[],
            ETH_P_IP,
            &ipv4(6, V4_A, V4_B, &[], 0, &tcp(40000, 80, flags, 0)),
        )
    };
    let flags_after = |sequence: &[u8]| {
        let mut capture = capture::load(64).unwrap();
        for flags in sequence {
            capture
                .programs
                .test_run(Hook::Egress, &frame(*flags), 1)
                .unwrap();
        }
        let mut flows = Vec::new();
        capture.tables.swap_and_drain(&mut flows).unwrap();
        assert_eq!(flows.len(), 1, "{flows:?}");
        flows[0].1.tcp_flags as u32
    };
    let acked = node_common::tcp_flags::ACK_AFTER_FIN;
    // The first closer's final ACK, after its FIN.
    assert_eq!(flags_after(&[FIN_ACK, ACK]), 0x11 | acked);
    // An ACK before the FIN, or a retransmitted FIN, acknowledges nothing after it.
    assert_eq!(flags_after(&[ACK, FIN_ACK]), 0x11);
    assert_eq!(flags_after(&[FIN_ACK, FIN_ACK]), 0x11);
}
