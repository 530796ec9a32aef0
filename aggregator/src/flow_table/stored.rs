//! Connections as the store keeps them: a row per connection, named by its key and its
//! generation ([`Row`]), holding `(ConnectionKey, StoredTracked)` in postcard followed by the
//! generation byte. A change writes one connection, however many earlier ones its key
//! remembers.
//!
//! Earlier releases kept a key's whole chain in one row (named by the key alone, each
//! connection with the one before it nested in `previous`, nothing after it); such rows are
//! still read, and rewritten as rows of their own at the next checkpoint. A row of its own
//! always has `previous: None`.

use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

use super::{Entry, FlowTable, PackedKey, state};
use crate::{
    connection_key::ConnectionKey,
    stitch::{Connection, StoredConnection, StoredDecisions, StoredWriter},
};

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct StoredTracked<'a> {
    connection: StoredConnection<'a>,
    decisions: StoredDecisions<'a>,
    /// Start of the connection's first interval.
    start_unix_nanos: Option<NonZeroU64>,
    /// Index of the current interval.
    index: u64,
    /// When the current interval is emitted; `None` while it is empty.
    due_unix_nanos: Option<NonZeroU64>,
    /// The current interval holds a final record.
    closing: bool,
    /// Closed: kept until this time for late records.
    closed_until: Option<NonZeroU64>,
    /// The latest packet of the connection at any point.
    last_packet_unix_nanos: u64,
    /// The connection this key carried before this one, while it is remembered.
    previous: Option<Box<StoredTracked<'a>>>,
}

impl StoredTracked<'_> {
    /// Moves every pending interval of the chain to `latest` if it is due later.
    pub(super) fn due_no_later_than(&mut self, latest: u64) {
        if let Some(due) = &mut self.due_unix_nanos {
            *due = (*due).min(nanos(latest));
        }
        if let Some(previous) = &mut self.previous {
            previous.due_no_later_than(latest);
        }
    }

    /// The chain of an earlier release's row, oldest connection first.
    pub(super) fn into_chain(self) -> Vec<Self> {
        let mut chain = Vec::new();
        let mut next = Some(self);
        while let Some(mut stored) = next {
            next = stored.previous.take().map(|previous| *previous);
            chain.push(stored);
        }
        chain.reverse();
        chain
    }
}

/// The name of a stored row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Row {
    /// One connection of a key: `postcard(key)` and the generation byte.
    Connection(ConnectionKey, u8),
    /// A key's whole chain, as earlier releases wrote it: `postcard(key)`.
    Chain(ConnectionKey),
}

impl Row {
    pub(super) fn key(&self) -> &ConnectionKey {
        match self {
            Row::Connection(key, _) | Row::Chain(key) => key,
        }
    }

    pub(super) fn name(&self) -> Result<Vec<u8>, postcard::Error> {
        let key = postcard::to_allocvec(self.key())?;
        Ok(match self {
            Row::Connection(_, generation) => connection_row_name(&key, *generation),
            Row::Chain(_) => key,
        })
    }
}

/// The name of a connection's row, from its key's bytes (`postcard(key)`).
pub(super) fn connection_row_name(key: &[u8], generation: u8) -> Vec<u8> {
    let mut name = Vec::with_capacity(key.len() + 1);
    name.extend_from_slice(key);
    name.push(generation);
    name
}

/// A stored row read back: a connection of its own with its generation, or an earlier
/// release's chain.
pub(super) fn read_row(
    bytes: &[u8],
) -> Result<(ConnectionKey, StoredTracked<'_>, Option<u8>), postcard::Error> {
    let ((key, stored), rest): ((ConnectionKey, StoredTracked), _) =
        postcard::take_from_bytes(bytes)?;
    match rest {
        [] => Ok((key, stored, None)),
        [generation] if stored.previous.is_none() => Ok((key, stored, Some(*generation))),
        _ => Err(postcard::Error::DeserializeBadEncoding),
    }
}

impl FlowTable {
    /// Writes what [`FlowTable::stored`] gives for `slot`, in postcard, as serde would.
    pub(super) fn write_stored(
        &self,
        slot: u32,
        key: &ConnectionKey,
        out: &mut StoredWriter<'_>,
    ) -> Result<(), postcard::Error> {
        let entry = self.entries.get(slot);
        entry.connection.write_stored(key, &self.points, out)?;
        let deadline = |bit| entry.has(bit).then(|| nanos(entry.deadline_unix_nanos));
        out.optional_nanos(NonZeroU64::new(entry.start_unix_nanos));
        out.varint(u64::from(entry.index));
        out.optional_nanos(deadline(state::DUE));
        out.bool(entry.has(state::CLOSING));
        out.optional_nanos(deadline(state::CLOSED));
        out.varint(entry.last_packet_unix_nanos);
        // `previous`: none nested, each connection is a row of its own.
        out.option(None::<()>);
        Ok(())
    }

    /// The connection at `slot`, as the store keeps it.
    #[cfg(debug_assertions)]
    pub(super) fn stored(&self, slot: u32) -> StoredTracked<'_> {
        let entry = self.entries.get(slot);
        let (connection, decisions) = entry.connection.to_stored(&entry.key.key(), &self.points);
        let deadline = |bit| entry.has(bit).then(|| nanos(entry.deadline_unix_nanos));
        StoredTracked {
            connection,
            decisions,
            start_unix_nanos: NonZeroU64::new(entry.start_unix_nanos),
            index: u64::from(entry.index),
            due_unix_nanos: deadline(state::DUE),
            closing: entry.has(state::CLOSING),
            closed_until: deadline(state::CLOSED),
            last_packet_unix_nanos: entry.last_packet_unix_nanos,
            previous: None,
        }
    }

    /// Puts one stored connection of `key` in the table (not in the index), behind `previous`;
    /// returns its slot. A stored connection both due and closed (never written) is closed.
    pub(super) fn unstore(
        &mut self,
        key: PackedKey,
        stored: StoredTracked<'_>,
        previous: u32,
        generation: u8,
        chained: bool,
    ) -> u32 {
        let (points, kinds) = (&mut self.points, &self.kinds);
        let connection = Connection::from_stored(stored.connection, stored.decisions, &mut |p| {
            points.intern(p, kinds)
        });
        let mut entry = Entry {
            connection,
            start_unix_nanos: stored.start_unix_nanos.map_or(0, NonZeroU64::get),
            last_packet_unix_nanos: stored.last_packet_unix_nanos,
            index: u32::try_from(stored.index).unwrap_or(u32::MAX),
            previous,
            generation,
            ..Entry::new(key)
        };
        if chained {
            entry.set(state::CHAINED);
        }
        if stored.closing {
            entry.set(state::CLOSING);
        }
        if let Some(until) = stored.closed_until {
            entry.set(state::CLOSED);
            entry.deadline_unix_nanos = until.get();
        } else if let Some(due) = stored.due_unix_nanos {
            entry.set(state::DUE);
            entry.deadline_unix_nanos = due.get();
        }
        self.entries.insert(entry)
    }
}

/// A time as the stored form keeps it (never 0).
fn nanos(unix_nanos: u64) -> NonZeroU64 {
    NonZeroU64::new(unix_nanos).unwrap_or(NonZeroU64::MIN)
}
