//! The agent's flow tracker: per-observation-point flow state across scan intervals, and the
//! eviction policy (active timeout, per-protocol idle timeouts, TCP close, table pressure).
//!
//! **Connection boundaries.** A TCP SYN on a key whose connection was answered or ended starts a
//! new connection (`node_common::starts_new_connection`): the kernel splits it off within an interval (segment entries, see
//! `node-common`), the tracker across intervals. Each connection is its own flow with its own
//! start and sequence numbers.
//!
//! **Fast close.** A TCP flow is final at the first scan where it or its reverse direction at the
//! same point was reset, or where both carry a FIN and the close was acknowledged (an ACK after
//! its own FIN in one direction — `tcp_flags::ACK_AFTER_FIN`, set by the kernel within an
//! interval and here across intervals — so that the final ACK is not left for a later report);
//! the close timeout is only the bound for flows whose other direction this point never sees,
//! or whose last ACK never comes. A finished TCP flow leaves a tombstone for
//! the close timeout: packets that arrive after it (a retransmitted FIN or final ACK) are reported
//! as one more record of that flow (same start, next sequence), never as a new flow. A flow
//! evicted idle or under pressure leaves one too, but its connection may live on: a packet
//! resumes the flow as it was (same start, next sequence, reported by its timeouts).
//!
//! **Work per scan follows what changed, not what is tracked.** Each flow has a deadline (its idle
//! or close timeout, or its active timeout while it has unreported counts) in a queue of time
//! buckets ([`DeadlineQueue`]: constant work per push and per flow taken, where a binary heap of
//! ~100k 56-byte entries sifted ~17 levels per push and per pop); a scan looks only at the flows
//! whose deadline's bucket has begun, and the fast-close test only at
//! the closing flows absorbed since the previous scan and their reverse directions. A tombstone's
//! expiry is a deadline in the same queue (usually the one its flow was queued with: a closing
//! flow is due at its close timeout, when its tombstone expires). Deadlines only move later while
//! a flow is quiet, so a queued deadline is never later than the flow's real one: a flow found
//! early is queued again.
//!
//! It is fed the counts the kernel accumulated in one interval ([`FlowTracker::absorb`]) or single
//! overflow packets ([`FlowTracker::absorb_packet`]) and hands out [`Report`]s: the deltas since
//! the previous report of the same flow. It never reads the clock — callers pass kernel-clock (`CLOCK_MONOTONIC`) `now` —
//! so every decision is reproducible in tests.
//!
//! Invariant: for each flow, the sum of `delta_packets` / `delta_bytes` over its reports equals
//! everything absorbed for it. Counts only leave the tracker inside a report.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, HashMap, hash_map::Entry},
    time::Duration,
};

use foldhash::fast::RandomState;

use node_common::{FlowKey, FlowStats, PacketEvent, direction, starts_new_connection, tcp_flags};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// When flows are reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub active: Duration,
    pub tcp_close: Duration,
    pub tcp_idle: Duration,
    pub udp_idle: Duration,
    pub icmp_idle: Duration,
    pub other_idle: Duration,
}

impl Timeouts {
    /// Each timeout with the name of its command-line option.
    pub fn named(&self) -> [(&'static str, Duration); 6] {
        [
            ("active-timeout", self.active),
            ("tcp-close-timeout", self.tcp_close),
            ("tcp-idle-timeout", self.tcp_idle),
            ("udp-idle-timeout", self.udp_idle),
            ("icmp-idle-timeout", self.icmp_idle),
            ("other-idle-timeout", self.other_idle),
        ]
    }

    fn idle(&self, protocol: u8) -> Duration {
        match protocol {
            IPPROTO_TCP => self.tcp_idle,
            IPPROTO_UDP => self.udp_idle,
            IPPROTO_ICMP | IPPROTO_ICMPV6 => self.icmp_idle,
            _ => self.other_idle,
        }
    }
}

/// Why a report was made; mirrors the protocol's `EndReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    ActiveTimeout,
    IdleTimeout,
    TcpClose,
    TablePressure,
    AgentShutdown,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::ActiveTimeout,
        Reason::IdleTimeout,
        Reason::TcpClose,
        Reason::TablePressure,
        Reason::AgentShutdown,
    ];

    /// Whether the flow ends with this report (every reason but the active timeout).
    pub fn is_final(self) -> bool {
        self != Reason::ActiveTimeout
    }
}

/// One record's worth of a flow: the counts since its previous report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub key: FlowKey,
    pub reason: Reason,
    pub delta_packets: u64,
    pub delta_bytes: u64,
    /// First and last packet of the reported interval (kernel-clock ns). For a report without packets
    /// (a flow that ends after an interim report) both are the flow's last packet.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub flow_start_ns: u64,
    pub tcp_flags: u32,
    pub first_tcp_flags: u32,
    pub sequence: u64,
}

#[derive(Debug, Clone)]
struct FlowState {
    flow_start: u64,
    first_tcp_flags: u32,
    last_seen: u64,
    /// When the previous report was made (or the flow started).
    last_report: u64,
    sequence: u64,
    /// Counts not reported yet.
    pending: Pending,
    /// FIN or RST seen: the flow closes after the close timeout of silence.
    closing: bool,
    /// OR of the TCP flags of every packet of the flow.
    seen_flags: u32,
    /// Late packets of a flow already reported as finished (from its tombstone).
    late: bool,
    /// The deadline this flow is queued with in `FlowTracker::deadlines` (the newest, if several).
    queued: Option<u64>,
}

impl FlowState {
    fn new(first: u64, first_flags: u32, last: u64, sequence: u64) -> Self {
        Self {
            flow_start: first,
            first_tcp_flags: first_flags,
            last_seen: last,
            last_report: first,
            sequence,
            pending: Pending::default(),
            closing: false,
            seen_flags: 0,
            late: false,
            queued: None,
        }
    }

