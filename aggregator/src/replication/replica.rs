//! One replica: its sled databases, the membership and placement group and the store group on
//! them, and the gRPC server its peers reach it on.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
    time::Duration,
};

use futures_util::future::BoxFuture;
use mermin_protocol::replica::v1::raft_server::RaftServer;
use openraft::{
    BasicNode, ChangeMembers, Config, LogId, Raft, ServerState, SnapshotPolicy,
    error::{ClientWriteError, RaftError},
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::Connected;

use super::{
    PLACEMENT_GROUP, ReplicaId, ReplicationError, STORE_GROUP,
    log::SledLog,
    network::{
        CLUSTER_METADATA, Groups, GrpcNetwork, LEADER_METADATA, Membership, MembershipRefused,
        RaftService, Transport, ask_to_join, ask_to_leave,
    },
    placement::{
        Move, Placed, PlacementCommand, PlacementGroup, PlacementMachine, ShardMap, onto, rebalance,
    },
    store::{ReplicatedStore, StoreGroup, StoreMachine},
};
use crate::{
    metrics::EndpointReasonLabel,
    placement::SHARDS,
    store::{DurableDb, Store},
    tls::{ServerTls, TlsFiles},
};

/// How the replica's Raft groups run: how often a leader shows it is alive, how long a follower
/// waits before it stands for election (a random time in the range, so that two rarely stand
/// at once), and how many log entries a group keeps before it snapshots its state and drops
/// them (a fifth as many are kept behind a snapshot for followers that lag a little).
#[derive(Debug, Clone, Copy)]
pub struct RaftTuning {
    pub heartbeat: Duration,
    pub election_timeout: (Duration, Duration),
    pub snapshot_entries: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(200),
            election_timeout: (Duration::from_millis(1000), Duration::from_millis(2000)),
            snapshot_entries: crate::defaults::REPLICATION_SNAPSHOT_ENTRIES,
        }
    }
}

/// One replica (see the module docs).
pub struct Replica {
    id: ReplicaId,
    address: String,
    transport: Transport,
    placement: Raft<PlacementGroup>,
    machine: PlacementMachine,
    store_group: Raft<StoreGroup>,
    store: Arc<ReplicatedStore>,
    server: JoinHandle<()>,
    membership: JoinHandle<()>,
    /// Turned true at shutdown: the certificate watch ends.
    stop: watch::Sender<bool>,
}

/// Serves the Raft transport on `incoming` until the task is aborted.
async fn serve<IO, E>(
    service: RaftServer<RaftService>,
    incoming: impl futures_util::Stream<Item = Result<IO, E>> + Send + 'static,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(incoming)
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "the replica's Raft server stopped");
    }
}

fn raft_error<E: std::error::Error>(error: RaftError<ReplicaId, E>) -> ReplicationError {
    ReplicationError::Raft(error.to_string())
}

fn write_error(
    error: RaftError<ReplicaId, ClientWriteError<ReplicaId, BasicNode>>,
) -> ReplicationError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            ReplicationError::NotLeader {
                leader: forward.leader_id,
            }
        }
        other => raft_error(other),
    }
}

/// Makes `raft`'s group a cluster of `members`, unless it has been initialised before.
async fn initialize<C>(
    raft: &Raft<C>,
    members: BTreeMap<ReplicaId, BasicNode>,
) -> Result<(), ReplicationError>
where
    C: openraft::RaftTypeConfig<NodeId = ReplicaId, Node = BasicNode>,
{
    if raft
        .is_initialized()
        .await
        .map_err(|e| ReplicationError::Raft(e.to_string()))?
    {
        return Ok(());
    }
    raft.initialize(members)
        .await
        .map_err(|e| ReplicationError::Raft(e.to_string()))
}

/// Either group, as membership changes see it.
trait Group:
    openraft::RaftTypeConfig<
        NodeId = ReplicaId,
        Node = BasicNode,
        Responder = openraft::impls::OneshotResponder<Self>,
    >
{
}

impl<C> Group for C where
    C: openraft::RaftTypeConfig<
            NodeId = ReplicaId,
            Node = BasicNode,
            Responder = openraft::impls::OneshotResponder<C>,
        >
{
}

