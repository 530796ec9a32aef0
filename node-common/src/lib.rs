//! The kernel/user contract of Mermin's node capture: map keys, map values, ring-buffer events,
//! counter indices and map names, shared by `node-ebpf` (kernel) and `node-agent` (user).
//!
//! Every type is `#[repr(C)]` with explicit padding and a compile-time size assertion: implicit
//! padding would make `aya::Pod` unsound and can make the verifier reject stack reads.
//!
//! Units are fixed here, once:
//! - **bytes** are IP bytes — the IPv4 total length, or 40 + the IPv6 payload length — summed over
//!   the wire packets (NetFlow/IPFIX `octetDeltaCount`). Link-layer headers are not counted.
//!   A GSO/GRO super-packet counts as the segments it stands for, each with its own headers.
//! - **packets** are wire packets (a GSO super-packet of N segments counts N).
//! - **timestamps** are `CLOCK_MONOTONIC` nanoseconds; the agent converts them to wall-clock time
//!   in one place. A flow table entry's `first_seen_ns` is precise (`bpf_ktime_get_ns`, read once
//!   per new entry); `last_seen_ns` uses the tick-resolution clock (`bpf_ktime_get_coarse_ns`,
//!   1–4 ms) because a precise read would be the largest part of the per-packet cost. It never
//!   goes below `first_seen_ns`.
#![no_std]

/// Names of the maps in the eBPF object, so the two sides cannot drift apart.
pub mod map_names {
    /// `ARRAY_OF_MAPS` with one slot: the flow table the programs currently write to.
    pub const ACTIVE_FLOWS: &str = "ACTIVE_FLOWS";
    /// Ring buffer of [`super::PacketEvent`]s, used only when the active flow table is full.
    pub const OVERFLOW_EVENTS: &str = "OVERFLOW_EVENTS";
    /// Per-CPU array of `u64` counters indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
}

/// Names of the two TC programs in the eBPF object.
pub mod program_names {
    pub const INGRESS: &str = "mermin_ingress";
    pub const EGRESS: &str = "mermin_egress";
}

/// Capacity of the inner flow-table template compiled into the object; the agent creates the real
/// tables with the configured capacity (hash maps may differ from the template in size).
pub const FLOW_TABLE_TEMPLATE_ENTRIES: usize = 1024;
/// Size of the overflow ring buffer in bytes (a power of two, multiple of the page size).
pub const OVERFLOW_RING_BYTES: usize = 1 << 20;

/// Hook direction of an observation, as stored in [`FlowKey::direction`].
pub mod direction {
    pub const INGRESS: u8 = 1;
    pub const EGRESS: u8 = 2;
}

/// TCP flag bits as they appear in byte 13 of the TCP header.
pub mod tcp_flags {
    pub const FIN: u32 = 0x01;
    pub const SYN: u32 = 0x02;
    pub const RST: u32 = 0x04;
    pub const PSH: u32 = 0x08;
    pub const ACK: u32 = 0x10;
    pub const URG: u32 = 0x20;
    pub const ECE: u32 = 0x40;
    pub const CWR: u32 = 0x80;
    /// The bits above are the header's; flow entries and the tracker keep one more.
    pub const HEADER: u32 = 0xff;
    /// Not a header bit: a packet with ACK and without FIN followed a FIN in the same direction
    /// (the first closer acknowledging the other side's FIN completes the close). Set by the
    /// kernel within one table interval, by the agent's tracker across intervals; records to
    /// the aggregator carry [`HEADER`] bits only.
    pub const ACK_AFTER_FIN: u32 = 0x100;
}

/// Whether a TCP packet with `flags` starts a new connection on a key whose packets so far carried
/// `seen` (an OR of their flags): a SYN after the handshake was answered (ACK) or the connection
/// ended (FIN, RST); a SYN+ACK after the connection ended. Retransmitted SYNs and SYN+ACKs of the
/// same handshake do not.
#[inline(always)]
pub const fn starts_new_connection(flags: u32, seen: u32) -> bool {
    if flags & tcp_flags::SYN == 0 {
        return false;
    }
    let ended = if flags & tcp_flags::ACK == 0 {
        tcp_flags::ACK | tcp_flags::FIN | tcp_flags::RST
    } else {
        tcp_flags::FIN | tcp_flags::RST
    };
    seen & ended != 0
}

