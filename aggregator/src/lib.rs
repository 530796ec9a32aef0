//! Mermin's aggregator.
//!
//! It owns: the agent stream endpoint (hello, sequenced batches, durable acks), the flow table
//! sharded by [`connection_key::ConnectionKey`], stitching of the up-to-four observations of one
//! connection into one bidirectional flow with client and server right, Kubernetes metadata for
//! both ends, and export of one span per flow interval over OTLP. Its input is
//! `mermin_protocol::flow::v1::FlowRecord`, exactly as node agents emit it.
//!
//! Data flows through one module per stage: `ingest` (agent sessions: validation, durable append
//! to `store`, acks) → `shard` (the flow table split by connection key: `observation` →
//! `connection_key` → `flow_table` → `stitch` → `span`, checkpointed through `checkpoints`) → `export` (the outbox to
//! OTLP). Beside them, `admin` serves the admin API (status, agents, queues, and `observe`, the
//! feed of emitted flows). `actors` runs the actix actors, `pipeline` wires and recovers them, `replication` replicates
//! the store across replicas with Raft and `cluster` runs the pipeline on the replica that leads it, `settings` is the one
//! settings model (flags, HCL keys via `config` and `hcl`, defaults in `defaults`), `metrics`
//! declares every metric.

pub mod actors;
pub mod admin;
pub mod checkpoints;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connection_key;
pub mod defaults;
pub mod export;
pub mod flow_table;
pub mod hcl;
pub mod ingest;
pub mod metadata;
pub mod metrics;
pub mod observation;
pub mod observe;
pub mod otlp_wire;
pub mod pipeline;
pub mod placement;
pub mod replication;
pub mod settings;
pub mod shard;
pub mod span;
pub mod stitch;
pub mod store;
#[cfg(test)]
mod test_records;
pub mod tls;
