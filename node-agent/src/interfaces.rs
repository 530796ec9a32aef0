//! Which interfaces get the programs, and keeping that true as interfaces come and go.
//!
//! The watcher runs on its own thread (in the target network namespace, if any). It subscribes to
//! rtnetlink link notifications and, on every notification (and every few hundred ms regardless),
//! reconciles: attach to each matching interface not yet attached, detach from each attached one
//! that vanished or was renamed out of the patterns. The notification is only a trigger; the
//! truth is always a fresh listing, so a lost or coalesced notification cannot leave a gap.
//!
//! The programs read an Ethernet header first, so only Ethernet interfaces get them: one
//! without a link-layer header (WireGuard's `cilium_wg0`, `flannel-wg`, a tun device) would
//! have its addresses read as one, and is skipped, logged and counted. An attach that fails
//! (a CNI racing for the same hook, a transient error) is tried again 1 s later, then after
//! twice as long each time up to a minute, for as long as the interface keeps its name.

use std::{
    collections::{HashMap, HashSet},
    ffi::CStr,
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    capture::Programs,
    config::ConfigError,
    metrics::Metrics,
    netlink,
    netns::{self, NetnsError},
};

/// Interface name patterns (globs).
#[derive(Debug)]
pub struct InterfaceFilter {
    patterns: Vec<glob::Pattern>,
}

