//! `MetadataIndex`: which Kubernetes object held an IP address at a given time, and what to say
//! about it. It owns the time rules, the owner chain, service membership, the label allow-list
//! and the string interning that keeps it small. It knows nothing of where its events come from
//! (`kube` maps API objects to [`MetadataEvent`]s, `static_file` fills the [`PrefixTable`]).
//!
//! **Time.** Every address is held by *tenancies*: `[valid_from, valid_until)` (open while the
//! holder still has the address). A lookup at `at_unix_nanos` considers only the tenancies valid
//! then, so a pod IP reused by a later pod still joins a late flow to the pod that had it.
//! - `valid_from` is, for its first address, the earliest the object can have used it: a pod's
//!   sandbox network set up (`PodReadyToStartContainers`, else `startTime`, else creation), a
//!   Service's or Node's `creationTimestamp`; the event time for an address it gets later;
//!   for pod IPs and ClusterIPs (held by one object at a time) never before the previous holder
//!   let go of the address.
//! - `valid_until` is the time of the event that took the address away: the object's deletion,
//!   a changed address, or a pod that finished (`Succeeded`/`Failed` pods keep `status.podIP`
//!   but their address is free for reuse; the `kube` adapter gives them no address).
//! - Where tenancies overlap (the API can show a terminating pod after its IP went to a new
//!   one), the one that began last wins.
//! - Closed tenancies stay joinable for [`IndexSettings::deleted_grace`] after `valid_until`;
//!   [`MetadataIndex::purge`] drops them after that.
//!
//! **Who is at an address**, most specific first: a Service's ClusterIP; a pod's own IP; a
//! hostNetwork pod (it shares the node's address) whose `containerPorts` hold the flow's port;
//! the Node. Addresses no tenancy explains fall back to EndpointSlice endpoints given by address
//! (selector-less Services pointing outside the cluster), then the static file, longest prefix
//! first.
//!
//! **Workload.** The pod's controller owner reference. A ReplicaSet or Job is resolved through
//! the owners the index was told about (ReplicaSet → Deployment, Job → CronJob, or the
//! ReplicaSet/Job itself when it has no controller). When that ReplicaSet is not known (yet),
//! the Deployment name is derived by removing the `-<hash>` suffix from the ReplicaSet's name,
//! but only when the pod's `pod-template-hash` label equals that suffix, which is how the
//! Deployment controller names ReplicaSets; otherwise the ReplicaSet is reported as the
//! workload. An unknown Job stays a Job: CronJob job names carry a schedule-derived suffix that
//! no label confirms. StatefulSet, DaemonSet and other controllers are taken from the reference.
//!
//! **Service** of a pod: the Services whose EndpointSlices list it (by `targetRef` uid); of
//! several, the first by name whose slice ports hold the flow's port, else the first by name.
//! A deleted pod keeps, for late flows, the Services it had when it was deleted.
//! **Container**: the container whose `containerPorts` hold the port, else the only container.
//! **Labels**: only keys in [`IndexSettings::label_keys`], for pods and namespaces alike.
//!
//! **Cost.** Workload and Services are resolved into the pod's record when the pod, its
//! ReplicaSet/Job or a slice listing it changes, so a lookup reads the address's map slot (its
//! first tenancy inline) and the holder's record, and returns a view borrowing from the index:
//! no allocation, no reference count touched. Every string is interned as an `Arc<str>`
//! (namespaces, node names, label keys and values are shared by many pods), label sets too
//! (replicas share one); `purge` also drops interned strings nothing uses any more.

use std::{
    cmp::Reverse,
    collections::HashSet,
    hash::Hash,
    net::IpAddr,
    sync::{Arc, PoisonError, RwLock, RwLockReadGuard},
    time::Duration,
};

use foldhash::HashMap;

use super::static_file::PrefixTable;

/// A label: key and value.
pub type Label = (Arc<str>, Arc<str>);

/// Allow-listed labels, sorted by key, shared by every object that has the same.
type Labels = Arc<[Label]>;

