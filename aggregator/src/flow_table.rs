//! The flow table: every open connection, its current interval, and when that interval becomes
//! a span. Pure and clock-free: callers pass the current Unix time.
//!
//! **When.** The first record of an interval starts its settle timer; when it expires the interval
//! is stitched and emitted, so records of the same moment from the other observation points
//! (other nodes report on their own scan schedules) land in the same span. An interval that
//! contains a final record (close, idle, pressure, shutdown) ends the connection. It is emitted
//! at once, without waiting for the settle timer, when it is complete: every point that saw it
//! sent its final record, and the nodes its ends live on ([`EndNodes`]: for at least one end a
//! node is known) are among those points' nodes. An end whose node is unknown is taken to be
//! outside the cluster (no agent will report it); the settle time stays the upper bound for
//! everything else.
//!
//! **Persistence.** The table records which connections changed ([`FlowTable::take_changes`]);
//! the pipeline writes those, serialized, in the same store transaction as the spans they
//! produced, and [`FlowTable::restore`] rebuilds the table after a restart.
//!
//! **Connections on a reused 5-tuple.** A key can carry one connection after another (busy
//! clients reuse ports). A record that starts a new flow at its point ([`Observation::starts_flow`];
//! for TCP with a SYN among its first flags) after the key's connection ended and after that
//! connection's last packet begins a new connection: it gets its own state, start and so trace
//! id. The earlier connection stays (`Tracked::previous`) until its grace period is over: its
//! own records that arrive later go to it by their flow start, which lies before its last
//! packet. That needs node clocks to agree within `TCP_REUSE_GAP_NANOS`
//! (10 ms; NTP and chrony do far better), and a tuple reused no sooner than that.
//!
//! **Late records.** A closed connection is remembered for a grace period. A late record from a
//! point that counts one of its directions opens one more interval (so totals stay exact); a late
//! record from any other point is ignored and counted, since its packets are already counted
//! elsewhere.

use std::{num::NonZeroU64, time::Duration};

use foldhash::{HashMap, HashMapExt};

use mermin_protocol::flow::v1::EndReason;
use serde::{Deserialize, Serialize};

use crate::{
    connection_key::ConnectionKey,
    observation::{Observation, Points},
    stitch::{Connection, Decisions, Flow, InterfaceKinds},
    store::Change,
};

const IPPROTO_TCP: u8 = 6;
const SYN: u32 = 0x02;
/// How much later than an ended TCP connection's last packet a SYN must open a flow to begin a
/// new connection: more than node clocks disagree (and a packet takes from one node to the
/// other), less than a tuple takes to be reused (TIME_WAIT takes a new SYN only with a newer
/// millisecond timestamp; a client's kernel cycles through ~28k ports).
const TCP_REUSE_GAP_NANOS: u64 = 10_000_000;
/// The same for other protocols, which have no SYN: an agent starts a new flow on their key only
/// after its idle timeout (seconds), so the gap can be long.
const REUSE_GAP_NANOS: u64 = 1_000_000_000;

/// Where the ends of connections live, for emitting complete intervals at once (see the module
/// docs): implemented over the metadata index by the shards.
pub trait EndNodes {
    /// Whether at least one end of `key` has a known node at `at_unix_nanos`, and every known
    /// end's node is among `reporting`.
    fn all_reported(
        &self,
        key: &ConnectionKey,
        at_unix_nanos: u64,
        reporting: &mut dyn Iterator<Item = &str>,
    ) -> bool;
}

/// Knows no end's node: every interval waits for its settle time.
pub struct NoEndNodes;

impl EndNodes for NoEndNodes {
    fn all_reported(&self, _: &ConnectionKey, _: u64, _: &mut dyn Iterator<Item = &str>) -> bool {
        false
    }
}

/// Where an interval sits in its connection's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    /// First packet of the connection (the first interval's start); constant for its life.
    pub connection_start_unix_nanos: u64,
    /// 0 for the connection's first interval, then 1, 2, ...
    pub index: u64,
}

/// One interval of one connection, ready to become spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    pub flow: Flow,
    pub interval: Interval,
}

