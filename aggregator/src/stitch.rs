//! Stitching: every observation of one connection — client node and server node, both
//! directions, pod veth and host interface — becomes one bidirectional [`Flow`] with the client
//! and server right and each direction counted exactly once.
//!
//! **Client and server.** The first rule that applies decides, and the flow says which
//! ([`ClientRule`]):
//! 1. `tcp_handshake` — a direction whose first packet was SYN without ACK comes from the client
//!    (or, if only the answer was seen, a first packet SYN+ACK goes to the client);
//! 2. `icmp_request` — an ICMP/ICMPv6 request (echo, timestamp, ...) comes from the client;
//! 3. `well_known_port` — exactly one port is below 1024: that side is the server;
//! 4. `ephemeral_port` — exactly one port is in the ephemeral range (≥ 32768): that side is the
//!    client;
//! 5. `first_packet` — otherwise the sender of the earliest packet is the client.
//!
//! **Counts.** Each direction's packets and bytes come from one observation point, never a sum
//! over points: the point nearest the sender that saw that direction, ranked pod-side ingress
//! (the packet just left the sending pod) < host-side egress < host-side ingress < pod-side
//! egress (the packet is about to enter the receiving pod); ties go to the earlier first packet.
//! A direction that the preferred point did not see is taken from the next one.
//!
//! **Stability.** The first interval of a connection fixes these decisions in [`Decisions`]; later
//! intervals keep them, so an interval without a SYN cannot flip client and server, and a
//! direction is counted at the same point for the connection's whole life. That makes the sum of
//! a direction's counts over all intervals exactly what that one point counted.

use std::{net::IpAddr, sync::Arc};

use mermin_protocol::flow::v1::EndReason;
use serde::{Deserialize, Serialize};

use crate::{
    connection_key::{ConnectionKey, Endpoint, Orientation},
    observation::{Counts, Hook, Observation, ObservationPoint, Point, Points, Translation},
};
use smallvec::SmallVec;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;
const SYN: u32 = 0x02;
const ACK: u32 = 0x10;
const EPHEMERAL_PORTS_START: u16 = 32768;
const ICMP_V4_REQUESTS: &[u8] = &[8, 13, 15, 10, 17];
const ICMP_V4_REPLIES: &[u8] = &[0, 14, 16, 9, 18];
const ICMP_V6_REQUESTS: &[u8] = &[128, 130, 133, 135, 139, 144];
const ICMP_V6_REPLIES: &[u8] = &[129, 131, 134, 136, 140, 145];

/// Which rule decided the client (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRule {
    TcpHandshake,
    IcmpRequest,
    WellKnownPort,
    EphemeralPort,
    FirstPacket,
}

impl ClientRule {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientRule::TcpHandshake => "tcp_handshake",
            ClientRule::IcmpRequest => "icmp_request",
            ClientRule::WellKnownPort => "well_known_port",
            ClientRule::EphemeralPort => "ephemeral_port",
            ClientRule::FirstPacket => "first_packet",
        }
    }
}

/// Tells pod-side interfaces (the host end of a pod's veth) from host-side ones (uplinks,
/// tunnels, bridges) by name prefix.
#[derive(Debug, Clone)]
pub struct InterfaceKinds {
    pod_prefixes: Vec<String>,
}

impl InterfaceKinds {
    pub fn new(pod_prefixes: impl IntoIterator<Item = String>) -> Self {
        Self {
            pod_prefixes: pod_prefixes.into_iter().collect(),
        }
    }

    pub fn is_pod_side(&self, interface: &str) -> bool {
        self.pod_prefixes.iter().any(|p| interface.starts_with(p))
    }

    /// Rank of a point for one direction: lower is nearer the sender.
    fn rank(&self, point: &ObservationPoint) -> u8 {
        match (self.is_pod_side(&point.interface), point.hook) {
            (true, Hook::Ingress) => 0,
            (false, Hook::Egress) => 1,
            (false, Hook::Ingress) => 2,
            (true, Hook::Egress) => 3,
        }
    }
}

impl Default for InterfaceKinds {
    /// The host ends of pod veths of the common CNIs.
    fn default() -> Self {
        Self::new(
            ["veth", "cali", "lxc", "gke", "eni", "azv", "cni", "vethwe"]
                .into_iter()
                .map(String::from),
        )
    }
}

