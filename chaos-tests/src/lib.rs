//! Chaos tests of a running Mermin system (not built yet; they need the aggregator).
//!
//! They will own: killing agents and aggregator replicas mid-stream, partitioning replicas, and
//! overloading ingest, each asserting that no acknowledged flow is lost or exported twice.
