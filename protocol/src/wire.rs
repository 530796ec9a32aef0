//! Protobuf written by hand where prost's generated encoders cost too much: the agent's flow
//! records (every record of every batch) and the aggregator's OTLP spans (`otlp_wire`) and
//! stored connection states (postcard shares the varint).
//!
//! prost's `encode_varint` is generic over `BufMut` and, called once per key and once per value,
//! was not inlined: 11% of an agent's CPU at 5k connections/s went to it (BENCHMARKS.md). Here a
//! varint is a loop of pushes, and a nested message's length is written in front of it when it
//! is complete (one byte is reserved, or as many as the caller expects, and the body is moved
//! in the rare case its length needs another width). What is written decodes with the generated
//! types; the tests compare bytes with prost's output. [`read`] is the other way: the agents'
//! batches, read by the aggregator.

pub mod read;

use prost::encoding::{WireType, encoded_len_varint};

use crate::flow::v1::{ConnectionEndpoint, FlowRecord, Translation};

/// Appends `value` as a LEB128 varint (protobuf's, and postcard's for every unsigned integer
/// wider than a byte).
#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Protobuf fields appended to a buffer. The small writers are `#[inline]`: the aggregator's
/// span writer calls them across the crate boundary for every field.
pub struct Fields<'a>(pub &'a mut Vec<u8>);

