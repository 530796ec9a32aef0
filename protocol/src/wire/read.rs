//! Protobuf read by hand where prost's generated decoders cost too much: the agents' batches,
//! every record of which the aggregator reads.
//!
//! prost decodes a `FlowRecord` into owned values: two strings, two byte vectors and a boxed
//! translation per record, each allocated and freed again once the record is validated
//! (about a tenth of the aggregator's CPU at 5k connections/s, BENCHMARKS.md). Here a record is
//! a [`FlowRecordView`] borrowing the batch's bytes, and a batch stays the bytes its agent sent
//! ([`BatchBytes`]), which is also what the aggregator's log keeps — unknown fields included,
//! within the message size limit like everything else. What prost decodes, this reads the same:
//! the same fields, the last of a repeated scalar, nested messages merged, unknown fields
//! skipped, an integer narrowed as prost narrows it (the tests compare). One exception: groups
//! (wire types 3 and 4, proto2's, which no proto3 sender writes) are refused, not skipped.

use prost::Message as _;
use prost::bytes::Bytes;

use crate::agent::v1::{Batch, Hello};
use crate::flow::v1::{ConnectionEndpoint, FlowRecord, Translation};

/// Bytes that are not the message they should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("truncated message")]
    Truncated,
    #[error("varint longer than ten bytes")]
    Varint,
    #[error("field {tag}: wire type {wire_type} is not one this reader knows")]
    WireType { tag: u32, wire_type: u8 },
    #[error("field {tag}: wire type {found}, expected {expected}")]
    UnexpectedWireType { tag: u32, found: u8, expected: u8 },
    #[error("field {0}: not UTF-8")]
    Utf8(u32),
    #[error("field tag 0")]
    TagZero,
    #[error("field key {0} does not fit in 32 bits")]
    Key(u64),
    #[error("hello: {0}")]
    Hello(prost::DecodeError),
    #[error("record {index}: {error}")]
    Record { index: usize, error: Box<ReadError> },
}

/// One field's value as it is on the wire (no field read here is fixed-width: those are
/// skipped, or refused where a field of another type is expected).
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Fixed32,
    Delimited(&'a [u8]),
}

impl<'a> Value<'a> {
    fn wire_type(&self) -> u8 {
        match self {
            Value::Varint(_) => 0,
            Value::Fixed64 => 1,
            Value::Delimited(_) => 2,
            Value::Fixed32 => 5,
        }
    }

    fn unexpected(&self, tag: u32, expected: u8) -> ReadError {
        ReadError::UnexpectedWireType {
            tag,
            found: self.wire_type(),
            expected,
        }
    }

    fn varint(self, tag: u32) -> Result<u64, ReadError> {
        match self {
            Value::Varint(value) => Ok(value),
            other => Err(other.unexpected(tag, 0)),
        }
    }

    /// A `uint32` (prost keeps the low 32 bits of the varint).
    fn uint32(self, tag: u32) -> Result<u32, ReadError> {
        self.varint(tag).map(|value| value as u32)
    }

    /// An `int32` or enum (the low 32 bits, as a signed number).
    fn int32(self, tag: u32) -> Result<i32, ReadError> {
        self.varint(tag).map(|value| value as i32)
    }

    fn delimited(self, tag: u32) -> Result<&'a [u8], ReadError> {
        match self {
            Value::Delimited(bytes) => Ok(bytes),
            other => Err(other.unexpected(tag, 2)),
        }
    }

    fn string(self, tag: u32) -> Result<&'a str, ReadError> {
        std::str::from_utf8(self.delimited(tag)?).map_err(|_| ReadError::Utf8(tag))
    }
}