    /// When this flow is next due: the end of its idle (or, closing, its close) timeout, or
    /// earlier the end of its active timeout while it has counts to report.
    fn due(&self, protocol: u8, timeouts: &Timeouts) -> u64 {
        let quiet_end = self.quiet_end(protocol, timeouts);
        if self.pending.packets > 0 {
            quiet_end.min(self.last_report.saturating_add(nanos(timeouts.active)))
        } else {
            quiet_end
        }
    }

    /// When this flow has been quiet for its idle timeout (its close timeout once closing).
    fn quiet_end(&self, protocol: u8, timeouts: &Timeouts) -> u64 {
        let idle = if self.closing {
            timeouts.tcp_close
        } else {
            timeouts.idle(protocol)
        };
        self.last_seen.saturating_add(nanos(idle))
    }
}

/// Stale queued deadlines tolerated beyond twice the keys tracked before they are dropped in
/// one pass.
const STALE_DEADLINES_SLACK: usize = 1024;

/// A flow queued for when it is next due, or a tombstone for when it expires.
struct Deadline {
    due: u64,
    key: FlowKey,
}

/// log2 of a [`DeadlineQueue`] bucket's width in nanoseconds (~67 ms: a 1 s scan finds each
/// flow early at most once).
const BUCKET_SHIFT: u32 = 26;

/// Deadlines in buckets of their time. Early, never late: [`DeadlineQueue::take_due`] takes
/// every bucket that has begun, and the caller queues again what is not due yet.
#[derive(Default)]
struct DeadlineQueue {
    buckets: BTreeMap<u64, Vec<Deadline>>,
    len: usize,
}

impl DeadlineQueue {
    fn push(&mut self, deadline: Deadline) {
        self.buckets
            .entry(deadline.due >> BUCKET_SHIFT)
            .or_default()
            .push(deadline);
        self.len += 1;
    }

    /// Takes out every deadline whose bucket has begun by `now`, in no particular order.
    fn take_due(&mut self, now: u64) -> Vec<Deadline> {
        let later = self.buckets.split_off(&((now >> BUCKET_SHIFT) + 1));
        let due = std::mem::replace(&mut self.buckets, later);
        let due: Vec<Deadline> = due.into_values().flatten().collect();
        self.len -= due.len();
        due
    }

    fn retain(&mut self, mut keep: impl FnMut(&Deadline) -> bool) {
        self.buckets.retain(|_, bucket| {
            bucket.retain(&mut keep);
            !bucket.is_empty()
        });
        self.len = self.buckets.values().map(Vec::len).sum();
    }

