//! A [`Connection`] as the store keeps it: points by their names (a [`PointId`] means nothing
//! outside its table), in the layout connection states have always been written in, so that a
//! store written by an earlier release restores.
//!
//! The layout is postcard's encoding of [`StoredConnection`] and [`StoredDecisions`]. A
//! checkpoint writes every changed connection, so the write is done by hand
//! ([`Connection::write_stored`], [`StoredWriter`]) from the table's own form, without building
//! the stored one: that was a third of a shard's tick (BENCHMARKS.md). Reading goes through
//! serde; debug builds check every write against serde's output.

use std::{borrow::Cow, num::NonZeroU64};

use mermin_protocol::flow::v1::EndReason;
use serde::{Deserialize, Serialize};

use super::{ClientDecision, ClientRule, Connection, PointId, Points, Tally, direction};
use crate::{
    connection_key::{ConnectionKey, Orientation},
    observation::{Counts, ObservationPoint, Translation},
};

/// The current interval of a connection (points borrowed from the table when written).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredConnection<'a> {
    counted: Vec<StoredTally<'a>>,
    points: Vec<Cow<'a, ObservationPoint>>,
    finals: u8,
    start_unix_nanos: u64,
    end_unix_nanos: u64,
    #[serde(with = "crate::observation::end_reason_number")]
    end_reason: EndReason,
}

/// What a connection decided for its life.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDecisions<'a> {
    client: Option<(bool, ClientRule)>,
    forward_point: Option<Cow<'a, ObservationPoint>>,
    reverse_point: Option<Cow<'a, ObservationPoint>>,
    translation: Option<Translation>,
}

/// One direction's counts at one point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredTally<'a> {
    point: Cow<'a, ObservationPoint>,
    orientation: StoredOrientation,
    /// Not read: the rank follows from the point.
    rank: u8,
    /// `last_seen_unix_nanos` is not kept by the table: written as the interval's end, not read.
    counts: Counts,
    /// Not read: for ICMP it follows from the key, and nothing else uses it.
    icmp_type: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum StoredOrientation {
    Forward,
    Reverse,
}

impl From<usize> for StoredOrientation {
    fn from(d: usize) -> Self {
        if d == direction(Orientation::Forward) {
            StoredOrientation::Forward
        } else {
            StoredOrientation::Reverse
        }
    }
}

impl From<StoredOrientation> for usize {
    fn from(o: StoredOrientation) -> usize {
        direction(match o {
            StoredOrientation::Forward => Orientation::Forward,
            StoredOrientation::Reverse => Orientation::Reverse,
        })
    }
}

/// Appends postcard's encoding of the primitives of the stored forms to a buffer.
pub(crate) struct StoredWriter<'a>(pub(crate) &'a mut Vec<u8>);

impl StoredWriter<'_> {
    /// Any unsigned integer but `u8` (postcard writes them all as the same varint).
    pub(crate) fn varint(&mut self, value: u64) {
        mermin_protocol::wire::put_varint(self.0, value);
    }

    /// A `u8`, written as it is.
    pub(crate) fn byte(&mut self, value: u8) {
        self.0.push(value);
    }

    /// A string: its length, then its bytes.
    fn str(&mut self, value: &str) {
        self.varint(value.len() as u64);
        self.0.extend_from_slice(value.as_bytes());
    }

    pub(crate) fn bool(&mut self, value: bool) {
        self.0.push(u8::from(value));
    }

    /// An `i32` (zigzag varint).
    fn signed(&mut self, value: i32) {
        self.varint(u64::from(((value << 1) ^ (value >> 31)) as u32));
    }

    /// The tag of an `Option` (the value follows a `Some`); returns whether it is one.
    pub(crate) fn option<T>(&mut self, value: Option<T>) -> Option<T> {
        self.bool(value.is_some());
        value
    }

    pub(crate) fn optional_nanos(&mut self, value: Option<NonZeroU64>) {
        if let Some(nanos) = self.option(value) {
            self.varint(nanos.get());
        }
    }

    /// A value through serde (what is rare, or has no hand-written form).
    pub(crate) fn serde<T: Serialize>(&mut self, value: &T) -> Result<(), postcard::Error> {
        *self.0 = postcard::to_extend(value, std::mem::take(self.0))?;
        Ok(())
    }

    /// An observation point, as serde writes one.
    fn point(&mut self, point: &ObservationPoint) {
        self.str(&point.node);
        self.str(&point.interface);
        self.varint(point.hook as u64);
    }
}