/// A connection's state (stored as `(key, state)`). Its times are never 0 (records with a time
/// of 0 are refused), so the optional ones take no more room than a `u64`; they are stored as
/// `Option<u64>`.
#[derive(Debug, Serialize, Deserialize)]
struct Tracked {
    connection: Connection,
    decisions: Decisions,
    /// Start of the connection's first interval.
    start_unix_nanos: Option<NonZeroU64>,
    /// Index of the current interval.
    index: u64,
    /// When the current interval is emitted; `None` while it is empty.
    due_unix_nanos: Option<NonZeroU64>,
    /// The current interval holds a final record.
    closing: bool,
    /// Changed since the table last handed out its changes (kept by the head of a key's chain,
    /// which stands for the chain). A flag rather than a set of keys beside the table: it fits
    /// in this struct's padding.
    #[serde(skip)]
    changed: bool,
    /// Closed: kept until this time for late records.
    closed_until: Option<NonZeroU64>,
    /// The latest packet of the connection at any point.
    last_packet_unix_nanos: u64,
    /// The connection this key carried before this one, while it is remembered.
    previous: Option<Box<Tracked>>,
}

impl Tracked {
    fn new() -> Self {
        Tracked {
            connection: Connection::default(),
            decisions: Decisions::default(),
            start_unix_nanos: None,
            index: 0,
            due_unix_nanos: None,
            closing: false,
            changed: false,
            closed_until: None,
            last_packet_unix_nanos: 0,
            previous: None,
        }
    }

    fn intern(&mut self, points: &mut Points) {
        self.connection.intern(points);
        self.decisions.intern(points);
        if let Some(previous) = &mut self.previous {
            previous.intern(points);
        }
    }

    /// Makes the current interval due no later than `latest`.
    fn due_no_later_than_this(&mut self, latest: u64) {
        if let Some(due) = &mut self.due_unix_nanos {
            *due = (*due).min(nanos(latest));
        }
    }

    /// Moves every pending interval of the chain to `latest` if it is due later (after a restore).
    fn due_no_later_than(&mut self, latest: u64) {
        self.due_no_later_than_this(latest);
        if let Some(previous) = &mut self.previous {
            previous.due_no_later_than(latest);
        }
    }

    /// Whether `observation` begins a new connection on this key (see the module docs).
    fn is_followed_by(&self, observation: &Observation) -> bool {
        let opens = observation.key.protocol != IPPROTO_TCP
            || observation.counts.first_tcp_flags & SYN != 0;
        observation.starts_flow
            && opens
            && (self.closing || self.closed_until.is_some())
            && !self.ended_after(observation)
    }

    /// Whether this connection's last packet is no earlier than `observation`'s flow began, give
    /// or take the reuse gap: then the observation is part of it.
    fn ended_after(&self, observation: &Observation) -> bool {
        let gap = if observation.key.protocol == IPPROTO_TCP {
            TCP_REUSE_GAP_NANOS
        } else {
            REUSE_GAP_NANOS
        };
        observation.flow_start_unix_nanos <= self.last_packet_unix_nanos.saturating_add(gap)
    }

    /// The connection of this key's chain that `observation` belongs to: the earliest one that
    /// had not ended before the observation's flow began.
    fn owner_of(&mut self, observation: &Observation) -> &mut Tracked {
        let mut depth = 0;
        let mut walk = &*self;
        while let Some(previous) = &walk.previous
            && previous.ended_after(observation)
        {
            walk = previous;
            depth += 1;
        }
        let mut owner = self;
        for _ in 0..depth {
            owner = owner
                .previous
                .as_deref_mut()
                .expect("the chain walked above");
        }
        owner
    }

    /// Adds `observation` to this connection; false if it was a late record nobody needs.
    fn apply(
        &mut self,
        observation: &Observation,
        points: &mut Points,
        kinds: &InterfaceKinds,
        due: u64,
    ) -> bool {
        if self.closed_until.is_some() {
            if !self
                .decisions
                .counts_at(&observation.point, observation.orientation)
            {
                return false;
            }
            // A counting point's late record: one more (final) interval.
            self.closed_until = None;
            self.closing = true;
        }
        let point = points.intern(&observation.point);
        self.decisions
            .note_translation(observation.translation.as_ref());
        self.connection
            .add(observation, point, &self.decisions, kinds);
        if observation.end_reason != EndReason::ActiveTimeout {
            self.closing = true;
        }
        self.last_packet_unix_nanos = self
            .last_packet_unix_nanos
            .max(observation.counts.last_seen_unix_nanos);
        self.due_unix_nanos.get_or_insert(nanos(due));
        true
    }