/// One direction of one flow at one observation point (interface + hook), or — with a nonzero
/// [`FlowKey::segment`] — one finished connection of that key.
///
/// Addresses are in network byte order; IPv4 addresses occupy the first 4 bytes and the rest is
/// zero. Ports are in host byte order and zero for protocols without ports. ICMP and ICMPv6 flows
/// carry the message type and code instead (ports zero).
///
/// Aligned to 8 bytes so that the kernel program writes its addresses a 64-bit word at a time.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub ifindex: u32,
    /// 4 or 6.
    pub ip_version: u8,
    /// IANA protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub protocol: u8,
    /// [`direction::INGRESS`] or [`direction::EGRESS`].
    pub direction: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// 0 for the flow's live entry. A connection that ended before a new one started on the same
    /// key within one table interval is moved to an entry with the same key and segment 1, 2, ...
    /// in the order they ended (see [`FlowStats::segments`]); the live entry holds the newest.
    pub segment: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 48 && align_of::<FlowKey>() == 8);

/// Counters of one [`FlowKey`] since the flow table it lives in became active.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowStats {
    pub packets: u64,
    pub bytes: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// OR of the TCP flags of every packet, and [`tcp_flags::ACK_AFTER_FIN`]. 64 bits wide
    /// because BPF's atomic OR is 64-bit only on the baseline CPU; only the low 9 bits are used.
    pub tcp_flags: u64,
    /// TCP flags of the first packet of this table interval.
    pub first_tcp_flags: u32,
    /// In the live entry (segment 0): how many finished connections were split off this key in
    /// this table interval. A SYN on a key whose connection was answered or ended starts a new
    /// connection ([`starts_new_connection`]): the counts so far move to the entry with segment
    /// `segments + 1`.
    pub segments: u32,
}
const _: () = assert!(size_of::<FlowStats>() == 48);

/// One packet (or GSO super-packet) that found the active flow table full.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacketEvent {
    pub key: FlowKey,
    pub packets: u64,
    pub bytes: u64,
    pub seen_ns: u64,
    pub tcp_flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<PacketEvent>() == 80);

/// Indices into the per-CPU `COUNTERS` array. Every packet the programs see ends in exactly one
/// outcome: counted in a flow table, counted via the overflow ring, or one of the reasons below.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets that found the flow table full and went to the overflow ring instead.
    OverflowEvents = 0,
    /// Packets lost: the flow table and the overflow ring were both full.
    OverflowLost = 1,
    /// Frames that are not IPv4/IPv6 (ARP, LLDP, ...): not flows, counted only.
    NonIp = 2,
    /// IP packets whose headers are truncated or invalid: counted only.
    Malformed = 3,
    /// Packets seen while no flow table was installed (before the agent finished start-up).
    NoFlowTable = 4,
    /// New connections on the key of a finished one that could not be split off (the flow table
    /// was full, or more than [`MAX_SEGMENTS`] in one interval): the two are counted as one flow.
    /// Not a packet outcome — the packets are counted — but a boundary lost.
    ConnectionsMerged = 5,
}

impl Counter {
    pub const COUNT: u32 = 6;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::OverflowEvents,
        Counter::OverflowLost,
        Counter::NonIp,
        Counter::Malformed,
        Counter::NoFlowTable,
        Counter::ConnectionsMerged,
    ];
}

/// Finished connections one key can split off in one table interval ([`FlowKey::segment`] is a
/// byte; segment 0 is the live entry).
pub const MAX_SEGMENTS: u32 = 255;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all three are #[repr(C)], Copy, have no implicit padding (checked by the size
    // assertions above) and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::PacketEvent {}
}