/// One side of a flow as shown to users: address and real port (zero for ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    pub address: IpAddr,
    pub port: u16,
}

/// One direction's counts and the point they come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measured {
    pub counts: Counts,
    pub point: Point,
}

/// A connection over one reporting interval, stitched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub key: ConnectionKey,
    pub client: Side,
    pub server: Side,
    pub client_rule: ClientRule,
    pub client_to_server: Option<Measured>,
    pub server_to_client: Option<Measured>,
    /// Every point that saw the connection in this interval, sorted.
    pub points: Vec<Point>,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// The most final reason any point gave (`ActiveTimeout` if the connection goes on).
    pub end_reason: EndReason,
    /// How a node translated the connection, if one did; `client` and `server` are then the
    /// server's view of it.
    pub translation: Option<Translation>,
}

/// What one point saw of one direction in the current interval.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Seen {
    point: Point,
    orientation: OrientationKey,
    /// The point's rank for this direction (see the module docs).
    rank: u8,
    counts: Counts,
    /// The ICMP message type (the client rule looks at it).
    icmp_type: u8,
}

/// What the first interval decided; kept for the connection's life (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decisions {
    /// Whether the key's first endpoint is the client, and why.
    client: Option<(bool, ClientRule)>,
    forward_point: Option<Point>,
    reverse_point: Option<Point>,
    /// The first translation a record reported (boxed: few connections have one).
    translation: Option<Box<Translation>>,
}

impl Decisions {
    /// Keeps the connection's translation; the first one reported stands.
    pub fn note_translation(&mut self, translation: Option<&Translation>) {
        if self.translation.is_none()
            && let Some(t) = translation
        {
            self.translation = Some(Box::new(*t));
        }
    }

    /// Whether `point` counts the direction `orientation` of this connection.
    pub fn counts_at(&self, point: &ObservationPoint, orientation: Orientation) -> bool {
        self.chosen(orientation.into())
            .is_some_and(|chosen| **chosen == *point)
    }

    fn chosen(&self, orientation: OrientationKey) -> Option<&Point> {
        match orientation {
            OrientationKey::Forward => self.forward_point.as_ref(),
            OrientationKey::Reverse => self.reverse_point.as_ref(),
        }
    }

    /// Replaces every point with the shared copy from `points` (after a restore).
    pub fn intern(&mut self, points: &mut Points) {
        for point in [&mut self.forward_point, &mut self.reverse_point]
            .into_iter()
            .flatten()
        {
            *point = points.intern(point);
        }
    }
}

/// The observations of one connection in the current interval, reduced as they arrive to what
/// stitching needs: per direction only the counts of the points that can still be the counting
/// point (the decided one; before a decision, those of the best rank so far — counts are never
/// summed across points, so the others' would be dropped anyway), and of every point only that it
/// saw the connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Connection {
    /// Usually one per direction; more only while points of one rank tie.
    counted: SmallVec<[Seen; 2]>,
    /// Every point that saw the connection in this interval.
    points: SmallVec<[Point; 4]>,
    /// Bit `i`: `points[i]` sent a final record in this interval (the first eight points).
    finals: u8,
    start_unix_nanos: u64,
    end_unix_nanos: u64,
    #[serde(with = "crate::observation::end_reason_number")]
    end_reason: EndReason,
}

/// `Orientation` with an order, for the map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum OrientationKey {
    Forward,
    Reverse,
}

impl From<Orientation> for OrientationKey {
    fn from(o: Orientation) -> Self {
        match o {
            Orientation::Forward => OrientationKey::Forward,
            Orientation::Reverse => OrientationKey::Reverse,
        }
    }
}

impl Connection {
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Whether every point that saw the connection in this interval has sent its final record.
    pub fn is_final_everywhere(&self) -> bool {
        let seen = self.points.len();
        seen > 0 && seen <= 8 && u32::from(self.finals) == (1u32 << seen) - 1
    }

    /// The nodes whose points saw the connection in this interval (with repeats).
    pub fn reporting_nodes(&self) -> impl Iterator<Item = &str> {
        self.points.iter().map(|p| p.node.as_str())
    }

