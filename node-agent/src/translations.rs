//! The node's address translations — a Service's DNAT by kube-proxy, a NodePort, a masquerade's
//! SNAT — learned from conntrack over netlink in the node's network namespace, so that each
//! record says how its connection was translated (`FlowRecord.translation`) and the aggregator
//! can stitch the points before and after the NAT into one connection.
//!
//! **How they are learned.** One dump of the conntrack table at start, then conntrack's NEW
//! events, read before every report: a translation is known from the moment its connection's
//! first packet passed the NAT, and stays known after conntrack has forgotten the connection (a
//! short connection's entry may be gone, or evicted, by the time the agent reports it) — for
//! `retention` after the last record that used it. Only translated connections are kept (their
//! reply tuple is not the inverted original). Lost events (the socket's buffer overflowed) are
//! counted and answered with a new dump.
//!
//! This covers every kube-proxy mode built on conntrack (iptables, nftables, IPVS) and any other
//! NAT netfilter does; a dataplane that translates before the packet reaches a TC hook (socket
//! load balancing) needs nothing, since every point then sees the endpoint.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    sync::Arc,
    time::Duration,
};

use foldhash::fast::RandomState;
use mermin_protocol::flow::v1::{ConnectionEndpoint, Translation as RecordTranslation};
use node_common::FlowKey;

use crate::{
    metrics::{Metrics, ReasonLabel},
    netlink,
    netns::{self, NetnsError},
};

/// Translations kept at most; more are counted as dropped (`table_full`).
pub const MAX_TRANSLATIONS: usize = 262_144;

#[derive(Debug, thiserror::Error)]
pub enum TranslationsError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("opening a conntrack netlink socket: {0}")]
    Socket(io::Error),
    #[error("dumping the conntrack table: {0}")]
    Dump(io::Error),
}

/// One direction of a connection as conntrack writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Tuple {
    protocol: u8,
    /// 4 or 16.
    address_len: u8,
    source: [u8; 16],
    destination: [u8; 16],
    source_port: u16,
    destination_port: u16,
}

impl Tuple {
    fn of(key: &FlowKey) -> Self {
        Tuple {
            protocol: key.protocol,
            address_len: if key.ip_version == 4 { 4 } else { 16 },
            source: key.src_addr,
            destination: key.dst_addr,
            source_port: key.src_port,
            destination_port: key.dst_port,
        }
    }

    fn inverse(&self) -> Self {
        Tuple {
            source: self.destination,
            destination: self.source,
            source_port: self.destination_port,
            destination_port: self.source_port,
            ..*self
        }
    }

    fn endpoint(&self, address: &[u8; 16], port: u16) -> Option<ConnectionEndpoint> {
        Some(ConnectionEndpoint {
            address: address[..usize::from(self.address_len)].to_vec(),
            port: u32::from(port),
        })
    }
}

/// A connection conntrack knows: its original tuple (as the client sent) and its reply tuple
/// (as the server answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tracked {
    original: Tuple,
    reply: Tuple,
}

impl Tracked {
    fn is_translated(&self) -> bool {
        self.reply != self.original.inverse()
    }

    fn record(&self) -> RecordTranslation {
        let (o, r) = (&self.original, &self.reply);
        RecordTranslation {
            client: o.endpoint(&o.source, o.source_port),
            dialled: o.endpoint(&o.destination, o.destination_port),
            translated_client: r.endpoint(&r.destination, r.destination_port),
            server: r.endpoint(&r.source, r.source_port),
        }
    }
}

struct Entry {
    tracked: Tracked,
    last_used_ns: u64,
}

/// The translations known, by every tuple their packets can carry. Clock-free: callers pass the
/// kernel-clock `now`.
pub struct TranslationTable {
    /// By original tuple.
    entries: HashMap<Tuple, Entry, RandomState>,
    /// The four tuples of each entry (original and reply, both ways) → its original tuple.
    aliases: HashMap<Tuple, Tuple, RandomState>,
    retention_ns: u64,
    next_sweep_ns: u64,
    capacity: usize,
}

/// What [`TranslationTable::learn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Learned {
    Kept,
    NotTranslated,
    TableFull,
}