/// What is known about one end of a flow, borrowed from the index (a lookup copies nothing and
/// touches no reference count: use it while holding [`SharedIndex::read`]); `None` where
/// unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointMetadata<'a> {
    pub pod_name: Option<&'a str>,
    /// The pod shares its node's network (no interface of its own).
    pub host_network: bool,
    pub namespace: Option<&'a str>,
    pub node_name: Option<&'a str>,
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `ReplicaSet`, `Job`, `CronJob`, or another
    /// controller's kind.
    pub workload_kind: Option<&'a str>,
    pub workload_name: Option<&'a str>,
    pub service_name: Option<&'a str>,
    pub container_name: Option<&'a str>,
    pub labels: &'a [Label],
    pub namespace_labels: &'a [Label],
}

impl<'a> EndpointMetadata<'a> {
    /// The name for this side's OTLP resource `service.name`: the workload, else the pod, else
    /// the Service, else the node.
    pub fn workload_service_name(&self) -> Option<&'a str> {
        self.workload_name
            .or(self.pod_name)
            .or(self.service_name)
            .or(self.node_name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSettings {
    /// Label keys that may appear in metadata (pods' and namespaces'); all others are dropped.
    pub label_keys: Vec<String>,
    pub deleted_grace: Duration,
}

impl Default for IndexSettings {
    fn default() -> Self {
        Self {
            label_keys: Vec::new(),
            deleted_grace: crate::defaults::DELETED_GRACE,
        }
    }
}

/// The kinds of objects the index learns about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Pod,
    Service,
    EndpointSlice,
    Node,
    Namespace,
    ReplicaSet,
    Job,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 7] = [
        ObjectKind::Pod,
        ObjectKind::Service,
        ObjectKind::EndpointSlice,
        ObjectKind::Node,
        ObjectKind::Namespace,
        ObjectKind::ReplicaSet,
        ObjectKind::Job,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Pod => "Pod",
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
            ObjectKind::Namespace => "Namespace",
            ObjectKind::ReplicaSet => "ReplicaSet",
            ObjectKind::Job => "Job",
        }
    }
}

/// An owner reference: the object's kind, name and uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerRef {
    pub kind: String,
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPorts {
    pub name: String,
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node_name: Option<String>,
    /// The earliest the pod can have held an address (its sandbox's network set up).
    pub addressed_since_unix_nanos: Option<u64>,
    /// The addresses the pod holds now: empty before it has one and after it finished.
    pub addresses: Vec<IpAddr>,
    pub host_network: bool,
    /// The owner reference marked `controller`.
    pub controller: Option<OwnerRef>,
    /// All labels; the index keeps the allow-listed ones.
    pub labels: Vec<(String, String)>,
    pub containers: Vec<ContainerPorts>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub created_unix_nanos: Option<u64>,
    pub cluster_ips: Vec<IpAddr>,
}

/// One endpoint of an EndpointSlice: a pod (by uid), or bare addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointTarget {
    Pod { uid: String },
    Address(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    pub uid: String,
    pub namespace: String,
    /// From the label `kubernetes.io/service-name`.
    pub service_name: String,
    pub ports: Vec<u16>,
    pub endpoints: Vec<EndpointTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub uid: String,
    pub name: String,
    pub created_unix_nanos: Option<u64>,
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub uid: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
}

/// A ReplicaSet or Job, which only matters for its own controller (Deployment, CronJob).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerInfo {
    pub uid: String,
    pub controller: Option<OwnerRef>,
}

/// A change to what the index knows, independent of where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataEvent {
    Pod(PodInfo),
    Service(ServiceInfo),
    EndpointSlice(EndpointSliceInfo),
    Node(NodeInfo),
    Namespace(NamespaceInfo),
    /// A ReplicaSet or a Job.
    Owner(OwnerInfo),
    Deleted {
        kind: ObjectKind,
        uid: String,
    },
}

/// A workload: its kind and name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Workload {
    kind: Arc<str>,
    name: Arc<str>,
}

/// A pod's controller, with what to report when it is a ReplicaSet or Job the index does not
/// know.
#[derive(Debug, Clone)]
struct Controller {
    uid: Arc<str>,
    resolve_through_owner: bool,
    itself: Workload,
    if_owner_unknown: Workload,
}

