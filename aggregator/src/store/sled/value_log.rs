//! Large values kept out of sled: agent batches and export requests (and the replicas' Raft log
//! entries, `replication::log`) are appended to segment files of our own, and sled holds a
//! 25-byte pointer to each.
//!
//! Why: sled 0.34 keeps values inside its tree nodes, and every time a node is rewritten (a
//! split, a consolidation, a removal next to it) it writes the whole node again — each large
//! value beside the one that changed, as a blob file of its own when the node is over 128 KiB.
//! Profiled at 5k connections/s, that was a third of the aggregator's CPU: blob writes from
//! checkpoints (export requests), from appends (batches), and from *removing* applied batches.
//! Here a value is written once, with one `pwrite`, and dropped with its whole segment.
//!
//! - **Layout.** `values/<id>.seg` (a Raft log's: `log-values/<group>/<id>.seg`), ids rising; a segment is only appended to by the process
//!   that created it (a restart starts a new one), and sealed at [`SEGMENT_BYTES`]. Beside
//!   them `values/reserve`: space held back for getting out of a full disk
//!   ([`ValueLog::release_reserve`]).
//! - **Pointers.** `[TAG][segment u64][offset u64][length u32][crc32 u32]`, big-endian. The tag
//!   (0) never starts a value stored inline by earlier versions (a protobuf message's first byte
//!   is a field key, never 0), so both read back: [`ValueLog::resolve`].
//! - **Durable before referenced.** [`ValueLog::append`] returns once the value is on stable
//!   storage (`fdatasync`; the directory synced when a segment is created): a pointer sled makes
//!   durable — sled writes its log whenever it likes — never names bytes a power loss can take.
//! - **Freed a segment at a time.** The log counts the live values of each segment (rebuilt from
//!   sled's pointers at open). A sealed segment without live values is deleted, but only after a
//!   durable flush of sled that made the removals durable ([`ValueLog::take_dead`], then
//!   [`ValueLog::delete`]): a crash never brings back a pointer into a deleted file. A value that
//!   stays (an export request waiting out an outage) keeps its whole segment on disk. The
//!   standalone store frees segments at each checkpoint's flush; a replica's state machine,
//!   which does not flush per entry, when it builds a snapshot (as its Raft log is purged then
//!   too).

use std::{
    borrow::Cow,
    collections::HashMap,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use super::StoreError;

/// A segment is sealed, and a new one begun, once it holds this many bytes.
pub(super) const SEGMENT_BYTES: u64 = 64 << 20;

/// What [`ValueLog::probe`] writes: a page.
const PROBE_BYTES: usize = 4096;

/// The free space [`ValueLog::has_room`] asks of the data filesystem: room for a full batch
/// (10,000 records encode to well under 1 MiB). A value that fits in the last page a segment
/// already holds is written even on a full disk, so that one went through shows nothing.
const PROBE_ROOM_BYTES: u64 = 1 << 20;

/// Space the log holds back in a file of its own ([`ValueLog::release_reserve`]): a disk that
/// filled up gets it back, so that a checkpoint can make removals durable and delete the
/// segments they freed — recovering from a full disk never needs space the disk does not have.
const RESERVE_BYTES: u64 = 1 << 20;
const RESERVE_FILE: &str = "reserve";

const TAG: u8 = 0;
const POINTER_LEN: usize = 1 + 8 + 8 + 4 + 4;

/// Where a value is, and its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pointer {
    segment: u64,
    offset: u64,
    len: u32,
    crc: u32,
}

impl Pointer {
    pub(crate) fn encode(&self) -> [u8; POINTER_LEN] {
        let mut bytes = [TAG; POINTER_LEN];
        bytes[1..9].copy_from_slice(&self.segment.to_be_bytes());
        bytes[9..17].copy_from_slice(&self.offset.to_be_bytes());
        bytes[17..21].copy_from_slice(&self.len.to_be_bytes());
        bytes[21..25].copy_from_slice(&self.crc.to_be_bytes());
        bytes
    }

    /// The length of the value pointed to.
    pub(super) fn len(&self) -> u64 {
        u64::from(self.len)
    }

    /// The pointer `stored` is, or `None` if it is a value stored inline.
    pub(crate) fn decode(stored: &[u8]) -> Option<Pointer> {
        let bytes: &[u8; POINTER_LEN] = stored.try_into().ok()?;
        if bytes[0] != TAG {
            return None;
        }
        let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8"));
        let u32_at = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4"));
        Some(Pointer {
            segment: u64_at(1),
            offset: u64_at(9),
            len: u32_at(17),
            crc: u32_at(21),
        })
    }