impl TranslationTable {
    pub fn new(retention: Duration, capacity: usize) -> Self {
        TranslationTable {
            entries: HashMap::default(),
            aliases: HashMap::default(),
            retention_ns: u64::try_from(retention.as_nanos()).unwrap_or(u64::MAX),
            next_sweep_ns: 0,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn learn(&mut self, tracked: Tracked, now_ns: u64) -> Learned {
        if !tracked.is_translated() {
            return Learned::NotTranslated;
        }
        let original = tracked.original;
        let tuples = [
            original,
            original.inverse(),
            tracked.reply,
            tracked.reply.inverse(),
        ];
        // A tuple reused by a new connection belongs to the new one.
        for tuple in tuples {
            if let Some(owner) = self.aliases.get(&tuple).copied()
                && self
                    .entries
                    .get(&owner)
                    .is_none_or(|entry| entry.tracked != tracked)
            {
                self.forget(owner);
            }
        }
        if !self.entries.contains_key(&original) && self.entries.len() >= self.capacity {
            return Learned::TableFull;
        }
        for tuple in tuples {
            self.aliases.insert(tuple, original);
        }
        self.entries.insert(
            original,
            Entry {
                tracked,
                last_used_ns: now_ns,
            },
        );
        Learned::Kept
    }

    fn forget(&mut self, original: Tuple) {
        if let Some(entry) = self.entries.remove(&original) {
            let t = entry.tracked;
            for tuple in [original, original.inverse(), t.reply, t.reply.inverse()] {
                if self.aliases.get(&tuple) == Some(&original) {
                    self.aliases.remove(&tuple);
                }
            }
        }
    }

    /// How the connection of the flow `key` was translated, if it was.
    pub fn lookup(&mut self, key: &FlowKey, now_ns: u64) -> Option<RecordTranslation> {
        let original = self.aliases.get(&Tuple::of(key))?;
        let entry = self.entries.get_mut(original)?;
        entry.last_used_ns = now_ns;
        Some(entry.tracked.record())
    }

    /// Forgets the translations no record used for the retention period (at most every tenth
    /// of it, so that the cost stays linear in what is kept).
    pub fn sweep(&mut self, now_ns: u64) {
        if now_ns < self.next_sweep_ns {
            return;
        }
        self.next_sweep_ns = now_ns.saturating_add(self.retention_ns / 10);
        let expired: Vec<Tuple> = self
            .entries
            .iter()
            .filter(|(_, e)| now_ns.saturating_sub(e.last_used_ns) > self.retention_ns)
            .map(|(original, _)| *original)
            .collect();
        for original in expired {
            self.forget(original);
        }
    }
}

/// The table, kept current from conntrack.
pub struct Translations {
    conntrack: Conntrack,
    table: TranslationTable,
    metrics: Arc<Metrics>,
}

impl Translations {
    /// Subscribes to conntrack's events in the namespace at `netns` (the agent's own for
    /// `None`), then fills the table from a dump.
    pub fn open(
        netns: Option<&Path>,
        retention: Duration,
        metrics: Arc<Metrics>,
        now_ns: u64,
    ) -> Result<Self, TranslationsError> {
        let conntrack = netns::within(netns, Conntrack::open)??;
        let mut translations = Translations {
            conntrack,
            table: TranslationTable::new(retention, MAX_TRANSLATIONS),
            metrics,
        };
        translations.resync(now_ns)?;
        Ok(translations)
    }

    /// Learns what conntrack reported since the last call, and forgets what expired.
    pub fn update(&mut self, now_ns: u64) {
        let mut learned = Vec::new();
        let lost = self.conntrack.read_events(&mut learned);
        self.learn(learned, now_ns);
        if lost {
            self.metrics.conntrack_resyncs.inc();
            if let Err(err) = self.resync(now_ns) {
                tracing::warn!(%err, "conntrack events were lost and the table could not be dumped again");
            }
        }
        self.table.sweep(now_ns);
        self.metrics.translations_known.set(self.table.len() as i64);
    }

    pub fn lookup(&mut self, key: &FlowKey, now_ns: u64) -> Option<RecordTranslation> {
        self.table.lookup(key, now_ns)
    }

    fn resync(&mut self, now_ns: u64) -> Result<(), TranslationsError> {
        let mut learned = Vec::new();
        self.conntrack
            .dump(&mut learned)
            .map_err(TranslationsError::Dump)?;
        self.learn(learned, now_ns);
        Ok(())
    }

    fn learn(&mut self, learned: Vec<Tracked>, now_ns: u64) {
        let full = learned
            .into_iter()
            .filter(|t| self.table.learn(*t, now_ns) == Learned::TableFull)
            .count();
        if full > 0 {
            self.metrics
                .translations_dropped
                .get_or_create(&ReasonLabel {
                    reason: "table_full",
                })
                .inc_by(full as u64);
        }
    }
}

const NETLINK_NETFILTER: i32 = 12;
/// NFNLGRP_CONNTRACK_NEW as a multicast group bit.
const CONNTRACK_NEW_GROUP: u32 = 1;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HEADER_LEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
/// Bytes the event socket may queue before events are lost.
const EVENT_BUFFER_BYTES: i32 = 16 << 20;
/// How long a dump may go without an answer.
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);

/// The two conntrack netlink sockets: NEW events, and dumps.
struct Conntrack {
    events: OwnedFd,
    dump: OwnedFd,
    buffer: Vec<u8>,
    sequence: u32,
}

impl Conntrack {
    fn open() -> Result<Self, TranslationsError> {
        let events = netlink::socket(NETLINK_NETFILTER, CONNTRACK_NEW_GROUP, libc::SOCK_NONBLOCK)
            .map_err(TranslationsError::Socket)?;
        // As root the buffer may exceed rmem_max; otherwise take what the kernel allows.
        for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            if set_option(&events, option, EVENT_BUFFER_BYTES).is_ok() {
                break;
            }
        }
        let dump = netlink::socket(NETLINK_NETFILTER, 0, 0).map_err(TranslationsError::Socket)?;
        set_receive_timeout(&dump, DUMP_TIMEOUT).map_err(TranslationsError::Socket)?;
        if std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_events")
            .is_ok_and(|v| v.trim() == "0")
        {
            tracing::warn!(
                "net.netfilter.nf_conntrack_events is 0: translations are learned only from dumps; Service connections may be reported as two"
            );
        }
        Ok(Conntrack {
            events,
            dump,
            buffer: vec![0; 64 * 1024],
            sequence: 0,
        })
    }