/// A pod as lookups see it. What depends on other objects (the workload through a ReplicaSet or
/// Job, the Services) is resolved when the pod or those objects change, so that a lookup reads
/// this record and nothing else.
#[derive(Debug, Clone)]
struct PodRecord {
    name: Arc<str>,
    namespace: Arc<str>,
    node_name: Option<Arc<str>>,
    controller: Option<Controller>,
    workload: Option<Workload>,
    services: Box<[Membership]>,
    container_ports: Box<[(u16, Arc<str>)]>,
    sole_container: Option<Arc<str>>,
    labels: Labels,
}

impl PodRecord {
    fn container_for(&self, port: u16) -> Option<&str> {
        self.container_ports
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, name)| &**name)
            .or(self.sole_container.as_deref())
    }

    fn listens_on(&self, port: u16) -> bool {
        self.container_ports.iter().any(|(p, _)| *p == port)
    }
}

#[derive(Debug)]
struct ServiceRecord {
    namespace: Arc<str>,
    name: Arc<str>,
}

/// What holds an address during a tenancy.
#[derive(Debug, Clone)]
enum Holder {
    Service(Arc<ServiceRecord>),
    Pod(Arc<PodRecord>),
    HostNetworkPod(Arc<PodRecord>),
    Node(Arc<str>),
}

impl Holder {
    /// Lower is more specific.
    fn rank(&self) -> u8 {
        match self {
            Holder::Service(_) => 0,
            Holder::Pod(_) => 1,
            Holder::HostNetworkPod(_) => 2,
            Holder::Node(_) => 3,
        }
    }

    /// Held by one object at a time (pod IPs, ClusterIPs), unlike a node's address.
    fn exclusive(&self) -> bool {
        matches!(self, Holder::Service(_) | Holder::Pod(_))
    }

    fn explains_port(&self, port: u16) -> bool {
        match self {
            Holder::HostNetworkPod(pod) => pod.listens_on(port),
            _ => true,
        }
    }
}

#[derive(Debug)]
struct Tenancy {
    holder_uid: Arc<str>,
    valid_from: u64,
    valid_until: Option<u64>,
    holder: Holder,
}

impl Tenancy {
    fn valid_at(&self, at: u64) -> bool {
        self.valid_from <= at && self.valid_until.is_none_or(|until| at < until)
    }
}

/// The tenancies of one address, the first inline: most addresses have had one holder, and a
/// lookup then reads the map's slot and the holder's record, nothing else.
#[derive(Debug)]
struct Tenancies {
    first: Tenancy,
    more: Vec<Tenancy>,
}

impl Tenancies {
    fn iter(&self) -> impl Iterator<Item = &Tenancy> {
        std::iter::once(&self.first).chain(&self.more)
    }

    fn open(&self, uid: &str) -> Option<&Tenancy> {
        self.iter()
            .find(|t| t.valid_until.is_none() && &*t.holder_uid == uid)
    }

    fn open_mut(&mut self, uid: &str) -> Option<&mut Tenancy> {
        std::iter::once(&mut self.first)
            .chain(&mut self.more)
            .find(|t| t.valid_until.is_none() && &*t.holder_uid == uid)
    }

    /// Keeps the tenancies `keep` accepts; `false` if none is left.
    fn retain(&mut self, mut keep: impl FnMut(&Tenancy) -> bool) -> bool {
        self.more.retain(&mut keep);
        if !keep(&self.first) {
            if self.more.is_empty() {
                return false;
            }
            self.first = self.more.remove(0);
        }
        true
    }
}

/// The addresses an object holds now.
#[derive(Debug, Default)]
struct Placement {
    addresses: Vec<IpAddr>,
    ever_addressed: bool,
    /// For a pod: the ReplicaSet or Job through which its workload is resolved.
    owner_uid: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
struct Membership {
    slice_uid: Arc<str>,
    namespace: Arc<str>,
    service: Arc<str>,
    ports: Arc<[u16]>,
}

/// Who an EndpointSlice lists: pods by uid, others by address.
#[derive(Debug)]
struct SliceRecord {
    pods: Vec<Arc<str>>,
    addresses: Vec<IpAddr>,
}

/// Interned strings and label sets; `collect_garbage` drops those only the interner holds.
#[derive(Debug, Default)]
struct Interner {
    strings: HashSet<Arc<str>, foldhash::fast::RandomState>,
    label_sets: HashSet<Labels, foldhash::fast::RandomState>,
}

impl Interner {
    fn text(&mut self, text: &str) -> Arc<str> {
        if let Some(interned) = self.strings.get(text) {
            return interned.clone();
        }
        let interned: Arc<str> = Arc::from(text);
        self.strings.insert(interned.clone());
        interned
    }

