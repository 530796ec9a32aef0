//! Metadata benchmark (figures and command in BENCHMARKS.md): an index of 10,000 pods (2,000
//! ReplicaSets of 5 pods under 1,000 Deployments, two containers each), 2,000 Services with one
//! EndpointSlice each, 200 nodes and 50 namespaces, then
//!
//! - heap bytes the index holds (a counting allocator: live bytes after applying every event,
//!   minus before), in steady state and after 1,000 pods were replaced on the same addresses
//!   (their old tenancies kept for the grace period);
//! - ns per flow to look up both sides (a pod client; a pod or a ClusterIP server), under one
//!   read lock, and to look up both sides and write their span attributes (seed names) as the
//!   spans are written.
//!
//! `cargo bench -p mermin-aggregator --bench metadata`

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use mermin_aggregator::metadata::{
    AttributeNaming, FlowSide, IndexSettings, MetadataEvent, MetadataIndex, SharedIndex,
    append_metadata_attributes,
    index::{
        ContainerPorts, EndpointSliceInfo, EndpointTarget, NamespaceInfo, NodeInfo, ObjectKind,
        OwnerInfo, OwnerRef, PodInfo, ServiceInfo,
    },
};
use mermin_aggregator::otlp_wire::{Attributes, RequestWriter, StringAttributes};

/// The span writer's attributes, counted.
struct Count<'a>(Attributes<'a>, usize);

impl StringAttributes for Count<'_> {
    fn dotted_string(&mut self, key: &[&str], value: &str) {
        self.0.dotted_string(key, value);
        self.1 += 1;
    }
}

#[path = "support/counting.rs"]
mod counting;
use counting::{Counting, live_bytes};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PODS: u32 = 10_000;
const PODS_PER_REPLICA_SET: u32 = 5;
const SERVICES: u32 = 2_000;
const NODES: u32 = 200;
const NAMESPACES: u32 = 50;
const SECOND: u64 = 1_000_000_000;

fn pod_address(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn cluster_ip(s: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + s))
}

fn replica_set_uid(r: u32) -> String {
    format!("7f1c0e52-0000-4000-8000-{r:012}")
}

/// Pod `i`, the `generation`th on its address.
fn pod(i: u32, generation: u32) -> PodInfo {
    let replica_set = i / PODS_PER_REPLICA_SET;
    let deployment = replica_set / 2;
    let hash = format!("{:08x}", replica_set.wrapping_mul(2_654_435_761));
    PodInfo {
        uid: format!("0d9b7a3e-{generation:04}-4000-8000-{i:012}"),
        namespace: format!("team-{}", deployment % NAMESPACES),
        name: format!("app-{deployment}-{hash}-{i:05}"),
        node_name: Some(format!("node-{}", i % NODES)),
        addressed_since_unix_nanos: Some(u64::from(generation) * 1_000 * SECOND),
        addresses: vec![pod_address(i)],
        host_network: false,
        controller: Some(OwnerRef {
            kind: "ReplicaSet".into(),
            name: format!("app-{deployment}-{hash}"),
            uid: replica_set_uid(replica_set),
        }),
        labels: vec![
            ("app".into(), format!("app-{deployment}")),
            ("pod-template-hash".into(), hash),
            ("team".into(), format!("team-{}", deployment % NAMESPACES)),
            ("version".into(), "v1.2.3".into()),
        ],
        containers: vec![
            ContainerPorts {
                name: "app".into(),
                ports: vec![8080],
            },
            ContainerPorts {
                name: "envoy".into(),
                ports: vec![15001, 15090],
            },
        ],
    }
}

fn cluster_events() -> impl Iterator<Item = MetadataEvent> {
    let namespaces = (0..NAMESPACES).map(|n| {
        MetadataEvent::Namespace(NamespaceInfo {
            uid: format!("ns-{n}"),
            name: format!("team-{n}"),
            labels: vec![("team".into(), format!("team-{n}"))],
        })
    });
    let nodes = (0..NODES).map(|n| {
        MetadataEvent::Node(NodeInfo {
            uid: format!("node-uid-{n}"),
            name: format!("node-{n}"),
            created_unix_nanos: Some(0),
            addresses: vec![IpAddr::V4(Ipv4Addr::from(0xc0a8_0000 + n))],
        })
    });
    let replica_sets = (0..PODS / PODS_PER_REPLICA_SET).map(|r| {
        MetadataEvent::Owner(OwnerInfo {
            uid: replica_set_uid(r),
            controller: Some(OwnerRef {
                kind: "Deployment".into(),
                name: format!("app-{}", r / 2),
                uid: format!("deployment-{}", r / 2),
            }),
        })
    });
    let pods = (0..PODS).map(|i| MetadataEvent::Pod(pod(i, 1)));
    let services = (0..SERVICES).flat_map(|s| {
        let namespace = format!("team-{}", (s / 2) % NAMESPACES);
        [
            MetadataEvent::Service(ServiceInfo {
                uid: format!("svc-{s}"),
                namespace: namespace.clone(),
                name: format!("svc-{s}"),
                created_unix_nanos: Some(0),
                cluster_ips: vec![cluster_ip(s)],
            }),
            MetadataEvent::EndpointSlice(EndpointSliceInfo {
                uid: format!("slice-{s}"),
                namespace,
                service_name: format!("svc-{s}"),
                ports: vec![8080],
                endpoints: (0..PODS_PER_REPLICA_SET)
                    .map(|k| EndpointTarget::Pod {
                        uid: pod(s * PODS_PER_REPLICA_SET + k, 1).uid,
                    })
                    .collect(),
            }),
        ]
    });
    namespaces
        .chain(nodes)
        .chain(replica_sets)
        .chain(pods)
        .chain(services)
}

