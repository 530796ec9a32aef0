//! The admin API (`mermin.admin.v1.AdminService`) on its own port, beside gRPC health and
//! reflection: read-only views of this replica (status, connected agents, queues), the observe
//! stream, and the cluster operations.
//!
//! It owns no state: it reads the store's counters, the metrics, the sessions' [`Agents`] and
//! the [`ObserveHub`]. A replica of a cluster shows and changes its cluster through
//! [`ClusterAdmin`] (implemented by `cluster`); a single aggregator is a cluster of one (one
//! member, leader of every shard at term 0) whose operations answer FAILED_PRECONDITION with
//! [`NOT_REPLICATED`].

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use futures_util::future::BoxFuture;
use mermin_protocol::admin::v1::{
    AddMemberRequest, Agent, AgentsRequest, AgentsResponse, Cluster, DrainRequest, DrainResponse,
    Member, MembershipResponse, MetadataKind, MetadataSync, ObserveRequest, ObservedFlow, Outbox,
    QueuesRequest, QueuesResponse, ReasonCount, RemoveMemberRequest, Role, ShardPlacement,
    ShardQueue, ShardReplica, StatusRequest, StatusResponse, TransferLeaderRequest,
    TransferLeaderResponse,
    admin_service_server::{AdminService, AdminServiceServer},
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    clock::unix_now,
    export::split_entry,
    ingest::Agents,
    metadata::kube::WatchMetrics,
    metrics::{Metrics, ShardLabel},
    observe::{FlowFilter, ObserveHub},
    placement::{SHARDS, ShardId},
    store::Store,
};

/// What the cluster operations answer on a single aggregator.
pub const NOT_REPLICATED: &str =
    "replication is not configured: this aggregator is a single replica";

/// What `TransferLeader` answers on a replica.
pub const NO_TRANSFER: &str = "leadership cannot be handed to a chosen replica (openraft 0.9 has no \
     transfer): drain the leader, or restart it, and another replica leads within seconds";

/// What `AddMember` answers on a replica.
pub const JOIN_BY_ITSELF: &str = "replicas join by themselves: start one with the cluster's peer \
     list (replication.peers) and it asks to be admitted";

/// A replica's cluster as the admin API shows and changes it.
pub trait ClusterAdmin: Send + Sync + 'static {
    /// The members, and every shard's leader, term, lag and replicas, as this replica knows them.
    fn cluster(&self) -> Cluster;
    /// Takes the member `id` (as [`Cluster`] names it) out of the voters.
    fn remove_member(&self, id: &str) -> BoxFuture<'static, Result<(), Status>>;
    /// Takes this replica out of the voters: its leaderships move to the others, and it stops
    /// taking agents.
    fn drain(&self) -> BoxFuture<'static, Result<(), Status>>;
}

/// Flows an observe stream buffers towards its client before it falls behind the live feed.
const OBSERVE_BUFFER: usize = 64;

/// The admin service.
#[derive(Clone)]
pub struct Admin {
    pub started_unix_nanos: u64,
    pub data_dir: PathBuf,
    /// The agent endpoint: this replica's id and address in the cluster view.
    pub agent_endpoint: SocketAddr,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub agents: Agents,
    pub observe: ObserveHub,
    pub outbox_max_bytes: u64,
    /// The Kubernetes watchers' state, when the API is watched.
    pub kubernetes: Option<WatchMetrics>,
    /// Whether a static metadata file is loaded.
    pub static_metadata: bool,
    /// Turns true when the aggregator stops: follow streams end.
    pub stopping: watch::Receiver<bool>,
    /// The cluster this replica belongs to; `None`: a single aggregator.
    pub cluster: Option<Arc<dyn ClusterAdmin>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The admin port's router: the admin service, gRPC health (every service SERVING while the
/// aggregator runs) and reflection.
pub async fn routes(admin: Admin) -> Result<tonic::service::Routes, AdminError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServiceServer<Admin>>().await;
    // Only what this port serves is listed (the descriptor set holds the agent service too).
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mermin_protocol::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("mermin.admin.v1.AdminService")
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()?;
    Ok(tonic::service::Routes::new(AdminServiceServer::new(admin))
        .add_service(health_service)
        .add_service(reflection))
}

fn reasons(counts: Vec<(String, u64)>) -> Vec<ReasonCount> {
    counts
        .into_iter()
        .map(|(reason, count)| ReasonCount { reason, count })
        .collect()
}

impl Admin {
    /// The cluster, or FAILED_PRECONDITION on a single aggregator.
    fn replicated(&self) -> Result<&dyn ClusterAdmin, Status> {
        self.cluster
            .as_deref()
            .ok_or_else(|| Status::failed_precondition(NOT_REPLICATED))
    }

    fn self_id(&self) -> String {
        self.agent_endpoint.to_string()
    }

    fn metadata(&self) -> MetadataSync {
        let kinds = self.kubernetes.as_ref().map(WatchMetrics::kinds);
        MetadataSync {
            kubernetes: self.kubernetes.is_some(),
            static_file: self.static_metadata,
            kinds: kinds
                .unwrap_or_default()
                .into_iter()
                .map(|k| MetadataKind {
                    kind: k.kind.to_owned(),
                    synced: k.synced,
                    events: k.events,
                    watch_errors: k.watch_errors,
                    skipped_objects: k.skipped_objects,
                    last_event_unix_seconds: k.last_event_unix_seconds,
                })
                .collect(),
        }
    }

