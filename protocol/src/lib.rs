//! Mermin's wire contracts, generated from `proto/` by prost (compiled with protox, no protoc).
//!
//! - [`flow::v1`]: raw flow records, the shape the node agent emits and the aggregator ingests.
//! - [`agent::v1`]: the agent → aggregator stream (hello, sequenced batches, durable acks).
//! - [`admin::v1`]: the aggregator's admin API (status, agents, queues, the observe stream).
//! - [`replica::v1`]: replica to replica, the Raft transport of the aggregator cluster.
//! - [`display`]: the one-line human form of an observed flow (the CLI and `--print-flows`).
//! - [`wire`]: protobuf written by hand on the hot paths (flow records, OTLP spans).
//!
//! Protobuf hygiene: every enum starts with `*_UNSPECIFIED = 0`; fields are never renumbered
//! (removed ones become `reserved`); units are in field names.

pub mod flow {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/mermin.flow.v1.rs"));
    }
}

pub mod agent {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/mermin.agent.v1.rs"));
    }
}

pub mod admin {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/mermin.admin.v1.rs"));
    }
}

pub mod replica {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/mermin.replica.v1.rs"));
    }
}

/// Every file descriptor of the protocol, encoded: what gRPC reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

pub mod display;
pub mod json;
pub mod wire;