    fn labels(&mut self, labels: Vec<Label>) -> Labels {
        if let Some(interned) = self.label_sets.get(labels.as_slice()) {
            return interned.clone();
        }
        let interned: Labels = Arc::from(labels);
        self.label_sets.insert(interned.clone());
        interned
    }

    fn collect_garbage(&mut self) {
        // Label sets first: dropping one releases its strings.
        self.label_sets.retain(|set| Arc::strong_count(set) > 1);
        self.strings.retain(|text| Arc::strong_count(text) > 1);
    }
}

/// The index. Not thread-safe by itself; see [`SharedIndex`].
#[derive(Debug)]
pub struct MetadataIndex {
    label_keys: HashSet<String, foldhash::fast::RandomState>,
    deleted_grace_nanos: u64,
    interner: Interner,
    tenancies: HashMap<IpAddr, Tenancies>,
    placements: HashMap<Arc<str>, Placement>,
    /// ReplicaSet and Job uid → their controller, `None` when they have none.
    owners: HashMap<Arc<str>, Option<Workload>>,
    /// ReplicaSet and Job uid → the pods whose workload is resolved through it.
    pods_by_owner: HashMap<Arc<str>, Vec<Arc<str>>>,
    namespace_names: HashMap<Arc<str>, Arc<str>>,
    /// By namespace name: the pods of a namespace are looked up by its name.
    namespace_labels: HashMap<Arc<str>, Labels>,
    /// Names of deleted namespaces, and when: their labels stay for the grace period (their
    /// pods' late flows still join), unless a namespace of the same name replaced them.
    namespaces_deleted: Vec<(Arc<str>, u64)>,
    slices: HashMap<Arc<str>, SliceRecord>,
    /// The Services of a pod (by uid) and of an address listed without a pod, sorted by name.
    pod_memberships: HashMap<Arc<str>, Vec<Membership>>,
    address_memberships: HashMap<IpAddr, Vec<Membership>>,
    static_entries: PrefixTable,
}

impl MetadataIndex {
    pub fn new(settings: &IndexSettings) -> Self {
        Self {
            label_keys: settings.label_keys.iter().cloned().collect(),
            deleted_grace_nanos: u64::try_from(settings.deleted_grace.as_nanos())
                .unwrap_or(u64::MAX),
            interner: Interner::default(),
            tenancies: HashMap::default(),
            placements: HashMap::default(),
            owners: HashMap::default(),
            pods_by_owner: HashMap::default(),
            namespace_names: HashMap::default(),
            namespace_labels: HashMap::default(),
            namespaces_deleted: Vec::new(),
            slices: HashMap::default(),
            pod_memberships: HashMap::default(),
            address_memberships: HashMap::default(),
            static_entries: PrefixTable::default(),
        }
    }

    /// Replaces the entries of the static metadata file.
    pub fn set_static_entries(&mut self, entries: PrefixTable) {
        self.static_entries = entries;
    }

    /// What was at `address` (and `port`, for hostNetwork pods and containers) at
    /// `at_unix_nanos`.
    pub fn lookup(
        &self,
        address: IpAddr,
        port: u16,
        at_unix_nanos: u64,
    ) -> Option<EndpointMetadata<'_>> {
        let holder = self.tenancies.get(&address).and_then(|tenancies| {
            tenancies
                .iter()
                .filter(|t| t.valid_at(at_unix_nanos) && t.holder.explains_port(port))
                .min_by_key(|t| (t.holder.rank(), Reverse(t.valid_from)))
        });
        if let Some(tenancy) = holder {
            return Some(self.describe(&tenancy.holder, port));
        }
        let listed = self.address_memberships.get(&address);
        if let Some(membership) = serving(listed.map_or(&[], Vec::as_slice), port) {
            return Some(EndpointMetadata {
                namespace: Some(&membership.namespace),
                service_name: Some(&membership.service),
                ..EndpointMetadata::default()
            });
        }
        self.static_entries.longest_match(address)
    }