    /// The cluster: a replica's, or a single aggregator's (one member, leader of every shard at
    /// term 0).
    fn cluster(&self) -> Cluster {
        if let Some(cluster) = &self.cluster {
            return cluster.cluster();
        }
        let id = self.self_id();
        Cluster {
            self_id: id.clone(),
            members: vec![Member {
                id: id.clone(),
                address: id.clone(),
                leader_of_shards: u32::from(SHARDS),
            }],
            shards: (0..SHARDS)
                .map(|shard| ShardPlacement {
                    shard: u32::from(shard),
                    leader: id.clone(),
                    term: 0,
                    commit_lag: 0,
                    replicas: vec![ShardReplica {
                        member: id.clone(),
                        role: Role::Leader as i32,
                    }],
                })
                .collect(),
        }
    }

    /// The oldest queued request's first span end (0 if none or unreadable).
    fn oldest_span_end(&self) -> u64 {
        let Ok(oldest) = self.store.outbox_oldest(1) else {
            return 0;
        };
        oldest
            .into_iter()
            .next()
            .and_then(|(_, entry)| split_entry(entry))
            .and_then(|(_, request)| ExportTraceServiceRequest::decode(request).ok())
            .and_then(|request| {
                let spans = request.resource_spans.into_iter().next()?.scope_spans;
                Some(spans.into_iter().next()?.spans.first()?.end_time_unix_nano)
            })
            .unwrap_or(0)
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let now = unix_now();
        Ok(Response::new(StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: now.saturating_sub(self.started_unix_nanos) / 1_000_000_000,
            started_unix_nanos: self.started_unix_nanos,
            data_dir: self.data_dir.display().to_string(),
            store_write_failure: self.store.write_failure().unwrap_or_default(),
            shard_count: u32::from(SHARDS),
            cluster: Some(self.cluster()),
            metadata: Some(self.metadata()),
        }))
    }

    async fn agents(&self, _: Request<AgentsRequest>) -> Result<Response<AgentsResponse>, Status> {
        let agents = self
            .agents
            .snapshot(unix_now())
            .into_iter()
            .map(|a| Agent {
                node: a.node,
                agent_version: a.agent_version,
                boot_id: mermin_protocol::json::hex(&a.boot_id),
                connected_unix_nanos: a.connected_unix_nanos,
                last_acked_sequence: a.last_acked_sequence,
                lag_millis: a.lag_millis,
                records_per_second: a.records_per_second,
                reconnects: a.reconnects,
                records_accepted: a.records_accepted,
            })
            .collect();
        Ok(Response::new(AgentsResponse { agents }))
    }

    async fn queues(&self, _: Request<QueuesRequest>) -> Result<Response<QueuesResponse>, Status> {
        let gauge = |family: &prometheus_client::metrics::family::Family<ShardLabel, _>,
                     shard: ShardId| {
            let value: i64 = prometheus_client::metrics::gauge::Gauge::get(
                &family.get_or_create(&ShardLabel { shard }),
            );
            u64::try_from(value).unwrap_or(0)
        };
        let shards = (0..SHARDS)
            .map(|shard| ShardQueue {
                shard: u32::from(shard),
                mailbox_parts: gauge(&self.metrics.shard_mailbox_parts, shard),
                connections: gauge(&self.metrics.shard_connections, shard),
            })
            .collect();
        let oldest = self.oldest_span_end();
        Ok(Response::new(QueuesResponse {
            shards,
            outbox: Some(Outbox {
                requests: self.store.outbox_len() as u64,
                bytes: self.store.outbox_bytes(),
                max_bytes: self.outbox_max_bytes,
                oldest_span_end_unix_nanos: oldest,
                oldest_age_seconds: match oldest {
                    0 => 0,
                    oldest => unix_now().saturating_sub(oldest) / 1_000_000_000,
                },
            }),
            spans_rejected: reasons(Metrics::by_reason(&self.metrics.spans_rejected)),
            spans_dropped: reasons(Metrics::by_reason(&self.metrics.spans_dropped)),
            export_retries: self.metrics.export_retries.get(),
            observe_dropped: reasons(Metrics::by_reason(&self.metrics.observe_dropped)),
        }))
    }

    type ObserveStream = ReceiverStream<Result<ObservedFlow, Status>>;

    async fn observe(
        &self,
        request: Request<ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let request = request.into_inner();
        let filter = FlowFilter::try_from(&request).map_err(Status::invalid_argument)?;
        let mut watch = self
            .observe
            .watch(&filter, request.last as usize, request.follow);
        let (flows, receiver) = mpsc::channel(OBSERVE_BUFFER);
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            for flow in std::mem::take(&mut watch.recent) {
                if flows.send(Ok(flow)).await.is_err() {
                    return;
                }
            }
            loop {
                let next = tokio::select! {
                    next = watch.next_live() => next,
                    () = flows.closed() => return,
                    _ = stopping.wait_for(|stop| *stop) => return,
                };
                let Some(flow) = next else { return };
                if filter.matches(&flow)
                    && flows.send(Ok(ObservedFlow::clone(&flow))).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn drain(&self, _: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        self.replicated()?.drain().await?;
        Ok(Response::new(DrainResponse {}))
    }

    async fn transfer_leader(
        &self,
        _: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.replicated()?;
        Err(Status::failed_precondition(NO_TRANSFER))
    }

    async fn add_member(
        &self,
        _: Request<AddMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        self.replicated()?;
        Err(Status::failed_precondition(JOIN_BY_ITSELF))
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let id = request.into_inner().id;
        self.replicated()?.remove_member(&id).await?;
        Ok(Response::new(MembershipResponse {}))
    }
}