    /// The length of the value stored as `stored` (a pointer or the value itself).
    pub(super) fn value_len(stored: &[u8]) -> u64 {
        Pointer::decode(stored).map_or(stored.len() as u64, |p| u64::from(p.len))
    }
}

pub(crate) struct ValueLog {
    dir: PathBuf,
    /// Whether this log holds a reserve ([`ValueLog::hold_reserve`]) that is not in place now
    /// (given back, or not yet written).
    reserve_owed: AtomicBool,
    state: Mutex<State>,
}

struct State {
    active: Arc<File>,
    active_id: u64,
    active_len: u64,
    /// Live values per segment (the active one included).
    live: HashMap<u64, u64>,
    /// Open handles of the segments read or written (the active one included).
    files: HashMap<u64, Arc<File>>,
    /// Sealed segments without live values, waiting for a durable flush.
    dead: Vec<u64>,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

fn backend(what: &str, err: io::Error) -> StoreError {
    StoreError::Backend(format!("value log: {what}: {err}"))
}

impl ValueLog {
    /// Opens the log in `dir` (created if missing), counting as live the values `pointers`
    /// name, deleting the segments none of them names, and beginning a new segment.
    pub(crate) fn open(
        dir: &Path,
        pointers: impl IntoIterator<Item = Pointer>,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| backend("creating its directory", e))?;
        let mut live: HashMap<u64, u64> = HashMap::new();
        for pointer in pointers {
            *live.entry(pointer.segment).or_default() += 1;
        }
        let mut newest = 0;
        for entry in std::fs::read_dir(dir).map_err(|e| backend("listing segments", e))? {
            let path = entry.map_err(|e| backend("listing segments", e))?.path();
            let Some(id) = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(".seg"))
                .and_then(|id| u64::from_str_radix(id, 16).ok())
            else {
                continue;
            };
            newest = newest.max(id);
            if !live.contains_key(&id) {
                std::fs::remove_file(&path).map_err(|e| backend("deleting a free segment", e))?;
            }
        }
        let active_id = newest + 1;
        let active = Arc::new(create_segment(dir, active_id)?);
        let files = HashMap::from([(active_id, active.clone())]);
        Ok(Self {
            dir: dir.to_owned(),
            reserve_owed: AtomicBool::new(false),
            state: Mutex::new(State {
                active,
                active_id,
                active_len: 0,
                live,
                files,
                dead: Vec::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `value` durably; returns where it is. Blocking (one `pwrite`, one `fdatasync`).
    pub(super) fn append(&self, value: &[u8]) -> Result<Pointer, StoreError> {
        let mut pointers = self.append_all([value])?;
        Ok(pointers.pop().expect("one value appended"))
    }

    /// Writes each of `values` durably, in order — one `pwrite` each, one `fdatasync` per
    /// segment for all of them; none of them if one fails.
    pub(crate) fn append_all<'a>(
        &self,
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<Pointer>, StoreError> {
        let mut pointers = Vec::new();
        // The segments written to, each once, in order.
        let mut written: Vec<(u64, Arc<File>)> = Vec::new();
        for value in values {
            match self.write(value) {
                Ok((file, pointer)) => {
                    if written.last().is_none_or(|(id, _)| *id != pointer.segment) {
                        written.push((pointer.segment, file));
                    }
                    pointers.push(pointer);
                }
                Err(err) => {
                    self.release_all(pointers);
                    return Err(err);
                }
            }
        }
        for (_, file) in written {
            if let Err(err) = file.sync_data() {
                self.release_all(pointers);
                return Err(backend("syncing values", err));
            }
        }
        Ok(pointers)
    }

    /// Reserves room for `value` in the active segment and writes it there (not yet durable).
    fn write(&self, value: &[u8]) -> Result<(Arc<File>, Pointer), StoreError> {
        let len = u32::try_from(value.len())
            .map_err(|_| StoreError::Backend("value log: a value over 4 GiB".into()))?;
        let crc = crc32fast::hash(value);
        let (file, pointer) = {
            let mut state = self.state();
            if state.active_len >= SEGMENT_BYTES {
                self.rotate(&mut state)?;
            }
            let pointer = Pointer {
                segment: state.active_id,
                offset: state.active_len,
                len,
                crc,
            };
            // Reserved under the lock, written outside it: appends of different values run
            // at once.
            state.active_len += u64::from(len);
            *state.live.entry(pointer.segment).or_default() += 1;
            (state.active.clone(), pointer)
        };
        if let Err(err) = file.write_all_at(value, pointer.offset) {
            self.release(pointer);
            return Err(backend("writing a value", err));
        }
        Ok((file, pointer))
    }

    /// Whether the log takes a write now: appends (and lets go of) a block of [`PROBE_BYTES`],
    /// which a full or failing disk refuses.
    pub(super) fn probe(&self) -> Result<(), StoreError> {
        self.append(&[0; PROBE_BYTES])
            .map(|pointer| self.release(pointer))
    }

    /// Whether the data filesystem has room for a batch ([`PROBE_ROOM_BYTES`] free, and the
    /// reserve's [`RESERVE_BYTES`] besides while it is given back); `true` if it cannot tell
    /// (then the writes that succeed are all there is to go by). Free space as this process
    /// may use it: root's too (ext4 keeps 5% for root by default) when it runs as root.
    pub(super) fn has_room(&self) -> bool {
        let owed = self.reserve_owed.load(Ordering::Relaxed);
        let needed = PROBE_ROOM_BYTES + if owed { RESERVE_BYTES } else { 0 };
        match rustix::fs::statvfs(&self.dir) {
            Ok(room) => {
                let blocks = if rustix::process::geteuid().is_root() {
                    room.f_bfree
                } else {
                    room.f_bavail
                };
                blocks.saturating_mul(room.f_frsize) >= needed
            }
            Err(_) => true,
        }
    }

    pub(super) fn reserve_path(&self) -> PathBuf {
        self.dir.join(RESERVE_FILE)
    }

    /// Holds [`RESERVE_BYTES`] back from now on (the standalone store's log; a replica's, which
    /// never writes checkpoints through [`ValueLog::release_reserve`]'s caller, does not).
    pub(super) fn hold_reserve(&self) {
        self.reserve_owed.store(true, Ordering::Relaxed);
        self.keep_reserve();
    }

    /// Puts the reserve in place if it is owed: best effort (a disk without the room goes
    /// without, until a later call); otherwise one atomic load. Allocated, not merely written
    /// (a compressing filesystem would store zeros in nothing), and whole or not at all:
    /// written aside, then renamed. Blocking.
    pub(super) fn keep_reserve(&self) {
        if !self.reserve_owed.load(Ordering::Relaxed) {
            return;
        }
        let in_place =
            std::fs::metadata(self.reserve_path()).is_ok_and(|m| m.len() == RESERVE_BYTES);
        let aside = self.dir.join(format!("{RESERVE_FILE}.new"));
        let written = in_place
            || File::create(&aside)
                .and_then(|file| {
                    if rustix::fs::fallocate(
                        &file,
                        rustix::fs::FallocateFlags::empty(),
                        0,
                        RESERVE_BYTES,
                    )
                    .is_err()
                    {
                        file.write_all_at(&vec![0; RESERVE_BYTES as usize], 0)?;
                    }
                    file.sync_data()?;
                    std::fs::rename(&aside, self.reserve_path())
                })
                .is_ok();
        if written {
            self.reserve_owed.store(false, Ordering::Relaxed);
        } else {
            let _ = std::fs::remove_file(&aside);
        }
    }

    /// Gives the reserve back to the filesystem; whether there was one.
    pub(super) fn release_reserve(&self) -> bool {
        let released = std::fs::remove_file(self.reserve_path()).is_ok();
        if released {
            self.reserve_owed.store(true, Ordering::Relaxed);
        }
        released
    }

    /// [`ValueLog::release`] of each of `pointers`.
    pub(crate) fn release_all(&self, pointers: impl IntoIterator<Item = Pointer>) {
        for pointer in pointers {
            self.release(pointer);
        }
    }

    fn rotate(&self, state: &mut State) -> Result<(), StoreError> {
        let id = state.active_id + 1;
        let file = Arc::new(create_segment(&self.dir, id)?);
        let sealed = std::mem::replace(&mut state.active_id, id);
        state.active = file.clone();
        state.active_len = 0;
        state.files.insert(id, file);
        if state.live.get(&sealed).is_none_or(|&n| n == 0) {
            state.live.remove(&sealed);
            state.dead.push(sealed);
        }
        Ok(())
    }

    /// The value `stored` holds: itself if it was stored inline, else the bytes it points to.
    pub(super) fn resolve<'a>(&self, stored: &'a [u8]) -> Result<Cow<'a, [u8]>, StoreError> {
        match Pointer::decode(stored) {
            None => Ok(Cow::Borrowed(stored)),
            Some(pointer) => self.read(pointer).map(Cow::Owned),
        }
    }

    pub(crate) fn read(&self, pointer: Pointer) -> Result<Vec<u8>, StoreError> {
        let file = self.file(pointer.segment)?;
        let mut value = vec![0; pointer.len as usize];
        file.read_exact_at(&mut value, pointer.offset)
            .map_err(|e| backend("reading a value", e))?;
        if crc32fast::hash(&value) != pointer.crc {
            return Err(StoreError::Corrupt(format!(
                "value log: the value at {}:{} fails its checksum",
                pointer.segment, pointer.offset
            )));
        }
        Ok(value)
    }

    fn file(&self, segment: u64) -> Result<Arc<File>, StoreError> {
        if let Some(file) = self.state().files.get(&segment) {
            return Ok(file.clone());
        }
        let file = File::open(segment_path(&self.dir, segment))
            .map_err(|e| backend(&format!("opening segment {segment:x}"), e))?;
        Ok(self
            .state()
            .files
            .entry(segment)
            .or_insert_with(|| Arc::new(file))
            .clone())
    }

    /// Notes that the value `stored` points to is no longer referenced (nothing if it is an
    /// inline value).
    pub(super) fn release_stored(&self, stored: &[u8]) {
        if let Some(pointer) = Pointer::decode(stored) {
            self.release(pointer);
        }
    }

    pub(crate) fn release(&self, pointer: Pointer) {
        let mut state = self.state();
        let Some(live) = state.live.get_mut(&pointer.segment) else {
            return;
        };
        *live = live.saturating_sub(1);
        if *live == 0 && pointer.segment != state.active_id {
            state.live.remove(&pointer.segment);
            state.dead.push(pointer.segment);
        }
    }

    /// The sealed segments no value lives in any more: to be deleted ([`ValueLog::delete`])
    /// once a durable flush covers the removals that freed them.
    pub(crate) fn take_dead(&self) -> Vec<u64> {
        std::mem::take(&mut self.state().dead)
    }

    /// Deletes `segments` (taken from [`ValueLog::take_dead`] before a flush that succeeded).
    pub(crate) fn delete(&self, segments: Vec<u64>) {
        for segment in segments {
            self.state().files.remove(&segment);
            let path = segment_path(&self.dir, segment);
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %err, "deleting a free value segment failed; deleted at the next start");
            }
        }
    }

