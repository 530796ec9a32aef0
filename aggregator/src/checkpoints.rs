//! The checkpoint writer: one thread that writes the flow shards' checkpoints, those of one tick
//! together — one store write and one flush per tick instead of one per shard.
//!
//! Every shard hands the writer its part each tick: what it has to write ([`Part`]), or that it
//! has nothing ([`CheckpointWriter::skip`]). A round ends when every shard has spoken, or
//! [`LINGER`] after the first part, whichever comes first (a shard busy with a backlog does not
//! hold the others for longer); the parts of a round are written in one
//! [`Storage::checkpoint`](crate::store::Storage::checkpoint) call, atomically, their export
//! requests joined into as few as fit a request's limits, and every shard of the round gets the
//! outcome and its part back. A shard that speaks twice in one round (it
//! cannot while it waits for its part, but a skip can precede a part) ends the round first.
//!
//! The shards' messages gather under a lock, and only the first of a round and the one that
//! completes it wake the writer: a thread woken costs tens of µs of CPU on a busy VM, and the
//! shards of one tick speak one after another, so waking for each message made most of the
//! writer's wake-ups (BENCHMARKS.md).
//!
//! Blocking I/O runs here, on the writer's own thread: never on the arbiters that the shards,
//! the sessions and the exporter share. The thread ends when every handle is dropped, and the
//! pipeline waits for it ([`WriterThread::finished`]) so that the store it holds is closed (and
//! flushed) before the process exits.

