//! OTLP trace export requests written straight to protobuf bytes, in the form the outbox stores
//! them ([`RequestWriter`]: the span count, then an `ExportTraceServiceRequest`).
//!
//! Building the `opentelemetry-proto` structures first cost two owned strings per attribute and
//! computed every nested message's length once per enclosing level; with the spans written here
//! directly (with `mermin_protocol::wire::Fields`) a span costs no allocation and each length is
//! computed once. The output decodes with the `opentelemetry-proto` types (the span tests
//! decode every request they check).
//!
//! Field numbers are those of `opentelemetry/proto/{collector/trace,trace,resource,common}/v1`.

use mermin_protocol::wire::{Fields, put_varint};
use prost::encoding::WireType;

/// `ExportTraceServiceRequest.resource_spans`.
const REQUEST_RESOURCE_SPANS: u32 = 1;
/// `ResourceSpans.resource`, `.scope_spans`.
const RESOURCE_SPANS_RESOURCE: u32 = 1;
const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
/// `Resource.attributes`.
const RESOURCE_ATTRIBUTES: u32 = 1;
/// `ScopeSpans.scope`, `.spans`.
const SCOPE_SPANS_SCOPE: u32 = 1;
const SCOPE_SPANS_SPANS: u32 = 2;
/// `InstrumentationScope.name`, `.version`.
const SCOPE_NAME: u32 = 1;
const SCOPE_VERSION: u32 = 2;
/// `Span` fields.
const SPAN_TRACE_ID: u32 = 1;
const SPAN_SPAN_ID: u32 = 2;
const SPAN_PARENT_SPAN_ID: u32 = 4;
const SPAN_NAME: u32 = 5;
const SPAN_KIND: u32 = 6;
const SPAN_START_TIME: u32 = 7;
const SPAN_END_TIME: u32 = 8;
const SPAN_ATTRIBUTES: u32 = 9;
const SPAN_LINKS: u32 = 13;
/// `Span.Link.trace_id`, `.span_id`.
const LINK_TRACE_ID: u32 = 1;
const LINK_SPAN_ID: u32 = 2;
/// `KeyValue.key`, `.value`.
const KEY_VALUE_KEY: u32 = 1;
const KEY_VALUE_VALUE: u32 = 2;
/// `AnyValue.string_value`, `.int_value`, `.array_value`.
const ANY_STRING: u32 = 1;
const ANY_INT: u32 = 3;
const ANY_ARRAY: u32 = 5;
/// `ArrayValue.values`.
const ARRAY_VALUES: u32 = 1;

/// Bytes of the span count in front of an outbox entry's request.
const COUNT_BYTES: usize = 4;

/// Spans per export request at most (1,000 connection intervals).
pub const MAX_REQUEST_SPANS: u32 = 2_000;

/// Encoded size of an export request at most (one connection interval more is the exception):
/// half the 4 MB gRPC message limit that Tempo and collectors apply by default, whatever names
/// and labels the spans carry.
pub const MAX_REQUEST_BYTES: usize = 2 << 20;

/// The most a joined request's buffer is sized for (its count and [`MAX_REQUEST_BYTES`]); only
/// an entry larger than that on its own makes a larger one.
pub const JOINED_REQUEST_BYTES: usize = COUNT_BYTES + MAX_REQUEST_BYTES;

/// The outbox entries `entries` joined, in order, into as few as fit [`MAX_REQUEST_SPANS`] and
/// [`MAX_REQUEST_BYTES`]: an export request's one field repeats, so two requests concatenated
/// are one request with the spans of both. An entry too short to hold a count stays alone.
///
/// The requests are written into buffers taken from `spare` (emptied first) where it has any:
/// a caller that joins every tick and hands the buffers back reuses the same memory, where
/// fresh megabytes every tick were pages to fault in again (~2% of the aggregator's CPU).
pub fn join_entries(entries: &[&[u8]], spare: &mut Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let count = |entry: &[u8]| -> Option<u32> {
        Some(u32::from_be_bytes(
            entry.get(..COUNT_BYTES)?.try_into().ok()?,
        ))
    };
    let mut joined: Vec<Vec<u8>> = Vec::new();
    let mut left: usize = entries.iter().map(|entry| entry.len()).sum();
    for entry in entries {
        let fits = |last: &Vec<u8>| {
            let (Some(spans), Some(more)) = (count(last), count(entry)) else {
                return None;
            };
            let bytes = last.len() + entry.len() - 2 * COUNT_BYTES;
            (spans + more <= MAX_REQUEST_SPANS && bytes <= MAX_REQUEST_BYTES)
                .then_some(spans + more)
        };
        match joined.last_mut().and_then(|last| Some((fits(last)?, last))) {
            Some((spans, last)) => {
                last[..COUNT_BYTES].copy_from_slice(&spans.to_be_bytes());
                last.extend_from_slice(&entry[COUNT_BYTES..]);
            }
            None => {
                // Sized for what may still join it: never grown by doubling (a copy of
                // megabytes, and fresh pages to fault in, every tick).
                let mut first = spare.pop().unwrap_or_default();
                first.clear();
                first.reserve_exact(left.min(JOINED_REQUEST_BYTES));
                first.extend_from_slice(entry);
                joined.push(first);
            }
        }
        left -= entry.len();
    }
    joined
}

