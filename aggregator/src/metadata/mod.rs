//! Kubernetes metadata for both ends of every flow: which pod, namespace, node, workload,
//! Service and container an address (and port) stood for at the time of the flow.
//!
//! - [`index`] — the time-valid index from address to objects, and what a lookup returns
//!   ([`EndpointMetadata`]); updated through source-independent [`MetadataEvent`]s.
//! - [`attributes`] — the span attribute names (seed's or Mermin's) for one side.
//! - [`static_file`] — metadata for addresses and CIDRs from an HCL file, without Kubernetes.
//! - [`kube`] — the watchers that feed the index from the API server, and their metrics.
//!
//! Use: build a [`MetadataIndex`] from [`IndexSettings`], add the static file's entries, wrap it
//! in a [`SharedIndex`], start [`kube::KubeWatchers`] on it; per flow, look up
//! `(address, port, flow start)` of each side under one [`SharedIndex::read`] and append
//! [`attributes::append_metadata_attributes`] for `source` and `destination`.

pub mod attributes;
pub mod index;
pub mod kube;
pub mod static_file;

pub use attributes::{AttributeNaming, FlowSide, append_metadata_attributes};
pub use index::{EndpointMetadata, IndexSettings, MetadataEvent, MetadataIndex, SharedIndex};

#[cfg(test)]
mod tests;
