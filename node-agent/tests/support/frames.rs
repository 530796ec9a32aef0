//! Builders for synthetic Ethernet frames (fed to the programs with BPF_PROG_TEST_RUN). Checksums
//! are left zero: the programs do not verify them.

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

/// Destination and source MAC, then each VLAN tag as (TPID, VLAN id), then the ethertype.
pub fn ethernet(vlans: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    for (tpid, id) in vlans {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&id.to_be_bytes());
    }
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An IPv4 packet. `options` must be a multiple of 4 bytes; `fragment` is the flags/offset field.
pub fn ipv4(
    protocol: u8,
    src: [u8; 4],
    dst: [u8; 4],
    options: &[u8],
    fragment: u16,
    l4: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let header_len = 20 + options.len();
    let total = (header_len + l4.len()) as u16;
    let mut p = vec![0x40 | (header_len / 4) as u8, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    p.extend_from_slice(&fragment.to_be_bytes());
    p.extend_from_slice(&[64, protocol, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(options);
    p.extend_from_slice(l4);
    p
}

/// An IPv6 packet; `extensions` are already chained (each names the next header).
pub fn ipv6(next: u8, src: [u8; 16], dst: [u8; 16], extensions: &[u8], l4: &[u8]) -> Vec<u8> {
    let payload = (extensions.len() + l4.len()) as u16;
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&payload.to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(extensions);
    p.extend_from_slice(l4);
    p
}

/// A TCP segment with a 20-byte header and `payload` zero bytes.
pub fn tcp(src_port: u16, dst_port: u16, flags: u8, payload: usize) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&src_port.to_be_bytes());
    s.extend_from_slice(&dst_port.to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    s.resize(20 + payload, 0);
    s
}

/// A UDP datagram with `payload` zero bytes.
pub fn udp(src_port: u16, dst_port: u16, payload: usize) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&src_port.to_be_bytes());
    s.extend_from_slice(&dst_port.to_be_bytes());
    s.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.resize(8 + payload, 0);
    s
}

/// An ICMP or ICMPv6 message header (type, code) with 4 more bytes and `payload` zero bytes.
pub fn icmp(kind: u8, code: u8, payload: usize) -> Vec<u8> {
    let mut s = vec![kind, code, 0, 0, 0, 1, 0, 1];
    s.resize(8 + payload, 0);
    s
}

pub const V4_A: [u8; 4] = [192, 0, 2, 1];
pub const V4_B: [u8; 4] = [198, 51, 100, 7];
pub const V6_A: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const V6_B: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