/// The OTLP writer's string fields beyond the protobuf basics.
trait TextFields {
    /// A string field whose value is `parts` joined by `separator`, written without building
    /// it.
    fn joined(&mut self, tag: u32, parts: &[&str], separator: &str);

    /// A string field whose value is `parts` joined by dots.
    fn dotted(&mut self, tag: u32, parts: &[&str]) {
        self.joined(tag, parts, ".");
    }

    /// A string field holding `value` formatted, written without building the string.
    fn formatted(&mut self, tag: u32, value: impl std::fmt::Display);
}

impl TextFields for Fields<'_> {
    fn joined(&mut self, tag: u32, parts: &[&str], separator: &str) {
        if let [whole] = parts {
            // Every attribute's key.
            return self.bytes(tag, whole.as_bytes());
        }
        let len = parts.iter().map(|p| p.len()).sum::<usize>()
            + parts.len().saturating_sub(1) * separator.len();
        self.key(tag, WireType::LengthDelimited);
        put_varint(self.0, len as u64);
        self.0.reserve(len);
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                self.0.extend_from_slice(separator.as_bytes());
            }
            self.0.extend_from_slice(part.as_bytes());
        }
    }

    fn formatted(&mut self, tag: u32, value: impl std::fmt::Display) {
        self.message(tag, |text| {
            use std::fmt::Write;
            // Writing into a Vec cannot fail.
            let _ = write!(Utf8(text.0), "{value}");
        });
    }
}

/// Formatted text appended to a buffer: `fmt::Write` straight onto the vector (`io::Write`'s
/// adapter costs an error slot and a `write_all` loop per piece).
struct Utf8<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Utf8<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

/// Where string attributes with dotted keys go (the metadata join writes through this).
pub trait StringAttributes {
    /// A string attribute whose key is `key` joined by dots (`["source", "pod.name"]`).
    fn dotted_string(&mut self, key: &[&str], value: &str);
}

/// The attributes of a span or a resource (`KeyValue`s), as they are written.
pub struct Attributes<'a> {
    fields: Fields<'a>,
    tag: u32,
}

impl Attributes<'_> {
    pub fn string(&mut self, key: &str, value: &str) {
        self.dotted_string(&[key], value);
    }

    /// A string attribute whose value is formatted (addresses, labels), without an allocation.
    pub fn display(&mut self, key: &str, value: impl std::fmt::Display) {
        self.fields.message(self.tag, |kv| {
            kv.dotted(KEY_VALUE_KEY, &[key]);
            kv.message(KEY_VALUE_VALUE, |any| any.formatted(ANY_STRING, value));
        });
    }

    pub fn int(&mut self, key: &str, value: i64) {
        self.fields.message(self.tag, |kv| {
            kv.dotted(KEY_VALUE_KEY, &[key]);
            // int64 is encoded as the two's complement varint.
            kv.message(KEY_VALUE_VALUE, |any| any.varint(ANY_INT, value as u64));
        });
    }

    /// An array of strings, each its parts joined by `separator` (written without building
    /// them: observation points are `node/interface/hook`, eight per connection).
    pub fn joined_strings<'s, P: AsRef<[&'s str]>>(
        &mut self,
        key: &str,
        separator: &str,
        values: impl IntoIterator<Item = P>,
    ) {
        self.fields.message(self.tag, |kv| {
            kv.dotted(KEY_VALUE_KEY, &[key]);
            kv.message(KEY_VALUE_VALUE, |any| {
                any.message(ANY_ARRAY, |array| {
                    for value in values {
                        array.message(ARRAY_VALUES, |element| {
                            element.joined(ANY_STRING, value.as_ref(), separator)
                        });
                    }
                });
            });
        });
    }

    /// A string attribute whose value is `parts` joined by `separator`.
    pub fn joined_string(&mut self, key: &str, separator: &str, parts: &[&str]) {
        self.fields.message(self.tag, |kv| {
            kv.dotted(KEY_VALUE_KEY, &[key]);
            kv.message(KEY_VALUE_VALUE, |any| {
                any.joined(ANY_STRING, parts, separator)
            });
        });
    }
}

