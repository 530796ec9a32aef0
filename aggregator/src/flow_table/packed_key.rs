//! A [`ConnectionKey`] in 38 bytes, as the table's entries hold it (an `IpAddr` takes 17 bytes
//! and an endpoint 20): both addresses in 16 bytes (IPv4 in the first four), the family, the
//! ports and the protocol.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::connection_key::{ConnectionKey, Endpoint};

const IPV4: u8 = 4;
const IPV6: u8 = 6;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PackedKey {
    first: [u8; 16],
    second: [u8; 16],
    first_port: u16,
    second_port: u16,
    protocol: u8,
    /// 4 or 6 (0: no key, an empty entry).
    family: u8,
}

impl PackedKey {
    pub fn of(key: &ConnectionKey) -> Self {
        let (first, family) = octets(key.first.address);
        let (second, _) = octets(key.second.address);
        PackedKey {
            first,
            second,
            first_port: key.first.port,
            second_port: key.second.port,
            protocol: key.protocol,
            family,
        }
    }

    pub fn key(&self) -> ConnectionKey {
        let address = |octets: [u8; 16]| match self.family {
            IPV4 => IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3])),
            _ => IpAddr::V6(Ipv6Addr::from(octets)),
        };
        ConnectionKey {
            protocol: self.protocol,
            first: Endpoint {
                address: address(self.first),
                port: self.first_port,
            },
            second: Endpoint {
                address: address(self.second),
                port: self.second_port,
            },
        }
    }
}

fn octets(address: IpAddr) -> ([u8; 16], u8) {
    match address {
        IpAddr::V4(v4) => {
            let mut octets = [0; 16];
            octets[..4].copy_from_slice(&v4.octets());
            (octets, IPV4)
        }
        IpAddr::V6(v6) => (v6.octets(), IPV6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_both_families_come_back_unchanged() {
        let key = |first: &str, second: &str| ConnectionKey {
            protocol: 17,
            first: Endpoint {
                address: first.parse().unwrap(),
                port: 5353,
            },
            second: Endpoint {
                address: second.parse().unwrap(),
                port: 53,
            },
        };
        let v4 = key("10.0.0.1", "10.0.0.2");
        let v6 = key("fd00::1", "fd00::2");
        // The IPv4-mapped form of 10.0.0.1 is another key.
        let mapped = key("::ffff:10.0.0.1", "::ffff:10.0.0.2");
        for k in [v4, v6, mapped] {
            assert_eq!(PackedKey::of(&k).key(), k);
        }
        assert_ne!(PackedKey::of(&v4), PackedKey::of(&mapped));
        assert_eq!(std::mem::size_of::<PackedKey>(), 38);
    }
}
