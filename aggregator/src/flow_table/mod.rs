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
//! produced, and [`FlowTable::restore`] rebuilds the table after a restart. Each connection is
//! a row of its own, named by its key and its generation (`stored`): a change writes the one
//! connection that changed, however many earlier ones its key remembers. A connection's stored
//! form has not changed since the first release; it is written by hand
//! (`FlowTable::write_stored`) and checked against serde in debug builds.
//!
//! **Layout.** A live connection costs its entry, so entries are compact (a [`Connection`] of
//! 112 bytes, the key packed in 38, times, links and generation: 184 bytes) and sit in a slab
//! of fixed-size chunks (`slab`); the index from key to entry is a hash table of 4-byte slots,
//! so that its load factor costs bytes, not entries. Connections that ended on a key stay
//! chained behind the key's newest one (`Entry::previous`), in the slab but not in the index.
//!
//! **Work per tick.** A table remembers every connection of the grace period, most of them
//! waiting for nothing but their end, so nothing walks all of them: `emit_due` takes the keys
//! whose chain has a deadline that has come from a queue of slots (`deadlines`; one walk of a
//! due chain emits, forgets and finds its next deadline), and `take_changes` the connections
//! flagged as changed from a set of one bit per slot (`slot_set`). With them a live connection
//! costs ~196 bytes (BENCHMARKS.md).
//!
//! **Connections on a reused 5-tuple.** A key can carry one connection after another (busy
//! clients reuse ports). A record that starts a new flow at its point ([`Observation::starts_flow`];
//! for TCP with a SYN among its first flags) after the key's connection ended and after that
//! connection's last packet begins a new connection: it gets its own state, start and so trace
//! id. The earlier connection stays (`Tracked::previous`) until its grace period is over: its
//! own records that arrive later go to it by their flow start, which lies before its last
//! packet. That needs node clocks to agree within `TCP_REUSE_GAP_NANOS` (10 ms; NTP and chrony
//! do far better), and a tuple reused no sooner than that. Each connection of a key has a
//! generation, one more than the one before it (wrapping); a chain spans fewer than 128
//! generations (it is trimmed to [`MAX_CHAIN`] every [`TRIM_EVERY`]): the oldest closed
//! connections of a key reused faster than that within the grace period are forgotten early,
//! and counted.
//!
//! **Late records.** A closed connection is remembered for a grace period. A late record from a
//! point that counts one of its directions, or of a direction no point counted yet (a
//! connection emitted complete before its reverse direction's record came, say in the agent's
//! next batch), opens one more interval (so totals stay exact); a late record from any other
//! point is ignored and counted, since its packets are already counted elsewhere.

mod deadlines;
mod packed_key;
mod slab;
mod slot_set;
mod stored;

use std::{collections::HashMap, hash::BuildHasher, time::Duration};

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use mermin_protocol::flow::v1::EndReason;

use crate::{
    connection_key::ConnectionKey,
    observation::{Observation, ObservationPoint},
    stitch::{Connection, Flow, InterfaceKinds, PointId, Points, Reporter, StoredWriter},
    store::Change,
};
use deadlines::Deadlines;
use packed_key::PackedKey;
use slab::{NO_SLOT, Slab};
use slot_set::SlotSet;
use stored::{Row, StoredTracked};

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
/// How many generations a key's chain of connections may span when it is trimmed, every
/// [`TRIM_EVERY`] generations: between trims it spans fewer than 128, so that the one-byte
/// generations of its rows never meet and a restore can order them.
const MAX_CHAIN: u8 = 96;
const TRIM_EVERY: u8 = 32;

/// Where the ends of connections live, for emitting complete intervals at once (see the module
/// docs): implemented over the metadata index by the shards.
pub trait EndNodes {
    /// Whether at least one end of `key` has a known place at `at_unix_nanos`, and every known
    /// end has reported among `reporting` ([`ends_reported`]).
    fn all_reported(
        &self,
        key: &ConnectionKey,
        at_unix_nanos: u64,
        reporting: &mut dyn Iterator<Item = Reporter<'_>>,
    ) -> bool;
}

/// Where one end of a connection lives, as far as early completion needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndPlace<'a> {
    pub node: &'a str,
    /// A pod with an interface of its own: its node's agent reports it there (not a
    /// hostNetwork pod, whose node's report is its own).
    pub pod: bool,
}

