//! What the page cache holds of a file, by the `cachestat` system call (Linux 6.5+): how tests
//! see whether bytes written are on the device yet, without pulling the plug.

use std::{fs::File, os::fd::AsRawFd, path::Path};

/// `cachestat`'s number: the same on every architecture (a system call added after their tables
/// were unified).
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct Range {
    offset: u64,
    /// 0: to the end of the file.
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Stat {
    cache: u64,
    dirty: u64,
    writeback: u64,
    evicted: u64,
    recently_evicted: u64,
}

/// Pages of `file` written but not yet on the device (dirty or under writeback); `None` where
/// the kernel has no `cachestat`.
pub fn unsynced_pages(file: &File) -> Option<u64> {
    let range = Range { offset: 0, len: 0 };
    let mut stat = Stat::default();
    // SAFETY: `cachestat(fd, *const range, *mut stat, flags)` reads `range` and writes `stat`,
    // both live, `repr(C)` and laid out as the kernel's `cachestat_range` and `cachestat`.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0,
        )
    };
    (rc == 0).then_some(stat.dirty + stat.writeback)
}

/// [`unsynced_pages`] summed over every file under `dir`; `None` where the kernel has no
/// `cachestat`.
pub fn unsynced_pages_under(dir: &Path) -> Option<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("a readable directory") {
        let path = entry.expect("a directory entry").path();
        total += if path.is_dir() {
            unsynced_pages_under(&path)?
        } else {
            unsynced_pages(&File::open(&path).expect("a readable file"))?
        };
    }
    Some(total)
}
