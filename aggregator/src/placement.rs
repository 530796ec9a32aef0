//! Which shard owns a connection: the fixed key → shard hash. A leaf module: the store lays out
//! positions by shard, the flow shards and the metrics count by it.

use crate::connection_key::ConnectionKey;

pub type ShardId = u16;

/// Number of key ranges. Fixed: stored positions are per shard.
pub const SHARDS: ShardId = 8;

/// The shard owning `key`: FNV-1a over the key's canonical bytes, its 64-bit space cut into
/// [`SHARDS`] equal ranges. Written out (not `std::hash`) because it must never change between
/// versions: stored state is laid out by it.
pub fn shard_of(key: &ConnectionKey) -> ShardId {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(PRIME);
        }
    };
    feed(&[key.protocol]);
    for endpoint in [&key.first, &key.second] {
        match endpoint.address {
            std::net::IpAddr::V4(a) => feed(&a.octets()),
            std::net::IpAddr::V6(a) => feed(&a.octets()),
        }
        feed(&endpoint.port.to_be_bytes());
    }
    ((u128::from(hash) * u128::from(SHARDS)) >> 64) as ShardId
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use crate::connection_key::Endpoint;

    use super::*;

    fn key(first: &str, first_port: u16, second: &str, second_port: u16) -> ConnectionKey {
        ConnectionKey {
            protocol: 6,
            first: Endpoint {
                address: first.parse::<IpAddr>().unwrap(),
                port: first_port,
            },
            second: Endpoint {
                address: second.parse::<IpAddr>().unwrap(),
                port: second_port,
            },
        }
    }

    #[test]
    fn the_shard_of_a_key_is_fixed_forever_and_keys_spread_over_all_shards() {
        // Pinned values (computed independently, in Python): changing the hash would strand
        // stored state in the wrong shard.
        assert_eq!(shard_of(&key("10.0.0.1", 40000, "10.0.0.2", 80)), 1);
        assert_eq!(shard_of(&key("fd00::1", 443, "fd00::2", 51000)), 1);
        let mut per_shard = [0u32; SHARDS as usize];
        for port in 0..8000u16 {
            per_shard[usize::from(shard_of(&key("10.1.0.1", port, "10.2.0.9", 443)))] += 1;
        }
        for count in per_shard {
            assert!((800..1200).contains(&count), "uneven spread: {per_shard:?}");
        }
    }
}
