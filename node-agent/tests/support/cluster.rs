//! A two-node cluster of network namespaces, for the tests and benches that need traffic
//! between pods on different nodes.

use super::{LinkOptions, Netns, link, point_to_point};

/// node-a: pod a1 (10.90.1.2), pod a2 (10.90.1.3); node-b: pod b1 (10.90.2.2). The nodes are
/// joined by an "uplink" veth (10.90.0.1 ↔ 10.90.0.2) and route pod subnets across it.
pub struct Cluster {
    pub node_a: Netns,
    pub node_b: Netns,
    pub a1: Netns,
    pub a2: Netns,
    pub b1: Netns,
}

pub fn cluster() -> Cluster {
    let c = Cluster {
        node_a: Netns::new(),
        node_b: Netns::new(),
        a1: Netns::new(),
        a2: Netns::new(),
        b1: Netns::new(),
    };
    for node in [&c.node_a, &c.node_b] {
        node.sysctl("net.ipv4.ip_forward", "1");
    }
    point_to_point(
        (&c.node_a, "eth0", "10.90.0.1/30"),
        (&c.node_b, "eth0", "10.90.0.2/30"),
    );
    let pod = |node: &Netns, host_if: &str, pod_ns: &Netns, pod_ip: &str, gateway: &str| {
        let (h, p) = link(node, host_if, pod_ns, "eth0", LinkOptions::default());
        h.addr(&format!("{gateway}/32"));
        p.addr(&format!("{pod_ip}/32"));
        h.neighbour(pod_ip, &p.mac);
        p.neighbour(gateway, &h.mac);
        h.up();
        p.up();
        node.ip(&["route", "add", pod_ip, "dev", host_if]);
        pod_ns.ip(&["route", "add", gateway, "dev", "eth0"]);
        pod_ns.ip(&["route", "add", "default", "via", gateway]);
    };
    pod(&c.node_a, "vetha1", &c.a1, "10.90.1.2", "10.90.1.1");
    pod(&c.node_a, "vetha2", &c.a2, "10.90.1.3", "10.90.1.1");
    pod(&c.node_b, "vethb1", &c.b1, "10.90.2.2", "10.90.2.1");
    c.node_a
        .ip(&["route", "add", "10.90.2.0/24", "via", "10.90.0.2"]);
    c.node_b
        .ip(&["route", "add", "10.90.1.0/24", "via", "10.90.0.1"]);
    c
}
