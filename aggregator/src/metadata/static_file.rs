//! The static metadata file: metadata for addresses and CIDRs without Kubernetes (the demo, tests,
//! bare hosts, or things outside the cluster), in HCL, parsed like the configuration file (the
//! one-line form of blocks is accepted) and loaded into the index as a [`PrefixTable`]:
//!
//! ```hcl
//! endpoint "10.0.1.2" { pod = "nginx-7d9f" namespace = "frontend" node = "node-a" workload_kind = "Deployment" workload = "nginx" service = "nginx" labels = { app = "nginx" } }
//! endpoint "10.0.2.0/24" { node = "node-b" }
//! ```
//!
//! Each `endpoint` block is labelled with an IP address or a CIDR (host bits zero) and may set
//! `pod`, `namespace`, `node`, `workload_kind`, `workload`, `service`, `container` (strings) and
//! `labels` (an object of strings, emitted as written: the file is its own allow-list). Every
//! key is known; anything else, a bad address or CIDR, or an address given twice is an error
//! naming the file and line. Entries have no time bounds; the longest prefix holding an address
//! wins, and the index consults them only for addresses Kubernetes does not explain.

use std::{net::IpAddr, path::Path, sync::Arc};

use hcl_edit::{
    Span,
    expr::{Expression, ObjectKey},
    structure::{BlockLabel, Structure},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

use super::index::{EndpointMetadata, Label};
use crate::hcl::{ConfigError, parse_lenient, read, string};

const ENDPOINT_KEYS: &str =
    "pod, namespace, node, workload_kind, workload, service, container, labels";

/// Metadata by address prefix, looked up longest prefix first (a prefix trie per family).
#[derive(Default)]
pub struct PrefixTable {
    ipv4: PrefixMap<Ipv4Net, StaticEntry>,
    ipv6: PrefixMap<Ipv6Net, StaticEntry>,
}

impl std::fmt::Debug for PrefixTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixTable")
            .field("ipv4", &self.ipv4.len())
            .field("ipv6", &self.ipv6.len())
            .finish()
    }
}

/// What one `endpoint` block says.
#[derive(Debug, Default)]
struct StaticEntry {
    pod_name: Option<Box<str>>,
    namespace: Option<Box<str>>,
    node_name: Option<Box<str>>,
    workload_kind: Option<Box<str>>,
    workload_name: Option<Box<str>>,
    service_name: Option<Box<str>>,
    container_name: Option<Box<str>>,
    labels: Vec<Label>,
}

impl StaticEntry {
    fn metadata(&self) -> EndpointMetadata<'_> {
        EndpointMetadata {
            pod_name: self.pod_name.as_deref(),
            // The file does not say; a pod named there is taken to have its own interface.
            host_network: false,
            namespace: self.namespace.as_deref(),
            node_name: self.node_name.as_deref(),
            workload_kind: self.workload_kind.as_deref(),
            workload_name: self.workload_name.as_deref(),
            service_name: self.service_name.as_deref(),
            container_name: self.container_name.as_deref(),
            labels: &self.labels,
            namespace_labels: &[],
        }
    }
}

impl PrefixTable {
    pub fn longest_match(&self, address: IpAddr) -> Option<EndpointMetadata<'_>> {
        let entry = match address {
            IpAddr::V4(a) => self.ipv4.get_lpm(&Ipv4Net::from(a)).map(|(_, e)| e),
            IpAddr::V6(a) => self.ipv6.get_lpm(&Ipv6Net::from(a)).map(|(_, e)| e),
        };
        entry.map(StaticEntry::metadata)
    }

    /// Adds an entry; `false` if the prefix already has one.
    fn insert(&mut self, network: IpNet, entry: StaticEntry) -> bool {
        match network {
            IpNet::V4(net) if self.ipv4.get(&net).is_none() => self.ipv4.insert(net, entry),
            IpNet::V6(net) if self.ipv6.get(&net).is_none() => self.ipv6.insert(net, entry),
            _ => return false,
        };
        true
    }
}

/// An address (a full-length prefix) or a CIDR whose host bits are zero.
pub fn network(text: &str) -> Result<IpNet, String> {
    let (address, length) = match text.split_once('/') {
        Some((address, length)) => (address, Some(length)),
        None => (text, None),
    };
    let address: IpAddr = address
        .parse()
        .map_err(|_| "not an IP address or CIDR".to_owned())?;
    let Some(length) = length else {
        return Ok(IpNet::from(address));
    };
    let max = if address.is_ipv4() { 32 } else { 128 };
    let network = length
        .parse::<u8>()
        .ok()
        .and_then(|length| IpNet::new(address, length).ok())
        .ok_or_else(|| format!("prefix length must be 0 to {max}"))?;
    if network.trunc() != network {
        return Err(format!(
            "host bits are set (the network is {})",
            network.trunc()
        ));
    }
    Ok(network)
}

