//! Flow records for the crate's unit tests: one direction of a TCP connection from
//! 10.0.0.1:`client_port` to 10.0.0.2:`server_port`, as node-a's eth0 reports it (SYN first,
//! 100 bytes per packet).

use mermin_protocol::flow::v1::{Direction, EndReason, FlowRecord};

pub(crate) fn tcp_record(
    client_port: u32,
    server_port: u32,
    packets: u64,
    end_reason: EndReason,
) -> FlowRecord {
    FlowRecord {
        node_name: "node-a".into(),
        interface_name: "eth0".into(),
        direction: Direction::Egress as i32,
        source_address: vec![10, 0, 0, 1],
        destination_address: vec![10, 0, 0, 2],
        source_port: client_port,
        destination_port: server_port,
        ip_protocol: 6,
        delta_packets: packets,
        delta_octets: packets * 100,
        first_seen_unix_nanos: 1_000,
        last_seen_unix_nanos: 2_000,
        first_tcp_flags: 0x02,
        tcp_flags: 0x1b,
        end_reason: end_reason as i32,
        ..FlowRecord::default()
    }
}
