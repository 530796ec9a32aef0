//! Flushes that survive a power loss, not only a crash of the process.
//!
//! sled 0.34's flush is not enough on its own: it writes every value or tree page larger than a
//! quarter of its segment (128 KiB: agent batches, export requests, large change sets) to a
//! file of its own under `blobs/` and never syncs those files, and it makes its log durable
//! mostly with `sync_file_range`, which writes neither the file's metadata nor the device's
//! cache (spacejam/sled#1077). A process killed after such a flush loses nothing (the page
//! cache outlives it); a machine that loses power can.
//!
//! [`DurableDb::flush`] therefore follows sled's flush with `syncfs` on the filesystem that
//! holds the database: once it returns, every byte sled wrote before it — the log, each blob
//! file, the directory entries that name them — is on stable storage, with the device's cache
//! flushed. `syncfs` writes back the whole filesystem, other writers' dirty pages too: the data
//! directory belongs on a volume of its own (the chart gives each replica a PersistentVolume).
//!
//! Every flush of the aggregator's sled databases goes through this type: the store's group
//! commit, its change-log compaction, and the replicas' Raft logs, placement and state machine.

use std::{
    fs::File,
    ops::Deref,
    path::{Path, PathBuf},
    sync::Arc,
};

/// A sled database whose [`DurableDb::flush`] makes what was written before it survive a power
/// loss. Derefs to the database for everything else.
#[derive(Clone)]
pub struct DurableDb {
    db: sled::Db,
    /// The database's directory, and opened for `syncfs`; `None` for a temporary database
    /// (tests), which no power loss can outlive anyway.
    directory: Option<(PathBuf, Arc<File>)>,
}

impl DurableDb {
    /// Opens (or creates) the database at `path` with `config`.
    pub fn open(config: sled::Config, path: &Path) -> sled::Result<Self> {
        let db = config.path(path).open()?;
        // sled has created the directory by now.
        let directory = File::open(path)?;
        Ok(Self {
            db,
            directory: Some((path.to_owned(), Arc::new(directory))),
        })
    }

    /// A temporary database (removed when dropped): for tests.
    pub fn temporary() -> sled::Result<Self> {
        Ok(Self {
            db: sled::Config::new().temporary(true).open()?,
            directory: None,
        })
    }

    /// The database's directory (`None` if it is temporary).
    pub fn path(&self) -> Option<&Path> {
        self.directory.as_ref().map(|(path, _)| path.as_path())
    }

    /// Writes everything written so far to stable storage (blocking the thread).
    pub fn flush(&self) -> sled::Result<()> {
        self.db.flush()?;
        self.sync_filesystem()
    }

    /// [`DurableDb::flush`] for async callers: sled's flush without holding a thread, the
    /// filesystem's sync on the blocking pool.
    pub async fn flush_async(&self) -> sled::Result<()> {
        self.db.flush_async().await?;
        let Some((_, directory)) = self.directory.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || sync(&directory))
            .await
            .map_err(|joined| sled::Error::Io(std::io::Error::other(joined)))?
    }

    fn sync_filesystem(&self) -> sled::Result<()> {
        match &self.directory {
            Some((_, directory)) => sync(directory),
            None => Ok(()),
        }
    }
}

fn sync(directory: &File) -> sled::Result<()> {
    rustix::fs::syncfs(directory).map_err(|errno| sled::Error::Io(errno.into()))
}

impl Deref for DurableDb {
    type Target = sled::Db;

    fn deref(&self) -> &sled::Db {
        &self.db
    }
}

#[cfg(test)]
mod tests {
    use mermin_test_support::page_cache::unsynced_pages_under;

    use super::*;

    /// On the device, not only in the page cache, once `flush` returns: what a power loss
    /// keeps. sled's own flush leaves a large value (a blob file) in the page cache: the control.
    #[test]
    fn a_flush_leaves_nothing_in_the_page_cache_that_sleds_own_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let Some(0) = unsynced_pages_under(dir.path()) else {
            eprintln!("skipped: no cachestat(2) in this kernel");
            return;
        };
        let db = DurableDb::open(sled::Config::new(), dir.path()).unwrap();
        // Over a quarter of sled's segment: a blob file of its own. Other tests of this process
        // sync the same filesystem (`syncfs`) at any moment, which may write the blob back
        // before it is counted: the control is tried again with a new blob, a few times.
        let mut after_sled = Vec::new();
        for attempt in 0..5u8 {
            db.insert([b'l', attempt], vec![7u8; 1 << 20]).unwrap();
            db.db.flush().unwrap();
            after_sled.push(unsynced_pages_under(dir.path()).unwrap());
            if after_sled.last() >= Some(&256) {
                break;
            }
        }
        assert!(
            after_sled.last() >= Some(&256),
            "sled's flush left {after_sled:?} pages unsynced (a 1 MiB blob alone is 256)"
        );
        db.insert("next", vec![8u8; 1 << 20]).unwrap();
        db.flush().unwrap();
        assert_eq!(unsynced_pages_under(dir.path()), Some(0));
    }
}
