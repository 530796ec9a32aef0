//! When the table must look at a key again: its head slot queued by the earliest deadline of
//! its chain (an interval due, a closed connection to forget), so that a tick's work follows
//! what is due, not how many connections the table remembers (at 5k new connections/s and a
//! 60 s grace period that is 300k entries, most of them waiting for nothing but their end).
//!
//! The queue may be early, never late: a slot is queued in the bucket of its deadline (2^26 ns,
//! ~67 ms, wide), and a bucket is taken as soon as it begins; the table checks what is really
//! due and queues again what is not. A slot emptied or given to another key, or queued for a
//! deadline that has since moved later, costs a look and leaves the queue (the table queues
//! again only a slot whose deadline's bucket has begun, once per take): the queue holds about
//! one item per connection with a deadline, plus the moves since the last take. An item is a slot alone (4 bytes: the
//! queue is part of what a live flow costs, see BENCHMARKS.md).

use std::collections::BTreeMap;

/// log2 of a bucket's width in nanoseconds.
const BUCKET_SHIFT: u32 = 26;

#[derive(Default)]
pub(super) struct Deadlines {
    /// Slots by the bucket their deadline falls in.
    buckets: BTreeMap<u64, Vec<u32>>,
    len: usize,
}

impl Deadlines {
    /// Looks at `slot` again no later than `at_unix_nanos`.
    pub fn push(&mut self, at_unix_nanos: u64, slot: u32) {
        self.buckets
            .entry(at_unix_nanos >> BUCKET_SHIFT)
            .or_default()
            .push(slot);
        self.len += 1;
    }

    /// Takes out every slot whose bucket has begun by `now_unix_nanos` (what is due, and what
    /// may be due within a bucket's width): slots queued while these are looked at wait for
    /// the next call.
    pub fn take_due(&mut self, now_unix_nanos: u64) -> impl Iterator<Item = u32> + use<> {
        let later = self
            .buckets
            .split_off(&((now_unix_nanos >> BUCKET_SHIFT) + 1));
        let due = std::mem::replace(&mut self.buckets, later);
        self.len -= due.values().map(Vec::len).sum::<usize>();
        due.into_values().flatten()
    }

    /// Whether the bucket of `deadline` has begun by `now_unix_nanos`: then an item queued
    /// for it is among those [`Deadlines::take_due`] takes.
    pub fn begun(deadline: u64, now_unix_nanos: u64) -> bool {
        deadline >> BUCKET_SHIFT <= now_unix_nanos >> BUCKET_SHIFT
    }

    /// Whether the queue holds so many stale items (see the module docs) that it should be
    /// built again from the `live` slots that have a deadline.
    pub fn outgrew(&self, live: usize) -> bool {
        self.len > 2 * live + 1024
    }

    /// Replaces the queue by `items`: every slot with a deadline, at that deadline.
    pub fn rebuild(&mut self, items: impl IntoIterator<Item = (u64, u32)>) {
        *self = Deadlines::default();
        for (at, slot) in items {
            self.push(at, slot);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUCKET: u64 = 1 << BUCKET_SHIFT;

    fn due(deadlines: &mut Deadlines, now: u64) -> Vec<u32> {
        deadlines.take_due(now).collect()
    }

    #[test]
    fn slots_come_up_by_deadline_never_after_it() {
        let mut deadlines = Deadlines::default();
        deadlines.push(10 * BUCKET + 5, 1);
        deadlines.push(3 * BUCKET + 7, 2);
        deadlines.push(3 * BUCKET + 9, 3);
        deadlines.push(7 * BUCKET, 4);
        assert_eq!(due(&mut deadlines, 3 * BUCKET - 1), Vec::<u32>::new());
        assert_eq!(
            due(&mut deadlines, 3 * BUCKET),
            [2, 3],
            "early: the bucket has begun"
        );
        assert_eq!(deadlines.len(), 2);
        // Queued again while not due: it waits for the next call.
        deadlines.push(3 * BUCKET + 9, 3);
        assert_eq!(due(&mut deadlines, 7 * BUCKET), [3, 4]);
        assert_eq!(due(&mut deadlines, 10 * BUCKET + 4), [1]);
        assert_eq!(due(&mut deadlines, u64::MAX), Vec::<u32>::new());
        assert_eq!(deadlines.len(), 0);
    }

    #[test]
    fn a_queue_of_stale_items_is_rebuilt_from_the_live_ones() {
        let mut deadlines = Deadlines::default();
        for slot in 0..1030 {
            deadlines.push(u64::from(slot) * BUCKET, slot);
        }
        assert!(deadlines.outgrew(2));
        assert!(!deadlines.outgrew(3));
        deadlines.rebuild([(7 * BUCKET, 40), (5 * BUCKET, 41)]);
        assert_eq!(deadlines.len(), 2);
        assert_eq!(due(&mut deadlines, 100 * BUCKET), [41, 40]);
    }
}