/// The fields of one message, in order.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn of(message: &'a [u8]) -> Self {
        Fields { rest: message }
    }

    #[inline(always)]
    fn varint(&mut self) -> Result<u64, ReadError> {
        // Most keys and many values take one byte.
        if let Some((&byte, rest)) = self.rest.split_first()
            && byte < 0x80
        {
            self.rest = rest;
            return Ok(u64::from(byte));
        }
        if let Some(word) = self.rest.first_chunk::<8>() {
            return self.varint_by_word(u64::from_le_bytes(*word));
        }
        self.varint_by_byte()
    }

    /// A varint of which at least eight bytes are there, `word` its first eight: its length
    /// found from the continuation bits at once, not byte by byte (a time in nanoseconds takes
    /// nine bytes, and every record holds four).
    #[inline(always)]
    fn varint_by_word(&mut self, word: u64) -> Result<u64, ReadError> {
        const CONTINUATION: u64 = 0x8080_8080_8080_8080;
        let ends = !word & CONTINUATION;
        if ends != 0 {
            let len = (ends.trailing_zeros() / 8 + 1) as usize;
            let kept = if len == 8 {
                word
            } else {
                word & ((1 << (8 * len)) - 1)
            };
            self.rest = &self.rest[len..];
            return Ok(pack_groups(kept));
        }
        // Eight bytes continue: the ninth ends it, or the tenth (which holds the 64th bit only).
        let low = pack_groups(word);
        match self.rest.get(8..10).or(self.rest.get(8..9)) {
            Some(&[ninth, ..]) if ninth < 0x80 => {
                self.rest = &self.rest[9..];
                Ok(low | u64::from(ninth) << 56)
            }
            Some(&[ninth, tenth]) if tenth <= 1 => {
                self.rest = &self.rest[10..];
                Ok(low | u64::from(ninth & 0x7f) << 56 | u64::from(tenth) << 63)
            }
            Some(&[_, _]) => Err(ReadError::Varint),
            _ => Err(ReadError::Truncated),
        }
    }

    /// A varint near the end of a message, byte by byte.
    fn varint_by_byte(&mut self) -> Result<u64, ReadError> {
        let mut value = 0u64;
        for (i, &byte) in self.rest.iter().enumerate().take(10) {
            // The tenth byte holds the 64th bit only.
            if i == 9 && byte > 1 {
                return Err(ReadError::Varint);
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                self.rest = &self.rest[i + 1..];
                return Ok(value);
            }
        }
        Err(if self.rest.len() < 10 {
            ReadError::Truncated
        } else {
            ReadError::Varint
        })
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], ReadError> {
        if self.rest.len() < len {
            return Err(ReadError::Truncated);
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    /// The next field, or `None` at the end of the message.
    #[inline(always)]
    fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, ReadError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        // As prost: a key is a 32-bit varint (so a tag is below 2^29).
        let key = u32::try_from(key).map_err(|_| ReadError::Key(key))?;
        let tag = key >> 3;
        if tag == 0 {
            return Err(ReadError::TagZero);
        }
        let value = match (key & 7) as u8 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| ReadError::Truncated)?;
                Value::Delimited(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed32
            }
            wire_type => return Err(ReadError::WireType { tag, wire_type }),
        };
        Ok(Some((tag, value)))
    }
}

/// The seven-bit groups of up to eight varint bytes (little-endian in `word`, bytes past the
/// varint zeroed) packed into one number: continuation bits dropped, groups shifted together.
#[inline(always)]
fn pack_groups(word: u64) -> u64 {
    let x = word & 0x7f7f_7f7f_7f7f_7f7f;
    let x = (x & 0x007f_007f_007f_007f) | (x & 0x7f00_7f00_7f00_7f00) >> 1;
    let x = (x & 0x0000_3fff_0000_3fff) | (x & 0x3fff_0000_3fff_0000) >> 2;
    (x & 0x0000_0000_0fff_ffff) | (x & 0x0fff_ffff_0000_0000) >> 4
}

/// A `ConnectionEndpoint`, borrowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointView<'a> {
    pub address: &'a [u8],
    pub port: u32,
}