    /// Emits the due intervals of this connection and of the earlier ones it remembers, earliest
    /// first, and forgets the earlier ones whose grace period is over. True if anything changed.
    fn emit_due(
        &mut self,
        key: ConnectionKey,
        now: u64,
        grace: u64,
        out: &mut Vec<Emitted>,
    ) -> bool {
        let mut changed = false;
        if let Some(previous) = &mut self.previous {
            changed |= previous.emit_due(key, now, grace, out);
            if previous.is_forgotten(now) {
                self.previous = previous.previous.take();
                changed = true;
            }
        }
        if self.closed_until.is_none() && self.due_unix_nanos.is_some_and(|due| due.get() <= now) {
            emit(key, self, now, grace, out);
            changed = true;
        }
        changed
    }

    /// Emits every interval of the chain that holds anything (shutdown). True if any did.
    fn flush(&mut self, key: ConnectionKey, now: u64, grace: u64, out: &mut Vec<Emitted>) -> bool {
        let mut changed = false;
        if let Some(previous) = &mut self.previous {
            changed |= previous.flush(key, now, grace, out);
        }
        if self.closed_until.is_none() && self.due_unix_nanos.is_some() {
            emit(key, self, now, grace, out);
            changed = true;
        }
        changed
    }

    fn is_forgotten(&self, now: u64) -> bool {
        self.closed_until.is_some_and(|until| until.get() <= now)
    }
}

pub struct FlowTable {
    open: HashMap<ConnectionKey, Tracked>,
    /// Keys whose connections were forgotten since the last `take_changes`, in that order
    /// (changed connections are flagged in the table: `Tracked::changed`).
    forgotten: Vec<ConnectionKey>,
    /// The observation points the connections refer to, one copy each.
    points: Points,
    kinds: InterfaceKinds,
    settle_ns: u64,
    /// How long a closed connection is remembered.
    grace_ns: u64,
    late_ignored: u64,
    reused_keys: u64,
    complete_early: u64,
}

impl FlowTable {
    pub fn new(kinds: InterfaceKinds, settle: Duration, grace: Duration) -> Self {
        Self {
            open: HashMap::new(),
            forgotten: Vec::new(),
            points: Points::default(),
            kinds,
            settle_ns: settle.as_nanos() as u64,
            grace_ns: grace.as_nanos() as u64,
            late_ignored: 0,
            reused_keys: 0,
            complete_early: 0,
        }
    }

    /// Connections held (open or in their grace period).
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Late records of closed connections that were not needed (see the module docs).
    pub fn late_ignored(&self) -> u64 {
        self.late_ignored
    }

    /// Connections that began on the key of an earlier one (see the module docs).
    pub fn reused_keys(&self) -> u64 {
        self.reused_keys
    }

    /// Final intervals made due before their settle time because they were complete.
    pub fn complete_early(&self) -> u64 {
        self.complete_early
    }

    /// Adds `observation`; its interval waits for the settle time.
    pub fn apply(&mut self, observation: &Observation, now: u64) {
        self.apply_knowing(observation, now, &NoEndNodes);
    }

    /// Adds `observation`; its interval is due at once if that makes it complete (see the
    /// module docs).
    pub fn apply_knowing(&mut self, observation: &Observation, now: u64, ends: &dyn EndNodes) {
        let tracked = self
            .open
            .entry(observation.key)
            .or_insert_with(Tracked::new);
        if tracked.is_followed_by(observation) {
            let earlier = std::mem::replace(tracked, Tracked::new());
            tracked.previous = Some(Box::new(earlier));
            tracked.changed = true;
            self.reused_keys += 1;
        }
        let owner = tracked.owner_of(observation);
        if owner.apply(
            observation,
            &mut self.points,
            &self.kinds,
            now + self.settle_ns,
        ) {
            if observation.end_reason != EndReason::ActiveTimeout
                && owner.connection.is_final_everywhere()
                && ends.all_reported(
                    &observation.key,
                    observation.flow_start_unix_nanos,
                    &mut owner.connection.reporting_nodes(),
                )
            {
                owner.due_no_later_than_this(now);
                self.complete_early += 1;
            }
            tracked.changed = true;
        } else {
            self.late_ignored += 1;
        }
    }