    fn describe<'a>(&'a self, holder: &'a Holder, port: u16) -> EndpointMetadata<'a> {
        match holder {
            Holder::Service(service) => EndpointMetadata {
                namespace: Some(&service.namespace),
                service_name: Some(&service.name),
                ..EndpointMetadata::default()
            },
            Holder::Node(name) => EndpointMetadata {
                node_name: Some(name),
                ..EndpointMetadata::default()
            },
            Holder::Pod(pod) | Holder::HostNetworkPod(pod) => {
                let workload = pod.workload.as_ref();
                EndpointMetadata {
                    pod_name: Some(&pod.name),
                    host_network: matches!(holder, Holder::HostNetworkPod(_)),
                    namespace: Some(&pod.namespace),
                    node_name: pod.node_name.as_deref(),
                    workload_kind: workload.map(|w| &*w.kind),
                    workload_name: workload.map(|w| &*w.name),
                    service_name: serving(&pod.services, port).map(|m| &*m.service),
                    container_name: pod.container_for(port),
                    labels: &pod.labels,
                    namespace_labels: self
                        .namespace_labels
                        .get(&pod.namespace)
                        .map_or(&[], |labels| labels),
                }
            }
        }
    }

    fn resolve(&self, controller: Option<&Controller>) -> Option<Workload> {
        let controller = controller?;
        if !controller.resolve_through_owner {
            return Some(controller.itself.clone());
        }
        Some(match self.owners.get(&controller.uid) {
            Some(Some(owner)) => owner.clone(),
            Some(None) => controller.itself.clone(),
            None => controller.if_owner_unknown.clone(),
        })
    }

    fn services_of(&self, pod_uid: &str) -> Box<[Membership]> {
        self.pod_memberships
            .get(pod_uid)
            .map_or_else(Box::default, |listed| listed.as_slice().into())
    }

    /// Resolves the workload and Services of pod `uid` again, in the tenancies it holds now
    /// (those of a deleted pod keep what they had).
    fn refresh_pod(&mut self, uid: &str) {
        let Some(placement) = self.placements.get(uid) else {
            return;
        };
        let addresses = placement.addresses.clone();
        let current = addresses
            .first()
            .and_then(|address| self.tenancies.get(address)?.open(uid));
        let Some(Holder::Pod(current) | Holder::HostNetworkPod(current)) =
            current.map(|t| &t.holder)
        else {
            return;
        };
        let mut record = PodRecord::clone(current);
        record.workload = self.resolve(record.controller.as_ref());
        record.services = self.services_of(uid);
        let record = Arc::new(record);
        for address in addresses {
            let open = self
                .tenancies
                .get_mut(&address)
                .and_then(|tenancies| tenancies.open_mut(uid));
            if let Some(Holder::Pod(pod) | Holder::HostNetworkPod(pod)) =
                open.map(|t| &mut t.holder)
            {
                *pod = record.clone();
            }
        }
    }

    fn refresh_pods_of_owner(&mut self, owner_uid: &str) {
        let pods = self
            .pods_by_owner
            .get(owner_uid)
            .cloned()
            .unwrap_or_default();
        for pod in pods {
            self.refresh_pod(&pod);
        }
    }

    /// Records that pod `pod_uid` resolves its workload through `owner_uid`.
    fn link_owner(&mut self, pod_uid: &Arc<str>, owner_uid: Option<Arc<str>>) {
        let placement = self.placements.entry(pod_uid.clone()).or_default();
        if placement.owner_uid == owner_uid {
            return;
        }
        let previous = std::mem::replace(&mut placement.owner_uid, owner_uid.clone());
        if let Some(previous) = previous {
            self.unlink_owner(pod_uid, &previous);
        }
        if let Some(owner_uid) = owner_uid {
            self.pods_by_owner
                .entry(owner_uid)
                .or_default()
                .push(pod_uid.clone());
        }
    }