impl InterfaceFilter {
    pub fn new(patterns: &[String]) -> Result<Self, ConfigError> {
        let patterns = patterns
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(|p| {
                glob::Pattern::new(p).map_err(|e| ConfigError::BadPattern {
                    pattern: p.to_owned(),
                    reason: e.msg.to_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if patterns.is_empty() {
            return Err(ConfigError::NoPatterns);
        }
        Ok(Self { patterns })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }
}

/// How long the name of a vanished interface is kept for records still in flight.
const VANISHED_NAME_RETENTION: Duration = Duration::from_secs(600);
/// Reconcile at least this often even without notifications.
const RESCAN_INTERVAL: Duration = Duration::from_millis(500);

/// Interface names by index, shared between the watcher (writer) and the collector (reader).
#[derive(Clone, Default)]
pub struct InterfaceNames(Arc<RwLock<HashMap<u32, NameEntry>>>);

struct NameEntry {
    name: String,
    vanished: Option<Instant>,
}

/// [`InterfaceNames`] read.
pub struct NamesNow<'a>(std::sync::RwLockReadGuard<'a, HashMap<u32, NameEntry>>);

impl NamesNow<'_> {
    pub fn get(&self, index: u32) -> Option<&str> {
        self.0.get(&index).map(|e| e.name.as_str())
    }
}

impl InterfaceNames {
    /// The names as they are now, read without a copy while the guard lives (the watcher
    /// waits to update them meanwhile).
    pub fn read(&self) -> NamesNow<'_> {
        NamesNow(self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn update(&self, present: &HashMap<u32, String>, now: Instant) {
        let mut names = self.0.write().unwrap_or_else(|e| e.into_inner());
        for (index, entry) in names.iter_mut() {
            if !present.contains_key(index) && entry.vanished.is_none() {
                entry.vanished = Some(now);
            }
        }
        names.retain(|_, e| e.vanished.is_none_or(|t| now - t < VANISHED_NAME_RETENTION));
        for (index, name) in present {
            names.insert(
                *index,
                NameEntry {
                    name: name.clone(),
                    vanished: None,
                },
            );
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("subscribing to rtnetlink link notifications: {0}")]
    Netlink(io::Error),
    #[error("listing interfaces: {0}")]
    List(io::Error),
    #[error("starting the interface watcher's thread: {0}")]
    Thread(io::Error),
    #[error("the interface watcher stopped before it started")]
    Vanished,
}

/// Starts the watcher thread and waits until it has attached to the interfaces present now.
/// Start-up failures (namespace, netlink) come back here; attach failures of single interfaces
/// are logged and counted, not fatal.
pub fn spawn_watcher(
    programs: Programs,
    filter: InterfaceFilter,
    netns: Option<PathBuf>,
    names: InterfaceNames,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> Result<thread::JoinHandle<()>, WatchError> {
    let (started_tx, started_rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name("mermin-interfaces".into())
        .spawn(move || {
            let mut watcher = match Watcher::start(programs, filter, netns, names, metrics) {
                Ok(watcher) => watcher,
                Err(err) => {
                    let _ = started_tx.send(Err(err));
                    return;
                }
            };
            let _ = started_tx.send(Ok(()));
            watcher.run(&stop);
        })
        .map_err(WatchError::Thread)?;
    match started_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(err)) => {
            let _ = handle.join();
            Err(err)
        }
        Err(_) => Err(WatchError::Vanished),
    }
}

struct Watcher {
    programs: Programs,
    filter: InterfaceFilter,
    names: InterfaceNames,
    metrics: Arc<Metrics>,
    netlink: OwnedFd,
    /// Interfaces whose attach failed: when to try again, and the wait after that.
    failed: HashMap<(u32, String), (Instant, Duration)>,
    /// Interfaces that match but have no Ethernet header, skipped while they keep their name.
    skipped: HashSet<(u32, String)>,
}

/// The first wait before an attach that failed is tried again, and the longest.
const ATTACH_RETRY_FIRST: Duration = Duration::from_secs(1);
const ATTACH_RETRY_MAX: Duration = Duration::from_secs(60);

impl Watcher {
    fn start(
        programs: Programs,
        filter: InterfaceFilter,
        netns: Option<PathBuf>,
        names: InterfaceNames,
        metrics: Arc<Metrics>,
    ) -> Result<Self, WatchError> {
        if let Some(path) = &netns {
            netns::enter(path)?;
        }
        // Subscribe before the first listing, so no interface can appear unnoticed in between.
        let netlink = link_notifications().map_err(WatchError::Netlink)?;
        let mut watcher = Self {
            programs,
            filter,
            names,
            metrics,
            netlink,
            failed: HashMap::new(),
            skipped: HashSet::new(),
        };
        watcher.reconcile()?;
        Ok(watcher)
    }

    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            match wait_readable(&self.netlink, RESCAN_INTERVAL) {
                Ok(true) => drain(&self.netlink),
                Ok(false) => {}
                Err(err) => tracing::warn!(%err, "polling rtnetlink"),
            }
            if let Err(err) = self.reconcile() {
                tracing::warn!(%err, "reconciling interfaces");
            }
        }
        self.programs.detach_all();
        self.metrics.attached_interfaces.set(0);
        tracing::info!("detached from all interfaces");
    }

    fn reconcile(&mut self) -> Result<(), WatchError> {
        let present = list_interfaces().map_err(WatchError::List)?;
        let stale: Vec<u32> = self
            .programs
            .attached()
            .filter(|(index, name)| present.get(index).map(String::as_str) != Some(*name))
            .map(|(index, _)| index)
            .collect();
        for index in stale {
            self.programs.detach(index);
            tracing::info!(index, "detached from vanished or renamed interface");
        }
        self.failed
            .retain(|(index, name), _| present.get(index) == Some(name));
        self.skipped
            .retain(|(index, name)| present.get(index) == Some(name));
        let now = Instant::now();
        self.names.update(&present, now);

        let attached: HashSet<u32> = self.programs.attached().map(|(i, _)| i).collect();
        for (index, name) in &present {
            let interface = (*index, name.clone());
            let waiting = self
                .failed
                .get(&interface)
                .is_some_and(|(retry_at, _)| now < *retry_at);
            if attached.contains(index)
                || !self.filter.matches(name)
                || waiting
                || self.skipped.contains(&interface)
            {
                continue;
            }
            match link_type(name) {
                Ok(libc::ARPHRD_ETHER) => {}
                Ok(other) => {
                    tracing::info!(interface = %name, index, link_type = other, "skipped: no Ethernet header for the programs to read");
                    self.metrics.interfaces_skipped.inc();
                    self.skipped.insert(interface);
                    continue;
                }
                // Gone since the listing, most likely: the next reconcile sees.
                Err(err) => {
                    tracing::debug!(interface = %name, %err, "reading the link type");
                    continue;
                }
            }
            match self.programs.attach(*index, name) {
                Ok(()) => {
                    self.failed.remove(&interface);
                    tracing::info!(interface = %name, index, "attached")
                }
                Err(err) => {
                    self.metrics.attach_errors.inc();
                    let wait = self
                        .failed
                        .get(&interface)
                        .map_or(ATTACH_RETRY_FIRST, |(_, wait)| {
                            (*wait * 2).min(ATTACH_RETRY_MAX)
                        });
                    tracing::warn!(interface = %name, %err, retry_in = ?wait, "attach failed");
                    self.failed.insert(interface, (now + wait, wait));
                }
            }
        }
        let count = self.programs.attached().count();
        self.metrics.attached_interfaces.set(count as i64);
        Ok(())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.programs.detach_all();
    }
}

/// The link type (`ARPHRD_*`) of interface `name` in the calling thread's network namespace.
fn link_type(name: &str) -> io::Result<u16> {
    /// `SIOCGIFHWADDR` (linux/sockios.h).
    const GET_HARDWARE_ADDRESS: libc::c_ulong = 0x8927;
    // SAFETY: a plain socket call; the descriptor is owned from here on.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `socket` is a fresh descriptor nobody else owns.
    let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(socket) };
    // SAFETY: all-zero is a valid ifreq.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (to, from) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *to = from as libc::c_char;
    }
    // SAFETY: the request is a valid ifreq naming the interface, NUL-terminated (zeroed).
    let done = unsafe { libc::ioctl(socket.as_raw_fd(), GET_HARDWARE_ADDRESS as _, &mut request) };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR fills the hardware address member of the union.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Interfaces of the calling thread's network namespace: index → name.
fn list_interfaces() -> io::Result<HashMap<u32, String>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut interfaces = HashMap::new();
    let mut entry = head;
    // SAFETY: walks the array up to its terminating entry; names are NUL-terminated C strings.
    unsafe {
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            interfaces.insert((*entry).if_index, name);
            entry = entry.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(interfaces)
}

/// A non-blocking rtnetlink socket subscribed to link notifications.
fn link_notifications() -> io::Result<OwnedFd> {
    netlink::socket(
        libc::NETLINK_ROUTE,
        libc::RTMGRP_LINK as u32,
        libc::SOCK_NONBLOCK,
    )
}

/// Waits up to `timeout` for `fd` to become readable.
///
/// The timeout is kept to the nanosecond (`ppoll`): `poll`'s whole milliseconds would turn the
/// last fraction of a millisecond before a deadline into a zero timeout, and a loop waiting for
/// that deadline into a busy spin.
pub(crate) fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    match unsafe { libc::ppoll(&mut pollfd, 1, &timeout, std::ptr::null()) } {
        -1 => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(err)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// Discards queued notifications; their content does not matter (see the module docs).
fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 16 * 1024];
    while netlink::receive(fd, &mut buf).is_ok_and(|len| len > 0) {}
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_wait_shorter_than_a_millisecond_lasts_its_whole_timeout() {
        let (reader, _writer) = std::io::pipe().unwrap();
        let timeout = Duration::from_micros(700);
        let start = Instant::now();
        assert!(!wait_readable(&reader, timeout).unwrap());
        let waited = start.elapsed();
        assert!(
            waited >= timeout,
            "returned after {waited:?}, asked {timeout:?}"
        );
    }

    #[test]
    fn a_readable_descriptor_is_reported_at_once() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        writer.write_all(b"x").unwrap();
        assert!(wait_readable(&reader, Duration::from_secs(3600)).unwrap());
    }
}
