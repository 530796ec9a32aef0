//! When the table must look at a key again: its head slot queued by the earliest deadline of
//! its chain (an interval due, a closed connection to forget), so that a tick's work follows
//! what is due, not how many connections the table remembers (at 5k new connections/s and a
//! 60 s grace period that is 300k entries, most of them waiting for nothing but their end).
//!
//! The queue may be early, never late: a slot is queued no later than its chain's earliest
//! deadline, and the table checks what is really due when the slot comes up. A deadline that
//! moved later, a slot emptied or given to another key, and a slot queued twice only cost a
//! look; a look that finds the slot's deadline still ahead queues it again.

use std::{cmp::Reverse, collections::BinaryHeap};

#[derive(Default)]
pub(super) struct Deadlines {
    queue: BinaryHeap<Reverse<(u64, u32)>>,
}

impl Deadlines {
    /// Looks at `slot` again no later than `at_unix_nanos`.
    pub fn push(&mut self, at_unix_nanos: u64, slot: u32) {
        self.queue.push(Reverse((at_unix_nanos, slot)));
    }

    /// The next slot queued for `now` or earlier, taken out of the queue.
    pub fn pop_due(&mut self, now_unix_nanos: u64) -> Option<u32> {
        let &Reverse((at, _)) = self.queue.peek()?;
        (at <= now_unix_nanos).then(|| self.queue.pop().expect("peeked").0.1)
    }

    /// Whether the queue holds so many stale items (see the module docs) that it should be
    /// built again from the `live` slots that have a deadline.
    pub fn outgrew(&self, live: usize) -> bool {
        self.queue.len() > 2 * live + 1024
    }

    /// Replaces the queue by `items`: every slot with a deadline, at that deadline.
    pub fn rebuild(&mut self, items: impl IntoIterator<Item = (u64, u32)>) {
        self.queue = items.into_iter().map(Reverse).collect();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_up_in_deadline_order_and_not_before() {
        let mut deadlines = Deadlines::default();
        deadlines.push(30, 1);
        deadlines.push(10, 2);
        deadlines.push(20, 3);
        assert_eq!(deadlines.pop_due(9), None);
        assert_eq!(deadlines.pop_due(25), Some(2));
        assert_eq!(deadlines.pop_due(25), Some(3));
        assert_eq!(deadlines.pop_due(25), None);
        assert_eq!(deadlines.pop_due(30), Some(1));
        assert_eq!(deadlines.pop_due(u64::MAX), None);
    }

    #[test]
    fn a_queue_of_stale_items_is_rebuilt_from_the_live_ones() {
        let mut deadlines = Deadlines::default();
        for slot in 0..1030 {
            deadlines.push(u64::from(slot), slot);
        }
        assert!(deadlines.outgrew(2));
        assert!(!deadlines.outgrew(3));
        deadlines.rebuild([(7, 40), (5, 41)]);
        assert_eq!(deadlines.len(), 2);
        assert_eq!(deadlines.pop_due(100), Some(41));
        assert_eq!(deadlines.pop_due(100), Some(40));
    }
}