    fn unlink_owner(&mut self, pod_uid: &str, owner_uid: &str) {
        if let Some(pods) = self.pods_by_owner.get_mut(owner_uid) {
            pods.retain(|pod| &**pod != pod_uid);
            if pods.is_empty() {
                self.pods_by_owner.remove(owner_uid);
            }
        }
    }

    /// Applies one change, which happened at `at_unix_nanos`.
    pub fn apply(&mut self, event: MetadataEvent, at_unix_nanos: u64) {
        match event {
            MetadataEvent::Pod(pod) => self.upsert_pod(pod, at_unix_nanos),
            MetadataEvent::Service(service) => {
                let uid = self.interner.text(&service.uid);
                let holder = Holder::Service(Arc::new(ServiceRecord {
                    namespace: self.interner.text(&service.namespace),
                    name: self.interner.text(&service.name),
                }));
                self.place(
                    uid,
                    service.cluster_ips,
                    service.created_unix_nanos,
                    holder,
                    at_unix_nanos,
                );
            }
            MetadataEvent::Node(node) => {
                let uid = self.interner.text(&node.uid);
                let holder = Holder::Node(self.interner.text(&node.name));
                self.place(
                    uid,
                    node.addresses,
                    node.created_unix_nanos,
                    holder,
                    at_unix_nanos,
                );
            }
            MetadataEvent::EndpointSlice(slice) => self.upsert_slice(slice),
            MetadataEvent::Namespace(namespace) => {
                let uid = self.interner.text(&namespace.uid);
                let name = self.interner.text(&namespace.name);
                let labels = self.allowed_labels(namespace.labels);
                self.namespace_labels.insert(name.clone(), labels);
                self.namespace_names.insert(uid, name);
            }
            MetadataEvent::Owner(owner) => {
                let uid = self.interner.text(&owner.uid);
                let controller = owner.controller.map(|c| Workload {
                    kind: self.interner.text(&c.kind),
                    name: self.interner.text(&c.name),
                });
                if self.owners.get(&uid) != Some(&controller) {
                    self.owners.insert(uid.clone(), controller);
                    self.refresh_pods_of_owner(&uid);
                }
            }
            MetadataEvent::Deleted { kind, uid } => self.delete(kind, &uid, at_unix_nanos),
        }
    }

    fn delete(&mut self, kind: ObjectKind, uid: &str, at: u64) {
        match kind {
            ObjectKind::Pod | ObjectKind::Service | ObjectKind::Node => {
                if let Some((uid, placement)) = self.placements.remove_entry(uid) {
                    for address in placement.addresses {
                        self.close(address, &uid, at);
                    }
                    if let Some(owner_uid) = placement.owner_uid {
                        self.unlink_owner(&uid, &owner_uid);
                    }
                }
            }
            ObjectKind::EndpointSlice => {
                for pod in self.remove_slice_members(uid) {
                    self.refresh_pod(&pod);
                }
            }
            ObjectKind::Namespace => {
                // The labels go with the grace period (see `purge`): a relist may also bring
                // the deletion of a namespace after its successor of the same name.
                if let Some(name) = self.namespace_names.remove(uid) {
                    self.namespaces_deleted.push((name, at));
                }
            }
            ObjectKind::ReplicaSet | ObjectKind::Job => {
                if self.owners.remove(uid).is_some() {
                    self.refresh_pods_of_owner(uid);
                }
            }
        }
    }