    /// Adds an observation of this connection seen at `point` (the interned copy of the
    /// observation's point), keeping what `decisions` and the points' ranks may still count.
    pub fn add(
        &mut self,
        observation: &Observation,
        point: Point,
        decisions: &Decisions,
        kinds: &InterfaceKinds,
    ) {
        let counts = &observation.counts;
        if self.points.is_empty() {
            self.start_unix_nanos = counts.first_seen_unix_nanos;
            self.end_unix_nanos = counts.last_seen_unix_nanos;
            self.end_reason = observation.end_reason;
        } else {
            self.start_unix_nanos = self.start_unix_nanos.min(counts.first_seen_unix_nanos);
            self.end_unix_nanos = self.end_unix_nanos.max(counts.last_seen_unix_nanos);
            self.end_reason = more_final(self.end_reason, observation.end_reason);
        }
        let index = match self.points.iter().position(|p| same(p, &point)) {
            Some(index) => index,
            None => {
                self.points.push(point.clone());
                self.points.len() - 1
            }
        };
        if observation.end_reason != EndReason::ActiveTimeout && index < 8 {
            self.finals |= 1 << index;
        }
        let orientation = OrientationKey::from(observation.orientation);
        let rank = match decisions.chosen(orientation) {
            Some(chosen) if same(chosen, &point) => 0,
            Some(_) => return, // counted at another point
            None => kinds.rank(&point),
        };
        let mut best = u8::MAX;
        for seen in self.counted.iter_mut() {
            if seen.orientation != orientation {
                continue;
            }
            if same(&seen.point, &point) {
                seen.counts.merge(counts);
                return;
            }
            best = best.min(seen.rank);
        }
        if rank > best {
            return;
        }
        if rank < best {
            self.counted.retain(|s| s.orientation != orientation);
        }
        self.counted.push(Seen {
            point,
            orientation,
            rank,
            counts: *counts,
            icmp_type: observation.tuple.icmp_type,
        });
    }

    /// Replaces every point with the shared copy from `points` (after a restore).
    pub fn intern(&mut self, points: &mut Points) {
        for point in self.points.iter_mut() {
            *point = points.intern(point);
        }
        for seen in self.counted.iter_mut() {
            seen.point = points.intern(&seen.point);
        }
    }

    /// The stitched flow of connection `key`, or `None` if nothing was observed. `decisions`
    /// carries what earlier intervals of this connection decided and takes what this one
    /// decides first.
    pub fn stitch(&self, key: ConnectionKey, decisions: &mut Decisions) -> Option<Flow> {
        if self.points.is_empty() {
            return None;
        }
        let forward = self.best(OrientationKey::Forward);
        let reverse = self.best(OrientationKey::Reverse);
        let (client_is_first, client_rule) = *decisions
            .client
            .get_or_insert_with(|| client(key, forward, reverse));
        // What is kept is the decided point's, or — no decision yet — the best rank's.
        for (chosen, best) in [
            (&mut decisions.forward_point, forward),
            (&mut decisions.reverse_point, reverse),
        ] {
            if chosen.is_none() {
                *chosen = best.map(|seen| seen.point.clone());
            }
        }
        let (to_server, to_client) = if client_is_first {
            (forward, reverse)
        } else {
            (reverse, forward)
        };
        let (client, server) = if client_is_first {
            (key.first, key.second)
        } else {
            (key.second, key.first)
        };
        let measured = |seen: Option<&Seen>| {
            seen.map(|seen| Measured {
                counts: seen.counts,
                point: seen.point.clone(),
            })
        };
        let mut points: Vec<Point> = self.points.to_vec();
        points.sort();
        Some(Flow {
            key,
            client: side(key.protocol, client),
            server: side(key.protocol, server),
            client_rule,
            client_to_server: measured(to_server),
            server_to_client: measured(to_client),
            points,
            start_unix_nanos: self.start_unix_nanos,
            end_unix_nanos: self.end_unix_nanos,
            end_reason: self.end_reason,
            translation: decisions.translation.as_deref().copied(),
        })
    }