/// Whether the known ends among `ends` (at least one) have all reported among `reporting`: the
/// end's node has, and at a pod-side point if the end is a pod. A pod's own interface counts
/// the direction the pod sends (the point nearest the sender wins), and its node's agent may
/// report it a batch or a scan after the uplink (a Service's translation is learned per point,
/// scans cut batches by key): emitted on the uplink's records alone, the interval would name
/// the wrong point and drop the pod's records as late.
pub fn ends_reported(
    ends: [Option<EndPlace<'_>>; 2],
    reporting: &mut dyn Iterator<Item = Reporter<'_>>,
) -> bool {
    if ends.iter().all(Option::is_none) {
        return false;
    }
    let reporting: smallvec::SmallVec<[Reporter<'_>; 8]> = reporting.collect();
    ends.iter().flatten().all(|end| {
        if !end.pod {
            return reporting.iter().any(|point| point.node == end.node);
        }
        // A pod end needs a pod interface of its node; two pod ends on one node (same-node
        // traffic) need two different ones: the other pod's interface is not this pod's.
        let pods_there = ends
            .iter()
            .flatten()
            .filter(|e| e.pod && e.node == end.node)
            .count();
        let mut interfaces: smallvec::SmallVec<[&str; 4]> = reporting
            .iter()
            .filter(|point| point.pod_side && point.node == end.node)
            .map(|point| point.interface)
            .collect();
        interfaces.sort_unstable();
        interfaces.dedup();
        interfaces.len() >= pods_there
    })
}

/// Orders a key's stored connections oldest first by their generations, which wrap: the oldest
/// is the one after the widest gap between generations (a chain spans fewer than 128).
fn oldest_first<T>(rows: &mut [(u8, T)]) {
    rows.sort_unstable_by_key(|(generation, _)| *generation);
    let gap_before = |i: usize| {
        let previous = rows[(i + rows.len() - 1) % rows.len()].0;
        rows[i].0.wrapping_sub(previous)
    };
    let oldest = (0..rows.len()).max_by_key(|&i| gap_before(i)).unwrap_or(0);
    rows.rotate_left(oldest);
}

/// Knows no end's node: every interval waits for its settle time.
pub struct NoEndNodes;

impl EndNodes for NoEndNodes {
    fn all_reported(
        &self,
        _: &ConnectionKey,
        _: u64,
        _: &mut dyn Iterator<Item = Reporter<'_>>,
    ) -> bool {
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

/// Bits of [`Entry::state`].
mod state {
    /// The slot holds a connection.
    pub const OCCUPIED: u8 = 1 << 0;
    /// An earlier connection of its key, reached from the key's newest one (not in the index).
    pub const CHAINED: u8 = 1 << 1;
    /// The current interval holds a final record.
    pub const CLOSING: u8 = 1 << 2;
    /// Changed since the table last handed out its changes.
    pub const CHANGED: u8 = 1 << 3;
    /// The current interval holds records and is emitted at the deadline.
    pub const DUE: u8 = 1 << 4;
    /// Closed: kept until the deadline for late records.
    pub const CLOSED: u8 = 1 << 5;
}

/// One connection of one key, with where it is in its life.
struct Entry {
    connection: Connection,
    key: PackedKey,
    /// Start of the connection's first interval (0 until that interval is emitted; times are
    /// never 0: records with a time of 0 are refused).
    start_unix_nanos: u64,
    /// The latest packet of the connection at any point.
    last_packet_unix_nanos: u64,
    /// With `DUE`, when the current interval is emitted; with `CLOSED`, when the connection is
    /// forgotten (the two never hold at once).
    deadline_unix_nanos: u64,
    /// Index of the current interval.
    index: u32,
    /// The slot of the connection this key carried before this one, while it is remembered.
    previous: u32,
    /// [`state`] bits.
    state: u8,
    /// Which connection of its key this is: one more than the one before it, wrapping (its
    /// stored row's name).
    generation: u8,
}

impl Default for Entry {
    /// An empty slot.
    fn default() -> Self {
        Entry {
            connection: Connection::default(),
            key: PackedKey::default(),
            start_unix_nanos: 0,
            last_packet_unix_nanos: 0,
            deadline_unix_nanos: 0,
            index: 0,
            previous: NO_SLOT,
            state: 0,
            generation: 0,
        }
    }
}

impl Entry {
    /// A connection of `key` that has seen nothing yet.
    fn new(key: PackedKey) -> Self {
        Entry {
            key,
            state: state::OCCUPIED,
            ..Entry::default()
        }
    }

    fn has(&self, bit: u8) -> bool {
        self.state & bit != 0
    }

    fn set(&mut self, bit: u8) {
        self.state |= bit;
    }

    fn clear(&mut self, bit: u8) {
        self.state &= !bit;
    }

    /// Whether this is the newest connection of its key (in the index).
    fn is_head(&self) -> bool {
        self.state & (state::OCCUPIED | state::CHAINED) == state::OCCUPIED
    }

    fn due(&self) -> Option<u64> {
        self.has(state::DUE).then_some(self.deadline_unix_nanos)
    }

    /// When the table must look at this connection again: its interval due, or its end.
    fn deadline(&self) -> Option<u64> {
        self.has(state::DUE | state::CLOSED)
            .then_some(self.deadline_unix_nanos)
    }

    fn is_forgotten(&self, now: u64) -> bool {
        self.has(state::CLOSED) && self.deadline_unix_nanos <= now
    }

    /// Makes the current interval due no later than `latest`.
    fn due_no_later_than(&mut self, latest: u64) {
        if self.has(state::DUE) {
            self.deadline_unix_nanos = self.deadline_unix_nanos.min(latest);
        }
    }

    /// Whether `observation` begins a new connection on this key (see the module docs).
    fn is_followed_by(&self, observation: &Observation) -> bool {
        let opens = observation.key.protocol != IPPROTO_TCP
            || observation.counts.first_tcp_flags & SYN != 0;
        observation.starts_flow
            && opens
            && self.has(state::CLOSING | state::CLOSED)
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

    /// Adds `observation`, seen at `point`; false if it was a late record nobody needs.
    fn apply(
        &mut self,
        observation: &Observation,
        point: PointId,
        points: &Points,
        due: u64,
    ) -> bool {
        if self.has(state::CLOSED) {
            if !self.connection.counts_at(point, observation.orientation) {
                return false;
            }
            // A counting point's late record: one more (final) interval.
            self.clear(state::CLOSED);
            self.set(state::CLOSING);
        }
        self.connection
            .note_translation(observation.translation.as_deref());
        self.connection.add(observation, point, points);
        if observation.end_reason != EndReason::ActiveTimeout {
            self.set(state::CLOSING);
        }
        self.last_packet_unix_nanos = self
            .last_packet_unix_nanos
            .max(observation.counts.last_seen_unix_nanos);
        if !self.has(state::DUE) {
            self.set(state::DUE);
            self.deadline_unix_nanos = due;
        }
        true
    }

    /// Emits the current interval (if it holds anything) and starts the next one.
    fn emit(&mut self, now: u64, grace: u64, points: &Points, out: &mut Vec<Emitted>) {
        if let Some(flow) = self.connection.stitch(self.key.key(), points) {
            if self.start_unix_nanos == 0 {
                self.start_unix_nanos = flow.start_unix_nanos.max(1);
            }
            out.push(Emitted {
                flow,
                interval: Interval {
                    connection_start_unix_nanos: self.start_unix_nanos,
                    index: u64::from(self.index),
                },
            });
        }
        self.connection.next_interval();
        self.index = self.index.saturating_add(1);
        self.clear(state::DUE);
        if self.has(state::CLOSING) {
            self.clear(state::CLOSING);
            self.set(state::CLOSED);
            self.deadline_unix_nanos = now + grace;
        }
    }
}

pub struct FlowTable {
    entries: Slab<Entry>,
    /// The slot of each key's newest connection (the head of its chain).
    heads: HashTable<u32>,
    hasher: RandomState,
    /// Head slots by their chain's earliest deadline: what `emit_due` looks at.
    deadlines: Deadlines,
    /// Slots of connections flagged `CHANGED` since the last `take_changes` (a slot may hold
    /// another connection or none by then: the flag decides; a flagged connection's slot is
    /// always here).
    changed: SlotSet,
    /// Rows of connections forgotten since the last `take_changes`, in that order (changed
    /// connections are flagged in their entries).
    forgotten: Vec<Row>,
    /// The observation points the connections refer to, one copy each.
    points: Points,
    kinds: InterfaceKinds,
    settle_ns: u64,
    /// How long a closed connection is remembered.
    grace_ns: u64,
    late_ignored: u64,
    reused_keys: u64,
    complete_early: u64,
    forgotten_early: u64,
}

impl FlowTable {
    pub fn new(kinds: InterfaceKinds, settle: Duration, grace: Duration) -> Self {
        Self {
            entries: Slab::new(),
            heads: HashTable::new(),
            hasher: RandomState::default(),
            deadlines: Deadlines::default(),
            changed: SlotSet::default(),
            forgotten: Vec::new(),
            points: Points::default(),
            kinds,
            settle_ns: settle.as_nanos() as u64,
            grace_ns: grace.as_nanos() as u64,
            late_ignored: 0,
            reused_keys: 0,
            complete_early: 0,
            forgotten_early: 0,
        }
    }

    /// Keys held (with a connection open or in its grace period).
    pub fn len(&self) -> usize {
        self.heads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
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

    /// Closed connections forgotten before their grace period because their key carried
    /// too many later ones within it (see the module docs).
    pub fn forgotten_early(&self) -> u64 {
        self.forgotten_early
    }

    /// Adds `observation`; its interval waits for the settle time.
    pub fn apply(&mut self, observation: &Observation, now: u64) {
        self.apply_knowing(observation, now, &NoEndNodes);
    }

    /// Adds `observation`; its interval is due at once if that makes it complete (see the
    /// module docs).
    pub fn apply_knowing(&mut self, observation: &Observation, now: u64, ends: &dyn EndNodes) {
        let point = self.intern(&observation.point);
        let key = PackedKey::of(&observation.key);
        let head = self.head_of(key);
        if self.entries.get(head).is_followed_by(observation) {
            let mut earlier = std::mem::replace(self.entries.get_mut(head), Entry::new(key));
            earlier.set(state::CHAINED);
            let generation = earlier.generation.wrapping_add(1);
            let moved = self.move_in(earlier);
            let newest = self.entries.get_mut(head);
            newest.previous = moved;
            newest.generation = generation;
            self.mark_changed(head);
            if generation.is_multiple_of(TRIM_EVERY) {
                self.trim_chain(head);
            }
            self.reused_keys += 1;
        }
        let owner = self.owner_of(head, observation);
        let entry = self.entries.get_mut(owner);
        let deadline = entry.deadline();
        if entry.apply(observation, point, &self.points, now + self.settle_ns) {
            if observation.end_reason != EndReason::ActiveTimeout
                && entry.connection.is_final_everywhere()
                && ends.all_reported(
                    &observation.key,
                    observation.flow_start_unix_nanos,
                    &mut entry.connection.reporters(&self.points),
                )
            {
                entry.due_no_later_than(now);
                self.complete_early += 1;
            }
            if entry.deadline() != deadline {
                // Queued for the chain's earliest deadline, not this connection's: one that
                // moved later may leave another connection's deadline the earliest.
                self.schedule(head);
            }
            self.mark_changed(owner);
        } else {
            self.late_ignored += 1;
        }
    }

    /// Emits every interval whose settle time has come, and forgets connections whose grace
    /// period is over.
    pub fn emit_due(&mut self, now: u64, out: &mut Vec<Emitted>) {
        // Each slot looked at once, however often it was queued.
        let mut due: Vec<u32> = self.deadlines.take_due(now).collect();
        due.sort_unstable();
        due.dedup();
        for slot in due {
            if !self.entries.get(slot).is_head() {
                continue; // emptied, or holding an earlier connection of another key
            }
            if !self
                .chain_deadline(slot)
                .is_some_and(|deadline| Deadlines::begun(deadline, now))
            {
                // Queued for a deadline that moved later: the item queued for the new one
                // comes up then (queuing this one again would keep a copy forever).
                continue;
            }
            // One walk of the chain emits and forgets what is due and finds what is next.
            let next = self.emit_chain(slot, now, out);
            let head = self.entries.get(slot);
            if head.is_forgotten(now) {
                self.forgotten
                    .push(Row::Connection(head.key.key(), head.generation));
                match head.previous {
                    NO_SLOT => {
                        let head = self.entries.remove(slot);
                        let hash = self.hasher.hash_one(head.key);
                        self.heads
                            .find_entry(hash, |&s| s == slot)
                            .expect("a head is in the index")
                            .remove();
                        continue;
                    }
                    previous => {
                        // The earlier connection becomes the key's newest, in the head's slot.
                        let mut earlier = self.entries.remove(previous);
                        earlier.clear(state::CHAINED);
                        let changed = earlier.has(state::CHANGED);
                        *self.entries.get_mut(slot) = earlier;
                        if changed {
                            self.changed.insert(slot);
                        }
                    }
                }
            }
            if let Some(next) = next {
                self.deadlines.push(next, slot);
            }
        }
        if self.deadlines.outgrew(self.heads.len()) {
            let queued: Vec<_> = self
                .heads
                .iter()
                .filter_map(|&slot| Some((self.chain_deadline(slot)?, slot)))
                .collect();
            self.deadlines.rebuild(queued);
        }
    }

    /// Emits every interval that holds anything, now (shutdown).
    pub fn flush(&mut self, now: u64, out: &mut Vec<Emitted>) {
        for slot in 0..self.entries.slots() {
            if self.entries.get(slot).is_head() && self.flush_chain(slot, now, out) {
                self.schedule(slot);
            }
        }
    }

    /// The connections changed since the last call, serialized for the store: the forgotten
    /// ones first (a row forgotten and then taken by a new connection ends with its state).
    pub fn take_changes(&mut self) -> Result<Vec<Change>, postcard::Error> {
        let mut changes = self
            .forgotten
            .iter()
            .map(|row| {
                Ok(Change {
                    key: row.name()?,
                    state: None,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Nothing is marked taken before every change is written: after a failure, every
        // change is still pending for the next checkpoint.
        for slot in self.changed.iter() {
            let entry = self.entries.get(slot);
            if !entry.has(state::OCCUPIED) || !entry.has(state::CHANGED) {
                continue;
            }
            let (key, state) = self.write_change(slot)?;
            changes.push(Change {
                key,
                state: Some(state),
            });
        }
        for slot in self.changed.iter() {
            self.entries.get_mut(slot).clear(state::CHANGED);
        }
        self.changed.clear();
        self.forgotten.clear();
        Ok(changes)
    }

    /// The row name of the connection at `slot` and its row (`(ConnectionKey, StoredTracked)`
    /// and the generation), in the stored form: the name is the key's bytes and the generation.
    fn write_change(&self, slot: u32) -> Result<(Vec<u8>, Vec<u8>), postcard::Error> {
        let entry = self.entries.get(slot);
        let key = entry.key.key();
        let mut state = Vec::with_capacity(160);
        let mut out = StoredWriter(&mut state);
        out.serde(&key)?;
        let key_len = out.0.len();
        self.write_stored(slot, &key, &mut out)?;
        out.byte(entry.generation);
        let written = (
            stored::connection_row_name(&state[..key_len], entry.generation),
            state,
        );
        #[cfg(debug_assertions)]
        assert_eq!(
            Some(&written),
            self.serde_change(slot).as_ref().ok(),
            "the hand-written stored form is serde's"
        );
        Ok(written)
    }

    /// What [`FlowTable::write_change`] writes, written by serde from the stored form's types
    /// (their definition): debug builds check every change against it.
    #[cfg(debug_assertions)]
    fn serde_change(&self, slot: u32) -> Result<(Vec<u8>, Vec<u8>), postcard::Error> {
        let entry = self.entries.get(slot);
        let key = entry.key.key();
        let mut state = postcard::to_allocvec(&(key, self.stored(slot)))?;
        state.push(entry.generation);
        Ok((Row::Connection(key, entry.generation).name()?, state))
    }

    /// Divides the table into `parts` tables by `part_of(key)` (each keeps its connections'
    /// unsaved changes), for the shards after a recovery.
    pub fn split(
        mut self,
        parts: usize,
        part_of: impl Fn(&ConnectionKey) -> usize,
    ) -> Vec<FlowTable> {
        let (settle, grace) = (
            Duration::from_nanos(self.settle_ns),
            Duration::from_nanos(self.grace_ns),
        );
        let mut tables: Vec<FlowTable> = (0..parts)
            .map(|_| FlowTable::new(self.kinds.clone(), settle, grace))
            .collect();
        for slot in 0..self.entries.slots() {
            if !self.entries.get(slot).is_head() {
                continue;
            }
            let key = self.entries.get(slot).key;
            let table = &mut tables[part_of(&key.key())];
            let moved = table.adopt(&mut self, slot);
            table.index(key, moved);
        }
        for row in self.forgotten {
            tables[part_of(row.key())].forgotten.push(row);
        }
        tables
    }

    /// Rebuilds the table from stored states; returns how many keys it holds. Pending
    /// intervals are due no later than this table's settle time from `now` (the settle time may
    /// have been shortened since they were stored).
    ///
    /// A key's rows may come in any order; an earlier release's chain row is taken apart into
    /// rows of their own, written at the next checkpoint in its place.
    pub fn restore(
        &mut self,
        states: impl IntoIterator<Item = Vec<u8>>,
        now: u64,
    ) -> Result<usize, postcard::Error> {
        let states: Vec<Vec<u8>> = states.into_iter().collect();
        let mut keys: HashMap<PackedKey, Vec<(u8, StoredTracked)>> = HashMap::new();
        for bytes in &states {
            let (key, mut stored, generation) = stored::read_row(bytes)?;
            stored.due_no_later_than(now + self.settle_ns);
            let packed = PackedKey::of(&key);
            match generation {
                Some(generation) => keys.entry(packed).or_default().push((generation, stored)),
                None => {
                    self.forgotten.push(Row::Chain(key));
                    let rows = (0..=u8::MAX).cycle().zip(stored.into_chain());
                    let head = self.unstore_chain(packed, rows, true);
                    self.index(packed, head);
                    self.trim_chain(head);
                }
            }
        }
        for (key, mut rows) in keys {
            oldest_first(&mut rows);
            let head = self.unstore_chain(key, rows.into_iter(), false);
            self.index(key, head);
        }
        Ok(self.heads.len())
    }

    /// Puts a key's stored connections, oldest first, in the table as one chain (not in the
    /// index); returns its head. `changed`: flag each (to be written).
    fn unstore_chain<'a>(
        &mut self,
        key: PackedKey,
        rows: impl Iterator<Item = (u8, StoredTracked<'a>)>,
        changed: bool,
    ) -> u32 {
        let mut rows = rows.peekable();
        let mut previous = NO_SLOT;
        while let Some((generation, stored)) = rows.next() {
            let chained = rows.peek().is_some();
            previous = self.unstore(key, stored, previous, generation, chained);
            if changed {
                self.mark_changed(previous);
            }
        }
        previous
    }

    /// The id of `point`, after forgetting the points nothing refers to if it is time to.
    fn intern(&mut self, point: &ObservationPoint) -> PointId {
        if self.points.should_collect() {
            let entries = &self.entries;
            self.points.collect(|mark| {
                for slot in 0..entries.slots() {
                    let entry = entries.get(slot);
                    if entry.has(state::OCCUPIED) {
                        entry.connection.mark_points(mark);
                    }
                }
            });
        }
        self.points.intern(point, &self.kinds)
    }

    /// The slot of `key`'s newest connection, made if the key is new.
    fn head_of(&mut self, key: PackedKey) -> u32 {
        let hash = self.hasher.hash_one(key);
        let entries = &self.entries;
        if let Some(&slot) = self.heads.find(hash, |&s| entries.get(s).key == key) {
            return slot;
        }
        let slot = self.entries.insert(Entry::new(key));
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.heads
            .insert_unique(hash, slot, |&s| hasher.hash_one(entries.get(s).key));
        slot
    }

    /// Makes `slot` the head of `key`, in place of any chain the key had.
    fn index(&mut self, key: PackedKey, slot: u32) {
        let hash = self.hasher.hash_one(key);
        let entries = &self.entries;
        match self.heads.find_mut(hash, |&s| entries.get(s).key == key) {
            Some(head) => {
                let replaced = std::mem::replace(head, slot);
                self.remove_chain(replaced);
            }
            None => {
                let (entries, hasher) = (&self.entries, &self.hasher);
                self.heads
                    .insert_unique(hash, slot, |&s| hasher.hash_one(entries.get(s).key));
            }
        }
        self.schedule(slot);
    }

    /// Flags the connection at `slot` as changed for the next `take_changes`.
    fn mark_changed(&mut self, slot: u32) {
        self.entries.get_mut(slot).set(state::CHANGED);
        self.changed.insert(slot);
    }

    /// Puts `entry` in a slot of its own; a changed one stays flagged there.
    fn move_in(&mut self, entry: Entry) -> u32 {
        let changed = entry.has(state::CHANGED);
        let slot = self.entries.insert(entry);
        if changed {
            self.changed.insert(slot);
        }
        slot
    }

    /// Forgets the oldest closed connections of `head`'s chain while it spans [`MAX_CHAIN`]
    /// generations or more (one whose interval is still pending stays: a key is not reused
    /// that fast within a settle time).
    fn trim_chain(&mut self, head: u32) {
        let newest = self.entries.get(head).generation;
        // The chain newest first, walked once; it is cut from its end.
        let mut chain = Vec::new();
        let mut slot = head;
        while slot != NO_SLOT {
            chain.push(slot);
            slot = self.entries.get(slot).previous;
        }
        let trimmed = chain.len();
        while let [.., later, oldest] = chain[..] {
            let entry = self.entries.get(oldest);
            if newest.wrapping_sub(entry.generation) < MAX_CHAIN || entry.has(state::DUE) {
                break;
            }
            let forgotten = self.entries.remove(oldest);
            self.entries.get_mut(later).previous = NO_SLOT;
            self.forgotten
                .push(Row::Connection(forgotten.key.key(), forgotten.generation));
            self.forgotten_early += 1;
            chain.pop();
        }
        if chain.len() < trimmed {
            // What was cut may have held the chain's earliest deadline.
            self.schedule(head);
        }
    }

    /// The earliest deadline of `head`'s chain, if any.
    fn chain_deadline(&self, head: u32) -> Option<u64> {
        let mut earliest: Option<u64> = None;
        let mut slot = head;
        while slot != NO_SLOT {
            let entry = self.entries.get(slot);
            if let Some(deadline) = entry.deadline() {
                earliest = Some(earliest.map_or(deadline, |e| e.min(deadline)));
            }
            slot = entry.previous;
        }
        earliest
    }

    /// Queues `head` for its chain's earliest deadline, if it has one.
    fn schedule(&mut self, head: u32) {
        if let Some(deadline) = self.chain_deadline(head) {
            self.deadlines.push(deadline, head);
        }
    }

    fn remove_chain(&mut self, mut slot: u32) {
        while slot != NO_SLOT {
            slot = self.entries.remove(slot).previous;
        }
    }

    /// The connection of `head`'s chain that `observation` belongs to: the earliest one that
    /// had not ended before the observation's flow began.
    fn owner_of(&self, head: u32, observation: &Observation) -> u32 {
        let mut owner = head;
        loop {
            let previous = self.entries.get(owner).previous;
            if previous == NO_SLOT || !self.entries.get(previous).ended_after(observation) {
                return owner;
            }
            owner = previous;
        }
    }

    /// Emits the due intervals of `slot`'s connection and of the earlier ones it remembers,
    /// earliest first, and forgets the earlier ones whose grace period is over. Returns the
    /// earliest deadline after `now` left in the chain: afterwards only a connection to forget
    /// (`slot`'s, which the caller forgets) has one that is not.
    fn emit_chain(&mut self, slot: u32, now: u64, out: &mut Vec<Emitted>) -> Option<u64> {
        let previous = self.entries.get(slot).previous;
        let mut next = None;
        if previous != NO_SLOT {
            next = self.emit_chain(previous, now, out);
            if self.entries.get(previous).is_forgotten(now) {
                let forgotten = self.entries.remove(previous);
                self.entries.get_mut(slot).previous = forgotten.previous;
                self.forgotten
                    .push(Row::Connection(forgotten.key.key(), forgotten.generation));
            }
        }
        let entry = self.entries.get_mut(slot);
        if entry.due().is_some_and(|due| due <= now) {
            entry.emit(now, self.grace_ns, &self.points, out);
            self.mark_changed(slot);
        }
        let own = self.entries.get(slot).deadline().filter(|&d| d > now);
        next.into_iter().chain(own).min()
    }

    /// Emits every interval of `slot`'s chain that holds anything (shutdown). True if any did.
    fn flush_chain(&mut self, slot: u32, now: u64, out: &mut Vec<Emitted>) -> bool {
        let mut changed = false;
        let previous = self.entries.get(slot).previous;
        if previous != NO_SLOT {
            changed |= self.flush_chain(previous, now, out);
        }
        let entry = self.entries.get_mut(slot);
        if entry.due().is_some() {
            entry.emit(now, self.grace_ns, &self.points, out);
            self.mark_changed(slot);
            changed = true;
        }
        changed
    }

    /// Moves `slot`'s chain from `from` into this table; returns the slot of its head here.
    fn adopt(&mut self, from: &mut FlowTable, slot: u32) -> u32 {
        let mut entry = from.entries.remove(slot);
        if entry.previous != NO_SLOT {
            entry.previous = self.adopt(from, entry.previous);
        }
        let (points, kinds) = (&mut self.points, &self.kinds);
        entry
            .connection
            .map_points(&mut |id| points.intern(from.points.get(id), kinds));
        self.move_in(entry)
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
        let direction = if outbound {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        observation_at(node, interface, direction, outbound, packets, reason)
    }

    /// [`observation`] at the hook `direction` of `interface` (a pod's veth sees what the pod
    /// sends at its ingress).
    fn observation_at(
        node: &str,
        interface: &str,
        direction: Direction,
        outbound: bool,
        packets: u64,
        reason: EndReason,
    ) -> Observation {
        let (src, dst, sport, dport) = if outbound {
            ([10, 0, 0, 1], [10, 0, 0, 2], 40000, 443)
        } else {
            ([10, 0, 0, 2], [10, 0, 0, 1], 443, 40000)
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
        assert_eq!(flow.client_to_server.as_ref().unwrap().packets, 5);
        assert_eq!(flow.server_to_client.as_ref().unwrap().packets, 4);
        assert_eq!(out[0].interval.index, 0);
        assert_eq!(out[0].interval.connection_start_unix_nanos, 10 * S);
    }

    /// 10.0.0.1 is a pod on node "a", 10.0.0.2 is `server` (if known).
    struct Ends {
        server: Option<EndPlace<'static>>,
    }

    impl EndNodes for Ends {
        fn all_reported(
            &self,
            key: &ConnectionKey,
            _: u64,
            reporting: &mut dyn Iterator<Item = Reporter<'_>>,
        ) -> bool {
            let place = |address: std::net::IpAddr| match address.to_string().as_str() {
                "10.0.0.1" => Some(EndPlace {
                    node: "a",
                    pod: true,
                }),
                _ => self.server,
            };
            ends_reported(
                [place(key.first.address), place(key.second.address)],
                reporting,
            )
        }
    }

    /// The server: node "b" itself.
    fn node_b() -> Ends {
        Ends {
            server: Some(EndPlace {
                node: "b",
                pod: false,
            }),
        }
    }

    /// Nothing is due yet; then the client pod's veth on node "a" (`veth1`) reports its final
    /// record (5 packets) and the connection is emitted at once, without the settle time.
    /// Returns what it emitted.
    fn completed_by_the_client_veth(t: &mut FlowTable, ends: &Ends) -> Vec<Emitted> {
        let mut out = Vec::new();
        t.emit_due(100 * S, &mut out);
        assert!(out.is_empty(), "the client pod's veth has not reported");
        let at_client = observation_at(
            "a",
            "veth1",
            Direction::Ingress,
            true,
            5,
            EndReason::TcpClose,
        );
        t.apply_knowing(&at_client, 100 * S + 1, ends);
        t.emit_due(100 * S + 1, &mut out);
        assert_eq!(out.len(), 1, "complete: emitted without the settle time");
        out
    }

    #[test]
    fn a_final_interval_is_due_at_once_when_every_point_and_both_ends_have_reported() {
        let mut t = table();
        let mut out = Vec::new();
        let ends = node_b();
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
        assert_eq!(flow.client_to_server.as_ref().unwrap().packets, 5);
        assert_eq!(flow.points.len(), 3);

        // The server's node unknown: taken to be outside, node a's finals complete it.
        let mut t = table();
        out.clear();
        t.apply_knowing(
            &observation("a", "veth1", true, 5, EndReason::TcpClose),
            100 * S,
            &Ends { server: None },
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

    /// Two pods on one node: the server pod's interface reporting both directions does not
    /// complete the client pod's end; the client's own interface does.
    #[test]
    fn same_node_pods_each_need_their_own_interface() {
        let mut t = table();
        let same_node = Ends {
            server: Some(EndPlace {
                node: "a",
                pod: true,
            }),
        };
        for (direction, outbound) in [(Direction::Egress, true), (Direction::Ingress, false)] {
            let at_server =
                observation_at("a", "veth2", direction, outbound, 5, EndReason::TcpClose);
            t.apply_knowing(&at_server, 100 * S, &same_node);
        }
        let out = completed_by_the_client_veth(&mut t, &same_node);
        let sent = out[0].flow.client_to_server.as_ref().unwrap();
        assert_eq!(sent.point.interface, "veth1");
    }

    /// The client pod's node reports its uplink first and its veth a batch later (a Service's
    /// connection: the scan's records sorted by key put the uplink's first).
    #[test]
    fn a_pod_end_is_complete_only_once_its_own_interface_reported() {
        let mut t = table();
        let ends = node_b();
        t.apply_knowing(
            &observation("a", "eth0", true, 5, EndReason::TcpClose),
            100 * S,
            &ends,
        );
        t.apply_knowing(
            &observation("b", "eth0", false, 4, EndReason::TcpClose),
            100 * S,
            &ends,
        );
        let out = completed_by_the_client_veth(&mut t, &ends);
        let sent = out[0].flow.client_to_server.as_ref().unwrap();
        assert_eq!(
            (
                sent.point.node.as_str(),
                sent.point.interface.as_str(),
                sent.packets
            ),
            ("a", "veth1", 5)
        );
        assert_eq!(t.late_ignored(), 0);
    }

    /// A connection to a server outside the cluster, complete with the client pod's final
    /// record of one direction; the other direction's record comes in the agent's next batch,
    /// after the span went: one more interval counts it, nothing is dropped.
    #[test]
    fn a_direction_reported_after_an_early_emit_opens_one_more_interval() {
        let mut t = table();
        let mut out = Vec::new();
        let outside = Ends { server: None };
        let sent = observation_at(
            "a",
            "veth1",
            Direction::Ingress,
            true,
            5,
            EndReason::TcpClose,
        );
        t.apply_knowing(&sent, 100 * S, &outside);
        t.emit_due(100 * S, &mut out);
        assert_eq!(out.len(), 1, "complete at once");
        assert!(out[0].flow.server_to_client.is_none());
        let answered = observation_at(
            "a",
            "veth1",
            Direction::Egress,
            false,
            4,
            EndReason::TcpClose,
        );
        t.apply_knowing(&answered, 100 * S + 1, &outside);
        t.emit_due(100 * S + 1, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].interval.index, 1);
        assert!(out[1].flow.client_to_server.is_none());
        assert_eq!(out[1].flow.server_to_client.as_ref().unwrap().packets, 4);
        assert_eq!(t.late_ignored(), 0);
        // Both directions decided now: another view of the answer is ignored, and counted.
        let elsewhere = observation("b", "eth0", false, 4, EndReason::TcpClose);
        t.apply_knowing(&elsewhere, 100 * S + 2, &outside);
        t.emit_due(110 * S, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(t.late_ignored(), 1);
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
        assert_eq!(out[1].flow.client_to_server.as_ref().unwrap().packets, 2);
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
            resumed[0].flow.client_to_server.as_ref().unwrap().packets,
            9
        );
        assert_eq!(resumed[0].interval.index, 0, "a connection of its own");
    }

    /// What a live connection costs is its entry (see BENCHMARKS.md): a change that grows it is
    /// a decision, not an accident.
    #[test]
    fn an_entry_takes_184_bytes() {
        assert_eq!(std::mem::size_of::<Connection>(), 112);
        assert_eq!(std::mem::size_of::<Entry>(), 184);
    }

    #[test]
    fn points_nothing_refers_to_are_forgotten_and_the_others_keep_their_names() {
        let mut t = table();
        let mut out = Vec::new();
        // Connection `port` seen at `interface` (one point each).
        let at = |interface: &str, port: u16, reason| {
            let mut o = observation("a", interface, true, 1, reason);
            o.key.first.port = port;
            o
        };
        t.apply(&at("vethkeep", 1, EndReason::ActiveTimeout), 100 * S);
        for port in 2..1_102 {
            t.apply(
                &at(&format!("veth{port}"), port, EndReason::TcpClose),
                100 * S,
            );
        }
        t.emit_due(103 * S, &mut out);
        t.emit_due(134 * S, &mut out);
        assert_eq!(
            (out.len(), t.len()),
            (1_101, 1),
            "the closed ones forgotten"
        );
        assert_eq!(t.points.len(), 1_101, "their points not yet");
        // The kept connection's next interval, then new points until the points have doubled
        // since the collection the first thousand made.
        t.apply(&at("vethkeep", 1, EndReason::ActiveTimeout), 135 * S);
        for port in 2_000..2_950 {
            t.apply(
                &at(&format!("veth{port}"), port, EndReason::ActiveTimeout),
                135 * S,
            );
        }
        assert_eq!(
            t.points.len(),
            1 + 950,
            "only those in use: 2,051 without a collection"
        );
        out.clear();
        t.emit_due(138 * S, &mut out);
        let kept = out.iter().find(|e| e.flow.key.first.port == 1).unwrap();
        assert_eq!(kept.interval.index, 1);
        let sent = kept.flow.client_to_server.as_ref().unwrap();
        assert_eq!(sent.point.interface, "vethkeep");
        assert_eq!(kept.flow.points.len(), 1);
        for e in &out {
            let port = e.flow.key.first.port;
            if port != 1 {
                assert_eq!(e.flow.points[0].interface, format!("veth{port}"));
            }
        }
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

    /// One node's record of one direction of the connection from client port `port`, seen
    /// from `first` to `last`.
    fn on_port(
        port: u32,
        node: &str,
        outbound: bool,
        packets: u64,
        first: u64,
        last: u64,
    ) -> Observation {
        let mut record = FlowRecord {
            node_name: node.into(),
            interface_name: "eth0".into(),
            direction: Direction::Egress as i32,
            source_address: vec![10, 0, 0, 1],
            destination_address: vec![10, 0, 0, 2],
            source_port: port,
            destination_port: 443,
            ip_protocol: 6,
            delta_packets: packets,
            delta_octets: packets * 100,
            first_seen_unix_nanos: first,
            last_seen_unix_nanos: last,
            first_tcp_flags: 0x02,
            tcp_flags: 0x11,
            end_reason: EndReason::TcpClose as i32,
            ..FlowRecord::default()
        };
        if !outbound {
            std::mem::swap(&mut record.source_address, &mut record.destination_address);
            record.destination_port = port;
            record.source_port = 443;
            record.first_tcp_flags = 0x12;
            record.direction = Direction::Ingress as i32;
        }
        Observation::try_from(&record).unwrap()
    }

    #[test]
    fn a_chain_is_looked_at_by_its_earliest_deadline_when_another_moves_later() {
        // Two connections on one port: the older forgotten at 134 s, the newer at 135 s. A late
        // record makes the older one's interval due at 136 s: the newer must still be
        // forgotten at 135 s, not when the older's interval is due.
        let mut t = table();
        let mut out = Vec::new();
        let port = 20_000;
        for start in [100 * S, 101 * S] {
            let last = start + S / 10;
            t.apply(&on_port(port, "a", true, 3, start, last), last);
            t.apply(&on_port(port, "b", false, 2, start, last), last);
        }
        t.emit_due(104 * S, &mut out);
        t.emit_due(105 * S, &mut out);
        assert_eq!(out.len(), 2, "both connections emitted");
        let last = 100 * S + S / 10;
        t.apply(&on_port(port, "a", true, 1, last, last + 1), 133 * S);
        t.take_changes().unwrap();
        let forgotten = |t: &mut FlowTable| {
            t.take_changes()
                .unwrap()
                .iter()
                .filter(|change| change.state.is_none())
                .count()
        };
        t.emit_due(134 * S + S / 5, &mut out);
        assert_eq!(
            forgotten(&mut t),
            0,
            "the older connection's interval is due"
        );
        t.emit_due(135 * S + S / 5, &mut out);
        assert_eq!(
            forgotten(&mut t),
            1,
            "the newer connection forgotten on time"
        );
        assert_eq!(out.len(), 2);
        t.emit_due(136 * S + S / 5, &mut out);
        assert_eq!(out.len(), 3, "the late record's interval");
    }

    #[test]
    fn every_deadline_is_met_while_the_table_looks_only_at_what_is_due() {
        // 40 s of a busy node: 50 connections per 250 ms tick on 200 reused client ports (each
        // port carries a new connection every second), reported by two nodes up to a tick
        // apart, a fifth of them with a late record after their close. Settle 3 s, grace 30 s.
        let mut t = table();
        let mut out = Vec::new();
        let (mut applied, mut seed) = (0u64, 7u64);
        let mut random = move |below: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % below
        };
        let tick = S / 4;
        for step in 0..160u64 {
            let now = 100 * S + step * tick;
            for i in 0..50u64 {
                let port = 20_000 + ((step * 50 + i) % 200) as u32;
                let (first, last) = (now - tick, now - tick / 2);
                let packets = 1 + random(9);
                t.apply(&on_port(port, "a", true, packets, first, last), now);
                t.apply(
                    &on_port(port, "b", false, packets + 1, first, last),
                    now + random(tick),
                );
                applied += 2 * packets + 1;
                if random(5) == 0 {
                    // A retransmitted last ACK from the client's node, after the close.
                    t.apply(&on_port(port, "a", true, 1, last, last + 1), now + 4 * S);
                    applied += 1;
                }
            }
            // Never rebuilt: what comes up stale leaves the queue (before the table
            // queued such items again, this queue held 6 per head and was rebuilt every
            // few seconds).
            assert!(
                !t.deadlines.outgrew(t.heads.len()),
                "{} queued for {} heads",
                t.deadlines.len(),
                t.heads.len()
            );
            t.emit_due(now, &mut out);
            for &head in t.heads.iter() {
                let next = t.chain_deadline(head);
                assert!(
                    next.is_none_or(|d| d > now),
                    "slot {head} was due at {next:?}, now {now}"
                );
            }
        }
        t.emit_due(1_000 * S, &mut out);
        t.emit_due(2_000 * S, &mut out);
        assert!(
            t.is_empty(),
            "every connection forgotten after its grace period"
        );
        let emitted: u64 = out
            .iter()
            .map(|e| {
                e.flow.client_to_server.as_ref().map_or(0, |m| m.packets)
                    + e.flow.server_to_client.as_ref().map_or(0, |m| m.packets)
            })
            .sum();
        assert_eq!(emitted, applied);
        assert_eq!(t.reused_keys(), 160 * 50 - 200);
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
                e.flow.client_to_server.as_ref().map(|m| m.packets),
                e.flow.server_to_client.as_ref().map(|m| m.packets),
            )
        };
        assert_eq!(packets(&out[0]), (Some(5), Some(4)));
        assert_eq!(packets(&out[1]), (Some(7), None));
        assert_eq!(
            out[0].flow.points.len(),
            3,
            "a egress, b ingress, a ingress"
        );
        // Each connection is a row of its own, named by the key and its generation.
        let changes = t.take_changes().unwrap();
        let names: Vec<Vec<u8>> = changes.iter().map(|c| c.key.clone()).collect();
        let key = postcard::to_allocvec(&out[0].flow.key).unwrap();
        assert_eq!(names.len(), 2);
        for (name, generation) in names.iter().zip([1, 0]) {
            assert_eq!(**name, [key.as_slice(), &[generation]].concat());
        }
        // Restored in any order, both are remembered for the grace period, then forgotten.
        let mut restored = table();
        let states = changes.into_iter().rev().filter_map(|c| c.state);
        assert_eq!(restored.restore(states, 104 * S).unwrap(), 1);
        restored.emit_due(200 * S, &mut out);
        assert!(restored.is_empty());
        let forgotten = restored.take_changes().unwrap();
        assert_eq!(
            forgotten
                .into_iter()
                .map(|c| (c.key, c.state.is_none()))
                .collect::<Vec<_>>(),
            [(names[1].clone(), true), (names[0].clone(), true)],
            "the earlier connection's row first"
        );
    }

    /// A late record that gives an earlier connection of a key an interval: the interval is
    /// emitted at its settle time, not when the connection is forgotten.
    #[test]
    fn a_late_interval_of_an_earlier_connection_is_emitted_on_time() {
        let mut t = table();
        let mut out = Vec::new();
        t.apply(&timed("a", true, 5, 10 * S, 11 * S), 100 * S);
        t.apply(&timed("b", false, 4, 10 * S, 11 * S), 100 * S);
        t.emit_due(103 * S, &mut out);
        assert_eq!(out.len(), 1, "connection 1 at its settle time");
        // Connection 2 on the key; connection 1 is remembered until 133 s.
        let second = 11 * S + 50_000_000;
        t.apply(&timed("a", true, 7, second, second + S), 104 * S);
        t.emit_due(107 * S, &mut out);
        assert_eq!(out.len(), 2, "connection 2 at its settle time");
        // Two more packets of connection 1 from the point that counts its client's direction.
        t.apply(&timed("a", true, 2, 10 * S, 11 * S + 10_000_000), 110 * S);
        t.emit_due(112 * S, &mut out);
        assert_eq!(out.len(), 2, "not before its settle time");
        t.emit_due(113 * S, &mut out);
        assert_eq!(
            out.len(),
            3,
            "the late interval at its settle time: {out:#?}"
        );
        let late = &out[2];
        assert_eq!(late.interval.connection_start_unix_nanos, 10 * S);
        assert_eq!(late.interval.index, 1);
        assert_eq!(
            late.flow.client_to_server.as_ref().map(|m| m.packets),
            Some(2)
        );
        // Both forgotten after their grace periods, nothing else emitted.
        t.emit_due(1_000 * S, &mut out);
        assert_eq!(out.len(), 3);
        assert!(t.is_empty());
    }

    /// A key reused again and again: a change writes the connection that changed, whatever
    /// the key remembers; the chain spans fewer than 128 generations (the oldest forgotten
    /// early), and a restore from rows whose generations wrapped keeps each
    /// connection's own counts.
    #[test]
    fn each_connection_of_a_busy_tuple_is_a_row_of_its_own() {
        let mut t = FlowTable::new(
            InterfaceKinds::default(),
            Duration::from_secs(3),
            Duration::from_secs(600),
        );
        let mut out = Vec::new();
        let mut now = 100 * S;
        // The oldest connection the key remembers.
        let mut oldest = 0;
        for i in 0..300u64 {
            // Connection i: 1 + i % 7 packets from the client, 50 ms long, 100 ms apart.
            let first = 10 * S + i * 100_000_000;
            t.apply(&timed("a", true, 1 + i % 7, first, first + 50_000_000), now);
            now += S;
            t.emit_due(now, &mut out);
            // Written: the new connection's row and that of the one emitted (due 3 s after its
            // record, two connections ago); every 32 generations, the removal of those more
            // than 95 generations older. Nothing else of the chain.
            let mut written: Vec<(u8, bool)> = t
                .take_changes()
                .unwrap()
                .iter()
                .map(|c| (*c.key.last().unwrap(), c.state.is_some()))
                .collect();
            written.sort_unstable();
            let mut expected = vec![(i as u8, true)];
            if i >= 2 {
                expected.push(((i - 2) as u8, true));
            }
            if i % 32 == 0 && i - oldest >= 96 {
                expected.extend((oldest..=i - 96).map(|gone| (gone as u8, false)));
                oldest = i - 95;
            }
            expected.sort_unstable();
            assert_eq!(written, expected, "connection {i}");
        }
        assert_eq!(t.reused_keys(), 299);
        assert_eq!(oldest, 193);
        assert_eq!(t.forgotten_early(), 193);
        t.emit_due(now + 5 * S, &mut out);
        assert_eq!(out.len(), 300);
        t.take_changes().unwrap();
        // Every connection's row, generations 193..=255 and 0..=43, restored in a shuffled
        // order: late records of three connections go each to its own.
        let mut rows = Vec::new();
        for slot in 0..t.entries.slots() {
            if t.entries.get(slot).has(state::OCCUPIED) {
                rows.push(t.write_change(slot).unwrap().1);
            }
        }
        assert_eq!(rows.len(), 107);
        rows.sort_by_key(|r| (r[r.len() / 2], r.len()));
        let mut restored = FlowTable::new(
            InterfaceKinds::default(),
            Duration::from_secs(3),
            Duration::from_secs(600),
        );
        assert_eq!(restored.restore(rows, now).unwrap(), 1);
        let mut late = Vec::new();
        for i in [193u64, 255, 299] {
            let first = 10 * S + i * 100_000_000;
            // A retransmission seen by the point that counted the connection.
            restored.apply(&timed("a", true, 2, first, first + 40_000_000), now);
        }
        restored.emit_due(now + 10 * S, &mut late);
        let starts: Vec<(u64, u64)> = late
            .iter()
            .map(|e| {
                let start = (e.interval.connection_start_unix_nanos - 10 * S) / 100_000_000;
                (start, e.flow.client_to_server.as_ref().unwrap().packets)
            })
            .collect();
        assert_eq!(starts, [(193, 2), (255, 2), (299, 2)]);
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
                    e.flow.client_to_server.as_ref().map_or(0, |m| m.packets),
                    e.flow.server_to_client.as_ref().map_or(0, |m| m.packets),
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
        assert_eq!(out[0].flow.client_to_server.as_ref().unwrap().packets, 7);
    }

    /// States written by the release before the compact table (a key with a closed connection
    /// chained behind a new one, translated, its first interval counted at one of two tied
    /// points; a key seen at six points with a tie pending), and what that release emitted after
    /// restoring them and applying two more records: this one emits the same.
    #[test]
    fn states_written_by_an_earlier_release_restore_and_emit_the_same() {
        let states = [
            "06000a000001c0b802000a000205903f01016105766574686100000002cf0180c0fc82aa0280d4e7dfad02120200010161057665746861000080c0fc82aa0280d4e7dfad020200000001000a000001c0b802000a60000a50000a000001c0b802000a000205903f0000018084eabc8405000080d4e7dfad020100000000000001010001016105626f6e64300101016204657468300001000a000001c0b802000a60000a50000a000001c0b802000a000205903f01c0cceca025020000018094c9fdce0580f8cce2840200",
            "06000a000001c1b802000a000205903f030161046574683101000103b3028388aca3cf02809c9780d302120200016105626f6e64300100010497038288aca3cf02809c9780d3021202000162046574683001010106df049488aca3cf0280b082ddd602121200060161046574683101016105626f6e643001016204657468300001620576657468620101620465746839000162046574683001208288aca3cf0280b082ddd60206000000000000018084eabc8405010080b082ddd60200",
        ];
        let mut old = table();
        assert_eq!(
            old.restore(states.iter().map(|h| hex(h)), 170 * S).unwrap(),
            2
        );
        // The next checkpoint removes the two chain rows and writes each connection's row.
        let changes = old.take_changes().unwrap();
        let names = |deleted: bool| {
            let mut names: Vec<Vec<u8>> = changes
                .iter()
                .filter(|c| c.state.is_none() == deleted)
                .map(|c| c.key.clone())
                .collect();
            names.sort();
            names
        };
        // A chain row is named by its key, which its state begins with.
        let key = |state: usize| {
            let (key, _) = postcard::take_from_bytes::<ConnectionKey>(&hex(states[state])).unwrap();
            postcard::to_allocvec(&key).unwrap()
        };
        assert_eq!(names(true), [key(0), key(1)]);
        let row = |state, generation| [key(state), vec![generation]].concat();
        assert_eq!(names(false), [row(0, 0), row(0, 1), row(1, 0)]);
        let mut rewritten = table();
        let rows = changes.into_iter().filter_map(|c| c.state);
        assert_eq!(rewritten.restore(rows, 170 * S).unwrap(), 2);
        for t in [old, rewritten] {
            emits_what_the_earlier_release_emitted(t);
        }
    }

    fn emits_what_the_earlier_release_emitted(mut t: FlowTable) {
        let mut out = Vec::new();
        t.emit_due(173 * S, &mut out);
        let client = |reason, forward, packets, first, last, flags| {
            let (src, dst, sport, dport, direction) = if forward {
                (
                    [10, 0, 0, 1],
                    [10, 0, 2, 5],
                    40000,
                    8080,
                    Direction::Ingress,
                )
            } else {
                ([10, 0, 2, 5], [10, 0, 0, 1], 8080, 40000, Direction::Egress)
            };
            let dialled = Some(mermin_protocol::flow::v1::ConnectionEndpoint {
                address: vec![10, 96, 0, 10],
                port: 80,
            });
            let end = |address: [u8; 4], port| {
                Some(mermin_protocol::flow::v1::ConnectionEndpoint {
                    address: address.to_vec(),
                    port,
                })
            };
            Observation::try_from(&FlowRecord {
                node_name: "a".into(),
                interface_name: "vetha".into(),
                direction: direction as i32,
                source_address: src.to_vec(),
                destination_address: dst.to_vec(),
                source_port: sport,
                destination_port: dport,
                ip_protocol: 6,
                delta_packets: packets,
                delta_octets: packets * 100 + 7,
                first_seen_unix_nanos: first,
                last_seen_unix_nanos: last,
                flow_start_unix_nanos: first,
                first_tcp_flags: flags,
                tcp_flags: flags | 0x10,
                end_reason: reason as i32,
                translation: Some(mermin_protocol::flow::v1::Translation {
                    client: end([10, 0, 0, 1], 40000),
                    dialled,
                    translated_client: end([10, 0, 0, 1], 40000),
                    server: end([10, 0, 2, 5], 8080),
                }),
                ..FlowRecord::default()
            })
            .unwrap()
        };
        t.apply(
            &client(EndReason::TcpClose, false, 1, 80 * S + 5, 82 * S, 0x12),
            174 * S,
        );
        t.apply(
            &client(EndReason::TcpClose, true, 1, 82 * S, 82 * S, 0x10),
            174 * S,
        );
        t.emit_due(177 * S, &mut out);
        t.emit_due(300 * S, &mut out);
        let mut lines: Vec<String> = out.iter().map(summary).collect();
        lines.sort();
        assert_eq!(
            lines,
            [
                "start=80000000000 index=0 10.0.0.1:40000 -> 10.0.2.5:8080 tcp_handshake c2s=2p/207B/0x12/0x2@a/vetha/Ingress s2c=- points=[\"a/vetha/Ingress\"] time=80000000000..81000000000 end=ActiveTimeout dialled=Some(\"10.96.0.10:80\")",
                "start=80000000000 index=1 10.0.0.1:40000 -> 10.0.2.5:8080 tcp_handshake c2s=1p/107B/0x10/0x10@a/vetha/Ingress s2c=1p/107B/0x12/0x12@a/vetha/Egress points=[\"a/vetha/Ingress\", \"a/vetha/Egress\"] time=80000000005..82000000000 end=TcpClose dialled=Some(\"10.96.0.10:80\")",
                "start=90000000002 index=0 10.0.0.1:40001 -> 10.0.2.5:8080 tcp_handshake c2s=4p/407B/0x12/0x2@a/bond0/Egress s2c=6p/607B/0x12/0x12@b/eth0/Egress points=[\"a/bond0/Egress\", \"a/eth1/Egress\", \"b/eth0/Ingress\", \"b/eth0/Egress\", \"b/eth9/Ingress\", \"b/vethb/Egress\"] time=90000000002..92000000000 end=TcpClose dialled=None",
            ]
        );
        assert!(t.is_empty());
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// One emitted interval on a line: everything a span is made of.
    fn summary(e: &Emitted) -> String {
        let f = &e.flow;
        let m = |m: &Option<crate::stitch::Measured>| match m {
            Some(m) => format!(
                "{}p/{}B/{:#x}/{:#x}@{}/{}/{:?}",
                m.packets,
                m.bytes,
                m.tcp_flags,
                m.first_tcp_flags,
                m.point.node,
                m.point.interface,
                m.point.hook
            ),
            None => "-".into(),
        };
        format!(
            "start={} index={} {}:{} -> {}:{} {} c2s={} s2c={} points={:?} time={}..{} end={:?} dialled={:?}",
            e.interval.connection_start_unix_nanos,
            e.interval.index,
            f.client.address,
            f.client.port,
            f.server.address,
            f.server.port,
            f.client_rule.as_str(),
            m(&f.client_to_server),
            m(&f.server_to_client),
            f.points
                .iter()
                .map(|p| format!("{}/{}/{:?}", p.node, p.interface, p.hook))
                .collect::<Vec<_>>(),
            f.start_unix_nanos,
            f.end_unix_nanos,
            f.end_reason,
            f.translation.map(|t| t.dialled.to_string()),
        )
    }
}
