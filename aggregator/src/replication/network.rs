//! The Raft transport between replicas over gRPC (`mermin.replica.v1.Raft`).
//!
//! The server side ([`RaftService`]) routes every message to the local Raft group it names
//! ([`Groups`]); a message for a group this replica does not run is refused with NOT_FOUND. It
//! also answers a replica asking to join or to be taken out ([`Membership`]; [`ask_to_join`]
//! and [`ask_to_leave`] are the asking side).
//! The client side ([`GrpcNetwork`]) is openraft's network factory: one lazily connected
//! channel per peer and group, each call bounded by openraft's own deadline. A peer that cannot
//! be reached is reported as unreachable (openraft then backs off); an answer that does not
//! decode, as a network error.

use std::{
    collections::HashMap,
    error::Error,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures_util::future::BoxFuture;
use mermin_protocol::replica::v1::{
    JoinRequest, JoinResponse, LeaveRequest, LeaveResponse, RaftMessage,
    raft_client::RaftClient,
    raft_server::{Raft as RaftTransport, RaftServer},
};
use openraft::{
    BasicNode, Raft, RaftTypeConfig,
    error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable},
    network::{RPCOption, RaftNetwork, RaftNetworkFactory},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tonic::{
    Request, Response, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::ReplicaId;
use crate::tls::TlsFiles;

/// What a Raft group of any type needs to answer its peers' messages.
trait GroupEndpoint: Send + Sync {
    fn append_entries(&self, payload: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, Status>>;
    fn vote(&self, payload: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, Status>>;
    fn install_snapshot(&self, payload: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, Status>>;
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Status> {
    postcard::from_bytes(payload)
        .map_err(|e| Status::invalid_argument(format!("malformed Raft message: {e}")))
}

fn encode<T: Serialize>(answer: &T) -> Result<Vec<u8>, Status> {
    postcard::to_allocvec(answer)
        .map_err(|e| Status::internal(format!("encoding a Raft answer: {e}")))
}

impl<C> GroupEndpoint for Raft<C>
where
    C: RaftTypeConfig<NodeId = ReplicaId, Node = BasicNode>,
    AppendEntriesRequest<C>: DeserializeOwned,
    InstallSnapshotRequest<C>: DeserializeOwned,
{
    fn append_entries(&self, payload: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, Status>> {
        Box::pin(async move {
            let rpc: AppendEntriesRequest<C> = decode(&payload)?;
            encode(&Raft::append_entries(self, rpc).await)
        })
    }

    fn vote(&self, payload: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, Status>> {
        Box::pin(async move {
            let rpc: VoteRequest<ReplicaId> = decode(&payload)?;
            encode(&Raft::vote(self, rpc).await)
        })
    }

    fn install_snapshot(&self, payload: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, Status>> {
        Box::pin(async move {
            let rpc: InstallSnapshotRequest<C> = decode(&payload)?;
            encode(&Raft::install_snapshot(self, rpc).await)
        })
    }
}

/// How this replica answers a replica asking to join or to be taken out (`Join`, `Leave`).
pub trait Membership: Send + Sync + 'static {
    /// `Ok` once `id`, reachable at `address`, is a member.
    fn admit(&self, id: ReplicaId, address: String) -> BoxFuture<'static, Result<(), Status>>;
    /// `Ok` once `id` is not a voter.
    fn release(&self, id: ReplicaId) -> BoxFuture<'static, Result<(), Status>>;
}

/// The largest Raft message a replica takes. An entry carries a whole agent batch or a shard's
/// checkpoint with its export requests (up to 2 MB each), and one `AppendEntries` carries many
/// entries: tonic's default (4 MB) would refuse them, and replication would never catch up.
const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// The metadata key of a join refusal naming the leader's address.
pub const LEADER_METADATA: &str = "mermin-leader";
/// The metadata key of a join refusal by a replica that has never been part of a cluster.
pub const CLUSTER_METADATA: &str = "mermin-cluster";

/// The Raft groups this replica runs, by name, and how it admits new members.
#[derive(Clone)]
pub struct Groups {
    /// This replica: messages for any other are refused.
    replica: ReplicaId,
    by_name: Arc<RwLock<HashMap<String, Arc<dyn GroupEndpoint>>>>,
    membership: Arc<dyn Membership>,
}

impl Groups {
    pub fn new(replica: ReplicaId, membership: Arc<dyn Membership>) -> Self {
        Self {
            replica,
            by_name: Arc::default(),
            membership,
        }
    }

    /// Routes the messages for `name` to `raft` from now on.
    pub fn add<C>(&self, name: &str, raft: Raft<C>)
    where
        C: RaftTypeConfig<NodeId = ReplicaId, Node = BasicNode>,
        AppendEntriesRequest<C>: DeserializeOwned,
        InstallSnapshotRequest<C>: DeserializeOwned,
    {
        self.by_name
            .write()
            .expect("groups lock")
            .insert(name.to_owned(), Arc::new(raft));
    }

    fn get(&self, name: &str) -> Result<Arc<dyn GroupEndpoint>, Status> {
        self.by_name
            .read()
            .expect("groups lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("this replica runs no Raft group {name:?}")))
    }

    /// The gRPC service answering peers for every group added.
    pub fn service(&self) -> RaftServer<RaftService> {
        RaftServer::new(RaftService {
            groups: self.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// The server side of the transport (see the module docs).
pub struct RaftService {
    groups: Groups,
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl RaftService {
    async fn answer(
        &self,
        rpc: Rpc,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let RaftMessage {
            group,
            payload,
            replica_id,
        } = request.into_inner();
        if replica_id != self.groups.replica {
            return Err(Status::failed_precondition(format!(
                "this is replica {}, not {replica_id}",
                self.groups.replica
            )));
        }
        let endpoint = self.groups.get(&group)?;
        let payload = match rpc {
            Rpc::AppendEntries => endpoint.append_entries(payload).await?,
            Rpc::Vote => endpoint.vote(payload).await?,
            Rpc::InstallSnapshot => endpoint.install_snapshot(payload).await?,
        };
        Ok(Response::new(RaftMessage {
            group,
            payload,
            replica_id,
        }))
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.answer(Rpc::AppendEntries, request).await
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.answer(Rpc::Vote, request).await
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.answer(Rpc::InstallSnapshot, request).await
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let JoinRequest {
            replica_id,
            address,
        } = request.into_inner();
        if address.is_empty() {
            return Err(Status::invalid_argument("JoinRequest.address is empty"));
        }
        self.groups.membership.admit(replica_id, address).await?;
        Ok(Response::new(JoinResponse {}))
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let LeaveRequest { replica_id } = request.into_inner();
        self.groups.membership.release(replica_id).await?;
        Ok(Response::new(LeaveResponse {}))
    }
}

/// Why a peer did not admit a replica asking to join, or did not take one out.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipRefused {
    #[error("replica at {0} leads the membership; ask it")]
    AskLeader(String),
    #[error("the peer has never been part of a cluster")]
    NoCluster,
    #[error("{0}")]
    Failed(String),
}

/// Asks the replica at `peer` (host:port) to admit replica `id`, reachable at `address`.
pub async fn ask_to_join(
    transport: &Transport,
    peer: &str,
    id: ReplicaId,
    address: &str,
) -> Result<(), MembershipRefused> {
    let request = JoinRequest {
        replica_id: id,
        address: address.to_owned(),
    };
    let mut client = transport.client(peer).await?;
    answered(peer, client.join(request).await.map(drop))
}

/// Asks the replica at `peer` (host:port) to take replica `id` out of the voters.
pub async fn ask_to_leave(
    transport: &Transport,
    peer: &str,
    id: ReplicaId,
) -> Result<(), MembershipRefused> {
    let mut client = transport.client(peer).await?;
    let mut request = tonic::Request::new(LeaveRequest { replica_id: id });
    // A quick change on the leader; a peer cut off must not hold an admin call for minutes.
    request.set_timeout(LEAVE_BOUND);
    answered(peer, client.leave(request).await.map(drop))
}

/// How long connecting to a peer may take (TCP and TLS): a peer cut off (a blackhole, not a
/// refusal) fails a call in this time instead of the kernel's SYN retries (minutes).
const CONNECT_BOUND: Duration = Duration::from_secs(3);

/// How long a `Leave` may take, answer included.
const LEAVE_BOUND: Duration = Duration::from_secs(10);

/// How this replica reaches its peers: plaintext, or mutual TLS (it presents its certificate,
/// and checks the peer's against the CA and the peer's host name). The files are read for every
/// membership call and every Raft stream openraft opens (each new term or membership), and
/// again after a failed connection, so a renewed certificate is used without a restart.
#[derive(Clone, Default)]
pub struct Transport {
    tls: Option<TlsFiles>,
}

impl Transport {
    pub fn tls(files: TlsFiles) -> Self {
        Self { tls: Some(files) }
    }

    /// The endpoint of `peer` (host:port).
    fn endpoint(&self, peer: &str) -> Result<Endpoint, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoint = Channel::from_shared(format!("{scheme}://{peer}"))
            .map_err(|e| format!("bad peer address {peer:?}: {e}"))?
            .connect_timeout(CONNECT_BOUND);
        let Some(files) = &self.tls else {
            return Ok(endpoint);
        };
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
        };
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&files.client_ca)?))
            .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
        endpoint
            .tls_config(config)
            .map_err(|e| format!("TLS for {peer}: {e}"))
    }

    async fn client(&self, peer: &str) -> Result<RaftClient<Channel>, MembershipRefused> {
        let endpoint = self.endpoint(peer).map_err(MembershipRefused::Failed)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| MembershipRefused::Failed(format!("{peer}: {e}")))?;
        Ok(RaftClient::new(channel))
    }
}

/// A membership answer from `peer`, its refusal read from the metadata.
fn answered(peer: &str, asked: Result<(), Status>) -> Result<(), MembershipRefused> {
    let status = match asked {
        Ok(()) => return Ok(()),
        Err(status) => status,
    };
    let metadata = status.metadata();
    if let Some(leader) = metadata.get(LEADER_METADATA).and_then(|v| v.to_str().ok()) {
        Err(MembershipRefused::AskLeader(leader.to_owned()))
    } else if metadata.get(CLUSTER_METADATA).is_some() {
        Err(MembershipRefused::NoCluster)
    } else {
        Err(MembershipRefused::Failed(format!("{peer}: {status}")))
    }
}

/// The client side of the transport for one group (see the module docs).
#[derive(Clone)]
pub struct GrpcNetwork {
    group: String,
    transport: Transport,
}

impl GrpcNetwork {
    pub fn new(group: &str, transport: Transport) -> Self {
        Self {
            group: group.to_owned(),
            transport,
        }
    }
}

/// One peer of one group, as openraft sends to it.
pub struct GrpcPeer {
    group: String,
    target: ReplicaId,
    address: String,
    transport: Transport,
    client: Result<RaftClient<Channel>, String>,
}

impl<C> RaftNetworkFactory<C> for GrpcNetwork
where
    C: RaftTypeConfig<NodeId = ReplicaId, Node = BasicNode>,
    AppendEntriesRequest<C>: Serialize,
    InstallSnapshotRequest<C>: Serialize,
{
    type Network = GrpcPeer;

    async fn new_client(&mut self, target: ReplicaId, node: &BasicNode) -> GrpcPeer {
        let mut peer = GrpcPeer {
            group: self.group.clone(),
            target,
            address: node.addr.clone(),
            transport: self.transport.clone(),
            client: Err(String::new()),
        };
        peer.reconnect();
        peer
    }
}

/// A failure to reach a peer or to understand it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

type PeerError<E> = RPCError<ReplicaId, BasicNode, RaftError<ReplicaId, E>>;

impl GrpcPeer {
    /// A new lazily connecting channel to the peer, the TLS files read again (a renewed
    /// certificate is used from here on).
    fn reconnect(&mut self) {
        self.client = self
            .transport
            .endpoint(&self.address)
            .map(|endpoint| {
                RaftClient::new(endpoint.connect_lazy())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
            })
            .map_err(|e| format!("replica {}: {e}", self.target));
    }

    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        message: &Req,
        option: RPCOption,
    ) -> Result<Resp, PeerError<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: Error + DeserializeOwned,
    {
        let network =
            |reason: String| RPCError::Network(NetworkError::new(&TransportError(reason)));
        let payload = postcard::to_allocvec(message).map_err(|e| network(e.to_string()))?;
        if self.client.is_err() {
            // The files could not be read or used: perhaps they can now.
            self.reconnect();
        }
        let client = self.client.as_mut().map_err(|reason| {
            RPCError::Unreachable(Unreachable::new(&TransportError(reason.clone())))
        })?;
        let mut request = Request::new(RaftMessage {
            group: self.group.clone(),
            payload,
            replica_id: self.target,
        });
        request.set_timeout(option.hard_ttl());
        let answer = match rpc {
            Rpc::AppendEntries => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::InstallSnapshot => client.install_snapshot(request).await,
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(status) => {
                let error = TransportError(format!("replica {}: {status}", self.target));
                return Err(match status.code() {
                    tonic::Code::Unavailable => {
                        // The connection failed (a handshake refused, say, for an expired
                        // certificate): the next attempt connects anew with the files as
                        // they are then. tonic's own reconnects reuse what it was given.
                        self.reconnect();
                        RPCError::Unreachable(Unreachable::new(&error))
                    }
                    tonic::Code::DeadlineExceeded => {
                        RPCError::Unreachable(Unreachable::new(&error))
                    }
                    _ => RPCError::Network(NetworkError::new(&error)),
                });
            }
        };
        let result: Result<Resp, RaftError<ReplicaId, E>> =
            postcard::from_bytes(&answer.into_inner().payload).map_err(|e| {
                network(format!("replica {}: undecodable answer: {e}", self.target))
            })?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl<C> RaftNetwork<C> for GrpcPeer
where
    C: RaftTypeConfig<NodeId = ReplicaId, Node = BasicNode>,
    AppendEntriesRequest<C>: Serialize,
    InstallSnapshotRequest<C>: Serialize,
{
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<ReplicaId>, PeerError<openraft::error::Infallible>> {
        self.call(Rpc::AppendEntries, &rpc, option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<ReplicaId>, PeerError<InstallSnapshotError>> {
        self.call(Rpc::InstallSnapshot, &rpc, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<ReplicaId>,
        option: RPCOption,
    ) -> Result<VoteResponse<ReplicaId>, PeerError<openraft::error::Infallible>> {
        self.call(Rpc::Vote, &rpc, option).await
    }
}
