//! The index end to end: real `k8s-openapi` objects mapped by `kube`'s functions, applied at
//! given times, looked up with exact answers; and the ClusterRole against `kube::WATCHED`.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use k8s_openapi::{
    api::{
        core::v1::{
            Container, ContainerPort, Namespace, Node, NodeAddress, NodeStatus, ObjectReference,
            Pod, PodCondition, PodIP, PodSpec, PodStatus, Service, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
        rbac::v1::ClusterRole,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
    jiff::Timestamp,
};

use super::{
    index::{
        EndpointMetadata, IndexSettings, Label, MetadataEvent, MetadataIndex, ObjectKind,
        SharedIndex,
    },
    kube::{
        MappingError, WATCHED, endpoint_slice_event, namespace_event, node_event, owner_event,
        pod_event, service_event,
    },
    static_file,
};

const SECOND: u64 = 1_000_000_000;

fn meta(uid: &str, namespace: Option<&str>, name: &str, created_second: i64) -> ObjectMeta {
    ObjectMeta {
        uid: Some(uid.into()),
        namespace: namespace.map(Into::into),
        name: Some(name.into()),
        creation_timestamp: Some(Time(Timestamp::from_second(created_second).unwrap())),
        ..ObjectMeta::default()
    }
}

fn controlled_by(kind: &str, name: &str, uid: &str) -> Option<Vec<OwnerReference>> {
    Some(vec![OwnerReference {
        api_version: "apps/v1".into(),
        kind: kind.into(),
        name: name.into(),
        uid: uid.into(),
        controller: Some(true),
        ..OwnerReference::default()
    }])
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn container(name: &str, ports: &[i32]) -> Container {
    Container {
        name: name.into(),
        ports: Some(
            ports
                .iter()
                .map(|port| ContainerPort {
                    container_port: *port,
                    ..ContainerPort::default()
                })
                .collect(),
        ),
        ..Container::default()
    }
}

/// A running pod in namespace `shop` on `node-a` with one container `app` on port 8080.
fn pod(uid: &str, name: &str, ip: Option<&str>, created_second: i64) -> Pod {
    Pod {
        metadata: meta(uid, Some("shop"), name, created_second),
        spec: Some(PodSpec {
            node_name: Some("node-a".into()),
            containers: vec![container("app", &[8080])],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: ip.map(Into::into),
            pod_ips: ip.map(|ip| vec![PodIP { ip: ip.into() }]),
            ..PodStatus::default()
        }),
    }
}

fn service(uid: &str, name: &str, cluster_ip: &str) -> Service {
    Service {
        metadata: meta(uid, Some("shop"), name, 10),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn slice(uid: &str, service: &str, port: i32, endpoints: Vec<Endpoint>) -> EndpointSlice {
    let mut metadata = meta(uid, Some("shop"), &format!("{service}-{uid}"), 10);
    metadata.labels = labels(&[("kubernetes.io/service-name", service)]);
    EndpointSlice {
        metadata,
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(vec![EndpointPort {
            port: Some(port),
            ..EndpointPort::default()
        }]),
    }
}

fn pod_endpoint(pod_uid: &str, ip: &str) -> Endpoint {
    Endpoint {
        addresses: vec![ip.into()],
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            uid: Some(pod_uid.into()),
            ..ObjectReference::default()
        }),
        ..Endpoint::default()
    }
}

fn node(uid: &str, name: &str, internal_ip: &str) -> Node {
    Node {
        metadata: meta(uid, None, name, 1),
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: internal_ip.into(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: name.into(),
                },
            ]),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

struct Cluster {
    index: MetadataIndex,
}

impl Cluster {
    fn new() -> Self {
        Self::with(IndexSettings::default())
    }

    fn with(settings: IndexSettings) -> Self {
        Self {
            index: MetadataIndex::new(&settings),
        }
    }

    fn apply(&mut self, at_second: u64, event: Result<MetadataEvent, MappingError>) -> &mut Self {
        self.index.apply(event.unwrap(), at_second * SECOND);
        self
    }

    fn delete(&mut self, at_second: u64, kind: ObjectKind, uid: &str) -> &mut Self {
        let event = MetadataEvent::Deleted {
            kind,
            uid: uid.into(),
        };
        self.apply(at_second, Ok(event))
    }

    fn lookup(&self, address: &str, port: u16, at_second: u64) -> Option<EndpointMetadata<'_>> {
        let address: IpAddr = address.parse().unwrap();
        self.index.lookup(address, port, at_second * SECOND)
    }

    /// Who was at the address: `pod/<name>`, `service/<name>`, `node/<name>`, or `-`.
    fn who(&self, address: &str, port: u16, at_second: u64) -> String {
        match self.lookup(address, port, at_second) {
            None => "-".into(),
            Some(m) => match (&m.pod_name, &m.service_name, &m.node_name) {
                (Some(pod), _, _) => format!("pod/{pod}"),
                (None, Some(service), _) => format!("service/{service}"),
                (None, None, Some(node)) => format!("node/{node}"),
                (None, None, None) => "?".into(),
            },
        }
    }

    fn workload(&self, address: &str, at_second: u64) -> (String, String) {
        let m = self.lookup(address, 8080, at_second).unwrap();
        (
            m.workload_kind.unwrap().to_string(),
            m.workload_name.unwrap().to_string(),
        )
    }
}

#[test]
fn a_reused_pod_ip_joins_the_pod_that_held_it_at_the_time() {
    let mut cluster = Cluster::new();
    cluster
        .apply(100, pod_event(pod("a", "web-a", Some("10.0.0.5"), 100)))
        .apply(150, pod_event(pod("b", "web-b", None, 150)))
        .delete(200, ObjectKind::Pod, "a")
        .apply(250, pod_event(pod("b", "web-b", Some("10.0.0.5"), 150)));
    assert_eq!(cluster.who("10.0.0.5", 8080, 99), "-");
    assert_eq!(cluster.who("10.0.0.5", 8080, 100), "pod/web-a");
    // A late flow from before the deletion still joins pod A, though B holds the address now.
    assert_eq!(cluster.who("10.0.0.5", 8080, 199), "pod/web-a");
    // B was created at 150, but the address was A's until 200.
    assert_eq!(cluster.who("10.0.0.5", 8080, 200), "pod/web-b");
    assert_eq!(cluster.who("10.0.0.5", 8080, 300), "pod/web-b");
}

#[test]
fn a_deleted_pod_stays_joinable_for_the_grace_period_then_is_purged() {
    let mut cluster = Cluster::with(IndexSettings {
        deleted_grace: Duration::from_secs(300),
        ..IndexSettings::default()
    });
    cluster
        .apply(100, pod_event(pod("a", "web-a", Some("10.0.0.5"), 100)))
        .delete(200, ObjectKind::Pod, "a");
    cluster.index.purge(499 * SECOND);
    assert_eq!(cluster.who("10.0.0.5", 8080, 150), "pod/web-a");
    assert_eq!(cluster.who("10.0.0.5", 8080, 200), "-");
    cluster.index.purge(500 * SECOND);
    assert_eq!(cluster.who("10.0.0.5", 8080, 150), "-");
}

/// A pod created long before it got its address (Pending while it waited to be scheduled):
/// its address is its from when its sandbox's network was set up, not from its creation, so the
/// previous holder keeps its flows of those minutes even when the API shows the new pod before
/// the old one's deletion (a relist, a terminating pod).
#[test]
fn a_pod_holds_its_address_from_its_sandbox_not_from_its_creation() {
    let at = |second| Some(Time(Timestamp::from_second(second).unwrap()));
    let mut late = pod("b", "web-b", Some("10.0.0.7"), 20);
    let status = late.status.as_mut().unwrap();
    status.start_time = at(140);
    status.conditions = Some(vec![PodCondition {
        type_: "PodReadyToStartContainers".into(),
        status: "True".into(),
        last_transition_time: at(150),
        ..PodCondition::default()
    }]);
    let mut started = pod("c", "web-c", Some("10.0.0.8"), 20);
    started.status.as_mut().unwrap().start_time = at(140);
    let mut cluster = Cluster::new();
    cluster
        .apply(10, pod_event(pod("a", "web-a", Some("10.0.0.7"), 10)))
        .apply(155, pod_event(late))
        .apply(156, pod_event(started))
        .delete(160, ObjectKind::Pod, "a");
    assert_eq!(cluster.who("10.0.0.7", 8080, 100), "pod/web-a");
    assert_eq!(cluster.who("10.0.0.7", 8080, 151), "pod/web-b");
    // Without the condition (older kubelets): from when the kubelet took it.
    assert_eq!(cluster.who("10.0.0.8", 8080, 100), "-");
    assert_eq!(cluster.who("10.0.0.8", 8080, 141), "pod/web-c");
}

#[test]
fn a_finished_pod_gives_up_its_address() {
    let mut cluster = Cluster::new();
    let mut done = pod("j", "backup-1-xyz", Some("10.0.0.7"), 100);
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    cluster
        .apply(
            100,
            pod_event(pod("j", "backup-1-xyz", Some("10.0.0.7"), 100)),
        )
        .apply(160, pod_event(done))
        .apply(170, pod_event(pod("n", "next", Some("10.0.0.7"), 165)));
    assert_eq!(cluster.who("10.0.0.7", 8080, 159), "pod/backup-1-xyz");
    assert_eq!(cluster.who("10.0.0.7", 8080, 165), "pod/next");
}

#[test]
fn host_network_pods_are_told_apart_by_port_else_the_node() {
    let mut exporter = pod("x", "node-exporter-x", Some("192.168.1.10"), 50);
    exporter.metadata.owner_references = controlled_by("DaemonSet", "node-exporter", "ds");
    let spec = exporter.spec.as_mut().unwrap();
    spec.host_network = Some(true);
    spec.containers = vec![container("exporter", &[9100])];
    let mut cluster = Cluster::new();
    cluster
        .apply(1, node_event(node("n1", "node-a", "192.168.1.10")))
        .apply(50, pod_event(exporter));
    let scraped = cluster.lookup("192.168.1.10", 9100, 60).unwrap();
    assert_eq!(
        scraped,
        EndpointMetadata {
            pod_name: Some("node-exporter-x"),
            host_network: true,
            namespace: Some("shop"),
            node_name: Some("node-a"),
            workload_kind: Some("DaemonSet"),
            workload_name: Some("node-exporter"),
            container_name: Some("exporter"),
            ..EndpointMetadata::default()
        }
    );
    assert_eq!(
        cluster.lookup("192.168.1.10", 22, 60).unwrap(),
        EndpointMetadata {
            node_name: Some("node-a"),
            ..EndpointMetadata::default()
        }
    );
    assert_eq!(cluster.who("192.168.1.10", 9100, 40), "node/node-a");
}

#[test]
fn services_by_cluster_ip_and_by_endpoint_slice() {
    let mut cluster = Cluster::new();
    cluster
        .apply(10, service_event(service("s1", "web", "10.96.0.10")))
        .apply(20, pod_event(pod("a", "web-a", Some("10.0.0.5"), 20)))
        .apply(
            21,
            endpoint_slice_event(slice(
                "e1",
                "web",
                8080,
                vec![pod_endpoint("a", "10.0.0.5")],
            )),
        )
        .apply(
            22,
            endpoint_slice_event(slice(
                "e2",
                "web-metrics",
                9090,
                vec![pod_endpoint("a", "10.0.0.5")],
            )),
        )
        .apply(
            23,
            endpoint_slice_event(slice(
                "e3",
                "db",
                5432,
                vec![Endpoint {
                    addresses: vec!["203.0.113.7".into()],
                    ..Endpoint::default()
                }],
            )),
        );
    assert_eq!(
        cluster.lookup("10.96.0.10", 80, 30).unwrap(),
        EndpointMetadata {
            namespace: Some("shop"),
            service_name: Some("web"),
            ..EndpointMetadata::default()
        }
    );
    let service_of = |port| {
        cluster
            .lookup("10.0.0.5", port, 30)
            .unwrap()
            .service_name
            .map(|s| s.to_string())
    };
    assert_eq!(service_of(8080).as_deref(), Some("web"));
    assert_eq!(service_of(9090).as_deref(), Some("web-metrics"));
    assert_eq!(service_of(40000).as_deref(), Some("web"));
    assert_eq!(
        cluster.lookup("203.0.113.7", 5432, 30).unwrap(),
        EndpointMetadata {
            namespace: Some("shop"),
            service_name: Some("db"),
            ..EndpointMetadata::default()
        }
    );
    cluster
        .delete(40, ObjectKind::EndpointSlice, "e1")
        .delete(40, ObjectKind::EndpointSlice, "e2");
    assert_eq!(
        cluster.lookup("10.0.0.5", 8080, 50).unwrap().service_name,
        None
    );
    // A deleted pod keeps, for late flows, the Service it had.
    cluster
        .apply(
            41,
            endpoint_slice_event(slice(
                "e4",
                "web",
                8080,
                vec![pod_endpoint("a", "10.0.0.5")],
            )),
        )
        .delete(42, ObjectKind::Pod, "a")
        .delete(43, ObjectKind::EndpointSlice, "e4");
    assert_eq!(
        cluster.lookup("10.0.0.5", 8080, 41).unwrap().service_name,
        Some("web")
    );
    cluster.delete(60, ObjectKind::Service, "s1");
    assert_eq!(cluster.who("10.96.0.10", 80, 59), "service/web");
    assert_eq!(cluster.who("10.96.0.10", 80, 60), "-");
}

fn replica_set_pod(uid: &str, ip: &str, template_hash: &str) -> Pod {
    let mut pod = pod(uid, &format!("web-7d9f8-{uid}"), Some(ip), 10);
    pod.metadata.owner_references = controlled_by("ReplicaSet", "web-7d9f8", "rs1");
    pod.metadata.labels = labels(&[("pod-template-hash", template_hash)]);
    pod
}

fn owner_meta(uid: &str, name: &str, controller: Option<(&str, &str)>) -> ObjectMeta {
    let mut metadata = meta(uid, Some("shop"), name, 5);
    metadata.owner_references = controller.and_then(|(kind, name)| controlled_by(kind, name, "o"));
    metadata
}

#[test]
fn owner_chains_name_the_workload() {
    let mut cluster = Cluster::new();
    cluster
        .apply(10, pod_event(replica_set_pod("p1", "10.0.0.1", "7d9f8")))
        .apply(10, pod_event(replica_set_pod("p2", "10.0.0.2", "other")));
    let pair = |kind: &str, name: &str| (kind.to_string(), name.to_string());
    // ReplicaSet not known yet: derived from the name only when pod-template-hash confirms it.
    assert_eq!(cluster.workload("10.0.0.1", 20), pair("Deployment", "web"));
    assert_eq!(
        cluster.workload("10.0.0.2", 20),
        pair("ReplicaSet", "web-7d9f8")
    );
    cluster.apply(
        15,
        owner_event(
            ObjectKind::ReplicaSet,
            owner_meta("rs1", "web-7d9f8", Some(("Deployment", "storefront"))),
        ),
    );
    assert_eq!(
        cluster.workload("10.0.0.2", 20),
        pair("Deployment", "storefront")
    );

    let mut cron_pod = pod("p3", "backup-28901-abc", Some("10.0.0.3"), 10);
    cron_pod.metadata.owner_references = controlled_by("Job", "backup-28901", "job1");
    let mut job_pod = pod("p4", "migrate-abc", Some("10.0.0.4"), 10);
    job_pod.metadata.owner_references = controlled_by("Job", "migrate", "job2");
    let mut stateful = pod("p5", "db-0", Some("10.0.0.5"), 10);
    stateful.metadata.owner_references = controlled_by("StatefulSet", "db", "ss1");
    cluster
        .apply(10, pod_event(cron_pod))
        .apply(10, pod_event(job_pod))
        .apply(10, pod_event(stateful));
    assert_eq!(
        cluster.workload("10.0.0.3", 20),
        pair("Job", "backup-28901")
    );
    cluster
        .apply(
            16,
            owner_event(
                ObjectKind::Job,
                owner_meta("job1", "backup-28901", Some(("CronJob", "backup"))),
            ),
        )
        .apply(
            16,
            owner_event(ObjectKind::Job, owner_meta("job2", "migrate", None)),
        );
    assert_eq!(cluster.workload("10.0.0.3", 20), pair("CronJob", "backup"));
    assert_eq!(cluster.workload("10.0.0.4", 20), pair("Job", "migrate"));
    assert_eq!(cluster.workload("10.0.0.5", 20), pair("StatefulSet", "db"));
    cluster.delete(30, ObjectKind::Job, "job1");
    assert_eq!(
        cluster.workload("10.0.0.3", 40),
        pair("Job", "backup-28901")
    );
}

#[test]
fn only_allow_listed_labels_appear() {
    let mut cluster = Cluster::with(IndexSettings {
        label_keys: vec!["app".into(), "team".into()],
        ..IndexSettings::default()
    });
    let mut labelled = pod("a", "web-a", Some("10.0.0.5"), 10);
    labelled.metadata.labels = labels(&[
        ("app", "web"),
        ("pod-template-hash", "7d9f8"),
        ("version", "v2"),
    ]);
    let mut namespace = meta("ns1", None, "shop", 1);
    namespace.labels = labels(&[
        ("team", "payments"),
        ("kubernetes.io/metadata.name", "shop"),
    ]);
    cluster
        .apply(1, namespace_event(namespace))
        .apply(10, pod_event(labelled));
    let found = cluster.lookup("10.0.0.5", 8080, 20).unwrap();
    let pairs = |labels: &[Label]| {
        labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(pairs(found.labels), ["app=web"]);
    assert_eq!(pairs(found.namespace_labels), ["team=payments"]);
    let namespace_labels = |cluster: &Cluster| {
        pairs(
            cluster
                .lookup("10.0.0.5", 8080, 20)
                .unwrap()
                .namespace_labels,
        )
    };
    // Deleted: its pods' late flows keep its labels for the grace period, then they go.
    cluster.delete(30, ObjectKind::Namespace, "ns1");
    cluster.index.purge(100 * SECOND);
    assert_eq!(namespace_labels(&cluster), ["team=payments"]);
    cluster.index.purge(10_000 * SECOND);
    assert!(namespace_labels(&cluster).is_empty());
    // A relist after the namespace was deleted and made again under its name: the new one's
    // labels come first, the old one's deletion after them, and the new labels stay.
    let mut relisted = Cluster::with(IndexSettings {
        label_keys: vec!["team".into()],
        ..IndexSettings::default()
    });
    let mut first = meta("ns1", None, "shop", 1);
    first.labels = labels(&[("team", "payments")]);
    let mut again = meta("ns2", None, "shop", 40);
    again.labels = labels(&[("team", "checkout")]);
    relisted
        .apply(1, namespace_event(first))
        .apply(10, pod_event(pod("a", "web-a", Some("10.0.0.5"), 10)))
        .apply(50, namespace_event(again))
        .delete(51, ObjectKind::Namespace, "ns1");
    relisted.index.purge(10_000 * SECOND);
    assert_eq!(namespace_labels(&relisted), ["team=checkout"]);
}

#[test]
fn the_container_by_port_else_the_only_container() {
    let mut two = pod("a", "web-a", Some("10.0.0.5"), 10);
    two.spec.as_mut().unwrap().containers = vec![
        container("app", &[8080]),
        container("envoy", &[15001, 15090]),
    ];
    let mut one = pod("b", "worker-b", Some("10.0.0.6"), 10);
    one.spec.as_mut().unwrap().containers = vec![container("worker", &[])];
    let mut cluster = Cluster::new();
    cluster.apply(10, pod_event(two)).apply(10, pod_event(one));
    let container = |address, port| {
        cluster
            .lookup(address, port, 20)
            .unwrap()
            .container_name
            .map(|c| c.to_string())
    };
    assert_eq!(container("10.0.0.5", 8080).as_deref(), Some("app"));
    assert_eq!(container("10.0.0.5", 15090).as_deref(), Some("envoy"));
    assert_eq!(container("10.0.0.5", 43210), None);
    assert_eq!(container("10.0.0.6", 43210).as_deref(), Some("worker"));
}

#[test]
fn dual_stack_pods_and_node_address_changes() {
    let mut dual = pod("a", "web-a", Some("10.0.0.5"), 10);
    dual.status.as_mut().unwrap().pod_ips = Some(vec![
        PodIP {
            ip: "10.0.0.5".into(),
        },
        PodIP {
            ip: "fd00::5".into(),
        },
    ]);
    let mut cluster = Cluster::new();
    cluster
        .apply(10, pod_event(dual))
        .apply(1, node_event(node("n1", "node-a", "192.168.1.10")))
        .apply(100, node_event(node("n1", "node-a", "192.168.1.11")));
    assert_eq!(cluster.who("fd00::5", 8080, 20), "pod/web-a");
    assert_eq!(cluster.who("192.168.1.10", 22, 99), "node/node-a");
    assert_eq!(cluster.who("192.168.1.10", 22, 100), "-");
    assert_eq!(cluster.who("192.168.1.11", 22, 100), "node/node-a");
}

#[test]
fn static_entries_answer_for_what_kubernetes_does_not_know() {
    let mut cluster = Cluster::new();
    cluster.index.set_static_entries(
        static_file::parse(
            "m.hcl",
            r#"endpoint "10.0.0.0/16" { node = "legacy" }
endpoint "10.0.9.9" { pod = "db" namespace = "data" }"#,
        )
        .unwrap(),
    );
    cluster.apply(10, pod_event(pod("a", "web-a", Some("10.0.0.5"), 10)));
    assert_eq!(cluster.who("10.0.0.5", 8080, 20), "pod/web-a");
    assert_eq!(cluster.who("10.0.9.9", 5432, 20), "pod/db");
    assert_eq!(cluster.who("10.0.7.7", 80, 20), "node/legacy");
}

#[test]
fn the_resource_service_name_falls_back_in_order() {
    let full = EndpointMetadata {
        pod_name: Some("web-a"),
        workload_name: Some("web"),
        service_name: Some("web-svc"),
        node_name: Some("node-a"),
        ..EndpointMetadata::default()
    };
    assert_eq!(full.workload_service_name(), Some("web"));
    let without_workload = EndpointMetadata {
        workload_name: None,
        ..full
    };
    assert_eq!(without_workload.workload_service_name(), Some("web-a"));
    let service_only = EndpointMetadata {
        pod_name: None,
        ..without_workload
    };
    assert_eq!(service_only.workload_service_name(), Some("web-svc"));
    let node_only = EndpointMetadata {
        service_name: None,
        ..service_only
    };
    assert_eq!(node_only.workload_service_name(), Some("node-a"));
    assert_eq!(EndpointMetadata::default().workload_service_name(), None);
}

#[test]
fn shared_lookups_see_applied_events() {
    let shared = SharedIndex::new(MetadataIndex::new(&IndexSettings::default()));
    shared.apply(
        pod_event(pod("a", "web-a", Some("10.0.0.5"), 10)).unwrap(),
        10 * SECOND,
    );
    let read = shared.read();
    let found = read.lookup("10.0.0.5".parse().unwrap(), 8080, 20 * SECOND);
    assert_eq!(found.unwrap().pod_name, Some("web-a"));
    drop(read);
    shared.apply(
        MetadataEvent::Deleted {
            kind: ObjectKind::Pod,
            uid: "a".into(),
        },
        30 * SECOND,
    );
    shared.purge(1_000 * SECOND);
    assert_eq!(
        shared
            .read()
            .lookup("10.0.0.5".parse().unwrap(), 8080, 20 * SECOND),
        None
    );
}

#[test]
fn unusable_objects_are_errors() {
    let mut nameless = pod("a", "web-a", Some("10.0.0.5"), 10);
    nameless.metadata.uid = None;
    assert_eq!(
        pod_event(nameless).unwrap_err().to_string(),
        "Pod without metadata.uid"
    );
    assert_eq!(
        pod_event(pod("a", "web-a", Some("10.0.0.500"), 10))
            .unwrap_err()
            .to_string(),
        "Pod web-a: \"10.0.0.500\" is not an IP address"
    );
    let mut unlabelled = slice("e1", "web", 80, Vec::new());
    unlabelled.metadata.labels = None;
    // Another controller's slice (no Service label): skipped, quietly (its own reason).
    assert_eq!(
        endpoint_slice_event(unlabelled).unwrap_err().to_string(),
        "EndpointSlice web-e1 belongs to no Service"
    );
}

/// A native sidecar (an init container that keeps running) names the flows to its ports; an
/// ordinary init container's ports name nothing.
#[test]
fn native_sidecars_serve_their_ports() {
    let mut proxied = pod("a", "web-a", Some("10.0.0.5"), 10);
    let spec = proxied.spec.as_mut().unwrap();
    spec.init_containers = Some(vec![
        Container {
            restart_policy: Some("Always".into()),
            ..container("envoy", &[15090])
        },
        container("migrate", &[5432]),
    ]);
    let mut cluster = Cluster::new();
    cluster.apply(10, pod_event(proxied));
    let name = |port| {
        cluster
            .lookup("10.0.0.5", port, 20)
            .and_then(|m| m.container_name)
    };
    assert_eq!(name(15090), Some("envoy"));
    assert_eq!(name(8080), Some("app"));
    assert_eq!(name(5432), None, "two containers, neither on the port");
}

#[test]
fn the_cluster_role_grants_exactly_what_is_watched() {
    let yaml = include_str!("../../../deploy/rbac/aggregator-clusterrole.yaml");
    let role: ClusterRole = serde_saphyr::from_str(yaml).unwrap();
    let mut granted: Vec<(String, String)> = Vec::new();
    for rule in role.rules.unwrap() {
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        for group in rule.api_groups.unwrap() {
            for resource in rule.resources.as_deref().unwrap() {
                granted.push((group.clone(), resource.clone()));
            }
        }
    }
    granted.sort();
    let mut watched: Vec<(String, String)> = WATCHED
        .iter()
        .map(|(group, resource)| (group.to_string(), resource.to_string()))
        .collect();
    watched.sort();
    assert_eq!(granted, watched);
    assert_eq!(
        watched,
        [
            ("", "namespaces"),
            ("", "nodes"),
            ("", "pods"),
            ("", "services"),
            ("apps", "replicasets"),
            ("batch", "jobs"),
            ("discovery.k8s.io", "endpointslices"),
        ]
        .map(|(g, r)| (g.to_string(), r.to_string()))
    );
}

#[test]
fn namespaces_map_from_real_objects() {
    let namespace = Namespace {
        metadata: meta("ns1", None, "shop", 1),
        ..Namespace::default()
    };
    assert_eq!(
        namespace_event(namespace.metadata).unwrap(),
        MetadataEvent::Namespace(super::index::NamespaceInfo {
            uid: "ns1".into(),
            name: "shop".into(),
            labels: Vec::new(),
        })
    );
}