    fn upsert_pod(&mut self, pod: PodInfo, at: u64) {
        let interner = &mut self.interner;
        let controller = pod.controller.map(|c| {
            let itself = Workload {
                kind: interner.text(&c.kind),
                name: interner.text(&c.name),
            };
            let template_hash = pod
                .labels
                .iter()
                .find(|(key, _)| key == "pod-template-hash")
                .map(|(_, value)| value.as_str());
            let if_owner_unknown = match deployment_of_replica_set(&c.kind, &c.name, template_hash)
            {
                Some(deployment) => Workload {
                    kind: interner.text("Deployment"),
                    name: interner.text(deployment),
                },
                None => itself.clone(),
            };
            Controller {
                uid: interner.text(&c.uid),
                resolve_through_owner: c.kind == "ReplicaSet" || c.kind == "Job",
                itself,
                if_owner_unknown,
            }
        });
        let container_ports = pod
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().map(move |port| (*port, &c.name)))
            .map(|(port, name)| (port, interner.text(name)))
            .collect();
        let sole_container = match pod.containers.as_slice() {
            [only] => Some(interner.text(&only.name)),
            _ => None,
        };
        let uid = interner.text(&pod.uid);
        let name = interner.text(&pod.name);
        let namespace = interner.text(&pod.namespace);
        let node_name = pod.node_name.as_deref().map(|n| interner.text(n));
        let owner_uid = controller
            .as_ref()
            .filter(|c| c.resolve_through_owner)
            .map(|c| c.uid.clone());
        self.link_owner(&uid, owner_uid);
        let record = Arc::new(PodRecord {
            name,
            namespace,
            node_name,
            workload: self.resolve(controller.as_ref()),
            controller,
            services: self.services_of(&uid),
            container_ports,
            sole_container,
            labels: self.allowed_labels(pod.labels),
        });
        let holder = if pod.host_network {
            Holder::HostNetworkPod(record)
        } else {
            Holder::Pod(record)
        };
        self.place(
            uid,
            pod.addresses,
            pod.addressed_since_unix_nanos,
            holder,
            at,
        );
    }

    fn allowed_labels(&mut self, labels: Vec<(String, String)>) -> Labels {
        let mut allowed: Vec<(Arc<str>, Arc<str>)> = labels
            .into_iter()
            .filter(|(key, _)| self.label_keys.contains(key))
            .map(|(key, value)| (self.interner.text(&key), self.interner.text(&value)))
            .collect();
        allowed.sort();
        self.interner.labels(allowed)
    }

    /// Makes `holder` (object `uid`) hold exactly `addresses` from `at` on.
    fn place(
        &mut self,
        uid: Arc<str>,
        addresses: Vec<IpAddr>,
        created: Option<u64>,
        holder: Holder,
        at: u64,
    ) {
        let placement = self.placements.entry(uid.clone()).or_default();
        let first_from = if placement.ever_addressed {
            at
        } else {
            created.unwrap_or(at)
        };
        placement.ever_addressed |= !addresses.is_empty();
        let previous = std::mem::replace(&mut placement.addresses, addresses.clone());
        for gone in previous.into_iter().filter(|a| !addresses.contains(a)) {
            self.close(gone, &uid, at);
        }
        let tenancy = |valid_from| Tenancy {
            holder_uid: uid.clone(),
            valid_from,
            valid_until: None,
            holder: holder.clone(),
        };
        for address in addresses {
            let Some(tenancies) = self.tenancies.get_mut(&address) else {
                let first = tenancy(first_from);
                self.tenancies.insert(
                    address,
                    Tenancies {
                        first,
                        more: Vec::new(),
                    },
                );
                continue;
            };
            if let Some(open) = tenancies.open_mut(&uid) {
                open.holder = holder.clone();
                continue;
            }
            let released = tenancies
                .iter()
                .filter(|t| holder.exclusive() && t.holder.exclusive())
                .filter_map(|t| t.valid_until)
                .max()
                .unwrap_or(0);
            tenancies.more.push(tenancy(first_from.max(released)));
        }
    }

    fn close(&mut self, address: IpAddr, uid: &str, at: u64) {
        let open = self
            .tenancies
            .get_mut(&address)
            .and_then(|tenancies| tenancies.open_mut(uid));
        if let Some(tenancy) = open {
            tenancy.valid_until = Some(at.max(tenancy.valid_from));
        }
    }

    fn upsert_slice(&mut self, slice: EndpointSliceInfo) {
        let mut affected = self.remove_slice_members(&slice.uid);
        let slice_uid = self.interner.text(&slice.uid);
        let membership = Membership {
            slice_uid: slice_uid.clone(),
            namespace: self.interner.text(&slice.namespace),
            service: self.interner.text(&slice.service_name),
            ports: Arc::from(slice.ports),
        };
        let mut record = SliceRecord {
            pods: Vec::new(),
            addresses: Vec::new(),
        };
        for endpoint in slice.endpoints {
            match endpoint {
                EndpointTarget::Pod { uid } => {
                    let uid = self.interner.text(&uid);
                    join(&mut self.pod_memberships, uid.clone(), &membership);
                    record.pods.push(uid);
                }
                EndpointTarget::Address(address) => {
                    join(&mut self.address_memberships, address, &membership);
                    record.addresses.push(address);
                }
            }
        }
        affected.extend(record.pods.iter().cloned());
        self.slices.insert(slice_uid, record);
        affected.sort();
        affected.dedup();
        for pod in affected {
            self.refresh_pod(&pod);
        }
    }

    /// Forgets what slice `slice_uid` listed; returns the pods it listed.
    fn remove_slice_members(&mut self, slice_uid: &str) -> Vec<Arc<str>> {
        let Some(slice) = self.slices.remove(slice_uid) else {
            return Vec::new();
        };
        for uid in &slice.pods {
            leave(&mut self.pod_memberships, uid.clone(), slice_uid);
        }
        for address in slice.addresses {
            leave(&mut self.address_memberships, address, slice_uid);
        }
        slice.pods
    }

    /// Forgets tenancies that ended more than the grace period before `now_unix_nanos`, and
    /// strings nothing uses any more.
    pub fn purge(&mut self, now_unix_nanos: u64) {
        let grace = self.deleted_grace_nanos;
        self.tenancies.retain(|_, tenancies| {
            tenancies.retain(|t| {
                t.valid_until
                    .is_none_or(|until| until.saturating_add(grace) > now_unix_nanos)
            })
        });
        let (names, labels) = (&self.namespace_names, &mut self.namespace_labels);
        self.namespaces_deleted.retain(|(name, deleted)| {
            if deleted.saturating_add(grace) > now_unix_nanos {
                return true;
            }
            if !names.values().any(|live| live == name) {
                labels.remove(name);
            }
            false
        });
        self.interner.collect_garbage();
    }
}

