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
//! **Stability.** The first interval of a connection fixes these decisions in its [`Connection`]; later
//! intervals keep them, so an interval without a SYN cannot flip client and server, and a
//! direction is counted at the same point for the connection's whole life. That makes the sum of
//! a direction's counts over all intervals exactly what that one point counted.

mod points;
mod stored;

use std::net::IpAddr;

use mermin_protocol::flow::v1::EndReason;
use serde::{Deserialize, Serialize};

use crate::{
    connection_key::{ConnectionKey, Endpoint, Orientation},
    observation::{Counts, Hook, Observation, ObservationPoint, Translation},
};

pub use points::{Point, PointId, Points};
pub(crate) use stored::StoredWriter;
pub use stored::{StoredConnection, StoredDecisions};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
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
    /// Every rule, in the order of their numbers.
    const ALL: [ClientRule; 5] = [
        ClientRule::TcpHandshake,
        ClientRule::IcmpRequest,
        ClientRule::WellKnownPort,
        ClientRule::EphemeralPort,
        ClientRule::FirstPacket,
    ];

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

/// A point that saw a connection: its node, its interface, and whether that is a pod's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reporter<'a> {
    pub node: &'a str,
    pub interface: &'a str,
    pub pod_side: bool,
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
    pub packets: u64,
    pub bytes: u64,
    /// Every TCP flag seen in this direction (8 bits).
    pub tcp_flags: u8,
    /// The flags of the first packet the point saw in this direction.
    pub first_tcp_flags: u8,
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

/// Index of a direction in a connection's per-direction arrays.
fn direction(orientation: Orientation) -> usize {
    match orientation {
        Orientation::Forward => 0,
        Orientation::Reverse => 1,
    }
}

/// What one point saw of one direction in the current interval: what stitching needs of a
/// record's [`Counts`] (the last packet's time is the connection's, not a point's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tally {
    point: PointId,
    packets: u64,
    bytes: u64,
    first_seen_unix_nanos: u64,
    tcp_flags: u8,
    first_tcp_flags: u8,
}

impl Tally {
    fn of(point: PointId, counts: &Counts) -> Tally {
        // Records are validated: TCP flags fit in 8 bits.
        Tally {
            point,
            packets: counts.packets,
            bytes: counts.bytes,
            first_seen_unix_nanos: counts.first_seen_unix_nanos,
            tcp_flags: counts.tcp_flags as u8,
            first_tcp_flags: counts.first_tcp_flags as u8,
        }
    }

    /// Adds a later record of the same direction at the same point.
    fn merge(&mut self, later: &Counts) {
        // Validated records cannot get near u64::MAX (see `MAX_BYTES_PER_SECOND`); saturate
        // rather than wrap all the same.
        self.packets = self.packets.saturating_add(later.packets);
        self.bytes = self.bytes.saturating_add(later.bytes);
        self.tcp_flags |= later.tcp_flags as u8;
        if later.first_seen_unix_nanos < self.first_seen_unix_nanos {
            self.first_seen_unix_nanos = later.first_seen_unix_nanos;
            self.first_tcp_flags = later.first_tcp_flags as u8;
        }
    }
}

/// The client decision in one byte: undecided, or whether the key's first endpoint is the
/// client and the rule that says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ClientDecision(u8);

impl ClientDecision {
    fn of((first_is_client, rule): (bool, ClientRule)) -> Self {
        Self(1 + 2 * rule as u8 + u8::from(first_is_client))
    }

    fn get(self) -> Option<(bool, ClientRule)> {
        let value = self.0.checked_sub(1)?;
        Some((value & 1 == 1, ClientRule::ALL[usize::from(value >> 1)]))
    }
}

/// What a connection rarely has, kept apart so that the common connection stays small.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Rare {
    /// Counts of points that tie with a direction's kept point on rank (this interval).
    ties: Vec<(usize, Tally)>,
    /// The points that saw the connection in this interval beyond the first four.
    more_points: Vec<PointId>,
    /// The first translation a record reported (for the connection's life).
    translation: Option<Translation>,
}