/// Adds replica `id` at `address` to `raft`'s group (on its leader): first as a learner that
/// catches up, then as a voter.
async fn add_voter<C: Group>(
    raft: &Raft<C>,
    id: ReplicaId,
    node: BasicNode,
) -> Result<(), ReplicationError> {
    raft.add_learner(id, node, true)
        .await
        .map_err(write_error)?;
    raft.change_membership(ChangeMembers::AddVoterIds([id].into()), false)
        .await
        .map_err(write_error)?;
    Ok(())
}

/// Finishes a change of `raft`'s voters that its leader left half-done, on the leader. openraft
/// changes voters through a joint configuration, then a uniform one; a leader lost between the
/// two leaves the group joint, and only another change ends that (none may come: the group is
/// wanted as it would be). Acts only when this replica leads and finds the same joint
/// configuration applied (so committed) as at the previous look, kept in `seen`: a first look
/// may fall between the two steps of a change still running, which its own second step ends.
/// Returns whether it finished one.
async fn finish_joint_change<C: Group>(
    raft: &Raft<C>,
    seen: &mut Option<LogId<ReplicaId>>,
) -> Result<bool, ReplicationError> {
    let (joint_at, target) = {
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        let stored = &metrics.membership_config;
        let configs = stored.membership().get_joint_config();
        match (*stored.log_id(), configs.last()) {
            (Some(at), Some(last))
                if metrics.state == ServerState::Leader
                    && configs.len() > 1
                    && Some(at) <= metrics.last_applied =>
            {
                (at, last.clone())
            }
            _ => {
                *seen = None;
                return Ok(false);
            }
        }
    };
    if seen.replace(joint_at) != Some(joint_at) {
        return Ok(false);
    }
    // Bounded: without a quorum of the new side the answer waits for one, and this loop has
    // other work.
    tokio::time::timeout(
        CATCH_UP_WAIT,
        raft.change_membership(ChangeMembers::ReplaceAllVoters(target), false),
    )
    .await
    .map_err(|_| {
        ReplicationError::Raft(format!(
            "finishing a change of voters: not committed within {CATCH_UP_WAIT:?}"
        ))
    })?
    .map_err(write_error)?;
    *seen = None;
    Ok(true)
}

/// Takes `ids` out of `raft`'s group (on its leader), voters and learners alike (a replica that
/// died while it caught up is a learner), none of them kept as a learner.
async fn remove_members<C: Group>(
    raft: &Raft<C>,
    ids: &BTreeSet<ReplicaId>,
) -> Result<(), ReplicationError> {
    let (voting, learning): (BTreeSet<ReplicaId>, BTreeSet<ReplicaId>) = {
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voting = membership
            .voter_ids()
            .filter(|id| ids.contains(id))
            .collect();
        let learning = membership
            .learner_ids()
            .filter(|id| ids.contains(id))
            .collect();
        (voting, learning)
    };
    if !voting.is_empty() {
        raft.change_membership(ChangeMembers::RemoveVoters(voting), false)
            .await
            .map_err(write_error)?;
    }
    if !learning.is_empty() {
        raft.change_membership(ChangeMembers::RemoveNodes(learning), false)
            .await
            .map_err(write_error)?;
    }
    Ok(())
}

/// How this replica answers a replica asking to join or to leave (see `Join` and `Leave` in the
/// protocol): through the membership group, on its leader.
struct PlacementMembership(Raft<PlacementGroup>);

impl Membership for PlacementMembership {
    fn admit(
        &self,
        id: ReplicaId,
        address: String,
    ) -> BoxFuture<'static, Result<(), tonic::Status>> {
        let placement = self.0.clone();
        Box::pin(async move { admit(&placement, id, address).await })
    }

    fn release(&self, id: ReplicaId) -> BoxFuture<'static, Result<(), tonic::Status>> {
        let placement = self.0.clone();
        Box::pin(async move {
            let members = leading_members(&placement).await?;
            if members.get_node(&id).is_none() {
                return Ok(());
            }
            remove_members(&placement, &[id].into())
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))
        })
    }
}

fn refusal(message: String, key: &'static str, value: &str) -> tonic::Status {
    let mut status = tonic::Status::failed_precondition(message);
    if let Ok(value) = value.parse() {
        status.metadata_mut().insert(key, value);
    }
    status
}