impl<'a> EndpointView<'a> {
    fn merge(&mut self, message: &'a [u8]) -> Result<(), ReadError> {
        let mut fields = Fields::of(message);
        while let Some((tag, value)) = fields.next_field()? {
            match tag {
                1 => self.address = value.delimited(tag)?,
                2 => self.port = value.uint32(tag)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// A `Translation`, borrowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TranslationView<'a> {
    pub client: Option<EndpointView<'a>>,
    pub dialled: Option<EndpointView<'a>>,
    pub translated_client: Option<EndpointView<'a>>,
    pub server: Option<EndpointView<'a>>,
}

impl<'a> TranslationView<'a> {
    fn merge(&mut self, message: &'a [u8]) -> Result<(), ReadError> {
        let mut fields = Fields::of(message);
        while let Some((tag, value)) = fields.next_field()? {
            let endpoint = match tag {
                1 => &mut self.client,
                2 => &mut self.dialled,
                3 => &mut self.translated_client,
                4 => &mut self.server,
                _ => continue,
            };
            endpoint
                .get_or_insert_default()
                .merge(value.delimited(tag)?)?;
        }
        Ok(())
    }
}

/// A `FlowRecord` borrowing the bytes it was read from (or a decoded record's fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowRecordView<'a> {
    pub node_name: &'a str,
    pub interface_name: &'a str,
    pub interface_index: u32,
    pub direction: i32,
    pub source_address: &'a [u8],
    pub destination_address: &'a [u8],
    pub source_port: u32,
    pub destination_port: u32,
    pub ip_protocol: u32,
    pub icmp_type: u32,
    pub icmp_code: u32,
    pub delta_packets: u64,
    pub delta_octets: u64,
    pub first_seen_unix_nanos: u64,
    pub last_seen_unix_nanos: u64,
    pub flow_start_unix_nanos: u64,
    pub tcp_flags: u32,
    pub first_tcp_flags: u32,
    pub end_reason: i32,
    pub record_sequence: u64,
    pub translation: Option<TranslationView<'a>>,
}

impl<'a> FlowRecordView<'a> {
    /// Reads one encoded `FlowRecord`.
    pub fn read(message: &'a [u8]) -> Result<Self, ReadError> {
        let mut record = FlowRecordView::default();
        let mut fields = Fields::of(message);
        while let Some((tag, value)) = fields.next_field()? {
            match tag {
                1 => record.node_name = value.string(tag)?,
                2 => record.interface_name = value.string(tag)?,
                3 => record.interface_index = value.uint32(tag)?,
                4 => record.direction = value.int32(tag)?,
                5 => record.source_address = value.delimited(tag)?,
                6 => record.destination_address = value.delimited(tag)?,
                7 => record.source_port = value.uint32(tag)?,
                8 => record.destination_port = value.uint32(tag)?,
                9 => record.ip_protocol = value.uint32(tag)?,
                10 => record.icmp_type = value.uint32(tag)?,
                11 => record.icmp_code = value.uint32(tag)?,
                12 => record.delta_packets = value.varint(tag)?,
                13 => record.delta_octets = value.varint(tag)?,
                14 => record.first_seen_unix_nanos = value.varint(tag)?,
                15 => record.last_seen_unix_nanos = value.varint(tag)?,
                16 => record.flow_start_unix_nanos = value.varint(tag)?,
                17 => record.tcp_flags = value.uint32(tag)?,
                18 => record.first_tcp_flags = value.uint32(tag)?,
                19 => record.end_reason = value.int32(tag)?,
                20 => record.record_sequence = value.varint(tag)?,
                21 => record
                    .translation
                    .get_or_insert_default()
                    .merge(value.delimited(tag)?)?,
                _ => {}
            }
        }
        Ok(record)
    }
}

impl<'a> From<&'a ConnectionEndpoint> for EndpointView<'a> {
    fn from(endpoint: &'a ConnectionEndpoint) -> Self {
        EndpointView {
            address: &endpoint.address,
            port: endpoint.port,
        }
    }
}

impl<'a> From<&'a Translation> for TranslationView<'a> {
    fn from(t: &'a Translation) -> Self {
        TranslationView {
            client: t.client.as_ref().map(Into::into),
            dialled: t.dialled.as_ref().map(Into::into),
            translated_client: t.translated_client.as_ref().map(Into::into),
            server: t.server.as_ref().map(Into::into),
        }
    }
}

