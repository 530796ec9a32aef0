//! Entering a network namespace for the calling thread only.
//!
//! Namespace membership is per thread: the interface watcher enters the target namespace on its
//! own thread, so attaching, interface lookups and netlink all happen there, while the metrics
//! endpoint stays in the agent's own namespace.

use std::{fs::File, io, os::fd::AsRawFd, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error(
        "entering network namespace {path} needs CAP_SYS_ADMIN; run as root or grant it to the agent"
    )]
    NotPermitted { path: String },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: String, source: io::Error },
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) -> Result<(), NetnsError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: shown.clone(),
        source,
    })?;
    // SAFETY: plain syscall on a valid open fd; affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let source = io::Error::last_os_error();
        return Err(if source.raw_os_error() == Some(libc::EPERM) {
            NetnsError::NotPermitted { path: shown }
        } else {
            NetnsError::Enter {
                path: shown,
                source,
            }
        });
    }
    Ok(())
}

/// Runs `f` on a thread of its own inside the network namespace at `path` (the caller's own
/// namespace for `None`): sockets it opens stay in that namespace when used from any thread.
pub fn within<T: Send>(path: Option<&Path>, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    std::thread::scope(|scope| {
        let entered = scope.spawn(|| {
            if let Some(path) = path {
                enter(path)?;
            }
            Ok(f())
        });
        entered
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