    /// Reads every queued event; true if some were lost.
    fn read_events(&mut self, learned: &mut Vec<Tracked>) -> bool {
        loop {
            match netlink::receive(&self.events, &mut self.buffer) {
                Ok(0) => return false,
                Ok(len) => {
                    parse_messages(&self.buffer[..len], learned);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return false,
                Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => return true,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    tracing::warn!(%err, "reading conntrack events");
                    return false;
                }
            }
        }
    }

    /// Lists every connection conntrack tracks now.
    fn dump(&mut self, learned: &mut Vec<Tracked>) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let request = dump_request(self.sequence);
        // SAFETY: sends a valid buffer of the given length.
        let sent = unsafe {
            libc::send(
                self.dump.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let len = match netlink::receive(&self.dump, &mut self.buffer) {
                Ok(len) => len,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            match parse_messages(&self.buffer[..len], learned) {
                Parsed::More => {}
                Parsed::Done => return Ok(()),
                Parsed::Error(errno) => return Err(io::Error::from_raw_os_error(errno)),
            }
        }
    }
}

fn set_option(fd: &OwnedFd, option: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a valid i32 of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_receive_timeout(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let value = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: passes a valid timeval of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const value).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// IPCTNL_MSG_CT_GET with NLM_F_DUMP, for every address family.
fn dump_request(sequence: u32) -> Vec<u8> {
    let len = NLMSG_HEADER_LEN + NFGENMSG_LEN;
    let mut message = Vec::with_capacity(len);
    message.extend_from_slice(&(len as u32).to_ne_bytes());
    message.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET).to_ne_bytes());
    message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    message.extend_from_slice(&sequence.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 0.
    message.extend_from_slice(&[0, 0, 0, 0]);
    message
}

/// What a datagram of netlink messages ended with.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    More,
    Done,
    Error(i32),
}