    fn len(&self) -> usize {
        self.len
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// What remains of a finished TCP flow for the close timeout (see the module docs).
#[derive(Debug, Clone)]
struct Tombstone {
    flow_start: u64,
    first_tcp_flags: u32,
    next_sequence: u64,
    until: u64,
    /// The flow ended with its connection (`TcpClose`): a packet after it is a late one of a
    /// finished connection, reported at once. Otherwise (evicted idle or under pressure) the
    /// connection may live on, and a packet resumes the flow as it was.
    closed: bool,
}

#[derive(Debug, Clone, Default)]
struct Pending {
    packets: u64,
    bytes: u64,
    first_seen: u64,
    last_seen: u64,
    tcp_flags: u32,
}

impl Pending {
    fn add(&mut self, packets: u64, bytes: u64, first: u64, last: u64, flags: u32) {
        if self.packets == 0 {
            self.first_seen = first;
            self.last_seen = last;
        } else {
            self.first_seen = self.first_seen.min(first);
            self.last_seen = self.last_seen.max(last);
        }
        self.packets += packets;
        self.bytes += bytes;
        self.tcp_flags |= flags & tcp_flags::HEADER;
    }
}

/// A key's entry: its flow, or what remains of the finished TCP flow it carried (a key has
/// one or the other, never both, so they share one map: a flow that finishes becomes its
/// tombstone in place, and a late packet turns the tombstone back into a flow).
#[derive(Debug, Clone)]
enum Tracked {
    Flow(FlowState),
    Ended(Tombstone),
}

impl Tracked {
    fn flow(&self) -> Option<&FlowState> {
        match self {
            Tracked::Flow(state) => Some(state),
            Tracked::Ended(_) => None,
        }
    }
}

/// Per-observation-point flows the agent has seen and not yet finally reported.
pub struct FlowTracker {
    /// Keyed by traffic the network controls: a per-process random seed keeps collisions from
    /// being chosen by senders (foldhash, a fraction of SipHash's cost on 48-byte keys).
    flows: HashMap<FlowKey, Tracked, RandomState>,
    /// Entries that are flows (the rest are tombstones).
    live: usize,
    /// Flows and tombstones by deadline (see the module docs): an entry stands for a flow whose
    /// `queued` it is, or for a tombstone whose `until` it is; the others (the flow ended and
    /// was removed, or was queued again earlier) are skipped when they come up.
    deadlines: DeadlineQueue,
    /// Closing TCP flows absorbed since the last scan: the candidates for a fast close.
    closing: Vec<FlowKey>,
    timeouts: Timeouts,
    capacity: usize,
}

impl FlowTracker {
    pub fn new(timeouts: Timeouts, capacity: usize) -> Self {
        Self {
            flows: HashMap::with_hasher(RandomState::default()),
            live: 0,
            deadlines: DeadlineQueue::default(),
            closing: Vec::new(),
            timeouts,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Finished TCP flows remembered for late packets.
    pub fn tombstones(&self) -> usize {
        self.flows.len() - self.live
    }

    /// The flows, without the tombstones.
    fn live_flows(&self) -> impl Iterator<Item = (&FlowKey, &FlowState)> {
        self.flows.iter().filter_map(|(k, t)| Some((k, t.flow()?)))
    }

    /// Adds everything one kernel table interval counted. The connections the kernel split off a
    /// key (segments 1, 2, ...) come first, in the order they ended, each ending its flow; the
    /// live entries after them.
    pub fn absorb_interval(&mut self, entries: &[(FlowKey, FlowStats)], out: &mut Vec<Report>) {
        let mut segments: Vec<&(FlowKey, FlowStats)> =
            entries.iter().filter(|(key, _)| key.segment != 0).collect();
        // Per key, segment numbers are in the order the connections ended.
        segments.sort_unstable_by_key(|(key, _)| key.segment);
        for (key, stats) in segments {
            let live = FlowKey { segment: 0, ..*key };
            self.absorb(&live, stats, out);
            self.finish(&live, Reason::TcpClose, out);
        }
        for (key, stats) in entries.iter().filter(|(key, _)| key.segment == 0) {
            self.absorb(key, stats, out);
        }
    }

    /// Adds one kernel interval's counts for `key`. A new TCP connection on the 5-tuple of an
    /// earlier one (SYN without ACK first, where ACK, FIN or RST were seen) ends the old flow
    /// first, into `out`.
    pub fn absorb(&mut self, key: &FlowKey, stats: &FlowStats, out: &mut Vec<Report>) {
        self.add(
            key,
            stats.packets,
            stats.bytes,
            stats.first_seen_ns,
            stats.last_seen_ns,
            stats.tcp_flags as u32,
            stats.first_tcp_flags,
            out,
        );
    }

    /// Adds one packet that came through the overflow ring.
    pub fn absorb_packet(&mut self, event: &PacketEvent, out: &mut Vec<Report>) {
        self.add(
            &event.key,
            event.packets,
            event.bytes,
            event.seen_ns,
            event.seen_ns,
            event.tcp_flags,
            event.tcp_flags,
            out,
        );
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the two absorb paths share this body"
    )]
    fn add(
        &mut self,
        key: &FlowKey,
        packets: u64,
        bytes: u64,
        first: u64,
        last: u64,
        flags: u32,
        first_flags: u32,
        out: &mut Vec<Report>,
    ) {
        let tcp = key.protocol == IPPROTO_TCP;
        // One lookup for all of it: the connection a SYN replaces is ended in place, a
        // tombstone turned back into a flow, and the flow updated.
        let tracked = match self.flows.entry(*key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                self.live += 1;
                entry.insert(Tracked::Flow(FlowState::new(first, first_flags, last, 0)))
            }
        };
        if tcp
            && let Tracked::Flow(state) = tracked
            && starts_new_connection(first_flags, state.seen_flags)
        {
            out.push(end(
                key,
                tracked,
                Reason::TcpClose,
                &self.timeouts,
                &mut self.deadlines,
            ));
            self.live -= 1;
        }
        // A SYN or SYN+ACK after a finished connection belongs to a new one.
        let opens = tcp && first_flags & tcp_flags::SYN != 0;
        if let Tracked::Ended(t) = tracked {
            let state = if opens {
                FlowState::new(first, first_flags, last, 0)
            } else {
                // A late packet of a finished connection: one more record of that flow. After
                // an eviction the flow simply goes on (reported by its timeouts again).
                let mut state =
                    FlowState::new(t.flow_start, t.first_tcp_flags, last, t.next_sequence);
                state.closing = t.closed;
                state.late = t.closed;
                state
            };
            *tracked = Tracked::Flow(state);
            self.live += 1;
        }
        let Tracked::Flow(state) = tracked else {
            unreachable!("a flow now");
        };
        state.pending.add(packets, bytes, first, last, flags);
        state.last_seen = state.last_seen.max(last);
        // Packets of a later interval came after the FINs of the earlier ones.
        if flags & (tcp_flags::ACK | tcp_flags::FIN) == tcp_flags::ACK
            && state.seen_flags & tcp_flags::FIN != 0
        {
            state.seen_flags |= tcp_flags::ACK_AFTER_FIN;
        }
        state.seen_flags |= flags;
        if flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
            state.closing = true;
        }
        if tcp && state.closing {
            self.closing.push(*key);
        }
        let due = state.due(key.protocol, &self.timeouts);
        if state.queued.is_none_or(|queued| due < queued) {
            state.queued = Some(due);
            self.deadlines.push(Deadline { due, key: *key });
        }
    }

    /// Ends the TCP flows that are final now: either direction at this point was reset, or both
    /// carry a FIN and the last one was acknowledged (an ACK after its own FIN in either
    /// direction: the final ACK of the close; a resurrected flow of late packets counts as
    /// closed). Without that ACK the close timeout decides: the final ACK would otherwise come
    /// after the report. Only the connections with a closing flow absorbed since the last scan
    /// can have become final (flags change only when packets are absorbed); a reset also ends
    /// its reverse direction, closing or not.
    fn complete_closes(&mut self, out: &mut Vec<Report>) {
        // Each connection once, by its ingress key (both directions are usually listed), its two
        // directions taken together: two lookups per connection, where a look at each listed
        // key and its reverse, and then the finish of each, took ten.
        let mut connections: Vec<FlowKey> = std::mem::take(&mut self.closing)
            .iter()
            .map(|key| {
                debug_assert!(
                    matches!(key.direction, direction::INGRESS | direction::EGRESS),
                    "the kernel writes ingress or egress"
                );
                if key.direction == direction::INGRESS {
                    *key
                } else {
                    reverse(key)
                }
            })
            .collect();
        connections.sort_unstable_by(key_order);
        connections.dedup();
        for ingress in connections {
            let egress = reverse(&ingress);
            let [at_ingress, at_egress] = self.flows.get_disjoint_mut([&ingress, &egress]);
            let (ingress_flow, egress_flow) = (
                at_ingress.as_deref().and_then(Tracked::flow),
                at_egress.as_deref().and_then(Tracked::flow),
            );
            let ends = [
                closes_now(ingress_flow, egress_flow),
                closes_now(egress_flow, ingress_flow),
            ];
            for ((key, tracked), ends) in [(ingress, at_ingress), (egress, at_egress)]
                .into_iter()
                .zip(ends)
            {
                if let Some(tracked) = tracked.filter(|_| ends) {
                    out.push(end(
                        &key,
                        tracked,
                        Reason::TcpClose,
                        &self.timeouts,
                        &mut self.deadlines,
                    ));
                    self.live -= 1;
                }
            }
        }
    }

    /// Reports every flow that is due at `now`: interim reports for flows active longer than the
    /// active timeout, final reports for closed and idle flows, and — when more flows are tracked
    /// than the capacity — final reports for the least recently seen.
    pub fn evict(&mut self, now: u64, out: &mut Vec<Report>) {
        self.complete_closes(out);
        // `take_due` hands over what it took, so what is queued meanwhile waits for a later scan:
        // a flow found early, a flow's next deadline, which is always after `now` (its quiet
        // end, or its active timeout counted from a report made now), and the expiry of a
        // tombstone left now (usually due already: the next scan removes it).
        for Deadline { due, key } in self.deadlines.take_due(now) {
            // One lookup per deadline, whatever it finds.
            let Entry::Occupied(mut entry) = self.flows.entry(key) else {
                continue; // ended and removed since it was queued
            };
            let state = match entry.get_mut() {
                Tracked::Ended(tombstone) => {
                    // The entry standing for the tombstone's expiry, or one it left behind (the
                    // key carries a newer tombstone).
                    if tombstone.until == due {
                        if due > now {
                            self.deadlines.push(Deadline { due, key });
                        } else {
                            entry.remove();
                        }
                    }
                    continue;
                }
                Tracked::Flow(state) => state,
            };
            if state.queued != Some(due) {
                continue; // queued again, earlier; that entry stands for it
            }
            if due > now {
                self.deadlines.push(Deadline { due, key });
                continue;
            }
            if now >= state.quiet_end(key.protocol, &self.timeouts) {
                let reason = if state.closing {
                    Reason::TcpClose
                } else {
                    Reason::IdleTimeout
                };
                // This entry is taken: the tombstone's expiry needs one of its own.
                state.queued = None;
                out.push(end(
                    &key,
                    entry.get_mut(),
                    reason,
                    &self.timeouts,
                    &mut self.deadlines,
                ));
                self.live -= 1;
                if matches!(entry.get(), Tracked::Flow(_)) {
                    entry.remove();
                }
                continue;
            }
            if state.pending.packets > 0
                && now.saturating_sub(state.last_report) >= nanos(self.timeouts.active)
            {
                out.push(report(&key, state, Reason::ActiveTimeout));
                state.last_report = now;
            }
            let due = state.due(key.protocol, &self.timeouts);
            debug_assert!(due > now, "a flow looked at now is next due later");
            state.queued = Some(due);
            self.deadlines.push(Deadline { due, key });
        }
        self.forget_stale_deadlines();
        if self.live > self.capacity {
            self.relieve_pressure(out);
        }
    }

    /// Drops the queued deadlines that no longer stand for a flow or a tombstone (the flow
    /// ended and was removed, or was queued again earlier) once they outnumber twice the keys
    /// tracked: each key has exactly one that stands. Tombstones count: each has its expiry
    /// queued, and counted against the live flows alone, a node of short connections had this
    /// pass look every live flow up again every scan or two.
    fn forget_stale_deadlines(&mut self) {
        if self.deadlines.len() <= 2 * self.flows.len() + STALE_DEADLINES_SLACK {
            return;
        }
        let flows = &self.flows;
        self.deadlines.retain(|d| match flows.get(&d.key) {
            Some(Tracked::Flow(state)) => state.queued == Some(d.due),
            Some(Tracked::Ended(tombstone)) => tombstone.until == d.due,
            None => false,
        });
    }

    /// Final reports for every flow (agent shutdown).
    pub fn flush(&mut self, out: &mut Vec<Report>) {
        let keys: Vec<FlowKey> = self.live_flows().map(|(key, _)| *key).collect();
        for key in keys {
            self.finish(&key, Reason::AgentShutdown, out);
        }
    }

    /// Drops the least recently seen flows down to 90% of the capacity, reporting each.
    fn relieve_pressure(&mut self, out: &mut Vec<Report>) {
        let target = self.capacity - self.capacity / 10;
        let mut by_age: Vec<(u64, FlowKey)> = self
            .live_flows()
            .map(|(key, state)| (state.last_seen, *key))
            .collect();
        let excess = by_age.len().saturating_sub(target);
        by_age.select_nth_unstable_by_key(excess.saturating_sub(1), |(seen, _)| *seen);
        for (_, key) in by_age.into_iter().take(excess) {
            self.finish(&key, Reason::TablePressure, out);
        }
    }

    /// The final report of `key`'s flow; a TCP flow leaves its tombstone in its place.
    fn finish(&mut self, key: &FlowKey, reason: Reason, out: &mut Vec<Report>) {
        let Some(tracked) = self.flows.get_mut(key) else {
            return;
        };
        if !matches!(tracked, Tracked::Flow(_)) {
            return;
        }
        out.push(end(
            key,
            tracked,
            reason,
            &self.timeouts,
            &mut self.deadlines,
        ));
        self.live -= 1;
        if !matches!(tracked, Tracked::Ended(_)) {
            self.flows.remove(key);
        }
    }
}

/// The final report of the flow in `tracked` (a flow); a TCP flow becomes its tombstone in
/// place, its expiry in `deadlines` (the flow's own queued deadline where that is when it
/// expires), and any other is left for the caller to remove. A caller that has taken the flow's
/// queued deadline out of the queue clears `queued` first.
fn end(
    key: &FlowKey,
    tracked: &mut Tracked,
    reason: Reason,
    timeouts: &Timeouts,
    deadlines: &mut DeadlineQueue,
) -> Report {
    let Tracked::Flow(state) = tracked else {
        unreachable!("only a flow ends");
    };
    let report = report(key, state, reason);
    if key.protocol == IPPROTO_TCP && reason != Reason::AgentShutdown {
        let until = report.last_seen_ns + timeouts.tcp_close.as_nanos() as u64;
        let queued = state.queued;
        *tracked = Tracked::Ended(Tombstone {
            flow_start: state.flow_start,
            first_tcp_flags: state.first_tcp_flags,
            next_sequence: state.sequence,
            until,
            closed: reason == Reason::TcpClose,
        });
        if queued != Some(until) {
            deadlines.push(Deadline {
                due: until,
                key: *key,
            });
        }
    }
    report
}

/// Whether the flow `this` (of a connection with a closing flow absorbed) ends now, its reverse
/// direction at the same point being `back` (see [`FlowTracker::complete_closes`]).
fn closes_now(this: Option<&FlowState>, back: Option<&FlowState>) -> bool {
    let has = |flow: Option<&FlowState>, flag: u32| flow.is_some_and(|f| f.seen_flags & flag != 0);
    let Some(state) = this else {
        return false;
    };
    if !state.closing {
        // A reset ends its reverse direction, closing or not.
        return back.is_some_and(|b| b.closing) && has(back, tcp_flags::RST);
    }
    has(this, tcp_flags::RST)
        || has(back, tcp_flags::RST)
        || (has(this, tcp_flags::FIN)
            && has(back, tcp_flags::FIN)
            && (has(this, tcp_flags::ACK_AFTER_FIN) || has(back, tcp_flags::ACK_AFTER_FIN)))
        || state.late
}

/// An order of keys, to find the same key listed twice: the ports first, which tell most keys
/// apart without comparing addresses.
fn key_order(a: &FlowKey, b: &FlowKey) -> Ordering {
    (a.src_port, a.dst_port, a.ifindex)
        .cmp(&(b.src_port, b.dst_port, b.ifindex))
        .then_with(|| a.src_addr.cmp(&b.src_addr))
        .then_with(|| a.dst_addr.cmp(&b.dst_addr))
        .then_with(|| {
            let rest = |k: &FlowKey| {
                (
                    k.protocol,
                    k.ip_version,
                    k.direction,
                    k.icmp_type,
                    k.icmp_code,
                    k.segment,
                )
            };
            rest(a).cmp(&rest(b))
        })
}

/// The key of the other direction of `key`'s flow at the same point.
fn reverse(key: &FlowKey) -> FlowKey {
    FlowKey {
        src_addr: key.dst_addr,
        dst_addr: key.src_addr,
        src_port: key.dst_port,
        dst_port: key.src_port,
        direction: match key.direction {
            direction::INGRESS => direction::EGRESS,
            _ => direction::INGRESS,
        },
        ..*key
    }
}

/// Takes the pending counts of `state` into a report.
fn report(key: &FlowKey, state: &mut FlowState, reason: Reason) -> Report {
    let pending = std::mem::take(&mut state.pending);
    let (first, last) = if pending.packets == 0 {
        (state.last_seen, state.last_seen)
    } else {
        (pending.first_seen, pending.last_seen)
    };
    let sequence = state.sequence;
    state.sequence += 1;
    Report {
        key: *key,
        reason,
        delta_packets: pending.packets,
        delta_bytes: pending.bytes,
        first_seen_ns: first,
        last_seen_ns: last,
        flow_start_ns: state.flow_start,
        tcp_flags: pending.tcp_flags,
        first_tcp_flags: state.first_tcp_flags,
        sequence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn timeouts() -> Timeouts {
        Timeouts {
            active: Duration::from_secs(10),
            tcp_close: Duration::from_secs(2),
            tcp_idle: Duration::from_secs(20),
            udp_idle: Duration::from_secs(30),
            icmp_idle: Duration::from_secs(5),
            other_idle: Duration::from_secs(30),
        }
    }

    fn key(protocol: u8, src_port: u16) -> FlowKey {
        FlowKey {
            src_addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            src_port,
            dst_port: 80,
            ifindex: 3,
            ip_version: 4,
            protocol,
            direction: 2,
            ..FlowKey::default()
        }
    }

    fn stats(packets: u64, bytes: u64, first: u64, last: u64, flags: u32) -> FlowStats {
        FlowStats {
            packets,
            bytes,
            first_seen_ns: first,
            last_seen_ns: last,
            tcp_flags: u64::from(flags),
            first_tcp_flags: flags,
            segments: 0,
        }
    }

    #[test]
    fn long_flow_gets_interim_reports_whose_deltas_sum_to_the_total() {
        let mut tracker = FlowTracker::new(timeouts(), 100);
        let k = key(IPPROTO_UDP, 5000);
        let mut out = Vec::new();
        // 25 one-second intervals of 10 packets / 1000 bytes each.
        for second in 0..25 {
            let t = second * S;
            tracker.absorb(&k, &stats(10, 1000, t, t + S / 2, 0), &mut out);
            tracker.evict(t + S, &mut out);
        }
        tracker.evict(25 * S + 31 * S, &mut out);
        let reasons: Vec<Reason> = out.iter().map(|r| r.reason).collect();
        assert_eq!(
            reasons,
            [
                Reason::ActiveTimeout,
                Reason::ActiveTimeout,
                Reason::IdleTimeout
            ]
        );
        assert_eq!(out.iter().map(|r| r.delta_packets).sum::<u64>(), 250);
        assert_eq!(out.iter().map(|r| r.delta_bytes).sum::<u64>(), 25_000);
        assert_eq!(
            out.iter().map(|r| r.delta_packets).collect::<Vec<_>>(),
            [100, 100, 50]
        );
        assert!(out.iter().all(|r| r.flow_start_ns == 0));
        assert_eq!(
            out.iter().map(|r| r.sequence).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(out[1].first_seen_ns, 10 * S);
        assert_eq!(out[2].last_seen_ns, 24 * S + S / 2);
        assert!(tracker.is_empty());
    }

    #[test]
    fn fin_closes_after_the_close_timeout_not_the_idle_timeout() {
        let mut tracker = FlowTracker::new(timeouts(), 100);
        let k = key(IPPROTO_TCP, 40000);
        let mut out = Vec::new();
        let syn = tcp_flags::SYN;
        tracker.absorb(&k, &stats(3, 180, 0, S / 10, syn), &mut out);
        tracker.absorb(
            &k,
            &stats(2, 104, S, S, tcp_flags::FIN | tcp_flags::ACK),
            &mut out,
        );
        tracker.evict(2 * S + S / 2, &mut out);
        assert!(
            out.is_empty(),
            "closing flow reported before the close timeout"
        );
        tracker.evict(3 * S, &mut out);
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert_eq!(r.reason, Reason::TcpClose);
        assert_eq!((r.delta_packets, r.delta_bytes), (5, 284));
        assert_eq!(r.first_tcp_flags, syn);
        assert_eq!(
            r.tcp_flags,
            tcp_flags::SYN | tcp_flags::FIN | tcp_flags::ACK
        );
    }

    #[test]
    fn new_syn_on_a_closing_tuple_starts_a_new_flow() {
        let mut tracker = FlowTracker::new(timeouts(), 100);
        let k = key(IPPROTO_TCP, 40001);
        let mut out = Vec::new();
        tracker.absorb(
            &k,
            &stats(4, 200, 0, S, tcp_flags::SYN | tcp_flags::RST),
            &mut out,
        );
        tracker.absorb(&k, &stats(1, 60, S + 1, S + 1, tcp_flags::SYN), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, Reason::TcpClose);
        assert_eq!(out[0].delta_packets, 4);
        assert_eq!(tracker.len(), 1);
        tracker.flush(&mut out);
        assert_eq!(out[1].reason, Reason::AgentShutdown);
        assert_eq!(out[1].flow_start_ns, S + 1);
        assert_eq!(out[1].sequence, 0);
    }

    #[test]
    fn idle_timeouts_are_per_protocol() {
        let mut tracker = FlowTracker::new(timeouts(), 100);
        let mut out = Vec::new();
        tracker.absorb(&key(IPPROTO_ICMP, 0), &stats(1, 84, 0, 0, 0), &mut out);
        tracker.absorb(&key(IPPROTO_UDP, 53), &stats(1, 70, 0, 0, 0), &mut out);
        tracker.evict(5 * S, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key.protocol, IPPROTO_ICMP);
        assert_eq!(out[0].reason, Reason::IdleTimeout);
        tracker.evict(30 * S, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].key.protocol, IPPROTO_UDP);
    }

    #[test]
    fn a_flow_found_before_its_deadline_moved_is_due_at_the_later_one() {
        // ICMP: idle 5 s, active 10 s. Queued at 0 + 5 s; a packet at 4 s moves the end to 9 s.
        let mut tracker = FlowTracker::new(timeouts(), 100);
        let mut out = Vec::new();
        let k = key(IPPROTO_ICMP, 0);
        tracker.absorb(&k, &stats(1, 84, 0, 0, 0), &mut out);
        tracker.absorb(&k, &stats(1, 84, 4 * S, 4 * S, 0), &mut out);
        tracker.evict(5 * S, &mut out);
        tracker.evict(9 * S - 1, &mut out);
        assert!(out.is_empty(), "{out:?}");
        tracker.evict(9 * S, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, Reason::IdleTimeout);
        assert_eq!((out[0].delta_packets, out[0].delta_bytes), (2, 168));
        assert!(tracker.is_empty());
    }

    #[test]
    fn a_deadline_brought_forward_replaces_the_queued_one() {
        // UDP: idle 30 s, active 10 s.
        let mut tracker = FlowTracker::new(timeouts(), 100);
        let mut out = Vec::new();
        let k = key(IPPROTO_UDP, 53);
        tracker.absorb(&k, &stats(1, 70, 0, 0, 0), &mut out);
        tracker.evict(10 * S, &mut out); // active timeout; next due at the idle end, 30 s
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, Reason::ActiveTimeout);
        // New counts at 25 s: due at the active timeout, 10 s after the last report.
        tracker.absorb(&k, &stats(1, 70, 25 * S, 25 * S, 0), &mut out);
        tracker.evict(20 * S, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].reason, Reason::ActiveTimeout);
        assert_eq!(out[1].delta_packets, 1);
        // The entry queued for 30 s is stale: the flow is idle only from 25 + 30 s.
        tracker.evict(30 * S, &mut out);
        tracker.evict(55 * S - 1, &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        tracker.evict(55 * S, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(out[2].reason, Reason::IdleTimeout);
        assert_eq!(out[2].delta_packets, 0);
    }

    #[test]
    fn deadlines_of_flows_closed_early_do_not_pile_up() {
        // 10,000 connections, each reset at once: final at the next scan, long before the
        // deadlines they were queued with.
        let mut tracker = FlowTracker::new(timeouts(), 100_000);
        let mut out = Vec::new();
        for port in 0..10_000u16 {
            let k = key(IPPROTO_TCP, port);
            let flags = tcp_flags::SYN | tcp_flags::RST;
            tracker.absorb(&k, &stats(2, 80, 0, 0, flags), &mut out);
            tracker.evict(S, &mut out);
        }
        assert_eq!(out.len(), 10_000);
        assert!(out.iter().all(|r| r.reason == Reason::TcpClose));
        assert_eq!((tracker.len(), tracker.tombstones()), (0, 10_000));
        // Within twice the keys tracked (their tombstones) ...
        assert!(
            tracker.deadlines.len() <= 2 * 10_000 + STALE_DEADLINES_SLACK,
            "{} deadlines queued for no flow",
            tracker.deadlines.len()
        );
        // ... and gone with them, once the close timeout is over.
        tracker.evict(3 * S, &mut out);
        assert_eq!((tracker.tombstones(), tracker.deadlines.len()), (0, 0));
        assert_eq!(out.len(), 10_000, "nothing more reported");
    }

    #[test]
    fn pressure_reports_the_least_recently_seen_flows() {
        let mut tracker = FlowTracker::new(timeouts(), 10);
        let mut out = Vec::new();
        for port in 0..12u16 {
            let t = u64::from(port) * 1000;
            tracker.absorb(&key(IPPROTO_UDP, port), &stats(1, 50, t, t, 0), &mut out);
        }
        tracker.evict(20_000, &mut out);
        // 12 flows, capacity 10: down to 9, the three oldest go.
        let mut ports: Vec<u16> = out.iter().map(|r| r.key.src_port).collect();
        ports.sort_unstable();
        assert_eq!(ports, [0, 1, 2]);
        assert!(out.iter().all(|r| r.reason == Reason::TablePressure));
        assert_eq!(tracker.len(), 9);
    }

    /// A busy TCP connection evicted under pressure lives on: its next packet resumes the flow
    /// (same start, next sequence), reported by its timeouts again, not as a close at each scan.
    #[test]
    fn a_tcp_flow_evicted_under_pressure_resumes_with_its_next_packet() {
        let mut tracker = FlowTracker::new(timeouts(), 10);
        let mut out = Vec::new();
        let busy = key(IPPROTO_TCP, 100);
        let ack = tcp_flags::ACK;
        tracker.absorb(&busy, &stats(5, 500, 0, 10, tcp_flags::SYN | ack), &mut out);
        for port in 0..11u16 {
            let t = 1000 + u64::from(port);
            tracker.absorb(&key(IPPROTO_UDP, port), &stats(1, 50, t, t, 0), &mut out);
        }
        tracker.evict(20_000, &mut out);
        let evicted: Vec<&Report> = out.iter().filter(|r| r.key == busy).collect();
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].reason, Reason::TablePressure);
        assert_eq!(tracker.tombstones(), 1);
        out.clear();
        tracker.absorb(&busy, &stats(2, 200, S, S, ack), &mut out);
        tracker.evict(S + S / 10, &mut out);
        assert!(
            out.iter().all(|r| r.key != busy),
            "reported as a close: {out:?}"
        );
        tracker.flush(&mut out);
        let resumed = out.iter().find(|r| r.key == busy).unwrap();
        assert_eq!(
            (
                resumed.flow_start_ns,
                resumed.sequence,
                resumed.delta_packets,
                resumed.reason
            ),
            (0, 1, 2, Reason::AgentShutdown)
        );
    }