/// The membership group's members (voters and learners), if this replica leads it; else a
/// refusal naming the leader (or saying that there is no cluster yet).
async fn leading_members(
    placement: &Raft<PlacementGroup>,
) -> Result<openraft::Membership<ReplicaId, BasicNode>, tonic::Status> {
    let initialized = placement
        .is_initialized()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    if !initialized {
        return Err(refusal(
            "this replica has never been part of a cluster".to_owned(),
            CLUSTER_METADATA,
            "none",
        ));
    }
    let (this, leader, members) = {
        let metrics = placement.metrics();
        let metrics = metrics.borrow();
        let members = metrics.membership_config.membership().clone();
        (metrics.id, metrics.current_leader, members)
    };
    if leader != Some(this) {
        let Some(at) = leader.and_then(|leader| members.get_node(&leader)) else {
            return Err(tonic::Status::unavailable(
                "the cluster has no leader right now",
            ));
        };
        return Err(refusal(
            format!(
                "replica {} leads the membership, at {}",
                leader.unwrap_or_default(),
                at.addr
            ),
            LEADER_METADATA,
            &at.addr,
        ));
    }
    Ok(members)
}

async fn admit(
    placement: &Raft<PlacementGroup>,
    id: ReplicaId,
    address: String,
) -> Result<(), tonic::Status> {
    let members = leading_members(placement).await?;
    let node = BasicNode { addr: address };
    let voting = members.voter_ids().any(|voter| voter == id);
    if !(voting && members.get_node(&id) == Some(&node)) {
        add_voter(placement, id, node)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    }
    // Earlier incarnations of the same ordinal (a replica that lost its disk) leave — looked for
    // at every admission, so that one whose removal failed after the new one was added (a
    // deposed leader) goes when the new one asks again.
    let stale: BTreeSet<ReplicaId> = members
        .nodes()
        .map(|(member, _)| *member)
        .filter(|member| ordinal(*member) == ordinal(id) && *member != id)
        .collect();
    if !stale.is_empty() {
        remove_members(placement, &stale)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    }
    Ok(())
}

/// Takes replica `id` out of the voters, from any replica whose membership group's metrics are
/// `membership`: asks the group's leader (`Leave`), following a refusal that names another. The
/// store group follows; a leader taken out steps down once the change is committed.
pub async fn take_out(
    transport: &Transport,
    membership: &watch::Receiver<openraft::RaftMetrics<ReplicaId, BasicNode>>,
    id: ReplicaId,
) -> Result<(), ReplicationError> {
    let leader = {
        let metrics = membership.borrow();
        let nodes = metrics.membership_config.membership();
        metrics
            .current_leader
            .and_then(|leader| nodes.get_node(&leader))
            .map(|node| node.addr.clone())
    };
    let leader = leader.ok_or_else(|| {
        ReplicationError::Membership("the membership group has no leader right now".into())
    })?;
    let asked = match ask_to_leave(transport, &leader, id).await {
        Err(MembershipRefused::AskLeader(other)) => ask_to_leave(transport, &other, id).await,
        other => other,
    };
    asked.map_err(|e| ReplicationError::Membership(e.to_string()))
}

/// This replica's id: `ordinal` in the upper 32 bits and, in the lower, the incarnation of
/// `data_dir` — chosen when the directory was first used and kept in it (`replica-id`), so that
/// a replica that lost its disk comes back as a new member, never as its old self.
pub fn identity(data_dir: &Path, ordinal: u32) -> Result<ReplicaId, ReplicationError> {
    let path = data_dir.join("replica-id");
    let corrupt = |reason: String| ReplicationError::Corrupt {
        what: "replica-id",
        reason,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id: ReplicaId = text
                .trim()
                .parse()
                .map_err(|e| corrupt(format!("{}: {e}", path.display())))?;
            if self::ordinal(id) != ordinal {
                return Err(corrupt(format!(
                    "{} belongs to replica {}, not {ordinal}",
                    path.display(),
                    self::ordinal(id)
                )));
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let nanos = crate::clock::unix_now();
            let incarnation = ((nanos ^ (nanos >> 32)) as u32 ^ std::process::id()).max(1);
            let id = (ReplicaId::from(ordinal) << 32) | ReplicaId::from(incarnation);
            write_durably(data_dir, &path, format!("{id}\n").as_bytes())
                .map_err(|e| ReplicationError::Start(format!("{}: {e}", path.display())))?;
            Ok(id)
        }
        Err(e) => Err(ReplicationError::Start(format!("{}: {e}", path.display()))),
    }
}