pub fn load(path: &Path) -> Result<PrefixTable, ConfigError> {
    parse(&path.display().to_string(), &read(path)?)
}

pub fn parse(file: &str, text: &str) -> Result<PrefixTable, ConfigError> {
    let parsed = parse_lenient(file, text)?;
    let at = |offset: usize, message: String| parsed.error(file, offset, message);
    let mut table = PrefixTable::default();
    for structure in parsed.body.iter() {
        let offset = structure.span().map_or(0, |s| s.start);
        let block = match structure {
            Structure::Block(block) if block.ident.as_str() == "endpoint" => block,
            _ => {
                return Err(at(
                    offset,
                    "only `endpoint \"<address or CIDR>\" { ... }` blocks belong here".into(),
                ));
            }
        };
        let label = match block.labels.as_slice() {
            [BlockLabel::String(label)] => label.value().as_str(),
            _ => {
                return Err(at(
                    offset,
                    "endpoint needs one label: an address or CIDR in quotes".into(),
                ));
            }
        };
        let network =
            network(label).map_err(|why| at(offset, format!("endpoint \"{label}\": {why}")))?;
        let mut entry = StaticEntry::default();
        for item in block.body.iter() {
            let offset = item.span().map_or(offset, |s| s.start);
            let Structure::Attribute(attribute) = item else {
                return Err(at(
                    offset,
                    format!("endpoint \"{label}\" holds only keys ({ENDPOINT_KEYS})"),
                ));
            };
            let key = attribute.key.as_str();
            if key == "labels" {
                entry.labels = labels(&attribute.value)
                    .map_err(|why| at(offset, format!("endpoint \"{label}\": labels {why}")))?;
                continue;
            }
            let field = match key {
                "pod" => &mut entry.pod_name,
                "namespace" => &mut entry.namespace,
                "node" => &mut entry.node_name,
                "workload_kind" => &mut entry.workload_kind,
                "workload" => &mut entry.workload_name,
                "service" => &mut entry.service_name,
                "container" => &mut entry.container_name,
                other => {
                    return Err(at(
                        offset,
                        format!(
                            "unknown key `{other}` in endpoint \"{label}\" (known: {ENDPOINT_KEYS})"
                        ),
                    ));
                }
            };
            let value = string(&attribute.value).ok_or_else(|| {
                at(
                    offset,
                    format!("endpoint \"{label}\": {key} must be a string"),
                )
            })?;
            *field = Some(value.into());
        }
        if !table.insert(network, entry) {
            return Err(at(offset, format!("endpoint \"{label}\" is given twice")));
        }
    }
    Ok(table)
}

