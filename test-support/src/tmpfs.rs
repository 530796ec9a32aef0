//! A small disk that fills up: a tmpfs the test mounts on a fresh directory (unmounted when
//! dropped, on every exit), and a filler that writes until the kernel says ENOSPC. Mounting
//! needs root; without it [`Tmpfs::mount`] gives `None` and the test says it skipped.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

/// A tmpfs mounted on a fresh directory; unmounted when dropped.
pub struct Tmpfs {
    pub mountpoint: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// A tmpfs of `size` (as `mount -o size=` takes it: `16m`), or `None` if it cannot be
    /// mounted here.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = dir.path().join("disk");
        fs::create_dir(&mountpoint).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mountpoint)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Tmpfs {
            mountpoint,
            _dir: dir,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

/// Writes `path` until its file system is full (bounded by `max` bytes); what it wrote.
pub fn fill(path: &Path, max: u64) -> u64 {
    let mut file = fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut written = 0;
    while written < max {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(err) => {
                assert_eq!(err.kind(), std::io::ErrorKind::StorageFull, "{err}");
                break;
            }
        }
    }
    written
}