/// A replica whose store was cut short while installing a snapshot (see
/// `store::half_installed`) has no usable store, and no log replayed over it can fix it: it
/// starts over as a new member, as a replica that lost its disk does — its data dir emptied,
/// a new incarnation joining, its old identity leaving when the new one is admitted. Returns
/// whether it did.
pub fn start_over_if_half_installed(data_dir: &Path) -> Result<bool, ReplicationError> {
    if !super::store::half_installed(&data_dir.join("store"))? {
        return Ok(false);
    }
    tracing::error!(
        data_dir = %data_dir.display(),
        "the store was cut short while installing a snapshot: starting over as a new member"
    );
    for name in ["replica-id", "replica", "store"] {
        let path = data_dir.join(name);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ReplicationError::Start(format!("{}: {e}", path.display()))),
        }
    }
    Ok(true)
}

/// Writes `path` (in `dir`) whole or not at all, surviving a power loss once this returns: a
/// temporary file synced, renamed over `path`, then the directory synced. A torn `replica-id`
/// would keep the replica from starting until someone repaired its data directory.
fn write_durably(dir: &Path, path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let temporary = path.with_extension("new");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The StatefulSet ordinal of a replica id (its upper 32 bits).
pub fn ordinal(id: ReplicaId) -> u32 {
    (id >> 32) as u32
}

/// The voters of a group and where they are.
fn voters(metrics: &openraft::RaftMetrics<ReplicaId, BasicNode>) -> BTreeMap<ReplicaId, BasicNode> {
    let membership = metrics.membership_config.membership();
    membership
        .voter_ids()
        .filter_map(|id| Some((id, membership.get_node(&id)?.clone())))
        .collect()
}

/// Whether a group's membership has settled as `metrics` show it: its last change applied and
/// not a joint configuration. While a change is uncommitted further changes are refused, and
/// losing a member for good can wedge the group: with voters `{a, b}` becoming `{a, b, c}`, the
/// joint configuration needs both `a` and `b`.
pub fn membership_settled(metrics: &openraft::RaftMetrics<ReplicaId, BasicNode>) -> bool {
    let stored = &metrics.membership_config;
    // No configuration at all: a group this replica has not joined yet, with nothing under way.
    stored.membership().get_joint_config().len() <= 1 && *stored.log_id() <= metrics.last_applied
}

/// [`voters`] once the group's membership has settled ([`membership_settled`]).
fn settled_voters(
    metrics: &openraft::RaftMetrics<ReplicaId, BasicNode>,
) -> Option<BTreeMap<ReplicaId, BasicNode>> {
    membership_settled(metrics).then(|| voters(metrics))
}

/// How long the store group's leader waits for a new member to catch up before it looks at the
/// membership again.
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);

/// Keeps the store group's voters those of the membership group (which
/// [`Replica::add_member`] and [`Replica::remove_member`] change), on whichever replica leads
/// the store group, and finishes a change of either group's voters its leader left half-done
/// ([`finish_joint_change`]) on whichever replica leads that group; checks every `interval`
/// and retries what failed.
async fn follow_membership(
    placement: Raft<PlacementGroup>,
    store_group: Raft<StoreGroup>,
    interval: Duration,
) {
    let members = placement.metrics();
    let (mut membership_joint, mut store_joint) = (None, None);
    let mut tick = tokio::time::interval(interval);
    // After a wait for a catch-up, one look, not a burst of the ticks missed meanwhile.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = finish_joint_change(&placement, &mut membership_joint).await {
            tracing::warn!(error = %e, "finishing a change of the membership group's voters");
        }
        let (leads, current, learners) = {
            let metrics = store_group.metrics();
            let metrics = metrics.borrow();
            let learners: BTreeSet<ReplicaId> = metrics
                .membership_config
                .membership()
                .learner_ids()
                .collect();
            (
                metrics.state == ServerState::Leader,
                settled_voters(&metrics),
                learners,
            )
        };
        // A change under way is left to finish (another is refused while it is uncommitted),
        // or finished here if its leader left it half-done.
        let Some(current) = current else {
            if let Err(e) = finish_joint_change(&store_group, &mut store_joint).await {
                tracing::warn!(error = %e, "finishing a change of the store group's voters");
            }
            continue;
        };
        let desired = voters(&members.borrow());
        // A member that moved is taken out first and added again at its new address; a learner
        // no longer wanted (it died while catching up, then left the membership) goes too.
        let gone: BTreeSet<ReplicaId> = current
            .iter()
            .filter(|(id, node)| desired.get(id) != Some(node))
            .map(|(id, _)| *id)
            .chain(learners.into_iter().filter(|id| !desired.contains_key(id)))
            .collect();
        if !leads || desired.is_empty() || (desired == current && gone.is_empty()) {
            continue;
        }
        if !gone.is_empty()
            && let Err(e) = remove_members(&store_group, &gone).await
        {
            tracing::warn!(error = %e, "taking replicas out of the store group");
            continue;
        }
        for (id, node) in desired {
            if current.get(&id) == Some(&node) {
                continue;
            }
            // Bounded: a replica that died while catching up must not hold up the others.
            match tokio::time::timeout(CATCH_UP_WAIT, add_voter(&store_group, id, node)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(replica = id, error = %e, "adding a replica to the store group")
                }
                Err(_) => tracing::warn!(
                    replica = id,
                    "adding a replica to the store group: not caught up within {CATCH_UP_WAIT:?}; trying again"
                ),
            }
        }
    }
}