/// `{ key = "value" ... }`, sorted by key.
fn labels(value: &Expression) -> Result<Vec<Label>, String> {
    let Expression::Object(object) = value else {
        return Err("must be an object: { key = \"value\" }".into());
    };
    let mut labels = Vec::with_capacity(object.len());
    for (key, value) in object.iter() {
        let key = match key {
            ObjectKey::Ident(ident) => ident.as_str(),
            ObjectKey::Expression(expr) => string(expr).ok_or("keys must be names or strings")?,
        };
        let value = string(value.expr()).ok_or_else(|| format!("{key} must be a string"))?;
        labels.push((Arc::from(key), Arc::from(value)));
    }
    labels.sort();
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(table: &'a PrefixTable, address: &str) -> Option<EndpointMetadata<'a>> {
        table.longest_match(address.parse().unwrap())
    }

    #[test]
    fn the_one_line_form_and_every_key() {
        let table = parse(
            "metadata.hcl",
            concat!(
                r#"endpoint "10.0.1.2" { pod = "nginx-7d9f" namespace = "frontend" node = "node-a" workload_kind = "Deployment" workload = "nginx" service = "nginx" container = "web" labels = { app = "nginx" "app.kubernetes.io/part-of" = "shop" } }"#,
                "\n",
                r#"endpoint "10.0.2.0/24" { node = "node-b" }"#,
                "\n",
            ),
        )
        .unwrap();
        let nginx = lookup(&table, "10.0.1.2").unwrap();
        assert_eq!(nginx.pod_name, Some("nginx-7d9f"));
        assert_eq!(nginx.namespace, Some("frontend"));
        assert_eq!(nginx.node_name, Some("node-a"));
        assert_eq!(nginx.workload_kind, Some("Deployment"));
        assert_eq!(nginx.workload_name, Some("nginx"));
        assert_eq!(nginx.service_name, Some("nginx"));
        assert_eq!(nginx.container_name, Some("web"));
        assert_eq!(
            nginx
                .labels
                .iter()
                .map(|(k, v)| (&**k, &**v))
                .collect::<Vec<_>>(),
            [("app", "nginx"), ("app.kubernetes.io/part-of", "shop")]
        );
        let node_b = lookup(&table, "10.0.2.77").unwrap();
        assert_eq!(
            node_b,
            EndpointMetadata {
                node_name: Some("node-b"),
                ..EndpointMetadata::default()
            }
        );
        assert_eq!(lookup(&table, "10.0.3.1"), None);
    }

    #[test]
    fn the_longest_prefix_wins() {
        let table = parse(
            "m.hcl",
            "endpoint \"10.0.0.0/8\" {\n  node = \"wide\"\n}\nendpoint \"10.1.0.0/16\" {\n  node = \"narrow\"\n}\nendpoint \"10.1.2.3\" {\n  node = \"exact\"\n}\nendpoint \"fd00::/64\" {\n  node = \"v6\"\n}\nendpoint \"0.0.0.0/0\" {\n  node = \"anywhere\"\n}\n",
        )
        .unwrap();
        let node = |address| lookup(&table, address).unwrap().node_name.unwrap();
        assert_eq!(node("10.1.2.3"), "exact");
        assert_eq!(node("10.1.2.4"), "narrow");
        assert_eq!(node("10.2.0.1"), "wide");
        assert_eq!(node("192.168.1.1"), "anywhere");
        assert_eq!(node("fd00::1"), "v6");
        assert_eq!(lookup(&table, "fd01::1"), None);
    }

    fn error(text: &str) -> String {
        parse("metadata.hcl", text).unwrap_err().to_string()
    }

    #[test]
    fn mistakes_point_at_file_and_line() {
        assert_eq!(
            error("endpoint \"10.0.1.2\" {\n  pod = \"a\"\n  deployment = \"b\"\n}\n"),
            "metadata.hcl:3: unknown key `deployment` in endpoint \"10.0.1.2\" (known: pod, namespace, node, workload_kind, workload, service, container, labels)"
        );
        assert_eq!(
            error(concat!(
                "endpoint \"10.0.0.1\" { pod = \"a\" namespace = \"b\" labels = { x = \"y\" } }\n",
                "endpoint \"10.0.0.2\" { pod = \"b\" colour = \"red\" }\n",
            )),
            "metadata.hcl:2: unknown key `colour` in endpoint \"10.0.0.2\" (known: pod, namespace, node, workload_kind, workload, service, container, labels)"
        );
        assert_eq!(
            error(
                "endpoint \"10.0.1.2\" { pod = \"a\" }\n\nendpoint \"10.0.2.0/33\" { node = \"b\" }\n"
            ),
            "metadata.hcl:3: endpoint \"10.0.2.0/33\": prefix length must be 0 to 32"
        );
        assert_eq!(
            error("endpoint \"10.0.2.1/24\" { node = \"b\" }\n"),
            "metadata.hcl:1: endpoint \"10.0.2.1/24\": host bits are set (the network is 10.0.2.0/24)"
        );
        assert_eq!(
            error("\nendpoint \"node-a\" { node = \"b\" }\n"),
            "metadata.hcl:2: endpoint \"node-a\": not an IP address or CIDR"
        );
        assert_eq!(
            error(
                "endpoint \"10.0.0.1\" { node = \"a\" }\nendpoint \"10.0.0.1/32\" { node = \"b\" }\n"
            ),
            "metadata.hcl:2: endpoint \"10.0.0.1/32\" is given twice"
        );
        assert_eq!(
            error("endpoint \"10.0.0.1\" {\n  labels = { app = 1 }\n}\n"),
            "metadata.hcl:2: endpoint \"10.0.0.1\": labels app must be a string"
        );
        assert_eq!(
            error("pod = \"a\"\n"),
            "metadata.hcl:1: only `endpoint \"<address or CIDR>\" { ... }` blocks belong here"
        );
    }
}