impl<'a> From<&'a FlowRecord> for FlowRecordView<'a> {
    fn from(r: &'a FlowRecord) -> Self {
        FlowRecordView {
            node_name: &r.node_name,
            interface_name: &r.interface_name,
            interface_index: r.interface_index,
            direction: r.direction,
            source_address: &r.source_address,
            destination_address: &r.destination_address,
            source_port: r.source_port,
            destination_port: r.destination_port,
            ip_protocol: r.ip_protocol,
            icmp_type: r.icmp_type,
            icmp_code: r.icmp_code,
            delta_packets: r.delta_packets,
            delta_octets: r.delta_octets,
            first_seen_unix_nanos: r.first_seen_unix_nanos,
            last_seen_unix_nanos: r.last_seen_unix_nanos,
            flow_start_unix_nanos: r.flow_start_unix_nanos,
            tcp_flags: r.tcp_flags,
            first_tcp_flags: r.first_tcp_flags,
            end_reason: r.end_reason,
            record_sequence: r.record_sequence,
            translation: r.translation.as_ref().map(Into::into),
        }
    }
}

/// An encoded `Batch` message as its agent sent it, its sequence read: what the aggregator
/// validates, logs (these bytes) and replays. Two batches are the same batch when their bytes
/// are; see [`BatchBytes::same_content`] for batches encoded differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchBytes {
    sequence: u64,
    bytes: Bytes,
}

impl BatchBytes {
    /// Reads the sequence of the encoded `Batch` in `bytes` (its records are read by
    /// [`BatchBytes::records`]).
    pub fn new(bytes: Bytes) -> Result<Self, ReadError> {
        let sequence = read_batch(&bytes)?.unwrap_or(0);
        Ok(BatchBytes { sequence, bytes })
    }

    /// `batch`, encoded by prost.
    pub fn encode(batch: &Batch) -> Self {
        BatchBytes {
            sequence: batch.sequence,
            bytes: batch.encode_to_vec().into(),
        }
    }

    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The encoded `Batch`.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// How many records the batch holds (counted without reading them: what a limit on
    /// records is checked against before they take memory).
    pub fn record_count(&self) -> usize {
        let mut fields = Fields::of(&self.bytes);
        let mut count = 0;
        // `new` read every field once already.
        while let Ok(Some((tag, _))) = fields.next_field() {
            count += usize::from(tag == 2);
        }
        count
    }

    /// The batch's records, each read when it is reached (a record that does not read is an
    /// error naming its index; callers stop there). The fields around them were read by `new`.
    pub fn records(&self) -> impl Iterator<Item = Result<FlowRecordView<'_>, ReadError>> {
        let mut fields = Fields::of(&self.bytes);
        let mut index = 0;
        std::iter::from_fn(move || {
            loop {
                let (tag, value) = fields.next_field().ok()??;
                if tag == 2 {
                    let record = value.delimited(tag).and_then(FlowRecordView::read);
                    index += 1;
                    return Some(record.map_err(|error| ReadError::Record {
                        index: index - 1,
                        error: Box::new(error),
                    }));
                }
            }
        })
    }

    /// Whether the two hold the same sequence and records, however each was encoded (compared
    /// record by record: nothing is held but the pair compared).
    pub fn same_content(&self, other: &BatchBytes) -> bool {
        if self == other {
            return true;
        }
        self.sequence == other.sequence
            && self.record_count() == other.record_count()
            && self
                .records()
                .zip(other.records())
                .all(|(a, b)| matches!((a, b), (Ok(a), Ok(b)) if a == b))
    }
}