/// Mutual TLS between replicas: each presents its certificate (`files.cert`, `files.key`) as a
/// server and as a client, and takes only peers whose certificate chains to `files.client_ca`
/// (a client also checks the peer's host name). The files are read again for every outgoing
/// client and after a failed connection (`network::Transport`), and checked for changes every
/// `reload_interval` for incoming ones, so a renewed certificate is used without a restart.
#[derive(Debug, Clone)]
pub struct ReplicaTls {
    pub files: TlsFiles,
    pub reload_interval: Duration,
    /// Refused handshakes on the replication port, by reason.
    pub failures: Family<EndpointReasonLabel, Counter>,
}

/// How long an incoming replica connection may take to complete its TLS handshake.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);

impl Replica {
    /// Opens (or creates) the replica's databases in `data_dir`, starts its Raft groups and
    /// serves them on `listener` (with mutual TLS if `tls`); peers reach it at `advertise`
    /// (host:port; the listener's address if `None`). A replica that has state rejoins with it.
    pub async fn start(
        id: ReplicaId,
        listener: TcpListener,
        advertise: Option<String>,
        data_dir: &Path,
        timings: RaftTuning,
        tls: Option<ReplicaTls>,
    ) -> Result<Self, ReplicationError> {
        let transport = tls
            .as_ref()
            .map_or_else(Transport::default, |tls| Transport::tls(tls.files.clone()));
        let local = listener
            .local_addr()
            .map_err(|e| ReplicationError::Start(format!("the replica's listener: {e}")))?;
        let address = advertise.unwrap_or_else(|| local.to_string());
        let db = DurableDb::open(sled::Config::new(), &data_dir.join("replica"))?;
        let config = Arc::new(
            Config {
                cluster_name: "mermin".to_owned(),
                heartbeat_interval: timings.heartbeat.as_millis() as u64,
                election_timeout_min: timings.election_timeout.0.as_millis() as u64,
                election_timeout_max: timings.election_timeout.1.as_millis() as u64,
                // Entries are large (whole batches, checkpoints with their export requests):
                // fewer per message keep a message well below the transport's limit.
                max_payload_entries: 64,
                snapshot_policy: SnapshotPolicy::LogsSinceLast(timings.snapshot_entries),
                max_in_snapshot_log_to_keep: timings.snapshot_entries / 5,
                ..Config::default()
            }
            .validate()
            .map_err(|e| ReplicationError::Start(e.to_string()))?,
        );
        let machine = PlacementMachine::open(&db)?;
        let placement = Raft::new(
            id,
            config.clone(),
            GrpcNetwork::new(PLACEMENT_GROUP, transport.clone()),
            SledLog::<PlacementGroup>::open(&db, PLACEMENT_GROUP)
                .map_err(|e| ReplicationError::Start(format!("the placement group's log: {e}")))?,
            machine.clone(),
        )
        .await
        .map_err(|e| ReplicationError::Start(e.to_string()))?;
        // The store's own database: a snapshot of the store group carries all its trees.
        let store_db = DurableDb::open(sled::Config::new(), &data_dir.join("store"))?;
        let store_machine = StoreMachine::open(store_db, data_dir.to_owned())
            .map_err(|e| ReplicationError::Start(e.to_string()))?;
        let store_group = Raft::new(
            id,
            config,
            GrpcNetwork::new(STORE_GROUP, transport.clone()),
            SledLog::<StoreGroup>::open(&db, STORE_GROUP)
                .map_err(|e| ReplicationError::Start(format!("the store group's log: {e}")))?,
            store_machine.clone(),
        )
        .await
        .map_err(|e| ReplicationError::Start(e.to_string()))?;
        let store = Arc::new(ReplicatedStore::new(store_group.clone(), store_machine));
        let groups = Groups::new(id, Arc::new(PlacementMembership(placement.clone())));
        groups.add(PLACEMENT_GROUP, placement.clone());
        groups.add(STORE_GROUP, store_group.clone());
        let (stop, stopping) = watch::channel(false);
        let accepted = TcpListenerStream::new(listener);
        let service = groups.service();
        let server = match tls {
            Some(tls) => {
                let server_tls = ServerTls::load(tls.files.clone())
                    .map_err(|e| ReplicationError::Start(e.to_string()))?;
                server_tls.watch("replication", tls.reload_interval, stopping);
                let incoming =
                    server_tls.incoming(accepted, "replication", HANDSHAKE_WAIT, tls.failures);
                tokio::spawn(serve(service, incoming))
            }
            None => tokio::spawn(serve(service, accepted)),
        };
        let membership = tokio::spawn(follow_membership(
            placement.clone(),
            store_group.clone(),
            timings.heartbeat * 2,
        ));
        Ok(Self {
            id,
            address,
            transport,
            placement,
            machine,
            store_group,
            store,
            server,
            membership,
            stop,
        })
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }

