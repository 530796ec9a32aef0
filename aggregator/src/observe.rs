//! The observe feed: every consolidated flow the shards emit (once its checkpoint is durable),
//! kept in a bounded ring for `--last N` and broadcast to live observers, each seen as a
//! `mermin.admin.v1.ObservedFlow` named from the metadata index — and the server-side filters
//! observers ask for.
//!
//! Nothing here ever makes a shard wait: [`ObserveHub::publish`] appends to the ring (dropping
//! its oldest) and broadcasts into a bounded channel that never blocks the sender. An observer
//! that falls behind loses the flows it missed, counted as
//! `observe_flows_dropped{reason="slow_observer"}`.
//!
//! **Named when seen.** The ring keeps the emitted intervals as the shards made them, and a
//! flow becomes an `ObservedFlow` only when someone sees it: the live feed builds it at
//! publication, and only while someone watches; `--last N` builds the ring's flows when it is
//! asked, both ends named from the index as of the flow's start (the index answers for past
//! times: a deleted pod stays joinable for `metadata { deleted_grace }`, 5 min, after its
//! deletion; a flow read later than that shows such an end by address only). Building every
//! flow as it was emitted cost ~6% of the aggregator's CPU (BENCHMARKS.md).

use std::{
    collections::VecDeque,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use mermin_protocol::{
    admin::v1::{Endpoint, ObserveRequest, ObservedFlow},
    flow::v1::EndReason,
};
use tokio::sync::broadcast;

use crate::{
    flow_table::Emitted,
    metadata::{MetadataIndex, SharedIndex, static_file},
    metrics::{Metrics, ReasonLabel},
    stitch::Side,
};

/// Flows a live observer may fall behind by before it loses some.
const LIVE_CAPACITY: usize = 1024;

/// Ring flows a `--last` names under one hold of the index's lock.
const NAMED_PER_LOCK: usize = 256;

/// The feed (cheap to clone).
#[derive(Clone)]
pub struct ObserveHub {
    inner: Arc<Hub>,
}

struct Hub {
    /// The newest flows, oldest first; at most `capacity`.
    ring: Mutex<VecDeque<Arc<Emitted>>>,
    capacity: usize,
    live: broadcast::Sender<Arc<ObservedFlow>>,
    /// Names both ends of a flow when it is seen.
    index: SharedIndex,
    metrics: Arc<Metrics>,
}

impl ObserveHub {
    /// A feed keeping the last `ring_capacity` flows (0: none, live observers only), naming
    /// their ends from `index`.
    pub fn new(ring_capacity: usize, index: SharedIndex, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Hub {
                ring: Mutex::new(VecDeque::with_capacity(ring_capacity.min(LIVE_CAPACITY))),
                capacity: ring_capacity,
                live: broadcast::channel(LIVE_CAPACITY).0,
                index,
                metrics,
            }),
        }
    }

    /// Whether anyone can see a published flow (the ring keeps flows, or someone watches): if
    /// not, shards need not keep them.
    pub fn wanted(&self) -> bool {
        self.inner.capacity > 0 || self.inner.live.receiver_count() > 0
    }

    /// Adds flows to the ring and sends them, named, to the live observers. Never waits.
    pub fn publish(&self, flows: Vec<Emitted>) {
        let mut ring = self.inner.ring.lock().unwrap_or_else(|e| e.into_inner());
        // Under the ring's lock, so that a new watch sees each flow exactly once: in its
        // snapshot or live.
        if self.inner.live.receiver_count() > 0 {
            let index = self.inner.index.read();
            for flow in &flows {
                // An error only means the last observer has just gone.
                let _ = self.inner.live.send(Arc::new(observed(flow, &index)));
            }
        }
        if self.inner.capacity == 0 {
            return;
        }
        let kept = flows.len().min(self.inner.capacity);
        let evicted = (ring.len() + kept).saturating_sub(self.inner.capacity);
        ring.drain(..evicted);
        let skipped = flows.len() - kept;
        ring.extend(flows.into_iter().skip(skipped).map(Arc::new));
    }

    /// The last `last` flows of the ring that match `filter` (oldest first), named now, and,
    /// with `follow`, the live flows published after them.
    pub fn watch(&self, filter: &FlowFilter, last: usize, follow: bool) -> Watch {
        let (kept, live) = {
            let ring = self.inner.ring.lock().unwrap_or_else(|e| e.into_inner());
            let kept: Vec<Arc<Emitted>> = ring.iter().cloned().collect();
            (kept, follow.then(|| self.inner.live.subscribe()))
        };
        // Named outside the ring's lock, newest first, the index held for a few hundred flows
        // at a time: a metadata update waits for no more than that, nor do the shards behind it.
        let mut recent: Vec<ObservedFlow> = Vec::new();
        'named: for chunk in kept.rchunks(NAMED_PER_LOCK) {
            let index = self.inner.index.read();
            for flow in chunk.iter().rev() {
                if recent.len() == last {
                    break 'named;
                }
                let flow = observed(flow, &index);
                if filter.matches(&flow) {
                    recent.push(flow);
                }
            }
        }
        recent.reverse();
        Watch {
            recent,
            live,
            metrics: self.inner.metrics.clone(),
        }
    }
}

