//! Mermin's node agent: loads the TC programs of `node-ebpf`, keeps them attached to the
//! interfaces that match the configured patterns, and turns the kernel's per-flow counts into raw
//! flow records (`mermin_protocol::flow::v1::FlowRecord`).
//!
//! Pipeline, one module per stage:
//! `config` → `capture` (load, attach, flow-table swap) → `collector` (scan loop) → `flows`
//! (tracking, eviction) → `sink` (JSON lines) or `grpc_sink` (the aggregator stream).
//! `interfaces` follows interfaces as they come and go; `translations` learns the node's
//! address translations from conntrack; `netlink` and `netns` are the sockets and namespaces
//! both use; `clock` converts kernel time; `metrics` serves /metrics, /livez, /readyz; `agent`
//! wires the parts together in start-up and shutdown order.

pub mod agent;
pub mod capture;
pub mod clock;
pub mod collector;
pub mod config;
pub mod flows;
pub mod grpc_sink;
pub mod interfaces;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod sink;
pub mod translations;