impl StringAttributes for Attributes<'_> {
    fn dotted_string(&mut self, key: &[&str], value: &str) {
        self.fields.message(self.tag, |kv| {
            kv.dotted(KEY_VALUE_KEY, key);
            kv.message(KEY_VALUE_VALUE, |any| {
                any.bytes(ANY_STRING, value.as_bytes())
            });
        });
    }
}

/// A span being written; fields may come in any order.
pub struct SpanWriter<'a>(Fields<'a>);

impl SpanWriter<'_> {
    pub fn ids(&mut self, trace_id: &[u8; 16], span_id: &[u8; 8], parent: Option<&[u8; 8]>) {
        self.0.bytes(SPAN_TRACE_ID, trace_id);
        self.0.bytes(SPAN_SPAN_ID, span_id);
        if let Some(parent) = parent {
            self.0.bytes(SPAN_PARENT_SPAN_ID, parent);
        }
    }

    pub fn name(&mut self, name: &str) {
        self.0.bytes(SPAN_NAME, name.as_bytes());
    }

    /// The `SpanKind` number (`SpanKind::Client as i32`).
    pub fn kind(&mut self, kind: i32) {
        self.0.varint(SPAN_KIND, kind as u64);
    }

    pub fn times(&mut self, start_unix_nanos: u64, end_unix_nanos: u64) {
        self.0.fixed64(SPAN_START_TIME, start_unix_nanos);
        self.0.fixed64(SPAN_END_TIME, end_unix_nanos);
    }

    pub fn link(&mut self, trace_id: &[u8; 16], span_id: &[u8; 8]) {
        self.0.message(SPAN_LINKS, |link| {
            link.bytes(LINK_TRACE_ID, trace_id);
            link.bytes(LINK_SPAN_ID, span_id);
        });
    }

    pub fn attributes(&mut self) -> Attributes<'_> {
        Attributes {
            fields: Fields(&mut *self.0.0),
            tag: SPAN_ATTRIBUTES,
        }
    }
}

/// One outbox entry being written: the span count (u32, big-endian), then the encoded
/// `ExportTraceServiceRequest` (see [`crate::export`]).
pub struct RequestWriter {
    entry: Vec<u8>,
    spans: u32,
}

impl Default for RequestWriter {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl RequestWriter {
    /// A request expected to take about `bytes` (it grows past them if need be).
    pub fn with_capacity(bytes: usize) -> Self {
        let mut entry = Vec::with_capacity(COUNT_BYTES + bytes);
        entry.resize(COUNT_BYTES, 0);
        Self { entry, spans: 0 }
    }

    /// Encoded size of the request so far.
    pub fn request_len(&self) -> usize {
        self.entry.len() - COUNT_BYTES
    }

    pub fn is_empty(&self) -> bool {
        self.spans == 0
    }

    /// Appends a `ResourceSpans` of one span: the resource named `service_name`, the scope, and
    /// the span `span` writes.
    pub fn resource_span(
        &mut self,
        service_name: impl std::fmt::Display,
        scope: (&str, &str),
        span: impl FnOnce(&mut SpanWriter),
    ) {
        let mut request = Fields(&mut self.entry);
        // A span takes 128 bytes to 16 KiB, and so do the messages around it: two bytes of
        // length each (see `Fields::message_sized`).
        request.message_sized(REQUEST_RESOURCE_SPANS, 2, |resource_spans| {
            resource_spans.message(RESOURCE_SPANS_RESOURCE, |resource| {
                Attributes {
                    fields: Fields(&mut *resource.0),
                    tag: RESOURCE_ATTRIBUTES,
                }
                .display("service.name", service_name);
            });
            resource_spans.message_sized(RESOURCE_SPANS_SCOPE_SPANS, 2, |scope_spans| {
                scope_spans.message(SCOPE_SPANS_SCOPE, |s| {
                    s.bytes(SCOPE_NAME, scope.0.as_bytes());
                    s.bytes(SCOPE_VERSION, scope.1.as_bytes());
                });
                scope_spans.message_sized(SCOPE_SPANS_SPANS, 2, |s| {
                    span(&mut SpanWriter(Fields(&mut *s.0)))
                });
            });
        });
        self.spans += 1;
    }

