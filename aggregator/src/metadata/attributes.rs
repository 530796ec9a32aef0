//! Span attribute names for one side's metadata, in two schemes: the seed's (the default, the
//! names its TraceQL examples query) and Mermin 0.3's OpenTelemetry-style `k8s.*` names, for
//! users who already query those. Only known values become attributes, all strings.
//!
//! | field | [`AttributeNaming::Seed`] | [`AttributeNaming::Mermin`] |
//! |---|---|---|
//! | pod | `<side>.pod.name` | `<side>.k8s.pod.name` |
//! | namespace | `<side>.namespace` | `<side>.k8s.namespace.name` |
//! | node | `<side>.node.name` | `<side>.k8s.node.name` |
//! | workload | `<side>.workload.kind`, `<side>.workload.name` | `<side>.k8s.<kind>.name` (`deployment`, `statefulset`, `daemonset`, `replicaset`, `job`, `cronjob`, or the kind in lower case) |
//! | service | `<side>.service.name` | `<side>.k8s.service.name` |
//! | container | `<side>.container.name` | `<side>.k8s.container.name` |
//! | pod label | `<side>.label.<key>` | `<side>.k8s.pod.label.<key>` |
//! | namespace label | `<side>.namespace.label.<key>` | `<side>.k8s.namespace.label.<key>` |
//!
//! `<side>` is `source` (the client) or `destination` (the server).

use std::borrow::Cow;

use super::index::EndpointMetadata;
use crate::otlp_wire::StringAttributes;

/// Which attribute names metadata gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttributeNaming {
    #[default]
    Seed,
    Mermin,
}

impl AttributeNaming {
    /// The name used in configuration: `seed` or `mermin`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "seed" => Some(Self::Seed),
            "mermin" => Some(Self::Mermin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Seed => "seed",
            Self::Mermin => "mermin",
        }
    }
}

impl std::fmt::Display for AttributeNaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AttributeNaming {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::from_name(name).ok_or_else(|| format!("{name:?}: expected seed or mermin"))
    }
}

/// Which end of the flow the attributes describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowSide {
    /// The client: `source.*`.
    Source,
    /// The server: `destination.*`.
    Destination,
}

impl FlowSide {
    fn prefix(self) -> &'static str {
        match self {
            FlowSide::Source => "source",
            FlowSide::Destination => "destination",
        }
    }
}

