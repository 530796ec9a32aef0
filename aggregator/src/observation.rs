//! One validated observation: a raw `FlowRecord` checked field by field and turned into typed
//! values. Everything malformed is rejected here, with a message that names the field, so later
//! stages never see an impossible record.
//!
//! **Translated connections.** A record whose node translated the connection (a Service's DNAT,
//! a masquerade) carries the [`Translation`]; whichever view of the connection its point saw,
//! the observation's tuple and key are the *server's* view (the client after any SNAT → the
//! endpoint that served it), the view every other node sees without knowing of the NAT. So the
//! points before and after the translation stitch into one connection, counted once.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use mermin_protocol::flow::v1::{Direction, EndReason, FlowRecord};
use mermin_protocol::wire::read::{EndpointView, FlowRecordView, TranslationView};
use serde::{Deserialize, Serialize};

use crate::connection_key::{ConnectionKey, Endpoint, Orientation, Tuple};

/// The TC hook of an observation point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Hook {
    Ingress,
    Egress,
}

/// Where on which node packets were counted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObservationPoint {
    pub node: String,
    pub interface: String,
    pub hook: Hook,
}

/// Counts of one direction at one point over some interval (sums of record deltas).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
    pub first_seen_unix_nanos: u64,
    pub last_seen_unix_nanos: u64,
    pub tcp_flags: u32,
    /// Flags of the first packet this point saw in this direction.
    pub first_tcp_flags: u32,
}

/// A record, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub key: ConnectionKey,
    /// How the observed packets run relative to `key`.
    pub orientation: Orientation,
    pub tuple: Tuple,
    /// Shared by every observation of the point that one [`PointCache`] made.
    pub point: Arc<ObservationPoint>,
    pub counts: Counts,
    pub end_reason: EndReason,
    /// The first packet of the point's flow (the agent's flow, across its records); the first
    /// packet of this record if the agent did not say.
    pub flow_start_unix_nanos: u64,
    /// The first record of the point's flow: the agent saw a new flow begin.
    pub starts_flow: bool,
    /// How the node translated the connection, if it did (then `tuple` is the server's view).
    /// Boxed: most observations have none, and the 80 bytes were copied with every one.
    pub translation: Option<Box<Translation>>,
}

/// How a node translated a connection: its endpoints as the client sent them and as the server
/// sees them (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Translation {
    /// The client as it sent (before any SNAT).
    pub client: Endpoint,
    /// The address and port the client dialled (before the DNAT).
    pub dialled: Endpoint,
    /// The client as the server sees it (after any SNAT).
    pub translated_client: Endpoint,
    /// The endpoint that served the connection.
    pub server: Endpoint,
}

impl Translation {
    /// Whether the client's address or port was translated (SNAT, masquerade).
    pub fn translates_client(&self) -> bool {
        self.client != self.translated_client
    }

    fn checked(t: &TranslationView<'_>, family_v4: bool) -> Result<Self, InvalidRecord> {
        let endpoint = |field: &'static str, e: &Option<EndpointView<'_>>| {
            let e = e.as_ref().ok_or(InvalidRecord::Empty(field))?;
            let address = address(field, e.address)?;
            if address.is_ipv4() != family_v4 {
                return Err(InvalidRecord::MixedFamilies);
            }
            Ok(Endpoint {
                address,
                port: narrow(field, e.port, 16)? as u16,
            })
        };
        Ok(Translation {
            client: endpoint("translation.client", &t.client)?,
            dialled: endpoint("translation.dialled", &t.dialled)?,
            translated_client: endpoint("translation.translated_client", &t.translated_client)?,
            server: endpoint("translation.server", &t.server)?,
        })
    }