/// One connection as the flow table keeps it: the observations of its current interval, reduced
/// as they arrive to what stitching needs — per direction only the counts of the point that can
/// still be the counting point (the decided one; before a decision, the best rank's so far, with
/// any ties in [`Rare`] — counts are never summed across points, so the others' would be dropped
/// anyway), of every point only that it saw the connection — and what its first interval decided,
/// kept for its life (see the module docs).
///
/// This is the flow table's entry, so its layout is its cost: per-direction values are arrays
/// indexed by [`direction`], points are [`PointId`]s, and nothing is padded (112 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The current interval's first and last packet at any point.
    start_unix_nanos: u64,
    end_unix_nanos: u64,
    /// Per direction, the kept point's counts (nothing kept: `counted_at` is `NONE`).
    packets: [u64; 2],
    bytes: [u64; 2],
    first_seen_unix_nanos: [u64; 2],
    counted_at: [PointId; 2],
    tcp_flags: [u8; 2],
    first_tcp_flags: [u8; 2],
    /// The first four points that saw the connection in this interval; `NONE` after the last.
    points: [PointId; 4],
    /// Bit `i`: the `i`th point sent a final record in this interval (the first eight points).
    finals: u8,
    /// The most final reason of this interval, as its number.
    end_reason: u8,
    /// For the connection's life: each direction's counting point, once decided.
    decided_at: [PointId; 2],
    client: ClientDecision,
    rare: Option<Box<Rare>>,
}

impl Default for Connection {
    fn default() -> Self {
        Connection {
            start_unix_nanos: 0,
            end_unix_nanos: 0,
            packets: [0; 2],
            bytes: [0; 2],
            first_seen_unix_nanos: [0; 2],
            counted_at: [PointId::NONE; 2],
            tcp_flags: [0; 2],
            first_tcp_flags: [0; 2],
            points: [PointId::NONE; 4],
            finals: 0,
            end_reason: EndReason::Unspecified as u8,
            decided_at: [PointId::NONE; 2],
            client: ClientDecision::default(),
            rare: None,
        }
    }
}

impl Connection {
    /// Whether no point saw the connection in this interval.
    pub fn is_empty(&self) -> bool {
        self.points[0].is_none()
    }

    /// Whether every point that saw the connection in this interval has sent its final record.
    pub fn is_final_everywhere(&self) -> bool {
        let seen = self.point_ids().count();
        seen > 0 && seen <= 8 && u32::from(self.finals) == (1u32 << seen) - 1
    }

    /// The points that saw the connection in this interval, as early completion asks of them.
    pub fn reporters<'a>(&'a self, points: &'a Points) -> impl Iterator<Item = Reporter<'a>> {
        self.point_ids().map(|id| {
            let point = points.get(id);
            Reporter {
                node: point.node.as_str(),
                interface: point.interface.as_str(),
                pod_side: points.is_pod_side(id),
            }
        })
    }

    /// Whether `point` counts, or may yet count, the direction `orientation` of this connection:
    /// it is the direction's decided point, or no point was decided for it (no record of that
    /// direction came before the connection was emitted complete).
    pub fn counts_at(&self, point: PointId, orientation: Orientation) -> bool {
        let decided = self.decided_at[direction(orientation)];
        decided.is_none() || decided == point
    }

    /// Keeps the connection's translation; the first one reported stands.
    pub fn note_translation(&mut self, translation: Option<&Translation>) {
        if let Some(t) = translation {
            let rare = self.rare.get_or_insert_default();
            if rare.translation.is_none() {
                rare.translation = Some(*t);
            }
        }
    }

    /// Adds an observation of this connection seen at `point` (its id in `points`), keeping what
    /// the decisions and the points' ranks may still count.
    pub fn add(&mut self, observation: &Observation, point: PointId, points: &Points) {
        let counts = &observation.counts;
        if self.is_empty() {
            self.start_unix_nanos = counts.first_seen_unix_nanos;
            self.end_unix_nanos = counts.last_seen_unix_nanos;
            self.end_reason = observation.end_reason as u8;
        } else {
            self.start_unix_nanos = self.start_unix_nanos.min(counts.first_seen_unix_nanos);
            self.end_unix_nanos = self.end_unix_nanos.max(counts.last_seen_unix_nanos);
            self.end_reason = more_final(self.end_reason(), observation.end_reason) as u8;
        }
        let index = self.note_point(point);
        if observation.end_reason != EndReason::ActiveTimeout && index < 8 {
            self.finals |= 1 << index;
        }
        let d = direction(observation.orientation);
        let decided = self.decided_at[d];
        let rank = if decided.is_none() {
            points.rank(point)
        } else if decided == point {
            0
        } else {
            return; // counted at another point
        };
        let Some(mut kept) = self.tally(d) else {
            self.set_tally(d, Tally::of(point, counts));
            return;
        };
        if kept.point == point {
            kept.merge(counts);
            self.set_tally(d, kept);
            return;
        }
        if let Some(rare) = &mut self.rare
            && let Some((_, tie)) = rare
                .ties
                .iter_mut()
                .find(|(td, t)| *td == d && t.point == point)
        {
            tie.merge(counts);
            return;
        }
        // Every point kept for a direction has one rank: the kept one's (0 if decided, and then
        // `point` was the decided one and merged above).
        let best = points.rank(kept.point);
        if rank > best {
            return;
        }
        if rank < best {
            self.set_tally(d, Tally::of(point, counts));
            if let Some(rare) = &mut self.rare {
                rare.ties.retain(|(td, _)| *td != d);
            }
        } else {
            let rare = self.rare.get_or_insert_default();
            rare.ties.push((d, Tally::of(point, counts)));
        }
    }