fn live() -> isize {
    live_bytes()
}

fn main() {
    const FLOWS: u64 = 1_000_000;
    let before = live();
    let mut index = MetadataIndex::new(&IndexSettings {
        label_keys: vec!["app".into(), "team".into()],
        ..IndexSettings::default()
    });
    for event in cluster_events() {
        index.apply(event, SECOND);
    }
    let steady = live() - before;
    const REPLACED: u32 = 1_000;
    for i in 0..REPLACED {
        let old = pod(i, 1).uid;
        index.apply(
            MetadataEvent::Deleted {
                kind: ObjectKind::Pod,
                uid: old,
            },
            1_500 * SECOND,
        );
        index.apply(MetadataEvent::Pod(pod(i, 2)), 2_000 * SECOND);
    }
    let churned = live() - before;
    let shared = SharedIndex::new(index);

    // A pod client and, alternately, a pod or a ClusterIP server (pseudo-random).
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let flows: Vec<(IpAddr, IpAddr)> = (0..FLOWS)
        .map(|f| {
            let client = pod_address((next() % u64::from(PODS)) as u32);
            let server = if f % 2 == 0 {
                pod_address((next() % u64::from(PODS)) as u32)
            } else {
                cluster_ip((next() % u64::from(SERVICES)) as u32)
            };
            (client, server)
        })
        .collect();
    let at = 3_000 * SECOND;

    let index = shared.read();
    let start = Instant::now();
    let mut found = 0u64;
    for (client, server) in &flows {
        let client = index.lookup(black_box(*client), 40_000, at);
        let server = index.lookup(black_box(*server), 8080, at);
        found += u64::from(client.is_some()) + u64::from(server.is_some());
        black_box((client, server));
    }
    let lookup_ns = start.elapsed().as_nanos() as f64 / FLOWS as f64;
    assert_eq!(found, 2 * FLOWS);

    let start = Instant::now();
    let mut attributes_built = 0usize;
    let mut request = RequestWriter::default();
    for (i, (client, server)) in flows.iter().enumerate() {
        if i % 1_000 == 0 {
            // As the shards do: a request holds at most a thousand intervals.
            black_box(std::mem::take(&mut request).finish());
        }
        request.resource_span("bench", ("mermin", "0"), |span| {
            let mut attributes = Count(span.attributes(), 0);
            for (address, port, side) in [
                (*client, 40_000, FlowSide::Source),
                (*server, 8080, FlowSide::Destination),
            ] {
                if let Some(metadata) = index.lookup(black_box(address), port, at) {
                    append_metadata_attributes(
                        AttributeNaming::Seed,
                        side,
                        &metadata,
                        &mut attributes,
                    );
                }
            }
            attributes_built += attributes.1;
        });
    }
    black_box(request.finish());
    let attributes_ns = start.elapsed().as_nanos() as f64 / FLOWS as f64;
    drop(index);

    println!("| measure (one core; 10k pods, 2k services, 200 nodes indexed) | value |");
    println!("|---|---:|");
    println!(
        "| index heap, steady state | {:.2} MB ({} B per pod, services and nodes included) |",
        steady as f64 / 1e6,
        steady / PODS as isize
    );
    println!(
        "| index heap after {REPLACED} pods replaced on their addresses (old kept for the grace period) | {:.2} MB |",
        churned as f64 / 1e6
    );
    println!("| lookup of both sides of a flow | {lookup_ns:.0} ns/flow |");
    println!(
        "| lookup of both sides and their seed attributes ({:.1} per flow) | {attributes_ns:.0} ns/flow |",
        attributes_built as f64 / FLOWS as f64
    );
}
