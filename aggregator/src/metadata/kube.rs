//! The Kubernetes source of the index: one `kube-runtime` watcher per kind in [`WATCHED`], each
//! applying its changes to the shared index, and the plain functions that map API objects to
//! index events (unit-tested with real `k8s-openapi` objects; the stream plumbing is thin).
//!
//! - Pods, Services, EndpointSlices and Nodes are watched whole (their specs and statuses hold
//!   addresses and ports); Namespaces, ReplicaSets and Jobs metadata-only
//!   (`Api<PartialObjectMeta<K>>`: labels, owner references). Objects are mapped to compact
//!   index records at once and never stored.
//! - StatefulSets, DaemonSets, Deployments and CronJobs are not watched: their names come from
//!   the owner references of pods, ReplicaSets and Jobs.
//! - Ports are matched as `containerPort`s; `hostPort` mappings of ordinary pods are not
//!   followed (such traffic is attributed to the node).
//! - Watches list from the API server's cache (`any_semantic`) and retry with `kube-runtime`'s
//!   default backoff forever: the aggregator keeps running, with what it knew, while the API
//!   server is slow or down. After a relist, objects that vanished meanwhile are deleted.
//! - [`WatchMetrics`] counts events and errors per kind and shows the first full sync and the
//!   time of the last event (staleness); [`KubeWatchers::synced`] tells readiness.

use std::{collections::HashSet, net::IpAddr, pin::pin, time::Duration};

use ::kube::{
    Api, Client, Resource, ResourceExt,
    core::PartialObjectMeta,
    runtime::{
        WatchStreamExt,
        watcher::{self, Event, watcher},
    },
};
use futures_util::{Stream, StreamExt};
use k8s_openapi::{
    Resource as ApiResource,
    api::{
        apps::v1::ReplicaSet,
        batch::v1::Job,
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, task::JoinSet};

use crate::clock::unix_now;

use super::index::{
    ContainerPorts, EndpointSliceInfo, EndpointTarget, MetadataEvent, NamespaceInfo, NodeInfo,
    ObjectKind, OwnerInfo, OwnerRef, PodInfo, ServiceInfo, SharedIndex,
};

/// Every (API group, resource) watched: the ClusterRole in `deploy/rbac` grants exactly these.
pub const WATCHED: &[(&str, &str)] = &[
    (Pod::GROUP, Pod::URL_PATH_SEGMENT),
    (Service::GROUP, Service::URL_PATH_SEGMENT),
    (EndpointSlice::GROUP, EndpointSlice::URL_PATH_SEGMENT),
    (Node::GROUP, Node::URL_PATH_SEGMENT),
    (Namespace::GROUP, Namespace::URL_PATH_SEGMENT),
    (ReplicaSet::GROUP, ReplicaSet::URL_PATH_SEGMENT),
    (Job::GROUP, Job::URL_PATH_SEGMENT),
];

/// How often tenancies past their grace period are purged.
const PURGE_EVERY: Duration = Duration::from_secs(30);

/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An API object the index cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    #[error("{kind} without {field}")]
    Missing {
        kind: &'static str,
        field: &'static str,
    },
    #[error("{kind} {name}: {address:?} is not an IP address")]
    BadAddress {
        kind: &'static str,
        name: String,
        address: String,
    },
    /// A slice another controller made for something else (no `kubernetes.io/service-name`
    /// label, as multi-cluster slices): nothing to join, skipped without a warning.
    #[error("EndpointSlice {name} belongs to no Service")]
    NoService { name: String },
}

/// uid, namespace (empty for cluster-scoped objects) and name of an object.
fn identity(
    kind: ObjectKind,
    metadata: &mut ObjectMeta,
) -> Result<(String, String, String), MappingError> {
    let missing = |field| MappingError::Missing {
        kind: kind.as_str(),
        field,
    };
    Ok((
        metadata.uid.take().ok_or(missing("metadata.uid"))?,
        metadata.namespace.take().unwrap_or_default(),
        metadata.name.take().ok_or(missing("metadata.name"))?,
    ))
}

