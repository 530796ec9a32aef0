//! JSON rendering of the generated messages for the agent's JSON-lines sink and the CLI's
//! `--output json|yaml`: the same fields as the protobuf, with addresses as text and enums by
//! their protobuf names.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serializer;

use crate::{
    admin::v1::Role,
    flow::v1::{Direction, EndReason},
};

/// Renders 4- or 16-byte addresses as text; any other length as its bytes in hex, so a malformed
/// value is visible rather than hidden.
pub fn ip_address<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    match address(bytes) {
        Some(ip) => s.collect_str(&ip),
        None => s.collect_str(&format_args!("invalid:{}", hex(bytes))),
    }
}

/// The address in `bytes`, if it is 4 or 16 bytes long.
pub fn address(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).into()),
        16 => Some(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).into()),
        _ => None,
    }
}

/// `bytes` as lower-case hex (boot ids, as logs and the CLI show them).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn direction<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    match Direction::try_from(*value) {
        Ok(d) => s.serialize_str(d.as_str_name()),
        Err(_) => s.serialize_i32(*value),
    }
}

pub fn end_reason<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    match EndReason::try_from(*value) {
        Ok(r) => s.serialize_str(r.as_str_name()),
        Err(_) => s.serialize_i32(*value),
    }
}

pub fn role<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    match Role::try_from(*value) {
        Ok(r) => s.serialize_str(r.as_str_name()),
        Err(_) => s.serialize_i32(*value),
    }
}

#[cfg(test)]
mod tests {
    use crate::flow::v1::{ConnectionEndpoint, Direction, EndReason, FlowRecord, Translation};

    #[test]
    fn renders_addresses_and_enum_names() {
        let record = FlowRecord {
            source_address: vec![10, 0, 0, 1],
            destination_address: "fd00::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
                .to_vec(),
            direction: Direction::Egress as i32,
            end_reason: EndReason::TcpClose as i32,
            ..FlowRecord::default()
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["source_address"], "10.0.0.1");
        assert_eq!(json["destination_address"], "fd00::2");
        assert_eq!(json["direction"], "DIRECTION_EGRESS");
        assert_eq!(json["end_reason"], "END_REASON_TCP_CLOSE");
    }

    #[test]
    fn renders_a_translation_with_its_addresses() {
        let endpoint = |address: [u8; 4], port| {
            Some(ConnectionEndpoint {
                address: address.to_vec(),
                port,
            })
        };
        let record = FlowRecord {
            translation: Some(Translation {
                client: endpoint([10, 0, 0, 1], 40000),
                dialled: endpoint([10, 96, 0, 10], 80),
                translated_client: endpoint([10, 0, 0, 1], 40000),
                server: endpoint([10, 0, 2, 5], 8080),
            }),
            ..FlowRecord::default()
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["translation"]["dialled"]["address"], "10.96.0.10");
        assert_eq!(json["translation"]["dialled"]["port"], 80);
        assert_eq!(json["translation"]["server"]["address"], "10.0.2.5");
        assert_eq!(
            serde_json::to_value(FlowRecord::default()).unwrap()["translation"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn marks_malformed_addresses() {
        let record = FlowRecord {
            source_address: vec![1, 2, 3],
            ..FlowRecord::default()
        };
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["source_address"], "invalid:010203");
        assert_eq!(json["direction"], "DIRECTION_UNSPECIFIED");
    }
}