    /// `tuple` (either view, either direction) as the server sees it.
    fn server_view(&self, tuple: &Tuple) -> Result<Tuple, InvalidRecord> {
        let source = Endpoint {
            address: tuple.source,
            port: tuple.source_port,
        };
        let destination = Endpoint {
            address: tuple.destination,
            port: tuple.destination_port,
        };
        let (source, destination) = match (source, destination) {
            (s, d) if (s, d) == (self.client, self.dialled) => {
                (self.translated_client, self.server)
            }
            (s, d) if (s, d) == (self.dialled, self.client) => {
                (self.server, self.translated_client)
            }
            (s, d)
                if (s, d) == (self.translated_client, self.server)
                    || (s, d) == (self.server, self.translated_client) =>
            {
                (s, d)
            }
            _ => return Err(InvalidRecord::NotTranslated),
        };
        Ok(Tuple {
            source: source.address,
            source_port: source.port,
            destination: destination.address,
            destination_port: destination.port,
            ..*tuple
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRecord {
    #[error("{field}: {len} bytes, expected 4 (IPv4) or 16 (IPv6)")]
    AddressLength { field: &'static str, len: usize },
    #[error("source and destination addresses are of different families")]
    MixedFamilies,
    #[error("{field}: {value} does not fit in {bits} bits")]
    OutOfRange {
        field: &'static str,
        value: u32,
        bits: u32,
    },
    #[error("direction: {0} is not INGRESS or EGRESS")]
    Direction(i32),
    #[error("end_reason: {0} is not a known reason")]
    EndReason(i32),
    #[error("{0} is empty")]
    Empty(&'static str),
    #[error("last_seen_unix_nanos ({last}) is before first_seen_unix_nanos ({first})")]
    TimeOrder { first: u64, last: u64 },
    #[error("delta_octets ({bytes}) is smaller than 20 bytes per packet ({packets} packets)")]
    TooFewBytes { packets: u64, bytes: u64 },
    #[error(
        "delta_octets ({bytes}) is more than one interface can carry in the record's {nanos} ns (1 Tbit/s, plus a second)"
    )]
    AboveLineRate { bytes: u64, nanos: u64 },
    #[error(
        "translation: the record's addresses and ports are neither the client's nor the server's view of it"
    )]
    NotTranslated,
    #[error("translation: protocol {0} has no ports to translate (only TCP, UDP and SCTP)")]
    TranslationProtocol(u8),
    #[error("{field} ({value}) is not within a day of the aggregator's clock ({now})")]
    FarFromNow {
        field: &'static str,
        value: u64,
        now: u64,
    },
}

/// The most bytes per second one observation point can count: 1 Tbit/s, beyond any interface a
/// node has today. A record above it (for its first-to-last packet span plus a second of clock
/// slack) is refused, which also keeps sums of counts far from overflowing.
pub const MAX_BYTES_PER_SECOND: u64 = 125_000_000_000;

/// How far a record's times may be from the aggregator's clock.
const MAX_CLOCK_DISTANCE_NANOS: u64 = 86_400 * 1_000_000_000;

impl TryFrom<&FlowRecord> for Observation {
    type Error = InvalidRecord;

    fn try_from(r: &FlowRecord) -> Result<Self, InvalidRecord> {
        Observation::try_from(&FlowRecordView::from(r))
    }
}

impl TryFrom<&FlowRecordView<'_>> for Observation {
    type Error = InvalidRecord;

    /// The record checked, with a point of its own (see [`Observation::read`] for a stream).
    fn try_from(r: &FlowRecordView<'_>) -> Result<Self, InvalidRecord> {
        Observation::checked(r, |hook| {
            Arc::new(ObservationPoint {
                node: r.node_name.to_owned(),
                interface: r.interface_name.to_owned(),
                hook,
            })
        })
    }
}

/// The observation points of one agent's records, each made once: a stream names the same few
/// points record after record, so its observations share them instead of copying two names
/// each.
#[derive(Debug, Default)]
pub struct PointCache {
    /// By interface name, then hook (ingress, egress).
    by_interface: HashMap<String, [Option<Arc<ObservationPoint>>; 2]>,
}

impl PointCache {
    /// Interfaces remembered at most; past this the cache starts over (an agent naming ever new
    /// interfaces costs an allocation per record, as without a cache, and no more memory).
    const MAX_INTERFACES: usize = 4096;

