//! The canonical, direction-free identity of a connection, and its Community ID.
//!
//! Both directions of a connection (and every observation point that saw either) map to the same
//! [`ConnectionKey`]: endpoints ordered as the Community ID v1 specification orders them
//! (addresses compared as bytes, then ports), ICMP/ICMPv6 request/reply types mapped to port-like
//! pairs so that a request and its reply share a key. [`ConnectionKey::community_id`] is the
//! spec's hash of exactly this tuple, so the key and `flow.community_id` cannot disagree.

use std::net::IpAddr;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;

/// One end of a connection as the key orders it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Endpoint {
    pub address: IpAddr,
    /// The transport port; for ICMP the (mapped) message type or code, see the module docs.
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    /// `address:port`, IPv6 in brackets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::net::SocketAddr::new(self.address, self.port).fmt(f)
    }
}

/// A directional packet tuple as observed: source → destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuple {
    pub protocol: u8,
    pub source: IpAddr,
    pub destination: IpAddr,
    pub source_port: u16,
    pub destination_port: u16,
    /// ICMP / ICMPv6 message type and code (ignored for other protocols).
    pub icmp_type: u8,
    pub icmp_code: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConnectionKey {
    pub protocol: u8,
    /// The endpoint the specification puts first.
    pub first: Endpoint,
    pub second: Endpoint,
}

/// Which way a tuple runs relative to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Orientation {
    /// source = `first`, destination = `second`.
    Forward,
    /// source = `second`, destination = `first`.
    Reverse,
}

impl ConnectionKey {
    /// The key of `tuple`, and how the tuple runs relative to it.
    pub fn of(tuple: &Tuple) -> (ConnectionKey, Orientation) {
        let (source_port, destination_port, one_way) = match tuple.protocol {
            IPPROTO_ICMP => icmp_ports(tuple.icmp_type, tuple.icmp_code, ICMP_V4_PAIRS),
            IPPROTO_ICMPV6 => icmp_ports(tuple.icmp_type, tuple.icmp_code, ICMP_V6_PAIRS),
            _ => (tuple.source_port, tuple.destination_port, false),
        };
        let source = Endpoint {
            address: tuple.source,
            port: source_port,
        };
        let destination = Endpoint {
            address: tuple.destination,
            port: destination_port,
        };
        let in_order = one_way
            || (octets(&source.address).as_slice(), source.port)
                <= (octets(&destination.address).as_slice(), destination.port);
        let (first, second, orientation) = if in_order {
            (source, destination, Orientation::Forward)
        } else {
            (destination, source, Orientation::Reverse)
        };
        (
            ConnectionKey {
                protocol: tuple.protocol,
                first,
                second,
            },
            orientation,
        )
    }

    /// Community ID v1 of this connection with the given seed: `"1:" + base64(sha1(...))`.
    pub fn community_id(&self, seed: u16) -> String {
        Self::community_text(&self.community_digest(seed))
    }

    /// The SHA-1 digest that Community ID v1 of this connection shows in base64.
    pub fn community_digest(&self, seed: u16) -> [u8; 20] {
        let mut hash = Sha1::new();
        hash.update(seed.to_be_bytes());
        hash.update(octets(&self.first.address).as_slice());
        hash.update(octets(&self.second.address).as_slice());
        hash.update([self.protocol, 0]);
        if matches!(
            self.protocol,
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_ICMP | IPPROTO_ICMPV6
        ) {
            hash.update(self.first.port.to_be_bytes());
            hash.update(self.second.port.to_be_bytes());
        }
        hash.finalize().into()
    }

    /// A Community ID v1 digest as the ID's text.
    pub fn community_text(digest: &[u8; 20]) -> String {
        // One allocation: "1:" and the 28 characters of a SHA-1 in base64.
        let mut id = String::with_capacity(30);
        id.push_str("1:");
        STANDARD.encode_string(digest, &mut id);
        id
    }
}

/// An address's bytes in network order, on the stack (this runs for every record).
struct Octets {
    bytes: [u8; 16],
    len: usize,
}

impl Octets {
    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn octets(address: &IpAddr) -> Octets {
    let mut bytes = [0; 16];
    let len = match address {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            bytes = v6.octets();
            16
        }
    };
    Octets { bytes, len }
}

