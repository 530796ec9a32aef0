//! A [`Connection`] as the store keeps it: points by their names (a [`PointId`] means nothing
//! outside its table), in the layout connection states have always been written in, so that a
//! store written by an earlier release restores.

use std::borrow::Cow;

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

impl Connection {
    /// This connection as the store keeps it (`key` is its key; `points` the table's).
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
