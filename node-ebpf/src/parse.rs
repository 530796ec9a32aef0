//! Header parsing: turns one skb into a [`Packet`] (flow key + what to add), or says why not.
//!
//! Headers are read with direct packet access (bounds-checked loads of whole 64-bit words, no
//! helper call) when they lie in the skb's linear data, which is nearly always; otherwise with
//! `bpf_skb_load_bytes`, which also reaches paged data. Both paths are in [`read`], so parsing
//! has one code path.

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use node_common::FlowKey;

/// What one skb contributes to its flow.
pub struct Packet {
    pub key: FlowKey,
    pub packets: u64,
    pub bytes: u64,
    pub tcp_flags: u32,
}

pub enum ParseError {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NotIp,
    /// Truncated or invalid IP headers.
    Malformed,
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const VLAN_HLEN: usize = 4;
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

const IPV6_HLEN: usize = 40;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
const MAX_IPV6_EXT_HEADERS: usize = 6;

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    frag: [u8; 2],
    ttl: u8,
    protocol: u8,
    check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// The TCP header up to and including the flags byte.
const TCP_PREFIX: usize = 14;

/// Layer-3 facts the transport parser and the byte count need.
struct Network {
    /// Offset of the IP header from the start of the frame.
    l3_offset: usize,
    /// Offset of the transport header, or `None` for a non-first fragment (no transport header).
    l4_offset: Option<usize>,
    protocol: u8,
    /// IP packet length from the header (0 for IPv4 "BIG TCP" packets).
    ip_len: u64,
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Deepest header offset the parser follows; bounds the IPv6 extension-header walk for the
/// verifier and rejects absurd chains.
const MAX_HEADER_OFFSET: usize = 512;

/// The widest header read whole: IPv6's 40 bytes, in 64-bit words.
const MAX_HEADER_WORDS: usize = 5;

/// A header's bytes as 64-bit words, so that its fields are read with loads of their width
/// (the code generator reads a byte array at an unknown alignment byte by byte).
#[repr(C)]
struct Words([u64; MAX_HEADER_WORDS]);

/// Reads a `T` at `offset` from the start of the frame.
///
/// In the linear data (nearly always) the header's words are loaded straight from the packet,
/// which needs `T` rounded up to whole words to lie inside it; otherwise (paged data, or the
/// last few bytes of a frame) `bpf_skb_load_bytes` copies exactly `T`.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, ParseError> {
    const { assert!(size_of::<T>() <= size_of::<Words>() && align_of::<T>() <= 8) };
    if offset > MAX_HEADER_OFFSET {
        return Err(ParseError::Malformed);
    }
    let words = size_of::<T>().div_ceil(8);
    let mut buffer = MaybeUninit::<Words>::uninit();
    let start = ctx.data() + offset;
    if start + words * 8 <= ctx.data_end() {
        let buffer = buffer.as_mut_ptr().cast::<u64>();
        for i in 0..words {
            // SAFETY: the word lies inside the linear packet data (checked above), and inside
            // the buffer (`T` fits in it).
            unsafe { buffer.add(i).write(load_word((start + i * 8) as *const u8)) };
        }
    } else {
        // SAFETY: the helper writes at most `size_of::<T>()` bytes into the buffer.
        let ret = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb.cast(),
                offset as u32,
                buffer.as_mut_ptr().cast(),
                size_of::<T>() as u32,
            )
        };
        if ret != 0 {
            return Err(ParseError::Malformed);
        }
    }
    // SAFETY: either path initialised `T`'s bytes; `Words` is larger and at least as aligned as
    // `T`, and `T` is plain bytes.
    Ok(unsafe { buffer.as_ptr().cast::<T>().read() })
}

