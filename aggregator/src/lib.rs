//! Mermin's aggregator (being built; see the aggregator issue).
//!
//! It owns: the agent stream endpoint (hello, sequenced batches, durable acks), the flow table
//! sharded by [`connection_key::ConnectionKey`], stitching of the up-to-four observations of one
//! connection into one bidirectional flow with client and server right, Kubernetes metadata for
//! both ends, and export of one span per flow interval over OTLP. Its input is
//! `mermin_protocol::flow::v1::FlowRecord`, exactly as node agents emit it.
//!
//! Built so far: `ingest` (the agent stream endpoint: validation, durable append, acks) over
//! `store` (sled log of batches); and, as pure logic, `observation` (record validation) →
//! `connection_key` (canonical key, Community ID v1) → `stitch` (one flow per connection) →
//! `span` (OTLP spans with deterministic ids). Still to come: the flow-table actors that stitch
//! on time, the durable export queue and OTLP exporter, configuration, the binary.

pub mod config;
pub mod connection_key;
pub mod export;
pub mod flow_table;
pub mod ingest;
pub mod metadata;
pub mod metrics;
pub mod observation;
pub mod pipeline;
pub mod span;
pub mod stitch;
pub mod store;