    /// Where peers reach this replica (host:port).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Makes this replica a cluster of one, if it has never been part of a cluster (what
    /// replica 0 does on its first start; a no-op on every later start).
    pub async fn bootstrap(&self) -> Result<(), ReplicationError> {
        let members = BTreeMap::from([(self.id, BasicNode::new(&self.address))]);
        initialize(&self.placement, members.clone()).await?;
        initialize(&self.store_group, members).await
    }

    /// Adds replica `id` at `address` as a voter (on the membership group's leader): it first
    /// catches up as a learner, then joins the voters. The store group follows.
    pub async fn add_member(&self, id: ReplicaId, address: &str) -> Result<(), ReplicationError> {
        add_voter(&self.placement, id, BasicNode::new(address)).await
    }

    /// Removes replica `id`, voter or learner (on the membership group's leader); its shards are
    /// placed again by the next [`Replica::rebalance`]. The store group follows.
    pub async fn remove_member(&self, id: ReplicaId) -> Result<(), ReplicationError> {
        remove_members(&self.placement, &[id].into()).await
    }

    /// How this replica reaches its peers.
    pub fn transport(&self) -> Transport {
        self.transport.clone()
    }

    /// Spreads the shards over the current voters (on the leader), moving as few as possible;
    /// returns the moves applied.
    pub async fn rebalance(&self) -> Result<Placed, ReplicationError> {
        let voters = voters(&self.placement.metrics().borrow())
            .into_keys()
            .collect();
        self.place(rebalance(&self.machine.shards(), &voters, SHARDS))
            .await
    }

    /// Applies `moves` through the membership group (on its leader); none: nothing to do.
    async fn place(&self, moves: Vec<Move>) -> Result<Placed, ReplicationError> {
        if moves.is_empty() {
            return Ok(Placed::default());
        }
        let written = self
            .placement
            .client_write(PlacementCommand::Place(moves))
            .await
            .map_err(write_error)?;
        Ok(written.data)
    }

    /// Leases every shard to the store group's leader (on the membership group's leader, when
    /// the map says otherwise: after a failover or a drain); returns the moves applied. While
    /// one store group holds every shard, its leader leads them all, and the map says so — each
    /// move a new epoch.
    pub async fn lease_shards_to_store_leader(&self) -> Result<Placed, ReplicationError> {
        let (Some(store_leader), true) = (self.store_leader(), self.leads_membership()) else {
            return Ok(Placed::default());
        };
        self.place(onto(&self.machine.shards(), store_leader, SHARDS))
            .await
    }