/// One 64-bit load at any alignment: the kernel allows misaligned packet access wherever
/// memory access is misaligned efficiently (x86-64, arm64). Written as the instruction because
/// the code generator splits an unaligned load into eight byte loads.
///
/// # Safety
/// The eight bytes at `at` must lie inside the packet's linear data.
#[inline(always)]
unsafe fn load_word(at: *const u8) -> u64 {
    let word: u64;
    // SAFETY: the caller's bounds check is what the verifier tracks for the packet pointer.
    unsafe {
        core::arch::asm!(
            "{word} = *(u64 *)({at} + 0)",
            word = lateout(reg) word,
            at = in(reg) at,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    word
}

#[inline(always)]
pub fn packet(ctx: &TcContext, hook: u8) -> Result<Packet, ParseError> {
    let (ethertype, l3_offset) = link_layer(ctx)?;
    let mut key = FlowKey {
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        direction: hook,
        ..FlowKey::default()
    };
    let network = match ethertype {
        ETH_P_IP => ipv4(ctx, l3_offset, &mut key)?,
        ETH_P_IPV6 => ipv6(ctx, l3_offset, &mut key)?,
        _ => return Err(ParseError::NotIp),
    };
    key.protocol = network.protocol;

    let mut tcp_flags = 0;
    // Length of the IP + transport headers each segment of a GSO packet repeats.
    let mut header_len = 0;
    // Each transport header is read only as far as needed: a short datagram is not malformed.
    if let Some(l4) = network.l4_offset {
        match network.protocol {
            IPPROTO_TCP => {
                let b: [u8; TCP_PREFIX] = read(ctx, l4)?;
                key.src_port = be16([b[0], b[1]]);
                key.dst_port = be16([b[2], b[3]]);
                tcp_flags = u32::from(b[13]);
                header_len = l4 - l3_offset + usize::from(b[12] >> 4) * 4;
            }
            IPPROTO_UDP => {
                let b: [u8; 4] = read(ctx, l4)?;
                key.src_port = be16([b[0], b[1]]);
                key.dst_port = be16([b[2], b[3]]);
                header_len = l4 - l3_offset + 8;
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                let b: [u8; 2] = read(ctx, l4)?;
                key.icmp_type = b[0];
                key.icmp_code = b[1];
            }
            _ => {}
        }
    }

    let (packets, bytes) = wire_size(ctx, &network, header_len);
    Ok(Packet {
        key,
        packets,
        bytes,
        tcp_flags,
    })
}

/// Returns the ethertype after up to two VLAN tags, and the offset of the IP header.
#[inline(always)]
fn link_layer(ctx: &TcContext) -> Result<(u16, usize), ParseError> {
    let mut ethertype = be16(read(ctx, 12).map_err(|_| ParseError::NotIp)?);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = be16(read(ctx, offset + 2).map_err(|_| ParseError::NotIp)?);
        offset += VLAN_HLEN;
    }
    Ok((ethertype, offset))
}

#[inline(always)]
fn ipv4(ctx: &TcContext, offset: usize, key: &mut FlowKey) -> Result<Network, ParseError> {
    let ip: Ipv4Header = read(ctx, offset)?;
    let header_len = usize::from(ip.version_ihl & 0x0f) * 4;
    if ip.version_ihl >> 4 != 4 || header_len < 20 {
        return Err(ParseError::Malformed);
    }
    key.ip_version = 4;
    key.src_addr[..4].copy_from_slice(&ip.src);
    key.dst_addr[..4].copy_from_slice(&ip.dst);
    let fragment_offset = be16(ip.frag) & 0x1fff;
    Ok(Network {
        l3_offset: offset,
        l4_offset: (fragment_offset == 0).then_some(offset + header_len),
        protocol: ip.protocol,
        ip_len: u64::from(be16(ip.total_len)),
    })
}

#[inline(always)]
fn ipv6(ctx: &TcContext, offset: usize, key: &mut FlowKey) -> Result<Network, ParseError> {
    let ip: Ipv6Header = read(ctx, offset)?;
    if ip.version_class_flow[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    key.ip_version = 6;
    key.src_addr = ip.src;
    key.dst_addr = ip.dst;

    let mut next = ip.next_header;
    let mut l4 = offset + IPV6_HLEN;
    let mut first_fragment = true;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let header_len = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let ext: [u8; 2] = read(ctx, l4)?;
                next = ext[0];
                (usize::from(ext[1]) + 1) * 8
            }
            IPV6_FRAGMENT => {
                let ext: [u8; 4] = read(ctx, l4)?;
                next = ext[0];
                first_fragment = be16([ext[2], ext[3]]) & 0xfff8 == 0;
                8
            }
            IPV6_AH => {
                let ext: [u8; 2] = read(ctx, l4)?;
                next = ext[0];
                (usize::from(ext[1]) + 2) * 4
            }
            _ => break,
        };
        l4 += header_len;
    }
    Ok(Network {
        l3_offset: offset,
        l4_offset: first_fragment.then_some(l4),
        protocol: next,
        ip_len: IPV6_HLEN as u64 + u64::from(be16(ip.payload_len)),
    })
}

/// Wire packets and IP bytes this skb stands for (see `node-common` for the unit).
///
/// A plain packet counts its IP length from the header (so link-layer padding is not counted).
/// A GSO/GRO super-packet of N segments counts N packets, and its bytes are the skb's IP bytes
/// plus the IP + transport headers that segmentation repeats N - 1 times.
#[inline(always)]
fn wire_size(ctx: &TcContext, network: &Network, header_len: usize) -> (u64, u64) {
    let segments = u64::from(unsafe { (*ctx.skb.skb).gso_segs });
    let skb_ip_bytes = u64::from(ctx.len()).saturating_sub(network.l3_offset as u64);
    if segments > 1 {
        let repeated = (segments - 1) * header_len as u64;
        (segments, skb_ip_bytes + repeated)
    } else if network.ip_len == 0 {
        // IPv4 BIG TCP leaves total_len zero; the skb length is then the only measure.
        (1, skb_ip_bytes)
    } else {
        (1, network.ip_len)
    }
}