/// Appends the attributes of `metadata` for `side` to `attributes`, named by `naming`.
pub fn append_metadata_attributes(
    naming: AttributeNaming,
    side: FlowSide,
    metadata: &EndpointMetadata,
    attributes: &mut impl StringAttributes,
) {
    let prefix = side.prefix();
    // The key is `<side>.` and `name_parts` joined by dots.
    let mut push = |name_parts: &[&str], value: &str| {
        let mut key = [prefix; 4];
        key[1..=name_parts.len()].copy_from_slice(name_parts);
        attributes.dotted_string(&key[..=name_parts.len()], value);
    };
    let (pod, namespace, node, service, container, pod_label, namespace_label) = match naming {
        AttributeNaming::Seed => (
            "pod.name",
            "namespace",
            "node.name",
            "service.name",
            "container.name",
            "label",
            "namespace.label",
        ),
        AttributeNaming::Mermin => (
            "k8s.pod.name",
            "k8s.namespace.name",
            "k8s.node.name",
            "k8s.service.name",
            "k8s.container.name",
            "k8s.pod.label",
            "k8s.namespace.label",
        ),
    };
    for (name, value) in [
        (pod, &metadata.pod_name),
        (namespace, &metadata.namespace),
        (node, &metadata.node_name),
    ] {
        if let Some(value) = value {
            push(&[name], value);
        }
    }
    if let Some(workload) = &metadata.workload_name {
        match naming {
            AttributeNaming::Seed => {
                if let Some(kind) = &metadata.workload_kind {
                    push(&["workload.kind"], kind);
                }
                push(&["workload.name"], workload);
            }
            AttributeNaming::Mermin => {
                let kind = match metadata.workload_kind {
                    Some("Deployment") => Cow::Borrowed("deployment"),
                    Some("StatefulSet") => Cow::Borrowed("statefulset"),
                    Some("DaemonSet") => Cow::Borrowed("daemonset"),
                    Some("ReplicaSet") => Cow::Borrowed("replicaset"),
                    Some("Job") => Cow::Borrowed("job"),
                    Some("CronJob") => Cow::Borrowed("cronjob"),
                    Some(other) => Cow::Owned(other.to_lowercase()),
                    None => Cow::Borrowed("workload"),
                };
                push(&["k8s", &kind, "name"], workload);
            }
        }
    }
    for (name, value) in [
        (service, &metadata.service_name),
        (container, &metadata.container_name),
    ] {
        if let Some(value) = value {
            push(&[name], value);
        }
    }
    for (group, labels) in [
        (pod_label, &metadata.labels),
        (namespace_label, &metadata.namespace_labels),
    ] {
        for (key, value) in labels.iter() {
            push(&[group, key], value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metadata::index::Label;

    fn label(key: &str, value: &str) -> Label {
        (Arc::from(key), Arc::from(value))
    }

    fn everything<'a>(labels: &'a [Label], namespace_labels: &'a [Label]) -> EndpointMetadata<'a> {
        EndpointMetadata {
            pod_name: Some("web-7d9f-abcde"),
            host_network: false,
            namespace: Some("frontend"),
            node_name: Some("node-a"),
            workload_kind: Some("Deployment"),
            workload_name: Some("web"),
            service_name: Some("web"),
            container_name: Some("nginx"),
            labels,
            namespace_labels,
        }
    }

    /// The attributes in order, as written.
    #[derive(Default)]
    struct Pairs(Vec<(String, String)>);

    impl StringAttributes for Pairs {
        fn dotted_string(&mut self, key: &[&str], value: &str) {
            self.0.push((key.join("."), value.to_owned()));
        }
    }

    fn attributes(
        naming: AttributeNaming,
        side: FlowSide,
        metadata: &EndpointMetadata,
    ) -> Vec<(String, String)> {
        let mut attributes = Pairs::default();
        append_metadata_attributes(naming, side, metadata, &mut attributes);
        attributes.0
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn seed_names() {
        assert_eq!(
            attributes(
                AttributeNaming::Seed,
                FlowSide::Source,
                &everything(&[label("app", "web")], &[label("team", "shop")])
            ),
            pairs(&[
                ("source.pod.name", "web-7d9f-abcde"),
                ("source.namespace", "frontend"),
                ("source.node.name", "node-a"),
                ("source.workload.kind", "Deployment"),
                ("source.workload.name", "web"),
                ("source.service.name", "web"),
                ("source.container.name", "nginx"),
                ("source.label.app", "web"),
                ("source.namespace.label.team", "shop"),
            ])
        );
    }

    #[test]
    fn mermin_names() {
        assert_eq!(
            attributes(
                AttributeNaming::Mermin,
                FlowSide::Destination,
                &everything(&[label("app", "web")], &[label("team", "shop")])
            ),
            pairs(&[
                ("destination.k8s.pod.name", "web-7d9f-abcde"),
                ("destination.k8s.namespace.name", "frontend"),
                ("destination.k8s.node.name", "node-a"),
                ("destination.k8s.deployment.name", "web"),
                ("destination.k8s.service.name", "web"),
                ("destination.k8s.container.name", "nginx"),
                ("destination.k8s.pod.label.app", "web"),
                ("destination.k8s.namespace.label.team", "shop"),
            ])
        );
    }

    #[test]
    fn mermin_workload_names_follow_the_kind() {
        let names: Vec<String> = [
            "StatefulSet",
            "DaemonSet",
            "ReplicaSet",
            "Job",
            "CronJob",
            "Rollout",
        ]
        .into_iter()
        .map(|kind| {
            let metadata = EndpointMetadata {
                workload_kind: Some(kind),
                workload_name: Some("w"),
                ..EndpointMetadata::default()
            };
            let attributes = attributes(AttributeNaming::Mermin, FlowSide::Source, &metadata);
            attributes[0].0.clone()
        })
        .collect();
        assert_eq!(
            names,
            [
                "source.k8s.statefulset.name",
                "source.k8s.daemonset.name",
                "source.k8s.replicaset.name",
                "source.k8s.job.name",
                "source.k8s.cronjob.name",
                "source.k8s.rollout.name",
            ]
        );
    }

    #[test]
    fn unknown_fields_make_no_attributes() {
        let node_only = EndpointMetadata {
            node_name: Some("node-b"),
            ..EndpointMetadata::default()
        };
        assert_eq!(
            attributes(AttributeNaming::Seed, FlowSide::Destination, &node_only),
            pairs(&[("destination.node.name", "node-b")])
        );
        assert_eq!(
            attributes(
                AttributeNaming::Seed,
                FlowSide::Source,
                &EndpointMetadata::default()
            ),
            []
        );
        assert_eq!(
            AttributeNaming::from_name("mermin"),
            Some(AttributeNaming::Mermin)
        );
        assert_eq!(
            AttributeNaming::from_name("seed"),
            Some(AttributeNaming::Seed)
        );
        assert_eq!(AttributeNaming::from_name("otel"), None);
    }
}