fn unix_nanos(time: &Time) -> Option<u64> {
    u64::try_from(time.0.as_nanosecond()).ok()
}

fn parse_address(kind: ObjectKind, name: &str, address: &str) -> Result<IpAddr, MappingError> {
    address.parse().map_err(|_| MappingError::BadAddress {
        kind: kind.as_str(),
        name: name.to_owned(),
        address: address.to_owned(),
    })
}

fn controller(references: Option<Vec<OwnerReference>>) -> Option<OwnerRef> {
    references?
        .into_iter()
        .find(|r| r.controller == Some(true))
        .map(|r| OwnerRef {
            kind: r.kind,
            name: r.name,
            uid: r.uid,
        })
}

/// A pod. Pods that finished (`Succeeded`, `Failed`) hold no address: theirs may be reused.
pub fn pod_event(mut pod: Pod) -> Result<MetadataEvent, MappingError> {
    let kind = ObjectKind::Pod;
    let (uid, namespace, name) = identity(kind, &mut pod.metadata)?;
    let spec = pod.spec.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    // The earliest the pod can have held its address: when its sandbox's network was set up
    // (the PodReadyToStartContainers condition), else when the kubelet took it (startTime),
    // else its creation. A pod Pending for minutes must not take its address's previous
    // holder's flows of those minutes.
    let addressed_since = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodReadyToStartContainers" && c.status == "True")
        .and_then(|c| c.last_transition_time.as_ref())
        .or(status.start_time.as_ref())
        .or(pod.metadata.creation_timestamp.as_ref())
        .and_then(unix_nanos);
    let listed = match (status.pod_ips, status.pod_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.into_iter().map(|ip| ip.ip).collect(),
        (_, Some(ip)) => vec![ip],
        _ => Vec::new(),
    };
    let addresses = if finished {
        Vec::new()
    } else {
        listed
            .iter()
            .map(|address| parse_address(kind, &name, address))
            .collect::<Result<_, _>>()?
    };
    Ok(MetadataEvent::Pod(PodInfo {
        uid,
        namespace,
        name,
        node_name: spec.node_name,
        addressed_since_unix_nanos: addressed_since,
        addresses,
        host_network: spec.host_network.unwrap_or(false),
        controller: controller(pod.metadata.owner_references),
        labels: pod
            .metadata
            .labels
            .unwrap_or_default()
            .into_iter()
            .collect(),
        // Native sidecars (init containers that keep running) serve ports too.
        containers: spec
            .containers
            .into_iter()
            .chain(
                spec.init_containers
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|c| c.restart_policy.as_deref() == Some("Always")),
            )
            .map(|container| ContainerPorts {
                name: container.name,
                ports: container
                    .ports
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|p| u16::try_from(p.container_port).ok())
                    .collect(),
            })
            .collect(),
    }))
}

/// A Service: its ClusterIPs (none for headless Services).
pub fn service_event(mut service: Service) -> Result<MetadataEvent, MappingError> {
    let kind = ObjectKind::Service;
    let (uid, namespace, name) = identity(kind, &mut service.metadata)?;
    let spec = service.spec.unwrap_or_default();
    let cluster_ips = match (spec.cluster_ips, spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips,
        (_, Some(ip)) => vec![ip],
        _ => Vec::new(),
    };
    Ok(MetadataEvent::Service(ServiceInfo {
        cluster_ips: cluster_ips
            .iter()
            .filter(|ip| !ip.is_empty() && *ip != "None")
            .map(|ip| parse_address(kind, &name, ip))
            .collect::<Result<_, _>>()?,
        uid,
        namespace,
        name,
        created_unix_nanos: service
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(unix_nanos),
    }))
}