    /// Everything written since the request was `request_len` bytes long moves to a new request
    /// (`spans` of them), which is returned; this one keeps what came before.
    /// `capacity` as in [`RequestWriter::with_capacity`].
    pub fn split_off(&mut self, request_len: usize, spans: u32, capacity: usize) -> RequestWriter {
        let tail = self.entry.split_off(COUNT_BYTES + request_len);
        self.spans -= spans;
        let mut next = RequestWriter::with_capacity(capacity.max(tail.len()));
        next.entry.extend_from_slice(&tail);
        next.spans = spans;
        next
    }

    /// The outbox entry.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry[..COUNT_BYTES].copy_from_slice(&self.spans.to_be_bytes());
        self.entry
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{AnyValue, ArrayValue, KeyValue, any_value::Value},
        trace::v1::span::SpanKind,
    };
    use prost::Message;

    use super::*;

    fn decode(entry: &[u8]) -> (u32, ExportTraceServiceRequest) {
        let count = u32::from_be_bytes(entry[..4].try_into().unwrap());
        (
            count,
            ExportTraceServiceRequest::decode(&entry[4..]).unwrap(),
        )
    }

    fn value(v: Value) -> Option<AnyValue> {
        Some(AnyValue { value: Some(v) })
    }

    #[test]
    fn a_request_decodes_to_what_was_written() {
        let mut request = RequestWriter::default();
        // Long enough that the span's and the request's lengths need two and three bytes.
        let long = "x".repeat(20_000);
        request.resource_span("10.0.0.2:443", ("mermin", "0.1.0"), |span| {
            span.ids(&[1; 16], &[2; 8], Some(&[3; 8]));
            span.name("flow_ipv4_tcp");
            span.kind(SpanKind::Client as i32);
            span.times(1_700_000_000_123_456_789, u64::MAX);
            span.link(&[4; 16], &[5; 8]);
            let mut attributes = span.attributes();
            attributes.string("network.protocol", "TCP");
            attributes.dotted_string(&["source", "label", "app"], &long);
            attributes.int("flow.bytes.sent", i64::MAX);
            attributes.int("negative", -1);
            attributes.display("source.address", std::net::Ipv4Addr::new(10, 0, 0, 1));
            attributes.joined_strings("flow.tcp.flags", "", [["SYN"], ["ACK"]]);
            attributes.joined_strings("empty", "", Vec::<[&str; 1]>::new());
            attributes.joined_string("point", "/", &["node-a", "eth0", "ingress"]);
            attributes.joined_strings("points", "/", [["a", "", "c"], ["d", "e", "f"]]);
        });
        let (count, decoded) = decode(&request.finish());
        assert_eq!(count, 1);
        let resource_spans = &decoded.resource_spans[0];
        assert_eq!(
            resource_spans.resource.as_ref().unwrap().attributes,
            [KeyValue {
                key: "service.name".into(),
                value: value(Value::StringValue("10.0.0.2:443".into())),
                ..KeyValue::default()
            }]
        );
        let scope = &resource_spans.scope_spans[0];
        let s = scope.scope.as_ref().unwrap();
        assert_eq!((s.name.as_str(), s.version.as_str()), ("mermin", "0.1.0"));
        let span = &scope.spans[0];
        assert_eq!(span.trace_id, [1; 16]);
        assert_eq!(span.span_id, [2; 8]);
        assert_eq!(span.parent_span_id, [3; 8]);
        assert_eq!(span.name, "flow_ipv4_tcp");
        assert_eq!(span.kind, SpanKind::Client as i32);
        assert_eq!(span.start_time_unix_nano, 1_700_000_000_123_456_789);
        assert_eq!(span.end_time_unix_nano, u64::MAX);
        assert_eq!(span.links[0].trace_id, [4; 16]);
        assert_eq!(span.links[0].span_id, [5; 8]);
        let attributes: Vec<(&str, &Value)> = span
            .attributes
            .iter()
            .map(|kv| {
                let v = kv.value.as_ref().unwrap().value.as_ref().unwrap();
                (kv.key.as_str(), v)
            })
            .collect();
        let strings = |values: &[&str]| {
            Value::ArrayValue(ArrayValue {
                values: values
                    .iter()
                    .map(|v| AnyValue {
                        value: Some(Value::StringValue(v.to_string())),
                    })
                    .collect(),
            })
        };
        assert_eq!(
            attributes,
            [
                ("network.protocol", &Value::StringValue("TCP".into())),
                ("source.label.app", &Value::StringValue(long.clone())),
                ("flow.bytes.sent", &Value::IntValue(i64::MAX)),
                ("negative", &Value::IntValue(-1)),
                ("source.address", &Value::StringValue("10.0.0.1".into())),
                ("flow.tcp.flags", &strings(&["SYN", "ACK"])),
                ("empty", &strings(&[])),
                ("point", &Value::StringValue("node-a/eth0/ingress".into())),
                ("points", &strings(&["a//c", "d/e/f"])),
            ]
        );
    }