    /// Puts back segments taken for a flush that failed.
    pub(crate) fn undelete(&self, segments: Vec<u64>) {
        self.state().dead.extend(segments);
    }

    /// How many values are live, over every segment (for tests).
    #[cfg(test)]
    pub(crate) fn live_values(&self) -> u64 {
        self.state().live.values().sum()
    }

    /// Segment files on disk that hold live values or are being written (for tests).
    #[cfg(test)]
    pub(crate) fn segments(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
            })
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// Creates segment `id` and makes its directory entry durable.
fn create_segment(dir: &Path, id: u64) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(segment_path(dir, id))
        .map_err(|e| backend("creating a segment", e))?;
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| backend("syncing its directory", e))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_and_inline_values_are_told_apart() {
        let pointer = Pointer {
            segment: 3,
            offset: 1 << 40,
            len: 140_000,
            crc: 0xdead_beef,
        };
        let stored = pointer.encode();
        assert_eq!(Pointer::decode(&stored), Some(pointer));
        assert_eq!(Pointer::value_len(&stored), 140_000);
        // A protobuf message never begins with 0; a position (8 bytes) is not 25 bytes long.
        let inline = [0x08, 0x01, 0x12, 0x00];
        assert_eq!(Pointer::decode(&inline), None);
        assert_eq!(Pointer::value_len(&inline), 4);
        assert_eq!(Pointer::decode(&5u64.to_be_bytes()), None);
    }

    #[test]
    fn values_read_back_and_a_flipped_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = ValueLog::open(dir.path(), []).unwrap();
        let (a, b) = (vec![7u8; 1000], b"second".to_vec());
        let pa = log.append(&a).unwrap();
        let written = log.append_all([b.as_slice(), b"third"]).unwrap();
        // On the device when `append` returns (where the kernel can tell: cachestat(2)).
        let unsynced = mermin_test_support::page_cache::unsynced_pages_under(dir.path());
        assert!(
            matches!(unsynced, None | Some(0)),
            "{unsynced:?} pages unsynced"
        );
        let (pb, pc) = (written[0], written[1]);
        assert_eq!((pb.segment, pb.offset), (pa.segment, 1000));
        assert_eq!((pc.segment, pc.offset, pc.len()), (pa.segment, 1006, 5));
        assert_eq!(log.resolve(&pc.encode()).unwrap().as_ref(), b"third");
        assert_eq!(log.resolve(&pa.encode()).unwrap().as_ref(), &a[..]);
        assert_eq!(log.resolve(&pb.encode()).unwrap().as_ref(), &b[..]);
        assert_eq!(log.resolve(b"\x0ainline").unwrap().as_ref(), b"\x0ainline");
        // A byte changed on disk.
        let file = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), pb.segment))
            .unwrap();
        file.write_all_at(b"S", 1000).unwrap();
        let err = log.resolve(&pb.encode()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "store: corrupt entry: value log: the value at {}:1000 fails its checksum",
                pb.segment
            )
        );
    }

    #[test]
    fn on_a_full_disk_a_small_value_still_writes_but_there_is_no_room_for_a_batch() {
        use mermin_test_support::tmpfs::{Tmpfs, fill};
        let Some(disk) = Tmpfs::mount("4m") else {
            eprintln!("skipped: cannot mount a tmpfs (needs root)");
            return;
        };
        let dir = disk.mountpoint.join("values");
        let log = ValueLog::open(&dir, []).unwrap();
        assert_eq!(
            fs_len(&dir.join(RESERVE_FILE)),
            None,
            "held only when asked"
        );
        log.hold_reserve();
        assert_eq!(fs_len(&dir.join(RESERVE_FILE)), Some(RESERVE_BYTES));
        log.append(&[1; 100]).unwrap();
        assert!(log.has_room());
        let filler = disk.mountpoint.join("filler");
        assert!(fill(&filler, 4 << 20) > 0);
        // The disk is full, yet a small value goes into the page the segment already holds...
        let small = log.append(&[2; 100]).unwrap();
        assert_eq!(log.resolve(&small.encode()).unwrap().as_ref(), &[2; 100]);
        // ...where a batch is refused, and so is a page.
        let err = log.append(&vec![3; 64 << 10]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "store: value log: writing a value: No space left on device (os error 28)"
        );
        assert!(!log.has_room(), "no room for a batch");
        assert!(log.probe().is_err());
        // The reserve given back makes room for a flush, not for batches.
        assert!(log.release_reserve());
        assert!(!log.release_reserve(), "given back once");
        log.probe().unwrap();
        assert!(!log.has_room(), "the reserve is owed");
        std::fs::remove_file(&filler).unwrap();
        assert!(log.has_room());
        log.keep_reserve();
        assert_eq!(fs_len(&dir.join(RESERVE_FILE)), Some(RESERVE_BYTES));
        log.append(&vec![3; 64 << 10]).unwrap();
    }

    fn fs_len(path: &Path) -> Option<u64> {
        std::fs::metadata(path).ok().map(|m| m.len())
    }

    #[test]
    fn a_segment_goes_once_sealed_and_empty_and_only_when_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let log = ValueLog::open(dir.path(), []).unwrap();
        let big = vec![1u8; (SEGMENT_BYTES / 2) as usize + 1];
        let first = log.append(&big).unwrap();
        let second = log.append(&big).unwrap();
        // The third goes to a new segment: the first is sealed, with two live values.
        let third = log.append(b"x").unwrap();
        assert_eq!(third.segment, first.segment + 1);
        log.release(first);
        assert_eq!(log.take_dead(), Vec::<u64>::new(), "one value still lives");
        log.release(second);
        let dead = log.take_dead();
        assert_eq!(dead, [first.segment]);
        // Not deleted before the caller's flush succeeded: still readable meanwhile.
        assert_eq!(log.segments(), [first.segment, third.segment]);
        log.undelete(dead);
        let dead = log.take_dead();
        log.delete(dead);
        assert_eq!(log.segments(), [third.segment]);
        // The active segment is not freed by its values going.
        log.release(third);
        assert_eq!(log.take_dead(), Vec::<u64>::new());
    }

    #[test]
    fn reopening_keeps_the_segments_pointed_to_and_begins_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, freed) = {
            let log = ValueLog::open(dir.path(), []).unwrap();
            let kept = log.append(b"kept").unwrap();
            let log = {
                drop(log);
                ValueLog::open(dir.path(), [kept]).unwrap()
            };
            let freed = log.append(b"freed").unwrap();
            (kept, freed)
        };
        assert_eq!(freed.segment, kept.segment + 1);
        // Only `kept` is still pointed to: `freed`'s segment goes at open.
        let log = ValueLog::open(dir.path(), [kept]).unwrap();
        assert_eq!(log.segments(), [kept.segment, freed.segment + 1]);
        assert_eq!(log.resolve(&kept.encode()).unwrap().as_ref(), b"kept");
        assert_eq!(log.append(b"next").unwrap().segment, freed.segment + 1);
    }
}