/// An EndpointSlice: its Service, ports, and endpoints (pods by uid; others by address).
pub fn endpoint_slice_event(mut slice: EndpointSlice) -> Result<MetadataEvent, MappingError> {
    let kind = ObjectKind::EndpointSlice;
    let (uid, namespace, name) = identity(kind, &mut slice.metadata)?;
    let service_name = slice
        .metadata
        .labels
        .as_mut()
        .and_then(|labels| labels.remove(SERVICE_NAME_LABEL))
        .ok_or_else(|| MappingError::NoService { name: name.clone() })?;
    let by_address = slice.address_type != "FQDN";
    let mut endpoints = Vec::new();
    for endpoint in slice.endpoints {
        match endpoint.target_ref {
            Some(target) if target.kind.as_deref() == Some("Pod") && target.uid.is_some() => {
                endpoints.push(EndpointTarget::Pod {
                    uid: target.uid.unwrap_or_default(),
                });
            }
            _ if by_address => {
                for address in &endpoint.addresses {
                    endpoints.push(EndpointTarget::Address(parse_address(
                        kind, &name, address,
                    )?));
                }
            }
            _ => {}
        }
    }
    Ok(MetadataEvent::EndpointSlice(EndpointSliceInfo {
        uid,
        namespace,
        service_name,
        ports: slice
            .ports
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.port.and_then(|port| u16::try_from(port).ok()))
            .collect(),
        endpoints,
    }))
}

/// A Node: its internal and external IPs.
pub fn node_event(mut node: Node) -> Result<MetadataEvent, MappingError> {
    let kind = ObjectKind::Node;
    let (uid, _, name) = identity(kind, &mut node.metadata)?;
    let addresses = node
        .status
        .and_then(|status| status.addresses)
        .unwrap_or_default()
        .iter()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .map(|a| parse_address(kind, &name, &a.address))
        .collect::<Result<_, _>>()?;
    Ok(MetadataEvent::Node(NodeInfo {
        created_unix_nanos: node
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(unix_nanos),
        uid,
        name,
        addresses,
    }))
}

/// A Namespace (metadata only): its labels.
pub fn namespace_event(mut metadata: ObjectMeta) -> Result<MetadataEvent, MappingError> {
    let (uid, _, name) = identity(ObjectKind::Namespace, &mut metadata)?;
    Ok(MetadataEvent::Namespace(NamespaceInfo {
        uid,
        name,
        labels: metadata.labels.unwrap_or_default().into_iter().collect(),
    }))
}

/// A ReplicaSet or Job (metadata only): its controller.
pub fn owner_event(
    kind: ObjectKind,
    mut metadata: ObjectMeta,
) -> Result<MetadataEvent, MappingError> {
    let (uid, _, _) = identity(kind, &mut metadata)?;
    Ok(MetadataEvent::Owner(OwnerInfo {
        uid,
        controller: controller(metadata.owner_references),
    }))
}

/// Turns one kind's watch events into index events. It remembers the uids it applied, so that
/// when a relist completes, the objects missing from it (deleted while the watch was broken)
/// are deleted from the index too.
struct Follower {
    kind: ObjectKind,
    known: HashSet<String>,
    relisted: Option<HashSet<String>>,
}

/// What one watch event amounts to.
#[derive(Debug, Default, PartialEq)]
struct Followed {
    events: Vec<Result<MetadataEvent, MappingError>>,
    /// A full list just completed.
    listed: bool,
}

impl Follower {
    fn new(kind: ObjectKind) -> Self {
        Self {
            kind,
            known: HashSet::new(),
            relisted: None,
        }
    }

    fn follow<T: Resource>(
        &mut self,
        event: Event<T>,
        map: fn(T) -> Result<MetadataEvent, MappingError>,
    ) -> Followed {
        let mut followed = Followed::default();
        match event {
            Event::Init => self.relisted = Some(HashSet::new()),
            Event::InitApply(object) | Event::Apply(object) => {
                if let Some(uid) = object.uid() {
                    if let Some(relisted) = &mut self.relisted {
                        relisted.insert(uid.clone());
                    }
                    self.known.insert(uid);
                }
                followed.events.push(map(object));
            }
            Event::Delete(object) => {
                if let Some(uid) = object.uid() {
                    self.known.remove(&uid);
                    followed.events.push(Ok(MetadataEvent::Deleted {
                        kind: self.kind,
                        uid,
                    }));
                }
            }
            Event::InitDone => {
                let relisted = self.relisted.take().unwrap_or_default();
                let mut vanished: Vec<String> = self.known.difference(&relisted).cloned().collect();
                vanished.sort();
                followed.events.extend(vanished.into_iter().map(|uid| {
                    Ok(MetadataEvent::Deleted {
                        kind: self.kind,
                        uid,
                    })
                }));
                self.known = relisted;
                followed.listed = true;
            }
        }
        followed
    }
}