impl Connection {
    /// Writes what [`Connection::to_stored`] gives — its [`StoredConnection`], then its
    /// [`StoredDecisions`] — in postcard, as serde would write them.
    pub(crate) fn write_stored(
        &self,
        key: &ConnectionKey,
        points: &Points,
        out: &mut StoredWriter<'_>,
    ) -> Result<(), postcard::Error> {
        let tallies = |d| self.tallies(d).map(move |t| (d, t));
        out.varint((0..2).map(|d| self.tallies(d).count() as u64).sum());
        for (d, t) in tallies(0).chain(tallies(1)) {
            out.point(points.get(t.point));
            out.varint(StoredOrientation::from(d) as u64);
            out.byte(if self.decided_at[d].is_none() {
                points.rank(t.point)
            } else {
                0
            });
            for count in [
                t.packets,
                t.bytes,
                t.first_seen_unix_nanos,
                self.end_unix_nanos,
                u64::from(t.tcp_flags),
                u64::from(t.first_tcp_flags),
            ] {
                out.varint(count);
            }
            out.byte(if d == direction(Orientation::Forward) {
                key.first.port as u8
            } else {
                key.second.port as u8
            });
        }
        out.varint(self.point_ids().count() as u64);
        for id in self.point_ids() {
            out.point(points.get(id));
        }
        out.byte(self.finals);
        out.varint(self.start_unix_nanos);
        out.varint(self.end_unix_nanos);
        out.signed(self.end_reason() as i32);
        if let Some((is_first, rule)) = out.option(self.client.get()) {
            out.bool(is_first);
            out.varint(rule as u64);
        }
        for orientation in [Orientation::Forward, Orientation::Reverse] {
            let point = self.decided_at[direction(orientation)];
            if out.option((!point.is_none()).then_some(point)).is_some() {
                out.point(points.get(point));
            }
        }
        let translation = self.rare.as_ref().and_then(|r| r.translation);
        if let Some(translation) = out.option(translation) {
            out.serde(&translation)?;
        }
        Ok(())
    }

    /// This connection as the store keeps it (`key` is its key; `points` the table's): what
    /// [`Connection::write_stored`] writes, built for debug builds to check it against.
    #[cfg(debug_assertions)]
    pub fn to_stored<'a>(
        &self,
        key: &ConnectionKey,
        points: &'a Points,
    ) -> (StoredConnection<'a>, StoredDecisions<'a>) {
        let named = |id: PointId| Cow::Borrowed(&**points.get(id));
        let name = |id: PointId| (!id.is_none()).then(|| named(id));
        let counted = (0..2)
            .flat_map(|d| self.tallies(d).map(move |t| (d, t)))
            .map(|(d, t)| StoredTally {
                point: named(t.point),
                orientation: d.into(),
                rank: if self.decided_at[d].is_none() {
                    points.rank(t.point)
                } else {
                    0
                },
                counts: Counts {
                    packets: t.packets,
                    bytes: t.bytes,
                    first_seen_unix_nanos: t.first_seen_unix_nanos,
                    last_seen_unix_nanos: self.end_unix_nanos,
                    tcp_flags: u32::from(t.tcp_flags),
                    first_tcp_flags: u32::from(t.first_tcp_flags),
                },
                icmp_type: if d == direction(Orientation::Forward) {
                    key.first.port as u8
                } else {
                    key.second.port as u8
                },
            })
            .collect();
        let connection = StoredConnection {
            counted,
            points: self.point_ids().map(named).collect(),
            finals: self.finals,
            start_unix_nanos: self.start_unix_nanos,
            end_unix_nanos: self.end_unix_nanos,
            end_reason: self.end_reason(),
        };
        let decisions = StoredDecisions {
            client: self.client.get(),
            forward_point: name(self.decided_at[direction(Orientation::Forward)]),
            reverse_point: name(self.decided_at[direction(Orientation::Reverse)]),
            translation: self.rare.as_ref().and_then(|r| r.translation),
        };
        (connection, decisions)
    }

    /// The connection the store kept; `intern` gives a point's id in the table it goes to.
    pub fn from_stored(
        stored: StoredConnection<'_>,
        decisions: StoredDecisions<'_>,
        intern: &mut dyn FnMut(&ObservationPoint) -> PointId,
    ) -> Connection {
        let mut connection = Connection {
            start_unix_nanos: stored.start_unix_nanos,
            end_unix_nanos: stored.end_unix_nanos,
            finals: stored.finals,
            end_reason: stored.end_reason as u8,
            client: decisions.client.map(ClientDecision::of).unwrap_or_default(),
            ..Connection::default()
        };
        connection.decided_at = [decisions.forward_point, decisions.reverse_point]
            .map(|point| point.map_or(PointId::NONE, |p| intern(&p)));
        for point in &stored.points {
            connection.note_point(intern(point));
        }
        for seen in stored.counted {
            let d = usize::from(seen.orientation);
            let tally = Tally::of(intern(&seen.point), &seen.counts);
            if connection.tally(d).is_none() {
                connection.set_tally(d, tally);
            } else {
                connection
                    .rare
                    .get_or_insert_default()
                    .ties
                    .push((d, tally));
            }
        }
        if let Some(translation) = decisions.translation {
            connection.rare.get_or_insert_default().translation = Some(translation);
        }
        connection
    }
}
