//! Mermin's kernel side: two passive TC classifiers (ingress and egress) that count every packet
//! into a per-flow, per-observation-point table.
//!
//! What this owns:
//! - parsing Ethernet (+ up to two VLAN tags), IPv4 (with options), IPv6 (skipping hop-by-hop,
//!   routing, destination-options, fragment and AH headers), TCP, UDP, ICMP and ICMPv6;
//! - the flow table update: lookup, atomic adds, insert-if-absent (see `record`);
//! - connection boundaries: a new TCP connection on the key of an earlier one (a SYN where the
//!   earlier one was answered or ended, `node_common::starts_new_connection`) moves the finished connection's counts to a segment
//!   entry of the same key, so two connections never share one entry (see `split`);
//! - the overflow path: a packet that finds the table full goes to a ring buffer; if that is full
//!   too, the `OverflowLost` counter says so. Nothing is dropped without a count.
//!
//! What it never does: change a verdict (every path returns `TC_ACT_UNSPEC`, "continue"), read the
//! flow table it is not told to write (the agent swaps tables through `ACTIVE_FLOWS`), or delete.
//! The units (IP bytes, wire packets, monotonic ns) are defined in `node-common`.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so core's atomic types lack fetch_add/fetch_or; the
// intrinsics lower to the BPF atomic add/or instructions directly.
#![feature(core_intrinsics)]
// Misaligned packet loads are written as BPF instructions (`parse::load_word`).
#![feature(asm_experimental_arch)]
#![allow(internal_features)]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and events are passed by reference so they are not copied on the 512-byte BPF stack"
)]

mod parse;

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_or, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    btf_maps::{ArrayOfMaps, HashMap, PerCpuArray, RingBuf},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use node_common::{
    Counter, FLOW_TABLE_TEMPLATE_ENTRIES, FlowKey, FlowStats, MAX_SEGMENTS, OVERFLOW_RING_BYTES,
    PacketEvent, direction, starts_new_connection, tcp_flags,
};

use crate::parse::{Packet, ParseError};

type FlowTable = HashMap<FlowKey, FlowStats, FLOW_TABLE_TEMPLATE_ENTRIES>;

/// Slot 0 holds the flow table being written. The agent installs the other table and the kernel
/// waits for an RCU grace period before the update returns, so once the agent reads a table no
/// program can still be writing to it.
#[btf_map]
static ACTIVE_FLOWS: ArrayOfMaps<FlowTable, 1> = ArrayOfMaps::new();

#[btf_map]
static OVERFLOW_EVENTS: RingBuf<PacketEvent, OVERFLOW_RING_BYTES> = RingBuf::new();

#[btf_map]
static COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

const EEXIST: i32 = 17;