/// The kinds that completed a first full list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncedKinds(u8);

impl SyncedKinds {
    fn insert(&mut self, kind: ObjectKind) {
        self.0 |= 1 << kind as u8;
    }

    pub fn contains(self, kind: ObjectKind) -> bool {
        self.0 & (1 << kind as u8) != 0
    }

    /// Every watched kind has been listed once: the index is ready.
    pub fn all(self) -> bool {
        ObjectKind::ALL.iter().all(|kind| self.contains(*kind))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    kind: &'static str,
    /// `watch` (the API call failed; retried with backoff) or `object` (an object the index
    /// cannot use; skipped).
    reason: &'static str,
}

/// The watchers' metrics, per kind.
#[derive(Debug, Clone, Default)]
pub struct WatchMetrics {
    events: Family<KindLabel, Counter>,
    errors: Family<ErrorLabel, Counter>,
    synced: Family<KindLabel, Gauge>,
    last_event: Family<KindLabel, Gauge>,
    /// Unix seconds since the kind's watch has failed without a success in between (0: not
    /// failing): a dead watch, told apart from a quiet one.
    failing_since: Family<KindLabel, Gauge>,
}

impl WatchMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "metadata_watch_events",
            "Kubernetes watch events applied to the metadata index, by kind",
            self.events.clone(),
        );
        registry.register(
            "metadata_watch_errors",
            "Kubernetes watch failures (retried) and unusable objects (skipped), by kind",
            self.errors.clone(),
        );
        registry.register(
            "metadata_watch_synced",
            "1 once the kind has been listed in full",
            self.synced.clone(),
        );
        registry.register(
            "metadata_watch_last_event_seconds",
            "Unix time of the kind's last watch event (staleness)",
            self.last_event.clone(),
        );
        registry.register(
            "metadata_watch_failing_since_seconds",
            "Unix time since which the kind's watch has failed without a success (0: not failing); what tells a dead watch from a quiet one",
            self.failing_since.clone(),
        );
    }

    /// Every watched kind's sync state, in [`ObjectKind::ALL`] order (read without creating
    /// series).
    pub fn kinds(&self) -> Vec<KindSync> {
        ObjectKind::ALL
            .iter()
            .map(|kind| {
                let label = KindLabel {
                    kind: kind.as_str(),
                };
                let errors = |reason| {
                    self.errors
                        .get(&ErrorLabel {
                            kind: kind.as_str(),
                            reason,
                        })
                        .map_or(0, |c| c.get())
                };
                KindSync {
                    kind: kind.as_str(),
                    synced: self.synced.get(&label).is_some_and(|g| g.get() == 1),
                    events: self.events.get(&label).map_or(0, |c| c.get()),
                    watch_errors: errors("watch"),
                    skipped_objects: errors("object"),
                    last_event_unix_seconds: self
                        .last_event
                        .get(&label)
                        .map_or(0, |g| u64::try_from(g.get()).unwrap_or(0)),
                }
            })
            .collect()
    }

    fn error(&self, kind: ObjectKind, reason: &'static str) {
        self.errors
            .get_or_create(&ErrorLabel {
                kind: kind.as_str(),
                reason,
            })
            .inc();
    }
}

/// One watched kind's sync state (for the admin API's status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindSync {
    pub kind: &'static str,
    pub synced: bool,
    pub events: u64,
    pub watch_errors: u64,
    pub skipped_objects: u64,
    pub last_event_unix_seconds: u64,
}