    fn leads_membership(&self) -> bool {
        self.placement.metrics().borrow().current_leader == Some(self.id)
    }

    /// The shard map as this replica has applied it, following every change.
    pub fn shard_map(&self) -> watch::Receiver<ShardMap> {
        self.machine.shard_map()
    }

    /// The membership group's leader as this replica knows it.
    pub fn leader(&self) -> Option<ReplicaId> {
        self.placement.metrics().borrow().current_leader
    }

    /// Becomes a member: does nothing if this replica is one already (a restart with its data);
    /// otherwise asks each of `peers` (host:port; its own address is skipped) to admit it,
    /// following a refusal that names the leader. Replica 0 (ordinal 0) makes a cluster of its
    /// own instead only when every peer answers that it has never been part of one — a replica
    /// 0 that lost its disk joins the cluster that is there. Tries again every `retry` until it
    /// is a member.
    pub async fn join(&self, peers: &[String], retry: Duration) -> Result<(), ReplicationError> {
        let peers: Vec<&String> = peers.iter().filter(|p| **p != self.address).collect();
        loop {
            if self.admitted() {
                return Ok(());
            }
            let mut without_cluster = 0;
            for peer in &peers {
                let asked = match ask_to_join(&self.transport, peer, self.id, &self.address).await {
                    Err(MembershipRefused::AskLeader(leader)) => {
                        ask_to_join(&self.transport, &leader, self.id, &self.address).await
                    }
                    other => other,
                };
                match asked {
                    // Admitted by the leader; a member once this replica applied the change.
                    Ok(()) => break,
                    Err(MembershipRefused::NoCluster) => without_cluster += 1,
                    Err(refused) => {
                        tracing::info!(peer = %peer, reason = %refused, "not admitted yet")
                    }
                }
            }
            if ordinal(self.id) == 0 && without_cluster == peers.len() {
                tracing::info!(
                    replica = self.id,
                    "no cluster among the peers: starting one"
                );
                return self.bootstrap().await;
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Whether this replica is a voter of the membership group and no other incarnation of its
    /// ordinal is a member, as it knows the group, the change that made it so settled. An
    /// earlier incarnation still there (its removal failed after this one was added) makes it
    /// ask again: admission removes it. So does a change not committed yet (a leader that dies
    /// before it commits can leave it out, and nothing else would ask again) or one left joint
    /// (the leader's [`follow_membership`] finishes it).
    fn admitted(&self) -> bool {
        let metrics = self.placement.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        membership_settled(&metrics)
            && membership.voter_ids().any(|voter| voter == self.id)
            && membership
                .nodes()
                .all(|(member, _)| *member == self.id || ordinal(*member) != ordinal(self.id))
    }

    /// Waits until this replica leads the store group and has applied everything committed
    /// before its term: the moment it may run the aggregator on the replicated store.
    pub async fn lead_store(&self) -> Result<(), ReplicationError> {
        self.store_group
            .ensure_linearizable()
            .await
            .map(drop)
            .map_err(|e| ReplicationError::Raft(e.to_string()))
    }

    /// Confirms that this replica still leads the store group: a quorum answered a heartbeat
    /// of its term. Unlike [`Replica::lead_store`] it does not wait for the state machine, so a
    /// busy leader whose applying lags is not taken for one cut off.
    pub async fn confirm_store_leadership(&self) -> Result<(), ReplicationError> {
        self.store_group
            .get_read_log_id()
            .await
            .map(drop)
            .map_err(|e| ReplicationError::Raft(e.to_string()))
    }

    /// The store group's metrics, following every change (leader, term, log indexes).
    pub fn store_metrics(&self) -> watch::Receiver<openraft::RaftMetrics<ReplicaId, BasicNode>> {
        self.store_group.metrics()
    }

    /// The membership and placement group's metrics, following every change.
    pub fn membership_metrics(
        &self,
    ) -> watch::Receiver<openraft::RaftMetrics<ReplicaId, BasicNode>> {
        self.placement.metrics()
    }

    /// Fences this replica's store or lifts the fence (see [`ReplicatedStore::fence`]).
    pub fn fence_store(&self, fenced: bool) {
        self.store.fence(fenced);
    }

    /// The storage seam on the store group: what the aggregator runs on while this replica
    /// leads the group.
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// The store group's voters as this replica knows them, once their last change is applied
    /// here and not a joint configuration; `None` while a change is under way.
    pub fn store_voters(&self) -> Option<BTreeSet<ReplicaId>> {
        settled_voters(&self.store_group.metrics().borrow())
            .map(|voters| voters.into_keys().collect())
    }

    /// The store group's leader as this replica knows it.
    pub fn store_leader(&self) -> Option<ReplicaId> {
        self.store_group.metrics().borrow().current_leader
    }

    /// Stops the groups and the server; what is durable stays in the data dir.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        if let Err(e) = self.placement.shutdown().await {
            tracing::warn!(error = %e, "stopping the placement group");
        }
        if let Err(e) = self.store_group.shutdown().await {
            tracing::warn!(error = %e, "stopping the store group");
        }
        for task in [self.membership, self.server] {
            task.abort();
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Membership, StoredMembership};

    use super::*;

    /// A group's voters count as settled only when their last change is applied here and is
    /// not a joint configuration (`{0, 1}` becoming `{0, 1, 2}` lists all three, yet needs
    /// both 0 and 1).
    #[test]
    fn a_membership_settles_when_its_change_is_applied_and_not_joint() {
        let at = |index| Some(LogId::new(CommittedLeaderId::new(1, 0), index));
        let metrics = |configs: Vec<BTreeSet<ReplicaId>>, changed, applied| {
            let mut metrics = openraft::RaftMetrics::<ReplicaId, BasicNode>::new_initial(0);
            metrics.membership_config = Arc::new(StoredMembership::new(
                at(changed),
                Membership::new(configs, ()),
            ));
            metrics.last_applied = at(applied);
            metrics
        };
        let uniform = metrics(vec![[0, 1, 2].into()], 4, 4);
        assert!(membership_settled(&uniform));
        assert_eq!(
            settled_voters(&uniform).map(|v| v.into_keys().collect::<Vec<_>>()),
            Some(vec![0, 1, 2])
        );
        let joint = metrics(vec![[0, 1].into(), [0, 1, 2].into()], 4, 4);
        assert_eq!(
            voters(&joint).len(),
            3,
            "a joint configuration lists both sides"
        );
        assert!(!membership_settled(&joint));
        assert_eq!(settled_voters(&joint), None);
        let not_applied = metrics(vec![[0, 1, 2].into()], 5, 4);
        assert!(!membership_settled(&not_applied));
        // A group not joined yet has no configuration, and nothing under way.
        let never_joined = openraft::RaftMetrics::<ReplicaId, BasicNode>::new_initial(0);
        assert_eq!(settled_voters(&never_joined), Some(BTreeMap::new()));
    }

    /// A store cut short while it installed a snapshot (the marker left behind): the replica
    /// empties its data dir and comes back as a new incarnation of its ordinal. An intact data
    /// dir is left alone.
    #[test]
    fn a_half_installed_store_starts_the_replica_over_as_a_new_member() {
        let dir = tempfile::tempdir().unwrap();
        let before = identity(dir.path(), 2).unwrap();
        {
            let db = sled::Config::new()
                .path(dir.path().join("store"))
                .open()
                .unwrap();
            db.insert(b"a store tree entry", b"kept").unwrap();
            db.flush().unwrap();
        }
        assert!(!start_over_if_half_installed(dir.path()).unwrap());
        assert_eq!(identity(dir.path(), 2).unwrap(), before);
        {
            let db = sled::Config::new()
                .path(dir.path().join("store"))
                .open()
                .unwrap();
            let machine = db.open_tree(super::super::store::MACHINE_TREE).unwrap();
            machine
                .insert(super::super::store::INSTALLING, b"1-7-4096".as_slice())
                .unwrap();
            db.flush().unwrap();
        }
        assert!(start_over_if_half_installed(dir.path()).unwrap());
        assert!(!dir.path().join("store").exists());
        let after = identity(dir.path(), 2).unwrap();
        assert_ne!(after, before, "a new incarnation");
        assert_eq!(ordinal(after), 2);
        assert!(!start_over_if_half_installed(dir.path()).unwrap());
    }
}