/// Reads the conntrack entries of one datagram into `learned`.
fn parse_messages(mut data: &[u8], learned: &mut Vec<Tracked>) -> Parsed {
    while data.len() >= NLMSG_HEADER_LEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap_or_default()) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap_or_default());
        if len < NLMSG_HEADER_LEN || len > data.len() {
            break;
        }
        let payload = &data[NLMSG_HEADER_LEN..len];
        match kind {
            NLMSG_DONE => return Parsed::Done,
            NLMSG_ERROR => {
                let errno = payload
                    .get(0..4)
                    .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()));
                if errno != 0 {
                    return Parsed::Error(-errno);
                }
            }
            k if k >> 8 == NFNL_SUBSYS_CTNETLINK
                && matches!(k & 0xff, IPCTNL_MSG_CT_NEW | IPCTNL_MSG_CT_GET) =>
            {
                if let Some(tracked) = payload.get(NFGENMSG_LEN..).and_then(parse_conntrack) {
                    learned.push(tracked);
                }
            }
            _ => {}
        }
        data = &data[align(len).min(data.len())..];
    }
    Parsed::More
}

fn parse_conntrack(attributes: &[u8]) -> Option<Tracked> {
    let mut original = None;
    let mut reply = None;
    for (kind, value) in Attributes(attributes) {
        match kind {
            CTA_TUPLE_ORIG => original = parse_tuple(value),
            CTA_TUPLE_REPLY => reply = parse_tuple(value),
            _ => {}
        }
    }
    Some(Tracked {
        original: original?,
        reply: reply?,
    })
}