#[classifier]
pub fn mermin_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, direction::INGRESS);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn mermin_egress(ctx: TcContext) -> i32 {
    observe(&ctx, direction::EGRESS);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn observe(ctx: &TcContext, hook: u8) {
    match parse::packet(ctx, hook) {
        Ok(packet) => record(&packet),
        Err(ParseError::NotIp) => count(Counter::NonIp),
        Err(ParseError::Malformed) => count(Counter::Malformed),
    }
}

/// Adds one packet to the active flow table, or to the overflow ring when the table is full.
#[inline(always)]
fn record(packet: &Packet) {
    let Some(table) = ACTIVE_FLOWS.get(0) else {
        count(Counter::NoFlowTable);
        return;
    };
    if let Some(stats) = table.get_ptr_mut(&packet.key) {
        if packet.tcp_flags & tcp_flags::SYN != 0
            && starts_new_connection(packet.tcp_flags, unsafe { (*stats).tcp_flags } as u32)
        {
            if split(table, stats, packet) {
                return;
            }
            count(Counter::ConnectionsMerged);
        }
        // Established flow: the tick-resolution clock is enough for `last_seen` and costs a
        // fraction of a precise read (see node-common's units).
        add(stats, packet, unsafe { bpf_ktime_get_coarse_ns() });
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let fresh = FlowStats {
        packets: packet.packets,
        bytes: packet.bytes,
        first_seen_ns: now,
        last_seen_ns: now,
        tcp_flags: u64::from(packet.tcp_flags),
        first_tcp_flags: packet.tcp_flags,
        segments: 0,
    };
    match table.insert(&packet.key, &fresh, BPF_NOEXIST.into()) {
        Ok(()) => {}
        // Another CPU inserted the same key between our lookup and insert: add to its entry.
        Err(err) if err == -EEXIST => match table.get_ptr_mut(&packet.key) {
            Some(stats) => add(stats, packet, now),
            None => overflow(packet, now),
        },
        // -E2BIG (table full) or -ENOMEM.
        Err(_) => overflow(packet, now),
    }
}

/// Starts a new connection in the live entry `live` of `packet`'s key (`packet` is its SYN):
/// everything the entry counted so far moves to a new segment entry. Returns false, changing
/// nothing, when there is no room for the segment.
///
/// Exact under concurrency: the moved counts are subtracted from the live entry with atomic adds
/// (the baseline BPF CPU has no fetching atomics), so a packet of the finished connection that
/// another CPU adds at the same moment stays counted, in exactly one of the two entries. Only
/// its TCP flags may land in the new connection's. The segment number needs no atomic: a key's
/// SYNs come from one sender, one at a time.
#[inline(always)]
fn split(table: &FlowTable, live: *mut FlowStats, packet: &Packet) -> bool {
    // SAFETY: `live` points into a live map value (see `add`); the segment entry is written only
    // here, right after its insertion.
    unsafe {
        let number = (*live).segments + 1;
        if number > MAX_SEGMENTS {
            return false;
        }
        let mut key = packet.key;
        key.segment = number as u8;
        let now = bpf_ktime_get_ns();
        let finished = FlowStats {
            packets: (&raw const (*live).packets).read_volatile(),
            bytes: (&raw const (*live).bytes).read_volatile(),
            first_seen_ns: (*live).first_seen_ns,
            last_seen_ns: (*live).last_seen_ns,
            tcp_flags: (&raw const (*live).tcp_flags).read_volatile(),
            first_tcp_flags: (*live).first_tcp_flags,
            segments: 0,
        };
        if table.insert(&key, &finished, BPF_NOEXIST.into()).is_err() {
            return false;
        }
        (*live).segments = number;
        atomic_xadd::<u64, u64, { Relaxed }>(
            &raw mut (*live).packets,
            packet.packets.wrapping_sub(finished.packets),
        );
        atomic_xadd::<u64, u64, { Relaxed }>(
            &raw mut (*live).bytes,
            packet.bytes.wrapping_sub(finished.bytes),
        );
        (&raw mut (*live).tcp_flags).write_volatile(u64::from(packet.tcp_flags));
        (*live).first_seen_ns = now;
        (&raw mut (*live).last_seen_ns).write_volatile(now);
        (*live).first_tcp_flags = packet.tcp_flags;
    }
    true
}

#[inline(always)]
fn add(stats: *mut FlowStats, packet: &Packet, now: u64) {
    // SAFETY: `stats` points into a live map value; other CPUs update the same value only with
    // these atomic instructions, so no update is lost and nothing tears.
    unsafe {
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*stats).packets, packet.packets);
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*stats).bytes, packet.bytes);
        // The coarse clock may lag the precise first_seen by up to a tick: never move backwards.
        // An aligned 64-bit store cannot tear; racing CPUs differ by at most a tick.
        let last = &raw mut (*stats).last_seen_ns;
        if now > last.read_volatile() {
            last.write_volatile(now);
        }
        if packet.tcp_flags != 0 {
            let seen = &raw mut (*stats).tcp_flags;
            let already = seen.read_volatile();
            let mut flags = u64::from(packet.tcp_flags);
            if flags & u64::from(tcp_flags::ACK | tcp_flags::FIN) == u64::from(tcp_flags::ACK)
                && already & u64::from(tcp_flags::FIN) != 0
            {
                flags |= u64::from(tcp_flags::ACK_AFTER_FIN);
            }
            // Bits are only ever added, so a packet whose flags the entry already has (nearly
            // every packet of an established flow) skips the locked instruction.
            if already & flags != flags {
                atomic_or::<u64, u64, { Relaxed }>(seen, flags);
            }
        }
    }
}

#[inline(always)]
fn overflow(packet: &Packet, now: u64) {
    let event = PacketEvent {
        key: packet.key,
        packets: packet.packets,
        bytes: packet.bytes,
        seen_ns: now,
        tcp_flags: packet.tcp_flags,
        _pad: 0,
    };
    match OVERFLOW_EVENTS.output(&event, 0) {
        Ok(()) => count(Counter::OverflowEvents),
        Err(_) => count(Counter::OverflowLost),
    }
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot; programs on this CPU do not preempt each other.
        unsafe { *value += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
