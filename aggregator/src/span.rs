//! Spans: one stitched flow interval becomes a CLIENT span (carrying every flow attribute, the
//! one users query) and a child SERVER span, each under the resource of its side, so Tempo's
//! service graph draws an edge from client to server.
//!
//! Attribute names are the ones the seed's TraceQL uses, as span attributes with these types:
//! `network.protocol` ("TCP", "UDP", "ICMP", "ICMPv6", or the protocol number), `source.address`
//! / `destination.address` (client / server), `source.port` / `destination.port` (int),
//! `flow.bytes.sent` / `flow.bytes.received` and `flow.packets.sent` / `flow.packets.received`
//! (int; sent = client → server), plus `network.transport` and `network.type` (OTel),
//! `flow.community_id`, `flow.tcp.flags`, `flow.end_reason`, `flow.client_rule` and the
//! observation points; and, where the [`MetadataIndex`] knows an end at the flow's start, its
//! Kubernetes names (`source.pod.name`, `destination.namespace`, ... — see
//! [`crate::metadata::attributes`]). Each side's resource `service.name` is its workload (else pod,
//! Service or node), or its address when nothing is known.
//!
//! **Translated connections** (a Service's DNAT, a NodePort, a masquerade): the destination is
//! the endpoint that served the connection and the source the client as it sent; the address it
//! dialled, where it is not the endpoint, is `flow.dialled.address` / `flow.dialled.port`, and where that is a Service the index
//! knows (from Kubernetes or the static file), its name is `destination.service.name` (and its
//! namespace `destination.namespace` if the endpoint itself is unknown). A client translated by
//! SNAT shows as the server saw it in `flow.translated.source.address` / `.port`.
//!
//! **Identity.** Ids are derived, never random, so re-exporting an interval after a crash yields
//! the same ids and Tempo keeps one copy: the trace id from (Community ID, connection start,
//! window), the span ids from (trace id, interval, role). A trace covers [`INTERVALS_PER_TRACE`]
//! intervals; the first span of the next window links to the last CLIENT span of the previous
//! one, which keeps a connection that lives for days far below Tempo's 5 MB per-trace limit.

use std::{net::IpAddr, sync::OnceLock};

use mermin_protocol::display::{end_reason_name, protocol_name};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use sha1::{Digest, Sha1};

use crate::{
    connection_key::ConnectionKey,
    flow_table::Interval,
    metadata::{
        AttributeNaming, EndpointMetadata, FlowSide, MetadataIndex, append_metadata_attributes,
    },
    observation::{Hook, ObservationPoint},
    otlp_wire::{Attributes, RequestWriter},
    stitch::{Flow, Side},
};

/// What spans are enriched with: the metadata index, and the attribute names to use.
#[derive(Clone, Copy)]
pub struct Enrichment<'a> {
    pub index: &'a MetadataIndex,
    pub naming: AttributeNaming,
}

/// Intervals in one trace. With the default 60 s active timeout a trace spans an hour: at most
/// 120 spans of a few hundred bytes each.
pub const INTERVALS_PER_TRACE: u64 = 60;

/// Spans written per interval ([`write_flow_spans`]): CLIENT and SERVER.
pub const SPANS_PER_INTERVAL: u32 = 2;

