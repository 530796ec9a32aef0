//! The flow table: every open connection, its current interval, and when that interval becomes
//! a span. Pure and clock-free: callers pass the current Unix time.
//!
//! **When.** The first record of an interval starts its settle timer; when it expires the interval
//! is stitched and emitted, so records of the same moment from the other observation points
//! (other nodes report on their own scan schedules) land in the same span. An interval that
//! contains a final record (close, idle, pressure, shutdown) ends the connection.
//!
//! **Persistence.** The table records which connections changed ([`FlowTable::take_changes`]);
//! the pipeline writes those, serialized, in the same store transaction as the spans they
//! produced, and [`FlowTable::restore`] rebuilds the table after a restart.
//!
//! **Late records.** A closed connection is remembered for a grace period. A late record from a
//! point that counts one of its directions opens one more interval (so totals stay exact); a late
//! record from any other point is ignored and counted, since its packets are already counted
//! elsewhere.

use std::time::Duration;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use mermin_protocol::flow::v1::EndReason;
use serde::{Deserialize, Serialize};

use crate::{
    connection_key::ConnectionKey,
    observation::{Observation, Points},
    stitch::{Connection, Decisions, Flow, InterfaceKinds},
    store::Change,
};

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

/// A connection's state (stored as `(key, state)`).
#[derive(Debug, Serialize, Deserialize)]
struct Tracked {
    connection: Connection,
    decisions: Decisions,
    /// Start of the connection's first interval.
    start_unix_nanos: Option<u64>,
    /// Index of the current interval.
    index: u64,
    /// When the current interval is emitted; `None` while it is empty.
    due_unix_nanos: Option<u64>,
    /// The current interval holds a final record.
    closing: bool,
    /// Closed: kept until this time for late records.
    closed_until: Option<u64>,
}

impl Tracked {
    fn intern(&mut self, points: &mut Points) {
        self.connection.intern(points);
        self.decisions.intern(points);
    }
}

pub struct FlowTable {
    open: HashMap<ConnectionKey, Tracked>,
    /// Connections changed since the last `take_changes`.
    dirty: HashSet<ConnectionKey>,
    /// The observation points the connections refer to, one copy each.
    points: Points,
    kinds: InterfaceKinds,
    settle_ns: u64,
    /// How long a closed connection is remembered.
    grace_ns: u64,
    late_ignored: u64,
}

impl FlowTable {
    pub fn new(kinds: InterfaceKinds, settle: Duration, grace: Duration) -> Self {
        Self {
            open: HashMap::new(),
            dirty: HashSet::new(),
            points: Points::default(),
            kinds,
            settle_ns: settle.as_nanos() as u64,
            grace_ns: grace.as_nanos() as u64,
            late_ignored: 0,
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

    pub fn apply(&mut self, observation: &Observation, now: u64) {
        let tracked = self.open.entry(observation.key).or_insert_with(|| Tracked {
            connection: Connection::default(),
            decisions: Decisions::default(),
            start_unix_nanos: None,
            index: 0,
            due_unix_nanos: None,
            closing: false,
            closed_until: None,
        });
        if tracked.closed_until.is_some() {
            if !tracked
                .decisions
                .counts_at(&observation.point, observation.orientation)
            {
                self.late_ignored += 1;
                return;
            }
            // A counting point's late record: one more (final) interval.
            tracked.closed_until = None;
            tracked.closing = true;
        }
        self.dirty.insert(observation.key);
        let point = self.points.intern(&observation.point);
        tracked
            .connection
            .add(observation, point, &tracked.decisions, &self.kinds);
        if observation.end_reason != EndReason::ActiveTimeout {
            tracked.closing = true;
        }
        tracked.due_unix_nanos.get_or_insert(now + self.settle_ns);
    }

    /// Emits every interval whose settle time has come, and forgets connections whose grace
    /// period is over.
    pub fn emit_due(&mut self, now: u64, out: &mut Vec<Emitted>) {
        let (grace, dirty) = (self.grace_ns, &mut self.dirty);
        self.open.retain(|key, tracked| {
            if let Some(until) = tracked.closed_until {
                if until <= now {
                    dirty.insert(*key);
                    return false;
                }
                return true;
            }
            if tracked.due_unix_nanos.is_some_and(|due| due <= now) {
                emit(*key, tracked, now, grace, out);
                dirty.insert(*key);
            }
            true
        });
    }

    /// Emits every interval that holds anything, now (shutdown).
    pub fn flush(&mut self, now: u64, out: &mut Vec<Emitted>) {
        for (key, tracked) in &mut self.open {
            if tracked.closed_until.is_none() && tracked.due_unix_nanos.is_some() {
                emit(*key, tracked, now, self.grace_ns, out);
                self.dirty.insert(*key);
            }
        }
    }

    /// The connections changed since the last call, serialized for the store.
    pub fn take_changes(&mut self) -> Result<Vec<Change>, postcard::Error> {
        let changes = self
            .dirty
            .iter()
            .map(|key| {
                Ok(Change {
                    key: postcard::to_allocvec(key)?,
                    state: self
                        .open
                        .get(key)
                        .map(|tracked| postcard::to_allocvec(&(key, tracked)))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Only now: on an error every change stays pending for the next checkpoint.
        self.dirty.clear();
        Ok(changes)
    }

    /// Divides the table into `parts` tables by `part_of(key)` (each keeps its connections'
    /// unsaved changes), for the shards after a recovery.
    pub fn split(self, parts: usize, part_of: impl Fn(&ConnectionKey) -> usize) -> Vec<FlowTable> {
        let mut tables: Vec<FlowTable> = (0..parts)
            .map(|_| FlowTable {
                open: HashMap::new(),
                dirty: HashSet::new(),
                points: Points::default(),
                kinds: self.kinds.clone(),
                settle_ns: self.settle_ns,
                grace_ns: self.grace_ns,
                late_ignored: 0,
            })
            .collect();
        for (key, mut tracked) in self.open {
            let table = &mut tables[part_of(&key)];
            tracked.intern(&mut table.points);
            table.open.insert(key, tracked);
        }
        for key in self.dirty {
            tables[part_of(&key)].dirty.insert(key);
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
            if let Some(due) = &mut tracked.due_unix_nanos {
                *due = (*due).min(now + self.settle_ns);
            }
            tracked.intern(&mut self.points);
            self.open.insert(key, tracked);
        }
        Ok(self.open.len())
    }
}

fn emit(key: ConnectionKey, tracked: &mut Tracked, now: u64, grace: u64, out: &mut Vec<Emitted>) {
    if let Some(flow) = tracked.connection.stitch(key, &mut tracked.decisions) {
        let start = *tracked
            .start_unix_nanos
            .get_or_insert(flow.start_unix_nanos);
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
        tracked.closed_until = Some(now + grace);
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

        let mut after = table();
        let states = changes.into_iter().filter_map(|c| c.state);
        assert_eq!(after.restore(states, 160 * S).unwrap(), 1);
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
}