/// The running watchers; dropping this stops them.
pub struct KubeWatchers {
    /// Held only so that dropping `KubeWatchers` aborts the tasks.
    _tasks: JoinSet<()>,
    synced: watch::Receiver<SyncedKinds>,
    metrics: WatchMetrics,
}

impl KubeWatchers {
    /// Starts a watcher per kind in [`WATCHED`] and a purge every 30 s, applying to `index`.
    /// Needs a tokio runtime.
    pub fn spawn(client: Client, index: SharedIndex) -> Self {
        let (synced_tx, synced) = watch::channel(SyncedKinds::default());
        let metrics = WatchMetrics::default();
        let mut tasks = JoinSet::new();
        let config = watcher::Config::default().any_semantic();
        let context = Context {
            index: index.clone(),
            synced: synced_tx,
            metrics: metrics.clone(),
        };
        tasks.spawn(context.clone().run(
            ObjectKind::Pod,
            watcher(Api::<Pod>::all(client.clone()), config.clone()),
            pod_event,
        ));
        tasks.spawn(context.clone().run(
            ObjectKind::Service,
            watcher(Api::<Service>::all(client.clone()), config.clone()),
            service_event,
        ));
        tasks.spawn(context.clone().run(
            ObjectKind::EndpointSlice,
            watcher(Api::<EndpointSlice>::all(client.clone()), config.clone()),
            endpoint_slice_event,
        ));
        tasks.spawn(context.clone().run(
            ObjectKind::Node,
            watcher(Api::<Node>::all(client.clone()), config.clone()),
            node_event,
        ));
        tasks.spawn(context.clone().run(
            ObjectKind::Namespace,
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                config.clone(),
            ),
            |namespace: PartialObjectMeta<Namespace>| namespace_event(namespace.metadata),
        ));
        tasks.spawn(context.clone().run(
            ObjectKind::ReplicaSet,
            watcher(
                Api::<PartialObjectMeta<ReplicaSet>>::all(client.clone()),
                config.clone(),
            ),
            |set: PartialObjectMeta<ReplicaSet>| owner_event(ObjectKind::ReplicaSet, set.metadata),
        ));
        tasks.spawn(context.run(
            ObjectKind::Job,
            watcher(Api::<PartialObjectMeta<Job>>::all(client.clone()), config),
            |job: PartialObjectMeta<Job>| owner_event(ObjectKind::Job, job.metadata),
        ));
        tasks.spawn(async move {
            let mut every = tokio::time::interval(PURGE_EVERY);
            loop {
                every.tick().await;
                index.purge(unix_now());
            }
        });
        Self {
            _tasks: tasks,
            synced,
            metrics,
        }
    }

    /// Changes as kinds complete their first full list; see [`SyncedKinds::all`].
    pub fn synced(&self) -> watch::Receiver<SyncedKinds> {
        self.synced.clone()
    }

    pub fn metrics(&self) -> &WatchMetrics {
        &self.metrics
    }
}

/// What every watcher task shares.
#[derive(Clone)]
struct Context {
    index: SharedIndex,
    synced: watch::Sender<SyncedKinds>,
    metrics: WatchMetrics,
}