fn parse_tuple(attributes: &[u8]) -> Option<Tuple> {
    let mut tuple = Tuple {
        protocol: 0,
        address_len: 0,
        source: [0; 16],
        destination: [0; 16],
        source_port: 0,
        destination_port: 0,
    };
    let mut ports = (None, None);
    for (kind, value) in Attributes(attributes) {
        match kind {
            CTA_TUPLE_IP => {
                for (kind, address) in Attributes(value) {
                    let (target, len) = match kind {
                        CTA_IP_V4_SRC => (&mut tuple.source, 4),
                        CTA_IP_V4_DST => (&mut tuple.destination, 4),
                        CTA_IP_V6_SRC => (&mut tuple.source, 16),
                        CTA_IP_V6_DST => (&mut tuple.destination, 16),
                        _ => continue,
                    };
                    target[..len].copy_from_slice(address.get(..len)?);
                    tuple.address_len = len as u8;
                }
            }
            CTA_TUPLE_PROTO => {
                for (kind, value) in Attributes(value) {
                    match kind {
                        CTA_PROTO_NUM => tuple.protocol = *value.first()?,
                        CTA_PROTO_SRC_PORT => ports.0 = Some(be16(value)?),
                        CTA_PROTO_DST_PORT => ports.1 = Some(be16(value)?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    // Only connections with ports are translated by address and port (ICMP ids are not kept).
    (tuple.source_port, tuple.destination_port) = (ports.0?, ports.1?);
    (tuple.address_len != 0).then_some(tuple)
}

fn be16(value: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(value.get(..2)?.try_into().ok()?))
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// The netlink attributes (type without its flag bits, payload) of a buffer.
struct Attributes<'a>(&'a [u8]);

impl<'a> Iterator for Attributes<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let data = self.0;
        if data.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            self.0 = &[];
            return None;
        }
        self.0 = &data[align(len).min(data.len())..];
        Some((kind, &data[4..len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NESTED: u16 = 0x8000;

    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align(out.len()), 0);
        out
    }

    fn tuple_attribute(kind: u16, tuple: &Tuple) -> Vec<u8> {
        let len = usize::from(tuple.address_len);
        let (source, destination) = if len == 4 {
            (CTA_IP_V4_SRC, CTA_IP_V4_DST)
        } else {
            (CTA_IP_V6_SRC, CTA_IP_V6_DST)
        };
        let ip = [
            attribute(source, &tuple.source[..len]),
            attribute(destination, &tuple.destination[..len]),
        ]
        .concat();
        let proto = [
            attribute(CTA_PROTO_NUM, &[tuple.protocol]),
            attribute(CTA_PROTO_SRC_PORT, &tuple.source_port.to_be_bytes()),
            attribute(CTA_PROTO_DST_PORT, &tuple.destination_port.to_be_bytes()),
        ]
        .concat();
        attribute(
            kind | NESTED,
            &[
                attribute(CTA_TUPLE_IP | NESTED, &ip),
                attribute(CTA_TUPLE_PROTO | NESTED, &proto),
            ]
            .concat(),
        )
    }

    /// A conntrack event as the kernel sends it: status first, then the two tuples.
    fn message(kind: u16, tracked: &Tracked) -> Vec<u8> {
        let body = [
            vec![2, 0, 0, 0],
            attribute(3, &0x1a0u32.to_be_bytes()),
            tuple_attribute(CTA_TUPLE_ORIG, &tracked.original),
            tuple_attribute(CTA_TUPLE_REPLY, &tracked.reply),
        ]
        .concat();
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HEADER_LEN + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(&body);
        out
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0; 16];
        out[..4].copy_from_slice(&a);
        out
    }

    fn tuple(source: ([u8; 4], u16), destination: ([u8; 4], u16)) -> Tuple {
        Tuple {
            protocol: 6,
            address_len: 4,
            source: v4(source.0),
            destination: v4(destination.0),
            source_port: source.1,
            destination_port: destination.1,
        }
    }

    /// 10.90.1.2:41000 dialled the Service 10.96.0.10:80, served by 10.90.2.2:8080.
    fn service_connection() -> Tracked {
        Tracked {
            original: tuple(([10, 90, 1, 2], 41000), ([10, 96, 0, 10], 80)),
            reply: tuple(([10, 90, 2, 2], 8080), ([10, 90, 1, 2], 41000)),
        }
    }

    fn key(t: &Tuple) -> FlowKey {
        FlowKey {
            src_addr: t.source,
            dst_addr: t.destination,
            src_port: t.source_port,
            dst_port: t.destination_port,
            ip_version: 4,
            protocol: t.protocol,
            ..FlowKey::default()
        }
    }

    #[test]
    fn events_and_dump_answers_are_parsed_into_both_tuples() {
        let service = service_connection();
        let plain = Tracked {
            original: tuple(([10, 0, 0, 1], 5000), ([10, 0, 0, 2], 53)),
            reply: tuple(([10, 0, 0, 2], 53), ([10, 0, 0, 1], 5000)),
        };
        let mut datagram = message(NFNL_SUBSYS_CTNETLINK << 8, &service);
        datagram.extend(message(NFNL_SUBSYS_CTNETLINK << 8 | 1, &plain));
        let mut learned = Vec::new();
        assert_eq!(parse_messages(&datagram, &mut learned), Parsed::More);
        assert_eq!(learned, [service, plain]);
        assert!(service.is_translated());
        assert!(!plain.is_translated());

        let mut done = Vec::new();
        done.extend_from_slice(&20u32.to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0; 14]);
        assert_eq!(parse_messages(&done, &mut learned), Parsed::Done);
        let mut error = Vec::new();
        error.extend_from_slice(&20u32.to_ne_bytes());
        error.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error.extend_from_slice(&[0; 10]);
        error.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(
            parse_messages(&error, &mut learned),
            Parsed::Error(libc::EPERM)
        );
        // Truncated: nothing read, nothing invented.
        let mut cut = Vec::new();
        assert_eq!(parse_messages(&datagram[..40], &mut cut), Parsed::More);
        assert!(cut.is_empty());
    }

    #[test]
    fn every_view_of_a_translated_connection_finds_its_translation() {
        let service = service_connection();
        let mut table = TranslationTable::new(Duration::from_secs(60), 10);
        assert_eq!(table.learn(service, 0), Learned::Kept);
        for seen in [
            service.original,
            service.original.inverse(),
            service.reply,
            service.reply.inverse(),
        ] {
            let t = table.lookup(&key(&seen), 1).unwrap();
            let endpoint = |e: Option<ConnectionEndpoint>| {
                let e = e.unwrap();
                (e.address, e.port)
            };
            assert_eq!(endpoint(t.client), (vec![10, 90, 1, 2], 41000));
            assert_eq!(endpoint(t.dialled), (vec![10, 96, 0, 10], 80));
            assert_eq!(endpoint(t.translated_client), (vec![10, 90, 1, 2], 41000));
            assert_eq!(endpoint(t.server), (vec![10, 90, 2, 2], 8080));
        }
        let other = tuple(([10, 90, 1, 2], 41001), ([10, 96, 0, 10], 80));
        assert_eq!(table.lookup(&key(&other), 1), None);
    }

    #[test]
    fn only_translations_are_kept_within_capacity_and_retention() {
        let s = 1_000_000_000;
        let mut table = TranslationTable::new(Duration::from_secs(60), 2);
        let plain = Tracked {
            original: tuple(([10, 0, 0, 1], 5000), ([10, 0, 0, 2], 53)),
            reply: tuple(([10, 0, 0, 2], 53), ([10, 0, 0, 1], 5000)),
        };
        assert_eq!(table.learn(plain, 0), Learned::NotTranslated);
        let service = |port| Tracked {
            original: tuple(([10, 90, 1, 2], port), ([10, 96, 0, 10], 80)),
            reply: tuple(([10, 90, 2, 2], 8080), ([10, 90, 1, 2], port)),
        };
        assert_eq!(table.learn(service(1), 0), Learned::Kept);
        assert_eq!(table.learn(service(2), 0), Learned::Kept);
        assert_eq!(table.learn(service(3), 0), Learned::TableFull);
        // Learning a kept one again is not a new entry.
        assert_eq!(table.learn(service(2), 0), Learned::Kept);
        assert_eq!(table.len(), 2);

        // Used at 50 s, connection 1 outlives connection 2 by 50 s.
        assert!(table.lookup(&key(&service(1).original), 50 * s).is_some());
        table.sweep(61 * s);
        assert!(table.lookup(&key(&service(2).reply), 61 * s).is_none());
        assert_eq!(table.len(), 1);
        table.sweep(110 * s);
        assert_eq!(table.len(), 1, "60 s after its last use: not yet");
        table.sweep(111 * s);
        assert_eq!(table.len(), 1, "sweeps are at least 6 s apart");
        table.sweep(116 * s);
        assert!(table.is_empty());
        assert!(table.aliases.is_empty());
    }

    #[test]
    fn ipv6_translations_are_parsed_and_found() {
        let address = |last: u8| {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[0xfd, 0, 0, 1]);
            a[15] = last;
            a
        };
        let v6 = |source: [u8; 16], sport, destination: [u8; 16], dport| Tuple {
            protocol: 17,
            address_len: 16,
            source,
            destination,
            source_port: sport,
            destination_port: dport,
        };
        // fd00:1::2 dialled the Service fd00:1::a:53, served by fd00:1::9:5353.
        let service = Tracked {
            original: v6(address(2), 40000, address(0xa), 53),
            reply: v6(address(9), 5353, address(2), 40000),
        };
        let mut learned = Vec::new();
        parse_messages(&message(NFNL_SUBSYS_CTNETLINK << 8, &service), &mut learned);
        assert_eq!(learned, [service]);
        let mut table = TranslationTable::new(Duration::from_secs(60), 10);
        assert_eq!(table.learn(learned[0], 0), Learned::Kept);
        let seen = FlowKey {
            ip_version: 6,
            ..key(&service.reply)
        };
        let t = table.lookup(&seen, 1).unwrap();
        let dialled = t.dialled.unwrap();
        assert_eq!((dialled.address, dialled.port), (address(0xa).to_vec(), 53));
        assert_eq!(t.server.unwrap().address.len(), 16);
    }

    #[test]
    fn a_tuple_reused_by_a_new_connection_belongs_to_it() {
        let mut table = TranslationTable::new(Duration::from_secs(60), 10);
        let first = service_connection();
        table.learn(first, 0);
        // The same client port now dialled another Service, served elsewhere.
        let second = Tracked {
            original: first.original,
            reply: tuple(([10, 90, 2, 9], 9090), ([10, 90, 1, 2], 41000)),
        };
        table.learn(second, 1);
        let t = table.lookup(&key(&first.original), 2).unwrap();
        assert_eq!(t.server.unwrap().address, vec![10, 90, 2, 9]);
        assert!(table.lookup(&key(&first.reply), 2).is_none());
        assert_eq!(table.len(), 1);
    }
}