/// ICMP request/reply types and their counterparts (both ways), per the specification.
const ICMP_V4_PAIRS: &[(u8, u8)] = &[(8, 0), (13, 14), (15, 16), (10, 9), (17, 18)];
const ICMP_V6_PAIRS: &[(u8, u8)] = &[
    (128, 129),
    (130, 131),
    (133, 134),
    (135, 136),
    (139, 140),
    (144, 145),
];

/// (port-like source, port-like destination, one-way) for an ICMP message.
fn icmp_ports(kind: u8, code: u8, pairs: &[(u8, u8)]) -> (u16, u16, bool) {
    let counterpart = pairs.iter().find_map(|&(a, b)| {
        if a == kind {
            Some(b)
        } else if b == kind {
            Some(a)
        } else {
            None
        }
    });
    match counterpart {
        Some(other) => (u16::from(kind), u16::from(other), false),
        None => (u16::from(kind), u16::from(code), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(protocol: u8, src: &str, dst: &str, sport: u16, dport: u16) -> Tuple {
        Tuple {
            protocol,
            source: src.parse().unwrap(),
            destination: dst.parse().unwrap(),
            source_port: sport,
            destination_port: dport,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    fn icmp(protocol: u8, src: &str, dst: &str, kind: u8, code: u8) -> Tuple {
        Tuple {
            icmp_type: kind,
            icmp_code: code,
            ..tuple(protocol, src, dst, 0, 0)
        }
    }

    fn id(t: &Tuple) -> String {
        ConnectionKey::of(t).0.community_id(0)
    }

    #[test]
    fn specification_vectors() {
        let tcp = tuple(6, "128.232.110.120", "66.35.250.204", 34855, 80);
        assert_eq!(id(&tcp), "1:LQU9qZlK+B5F3KDmev6m5PMibrg=");
        let reversed = tuple(6, "66.35.250.204", "128.232.110.120", 80, 34855);
        assert_eq!(id(&reversed), "1:LQU9qZlK+B5F3KDmev6m5PMibrg=");
        let udp = tuple(17, "192.168.1.52", "8.8.8.8", 54585, 53);
        assert_eq!(id(&udp), "1:d/FP5EW3wiY1vCndhwleRRKHowQ=");
        let ping = icmp(1, "192.168.0.89", "192.168.0.1", 8, 0);
        assert_eq!(id(&ping), "1:X0snYXpgwiv9TZtqg64sgzUn6Dk=");
    }

    #[test]
    fn request_and_reply_share_a_key_with_opposite_orientation() {
        let request = icmp(1, "192.168.0.89", "192.168.0.1", 8, 0);
        let reply = icmp(1, "192.168.0.1", "192.168.0.89", 0, 0);
        let (k1, o1) = ConnectionKey::of(&request);
        let (k2, o2) = ConnectionKey::of(&reply);
        assert_eq!(k1, k2);
        assert_ne!(o1, o2);
        let v6_request = icmp(58, "fd00::1", "fd00::2", 128, 0);
        let v6_reply = icmp(58, "fd00::2", "fd00::1", 129, 0);
        assert_eq!(
            ConnectionKey::of(&v6_request).0,
            ConnectionKey::of(&v6_reply).0
        );
    }

    #[test]
    fn one_way_icmp_is_never_swapped() {
        // Destination unreachable (3/3): type and code as ports, in the order observed.
        let unreachable = icmp(1, "10.0.0.9", "10.0.0.1", 3, 3);
        let (key, orientation) = ConnectionKey::of(&unreachable);
        assert_eq!(orientation, Orientation::Forward);
        assert_eq!(key.first.address, "10.0.0.9".parse::<IpAddr>().unwrap());
        assert_eq!((key.first.port, key.second.port), (3, 3));
    }

    #[test]
    fn protocols_without_ports_hash_addresses_only() {
        let gre = tuple(47, "10.0.0.1", "10.0.0.2", 0, 0);
        let with_ports = tuple(47, "10.0.0.1", "10.0.0.2", 1, 2);
        assert_eq!(id(&gre), id(&with_ports));
        assert_ne!(id(&gre), id(&tuple(17, "10.0.0.1", "10.0.0.2", 0, 0)));
    }
}