impl Context {
    async fn run<T>(
        self,
        kind: ObjectKind,
        stream: impl Stream<Item = Result<Event<T>, watcher::Error>> + Send,
        map: fn(T) -> Result<MetadataEvent, MappingError>,
    ) where
        T: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let label = KindLabel {
            kind: kind.as_str(),
        };
        let failing = self.metrics.failing_since.get_or_create_owned(&label);
        let mut follower = Follower::new(kind);
        let mut stream = pin!(stream.default_backoff());
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(event) => {
                    failing.set(0);
                    event
                }
                Err(error) => {
                    if failing.get() == 0 {
                        failing.set(i64::try_from(unix_now() / 1_000_000_000).unwrap_or(i64::MAX));
                    }
                    self.metrics.error(kind, "watch");
                    tracing::warn!(kind = kind.as_str(), %error, "Kubernetes watch failed; retrying");
                    continue;
                }
            };
            // An event happens, for the index, when the watcher receives it.
            let now = unix_now();
            let followed = follower.follow(event, map);
            for event in followed.events {
                match event {
                    Ok(event) => self.index.apply(event, now),
                    Err(error @ MappingError::NoService { .. }) => {
                        self.metrics.error(kind, "no_service");
                        tracing::debug!(%error, "object skipped");
                    }
                    Err(error) => {
                        self.metrics.error(kind, "object");
                        tracing::warn!(kind = kind.as_str(), %error, "object skipped");
                    }
                }
            }
            self.metrics.events.get_or_create(&label).inc();
            self.metrics
                .last_event
                .get_or_create(&label)
                .set(i64::try_from(now / 1_000_000_000).unwrap_or(i64::MAX));
            if followed.listed {
                self.metrics.synced.get_or_create(&label).set(1);
                self.synced.send_modify(|synced| synced.insert(kind));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::stream;
    use prometheus_client::encoding::text::encode;

    use super::*;
    use crate::metadata::index::{IndexSettings, MetadataIndex};

    fn pod(uid: &str, ip: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                namespace: Some("shop".into()),
                name: Some(format!("pod-{uid}")),
                ..ObjectMeta::default()
            },
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                pod_ip: Some(ip.into()),
                ..Default::default()
            }),
            ..Pod::default()
        }
    }

    fn deleted(uid: &str) -> Result<MetadataEvent, MappingError> {
        Ok(MetadataEvent::Deleted {
            kind: ObjectKind::Pod,
            uid: uid.into(),
        })
    }

    #[test]
    fn a_relist_deletes_what_vanished_meanwhile() {
        let mut follower = Follower::new(ObjectKind::Pod);
        for event in [
            Event::Init,
            Event::InitApply(pod("a", "10.0.0.1")),
            Event::InitApply(pod("b", "10.0.0.2")),
            Event::InitApply(pod("c", "10.0.0.3")),
        ] {
            assert!(!follower.follow(event, pod_event).listed);
        }
        assert_eq!(
            follower.follow(Event::InitDone, pod_event),
            Followed {
                events: Vec::new(),
                listed: true
            }
        );
        assert_eq!(
            follower.follow(Event::Delete(pod("c", "10.0.0.3")), pod_event),
            Followed {
                events: vec![deleted("c")],
                listed: false
            }
        );
        // The watch broke; `b` was deleted meanwhile, `d` created.
        follower.follow(Event::Init, pod_event);
        follower.follow(Event::InitApply(pod("a", "10.0.0.1")), pod_event);
        follower.follow(Event::InitApply(pod("d", "10.0.0.4")), pod_event);
        assert_eq!(
            follower.follow(Event::InitDone, pod_event),
            Followed {
                events: vec![deleted("b")],
                listed: true
            }
        );
        assert_eq!(follower.known, HashSet::from(["a".into(), "d".into()]));
    }

    #[tokio::test]
    async fn a_watch_stream_fills_the_index_and_reports() {
        let started = unix_now() / 1_000_000_000;
        let index = SharedIndex::new(MetadataIndex::new(&IndexSettings::default()));
        let (synced_tx, synced) = watch::channel(SyncedKinds::default());
        let metrics = WatchMetrics::default();
        let context = Context {
            index: index.clone(),
            synced: synced_tx,
            metrics: metrics.clone(),
        };
        let mut unusable = pod("x", "10.0.0.9");
        unusable.metadata.name = None;
        let events = stream::iter([
            Ok(Event::Init),
            Ok(Event::InitApply(pod("a", "10.0.0.1"))),
            Ok(Event::InitApply(unusable)),
            Ok(Event::InitDone),
            Err(watcher::Error::NoResourceVersion),
        ]);
        context.run(ObjectKind::Pod, events, pod_event).await;

        {
            let read = index.read();
            let found = read.lookup("10.0.0.1".parse().unwrap(), 80, unix_now());
            assert_eq!(found.unwrap().pod_name, Some("pod-a"));
        }
        let synced = *synced.borrow();
        assert!(synced.contains(ObjectKind::Pod));
        assert!(!synced.contains(ObjectKind::Node));
        assert!(!synced.all());

        let mut registry = Registry::with_prefix("mermin_aggregator");
        metrics.register(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "mermin_aggregator_metadata_watch_events_total{kind=\"Pod\"} 4",
            "mermin_aggregator_metadata_watch_errors_total{kind=\"Pod\",reason=\"object\"} 1",
            "mermin_aggregator_metadata_watch_errors_total{kind=\"Pod\",reason=\"watch\"} 1",
            "mermin_aggregator_metadata_watch_synced{kind=\"Pod\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }

        // The same, as the admin API's status reads it: every kind, the unseen ones empty.
        let kinds = metrics.kinds();
        let names: Vec<&str> = kinds.iter().map(|k| k.kind).collect();
        assert_eq!(
            names,
            [
                "Pod",
                "Service",
                "EndpointSlice",
                "Node",
                "Namespace",
                "ReplicaSet",
                "Job"
            ]
        );
        let pods = &kinds[0];
        assert_eq!(
            (
                pods.synced,
                pods.events,
                pods.watch_errors,
                pods.skipped_objects
            ),
            (true, 4, 1, 1)
        );
        let now = unix_now() / 1_000_000_000;
        assert!(now - pods.last_event_unix_seconds <= 5, "{pods:?}");
        assert_eq!(
            kinds[3],
            KindSync {
                kind: "Node",
                synced: false,
                events: 0,
                watch_errors: 0,
                skipped_objects: 0,
                last_event_unix_seconds: 0,
            }
        );
        // It ended failing: since when says it is not just quiet; a success clears it.
        let failing = || {
            metrics
                .failing_since
                .get_or_create(&KindLabel { kind: "Pod" })
                .get()
        };
        let since = u64::try_from(failing()).unwrap();
        assert!((started..=unix_now() / 1_000_000_000).contains(&since));
        let (synced_tx, _) = watch::channel(SyncedKinds::default());
        let again = Context {
            index: index.clone(),
            synced: synced_tx,
            metrics: metrics.clone(),
        };
        again
            .run(ObjectKind::Pod, stream::iter([Ok(Event::Init)]), pod_event)
            .await;
        assert_eq!(failing(), 0);
    }

    #[tokio::test]
    async fn watchers_keep_running_while_the_api_server_is_down() {
        let refused = tower::service_fn(|_: http::Request<::kube::client::Body>| async {
            Err::<http::Response<::kube::client::Body>, _>(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            ))
        });
        let index = SharedIndex::new(MetadataIndex::new(&IndexSettings::default()));
        let watchers = KubeWatchers::spawn(Client::new(refused, "default"), index.clone());
        let mut registry = Registry::default();
        watchers.metrics().register(&mut registry);
        let failing = |text: &str| {
            ObjectKind::ALL
                .iter()
                .filter(|kind| {
                    text.contains(&format!(
                        "metadata_watch_errors_total{{kind=\"{}\",reason=\"watch\"}}",
                        kind.as_str()
                    ))
                })
                .count()
        };
        let mut text = String::new();
        for _ in 0..100 {
            text.clear();
            encode(&mut text, &registry).unwrap();
            if failing(&text) == ObjectKind::ALL.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(failing(&text), ObjectKind::ALL.len(), "{text}");
        assert_eq!(*watchers.synced().borrow(), SyncedKinds::default());
        let read = index.read();
        assert_eq!(
            read.lookup("10.0.0.1".parse().unwrap(), 80, unix_now()),
            None
        );
    }

    #[test]
    fn every_kind_synced_is_ready() {
        let mut synced = SyncedKinds::default();
        for kind in ObjectKind::ALL {
            assert!(!synced.all());
            synced.insert(kind);
        }
        assert!(synced.all());
        assert_eq!(WATCHED.len(), ObjectKind::ALL.len());
    }
}