/// What one observer gets: a snapshot, then (if it follows) the live feed.
pub struct Watch {
    pub recent: Vec<ObservedFlow>,
    live: Option<broadcast::Receiver<Arc<ObservedFlow>>>,
    metrics: Arc<Metrics>,
}

impl Watch {
    /// The next live flow; `None` when not following (or the feed is gone). Flows this observer
    /// fell too far behind to see are counted, and it goes on with the oldest it still can.
    pub async fn next_live(&mut self) -> Option<Arc<ObservedFlow>> {
        let live = self.live.as_mut()?;
        loop {
            match live.recv().await {
                Ok(flow) => return Some(flow),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    self.metrics
                        .observe_dropped
                        .get_or_create(&ReasonLabel {
                            reason: "slow_observer".into(),
                        })
                        .inc_by(missed);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// One emitted interval as observers see it, both ends named from `index` as of the flow's
/// start.
pub fn observed(emitted: &Emitted, index: &MetadataIndex) -> ObservedFlow {
    let flow = &emitted.flow;
    let end = |side: &Side| {
        let mut end = Endpoint {
            address: match side.address {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            },
            port: u32::from(side.port),
            ..Endpoint::default()
        };
        if let Some(known) = index.lookup(side.address, side.port, flow.start_unix_nanos) {
            let text = |value: Option<&str>| value.unwrap_or_default().to_owned();
            end.namespace = text(known.namespace);
            end.pod = text(known.pod_name);
            end.workload = text(known.workload_name);
            end.workload_kind = text(known.workload_kind);
            end.node = text(known.node_name);
            end.service = text(known.service_name);
        }
        end
    };
    let counts = |measured: &Option<crate::stitch::Measured>| {
        measured.as_ref().map_or((0, 0), |m| (m.bytes, m.packets))
    };
    let (sent_bytes, sent_packets) = counts(&flow.client_to_server);
    let (received_bytes, received_packets) = counts(&flow.server_to_client);
    let mut nodes: Vec<&str> = flow.points.iter().map(|p| p.node.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    ObservedFlow {
        client: Some(end(&flow.client)),
        server: Some(end(&flow.server)),
        ip_protocol: u32::from(flow.key.protocol),
        start_unix_nanos: flow.start_unix_nanos,
        end_unix_nanos: flow.end_unix_nanos,
        interval: emitted.interval.index,
        sent_bytes,
        sent_packets,
        received_bytes,
        received_packets,
        end_reason: flow.end_reason as i32,
        community_id: flow.key.community_id(0),
        client_rule: flow.client_rule.as_str().to_owned(),
        observed_at_nodes: nodes.into_iter().map(str::to_owned).collect(),
        observation_points: flow.points.len() as u32,
    }
}

/// An observer's filters (see `ObserveRequest`): all that are given must match; within one,
/// any value; a filter on ends matches when either end does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlowFilter {
    namespaces: Vec<String>,
    /// `(namespace, pod)`; the namespace only where the filter gave one.
    pods: Vec<(Option<String>, String)>,
    workloads: Vec<String>,
    nodes: Vec<String>,
    networks: Vec<ipnet::IpNet>,
    ports: Vec<u32>,
    protocols: Vec<u32>,
    end_reasons: Vec<EndReason>,
    min_bytes: u64,
}

impl TryFrom<&ObserveRequest> for FlowFilter {
    /// What is wrong with the request, naming the field.
    type Error = String;

    fn try_from(request: &ObserveRequest) -> Result<Self, String> {
        let networks = request
            .address
            .iter()
            .map(|text| {
                static_file::network(text).map_err(|why| format!("address {text:?}: {why}"))
            })
            .collect::<Result<_, _>>()?;
        let end_reasons = request
            .end_reason
            .iter()
            .map(|&value| {
                EndReason::try_from(value)
                    .map_err(|_| format!("end_reason {value} is not a known reason"))
            })
            .collect::<Result<_, _>>()?;
        let pods = request
            .pod
            .iter()
            .map(|pod| match pod.split_once('/') {
                Some((namespace, pod)) => (Some(namespace.to_owned()), pod.to_owned()),
                None => (None, pod.clone()),
            })
            .collect();
        Ok(Self {
            namespaces: request.namespace.clone(),
            pods,
            workloads: request.workload.clone(),
            nodes: request.node.clone(),
            networks,
            ports: request.port.clone(),
            protocols: request.ip_protocol.clone(),
            end_reasons,
            min_bytes: request.min_bytes,
        })
    }
}

impl FlowFilter {
    pub fn matches(&self, flow: &ObservedFlow) -> bool {
        let ends: Vec<&Endpoint> = flow.client.iter().chain(flow.server.iter()).collect();
        let any_end = |test: &dyn Fn(&Endpoint) -> bool| ends.iter().any(|end| test(end));
        let given = |values: &[String], test: &dyn Fn(&str) -> bool| {
            values.is_empty() || values.iter().any(|v| test(v))
        };
        given(&self.namespaces, &|ns| any_end(&|e| e.namespace == ns))
            && (self.pods.is_empty()
                || self.pods.iter().any(|(namespace, pod)| {
                    any_end(&|e| {
                        e.pod == *pod && namespace.as_ref().is_none_or(|ns| e.namespace == *ns)
                    })
                }))
            && given(&self.workloads, &|w| any_end(&|e| e.workload == w))
            && given(&self.nodes, &|node| {
                any_end(&|e| e.node == node) || flow.observed_at_nodes.iter().any(|n| n == node)
            })
            && (self.networks.is_empty()
                || self.networks.iter().any(|network| {
                    any_end(&|e| {
                        mermin_protocol::json::address(&e.address)
                            .is_some_and(|a| network.contains(&a))
                    })
                }))
            && (self.ports.is_empty() || self.ports.iter().any(|p| any_end(&|e| e.port == *p)))
            && (self.protocols.is_empty() || self.protocols.contains(&flow.ip_protocol))
            && (self.end_reasons.is_empty() || self.end_reasons.contains(&flow.end_reason()))
            && flow.sent_bytes.saturating_add(flow.received_bytes) >= self.min_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(client_ns: &str, server_port: u32, bytes: u64) -> ObservedFlow {
        ObservedFlow {
            client: Some(Endpoint {
                address: vec![10, 0, 0, 1],
                port: 40_000,
                namespace: client_ns.into(),
                pod: "web-1".into(),
                ..Endpoint::default()
            }),
            server: Some(Endpoint {
                address: vec![10, 1, 0, 2],
                port: server_port,
                namespace: "backend".into(),
                pod: "api-0".into(),
                node: "node-b".into(),
                ..Endpoint::default()
            }),
            ip_protocol: 6,
            sent_bytes: bytes,
            end_reason: EndReason::TcpClose as i32,
            observed_at_nodes: vec!["node-a".into()],
            ..ObservedFlow::default()
        }
    }

    fn filter(request: ObserveRequest) -> FlowFilter {
        FlowFilter::try_from(&request).unwrap()
    }

    #[test]
    fn each_filter_matches_either_end() {
        let f = flow("frontend", 443, 500);
        let yes = |r: ObserveRequest| assert!(filter(r.clone()).matches(&f), "{r:?}");
        let no = |r: ObserveRequest| assert!(!filter(r.clone()).matches(&f), "{r:?}");
        yes(ObserveRequest::default());
        yes(ObserveRequest {
            namespace: vec!["backend".into()],
            ..Default::default()
        });
        no(ObserveRequest {
            namespace: vec!["kube-system".into()],
            ..Default::default()
        });
        yes(ObserveRequest {
            pod: vec!["frontend/web-1".into()],
            ..Default::default()
        });
        no(ObserveRequest {
            pod: vec!["backend/web-1".into()],
            ..Default::default()
        });
        yes(ObserveRequest {
            node: vec!["node-a".into(), "node-x".into()],
            ..Default::default()
        });
        yes(ObserveRequest {
            node: vec!["node-b".into()],
            ..Default::default()
        });
        yes(ObserveRequest {
            address: vec!["10.1.0.0/16".into()],
            ..Default::default()
        });
        no(ObserveRequest {
            address: vec!["10.2.0.0/16".into()],
            ..Default::default()
        });
        yes(ObserveRequest {
            port: vec![443],
            ip_protocol: vec![6],
            end_reason: vec![EndReason::TcpClose as i32],
            min_bytes: 500,
            ..Default::default()
        });
        no(ObserveRequest {
            min_bytes: 501,
            ..Default::default()
        });
        no(ObserveRequest {
            namespace: vec!["frontend".into()],
            ip_protocol: vec![17],
            ..Default::default()
        });
    }

    #[test]
    fn bad_filters_name_the_field() {
        let bad = |r: ObserveRequest| FlowFilter::try_from(&r).unwrap_err();
        assert_eq!(
            bad(ObserveRequest {
                address: vec!["10.0.0.1/8".into()],
                ..Default::default()
            }),
            "address \"10.0.0.1/8\": host bits are set (the network is 10.0.0.0/8)"
        );
        assert_eq!(
            bad(ObserveRequest {
                end_reason: vec![42],
                ..Default::default()
            }),
            "end_reason 42 is not a known reason"
        );
    }

    /// The fixture flow with `bytes` sent, as a shard emits it.
    fn emitted(bytes: u64) -> Emitted {
        let mut flow = crate::stitch::fixtures::flow();
        flow.client_to_server.as_mut().unwrap().bytes = bytes;
        Emitted {
            flow,
            interval: crate::flow_table::Interval {
                connection_start_unix_nanos: 1_000,
                index: 0,
            },
        }
    }

    /// The fixture's client pod, addressed since before the flow began.
    fn web_pod() -> crate::metadata::MetadataEvent {
        crate::metadata::MetadataEvent::Pod(crate::metadata::index::PodInfo {
            uid: "u-web".into(),
            namespace: "frontend".into(),
            name: "web-7c9".into(),
            node_name: Some("node-c".into()),
            addressed_since_unix_nanos: Some(0),
            addresses: vec!["10.0.1.5".parse().unwrap()],
            host_network: false,
            controller: None,
            labels: Vec::new(),
            containers: Vec::new(),
        })
    }

    fn empty_index() -> SharedIndex {
        SharedIndex::new(MetadataIndex::new(
            &crate::metadata::IndexSettings::default(),
        ))
    }

    /// An index naming the fixture's client pod.
    fn index() -> SharedIndex {
        let index = empty_index();
        index.apply(web_pod(), 0);
        index
    }

    fn sent(flows: &[ObservedFlow]) -> Vec<u64> {
        flows.iter().map(|f| f.sent_bytes).collect()
    }

    #[tokio::test]
    async fn the_ring_keeps_the_newest_and_a_watch_sees_each_flow_once() {
        let metrics = Arc::new(Metrics::new());
        let hub = ObserveHub::new(3, index(), metrics.clone());
        // More than the ring holds at once, then one at a time.
        hub.publish((1..=5).map(emitted).collect());
        let all = FlowFilter::default();
        let mut watch = hub.watch(&all, 10, true);
        assert_eq!(sent(&watch.recent), vec![3, 4, 5]);
        assert_eq!(sent(&hub.watch(&all, 2, false).recent), vec![4, 5]);
        hub.publish(vec![emitted(6)]);
        let live = watch.next_live().await.unwrap();
        assert_eq!(live.sent_bytes, 6);
        assert_eq!(sent(&hub.watch(&all, 10, false).recent), vec![4, 5, 6]);
        assert!(hub.watch(&all, 1, false).next_live().await.is_none());
        // A batch into a ring partly filled: only as many of the oldest go as must.
        let partly = ObserveHub::new(3, index(), metrics.clone());
        partly.publish(vec![emitted(1), emitted(2)]);
        partly.publish(vec![emitted(3), emitted(4)]);
        assert_eq!(sent(&partly.watch(&all, 10, false).recent), vec![2, 3, 4]);
        // Named both ways: the ring's flows when read, the live ones when published.
        let client = |flow: &ObservedFlow| {
            let end = flow.client.as_ref().unwrap();
            (end.namespace.clone(), end.pod.clone(), end.port)
        };
        let named = ("frontend".to_owned(), "web-7c9".to_owned(), 51_000);
        assert_eq!(client(&watch.recent[0]), named);
        assert_eq!(client(&live), named);
        assert_eq!(live.server.as_ref().unwrap().pod, "");
    }

    #[tokio::test]
    async fn the_ring_names_a_flow_from_the_index_when_it_is_read() {
        let metrics = Arc::new(Metrics::new());
        let index = empty_index();
        let hub = ObserveHub::new(10, index.clone(), metrics);
        hub.publish(vec![emitted(7)]);
        let pod = |hub: &ObserveHub| {
            let recent = hub.watch(&FlowFilter::default(), 1, false).recent;
            recent[0].client.as_ref().unwrap().pod.clone()
        };
        assert_eq!(pod(&hub), "");
        // The pod becomes known after the flow was emitted (as of the flow's start).
        index.apply(web_pod(), 2_000);
        assert_eq!(pod(&hub), "web-7c9");
        // Filters see the names too.
        let frontend = filter(ObserveRequest {
            namespace: vec!["frontend".into()],
            ..Default::default()
        });
        assert_eq!(sent(&hub.watch(&frontend, 10, false).recent), vec![7]);
    }

    #[tokio::test]
    async fn a_slow_observer_loses_flows_counted_and_never_blocks_the_feed() {
        let metrics = Arc::new(Metrics::new());
        let hub = ObserveHub::new(0, index(), metrics.clone());
        let mut watch = hub.watch(&FlowFilter::default(), 0, true);
        let extra = 10;
        hub.publish((0..LIVE_CAPACITY as u64 + extra).map(emitted).collect());
        assert_eq!(watch.next_live().await.unwrap().sent_bytes, extra);
        assert_eq!(
            Metrics::by_reason(&metrics.observe_dropped),
            [("slow_observer".to_owned(), extra)]
        );
    }
}