    #[test]
    fn a_split_request_keeps_each_span_once() {
        let mut request = RequestWriter::default();
        let span = |name: &'static str| {
            move |s: &mut SpanWriter| {
                s.ids(&[1; 16], &[2; 8], None);
                s.name(name);
            }
        };
        request.resource_span("a", ("mermin", "0"), span("one"));
        let mark = request.request_len();
        request.resource_span("b", ("mermin", "0"), span("two"));
        request.resource_span("c", ("mermin", "0"), span("three"));
        let next = request.split_off(mark, 2, 0);
        let names = |entry: Vec<u8>| {
            let (count, decoded) = decode(&entry);
            let names: Vec<String> = decoded
                .resource_spans
                .iter()
                .map(|r| r.scope_spans[0].spans[0].name.clone())
                .collect();
            (count, names)
        };
        assert_eq!(names(request.finish()), (1, vec!["one".to_string()]));
        assert_eq!(
            names(next.finish()),
            (2, vec!["two".to_string(), "three".to_string()])
        );
    }

    /// An entry of `spans` spans named `name` (one resource each).
    fn entry(name: &str, spans: u32) -> Vec<u8> {
        let mut request = RequestWriter::default();
        for _ in 0..spans {
            request.resource_span("s", ("mermin", "0.1.0"), |span| span.name(name));
        }
        request.finish()
    }

    #[test]
    fn joined_entries_are_one_request_with_every_span_in_order_within_the_limits() {
        let entries = [
            entry("a", 900),
            entry("b", 900),
            entry("c", 300),
            entry("d", 1),
        ];
        let joined = join_entries(
            &entries.iter().map(Vec::as_slice).collect::<Vec<_>>(),
            &mut Vec::new(),
        );
        let names: Vec<(u32, Vec<(String, usize)>)> = joined
            .iter()
            .map(|e| {
                let (count, request) = decode(e);
                let mut runs: Vec<(String, usize)> = Vec::new();
                for resource in &request.resource_spans {
                    let name = &resource.scope_spans[0].spans[0].name;
                    match runs.last_mut() {
                        Some((last, n)) if last == name => *n += 1,
                        _ => runs.push((name.clone(), 1)),
                    }
                }
                (count, runs)
            })
            .collect();
        let run = |name: &str, n| (name.to_owned(), n);
        assert_eq!(
            names,
            [
                (1_800, vec![run("a", 900), run("b", 900)]),
                (301, vec![run("c", 300), run("d", 1)]),
            ],
            "2,000 spans at most, in order"
        );
        // The byte limit: two entries of 1.5 MB stay two; a short one stays alone.
        let big = |byte: u8| {
            let mut e = 1u32.to_be_bytes().to_vec();
            e.resize(COUNT_BYTES + (3 << 19), byte);
            e
        };
        // Spare buffers are emptied and used; what they held is gone.
        let mut spare = vec![vec![7; 10], Vec::with_capacity(1 << 20)];
        let joined = join_entries(
            &[&big(1)[..], &big(2)[..], &[9, 9][..], &entry("e", 1)[..]],
            &mut spare,
        );
        assert!(spare.is_empty(), "both spare buffers taken");
        let shape: Vec<(usize, u8)> = joined.iter().map(|e| (e.len(), e[e.len() - 1])).collect();
        assert_eq!(
            shape[..3],
            [
                (COUNT_BYTES + (3 << 19), 1),
                (COUNT_BYTES + (3 << 19), 2),
                (2, 9)
            ]
        );
        assert_eq!(joined.len(), 4, "nothing joins an entry without a count");
    }
}