    /// Emits every interval whose settle time has come, and forgets connections whose grace
    /// period is over.
    pub fn emit_due(&mut self, now: u64, out: &mut Vec<Emitted>) {
        let (grace, forgotten) = (self.grace_ns, &mut self.forgotten);
        self.open.retain(|key, tracked| {
            if tracked.emit_due(*key, now, grace, out) {
                tracked.changed = true;
            }
            if !tracked.is_forgotten(now) {
                return true;
            }
            match tracked.previous.take() {
                Some(previous) => {
                    *tracked = *previous;
                    tracked.changed = true;
                    true
                }
                None => {
                    forgotten.push(*key);
                    false
                }
            }
        });
    }

    /// Emits every interval that holds anything, now (shutdown).
    pub fn flush(&mut self, now: u64, out: &mut Vec<Emitted>) {
        for (key, tracked) in &mut self.open {
            if tracked.flush(*key, now, self.grace_ns, out) {
                tracked.changed = true;
            }
        }
    }

    /// The connections changed since the last call, serialized for the store: the forgotten
    /// ones first (a key forgotten and then taken by a new connection ends with its state).
    pub fn take_changes(&mut self) -> Result<Vec<Change>, postcard::Error> {
        let mut changes = self
            .forgotten
            .iter()
            .map(|key| {
                Ok(Change {
                    key: postcard::to_allocvec(key)?,
                    state: None,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut failed = None;
        for (key, tracked) in self.open.iter_mut().filter(|(_, t)| t.changed) {
            match postcard::to_allocvec(key)
                .and_then(|k| Ok((k, postcard::to_allocvec(&(key, &*tracked))?)))
            {
                Ok((key, state)) => {
                    changes.push(Change {
                        key,
                        state: Some(state),
                    });
                    tracked.changed = false;
                }
                Err(err) => {
                    failed = Some(err);
                    break;
                }
            }
        }
        if let Some(err) = failed {
            // Every change stays pending for the next checkpoint (and states taken already
            // are written again with it, which changes nothing).
            for tracked in self.open.values_mut() {
                tracked.changed = true;
            }
            return Err(err);
        }
        self.forgotten.clear();
        Ok(changes)
    }

    /// Divides the table into `parts` tables by `part_of(key)` (each keeps its connections'
    /// unsaved changes), for the shards after a recovery.
    pub fn split(self, parts: usize, part_of: impl Fn(&ConnectionKey) -> usize) -> Vec<FlowTable> {
        let mut tables: Vec<FlowTable> = (0..parts)
            .map(|_| FlowTable {
                open: HashMap::new(),
                forgotten: Vec::new(),
                points: Points::default(),
                kinds: self.kinds.clone(),
                settle_ns: self.settle_ns,
                grace_ns: self.grace_ns,
                late_ignored: 0,
                reused_keys: 0,
                complete_early: 0,
            })
            .collect();
        for (key, mut tracked) in self.open {
            let table = &mut tables[part_of(&key)];
            tracked.intern(&mut table.points);
            table.open.insert(key, tracked);
        }
        for key in self.forgotten {
            tables[part_of(&key)].forgotten.push(key);
        }
        tables
    }

    /// Rebuilds the table from stored states; returns how many connections it holds. Pending
    /// intervals are due no later than this table's settle time from `now` (the settle time may
    /// have been shortened since they were stored).
    pub fn restore(
        &mut self,
        states: impl IntoIterator<Item = Vec<u8>>,
        now: u64,
    ) -> Result<usize, postcard::Error> {
        for bytes in states {
            let (key, mut tracked): (ConnectionKey, Tracked) = postcard::from_bytes(&bytes)?;
            tracked.due_no_later_than(now + self.settle_ns);
            tracked.intern(&mut self.points);
            self.open.insert(key, tracked);
        }
        Ok(self.open.len())
    }
}

/// A time as the state keeps it (never 0; see [`Tracked`]).
fn nanos(unix_nanos: u64) -> NonZeroU64 {
    NonZeroU64::new(unix_nanos).unwrap_or(NonZeroU64::MIN)
}

fn emit(key: ConnectionKey, tracked: &mut Tracked, now: u64, grace: u64, out: &mut Vec<Emitted>) {
    if let Some(flow) = tracked.connection.stitch(key, &mut tracked.decisions) {
        let start = tracked
            .start_unix_nanos
            .get_or_insert(nanos(flow.start_unix_nanos))
            .get();
        out.push(Emitted {
            flow,
            interval: Interval {
                connection_start_unix_nanos: start,
                index: tracked.index,
            },
        });
    }
    tracked.connection = Connection::default();
    tracked.index += 1;
    tracked.due_unix_nanos = None;
    if tracked.closing {
        tracked.closing = false;
        tracked.closed_until = Some(nanos(now + grace));
    }
}

#[cfg(test)]
mod tests {
    use mermin_protocol::flow::v1::{Direction, FlowRecord};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn observation(
        node: &str,
        interface: &str,
        outbound: bool,
        packets: u64,
        reason: EndReason,
    ) -> Observation {
        let (src, dst, sport, dport, direction) = if outbound {
            ([10, 0, 0, 1], [10, 0, 0, 2], 40000, 443, Direction::Egress)
        } else {
            ([10, 0, 0, 2], [10, 0, 0, 1], 443, 40000, Direction::Ingress)
        };
        Observation::try_from(&FlowRecord {
            node_name: node.into(),
            interface_name: interface.into(),
            direction: direction as i32,
            source_address: src.to_vec(),
            destination_address: dst.to_vec(),
            source_port: sport,
            destination_port: dport,
            ip_protocol: 6,
            delta_packets: packets,
            delta_octets: packets * 100,
            first_seen_unix_nanos: 10 * S,
            last_seen_unix_nanos: 11 * S,
            first_tcp_flags: if outbound { 0x02 } else { 0x12 },
            tcp_flags: 0x12,
            end_reason: reason as i32,
            ..FlowRecord::default()
        })
        .unwrap()
    }

    fn table() -> FlowTable {
        FlowTable::new(
            InterfaceKinds::default(),
            Duration::from_secs(3),
            Duration::from_secs(30),
        )
    }

    /// A new table holding the states of `changes` (one connection), as after a restart.
    fn restored(changes: Vec<Change>, now: u64) -> FlowTable {
        let mut after = table();
        let states = changes.into_iter().filter_map(|c| c.state);
        assert_eq!(after.restore(states, now).unwrap(), 1);
        after
    }

    #[test]
    fn records_within_the_settle_time_share_one_span() {
        let mut t = table();
        let mut out = Vec::new();
        t.apply(
            &observation("a", "eth0", true, 5, EndReason::TcpClose),
            100 * S,
        );
        t.emit_due(101 * S, &mut out);
        assert!(out.is_empty(), "emitted before the settle time");
        t.apply(
            &observation("b", "eth0", false, 4, EndReason::TcpClose),
            102 * S,
        );
        t.emit_due(103 * S, &mut out);
        assert_eq!(out.len(), 1);
        let flow = &out[0].flow;
        assert_eq!(flow.client_to_server.as_ref().unwrap().counts.packets, 5);
        assert_eq!(flow.server_to_client.as_ref().unwrap().counts.packets, 4);
        assert_eq!(out[0].interval.index, 0);
        assert_eq!(out[0].interval.connection_start_unix_nanos, 10 * S);
    }

    /// 10.0.0.1 lives on node "a", 10.0.0.2 on `server_node` (if known).
    struct Ends {
        server_node: Option<&'static str>,
    }

    impl EndNodes for Ends {
        fn all_reported(
            &self,
            key: &ConnectionKey,
            _: u64,
            reporting: &mut dyn Iterator<Item = &str>,
        ) -> bool {
            let node = |address: std::net::IpAddr| match address.to_string().as_str() {
                "10.0.0.1" => Some("a"),
                _ => self.server_node,
            };
            let reporting: Vec<&str> = reporting.collect();
            [node(key.first.address), node(key.second.address)]
                .iter()
                .flatten()
                .all(|n| reporting.contains(n))
        }
    }

    #[test]
    fn a_final_interval_is_due_at_once_when_every_point_and_both_ends_have_reported() {
        let mut t = table();
        let mut out = Vec::new();
        let ends = Ends {
            server_node: Some("b"),
        };
        // Node a's two points are final, node b has not reported: wait.
        t.apply_knowing(
            &observation("a", "veth1", true, 5, EndReason::TcpClose),
            100 * S,
            &ends,
        );
        t.apply_knowing(
            &observation("a", "eth0", false, 4, EndReason::TcpClose),
            100 * S,
            &ends,
        );
        t.emit_due(100 * S, &mut out);
        assert!(out.is_empty(), "node b has not reported");
        // Node b: one point still active, then final.
        t.apply_knowing(
            &observation("b", "eth0", false, 4, EndReason::ActiveTimeout),
            100 * S + 1,
            &ends,
        );
        t.emit_due(100 * S + 1, &mut out);
        assert!(out.is_empty(), "a point of node b is not final");
        t.apply_knowing(
            &observation("b", "eth0", false, 0, EndReason::TcpClose),
            100 * S + 2,
            &ends,
        );
        t.emit_due(100 * S + 2, &mut out);
        assert_eq!(out.len(), 1, "complete: emitted without the settle time");
        assert_eq!(t.complete_early(), 1);
        let flow = &out[0].flow;
        assert_eq!(flow.client_to_server.as_ref().unwrap().counts.packets, 5);
        assert_eq!(flow.points.len(), 3);

        // The server's node unknown: taken to be outside, node a's finals complete it.
        let mut t = table();
        out.clear();
        t.apply_knowing(
            &observation("a", "eth0", true, 5, EndReason::TcpClose),
            100 * S,
            &Ends { server_node: None },
        );
        t.emit_due(100 * S, &mut out);
        assert_eq!(out.len(), 1);
        // Without end nodes: the settle time.
        let mut t = table();
        out.clear();
        t.apply_knowing(
            &observation("a", "eth0", true, 5, EndReason::TcpClose),
            100 * S,
            &NoEndNodes,
        );
        t.emit_due(102 * S, &mut out);
        assert!(out.is_empty());
        t.emit_due(103 * S, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn long_connections_emit_numbered_intervals_until_closed() {
        let mut t = table();
        let mut out = Vec::new();
        for (i, reason) in [
            EndReason::ActiveTimeout,
            EndReason::ActiveTimeout,
            EndReason::IdleTimeout,
        ]
        .into_iter()
        .enumerate()
        {
            let now = (100 + 60 * i as u64) * S;
            t.apply(&observation("a", "eth0", true, 10, reason), now);
            t.emit_due(now + 3 * S, &mut out);
        }
        assert_eq!(
            out.iter().map(|e| e.interval.index).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert!(
            out.iter()
                .all(|e| e.interval.connection_start_unix_nanos == 10 * S)
        );
        assert_eq!(out[2].flow.end_reason, EndReason::IdleTimeout);
        // Closed: the next emit after the grace period forgets it.
        t.emit_due(300 * S, &mut out);
        assert!(t.is_empty());
    }

    #[test]
    fn late_records_count_only_from_counting_points() {
        let mut t = table();
        let mut out = Vec::new();
        t.apply(
            &observation("a", "eth0", true, 5, EndReason::TcpClose),
            100 * S,
        );
        t.emit_due(103 * S, &mut out);
        assert_eq!(out.len(), 1);
        // Another point's view of the same packets, late: ignored.
        t.apply(
            &observation("b", "eth0", true, 5, EndReason::TcpClose),
            104 * S,
        );
        t.emit_due(110 * S, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(t.late_ignored(), 1);
        // The counting point's own late record: one more interval, so its total stays exact.
        t.apply(
            &observation("a", "eth0", true, 2, EndReason::TcpClose),
            111 * S,
        );
        t.emit_due(114 * S, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].interval.index, 1);
        assert_eq!(
            out[1]
                .flow
                .client_to_server
                .as_ref()
                .unwrap()
                .counts
                .packets,
            2
        );
    }

    #[test]
    fn a_restored_table_continues_where_it_stopped() {
        let mut before = table();
        let mut out = Vec::new();
        before.apply(
            &observation("a", "eth0", true, 5, EndReason::ActiveTimeout),
            100 * S,
        );
        before.emit_due(103 * S, &mut out);
        before.apply(
            &observation("a", "eth0", true, 7, EndReason::TcpClose),
            160 * S,
        );
        let changes = before.take_changes().unwrap();
        assert_eq!(changes.len(), 1);
        assert!(
            before.take_changes().unwrap().is_empty(),
            "changes are taken once"
        );

        let mut after = restored(changes, 160 * S);
        let mut resumed = Vec::new();
        after.emit_due(163 * S, &mut resumed);
        before.emit_due(163 * S, &mut out);
        assert_eq!(resumed.len(), 1);
        assert_eq!(
            resumed[0], out[1],
            "the restored table emits what the original would"
        );
        assert_eq!(resumed[0].interval.index, 1);
        // Forgetting a closed connection is a change too.
        after.take_changes().unwrap();
        after.emit_due(300 * S, &mut resumed);
        let forgotten = after.take_changes().unwrap();
        assert_eq!(forgotten.len(), 1);
        assert_eq!(forgotten[0].state, None);
    }

    #[test]
    fn a_key_forgotten_and_taken_again_before_a_checkpoint_ends_with_the_new_state() {
        let mut t = table();
        let mut out = Vec::new();
        t.apply(
            &observation("a", "eth0", true, 5, EndReason::TcpClose),
            100 * S,
        );
        t.emit_due(103 * S, &mut out);
        t.take_changes().unwrap();
        // Forgotten after the grace period, then the key carries a new connection.
        t.emit_due(200 * S, &mut out);
        assert!(t.is_empty());
        t.apply(
            &observation("a", "eth0", true, 9, EndReason::ActiveTimeout),
            200 * S,
        );
        let changes = t.take_changes().unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].state, None, "the removal first");
        assert_eq!(changes[0].key, changes[1].key);
        // Applied in order, as the store does: the new connection's state stays.
        let mut after = restored(changes, 200 * S);
        let mut resumed = Vec::new();
        after.emit_due(203 * S, &mut resumed);
        assert_eq!(resumed.len(), 1);
        assert_eq!(
            resumed[0]
                .flow
                .client_to_server
                .as_ref()
                .unwrap()
                .counts
                .packets,
            9
        );
        assert_eq!(resumed[0].interval.index, 0, "a connection of its own");
    }

    #[test]
    fn flush_emits_everything_pending() {
        let mut t = table();
        let mut out = Vec::new();
        t.apply(
            &observation("a", "eth0", true, 1, EndReason::ActiveTimeout),
            100 * S,
        );
        t.flush(100 * S, &mut out);
        assert_eq!(out.len(), 1);
    }

    /// A record of one direction of a connection on 10.0.0.1:40000 <-> 10.0.0.2:443 whose packets
    /// at its point ran from `first` to `last` seconds (and that began there at `first`).
    fn timed(node: &str, outbound: bool, packets: u64, first: u64, last: u64) -> Observation {
        let mut o = observation(node, "eth0", outbound, packets, EndReason::TcpClose);
        o.counts.first_seen_unix_nanos = first;
        o.counts.last_seen_unix_nanos = last;
        o.flow_start_unix_nanos = first;
        o
    }

    #[test]
    fn a_new_connection_on_a_reused_tuple_is_its_own_and_late_records_find_the_earlier_one() {
        let mut t = table();
        let mut out = Vec::new();
        // Connection 1: 10 s .. 11 s; node b sees its SYN 1 ms after node a.
        t.apply(&timed("a", true, 5, 10 * S, 11 * S), 100 * S);
        t.apply(&timed("b", false, 4, 10 * S + 1_000_000, 11 * S), 100 * S);
        // Connection 2 on the same tuple, 50 ms after connection 1's last packet.
        let second = 11 * S + 50_000_000;
        t.apply(&timed("a", true, 7, second, second + S), 101 * S);
        // Node a's view of connection 1's other direction arrives late: it began before
        // connection 2 and so belongs to connection 1.
        t.apply(&timed("a", false, 4, 10 * S + 2_000_000, 11 * S), 101 * S);
        assert_eq!(t.reused_keys(), 1);
        assert_eq!(t.len(), 1, "one key");
        t.emit_due(104 * S, &mut out);
        assert_eq!(out.len(), 2, "{out:#?}");
        let starts: Vec<u64> = out
            .iter()
            .map(|e| e.interval.connection_start_unix_nanos)
            .collect();
        assert_eq!(starts, [10 * S, second]);
        let packets = |e: &Emitted| {
            (
                e.flow.client_to_server.as_ref().map(|m| m.counts.packets),
                e.flow.server_to_client.as_ref().map(|m| m.counts.packets),
            )
        };
        assert_eq!(packets(&out[0]), (Some(5), Some(4)));
        assert_eq!(packets(&out[1]), (Some(7), None));
        assert_eq!(
            out[0].flow.points.len(),
            3,
            "a egress, b ingress, a ingress"
        );
        // Both are remembered for the grace period, then the key is forgotten.
        let changes = t.take_changes().unwrap();
        assert_eq!(changes.len(), 1);
        let mut restored = table();
        restored
            .restore(changes.into_iter().filter_map(|c| c.state), 104 * S)
            .unwrap();
        restored.emit_due(200 * S, &mut out);
        assert!(restored.is_empty());
    }

    /// An ICMP echo request (outbound) or reply of echo id 7 from 10.0.0.1 to 10.0.0.2.
    fn echo(outbound: bool, first: u64, last: u64) -> Observation {
        let (src, dst, icmp_type) = if outbound {
            ([10, 0, 0, 1], [10, 0, 0, 2], 8)
        } else {
            ([10, 0, 0, 2], [10, 0, 0, 1], 0)
        };
        Observation::try_from(&FlowRecord {
            node_name: "a".into(),
            interface_name: "eth0".into(),
            direction: if outbound {
                Direction::Egress
            } else {
                Direction::Ingress
            } as i32,
            source_address: src.to_vec(),
            destination_address: dst.to_vec(),
            ip_protocol: 1,
            icmp_type,
            delta_packets: 2,
            delta_octets: 168,
            first_seen_unix_nanos: first,
            last_seen_unix_nanos: last,
            flow_start_unix_nanos: first,
            end_reason: EndReason::IdleTimeout as i32,
            ..FlowRecord::default()
        })
        .unwrap()
    }

    #[test]
    fn an_echo_identifier_reused_after_its_flow_ended_is_a_new_connection() {
        let mut t = table();
        let mut out = Vec::new();
        // Two pings of the same echo id, 20 s apart: each ended by the agent's idle timeout.
        t.apply(&echo(true, 10 * S, 11 * S), 30 * S);
        t.apply(&echo(false, 10 * S + 1, 11 * S + 1), 30 * S);
        t.apply(&echo(true, 31 * S, 32 * S), 50 * S);
        t.apply(&echo(false, 31 * S + 1, 32 * S + 1), 50 * S);
        assert_eq!(t.reused_keys(), 1);
        t.emit_due(60 * S, &mut out);
        let starts: Vec<(u64, u64, u64)> = out
            .iter()
            .map(|e| {
                (
                    e.interval.connection_start_unix_nanos,
                    e.flow
                        .client_to_server
                        .as_ref()
                        .map_or(0, |m| m.counts.packets),
                    e.flow
                        .server_to_client
                        .as_ref()
                        .map_or(0, |m| m.counts.packets),
                )
            })
            .collect();
        assert_eq!(starts, [(10 * S, 2, 2), (31 * S, 2, 2)]);
    }

    #[test]
    fn a_flow_that_starts_again_soon_after_is_the_same_connection() {
        let mut t = table();
        let mut out = Vec::new();
        // The other node's view of the same packets, its clock 5 ms ahead: not a new connection.
        t.apply(&timed("a", true, 5, 10 * S, 11 * S), 100 * S);
        t.apply(&timed("b", true, 5, 11 * S + 5_000_000, 12 * S), 100 * S);
        // A new flow without a SYN (an agent evicted it under pressure and saw more).
        let mut resumed = timed("a", true, 2, 13 * S, 13 * S);
        resumed.counts.first_tcp_flags = 0x10;
        t.apply(&resumed, 100 * S);
        t.emit_due(103 * S, &mut out);
        assert_eq!(t.reused_keys(), 0);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0]
                .flow
                .client_to_server
                .as_ref()
                .unwrap()
                .counts
                .packets,
            7
        );
    }
}