impl Fields<'_> {
    #[inline]
    pub fn key(&mut self, tag: u32, wire_type: WireType) {
        put_varint(self.0, u64::from(tag << 3 | wire_type as u32));
    }

    #[inline]
    pub fn bytes(&mut self, tag: u32, value: &[u8]) {
        self.key(tag, WireType::LengthDelimited);
        put_varint(self.0, value.len() as u64);
        self.0.extend_from_slice(value);
    }

    #[inline]
    pub fn varint(&mut self, tag: u32, value: u64) {
        self.key(tag, WireType::Varint);
        put_varint(self.0, value);
    }

    #[inline]
    pub fn fixed64(&mut self, tag: u32, value: u64) {
        self.key(tag, WireType::SixtyFourBit);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    /// A nested message written by `body`, its length put in front of it afterwards.
    pub fn message(&mut self, tag: u32, body: impl FnOnce(&mut Fields)) {
        self.message_sized(tag, 1, body);
    }

    /// [`Fields::message`] for a body expected to need a length of `width` bytes (2 for 128
    /// bytes to 16 KiB): that much room is left in front of it, and the body moves only if its
    /// length needs another width, so large messages are not moved as they are completed.
    pub fn message_sized(&mut self, tag: u32, width: usize, body: impl FnOnce(&mut Fields)) {
        self.key(tag, WireType::LengthDelimited);
        let at = self.0.len();
        self.0.resize(at + width, 0);
        body(&mut Fields(&mut *self.0));
        let start = at + width;
        let len = self.0.len() - start;
        let needed = encoded_len_varint(len as u64);
        if needed != width {
            let end = self.0.len();
            if needed > width {
                self.0.resize(end + needed - width, 0);
            }
            self.0.copy_within(start..end, at + needed);
            self.0.truncate(at + needed + len);
        }
        let mut rest = len as u64;
        for byte in &mut self.0[at..at + needed] {
            *byte = rest as u8 | 0x80;
            rest >>= 7;
        }
        self.0[at + needed - 1] &= 0x7f;
    }

    /// A proto3 scalar: nothing when it is zero, as prost writes it.
    fn scalar(&mut self, tag: u32, value: u64) {
        if value != 0 {
            self.varint(tag, value);
        }
    }

    /// A proto3 `string` or `bytes`: nothing when it is empty.
    fn nonempty(&mut self, tag: u32, value: &[u8]) {
        if !value.is_empty() {
            self.bytes(tag, value);
        }
    }

    /// A proto3 enum or `int32` (a negative one takes ten bytes, sign-extended).
    fn int32(&mut self, tag: u32, value: i32) {
        self.scalar(tag, i64::from(value) as u64);
    }

    /// `record` as the message field `tag`, byte for byte as prost writes it.
    pub fn flow_record(&mut self, tag: u32, record: &FlowRecord) {
        self.message(tag, |f| {
            f.nonempty(1, record.node_name.as_bytes());
            f.nonempty(2, record.interface_name.as_bytes());
            f.scalar(3, record.interface_index.into());
            f.int32(4, record.direction);
            f.nonempty(5, &record.source_address);
            f.nonempty(6, &record.destination_address);
            f.scalar(7, record.source_port.into());
            f.scalar(8, record.destination_port.into());
            f.scalar(9, record.ip_protocol.into());
            f.scalar(10, record.icmp_type.into());
            f.scalar(11, record.icmp_code.into());
            f.scalar(12, record.delta_packets);
            f.scalar(13, record.delta_octets);
            f.scalar(14, record.first_seen_unix_nanos);
            f.scalar(15, record.last_seen_unix_nanos);
            f.scalar(16, record.flow_start_unix_nanos);
            f.scalar(17, record.tcp_flags.into());
            f.scalar(18, record.first_tcp_flags.into());
            f.int32(19, record.end_reason);
            f.scalar(20, record.record_sequence);
            if let Some(translation) = &record.translation {
                f.message(21, |f| f.translation(translation));
            }
        });
    }

    fn translation(&mut self, translation: &Translation) {
        let endpoints = [
            &translation.client,
            &translation.dialled,
            &translation.translated_client,
            &translation.server,
        ];
        for (tag, endpoint) in (1..).zip(endpoints) {
            if let Some(endpoint) = endpoint {
                self.message(tag, |f| f.endpoint(endpoint));
            }
        }
    }

    fn endpoint(&mut self, endpoint: &ConnectionEndpoint) {
        self.nonempty(1, &endpoint.address);
        self.scalar(2, endpoint.port.into());
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn prost_field(tag: u32, record: &FlowRecord) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::message::encode(tag, record, &mut out);
        out
    }

    fn written(tag: u32, record: &FlowRecord) -> Vec<u8> {
        let mut out = Vec::new();
        Fields(&mut out).flow_record(tag, record);
        out
    }

    /// A record with every field set (the reader's tests use it too).
    pub(super) fn full_record() -> FlowRecord {
        let endpoint = |address: Vec<u8>, port| Some(ConnectionEndpoint { address, port });
        FlowRecord {
            node_name: "node-a".into(),
            interface_name: "veth0123456789".into(),
            interface_index: 7,
            direction: 2,
            source_address: vec![10, 0, 0, 1],
            destination_address: vec![0xfd; 16],
            source_port: 40_000,
            destination_port: 443,
            ip_protocol: 6,
            icmp_type: 8,
            icmp_code: 1,
            delta_packets: u64::MAX,
            delta_octets: 1 << 40,
            first_seen_unix_nanos: 1_765_000_000_000_000_000,
            last_seen_unix_nanos: 1_765_000_000_100_000_000,
            flow_start_unix_nanos: 1_764_999_000_000_000_000,
            tcp_flags: 0x1b,
            first_tcp_flags: 0x02,
            end_reason: 3,
            record_sequence: 300,
            translation: Some(Translation {
                client: endpoint(vec![10, 0, 0, 1], 40_000),
                dialled: endpoint(vec![10, 96, 0, 10], 443),
                translated_client: endpoint(vec![], 0),
                server: None,
            }),
        }
    }

    #[test]
    fn flow_records_are_written_as_prost_writes_them() {
        let full = full_record();
        let records = [
            full.clone(),
            FlowRecord::default(),
            FlowRecord {
                direction: -1,
                end_reason: i32::MIN,
                translation: Some(Translation::default()),
                ..FlowRecord::default()
            },
            // A record longer than 127 bytes: its length takes two bytes.
            FlowRecord {
                interface_name: "i".repeat(300),
                ..full.clone()
            },
        ];
        for record in &records {
            for tag in [2, 21] {
                let bytes = written(tag, record);
                assert_eq!(bytes, prost_field(tag, record), "{record:?}");
            }
        }
        let batch = crate::agent::v1::Batch {
            sequence: 0,
            records: records.to_vec(),
        };
        let mut out = Vec::new();
        for record in &records {
            Fields(&mut out).flow_record(2, record);
        }
        assert_eq!(crate::agent::v1::Batch::decode(&out[..]).unwrap(), batch);
    }

    /// Whatever width the caller expects, the length in front of a message is the one prost
    /// writes: bodies of 0, 127, 128, 16,383 and 16,384 bytes, with 1, 2 and 3 bytes expected.
    #[test]
    fn a_message_is_written_as_prost_writes_it_whatever_width_was_expected() {
        for name_len in [0, 125, 126, 16_380, 16_381] {
            let record = FlowRecord {
                interface_name: "i".repeat(name_len),
                ..FlowRecord::default()
            };
            let expected = prost_field(5, &record);
            for width in 1..=3 {
                let mut out = vec![0xaa];
                Fields(&mut out).message_sized(5, width, |f| {
                    f.nonempty(2, record.interface_name.as_bytes())
                });
                assert_eq!(out[0], 0xaa);
                assert_eq!(out[1..], expected[..], "body {name_len}, width {width}");
            }
        }
    }
}