    /// The stitched flow of connection `key`, or `None` if nothing was observed in this interval.
    /// The connection's decisions are taken from earlier intervals, or made now.
    pub fn stitch(&mut self, key: ConnectionKey, points: &Points) -> Option<Flow> {
        if self.is_empty() {
            return None;
        }
        let forward = self.best(0, points);
        let reverse = self.best(1, points);
        let (client_is_first, client_rule) = match self.client.get() {
            Some(decided) => decided,
            None => {
                let decided = client(key, forward.as_ref(), reverse.as_ref());
                self.client = ClientDecision::of(decided);
                decided
            }
        };
        // What is kept is the decided point's, or — no decision yet — the best rank's.
        for (decided, best) in self.decided_at.iter_mut().zip([forward, reverse]) {
            if decided.is_none()
                && let Some(best) = best
            {
                *decided = best.point;
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
        let measured = |tally: Option<Tally>| {
            tally.map(|t| Measured {
                packets: t.packets,
                bytes: t.bytes,
                tcp_flags: t.tcp_flags,
                first_tcp_flags: t.first_tcp_flags,
                point: points.get(t.point).clone(),
            })
        };
        let mut seen: Vec<Point> = self.point_ids().map(|id| points.get(id).clone()).collect();
        seen.sort();
        Some(Flow {
            key,
            client: side(key.protocol, client),
            server: side(key.protocol, server),
            client_rule,
            client_to_server: measured(to_server),
            server_to_client: measured(to_client),
            points: seen,
            start_unix_nanos: self.start_unix_nanos,
            end_unix_nanos: self.end_unix_nanos,
            end_reason: self.end_reason(),
            translation: self.rare.as_ref().and_then(|r| r.translation),
        })
    }

    /// Empties the current interval; what the connection decided stays.
    pub fn next_interval(&mut self) {
        let rare = self.rare.take().and_then(|mut rare| {
            rare.ties.clear();
            rare.more_points.clear();
            rare.translation.is_some().then_some(rare)
        });
        *self = Connection {
            decided_at: self.decided_at,
            client: self.client,
            rare,
            ..Connection::default()
        };
    }

    /// Calls `mark` with every point the connection refers to.
    pub fn mark_points(&self, mark: &mut dyn FnMut(PointId)) {
        let rare = self.rare.as_deref();
        self.counted_at
            .iter()
            .chain(&self.decided_at)
            .copied()
            .filter(|id| !id.is_none())
            .chain(self.point_ids())
            .chain(
                rare.into_iter()
                    .flat_map(|r| r.ties.iter().map(|(_, t)| t.point)),
            )
            .for_each(mark);
    }

    /// Replaces every point id with `map(id)` (moving the connection to another table).
    pub fn map_points(&mut self, map: &mut dyn FnMut(PointId) -> PointId) {
        for id in self
            .counted_at
            .iter_mut()
            .chain(&mut self.decided_at)
            .chain(&mut self.points)
            .filter(|id| !id.is_none())
        {
            *id = map(*id);
        }
        if let Some(rare) = &mut self.rare {
            for id in rare
                .more_points
                .iter_mut()
                .chain(rare.ties.iter_mut().map(|(_, t)| &mut t.point))
            {
                *id = map(*id);
            }
        }
    }

    fn end_reason(&self) -> EndReason {
        EndReason::try_from(i32::from(self.end_reason)).unwrap_or(EndReason::Unspecified)
    }

    /// The points that saw the connection in this interval, in the order they first did.
    fn point_ids(&self) -> impl Iterator<Item = PointId> + '_ {
        let more = self.rare.as_deref().map_or(&[][..], |r| &r.more_points[..]);
        self.points
            .iter()
            .copied()
            .take_while(|id| !id.is_none())
            .chain(more.iter().copied())
    }

    /// The position of `point` among the points of this interval, added if it is new.
    fn note_point(&mut self, point: PointId) -> usize {
        for (index, slot) in self.points.iter_mut().enumerate() {
            if *slot == point {
                return index;
            }
            if slot.is_none() {
                *slot = point;
                return index;
            }
        }
        let more = &mut self.rare.get_or_insert_default().more_points;
        let index = match more.iter().position(|&p| p == point) {
            Some(index) => index,
            None => {
                more.push(point);
                more.len() - 1
            }
        };
        self.points.len() + index
    }

    /// The kept counts of direction `d`.
    fn tally(&self, d: usize) -> Option<Tally> {
        (!self.counted_at[d].is_none()).then(|| Tally {
            point: self.counted_at[d],
            packets: self.packets[d],
            bytes: self.bytes[d],
            first_seen_unix_nanos: self.first_seen_unix_nanos[d],
            tcp_flags: self.tcp_flags[d],
            first_tcp_flags: self.first_tcp_flags[d],
        })
    }

    fn set_tally(&mut self, d: usize, tally: Tally) {
        self.counted_at[d] = tally.point;
        self.packets[d] = tally.packets;
        self.bytes[d] = tally.bytes;
        self.first_seen_unix_nanos[d] = tally.first_seen_unix_nanos;
        self.tcp_flags[d] = tally.tcp_flags;
        self.first_tcp_flags[d] = tally.first_tcp_flags;
    }

    /// Every kept tally of direction `d`: the kept point's and its ties.
    fn tallies(&self, d: usize) -> impl Iterator<Item = Tally> + '_ {
        let ties = self.rare.as_deref().map_or(&[][..], |r| &r.ties[..]);
        self.tally(d)
            .into_iter()
            .chain(ties.iter().filter(move |(td, _)| *td == d).map(|(_, t)| *t))
    }

