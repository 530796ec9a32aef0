//! The agent's conntrack reader on the real kernel: more NEW events than its socket can queue
//! (conntrack drops the rest), and a translated connection among the lost ones — the loss is
//! counted and a new dump still finds the translation.

mod support;

use std::{net::UdpSocket, path::PathBuf, sync::Arc, time::Duration};

use mermin_node_agent::{clock::WallClock, metrics::Metrics, translations::Translations};
use node_common::FlowKey;
use support::Netns;

/// Events the socket's buffer (16 MiB, doubled by the kernel) cannot hold: each takes about a
/// kilobyte of it.
const FLOOD: u16 = 60_000;

#[test]
fn lost_conntrack_events_are_counted_and_the_dump_finds_the_translation() {
    let ns = Netns::new();
    ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "lo"]);
    // A Service-like DNAT of locally sent datagrams: 10.99.0.53:53 → 127.0.0.1:5353.
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "10.99.0.53/32",
        "-p",
        "udp",
        "--dport",
        "53",
        "-j",
        "DNAT",
        "--to-destination",
        "127.0.0.1:5353",
    ]);
    let metrics = Arc::new(Metrics::new());
    let path = PathBuf::from(format!("/run/netns/{}", ns.name));
    let mut translations = Translations::open(
        Some(&path),
        Duration::from_secs(300),
        metrics.clone(),
        WallClock::kernel_now(),
    )
    .unwrap();
    ns.spawn(|| {
        // A new conntrack entry (and NEW event) per destination port, then the translated one.
        let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
        for port in 1..=FLOOD {
            flood.send_to(&[0], ("127.0.0.1", port)).unwrap();
        }
        let client = UdpSocket::bind("127.0.0.1:40053").unwrap();
        client.send_to(&[1; 32], "10.99.0.53:53").unwrap();
    })
    .join()
    .unwrap();

    translations.update(WallClock::kernel_now());
    assert_eq!(
        metrics.conntrack_resyncs.get(),
        1,
        "the lost events are counted"
    );
    let mut key = FlowKey {
        ip_version: 4,
        protocol: 17,
        src_port: 40053,
        dst_port: 53,
        ..FlowKey::default()
    };
    key.src_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    key.dst_addr[..4].copy_from_slice(&[10, 99, 0, 53]);
    let translation = translations
        .lookup(&key, WallClock::kernel_now())
        .expect("the dump found the translation whose event was lost");
    let server = translation.server.unwrap();
    assert_eq!((server.address, server.port), (vec![127, 0, 0, 1], 5353));
    let dialled = translation.dialled.unwrap();
    assert_eq!((dialled.address, dialled.port), (vec![10, 99, 0, 53], 53));
}