    /// The counting point's observation of one direction: among those kept (one rank), the
    /// earliest first packet, then the smaller point.
    fn best(&self, orientation: OrientationKey) -> Option<&Seen> {
        self.counted
            .iter()
            .filter(|s| s.orientation == orientation)
            .min_by(|a, b| {
                let first = |s: &Seen| s.counts.first_seen_unix_nanos;
                first(a).cmp(&first(b)).then_with(|| a.point.cmp(&b.point))
            })
    }
}

/// Whether the key's first endpoint is the client, and the rule that says so; `forward` and
/// `reverse` are the counting points' observations.
fn client(
    key: ConnectionKey,
    forward: Option<&Seen>,
    reverse: Option<&Seen>,
) -> (bool, ClientRule) {
    // Each rule answers "does the forward direction come from the client?".
    let by_direction = |test: &dyn Fn(&Seen) -> Option<bool>| {
        forward
            .and_then(test)
            .or_else(|| reverse.and_then(test).map(|from_client| !from_client))
    };
    let protocol = key.protocol;
    if protocol == IPPROTO_TCP
        && let Some(first) =
            by_direction(&|s: &Seen| match s.counts.first_tcp_flags & (SYN | ACK) {
                SYN => Some(true),
                f if f == SYN | ACK => Some(false),
                _ => None,
            })
    {
        return (first, ClientRule::TcpHandshake);
    }
    if matches!(protocol, IPPROTO_ICMP | IPPROTO_ICMPV6) {
        let (requests, replies) = if protocol == IPPROTO_ICMP {
            (ICMP_V4_REQUESTS, ICMP_V4_REPLIES)
        } else {
            (ICMP_V6_REQUESTS, ICMP_V6_REPLIES)
        };
        let test = |s: &Seen| {
            if requests.contains(&s.icmp_type) {
                Some(true)
            } else if replies.contains(&s.icmp_type) {
                Some(false)
            } else {
                None
            }
        };
        if let Some(first) = by_direction(&test) {
            return (first, ClientRule::IcmpRequest);
        }
    }
    if has_ports(protocol) {
        let (a, b) = (key.first.port, key.second.port);
        if (a < 1024) != (b < 1024) {
            return (b < 1024, ClientRule::WellKnownPort);
        }
        let ephemeral = |p: u16| p >= EPHEMERAL_PORTS_START;
        if ephemeral(a) != ephemeral(b) {
            return (ephemeral(a), ClientRule::EphemeralPort);
        }
    }
    let first_seen = |s: Option<&Seen>| s.map_or(u64::MAX, |s| s.counts.first_seen_unix_nanos);
    (
        first_seen(forward) <= first_seen(reverse),
        ClientRule::FirstPacket,
    )
}

fn side(protocol: u8, endpoint: Endpoint) -> Side {
    Side {
        address: endpoint.address,
        port: if has_ports(protocol) {
            endpoint.port
        } else {
            0
        },
    }
}

/// Whether two points are one: the same copy (always, within one table), or equal.
fn same(a: &Point, b: &Point) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