    /// The point `(node, interface, hook)`.
    pub fn point(&mut self, node: &str, interface: &str, hook: Hook) -> Arc<ObservationPoint> {
        let slot = match hook {
            Hook::Ingress => 0,
            Hook::Egress => 1,
        };
        if let Some(point) = self
            .by_interface
            .get(interface)
            .and_then(|hooks| hooks[slot].as_ref())
            .filter(|point| point.node == node)
        {
            return point.clone();
        }
        if self.by_interface.len() >= Self::MAX_INTERFACES
            && !self.by_interface.contains_key(interface)
        {
            self.by_interface.clear();
        }
        let point = Arc::new(ObservationPoint {
            node: node.to_owned(),
            interface: interface.to_owned(),
            hook,
        });
        self.by_interface.entry(interface.to_owned()).or_default()[slot] = Some(point.clone());
        point
    }
}

impl Observation {
    /// The record checked, its point from `points` (the records of one stream).
    pub fn read(r: &FlowRecordView<'_>, points: &mut PointCache) -> Result<Self, InvalidRecord> {
        Observation::checked(r, |hook| points.point(r.node_name, r.interface_name, hook))
    }

    /// Every check of a record; `point` makes its observation point.
    fn checked(
        r: &FlowRecordView<'_>,
        point: impl FnOnce(Hook) -> Arc<ObservationPoint>,
    ) -> Result<Self, InvalidRecord> {
        let source = address("source_address", r.source_address)?;
        let destination = address("destination_address", r.destination_address)?;
        if source.is_ipv4() != destination.is_ipv4() {
            return Err(InvalidRecord::MixedFamilies);
        }
        if r.node_name.is_empty() {
            return Err(InvalidRecord::Empty("node_name"));
        }
        if r.last_seen_unix_nanos < r.first_seen_unix_nanos {
            return Err(InvalidRecord::TimeOrder {
                first: r.first_seen_unix_nanos,
                last: r.last_seen_unix_nanos,
            });
        }
        // The smallest IP packet is a 20-byte IPv4 header.
        if r.delta_octets < r.delta_packets.saturating_mul(20) {
            return Err(InvalidRecord::TooFewBytes {
                packets: r.delta_packets,
                bytes: r.delta_octets,
            });
        }
        let nanos = r.last_seen_unix_nanos - r.first_seen_unix_nanos;
        let max_bytes =
            u128::from(MAX_BYTES_PER_SECOND) * (u128::from(nanos) + 1_000_000_000) / 1_000_000_000;
        if u128::from(r.delta_octets) > max_bytes {
            return Err(InvalidRecord::AboveLineRate {
                bytes: r.delta_octets,
                nanos,
            });
        }
        let hook = match Direction::try_from(r.direction) {
            Ok(Direction::Ingress) => Hook::Ingress,
            Ok(Direction::Egress) => Hook::Egress,
            _ => return Err(InvalidRecord::Direction(r.direction)),
        };
        let end_reason = match EndReason::try_from(r.end_reason) {
            Ok(EndReason::Unspecified) | Err(_) => {
                return Err(InvalidRecord::EndReason(r.end_reason));
            }
            Ok(reason) => reason,
        };
        let tuple = Tuple {
            protocol: narrow("ip_protocol", r.ip_protocol, 8)? as u8,
            source,
            destination,
            source_port: narrow("source_port", r.source_port, 16)? as u16,
            destination_port: narrow("destination_port", r.destination_port, 16)? as u16,
            icmp_type: narrow("icmp_type", r.icmp_type, 8)? as u8,
            icmp_code: narrow("icmp_code", r.icmp_code, 8)? as u8,
        };
        let (tuple, translation) = match &r.translation {
            None => (tuple, None),
            Some(t) => {
                if !matches!(tuple.protocol, 6 | 17 | 132) {
                    return Err(InvalidRecord::TranslationProtocol(tuple.protocol));
                }
                let translation = Translation::checked(t, source.is_ipv4())?;
                (
                    translation.server_view(&tuple)?,
                    Some(Box::new(translation)),
                )
            }
        };
        let (key, orientation) = ConnectionKey::of(&tuple);
        Ok(Observation {
            key,
            orientation,
            tuple,
            point: point(hook),
            counts: Counts {
                packets: r.delta_packets,
                bytes: r.delta_octets,
                first_seen_unix_nanos: r.first_seen_unix_nanos,
                last_seen_unix_nanos: r.last_seen_unix_nanos,
                tcp_flags: narrow("tcp_flags", r.tcp_flags, 8)?,
                first_tcp_flags: narrow("first_tcp_flags", r.first_tcp_flags, 8)?,
            },
            end_reason,
            flow_start_unix_nanos: match r.flow_start_unix_nanos {
                0 => r.first_seen_unix_nanos,
                start => start.min(r.first_seen_unix_nanos),
            },
            starts_flow: r.record_sequence == 0,
            translation,
        })
    }