use std::{
    collections::HashMap,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use crate::{
    otlp_wire::{JOINED_REQUEST_BYTES, join_entries},
    placement::ShardId,
    store::{BootId, Change, Checkpoint, Store, StoreError},
};

/// How long a round waits for the shards that have not spoken, after the first part.
pub const LINGER: Duration = Duration::from_millis(25);

/// Joined-request buffers kept between rounds: a tick's spans at 5k connections/s fill one; a
/// round after a backlog may fill many, which are let go, as is a buffer grown past a request's
/// limit (an interval larger than a whole request).
const SPARE_BUFFERS: usize = 4;

/// What one shard's checkpoint writes (see [`Checkpoint`]).
#[derive(Debug, Default)]
pub struct Part {
    pub positions: HashMap<BootId, u64>,
    pub changes: Vec<Change>,
    pub outbox: Vec<Vec<u8>>,
}

/// A part, written (or not), handed back to its shard.
pub type Written = (Part, Result<(), StoreError>);

enum Message {
    Part {
        shard: ShardId,
        part: Part,
        done: oneshot::Sender<Written>,
    },
    Skip {
        shard: ShardId,
    },
}

impl Message {
    fn shard(&self) -> ShardId {
        match self {
            Message::Part { shard, .. } | Message::Skip { shard } => *shard,
        }
    }
}

/// The handle the shards hold.
pub struct CheckpointWriter {
    shared: Arc<Shared>,
}

/// What the handles and the writer share.
struct Shared {
    gathering: Mutex<Gathering>,
    /// Signalled by the first message of a round, by the one that completes it, and when the
    /// last handle goes.
    wake: Condvar,
    shards: usize,
}

/// The messages not taken by the writer yet, in the order they came.
struct Gathering {
    messages: Vec<Message>,
    /// Live handles: the writer ends once there are none and it has written every message.
    handles: usize,
    /// The writer's thread has ended (a panic): a message is dropped as it comes, so that its
    /// shard's answer fails instead of never coming.
    writer_gone: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Gathering> {
        self.gathering.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl CheckpointWriter {
    /// Starts the writer for `shards` shards, writing to `store`. Its thread enters the tokio
    /// runtime it is started from, if any: a store may drive futures on it (the replicated
    /// store waits for its quorum there).
    pub fn start(store: Store, shards: usize) -> (Self, WriterThread) {
        let shared = Arc::new(Shared {
            gathering: Mutex::new(Gathering {
                messages: Vec::with_capacity(2 * shards),
                handles: 1,
                writer_gone: false,
            }),
            wake: Condvar::new(),
            shards,
        });
        let runtime = tokio::runtime::Handle::try_current().ok();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("mermin-checkpoints".into())
                .spawn(move || {
                    let _entered = runtime.as_ref().map(tokio::runtime::Handle::enter);
                    let _gone = WriterGone(&shared);
                    run(&store, &shared)
                })
                .expect("spawning the checkpoint writer")
        };
        (CheckpointWriter { shared }, WriterThread(thread))
    }

    /// Writes `part` with the other shards' parts of this tick; the answer comes once it is
    /// written (or failed), with the part.
    pub fn write(&self, shard: ShardId, part: Part) -> oneshot::Receiver<Written> {
        let (done, answer) = oneshot::channel();
        // The writer outlives the handles; if its thread died, the dropped sender answers.
        self.send(Message::Part { shard, part, done });
        answer
    }

    /// This shard has nothing to write this tick.
    pub fn skip(&self, shard: ShardId) {
        self.send(Message::Skip { shard });
    }

    fn send(&self, message: Message) {
        let mut gathering = self.shared.lock();
        if gathering.writer_gone {
            return;
        }
        gathering.messages.push(message);
        let wake = gathering.messages.len() == 1
            || round_length(&gathering.messages, self.shared.shards).is_some();
        drop(gathering);
        if wake {
            self.shared.wake.notify_one();
        }
    }
}

impl Clone for CheckpointWriter {
    fn clone(&self) -> Self {
        self.shared.lock().handles += 1;
        CheckpointWriter {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        let mut gathering = self.shared.lock();
        gathering.handles -= 1;
        let last = gathering.handles == 0;
        drop(gathering);
        if last {
            self.shared.wake.notify_one();
        }
    }
}

/// Marks the writer gone when its thread ends, however it ends, and drops what it left.
struct WriterGone<'a>(&'a Shared);

impl Drop for WriterGone<'_> {
    fn drop(&mut self) {
        let mut gathering = self.0.lock();
        gathering.writer_gone = true;
        gathering.messages.clear();
    }
}

/// How many of `messages`, from the first, make a complete round: `shards` of them, or those
/// before the first shard that speaks twice; `None` while the round may still grow.
fn round_length(messages: &[Message], shards: usize) -> Option<usize> {
    for (i, message) in messages.iter().enumerate() {
        if i == shards || messages[..i].iter().any(|m| m.shard() == message.shard()) {
            return Some(i);
        }
    }
    (messages.len() == shards).then_some(shards)
}

/// The writer's thread, to wait for at the end.
pub struct WriterThread(std::thread::JoinHandle<()>);

impl WriterThread {
    /// Waits until the writer has finished (every handle dropped), at most `bound`; true if it
    /// has.
    pub async fn finished(self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        while !self.0.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.0.join().is_ok()
    }
}

fn run(store: &Store, shared: &Shared) {
    // The buffers of the last round's joined requests, reused by the next.
    let mut spare = Vec::new();
    while let Some(round) = next_round(shared) {
        write(store, round, &mut spare);
    }
}

/// Waits for the next round: a first message, then every shard or [`LINGER`]. `None` once
/// every handle is gone and every message taken.
fn next_round(shared: &Shared) -> Option<Vec<Message>> {
    let mut gathering = shared.lock();
    while gathering.messages.is_empty() {
        if gathering.handles == 0 {
            return None;
        }
        gathering = shared
            .wake
            .wait(gathering)
            .unwrap_or_else(|e| e.into_inner());
    }
    let deadline = Instant::now() + LINGER;
    let length = loop {
        if let Some(length) = round_length(&gathering.messages, shared.shards) {
            break length;
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || gathering.handles == 0 {
            break gathering.messages.len();
        }
        gathering = shared
            .wake
            .wait_timeout(gathering, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    };
    Some(gathering.messages.drain(..length).collect())
}

/// Writes the parts of one round together and answers each; the joined requests' buffers are
/// left in `spare` for the next round.
fn write(store: &Store, round: Vec<Message>, spare: &mut Vec<Vec<u8>>) {
    let (parts, answers): (Vec<(ShardId, Part)>, Vec<oneshot::Sender<Written>>) = round
        .into_iter()
        .filter_map(|message| match message {
            Message::Part { shard, part, done } => Some(((shard, part), done)),
            Message::Skip { .. } => None,
        })
        .unzip();
    if parts.is_empty() {
        if store.write_failure().is_some() {
            // Idle while the store cannot write: an empty checkpoint tells it whether it can
            // again, so that readiness returns without traffic (which a not-ready replica gets
            // none of).
            let _ = store.checkpoint(&[]);
        }
        return;
    }
    // The round's export requests, joined into as few as fit, are written with its first part
    // (the write is one, atomic); each shard's part keeps its own, which it counts.
    let entries: Vec<&[u8]> = parts
        .iter()
        .flat_map(|(_, part)| &part.outbox)
        .map(Vec::as_slice)
        .collect();
    let requests = join_entries(&entries, spare);
    let checkpoints: Vec<Checkpoint<'_>> = parts
        .iter()
        .enumerate()
        .map(|(i, (shard, part))| Checkpoint {
            shard: *shard,
            positions: &part.positions,
            changes: &part.changes,
            outbox: if i == 0 { &requests } else { &[] },
        })
        .collect();
    let result = store.checkpoint(&checkpoints);
    drop(checkpoints);
    spare.extend(
        requests
            .into_iter()
            .filter(|buffer| buffer.capacity() <= JOINED_REQUEST_BYTES),
    );
    spare.truncate(SPARE_BUFFERS);
    for ((_, part), done) in parts.into_iter().zip(answers) {
        let _ = done.send((part, result.clone()));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::{
        SledStore,
        conformance::queued_requests,
        faults::{Faults, FaultyStore},
    };

    /// An outbox entry of `spans` spans whose request is the byte `body`.
    fn entry(spans: u32, body: u8) -> Vec<u8> {
        let mut entry = spans.to_be_bytes().to_vec();
        entry.push(body);
        entry
    }

    /// A sled store in a fresh directory (kept while the test runs), with faults to inject.
    fn faulty_store() -> (tempfile::TempDir, Store, Faults) {
        let dir = tempfile::tempdir().unwrap();
        let sled = SledStore::open(dir.path()).unwrap();
        let (store, faults) = FaultyStore::wrap(sled);
        (dir, store, faults)
    }

    fn part(body: u8) -> Part {
        Part {
            outbox: vec![entry(1, body)],
            ..Part::default()
        }
    }

    #[tokio::test]
    async fn the_parts_of_one_tick_are_one_write_and_each_shard_gets_its_own_back() {
        let (_dir, store, faults) = faulty_store();
        let (writer, thread) = CheckpointWriter::start(store.clone(), 4);
        // Shards 0, 2 and 3 have something, shard 1 nothing: the round ends when all four
        // have spoken, in one write.
        let answers: Vec<_> = [0u16, 2, 3]
            .into_iter()
            .map(|shard| writer.write(shard, part(shard as u8)))
            .collect();
        writer.skip(1);
        for (answer, shard) in answers.into_iter().zip([0u8, 2, 3]) {
            let (part, result) = answer.await.unwrap();
            assert!(result.is_ok());
            assert_eq!(part.outbox, [entry(1, shard)], "its own part back");
        }
        assert_eq!(faults.checkpoint_writes(), 1);
        assert_eq!(
            queued_requests(&*store),
            [vec![0, 0, 0, 3, 0, 2, 3]],
            "one request of the three"
        );

        // A failed write fails every part of its round, which the shards keep.
        faults.fail_writes(true);
        let answers = [writer.write(1, part(7)), writer.write(0, part(8))];
        writer.skip(2);
        writer.skip(3);
        for answer in answers {
            let (part, result) = answer.await.unwrap();
            assert_eq!(
                result.unwrap_err().to_string(),
                "store: No space left on device (injected)"
            );
            assert_eq!(part.outbox.len(), 1);
        }
        assert_eq!(faults.checkpoint_writes(), 2);
        assert_eq!(store.outbox_len(), 1);
        // Its store let go once every handle is.
        drop(writer);
        assert!(thread.finished(Duration::from_secs(5)).await);
        assert_eq!(Arc::strong_count(&store), 1);
    }

    #[tokio::test]
    async fn parts_given_as_the_last_handle_goes_are_written_before_the_writer_ends() {
        let (_dir, store, faults) = faulty_store();
        let (writer, thread) = CheckpointWriter::start(store.clone(), 3);
        let other = writer.clone();
        // Two of three shards speak, and every handle goes: the writer does not wait for the
        // third, writes the two, and ends.
        let answers = [writer.write(0, part(1)), other.write(2, part(2))];
        drop(other);
        drop(writer);
        assert!(thread.finished(Duration::from_secs(5)).await);
        for answer in answers {
            let (_, result) = answer.await.unwrap();
            assert!(result.is_ok());
        }
        assert_eq!(faults.checkpoint_writes(), 1);
        assert_eq!(queued_requests(&*store), [vec![0, 0, 0, 2, 1, 2]]);
    }

    #[tokio::test]
    async fn a_writer_that_died_answers_every_part_with_an_error_at_once() {
        let (_dir, store, faults) = faulty_store();
        let (writer, thread) = CheckpointWriter::start(store.clone(), 1);
        faults.panic_on_checkpoint(true);
        // The round's write panics on the writer's thread: its part's answer fails, and so does
        // every later one, without waiting for a writer that is not there.
        assert!(writer.write(0, part(1)).await.is_err());
        assert!(
            !thread.finished(Duration::from_secs(5)).await,
            "it panicked"
        );
        assert!(writer.write(0, part(2)).await.is_err());
        writer.skip(0);
        assert_eq!(faults.checkpoint_writes(), 1);
        assert_eq!(store.outbox_len(), 0);
    }

    #[tokio::test]
    async fn a_shard_that_speaks_twice_ends_the_round() {
        let (_dir, store, faults) = faulty_store();
        let (writer, _thread) = CheckpointWriter::start(store.clone(), 2);
        // Shard 0 skips a tick, then has a part before shard 1 spoke: two rounds, and the
        // second waits for shard 1 only as long as the linger.
        writer.skip(0);
        let started = Instant::now();
        let (_, result) = writer.write(0, part(1)).await.unwrap();
        assert!(result.is_ok());
        assert!(started.elapsed() >= LINGER, "the round waited for shard 1");
        assert_eq!(
            faults.checkpoint_writes(),
            1,
            "the round of a skip writes nothing"
        );
        assert_eq!(store.outbox_len(), 1);
    }
}
