//! Mermin's aggregator (not built yet; see the aggregator issue).
//!
//! It will own: the agent stream endpoint (hello, sequenced batches, durable acks), the flow
//! table sharded by canonical connection key (Community ID ordering), stitching of the up-to-four
//! observations of one connection into one bidirectional flow with client and server right,
//! Kubernetes metadata for both ends, and export of one span per flow interval over OTLP.
//! Its input is `mermin_protocol::flow::v1::FlowRecord`, exactly as node agents emit it.