    /// Refuses times no node clock can produce now: zero, or more than a day from `now` (the
    /// aggregator's Unix time in ns). Kept apart from the record's checks, which are clock-free.
    pub fn check_time(&self, now: u64) -> Result<(), InvalidRecord> {
        for (field, value) in [
            ("first_seen_unix_nanos", self.counts.first_seen_unix_nanos),
            ("last_seen_unix_nanos", self.counts.last_seen_unix_nanos),
        ] {
            if value.abs_diff(now) > MAX_CLOCK_DISTANCE_NANOS {
                return Err(InvalidRecord::FarFromNow { field, value, now });
            }
        }
        Ok(())
    }
}

/// Serde for protocol enums, which prost represents as `i32`: stored as that number.
pub(crate) mod end_reason_number {
    use mermin_protocol::flow::v1::EndReason;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(reason: &EndReason, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(*reason as i32)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EndReason, D::Error> {
        let number = i32::deserialize(d)?;
        EndReason::try_from(number).map_err(serde::de::Error::custom)
    }
}

fn address(field: &'static str, bytes: &[u8]) -> Result<IpAddr, InvalidRecord> {
    match bytes.len() {
        4 => Ok(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default()).into()),
        16 => Ok(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap_or_default()).into()),
        len => Err(InvalidRecord::AddressLength { field, len }),
    }
}