fn has_ports(protocol: u8) -> bool {
    matches!(protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
}

/// The more final of two reasons: a close beats an idle end beats the rest; any final reason
/// beats `ActiveTimeout` (the connection goes on).
fn more_final(a: EndReason, b: EndReason) -> EndReason {
    let weight = |r: EndReason| match r {
        EndReason::TcpClose => 5,
        EndReason::IdleTimeout => 4,
        EndReason::TablePressure => 3,
        EndReason::AgentShutdown => 2,
        EndReason::ActiveTimeout => 1,
        EndReason::Unspecified => 0,
    };
    if weight(b) > weight(a) { b } else { a }
}

#[cfg(test)]
mod tests {
    use mermin_protocol::flow::v1::{Direction, FlowRecord};

    use super::*;

    /// A record builder: `from`/`to` as "addr:port".
    struct R(FlowRecord);

    fn r(node: &str, interface: &str, direction: Direction, from: &str, to: &str) -> R {
        let (src, sport) = split(from);
        let (dst, dport) = split(to);
        R(FlowRecord {
            node_name: node.into(),
            interface_name: interface.into(),
            direction: direction as i32,
            source_address: src,
            destination_address: dst,
            source_port: sport,
            destination_port: dport,
            ip_protocol: 6,
            end_reason: EndReason::TcpClose as i32,
            ..FlowRecord::default()
        })
    }

    fn split(s: &str) -> (Vec<u8>, u32) {
        let (ip, port) = s.rsplit_once(':').unwrap();
        let ip: std::net::Ipv4Addr = ip.parse().unwrap();
        (ip.octets().to_vec(), port.parse().unwrap())
    }

    impl R {
        fn counts(mut self, packets: u64, bytes: u64, first: u64, last: u64) -> R {
            self.0.delta_packets = packets;
            self.0.delta_octets = bytes;
            self.0.first_seen_unix_nanos = first;
            self.0.last_seen_unix_nanos = last;
            self
        }
        fn flags(mut self, first: u32, all: u32) -> R {
            self.0.first_tcp_flags = first;
            self.0.tcp_flags = all;
            self
        }
        fn proto(mut self, protocol: u32) -> R {
            self.0.ip_protocol = protocol;
            self
        }
        fn icmp(mut self, kind: u32) -> R {
            self.0.icmp_type = kind;
            self
        }
        fn reason(mut self, reason: EndReason) -> R {
            self.0.end_reason = reason as i32;
            self
        }
    }

    fn stitch(records: Vec<R>) -> Flow {
        let observations: Vec<Observation> = records
            .iter()
            .map(|r| Observation::try_from(&r.0).unwrap())
            .collect();
        for o in &observations {
            assert_eq!(o.key, observations[0].key, "records of one connection");
        }
        observe(&observations, &Decisions::default())
            .stitch(observations[0].key, &mut Decisions::default())
            .unwrap()
    }

    /// One interval's observations of one connection, added in order.
    fn observe(observations: &[Observation], decisions: &Decisions) -> Connection {
        let (kinds, mut points) = (InterfaceKinds::default(), Points::default());
        let mut connection = Connection::default();
        for o in observations {
            connection.add(o, points.intern(&o.point), decisions, &kinds);
        }
        connection
    }

    const C: &str = "10.0.1.5:51000";
    const S: &str = "10.0.2.7:443";
    use Direction::{Egress as Out, Ingress as In};

    #[test]
    fn cross_node_tcp_four_points_each_direction_counted_once() {
        let flow = stitch(vec![
            // Client node: the pod's veth (host end) and the uplink.
            r("node-c", "vethc1", In, C, S)
                .counts(10, 5_000, 100, 900)
                .flags(SYN, 0x1b),
            r("node-c", "eth0", Out, C, S)
                .counts(10, 5_000, 101, 901)
                .flags(SYN, 0x1b),
            r("node-c", "eth0", In, S, C)
                .counts(8, 90_000, 150, 950)
                .flags(SYN | ACK, 0x1b),
            r("node-c", "vethc1", Out, S, C)
                .counts(8, 90_000, 151, 951)
                .flags(SYN | ACK, 0x1b),
            // Server node: one client packet was lost on the way (9 arrive).
            r("node-s", "eth0", In, C, S)
                .counts(9, 4_500, 120, 920)
                .flags(SYN, 0x1b),
            r("node-s", "veths1", Out, C, S)
                .counts(9, 4_500, 121, 921)
                .flags(SYN, 0x1b),
            r("node-s", "veths1", In, S, C)
                .counts(8, 90_000, 130, 930)
                .flags(SYN | ACK, 0x1b),
            r("node-s", "eth0", Out, S, C)
                .counts(8, 90_000, 131, 931)
                .flags(SYN | ACK, 0x1b),
        ]);
        assert_eq!(flow.client_rule, ClientRule::TcpHandshake);
        assert_eq!(flow.client.address.to_string(), "10.0.1.5");
        assert_eq!((flow.client.port, flow.server.port), (51000, 443));
        let sent = flow.client_to_server.unwrap();
        assert_eq!((sent.counts.packets, sent.counts.bytes), (10, 5_000));
        assert_eq!(
            (sent.point.node.as_str(), sent.point.interface.as_str()),
            ("node-c", "vethc1")
        );
        let received = flow.server_to_client.unwrap();
        assert_eq!(
            (received.counts.packets, received.counts.bytes),
            (8, 90_000)
        );
        assert_eq!(
            (
                received.point.node.as_str(),
                received.point.interface.as_str()
            ),
            ("node-s", "veths1")
        );
        assert_eq!(flow.points.len(), 8);
        assert_eq!((flow.start_unix_nanos, flow.end_unix_nanos), (100, 951));
        assert_eq!(flow.end_reason, EndReason::TcpClose);
    }

    #[test]
    fn only_the_answer_seen_still_finds_the_client() {
        let flow = stitch(vec![
            r("node-s", "veths1", In, S, C)
                .counts(5, 7_000, 10, 20)
                .flags(SYN | ACK, 0x12),
        ]);
        assert_eq!(flow.client_rule, ClientRule::TcpHandshake);
        assert_eq!(flow.client.port, 51000);
        assert!(flow.client_to_server.is_none());
        assert_eq!(flow.server_to_client.unwrap().counts.bytes, 7_000);
    }

    #[test]
    fn mid_stream_flows_fall_back_to_ports() {
        let https = stitch(vec![
            r("n", "eth0", Out, S, C)
                .counts(3, 3_000, 5, 6)
                .flags(ACK, ACK),
        ]);
        assert_eq!(https.client_rule, ClientRule::WellKnownPort);
        assert_eq!((https.client.port, https.server.port), (51000, 443));
        let app = stitch(vec![
            r("n", "eth0", Out, "10.0.2.7:8080", "10.0.1.5:45000")
                .counts(1, 60, 5, 5)
                .flags(ACK, ACK),
        ]);
        assert_eq!(app.client_rule, ClientRule::EphemeralPort);
        assert_eq!((app.client.port, app.server.port), (45000, 8080));
    }

    #[test]
    fn udp_between_service_ports_uses_the_first_packet() {
        let flow = stitch(vec![
            r("n", "veth1", In, "10.0.0.2:5001", "10.0.0.1:5000")
                .proto(17)
                .counts(1, 100, 50, 50),
            r("n", "veth1", Out, "10.0.0.1:5000", "10.0.0.2:5001")
                .proto(17)
                .counts(1, 100, 40, 40),
        ]);
        assert_eq!(flow.client_rule, ClientRule::FirstPacket);
        assert_eq!((flow.client.port, flow.server.port), (5000, 5001));
    }

    #[test]
    fn icmp_echo_request_marks_the_client() {
        let flow = stitch(vec![
            r("n", "veth1", Out, "10.0.0.9:0", "10.0.0.3:0")
                .proto(1)
                .icmp(0)
                .counts(3, 252, 11, 31),
            r("n", "veth1", In, "10.0.0.3:0", "10.0.0.9:0")
                .proto(1)
                .icmp(8)
                .counts(3, 252, 10, 30),
        ]);
        assert_eq!(flow.client_rule, ClientRule::IcmpRequest);
        assert_eq!(flow.client.address.to_string(), "10.0.0.3");
        assert_eq!((flow.client.port, flow.server.port), (0, 0));
        assert_eq!(flow.client_to_server.unwrap().counts.packets, 3);
    }

    #[test]
    fn same_node_pods_count_at_the_sending_pods_veth() {
        let flow = stitch(vec![
            r("n", "vethp2", Out, C, S)
                .counts(7, 700, 2, 9)
                .flags(SYN, 0x1b),
            r("n", "vethp1", In, C, S)
                .counts(7, 700, 1, 8)
                .flags(SYN, 0x1b),
            r("n", "vethp2", In, S, C)
                .counts(6, 600, 3, 10)
                .flags(SYN | ACK, 0x1b),
            r("n", "vethp1", Out, S, C)
                .counts(6, 600, 4, 11)
                .flags(SYN | ACK, 0x1b),
        ]);
        assert_eq!(flow.client_to_server.unwrap().point.interface, "vethp1");
        assert_eq!(flow.server_to_client.unwrap().point.interface, "vethp2");
    }

    #[test]
    fn later_intervals_keep_the_client_and_the_counting_points() {
        let mut decisions = Decisions::default();
        let interval = |records: Vec<R>, decisions: &Decisions| {
            let observations: Vec<Observation> = records
                .iter()
                .map(|r| Observation::try_from(&r.0).unwrap())
                .collect();
            (observations[0].key, observe(&observations, decisions))
        };
        // Interval 0: only the host uplinks saw the handshake.
        let (key, first) = interval(
            vec![
                r("n", "eth0", Out, C, S)
                    .counts(3, 180, 1, 2)
                    .flags(SYN, SYN | ACK),
                r("n", "eth0", In, S, C)
                    .counts(2, 120, 1, 2)
                    .flags(SYN | ACK, SYN | ACK),
            ],
            &decisions,
        );
        let flow = first.stitch(key, &mut decisions).unwrap();
        assert_eq!(flow.client_rule, ClientRule::TcpHandshake);
        // Interval 1: no SYN, and a better-ranked pod veth appears; decisions hold.
        let (_, second) = interval(
            vec![
                r("n", "eth0", In, S, C)
                    .counts(5, 500, 3, 4)
                    .flags(ACK, ACK),
                r("n", "vethc1", In, C, S)
                    .counts(9, 900, 3, 4)
                    .flags(ACK, ACK),
                r("n", "eth0", Out, C, S)
                    .counts(9, 900, 3, 4)
                    .flags(ACK, ACK),
            ],
            &decisions,
        );
        let flow = second.stitch(key, &mut decisions).unwrap();
        assert_eq!(flow.client_rule, ClientRule::TcpHandshake);
        assert_eq!(flow.client.port, 51000);
        let sent = flow.client_to_server.unwrap();
        assert_eq!(
            (sent.point.interface.as_str(), sent.counts.packets),
            ("eth0", 9)
        );
        // Interval 2: the counting point of the answers has not reported yet: nothing counted.
        let (_, third) = interval(
            vec![
                r("n", "eth0", Out, C, S)
                    .counts(1, 60, 5, 5)
                    .flags(ACK, ACK),
            ],
            &decisions,
        );
        let flow = third.stitch(key, &mut decisions).unwrap();
        assert!(flow.server_to_client.is_none());
        assert_eq!(flow.client_to_server.unwrap().counts.packets, 1);
    }

    #[test]
    fn the_counting_point_does_not_depend_on_the_order_records_arrive_in() {
        // Two host-side egress points tie on rank; the earlier first packet wins, even though
        // its earliest record arrives last. The pod veth (better rank) arrives after both.
        let records = || {
            vec![
                r("n", "eth1", Out, C, S).counts(2, 200, 20, 29),
                r("n", "bond0", Out, C, S).counts(3, 300, 15, 25),
                r("n", "eth1", Out, C, S).counts(1, 100, 10, 11),
                r("n", "eth1", In, S, C).counts(4, 400, 30, 31),
            ]
        };
        let flow = stitch(records());
        let sent = flow.client_to_server.clone().unwrap();
        assert_eq!(
            (
                sent.point.interface.as_str(),
                sent.counts.packets,
                sent.counts.bytes
            ),
            ("eth1", 3, 300),
            "eth1's two records, first packet at 10"
        );
        let mut reversed = records();
        reversed.reverse();
        assert_eq!(stitch(reversed), flow);
        let mut with_veth = records();
        with_veth.push(r("n", "vethc1", In, C, S).counts(7, 700, 12, 13));
        let flow = stitch(with_veth);
        let sent = flow.client_to_server.unwrap();
        assert_eq!(
            (sent.point.interface.as_str(), sent.counts.packets),
            ("vethc1", 7)
        );
        assert_eq!(
            flow.points.len(),
            4,
            "every point that saw it, counted or not"
        );
        assert_eq!((flow.start_unix_nanos, flow.end_unix_nanos), (10, 31));
    }

    #[test]
    fn interim_records_of_one_point_add_up() {
        let flow = stitch(vec![
            r("n", "eth0", Out, C, S)
                .counts(4, 400, 1, 9)
                .flags(SYN, 0x12)
                .reason(EndReason::ActiveTimeout),
            r("n", "eth0", Out, C, S)
                .counts(6, 600, 10, 19)
                .flags(ACK, 0x11),
        ]);
        let sent = flow.client_to_server.unwrap();
        assert_eq!((sent.counts.packets, sent.counts.bytes), (10, 1_000));
        assert_eq!(sent.counts.first_tcp_flags, SYN);
        assert_eq!(flow.end_reason, EndReason::TcpClose);
    }
}