/// The trace of an interval: a function of the connection (its Community ID digest and start)
/// and of the window of [`INTERVALS_PER_TRACE`] intervals the interval falls in, so that a
/// request written again (after a restart, by another replica) carries the same ids. One SHA-1
/// block: 13 + 20 + 8 + 8 bytes.
pub fn trace_id(community_digest: &[u8; 20], interval: &Interval) -> [u8; 16] {
    let window = interval.index / INTERVALS_PER_TRACE;
    let digest = Sha1::new()
        .chain_update(b"mermin.trace\0")
        .chain_update(community_digest)
        .chain_update(interval.connection_start_unix_nanos.to_be_bytes())
        .chain_update(window.to_be_bytes())
        .finalize();
    let mut id = [0; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

/// The ids of an interval's CLIENT and SERVER spans, from one SHA-1 of its trace and index.
struct SpanIds {
    client: [u8; 8],
    server: [u8; 8],
}

impl SpanIds {
    fn of(trace_id: &[u8; 16], index: u64) -> SpanIds {
        let digest = Sha1::new()
            .chain_update(b"mermin.span\0")
            .chain_update(trace_id)
            .chain_update(index.to_be_bytes())
            .finalize();
        let id = |at: usize| {
            let mut id = [0; 8];
            id.copy_from_slice(&digest[at..at + 8]);
            // An all-zero span id is invalid in OTLP; astronomically unlikely, but never emit
            // one.
            if id == [0; 8] {
                id[7] = 1;
            }
            id
        };
        SpanIds {
            client: id(0),
            server: id(8),
        }
    }
}

/// Writes the OTLP spans of one flow interval to `request`: the client side's resource with the
/// CLIENT span, the server side's with the SERVER span.
pub fn write_flow_spans(
    flow: &Flow,
    interval: &Interval,
    enrichment: &Enrichment,
    request: &mut RequestWriter,
) {
    let community_digest = flow.key.community_digest(0);
    let community_id = ConnectionKey::community_text(&community_digest);
    let trace = trace_id(&community_digest, interval);
    let ids = SpanIds::of(&trace, interval.index);
    let names = ProtocolNames::of(flow.key.protocol);
    let protocol = names.protocol.as_str();
    let name = names.span_name(flow.client.address.is_ipv4());
    let client = shown_client(flow);
    let lookup = |side: &Side| {
        enrichment
            .index
            .lookup(side.address, side.port, flow.start_unix_nanos)
    };
    let client_side = lookup(&client);
    let mut server_side = lookup(&flow.server);
    if let Some(t) = flow.translation.filter(|t| t.dialled != t.server)
        && let Some(service) = enrichment
            .index
            .lookup(t.dialled.address, t.dialled.port, flow.start_unix_nanos)
            .filter(|dialled| dialled.service_name.is_some() && dialled.pod_name.is_none())
    {
        let server = server_side.get_or_insert(EndpointMetadata {
            namespace: service.namespace,
            ..EndpointMetadata::default()
        });
        server.service_name = service.service_name;
    }
    let scope = ("mermin", env!("CARGO_PKG_VERSION"));

    let client_workload = client_side.as_ref().and_then(|m| m.workload_service_name());
    request.resource_span(
        ServiceName::of(&client, false, client_workload),
        scope,
        |span| {
            span.ids(&trace, &ids.client, None);
            span.name(name);
            span.kind(SpanKind::Client as i32);
            span.times(flow.start_unix_nanos, flow.end_unix_nanos);
            if interval.index > 0 && interval.index.is_multiple_of(INTERVALS_PER_TRACE) {
                let previous = Interval {
                    index: interval.index - 1,
                    ..*interval
                };
                let previous_trace = trace_id(&community_digest, &previous);
                span.link(
                    &previous_trace,
                    &SpanIds::of(&previous_trace, previous.index).client,
                );
            }
            let mut attributes = span.attributes();
            write_flow_attributes(
                flow,
                &client,
                names,
                &community_id,
                interval,
                &mut attributes,
            );
            for (side, end) in [
                (FlowSide::Source, &client_side),
                (FlowSide::Destination, &server_side),
            ] {
                if let Some(metadata) = end {
                    append_metadata_attributes(enrichment.naming, side, metadata, &mut attributes);
                }
            }
        },
    );
    let server_workload = server_side.as_ref().and_then(|m| m.workload_service_name());
    request.resource_span(
        ServiceName::of(&flow.server, true, server_workload),
        scope,
        |span| {
            span.ids(&trace, &ids.server, Some(&ids.client));
            span.name(name);
            span.kind(SpanKind::Server as i32);
            span.times(flow.start_unix_nanos, flow.end_unix_nanos);
            let mut attributes = span.attributes();
            attributes.string("flow.community_id", &community_id);
            attributes.string("network.protocol", protocol);
        },
    );
}

/// The client as users see it: as it sent, before any SNAT of a translated connection.
fn shown_client(flow: &Flow) -> Side {
    match &flow.translation {
        Some(t)
            if (flow.client.address, flow.client.port)
                == (t.translated_client.address, t.translated_client.port) =>
        {
            Side {
                address: t.client.address,
                port: t.client.port,
            }
        }
        _ => flow.client,
    }
}

/// The names spans give an IP protocol, made once per protocol number rather than per span.
struct ProtocolNames {
    /// `network.protocol`: "TCP", "UDP", ... or the number.
    protocol: String,
    /// `network.transport`: the same in lower case.
    transport: String,
    /// Low-cardinality span names in the style Mermin users know, IPv4 then IPv6:
    /// `flow_ipv4_tcp`.
    span_names: [String; 2],
}

impl ProtocolNames {
    fn of(protocol: u8) -> &'static ProtocolNames {
        static NAMES: OnceLock<Vec<ProtocolNames>> = OnceLock::new();
        let names = NAMES.get_or_init(|| (0..=u8::MAX).map(ProtocolNames::new).collect());
        &names[usize::from(protocol)]
    }

    fn new(protocol: u8) -> Self {
        let name = protocol_name(protocol.into());
        let transport = name.to_lowercase();
        let span_names = [IPV4, IPV6].map(|family| format!("flow_{family}_{transport}"));
        Self {
            protocol: name,
            transport,
            span_names,
        }
    }

    fn span_name(&self, ipv4: bool) -> &str {
        &self.span_names[usize::from(!ipv4)]
    }
}

const IPV4: &str = "ipv4";
const IPV6: &str = "ipv6";

fn network_type(flow: &Flow) -> &'static str {
    if flow.client.address.is_ipv4() {
        IPV4
    } else {
        IPV6
    }
}

