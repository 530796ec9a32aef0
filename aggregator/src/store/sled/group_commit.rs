//! Group commit: writes made durable together. Every durable write of the sled store (a
//! batch appended, a shard's checkpoint, an outbox push) flushes, and each flush seals a
//! buffer that sled hands to its I/O threads to write and sync, with the thread wake-ups that
//! go with it (at 1,000 connections/s, ~120 syncs a second when every write flushed on its
//! own). Writers that arrive while a flush is running wait for it and are covered by the next
//! one, which one of them runs for all.
//!
//! **The invariant.** A writer takes a ticket *after* its write is applied in memory. A flush
//! covers every ticket taken before it started, so `flushed` only ever moves to a ticket read
//! before the flush began, and only on success. A writer returns once `flushed` has reached its
//! ticket, or with the error of a flush it ran itself; a failed flush covers nobody, so the
//! next writer flushes again and gets its own answer.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use super::DurableDb;

#[derive(Default)]
pub(super) struct GroupCommit {
    /// Tickets taken: writes applied and waiting to be durable.
    written: AtomicU64,
    /// The highest ticket a successful flush covered.
    flushed: AtomicU64,
    /// One blocking flush at a time (the writers queued behind it are what it groups).
    blocking: Mutex<()>,
    /// The same for writers on the async runtime.
    asynchronous: tokio::sync::Mutex<()>,
    /// Flushes run (the tests count how writes were grouped).
    #[cfg(test)]
    flushes: AtomicU64,
}

impl GroupCommit {
    /// Makes the write the caller just applied durable, blocking the thread (the checkpoints,
    /// which run on the blocking pool).
    pub(super) fn flush_blocking(&self, db: &DurableDb) -> sled::Result<()> {
        let ticket = self.ticket();
        let _one = self.blocking.lock().unwrap_or_else(|e| e.into_inner());
        if self.covered(ticket) {
            return Ok(());
        }
        let target = self.written.load(Ordering::SeqCst);
        #[cfg(test)]
        self.flushes.fetch_add(1, Ordering::SeqCst);
        db.flush()?;
        self.flushed.fetch_max(target, Ordering::SeqCst);
        Ok(())
    }

    /// [`Self::flush_blocking`] for async writers: waits without holding a thread.
    pub(super) async fn flush(&self, db: &DurableDb) -> sled::Result<()> {
        let ticket = self.ticket();
        let _one = self.asynchronous.lock().await;
        if self.covered(ticket) {
            return Ok(());
        }
        let target = self.written.load(Ordering::SeqCst);
        db.flush_async().await?;
        self.flushed.fetch_max(target, Ordering::SeqCst);
        Ok(())
    }

    fn ticket(&self) -> u64 {
        self.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn covered(&self, ticket: u64) -> bool {
        self.flushed.load(Ordering::SeqCst) >= ticket
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::Arc,
        time::{Duration, Instant},
    };

    use super::*;

    #[test]
    fn writers_waiting_behind_a_flush_are_covered_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(sled::Config::new(), dir.path()).unwrap();
        let group = Arc::new(GroupCommit::default());
        // A flush "running": the writers queue behind it.
        let running = group.blocking.lock().unwrap();
        let writers: Vec<_> = (0..8u8)
            .map(|i| {
                let (db, group) = (db.clone(), group.clone());
                std::thread::spawn(move || {
                    db.insert([i], &[i]).unwrap();
                    group.flush_blocking(&db)
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while group.written.load(Ordering::SeqCst) < 8 {
            assert!(
                Instant::now() < deadline,
                "the writers did not take tickets"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(running);
        for writer in writers {
            writer.join().unwrap().unwrap();
        }
        assert_eq!(
            group.flushes.load(Ordering::SeqCst),
            1,
            "one flush for eight writes"
        );
        assert_eq!(group.flushed.load(Ordering::SeqCst), 8);
        // A writer after them flushes again.
        db.insert([9], &[9]).unwrap();
        group.flush_blocking(&db).unwrap();
        assert_eq!(group.flushes.load(Ordering::SeqCst), 2);
        drop(db);
        let db = sled::open(dir.path()).unwrap();
        assert_eq!(db.len(), 9, "every write durable");
    }
}