    #[test]
    fn overflow_packets_join_their_flow() {
        let mut tracker = FlowTracker::new(timeouts(), 100);
        let k = key(IPPROTO_UDP, 7);
        let mut out = Vec::new();
        tracker.absorb(&k, &stats(2, 200, 10, 20, 0), &mut out);
        let event = PacketEvent {
            key: k,
            packets: 3,
            bytes: 4500,
            seen_ns: 5,
            tcp_flags: 0,
            _pad: 0,
        };
        tracker.absorb_packet(&event, &mut out);
        tracker.flush(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].delta_packets, out[0].delta_bytes), (5, 4700));
        assert_eq!((out[0].first_seen_ns, out[0].last_seen_ns), (5, 20));
        assert_eq!(out[0].flow_start_ns, 10);
    }

    fn segment(key: FlowKey, number: u8) -> FlowKey {
        FlowKey {
            segment: number,
            ..key
        }
    }

    #[test]
    fn connections_the_kernel_split_off_a_key_become_flows_of_their_own_in_order() {
        let mut tracker = FlowTracker::new(timeouts(), 100);
        let k = key(IPPROTO_TCP, 40002);
        let mut out = Vec::new();
        let (syn, fin_ack) = (tcp_flags::SYN, tcp_flags::FIN | tcp_flags::ACK);
        // An earlier interval saw the start of the first connection.
        tracker.absorb_interval(&[(k, stats(3, 180, 0, S / 10, syn))], &mut out);
        assert!(out.is_empty());
        // Then: its end (segment 1), a whole second connection (segment 2), a third one going on.
        tracker.absorb_interval(
            &[
                (k, stats(1, 60, 3 * S, 3 * S, syn)),
                (
                    segment(k, 2),
                    stats(5, 500, 2 * S, 2 * S + 5, syn | fin_ack),
                ),
                (segment(k, 1), stats(2, 104, S, S + 1, fin_ack)),
            ],
            &mut out,
        );
        let summary: Vec<(u64, u64, u64, u64)> = out
            .iter()
            .map(|r| (r.flow_start_ns, r.delta_packets, r.delta_bytes, r.sequence))
            .collect();
        assert_eq!(summary, [(0, 5, 284, 0), (2 * S, 5, 500, 0)]);
        assert!(
            out.iter()
                .all(|r| r.reason == Reason::TcpClose && r.key == k)
        );
        tracker.flush(&mut out);
        assert_eq!((out[2].flow_start_ns, out[2].delta_packets), (3 * S, 1));
        assert_eq!(out[2].first_tcp_flags, syn);
    }

    #[test]
    fn a_syn_after_the_handshake_was_answered_starts_a_new_flow_across_intervals() {
        let mut tracker = FlowTracker::new(timeouts(), 100);
        let k = key(IPPROTO_TCP, 40003);
        let mut out = Vec::new();
        // No FIN seen (the old connection's end was lost), but it had been answered.
        tracker.absorb(
            &k,
            &stats(4, 240, 0, S, tcp_flags::SYN | tcp_flags::ACK),
            &mut out,
        );
        tracker.absorb(&k, &stats(1, 60, 2 * S, 2 * S, tcp_flags::SYN), &mut out);
        // A retransmitted SYN of the same handshake is not a new connection.
        tracker.absorb(&k, &stats(1, 60, 3 * S, 3 * S, tcp_flags::SYN), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].delta_packets, out[0].flow_start_ns), (4, 0));
        tracker.flush(&mut out);
        assert_eq!((out[1].delta_packets, out[1].flow_start_ns), (2, 2 * S));
    }

    #[test]
    fn a_completed_fin_exchange_or_a_reset_is_reported_at_the_next_scan() {
        let mut tracker = FlowTracker::new(timeouts(), 100);
        let out_key = key(IPPROTO_TCP, 40004);
        let in_key = reverse(&out_key);
        let reset_key = key(IPPROTO_TCP, 40005);
        // The answers of the reset connection carry no RST: its reverse's does.
        let answered_key = reverse(&reset_key);
        let mut out = Vec::new();
        let ack = tcp_flags::ACK;
        tracker.absorb_interval(
            &[
                (
                    out_key,
                    stats(6, 400, 0, S / 2, tcp_flags::SYN | ack | tcp_flags::FIN),
                ),
                (in_key, stats(5, 3000, 1, S / 2, tcp_flags::SYN | ack)),
                (
                    reset_key,
                    stats(2, 100, 0, S / 2, tcp_flags::SYN | tcp_flags::RST),
                ),
                (answered_key, stats(1, 60, 1, 1, tcp_flags::SYN | ack)),
            ],
            &mut out,
        );
        // One FIN only: the exchange is not complete; the reset is, both ways.
        tracker.evict(S, &mut out);
        let reset: Vec<(FlowKey, Reason)> = out.drain(..).map(|r| (r.key, r.reason)).collect();
        assert_eq!(reset.len(), 2);
        assert!(reset.contains(&(reset_key, Reason::TcpClose)));
        assert!(reset.contains(&(answered_key, Reason::TcpClose)));
        tracker.absorb_interval(
            &[(in_key, stats(1, 52, S + 1, S + 1, ack | tcp_flags::FIN))],
            &mut out,
        );
        // Both FINs, the second not acknowledged yet: the final ACK would come after a report.
        tracker.evict(S + S / 10, &mut out);
        assert!(out.is_empty(), "{out:?}");
        tracker.absorb_interval(&[(out_key, stats(1, 52, S + 2, S + 2, ack))], &mut out);
        // Well within the close timeout (2 s of silence).
        tracker.evict(S + S / 5, &mut out);
        let closed: Vec<(FlowKey, u64)> = out.iter().map(|r| (r.key, r.delta_packets)).collect();
        assert_eq!(closed.len(), 2);
        assert!(closed.contains(&(out_key, 7)) && closed.contains(&(in_key, 6)));
        // The tracker's own bit never reaches a record.
        let out_flags = out.iter().find(|r| r.key == out_key).unwrap().tcp_flags;
        assert_eq!(out_flags, tcp_flags::SYN | ack | tcp_flags::FIN);
        assert!(tracker.is_empty());
        assert_eq!(tracker.tombstones(), 4);
    }

    #[test]
    fn late_packets_after_a_close_join_the_finished_flow_and_a_new_handshake_does_not() {
        let mut tracker = FlowTracker::new(timeouts(), 100);
        let out_key = key(IPPROTO_TCP, 40006);
        let in_key = reverse(&out_key);
        let mut out = Vec::new();
        let fin_ack = tcp_flags::FIN | tcp_flags::ACK;
        // The kernel saw the final ACK within the interval.
        let acked = tcp_flags::ACK_AFTER_FIN;
        tracker.absorb_interval(
            &[
                (
                    out_key,
                    stats(3, 200, 0, S / 2, tcp_flags::SYN | fin_ack | acked),
                ),
                (in_key, stats(3, 200, 1, S / 2, tcp_flags::SYN | fin_ack)),
            ],
            &mut out,
        );
        tracker.evict(S, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (tracker.len(), tracker.tombstones()),
            (0, 2),
            "flows became tombstones"
        );
        assert_eq!(out[0].tcp_flags & !tcp_flags::HEADER, 0);
        // A retransmitted final ACK arrives after the scan: one more record of the same flow, at
        // once.
        tracker.absorb_interval(
            &[(out_key, stats(1, 52, S + 5, S + 5, tcp_flags::ACK))],
            &mut out,
        );
        tracker.evict(S + S / 10, &mut out);
        assert_eq!(out.len(), 3);
        let late = &out[2];
        assert_eq!(
            (late.key, late.flow_start_ns, late.sequence),
            (out_key, 0, 1)
        );
        assert_eq!((late.delta_packets, late.reason), (1, Reason::TcpClose));
        assert_eq!(
            (tracker.len(), tracker.tombstones()),
            (0, 2),
            "and back again"
        );
        // A new connection's SYN+ACK on the reverse key starts a flow of its own.
        tracker.absorb_interval(
            &[(
                in_key,
                stats(1, 60, 2 * S, 2 * S, tcp_flags::SYN | tcp_flags::ACK),
            )],
            &mut out,
        );
        tracker.flush(&mut out);
        assert_eq!((out[3].flow_start_ns, out[3].sequence), (2 * S, 0));
        // Tombstones end with the close timeout after the flow's last packet.
        tracker.evict(S + 5 + 2 * S, &mut out);
        assert_eq!(tracker.tombstones(), 0);
    }
}
