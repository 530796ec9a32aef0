//! Netlink sockets, as the interface watcher (rtnetlink link notifications) and the conntrack
//! reader (ctnetlink events and dumps) use them: opening one bound to multicast groups, and
//! reading a datagram. A socket stays in the network namespace of the thread that opened it.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// A netlink socket of `protocol` (`NETLINK_ROUTE`, `NETLINK_NETFILTER`, ...) subscribed to the
/// multicast `groups` (a bit mask; 0 for none), with extra socket `flags` (`SOCK_NONBLOCK`).
pub fn socket(protocol: i32, groups: u32, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket syscall; the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags,
            protocol,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_nl is plain data; zeroed is a valid initial value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = groups;
    // SAFETY: `addr` is a valid sockaddr_nl and the length matches it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Reads one datagram into `buffer`; its length.
pub fn receive(fd: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reads into a valid buffer of the given length.
    let len = unsafe { libc::recv(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
    if len < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(len as usize)
    }
}