fn narrow(field: &'static str, value: u32, bits: u32) -> Result<u32, InvalidRecord> {
    if value >> bits == 0 {
        Ok(value)
    } else {
        Err(InvalidRecord::OutOfRange { field, value, bits })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mermin_protocol::flow::v1 as proto;

    fn record() -> FlowRecord {
        FlowRecord {
            node_name: "node-a".into(),
            interface_name: "eth0".into(),
            direction: Direction::Egress as i32,
            source_address: vec![10, 0, 0, 1],
            destination_address: vec![10, 0, 0, 2],
            source_port: 40000,
            destination_port: 443,
            ip_protocol: 6,
            delta_packets: 3,
            delta_octets: 180,
            first_seen_unix_nanos: 10,
            last_seen_unix_nanos: 20,
            tcp_flags: 0x02,
            first_tcp_flags: 0x02,
            end_reason: EndReason::TcpClose as i32,
            ..FlowRecord::default()
        }
    }

    fn error(change: impl FnOnce(&mut FlowRecord)) -> String {
        let mut r = record();
        change(&mut r);
        Observation::try_from(&r).unwrap_err().to_string()
    }

    #[test]
    fn a_streams_records_share_their_points() {
        let mut points = PointCache::default();
        let mut read = |change: &dyn Fn(&mut FlowRecord)| {
            let mut r = record();
            change(&mut r);
            Observation::read(&FlowRecordView::from(&r), &mut points).unwrap()
        };
        let first = read(&|_| {});
        let again = read(&|r| r.delta_packets = 1);
        assert!(Arc::ptr_eq(&first.point, &again.point));
        assert_eq!(
            *first.point,
            ObservationPoint {
                node: "node-a".into(),
                interface: "eth0".into(),
                hook: Hook::Egress,
            }
        );
        let ingress = read(&|r| r.direction = Direction::Ingress as i32);
        assert_eq!(
            (&*ingress.point.interface, ingress.point.hook),
            ("eth0", Hook::Ingress)
        );
        assert!(!Arc::ptr_eq(&first.point, &ingress.point));
        // Another node's record on an interface of the same name is not given this node's point.
        let other = read(&|r| r.node_name = "node-b".into());
        assert_eq!(
            (&*other.point.node, &*other.point.interface),
            ("node-b", "eth0")
        );
        // The same points as without a cache.
        for o in [&first, &ingress, &other] {
            let mut r = record();
            r.node_name = o.point.node.clone();
            r.direction = match o.point.hook {
                Hook::Ingress => Direction::Ingress as i32,
                Hook::Egress => Direction::Egress as i32,
            };
            assert_eq!(Observation::try_from(&r).unwrap().point, o.point);
        }
    }

    #[test]
    fn the_point_cache_starts_over_past_its_limit() {
        let mut points = PointCache::default();
        let first = points.point("node-a", "veth0", Hook::Egress);
        for i in 1..PointCache::MAX_INTERFACES {
            points.point("node-a", &format!("veth{i}"), Hook::Egress);
        }
        assert!(Arc::ptr_eq(
            &first,
            &points.point("node-a", "veth0", Hook::Egress)
        ));
        assert_eq!(points.by_interface.len(), PointCache::MAX_INTERFACES);
        points.point("node-a", "one-more", Hook::Egress);
        assert_eq!(points.by_interface.len(), 1);
        let made_again = points.point("node-a", "veth0", Hook::Egress);
        assert!(!Arc::ptr_eq(&first, &made_again));
        assert_eq!(*first, *made_again);
    }

    #[test]
    fn valid_record_becomes_an_observation() {
        let o = Observation::try_from(&record()).unwrap();
        assert_eq!(o.point.node, "node-a");
        assert_eq!(o.point.hook, Hook::Egress);
        assert_eq!(o.tuple.source_port, 40000);
        assert_eq!(o.orientation, Orientation::Forward);
        assert_eq!((o.counts.packets, o.counts.bytes), (3, 180));
        assert_eq!(o.end_reason, EndReason::TcpClose);
    }

    #[test]
    fn malformed_records_are_rejected_with_the_field_named() {
        assert_eq!(
            error(|r| r.source_address = vec![1, 2, 3]),
            "source_address: 3 bytes, expected 4 (IPv4) or 16 (IPv6)"
        );
        assert_eq!(
            error(|r| r.destination_address = vec![0; 16]),
            "source and destination addresses are of different families"
        );
        assert_eq!(
            error(|r| r.source_port = 70000),
            "source_port: 70000 does not fit in 16 bits"
        );
        assert_eq!(
            error(|r| r.direction = 0),
            "direction: 0 is not INGRESS or EGRESS"
        );
        assert_eq!(
            error(|r| r.end_reason = 99),
            "end_reason: 99 is not a known reason"
        );
        assert_eq!(error(|r| r.node_name.clear()), "node_name is empty");
        assert_eq!(
            error(|r| r.last_seen_unix_nanos = 5),
            "last_seen_unix_nanos (5) is before first_seen_unix_nanos (10)"
        );
        assert_eq!(
            error(|r| r.delta_octets = 59),
            "delta_octets (59) is smaller than 20 bytes per packet (3 packets)"
        );
        // 10 ns between first and last packet: at most 125,000,001,250 bytes.
        assert!(
            Observation::try_from(&FlowRecord {
                delta_octets: 125_000_001_250,
                ..record()
            })
            .is_ok()
        );
        assert_eq!(
            error(|r| r.delta_octets = 125_000_001_251),
            "delta_octets (125000001251) is more than one interface can carry in the record's 10 ns (1 Tbit/s, plus a second)"
        );
        assert_eq!(
            error(|r| {
                r.delta_packets = u64::MAX / 20;
                r.delta_octets = u64::MAX;
            }),
            "delta_octets (18446744073709551615) is more than one interface can carry in the record's 10 ns (1 Tbit/s, plus a second)"
        );
    }

    fn endpoint(address: [u8; 4], port: u32) -> Option<proto::ConnectionEndpoint> {
        Some(proto::ConnectionEndpoint {
            address: address.to_vec(),
            port,
        })
    }

    /// 10.0.0.1:40000 dialled the Service 10.96.0.10:80, served by 10.0.2.5:8080.
    fn service_translation() -> proto::Translation {
        proto::Translation {
            client: endpoint([10, 0, 0, 1], 40000),
            dialled: endpoint([10, 96, 0, 10], 80),
            translated_client: endpoint([10, 0, 0, 1], 40000),
            server: endpoint([10, 0, 2, 5], 8080),
        }
    }

    fn seen(source: ([u8; 4], u32), destination: ([u8; 4], u32)) -> FlowRecord {
        FlowRecord {
            source_address: source.0.to_vec(),
            source_port: source.1,
            destination_address: destination.0.to_vec(),
            destination_port: destination.1,
            translation: Some(service_translation()),
            ..record()
        }
    }

    #[test]
    fn every_view_of_a_translated_connection_is_the_servers_view() {
        let client = ([10, 0, 0, 1], 40000);
        let service = ([10, 96, 0, 10], 80);
        let server = ([10, 0, 2, 5], 8080);
        let untranslated = Observation::try_from(&FlowRecord {
            translation: None,
            ..seen(client, server)
        })
        .unwrap();
        let views = [
            (seen(client, service), Orientation::Forward),
            (seen(service, client), Orientation::Reverse),
            (seen(client, server), Orientation::Forward),
            (seen(server, client), Orientation::Reverse),
        ];
        for (record, orientation) in views {
            let o = Observation::try_from(&record).unwrap();
            assert_eq!(o.key, untranslated.key, "{record:?}");
            assert_eq!(o.orientation, orientation);
            let t = o.translation.unwrap();
            assert_eq!(t.dialled.to_string(), "10.96.0.10:80");
            assert_eq!(t.server.to_string(), "10.0.2.5:8080");
            assert!(!t.translates_client());
        }
        let o = Observation::try_from(&seen(service, client)).unwrap();
        assert_eq!(
            (o.tuple.source.to_string(), o.tuple.source_port),
            ("10.0.2.5".to_owned(), 8080)
        );
    }

    #[test]
    fn a_translation_that_does_not_fit_the_record_is_refused() {
        let refused = |record: FlowRecord| Observation::try_from(&record).unwrap_err().to_string();
        assert_eq!(
            refused(seen(([10, 0, 0, 9], 40000), ([10, 96, 0, 10], 80))),
            "translation: the record's addresses and ports are neither the client's nor the server's view of it"
        );
        assert_eq!(
            refused(FlowRecord {
                ip_protocol: 1,
                ..seen(([10, 0, 0, 1], 40000), ([10, 96, 0, 10], 80))
            }),
            "translation: protocol 1 has no ports to translate (only TCP, UDP and SCTP)"
        );
        let mut no_server = seen(([10, 0, 0, 1], 40000), ([10, 96, 0, 10], 80));
        no_server.translation.as_mut().unwrap().server = None;
        assert_eq!(refused(no_server), "translation.server is empty");
        let mut v6 = seen(([10, 0, 0, 1], 40000), ([10, 96, 0, 10], 80));
        v6.translation.as_mut().unwrap().dialled = Some(proto::ConnectionEndpoint {
            address: vec![0; 16],
            port: 80,
        });
        assert_eq!(
            refused(v6),
            "source and destination addresses are of different families"
        );
    }

    #[test]
    fn times_far_from_the_clock_are_refused() {
        let day = 86_400 * 1_000_000_000u64;
        let now = 1_800_000_000 * 1_000_000_000u64;
        let at = |first, last| {
            Observation::try_from(&FlowRecord {
                first_seen_unix_nanos: first,
                last_seen_unix_nanos: last,
                ..record()
            })
            .unwrap()
            .check_time(now)
            .map_err(|e| e.to_string())
        };
        assert_eq!(at(now - day, now + day), Ok(()));
        assert_eq!(
            at(0, now),
            Err(format!(
                "first_seen_unix_nanos (0) is not within a day of the aggregator's clock ({now})"
            ))
        );
        assert_eq!(
            at(now, u64::MAX),
            Err(format!(
                "last_seen_unix_nanos ({}) is not within a day of the aggregator's clock ({now})",
                u64::MAX
            ))
        );
    }
}
