//! How people read flows: the one-line form of an [`ObservedFlow`] that both the aggregator's
//! `--print-flows` and `mermin observe` print, and the names of protocols and end reasons that
//! the spans carry too.
//!
//! ```text
//! frontend/nginx-1 → backend/api-0 TCP 443 sent 10.2 MB received 9.8 kB tcp_close
//! ```
//!
//! An end is `namespace/pod` where the metadata knows its pod, else its address. Byte counts use
//! decimal units (kB = 1000 B), one decimal from 1 kB.

use crate::{
    admin::v1::{Endpoint, ObservedFlow},
    flow::v1::EndReason,
};

/// `TCP`, `UDP`, `ICMP`, `ICMPv6`, `SCTP`, else the protocol number.
pub fn protocol_name(ip_protocol: u32) -> String {
    match ip_protocol {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        other => other.to_string(),
    }
}

/// `tcp_close`, `idle_timeout`, ...: the `flow.end_reason` span attribute's values. A flow that
/// goes on (or whose reason is unknown) is `active_timeout`.
pub fn end_reason_name(reason: EndReason) -> &'static str {
    match reason {
        EndReason::ActiveTimeout | EndReason::Unspecified => "active_timeout",
        EndReason::IdleTimeout => "idle_timeout",
        EndReason::TcpClose => "tcp_close",
        EndReason::TablePressure => "table_pressure",
        EndReason::AgentShutdown => "agent_shutdown",
    }
}

/// `439 B`, `9.8 kB`, `10.2 MB`.
pub fn bytes(count: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if count < 1000 {
        return format!("{count} B");
    }
    let mut value = count as f64 / 1000.0;
    let mut unit = 0;
    // Round first, so that 999_950 B reads 1.0 MB rather than 1000.0 kB.
    while (value * 10.0).round() / 10.0 >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// One line per flow (see the module docs); names bold and the end reason dim with `colour`.
pub fn flow_line(flow: &ObservedFlow, colour: bool) -> String {
    let (bold, dim, reset) = if colour {
        ("\x1b[1m", "\x1b[2m", "\x1b[0m")
    } else {
        ("", "", "")
    };
    let name = |end: Option<&Endpoint>| end.map(endpoint_name).unwrap_or_else(|| "?".into());
    let protocol = protocol_name(flow.ip_protocol);
    let port = match (flow.ip_protocol, &flow.server) {
        // ICMP has no ports.
        (1 | 58, _) | (_, None) => String::new(),
        (_, Some(server)) => format!(" {}", server.port),
    };
    format!(
        "{bold}{client}{reset} → {bold}{server}{reset} {protocol}{port} sent {sent} received {received} {dim}{reason}{reset}",
        client = name(flow.client.as_ref()),
        server = name(flow.server.as_ref()),
        sent = bytes(flow.sent_bytes),
        received = bytes(flow.received_bytes),
        reason = end_reason_name(flow.end_reason()),
    )
}

/// `namespace/pod`, else the address.
fn endpoint_name(end: &Endpoint) -> String {
    if !end.namespace.is_empty() && !end.pod.is_empty() {
        return format!("{}/{}", end.namespace, end.pod);
    }
    match crate::json::address(&end.address) {
        Some(address) => address.to_string(),
        None => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(address: [u8; 4], port: u32, namespace: &str, pod: &str) -> Endpoint {
        Endpoint {
            address: address.to_vec(),
            port,
            namespace: namespace.into(),
            pod: pod.into(),
            ..Endpoint::default()
        }
    }

    #[test]
    fn the_demo_line() {
        let flow = ObservedFlow {
            client: Some(end([10, 0, 0, 1], 40_000, "frontend", "nginx-1")),
            server: Some(end([10, 0, 0, 2], 443, "backend", "api-0")),
            ip_protocol: 6,
            sent_bytes: 10_200_000,
            received_bytes: 9_800,
            end_reason: EndReason::TcpClose as i32,
            ..ObservedFlow::default()
        };
        assert_eq!(
            flow_line(&flow, false),
            "frontend/nginx-1 → backend/api-0 TCP 443 sent 10.2 MB received 9.8 kB tcp_close"
        );
        assert_eq!(
            flow_line(&flow, true),
            "\x1b[1mfrontend/nginx-1\x1b[0m → \x1b[1mbackend/api-0\x1b[0m TCP 443 sent 10.2 MB received 9.8 kB \x1b[2mtcp_close\x1b[0m"
        );
    }

    #[test]
    fn unknown_ends_are_addresses_and_icmp_has_no_port() {
        let flow = ObservedFlow {
            client: Some(end([10, 0, 0, 1], 0, "", "")),
            server: Some(end([10, 0, 0, 2], 0, "backend", "")),
            ip_protocol: 1,
            sent_bytes: 252,
            received_bytes: 999_950,
            end_reason: EndReason::IdleTimeout as i32,
            ..ObservedFlow::default()
        };
        assert_eq!(
            flow_line(&flow, false),
            "10.0.0.1 → 10.0.0.2 ICMP sent 252 B received 1.0 MB idle_timeout"
        );
    }

    #[test]
    fn byte_units() {
        let shown: Vec<String> = [0, 999, 1_000, 9_849, 999_949, 1_000_000, 3_500_000_000]
            .into_iter()
            .map(bytes)
            .collect();
        assert_eq!(
            shown,
            [
                "0 B", "999 B", "1.0 kB", "9.8 kB", "999.9 kB", "1.0 MB", "3.5 GB"
            ]
        );
    }
}