/// OTLP integers are signed: a count past `i64::MAX` shows as the maximum, never negative.
fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

const TCP_FLAG_NAMES: [(u32, &str); 8] = [
    (0x01, "FIN"),
    (0x02, "SYN"),
    (0x04, "RST"),
    (0x08, "PSH"),
    (0x10, "ACK"),
    (0x20, "URG"),
    (0x40, "ECE"),
    (0x80, "CWR"),
];

fn write_flow_attributes(
    flow: &Flow,
    client: &Side,
    names: &ProtocolNames,
    community_id: &str,
    interval: &Interval,
    attributes: &mut Attributes,
) {
    attributes.string("network.protocol", &names.protocol);
    attributes.string("network.transport", &names.transport);
    attributes.string("network.type", network_type(flow));
    attributes.string("source.address", AddressText::of(client.address).as_str());
    attributes.int("source.port", i64::from(client.port));
    attributes.string(
        "destination.address",
        AddressText::of(flow.server.address).as_str(),
    );
    attributes.int("destination.port", i64::from(flow.server.port));
    attributes.string("flow.community_id", community_id);
    attributes.string("flow.client_rule", flow.client_rule.as_str());
    attributes.string("flow.end_reason", end_reason_name(flow.end_reason));
    attributes.int("flow.interval", saturating_i64(interval.index));
    if let Some(t) = &flow.translation {
        if t.dialled != t.server {
            attributes.string(
                "flow.dialled.address",
                AddressText::of(t.dialled.address).as_str(),
            );
            attributes.int("flow.dialled.port", i64::from(t.dialled.port));
        }
        if t.translates_client() {
            attributes.string(
                "flow.translated.source.address",
                AddressText::of(t.translated_client.address).as_str(),
            );
            attributes.int(
                "flow.translated.source.port",
                i64::from(t.translated_client.port),
            );
        }
    }
    let mut flags = 0;
    for (direction, measured) in [
        (Direction::Sent, &flow.client_to_server),
        (Direction::Received, &flow.server_to_client),
    ] {
        let (packets, bytes) = measured.as_ref().map_or((0, 0), |m| (m.packets, m.bytes));
        attributes.int(direction.bytes_key(), saturating_i64(bytes));
        attributes.int(direction.packets_key(), saturating_i64(packets));
        if let Some(m) = measured {
            flags |= u32::from(m.tcp_flags);
            attributes.joined_string(direction.point_key(), "/", &point_label(&m.point));
        }
    }
    if flow.key.protocol == 6 {
        let names = TCP_FLAG_NAMES
            .iter()
            .filter(|(bit, _)| flags & bit != 0)
            .map(|(_, name)| *name);
        attributes.joined_strings("flow.tcp.flags", "", names.map(|name| [name]));
    }
    attributes.joined_strings(
        "flow.observation_points",
        "/",
        flow.points.iter().map(|point| point_label(point)),
    );
}