    /// The counting point's tally of direction `d`: among those kept (one rank), the earliest
    /// first packet, then the smaller point.
    fn best(&self, d: usize, points: &Points) -> Option<Tally> {
        self.tallies(d).min_by(|a, b| {
            a.first_seen_unix_nanos
                .cmp(&b.first_seen_unix_nanos)
                .then_with(|| points.get(a.point).cmp(points.get(b.point)))
        })
    }
}

/// Whether the key's first endpoint is the client, and the rule that says so; `forward` and
/// `reverse` are the counting points' tallies.
fn client(
    key: ConnectionKey,
    forward: Option<&Tally>,
    reverse: Option<&Tally>,
) -> (bool, ClientRule) {
    // Each rule answers "does the forward direction come from the client?", given a direction's
    // tally and the ICMP message type its sender sent (for ICMP the key's ports are the types:
    // each endpoint's port is the type it sends).
    let by_direction = |test: &dyn Fn(&Tally, u8) -> Option<bool>| {
        forward
            .and_then(|t| test(t, key.first.port as u8))
            .or_else(|| {
                reverse
                    .and_then(|t| test(t, key.second.port as u8))
                    .map(|from_client| !from_client)
            })
    };
    let protocol = key.protocol;
    if protocol == IPPROTO_TCP
        && let Some(first) = by_direction(&|t: &Tally, _| match t.first_tcp_flags & (SYN | ACK) {
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
        let test = |_: &Tally, icmp_type: u8| {
            if requests.contains(&icmp_type) {
                Some(true)
            } else if replies.contains(&icmp_type) {
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
    let first_seen = |t: Option<&Tally>| t.map_or(u64::MAX, |t| t.first_seen_unix_nanos);
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

/// Flows for the tests of the modules that take them.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::connection_key::Tuple;

    /// A TCP connection 10.0.1.5:51000 → 10.0.2.7:443 seen at one pod interface on each node
    /// (`node-c`, `node-s`): 12 packets and 2,400,000 bytes sent, 9 and 900 received.
    pub fn flow() -> Flow {
        let tuple = Tuple {
            protocol: 6,
            source: "10.0.1.5".parse().unwrap(),
            destination: "10.0.2.7".parse().unwrap(),
            source_port: 51000,
            destination_port: 443,
            icmp_type: 0,
            icmp_code: 0,
        };
        let point = |node: &str, interface: &str, hook| {
            std::sync::Arc::new(ObservationPoint {
                node: node.into(),
                interface: interface.into(),
                hook,
            })
        };
        let measured = |packets, bytes, tcp_flags, point| Measured {
            packets,
            bytes,
            tcp_flags,
            first_tcp_flags: 0x02,
            point,
        };
        Flow {
            key: ConnectionKey::of(&tuple).0,
            client: Side {
                address: tuple.source,
                port: 51000,
            },
            server: Side {
                address: tuple.destination,
                port: 443,
            },
            client_rule: ClientRule::TcpHandshake,
            client_to_server: Some(measured(
                12,
                2_400_000,
                0x1b,
                point("node-c", "vethc1", Hook::Ingress),
            )),
            server_to_client: Some(measured(
                9,
                900,
                0x12,
                point("node-s", "veths1", Hook::Ingress),
            )),
            points: vec![
                point("node-c", "vethc1", Hook::Ingress),
                point("node-s", "veths1", Hook::Ingress),
            ],
            start_unix_nanos: 1_000,
            end_unix_nanos: 9_500,
            end_reason: EndReason::TcpClose,
            translation: None,
        }
    }
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
        fn flags(mut self, first: u8, all: u8) -> R {
            self.0.first_tcp_flags = u32::from(first);
            self.0.tcp_flags = u32::from(all);
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

    /// One connection's observations, interval after interval, as a flow table adds them.
    struct Intervals {
        points: Points,
        kinds: InterfaceKinds,
        connection: Connection,
    }

    impl Intervals {
        fn new() -> Self {
            Intervals {
                points: Points::default(),
                kinds: InterfaceKinds::default(),
                connection: Connection::default(),
            }
        }

        /// The next interval: `records` added in order, stitched.
        fn interval(&mut self, records: Vec<R>) -> Flow {
            let observations: Vec<Observation> = records
                .iter()
                .map(|r| Observation::try_from(&r.0).unwrap())
                .collect();
            for o in &observations {
                assert_eq!(o.key, observations[0].key, "records of one connection");
                let point = self.points.intern(&o.point, &self.kinds);
                self.connection.add(o, point, &self.points);
            }
            let flow = self
                .connection
                .stitch(observations[0].key, &self.points)
                .unwrap();
            self.connection.next_interval();
            flow
        }
    }

    fn stitch(records: Vec<R>) -> Flow {
        Intervals::new().interval(records)
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
        assert_eq!((sent.packets, sent.bytes), (10, 5_000));
        assert_eq!(
            (sent.point.node.as_str(), sent.point.interface.as_str()),
            ("node-c", "vethc1")
        );
        let received = flow.server_to_client.unwrap();
        assert_eq!((received.packets, received.bytes), (8, 90_000));
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
        assert_eq!(flow.server_to_client.unwrap().bytes, 7_000);
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
        assert_eq!(flow.client_to_server.unwrap().packets, 3);
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
        let mut connection = Intervals::new();
        // Interval 0: only the host uplinks saw the handshake.
        let flow = connection.interval(vec![
            r("n", "eth0", Out, C, S)
                .counts(3, 180, 1, 2)
                .flags(SYN, SYN | ACK),
            r("n", "eth0", In, S, C)
                .counts(2, 120, 1, 2)
                .flags(SYN | ACK, SYN | ACK),
        ]);
        assert_eq!(flow.client_rule, ClientRule::TcpHandshake);
        // Interval 1: no SYN, and a better-ranked pod veth appears; decisions hold.
        let flow = connection.interval(vec![
            r("n", "eth0", In, S, C)
                .counts(5, 500, 3, 4)
                .flags(ACK, ACK),
            r("n", "vethc1", In, C, S)
                .counts(9, 900, 3, 4)
                .flags(ACK, ACK),
            r("n", "eth0", Out, C, S)
                .counts(9, 900, 3, 4)
                .flags(ACK, ACK),
        ]);
        assert_eq!(flow.client_rule, ClientRule::TcpHandshake);
        assert_eq!(flow.client.port, 51000);
        let sent = flow.client_to_server.unwrap();
        assert_eq!((sent.point.interface.as_str(), sent.packets), ("eth0", 9));
        // Interval 2: the counting point of the answers has not reported yet: nothing counted.
        let flow = connection.interval(vec![
            r("n", "eth0", Out, C, S)
                .counts(1, 60, 5, 5)
                .flags(ACK, ACK),
        ]);
        assert!(flow.server_to_client.is_none());
        assert_eq!(flow.client_to_server.unwrap().packets, 1);
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
            (sent.point.interface.as_str(), sent.packets, sent.bytes),
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
        assert_eq!((sent.point.interface.as_str(), sent.packets), ("vethc1", 7));
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
        assert_eq!((sent.packets, sent.bytes), (10, 1_000));
        assert_eq!(sent.first_tcp_flags, SYN);
        assert_eq!(flow.end_reason, EndReason::TcpClose);
    }
}