/// Of the Services listed, the first (by name) whose slice has `port`, else the first.
fn serving(memberships: &[Membership], port: u16) -> Option<&Membership> {
    memberships
        .iter()
        .find(|m| m.ports.contains(&port))
        .or(memberships.first())
}

fn join<K: Hash + Eq>(
    memberships: &mut HashMap<K, Vec<Membership>>,
    member: K,
    membership: &Membership,
) {
    let list = memberships.entry(member).or_default();
    let at = list.partition_point(|m| m.service <= membership.service);
    list.insert(at, membership.clone());
}

fn leave<K: Hash + Eq>(memberships: &mut HashMap<K, Vec<Membership>>, member: K, slice_uid: &str) {
    if let Some(list) = memberships.get_mut(&member) {
        list.retain(|m| &*m.slice_uid != slice_uid);
        if list.is_empty() {
            memberships.remove(&member);
        }
    }
}

/// The Deployment that named ReplicaSet `name` `<deployment>-<pod-template-hash>`, when the
/// pod's `pod-template-hash` label confirms the suffix.
fn deployment_of_replica_set<'a>(
    kind: &str,
    name: &'a str,
    template_hash: Option<&str>,
) -> Option<&'a str> {
    let hash = template_hash.filter(|hash| !hash.is_empty())?;
    if kind != "ReplicaSet" {
        return None;
    }
    name.strip_suffix(hash)?
        .strip_suffix('-')
        .filter(|deployment| !deployment.is_empty())
}

/// The index shared by the tasks that update it and those that look up flows. Writers hold the
/// lock for one event (mapping API objects happens before), so a lookup waits microseconds,
/// never for the API server — except behind the purge every 30 s, which walks every address
/// and interned string under the lock (its time grows with what the index holds; not measured
/// yet).
#[derive(Debug, Clone)]
pub struct SharedIndex(Arc<RwLock<MetadataIndex>>);

impl SharedIndex {
    pub fn new(index: MetadataIndex) -> Self {
        Self(Arc::new(RwLock::new(index)))
    }

    /// For looking up both sides of many flows under one lock.
    pub fn read(&self) -> RwLockReadGuard<'_, MetadataIndex> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn apply(&self, event: MetadataEvent, at_unix_nanos: u64) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(event, at_unix_nanos);
    }

    pub fn purge(&self, now_unix_nanos: u64) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .purge(now_unix_nanos);
    }
}