/// Client → server (`sent`) or back (`received`): the keys of its attributes.
#[derive(Clone, Copy)]
enum Direction {
    Sent,
    Received,
}

impl Direction {
    fn bytes_key(self) -> &'static str {
        match self {
            Direction::Sent => "flow.bytes.sent",
            Direction::Received => "flow.bytes.received",
        }
    }

    fn packets_key(self) -> &'static str {
        match self {
            Direction::Sent => "flow.packets.sent",
            Direction::Received => "flow.packets.received",
        }
    }

    fn point_key(self) -> &'static str {
        match self {
            Direction::Sent => "flow.sent.observation_point",
            Direction::Received => "flow.received.observation_point",
        }
    }
}

/// `node/interface/ingress` — how users read an observation point — in parts, joined by `/`
/// as they are written (eight labels per connection).
fn point_label(point: &ObservationPoint) -> [&str; 3] {
    let hook = match point.hook {
        Hook::Ingress => "ingress",
        Hook::Egress => "egress",
    };
    [&point.node, &point.interface, hook]
}

/// An address as `IpAddr` shows it, on the stack; IPv4 written digit by digit, without the
/// formatter (at least two per span).
struct AddressText {
    text: [u8; 45],
    len: usize,
}

impl AddressText {
    fn of(address: IpAddr) -> Self {
        let mut out = AddressText {
            text: [0; 45],
            len: 0,
        };
        match address {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    if octet >= 100 {
                        out.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        out.push(b'0' + octet / 10 % 10);
                    }
                    out.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(v6) => {
                use std::io::Write;
                let mut cursor = std::io::Cursor::new(&mut out.text[..]);
                // The longest IPv6 text (an IPv4-mapped address in full) is 45 bytes.
                let _ = write!(cursor, "{v6}");
                out.len = cursor.position() as usize;
            }
        }
        out
    }

    fn push(&mut self, byte: u8) {
        self.text[self.len] = byte;
        self.len += 1;
    }

    fn as_str(&self) -> &str {
        // ASCII digits, dots, colons and hex letters only.
        std::str::from_utf8(&self.text[..self.len]).unwrap_or_default()
    }
}