/// Reads every field of an encoded `Batch` once, checking that each is well-formed; returns
/// the last `sequence` it holds, if any.
fn read_batch(bytes: &[u8]) -> Result<Option<u64>, ReadError> {
    let mut sequence = None;
    let mut fields = Fields::of(bytes);
    while let Some((tag, value)) = fields.next_field()? {
        match tag {
            1 => sequence = Some(value.varint(tag)?),
            2 => {
                value.delimited(tag)?;
            }
            _ => {}
        }
    }
    Ok(sequence)
}

/// An `AgentMessage`, its batch kept as bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentMessageRead {
    Hello(Hello),
    Batch(BatchBytes),
}

impl AgentMessageRead {
    /// Reads an encoded `AgentMessage`; `None` if it holds neither message. As prost does, the
    /// last of the oneof's fields wins, and one field given twice is merged (a batch's encoded
    /// parts concatenated: that is how protobuf merges messages).
    pub fn read(bytes: Bytes) -> Result<Option<Self>, ReadError> {
        /// A batch's parts, each read once and joined once at the end (joining and reading
        /// again at each part would be quadratic in their number).
        enum Reading {
            Nothing,
            Hello(Hello),
            /// The batch's parts (protobuf merges a repeated message field): the first as
            /// received, the later ones appended to a copy of it (never more than the message).
            Batch {
                first: Bytes,
                joined: Option<Vec<u8>>,
                sequence: u64,
            },
        }
        let mut reading = Reading::Nothing;
        let mut fields = Fields::of(&bytes);
        while let Some((tag, value)) = fields.next_field()? {
            let part =
                || -> Result<Bytes, ReadError> { Ok(bytes.slice_ref(value.delimited(tag)?)) };
            reading = match (tag, reading) {
                (1, Reading::Hello(mut hello)) => {
                    hello.merge(part()?).map_err(ReadError::Hello)?;
                    Reading::Hello(hello)
                }
                (1, _) => Reading::Hello(Hello::decode(part()?).map_err(ReadError::Hello)?),
                (
                    2,
                    Reading::Batch {
                        first,
                        joined,
                        sequence,
                    },
                ) => {
                    let part = part()?;
                    let sequence = read_batch(&part)?.unwrap_or(sequence);
                    let mut joined = joined.unwrap_or_else(|| first.to_vec());
                    joined.extend_from_slice(&part);
                    Reading::Batch {
                        first,
                        joined: Some(joined),
                        sequence,
                    }
                }
                (2, _) => {
                    let first = part()?;
                    let sequence = read_batch(&first)?.unwrap_or(0);
                    Reading::Batch {
                        first,
                        joined: None,
                        sequence,
                    }
                }
                (_, kept) => kept,
            };
        }
        Ok(match reading {
            Reading::Nothing => None,
            Reading::Hello(hello) => Some(AgentMessageRead::Hello(hello)),
            Reading::Batch {
                first,
                joined,
                sequence,
            } => {
                let bytes = joined.map_or(first, Bytes::from);
                Some(AgentMessageRead::Batch(BatchBytes { sequence, bytes }))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Fields as Writer, tests::full_record};

    /// What prost decodes from `bytes`, and what this reader reads, as views to compare.
    fn both(
        bytes: &[u8],
    ) -> (
        Result<FlowRecord, prost::DecodeError>,
        Result<FlowRecordView<'_>, ReadError>,
    ) {
        (FlowRecord::decode(bytes), FlowRecordView::read(bytes))
    }

    #[test]
    fn records_read_as_prost_decodes_them() {
        let records = [
            full_record(),
            FlowRecord::default(),
            FlowRecord {
                direction: -1,
                end_reason: i32::MIN,
                translation: Some(Translation::default()),
                ..FlowRecord::default()
            },
            FlowRecord {
                interface_name: "i".repeat(300),
                ..full_record()
            },
        ];
        for record in &records {
            let bytes = record.encode_to_vec();
            let (decoded, read) = both(&bytes);
            assert_eq!(read.unwrap(), FlowRecordView::from(&decoded.unwrap()));
            assert_eq!(
                FlowRecordView::read(&bytes).unwrap(),
                FlowRecordView::from(record)
            );
        }
    }

    #[test]
    fn prost_decoding_rules_are_kept() {
        let mut bytes = Vec::new();
        let mut w = Writer(&mut bytes);
        // A scalar twice: the last wins.
        w.varint(7, 1);
        w.varint(7, 2);
        // A uint32 given a 64-bit value: its low 32 bits; an enum too (as i32).
        w.varint(8, (1 << 32) | 443);
        w.varint(4, u64::MAX);
        // Unknown fields of every wire type are skipped.
        w.varint(99, 5);
        w.fixed64(98, 5);
        w.bytes(97, b"unknown");
        w.key(96, prost::encoding::WireType::ThirtyTwoBit);
        w.0.extend_from_slice(&[1, 2, 3, 4]);
        // A nested message twice: merged field by field.
        w.message(21, |t| t.message(1, |e| e.bytes(1, &[10, 0, 0, 1])));
        w.message(21, |t| t.message(1, |e| e.varint(2, 80)));
        w.message(21, |t| t.message(4, |e| e.varint(2, 8080)));
        let (decoded, read) = both(&bytes);
        let decoded = decoded.unwrap();
        assert_eq!(read.unwrap(), FlowRecordView::from(&decoded));
        assert_eq!((decoded.source_port, decoded.destination_port), (2, 443));
        assert_eq!(decoded.direction, -1);
        let client = decoded
            .translation
            .as_ref()
            .unwrap()
            .client
            .as_ref()
            .unwrap();
        assert_eq!(
            (client.address.as_slice(), client.port),
            (&[10, 0, 0, 1][..], 80)
        );
    }

    #[test]
    fn malformed_records_are_refused_where_prost_refuses_them() {
        let good = full_record().encode_to_vec();
        // Cut anywhere: refused by both inside a field, read the same at a field's end.
        for len in 1..good.len() {
            match both(&good[..len]) {
                (Ok(decoded), Ok(read)) => assert_eq!(read, FlowRecordView::from(&decoded)),
                (Err(_), Err(_)) => {}
                (decoded, read) => panic!("cut at {len}: prost {decoded:?}, read {read:?}"),
            }
        }
        let cases: [(&[u8], ReadError); 6] = [
            // node_name (1) as a varint.
            (
                &[0x08, 0x01],
                ReadError::UnexpectedWireType {
                    tag: 1,
                    found: 0,
                    expected: 2,
                },
            ),
            // source_port (7) as bytes.
            (
                &[0x3a, 0x00],
                ReadError::UnexpectedWireType {
                    tag: 7,
                    found: 2,
                    expected: 0,
                },
            ),
            // interface_name (2) not UTF-8.
            (&[0x12, 0x01, 0xff], ReadError::Utf8(2)),
            // A group (wire type 3).
            (
                &[0x0b],
                ReadError::WireType {
                    tag: 1,
                    wire_type: 3,
                },
            ),
            // A key past 32 bits (tag 2^29), which prost refuses too.
            (
                &[0x80, 0x80, 0x80, 0x80, 0x10, 0x00],
                ReadError::Key(1 << 32),
            ),
            // A varint past 64 bits.
            (
                &[
                    0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
                ],
                ReadError::Varint,
            ),
        ];
        for (bytes, error) in cases {
            let (decoded, read) = both(bytes);
            assert!(decoded.is_err(), "prost takes {bytes:?}");
            assert_eq!(read.unwrap_err(), error, "{bytes:?}");
        }
        assert_eq!(
            ReadError::UnexpectedWireType {
                tag: 7,
                found: 2,
                expected: 0
            }
            .to_string(),
            "field 7: wire type 2, expected 0"
        );
    }

    #[test]
    fn a_batch_keeps_its_bytes_and_reads_its_records() {
        let records = vec![full_record(), FlowRecord::default()];
        let batch = Batch {
            sequence: 41,
            records: records.clone(),
        };
        let encoded = BatchBytes::encode(&batch);
        let received = BatchBytes::new(Bytes::from(batch.encode_to_vec())).unwrap();
        assert_eq!(received, encoded);
        assert_eq!(received.sequence(), 41);
        let read = received.records().collect::<Result<Vec<_>, _>>().unwrap();
        let expected: Vec<_> = records.iter().map(FlowRecordView::from).collect();
        assert_eq!(read, expected);
        assert_eq!(Batch::decode(received.bytes().as_ref()).unwrap(), batch);
        assert_eq!(received.record_count(), 2);
        // The same records encoded another way (the sequence after them) are the same batch;
        // another record is not.
        let mut reordered = Vec::new();
        for record in &records {
            Writer(&mut reordered).flow_record(2, record);
        }
        Writer(&mut reordered).varint(1, 41);
        let reordered = BatchBytes::new(Bytes::from(reordered)).unwrap();
        assert_ne!(reordered, received);
        assert!(reordered.same_content(&received));
        let other = BatchBytes::encode(&Batch {
            sequence: 41,
            records: vec![FlowRecord::default()],
        });
        assert!(!other.same_content(&received));
        // A record that is not one is refused, by its index, when the records are read.
        let mut bad = received.bytes().to_vec();
        Writer(&mut bad).bytes(2, &[0x08, 0x01]);
        assert_eq!(
            BatchBytes::new(Bytes::from(bad))
                .unwrap()
                .records()
                .collect::<Result<Vec<_>, _>>()
                .unwrap_err()
                .to_string(),
            "record 2: field 1: wire type 0, expected 2"
        );
        // A batch whose record is cut short is refused.
        let mut cut = batch.encode_to_vec();
        cut.truncate(cut.len() - 1);
        assert_eq!(
            BatchBytes::new(Bytes::from(cut)).unwrap_err(),
            ReadError::Truncated
        );
    }

    #[test]
    fn agent_messages_read_as_prost_decodes_them() {
        use crate::agent::v1::{AgentMessage, agent_message::Message};
        let hello = Hello {
            protocol_version: 1,
            node_name: "node-a".into(),
            agent_version: "0.1.0".into(),
            boot_id: vec![7; 16],
        };
        let batch = |sequence, records: Vec<FlowRecord>| Batch { sequence, records };
        let encode = |message: Message| {
            AgentMessage {
                message: Some(message),
            }
            .encode_to_vec()
        };
        let read = |bytes: Vec<u8>| AgentMessageRead::read(Bytes::from(bytes)).unwrap();
        assert_eq!(
            read(encode(Message::Hello(hello.clone()))),
            Some(AgentMessageRead::Hello(hello.clone()))
        );
        let one = batch(3, vec![full_record()]);
        assert_eq!(
            read(encode(Message::Batch(one.clone()))),
            Some(AgentMessageRead::Batch(BatchBytes::encode(&one)))
        );
        assert_eq!(read(Vec::new()), None);
        // Two parts of one batch are merged as prost merges them; the last oneof field wins.
        let two = batch(4, vec![FlowRecord::default()]);
        let mut both = encode(Message::Batch(one.clone()));
        both.extend(encode(Message::Batch(two.clone())));
        let decoded = AgentMessage::decode(both.as_slice()).unwrap();
        let Some(AgentMessageRead::Batch(merged)) = read(both.clone()) else {
            panic!("not a batch");
        };
        assert_eq!(
            Some(Message::Batch(
                Batch::decode(merged.bytes().as_ref()).unwrap()
            )),
            decoded.message
        );
        assert_eq!(merged.sequence(), 4);
        assert_eq!(
            merged
                .records()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
                .len(),
            2
        );
        let mut last = encode(Message::Batch(one));
        last.extend(encode(Message::Hello(hello.clone())));
        assert_eq!(read(last), Some(AgentMessageRead::Hello(hello)));
        // A malformed Hello is refused with prost's reason.
        assert_eq!(
            AgentMessageRead::read(Bytes::from_static(&[0x0a, 0x02, 0x08, 0x80]))
                .unwrap_err()
                .to_string(),
            "hello: failed to decode Protobuf message: Hello.protocol_version: invalid varint"
        );
    }

    #[test]
    fn a_batch_in_many_parts_is_read_in_one_pass() {
        use crate::agent::v1::{AgentMessage, agent_message::Message};
        // 200,000 parts: joined and read again at each part, this would copy ~40 GB.
        let parts = 200_000;
        let mut bytes = Vec::new();
        for sequence in 1..=parts {
            let part = Batch {
                sequence,
                records: vec![FlowRecord::default()],
            };
            bytes.extend(
                AgentMessage {
                    message: Some(Message::Batch(part)),
                }
                .encode_to_vec(),
            );
        }
        let decoded = AgentMessage::decode(bytes.as_slice()).unwrap();
        let Some(AgentMessageRead::Batch(batch)) = AgentMessageRead::read(bytes.into()).unwrap()
        else {
            panic!("not a batch");
        };
        assert_eq!(batch.sequence(), parts);
        assert_eq!(batch.record_count(), parts as usize);
        assert_eq!(
            Some(Message::Batch(
                Batch::decode(batch.bytes().as_ref()).unwrap()
            )),
            decoded.message
        );
    }

    /// Every varint length, minimal or overlong, at the end of a message or followed by more
    /// bytes (read a word at a time or byte by byte): the value prost decodes, or an error
    /// where prost gives one.
    #[test]
    fn varints_read_as_prost_decodes_them_whatever_follows() {
        let mut encodings: Vec<Vec<u8>> = Vec::new();
        for bits in 0..64 {
            for value in [1u64 << bits, (1u64 << bits) - 1, (1u64 << bits) | 0x55] {
                let mut bytes = Vec::new();
                prost::encoding::encode_varint(value, &mut bytes);
                encodings.push(bytes);
            }
        }
        encodings.push(vec![0xff; 9].into_iter().chain([0x01]).collect());
        // Overlong: zero in two to ten bytes, and one with a trailing zero group.
        for len in 2..=10 {
            let mut zero = vec![0x80; len - 1];
            zero.push(0);
            encodings.push(zero);
        }
        encodings.push(vec![0x81, 0x80, 0x80, 0x00]);
        // Malformed: a tenth byte over 1, or no end within ten bytes; cut short.
        encodings.push([vec![0xff; 9], vec![0x02]].concat());
        encodings.push(vec![0xff; 11]);
        for len in 1..=9 {
            encodings.push(vec![0x80; len]);
        }
        for encoding in &encodings {
            for tail in [&[][..], &[0x7f; 12][..]] {
                let bytes = [encoding.as_slice(), tail].concat();
                let mut prost_rest = &bytes[..];
                let expected = prost::encoding::decode_varint(&mut prost_rest);
                let mut fields = Fields::of(&bytes);
                let read = fields.varint();
                match (&expected, &read) {
                    (Ok(want), Ok(got)) => {
                        assert_eq!(got, want, "{bytes:x?}");
                        assert_eq!(fields.rest.len(), prost_rest.len(), "{bytes:x?}");
                    }
                    (Err(_), Err(_)) => {}
                    _ => panic!("{bytes:x?}: prost {expected:?}, read {read:?}"),
                }
            }
        }
    }
}