/// A side's resource `service.name`: its workload; without metadata its address (and, for the
/// server, its port), which is what the service graph then shows.
enum ServiceName<'a> {
    Workload(&'a str),
    Endpoint(&'a Side),
    Address(&'a Side),
}

impl<'a> ServiceName<'a> {
    fn of(side: &'a Side, server: bool, workload: Option<&'a str>) -> Self {
        match workload {
            Some(workload) => ServiceName::Workload(workload),
            None if server && side.port != 0 => ServiceName::Endpoint(side),
            None => ServiceName::Address(side),
        }
    }
}

impl std::fmt::Display for ServiceName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceName::Workload(workload) => f.write_str(workload),
            ServiceName::Endpoint(side) => {
                write!(
                    f,
                    "{}:{}",
                    AddressText::of(side.address).as_str(),
                    side.port
                )
            }
            ServiceName::Address(side) => f.write_str(AddressText::of(side.address).as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{AnyValue, any_value::Value},
        trace::v1::{ResourceSpans, Span},
    };
    use prost::Message;

    use super::*;
    use crate::{
        metadata::{IndexSettings, static_file},
        stitch::fixtures::flow,
    };

    /// The spans of `flow` with nothing known about its ends.
    fn spans(flow: &Flow, interval: &Interval) -> Vec<ResourceSpans> {
        let index = MetadataIndex::new(&IndexSettings::default());
        let enrichment = Enrichment {
            index: &index,
            naming: AttributeNaming::Seed,
        };
        decoded(flow, interval, &enrichment)
    }

    /// What [`write_flow_spans`] wrote, decoded.
    fn decoded(flow: &Flow, interval: &Interval, enrichment: &Enrichment) -> Vec<ResourceSpans> {
        let mut request = RequestWriter::default();
        write_flow_spans(flow, interval, enrichment, &mut request);
        let entry = request.finish();
        assert_eq!(entry[..4], 2u32.to_be_bytes(), "two spans counted");
        ExportTraceServiceRequest::decode(&entry[4..])
            .unwrap()
            .resource_spans
    }

    fn attributes(span: &Span) -> HashMap<&str, Value> {
        span.attributes
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.clone().unwrap().value.unwrap()))
            .collect()
    }

    fn text(v: &str) -> Value {
        Value::StringValue(v.into())
    }

    const START: Interval = Interval {
        connection_start_unix_nanos: 1_000,
        index: 0,
    };

    #[test]
    fn protocols_are_named_per_family_and_by_number_when_unknown() {
        let named = |protocol, ipv4| {
            let names = ProtocolNames::of(protocol);
            (
                names.protocol.as_str(),
                names.transport.as_str(),
                names.span_name(ipv4),
            )
        };
        assert_eq!(named(6, true), ("TCP", "tcp", "flow_ipv4_tcp"));
        assert_eq!(named(17, false), ("UDP", "udp", "flow_ipv6_udp"));
        assert_eq!(named(58, false), ("ICMPv6", "icmpv6", "flow_ipv6_icmpv6"));
        assert_eq!(named(47, true), ("47", "47", "flow_ipv4_47"));
        assert_eq!(named(255, false), ("255", "255", "flow_ipv6_255"));
    }

    #[test]
    fn addresses_show_as_the_standard_library_shows_them() {
        let addresses = [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.1",
            "192.168.100.9",
            "1.20.3.45",
            "100.99.10.109",
            "fd00::1",
            "::ffff:10.0.0.1",
            "2001:db8:0:0:1:0:0:1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ];
        for text in addresses {
            let address: IpAddr = text.parse().unwrap();
            assert_eq!(AddressText::of(address).as_str(), address.to_string());
        }
        let side = Side {
            address: "10.96.0.10".parse().unwrap(),
            port: 53,
        };
        assert_eq!(
            ServiceName::of(&side, true, None).to_string(),
            "10.96.0.10:53"
        );
        assert_eq!(
            ServiceName::of(&side, false, None).to_string(),
            "10.96.0.10"
        );
    }

    #[test]
    fn client_span_carries_the_seed_attributes_with_their_types() {
        let spans = spans(&flow(), &START);
        let client = &spans[0].scope_spans[0].spans[0];
        assert_eq!(client.kind, SpanKind::Client as i32);
        assert_eq!(client.name, "flow_ipv4_tcp");
        assert_eq!(
            (client.start_time_unix_nano, client.end_time_unix_nano),
            (1_000, 9_500)
        );
        let a = attributes(client);
        assert_eq!(a["network.protocol"], text("TCP"));
        assert_eq!(a["network.transport"], text("tcp"));
        assert_eq!(a["network.type"], text("ipv4"));
        assert_eq!(a["source.address"], text("10.0.1.5"));
        assert_eq!(a["source.port"], Value::IntValue(51000));
        assert_eq!(a["destination.address"], text("10.0.2.7"));
        assert_eq!(a["destination.port"], Value::IntValue(443));
        assert_eq!(a["flow.bytes.sent"], Value::IntValue(2_400_000));
        assert_eq!(a["flow.bytes.received"], Value::IntValue(900));
        assert_eq!(a["flow.packets.sent"], Value::IntValue(12));
        assert_eq!(a["flow.packets.received"], Value::IntValue(9));
        assert_eq!(a["flow.client_rule"], text("tcp_handshake"));
        assert_eq!(a["flow.end_reason"], text("tcp_close"));
        assert_eq!(
            a["flow.sent.observation_point"],
            text("node-c/vethc1/ingress")
        );
        let Value::ArrayValue(flags) = &a["flow.tcp.flags"] else {
            panic!("flags not an array")
        };
        let flags: Vec<_> = flags
            .values
            .iter()
            .map(|v| v.value.clone().unwrap())
            .collect();
        assert_eq!(flags, [text("FIN"), text("SYN"), text("PSH"), text("ACK")]);
        let Value::StringValue(id) = &a["flow.community_id"] else {
            panic!()
        };
        assert!(id.starts_with("1:"), "{id}");
    }

    #[test]
    fn server_span_is_a_child_under_the_server_resource() {
        let spans = spans(&flow(), &START);
        let client = &spans[0].scope_spans[0].spans[0];
        let server = &spans[1].scope_spans[0].spans[0];
        assert_eq!(server.kind, SpanKind::Server as i32);
        assert_eq!(server.trace_id, client.trace_id);
        assert_eq!(server.parent_span_id, client.span_id);
        assert_ne!(server.span_id, client.span_id);
        assert_eq!(client.span_id.len(), 8);
        let service = |rs: &ResourceSpans| {
            rs.resource.as_ref().unwrap().attributes[0]
                .value
                .clone()
                .unwrap()
                .value
                .unwrap()
        };
        assert_eq!(service(&spans[0]), text("10.0.1.5"));
        assert_eq!(service(&spans[1]), text("10.0.2.7:443"));
    }

    #[test]
    fn ids_are_deterministic_per_interval_and_windowed() {
        let first = spans(&flow(), &START);
        let again = spans(&flow(), &START);
        assert_eq!(first, again, "re-export yields identical spans");
        let span = |rs: &[ResourceSpans]| rs[0].scope_spans[0].spans[0].clone();
        let next = span(&spans(&flow(), &Interval { index: 1, ..START }));
        assert_eq!(next.trace_id, span(&first).trace_id);
        assert_ne!(next.span_id, span(&first).span_id);
        assert!(next.links.is_empty());

        let new_window = span(&spans(
            &flow(),
            &Interval {
                index: INTERVALS_PER_TRACE,
                ..START
            },
        ));
        assert_ne!(new_window.trace_id, span(&first).trace_id);
        let last_of_previous = span(&spans(
            &flow(),
            &Interval {
                index: INTERVALS_PER_TRACE - 1,
                ..START
            },
        ));
        assert_eq!(new_window.links.len(), 1);
        assert_eq!(new_window.links[0].trace_id, last_of_previous.trace_id);
        assert_eq!(new_window.links[0].span_id, last_of_previous.span_id);

        let other_connection = Interval {
            connection_start_unix_nanos: 2_000,
            index: 0,
        };
        assert_ne!(
            span(&spans(&flow(), &other_connection)).trace_id,
            span(&first).trace_id
        );
    }

    #[test]
    fn a_translated_connection_shows_the_client_as_it_sent_and_names_the_service_it_dialled() {
        let mut index = MetadataIndex::new(&IndexSettings::default());
        index.set_static_entries(
            static_file::parse(
                "m.hcl",
                r#"
endpoint "10.0.1.5" { pod = "web-7c9" namespace = "frontend" }
endpoint "10.0.2.7" { pod = "api-0" namespace = "backend" service = "api-headless" }
endpoint "10.96.0.10" { service = "api" namespace = "backend" }
"#,
            )
            .unwrap(),
        );
        let endpoint = |address: &str, port| crate::connection_key::Endpoint {
            address: address.parse().unwrap(),
            port,
        };
        // 10.0.1.5:51000 dialled the Service 10.96.0.10:80, masqueraded to 10.0.9.1:61000.
        let mut translated = flow();
        translated.client = Side {
            address: "10.0.9.1".parse().unwrap(),
            port: 61000,
        };
        translated.translation = Some(crate::observation::Translation {
            client: endpoint("10.0.1.5", 51000),
            dialled: endpoint("10.96.0.10", 80),
            translated_client: endpoint("10.0.9.1", 61000),
            server: endpoint("10.0.2.7", 443),
        });
        // The client span's attributes, owned.
        let client_attributes = |flow: &Flow| {
            let spans = decoded(
                flow,
                &START,
                &Enrichment {
                    index: &index,
                    naming: AttributeNaming::Seed,
                },
            );
            attributes(&spans[0].scope_spans[0].spans[0])
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect::<HashMap<String, Value>>()
        };
        let a = client_attributes(&translated);
        assert_eq!(a["source.address"], text("10.0.1.5"));
        assert_eq!(a["source.port"], Value::IntValue(51000));
        assert_eq!(a["source.pod.name"], text("web-7c9"));
        assert_eq!(a["destination.address"], text("10.0.2.7"));
        assert_eq!(a["destination.pod.name"], text("api-0"));
        assert_eq!(a["destination.service.name"], text("api"));
        assert_eq!(a["flow.dialled.address"], text("10.96.0.10"));
        assert_eq!(a["flow.dialled.port"], Value::IntValue(80));
        assert_eq!(a["flow.translated.source.address"], text("10.0.9.1"));
        assert_eq!(a["flow.translated.source.port"], Value::IntValue(61000));

        // Without SNAT there is nothing translated to show of the client.
        translated.client = Side {
            address: "10.0.1.5".parse().unwrap(),
            port: 51000,
        };
        if let Some(t) = translated.translation.as_mut() {
            t.translated_client = t.client;
        }
        let a = client_attributes(&translated);
        assert_eq!(a["source.address"], text("10.0.1.5"));
        assert!(!a.contains_key("flow.translated.source.address"));
        assert_eq!(a["destination.service.name"], text("api"));
    }

    #[test]
    fn known_ends_carry_their_names_and_name_their_resources() {
        let mut index = MetadataIndex::new(&IndexSettings::default());
        index.set_static_entries(
            static_file::parse(
                "m.hcl",
                r#"
endpoint "10.0.1.5" { pod = "web-7c9" namespace = "frontend" workload_kind = "Deployment" workload = "web" }
endpoint "10.0.2.0/24" { pod = "nginx-0" namespace = "backend" service = "nginx" }
"#,
            )
            .unwrap(),
        );
        let attributes_of = |naming| {
            let spans = decoded(
                &flow(),
                &START,
                &Enrichment {
                    index: &index,
                    naming,
                },
            );
            let services: Vec<String> = spans
                .iter()
                .map(
                    |r| match &r.resource.as_ref().unwrap().attributes[0].value {
                        Some(AnyValue {
                            value: Some(Value::StringValue(s)),
                        }) => s.clone(),
                        other => panic!("{other:?}"),
                    },
                )
                .collect();
            assert_eq!(services, ["web", "nginx-0"]);
            let client = &spans[0].scope_spans[0].spans[0];
            client
                .attributes
                .iter()
                .filter(|a| a.key.starts_with("source.") || a.key.starts_with("destination."))
                .filter(|a| !a.key.ends_with(".address") && !a.key.ends_with(".port"))
                .map(|a| match &a.value {
                    Some(AnyValue {
                        value: Some(Value::StringValue(s)),
                    }) => (a.key.clone(), s.clone()),
                    other => panic!("{other:?}"),
                })
                .collect::<Vec<_>>()
        };
        let pairs = |list: &[(&str, &str)]| {
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            attributes_of(AttributeNaming::Seed),
            pairs(&[
                ("source.pod.name", "web-7c9"),
                ("source.namespace", "frontend"),
                ("source.workload.kind", "Deployment"),
                ("source.workload.name", "web"),
                ("destination.pod.name", "nginx-0"),
                ("destination.namespace", "backend"),
                ("destination.service.name", "nginx"),
            ])
        );
        assert_eq!(
            attributes_of(AttributeNaming::Mermin),
            pairs(&[
                ("source.k8s.pod.name", "web-7c9"),
                ("source.k8s.namespace.name", "frontend"),
                ("source.k8s.deployment.name", "web"),
                ("destination.k8s.pod.name", "nginx-0"),
                ("destination.k8s.namespace.name", "backend"),
                ("destination.k8s.service.name", "nginx"),
            ])
        );
    }
}
