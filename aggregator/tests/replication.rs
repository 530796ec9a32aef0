//! Three replicas on loopback, over the real gRPC transport and real sled stores. The
//! membership and placement group: bootstrap as a StatefulSet does it, the shard map the same
//! on every replica, a new leader after the leader stops, its shards placed elsewhere, and the
//! stopped replica back with its data. The store group: what the leader acknowledged is on the
//! replica that leads after it, byte for byte, and a replica that does not lead refuses writes;
//! a replica that joins after the log was dropped gets the store from a snapshot, and a change of
//! voters its leader left half done is finished by the next.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use mermin_aggregator::{
    placement::ShardId,
    replication::{
        RaftTuning, Replica, ReplicaId, STORE_GROUP,
        log::SledLog,
        placement::{Lease, ShardMap},
        store::StoreGroup,
    },
    store::{Checkpoint, DurableDb, StoreError},
};
use mermin_protocol::{agent::v1::Batch, flow::v1::FlowRecord, wire::read::BatchBytes};
use openraft::BasicNode;
use tokio::net::TcpListener;

const WITHIN: Duration = Duration::from_secs(20);

fn timings() -> RaftTuning {
    RaftTuning {
        heartbeat: Duration::from_millis(100),
        election_timeout: (Duration::from_millis(500), Duration::from_millis(1000)),
        ..RaftTuning::default()
    }
}

async fn start(id: ReplicaId, data: &Path) -> Replica {
    start_tuned(id, data, timings()).await
}

async fn start_tuned(id: ReplicaId, data: &Path, tuning: RaftTuning) -> Replica {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Replica::start(id, listener, None, data, tuning, None)
        .await
        .unwrap()
}

/// Which shards each replica leads.
fn held(map: &ShardMap) -> BTreeMap<ReplicaId, Vec<ShardId>> {
    let mut held: BTreeMap<ReplicaId, Vec<ShardId>> = BTreeMap::new();
    for (shard, lease) in map {
        held.entry(lease.replica).or_default().push(*shard);
    }
    held
}

/// Waits until every replica has applied `expected`; fails with what each has after [`WITHIN`].
async fn converged(replicas: &[&Replica], expected: &ShardMap) {
    for replica in replicas {
        let mut map = replica.shard_map();
        let reached = tokio::time::timeout(WITHIN, map.wait_for(|map| map == expected))
            .await
            .is_ok_and(|waited| waited.is_ok());
        assert!(
            reached,
            "replica {} has {:?}, expected {:?}",
            replica.id(),
            *map.borrow(),
            expected
        );
    }
}

/// Waits until every replica names the same leader, one of them; returns it.
async fn agreed_leader(replicas: &[&Replica]) -> ReplicaId {
    agreed(replicas, Replica::leader).await
}

/// Waits until every replica names the same store group leader, one of them; returns it.
async fn agreed_store_leader(replicas: &[&Replica]) -> ReplicaId {
    agreed(replicas, Replica::store_leader).await
}

async fn agreed(replicas: &[&Replica], leader_of: fn(&Replica) -> Option<ReplicaId>) -> ReplicaId {
    let deadline = Instant::now() + WITHIN;
    loop {
        let leaders: Vec<_> = replicas.iter().map(|r| leader_of(r)).collect();
        if let Some(Some(leader)) = leaders.first()
            && leaders.iter().all(|l| *l == Some(*leader))
            && replicas.iter().any(|r| r.id() == *leader)
        {
            return *leader;
        }
        assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_agree_on_the_shard_map_through_a_leader_change_and_a_rejoin() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();

    // Replica 0 initialises a cluster of one and places every shard on itself.
    let zero = start(0, dirs[0].path()).await;
    zero.bootstrap().await.unwrap();
    assert_eq!(agreed_leader(&[&zero]).await, 0);
    let placed = zero.rebalance().await.unwrap();
    assert_eq!(placed.applied.len(), 8);

    // Replicas 1 and 2 join through the leader; the shards spread with as few moves as possible.
    let one = start(1, dirs[1].path()).await;
    let two = start(2, dirs[2].path()).await;
    zero.add_member(1, one.address()).await.unwrap();
    zero.add_member(2, two.address()).await.unwrap();
    assert_eq!(zero.rebalance().await.unwrap().applied.len(), 5);
    let spread = zero.shard_map().borrow().clone();
    assert_eq!(
        held(&spread),
        BTreeMap::from([(0, vec![0, 1, 2]), (1, vec![3, 5, 7]), (2, vec![4, 6])])
    );
    converged(&[&zero, &one, &two], &spread).await;
    // Bootstrapping again (every start of replica 0 does) changes nothing.
    zero.bootstrap().await.unwrap();
    assert_eq!(agreed_leader(&[&zero, &one, &two]).await, 0);

    // The leader stops: the other two elect one of them, which takes replica 0 out and places
    // its shards; only those three move, each to a new epoch.
    let stopped_at = Instant::now();
    zero.shutdown().await;
    let leader_id = agreed_leader(&[&one, &two]).await;
    let elected_after = stopped_at.elapsed();
    assert!(
        elected_after < WITHIN,
        "a new leader after {elected_after:?}"
    );
    let (leader, follower) = if leader_id == 1 {
        (&one, &two)
    } else {
        (&two, &one)
    };
    leader.remove_member(0).await.unwrap();
    let moved = leader.rebalance().await.unwrap();
    assert_eq!(
        moved.applied.iter().map(|m| m.shard).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let without_zero = leader.shard_map().borrow().clone();
    assert_eq!(
        held(&without_zero)
            .values()
            .map(Vec::len)
            .collect::<Vec<_>>(),
        vec![4, 4]
    );
    for shard in 0..3 {
        assert_eq!(without_zero[&shard].epoch, 2, "shard {shard}");
    }
    for shard in 3..8 {
        assert_eq!(without_zero[&shard], spread[&shard], "shard {shard}");
    }
    converged(&[leader, follower], &without_zero).await;

    // Replica 0 starts again on its data dir: it still has the map it had applied, and once the
    // leader adds it back it catches up to the current one.
    let zero = start(0, dirs[0].path()).await;
    assert_eq!(*zero.shard_map().borrow(), spread);
    leader.add_member(0, zero.address()).await.unwrap();
    converged(&[&zero, leader, follower], &without_zero).await;
    assert_eq!(without_zero.values().filter(|l| l.replica == 0).count(), 0);
    let rebalanced = leader.rebalance().await.unwrap();
    assert_eq!(rebalanced.applied.len(), 2);
    let final_map = leader.shard_map().borrow().clone();
    converged(&[&zero, leader, follower], &final_map).await;
    assert_eq!(
        held(&final_map).values().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 3, 3]
    );
    assert!(final_map.values().all(|Lease { epoch, .. }| *epoch >= 1));
    eprintln!("new leader {leader_id} agreed {elected_after:?} after the leader stopped");

    for replica in [zero, one, two] {
        replica.shutdown().await;
    }
}

fn batch(sequence: u64) -> BatchBytes {
    BatchBytes::encode(&Batch {
        sequence,
        records: vec![FlowRecord {
            delta_packets: sequence,
            delta_octets: sequence * 100,
            ..Default::default()
        }],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_store_leader_acknowledged_is_on_the_next_leader() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let zero = start(0, dirs[0].path()).await;
    zero.bootstrap().await.unwrap();
    let one = start(1, dirs[1].path()).await;
    let two = start(2, dirs[2].path()).await;
    assert_eq!(agreed_store_leader(&[&zero]).await, 0);
    zero.add_member(1, one.address()).await.unwrap();
    zero.add_member(2, two.address()).await.unwrap();
    // The store group follows the membership.
    voters_become(&zero, &[0, 1, 2]).await;
    assert_eq!(agreed_store_leader(&[&zero, &one, &two]).await, 0);

    // The leader acknowledges: a bound agent's 40 batches, a checkpoint past 30 of them on
    // every shard, two requests queued by it and one pushed.
    let store = zero.store();
    let boot_id = [9; 16];
    assert_eq!(store.bind_agent(&boot_id, "node-a").await.unwrap(), None);
    for sequence in 1..=40 {
        store.append(&boot_id, &batch(sequence)).await.unwrap();
    }
    let positions = std::collections::HashMap::from([(boot_id, 30)]);
    let requests = [b"first request".to_vec(), b"second".to_vec()];
    let checkpoint_store = store.clone();
    tokio::task::spawn_blocking(move || {
        for shard in 0..mermin_aggregator::placement::SHARDS {
            let outbox: &[Vec<u8>] = if shard == 0 { &requests } else { &[] };
            checkpoint_store
                .checkpoint(&[Checkpoint {
                    shard,
                    positions: &positions,
                    changes: &[],
                    outbox,
                }])
                .unwrap();
        }
    })
    .await
    .unwrap();
    let pushed = store.outbox_push(b"pushed").await.unwrap();
    let acknowledged_outbox = store.outbox_oldest(10).unwrap();
    assert_eq!(acknowledged_outbox.len(), 3);
    assert_eq!(acknowledged_outbox[2], (pushed, b"pushed".to_vec()));

    // A replica that does not lead refuses writes, naming the leader.
    let refused = one.store().append(&boot_id, &batch(41)).await.unwrap_err();
    assert!(
        matches!(&refused, StoreError::Backend(why) if why == "this replica does not lead the store group (leader: replica 0)"),
        "{refused}"
    );

    // The leader stops; the next one holds exactly what was acknowledged.
    drop(store);
    zero.shutdown().await;
    let next = agreed_store_leader(&[&one, &two]).await;
    let next = if next == 1 { &one } else { &two };
    // As the cluster does before it runs the pipeline there: the new leader has applied every
    // entry committed before its term (reads are local).
    next.lead_store().await.unwrap();
    let store = next.store();
    assert_eq!(store.last_sequence(&boot_id).unwrap(), 40);
    let kept: Vec<u64> = store
        .batches()
        .map(|entry| entry.unwrap().1.sequence())
        .collect();
    assert_eq!(
        kept,
        (31..=40).collect::<Vec<_>>(),
        "batches every shard is past are gone"
    );
    assert_eq!(store.batch(&boot_id, 35).unwrap(), Some(batch(35)));
    assert_eq!(store.outbox_oldest(10).unwrap(), acknowledged_outbox);
    assert_eq!(store.outbox_len(), 3);
    assert_eq!(store.outbox_bytes(), (13 + 6 + 6) as u64);
    let recovered = store.recover().unwrap();
    assert_eq!(recovered.positions.len(), 8);
    assert!(recovered.positions.values().all(|&position| position == 30));
    // And it takes writes: the agent goes on where it was.
    store.append(&boot_id, &batch(41)).await.unwrap();
    assert_eq!(store.last_sequence(&boot_id).unwrap(), 41);
    store.outbox_remove(pushed).await.unwrap();
    assert_eq!(store.outbox_len(), 2);
    drop(store);
    for replica in [one, two] {
        replica.shutdown().await;
    }
}

/// A replica that joins after the leader dropped the log it would need is sent a snapshot of
/// the store (a file, in chunks, over the real transport) and holds the same store after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_after_the_log_was_dropped_gets_the_store_from_a_snapshot() {
    let tuning = RaftTuning {
        snapshot_entries: 20,
        ..timings()
    };
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let zero = start_tuned(0, dirs[0].path(), tuning).await;
    zero.bootstrap().await.unwrap();
    assert_eq!(agreed_store_leader(&[&zero]).await, 0);
    let store = zero.store();
    let boot_id = [5; 16];
    store.bind_agent(&boot_id, "node-a").await.unwrap();
    for sequence in 1..=100 {
        store.append(&boot_id, &batch(sequence)).await.unwrap();
    }
    let pushed = store.outbox_push(&vec![0xcd; 100_000]).await.unwrap();
    // The entries of the first batches are gone from the leader's log.
    let mut metrics = zero.store_metrics();
    let purged = tokio::time::timeout(
        WITHIN,
        metrics.wait_for(|m| m.purged.is_some_and(|p| p.index >= 50)),
    )
    .await
    .is_ok();
    assert!(
        purged,
        "log purged: {:?}",
        zero.store_metrics().borrow().purged
    );

    let one = start_tuned(1, dirs[1].path(), tuning).await;
    zero.add_member(1, one.address()).await.unwrap();
    let deadline = Instant::now() + WITHIN;
    // Caught up once the install is over: the trees are filled before the store that counts
    // them is swapped in, so the batches can show while the outbox's counts are not yet read.
    while one.store().last_sequence(&boot_id).unwrap() != 100 || one.store().outbox_len() != 1 {
        assert!(Instant::now() < deadline, "replica 1 did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Batch 1's entry is not in any log any more: only a snapshot can have brought it.
    let copy = one.store();
    let sequences: Vec<u64> = copy.batches().map(|b| b.unwrap().1.sequence()).collect();
    assert_eq!(sequences, (1..=100).collect::<Vec<u64>>());
    assert_eq!(copy.batch(&boot_id, 1).unwrap(), Some(batch(1)));
    assert_eq!(
        copy.outbox_oldest(10).unwrap(),
        [(pushed, vec![0xcd; 100_000])]
    );
    assert_eq!((copy.outbox_len(), copy.outbox_bytes()), (1, 100_000));
    drop((store, copy));
    for replica in [zero, one] {
        replica.shutdown().await;
    }
}

/// Starts replica `ordinal` as a StatefulSet pod would: its id from its data dir, then joined
/// through `peers`.
async fn start_pod(ordinal: u32, listener: TcpListener, data: &Path, peers: &[String]) -> Replica {
    let id = mermin_aggregator::replication::identity(data, ordinal).unwrap();
    let replica = Replica::start(id, listener, None, data, timings(), None)
        .await
        .unwrap();
    tokio::time::timeout(WITHIN, replica.join(peers, Duration::from_millis(100)))
        .await
        .expect("joined in time")
        .unwrap();
    replica
}

/// Three replicas on the data dirs `dirs`, started at once as a StatefulSet with parallel pod
/// management starts them: on fresh loopback ports, or again on `peers` (a restart). Returns the
/// peer list and the replicas by ordinal.
async fn start_pods(
    dirs: &[tempfile::TempDir],
    peers: Option<Vec<String>>,
) -> (Vec<String>, [Replica; 3]) {
    let mut listeners = Vec::new();
    for ordinal in 0..3 {
        listeners.push(match &peers {
            Some(peers) => bind_again(&peers[ordinal]).await,
            None => TcpListener::bind("127.0.0.1:0").await.unwrap(),
        });
    }
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let mut listeners = listeners.into_iter();
    let (zero, one, two) = tokio::join!(
        start_pod(0, listeners.next().unwrap(), dirs[0].path(), &peers),
        start_pod(1, listeners.next().unwrap(), dirs[1].path(), &peers),
        start_pod(2, listeners.next().unwrap(), dirs[2].path(), &peers),
    );
    (peers, [zero, one, two])
}

/// A listener on `address` again, once the replica that held it has let it go (bounded).
async fn bind_again(address: &str) -> TcpListener {
    for _ in 0..100 {
        match TcpListener::bind(address).await {
            Ok(bound) => return bound,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("{address} was not let go within 2 s");
}

async fn voters_become(replica: &Replica, expected: &[ReplicaId]) {
    let deadline = Instant::now() + WITHIN;
    let expected: std::collections::BTreeSet<ReplicaId> = expected.iter().copied().collect();
    // Settled, not only listed: a replica taken down while the change that added them is
    // under way (a joint configuration) can wedge the group.
    while replica.store_voters().as_ref() != Some(&expected) {
        assert!(
            Instant::now() < deadline,
            "replica {}: store voters {:?} (leader {:?}), membership leader {:?}; expected {expected:?}",
            replica.id(),
            replica.store_voters(),
            replica.store_leader(),
            replica.leader(),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_form_one_cluster_from_a_peer_list_and_a_lost_disk_comes_back_as_a_new_member() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (peers, [zero, one, two]) = start_pods(&dirs, None).await;
    for (ordinal, replica) in [&zero, &one, &two].into_iter().enumerate() {
        assert_eq!(
            mermin_aggregator::replication::ordinal(replica.id()),
            ordinal as u32
        );
    }
    voters_become(&zero, &[zero.id(), one.id(), two.id()]).await;
    assert_eq!(agreed_leader(&[&zero, &one, &two]).await, zero.id());

    // Replica 1 loses its disk: a new incarnation joins, and the old one leaves.
    let old_one = one.id();
    let address = one.address().to_owned();
    one.shutdown().await;
    let wiped = tempfile::tempdir().unwrap();
    let one = start_pod(1, bind_again(&address).await, wiped.path(), &peers).await;
    assert_ne!(one.id(), old_one, "a new incarnation");
    voters_become(&zero, &[zero.id(), one.id(), two.id()]).await;
    voters_become(&one, &[zero.id(), one.id(), two.id()]).await;
    // It holds what the store group holds: a write on the leader reaches it.
    let store = zero.store();
    store.bind_agent(&[4; 16], "node-z").await.unwrap();
    store.append(&[4; 16], &batch(1)).await.unwrap();
    let deadline = Instant::now() + WITHIN;
    while one.store().last_sequence(&[4; 16]).unwrap() != 1 {
        assert!(Instant::now() < deadline, "the new member did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(store);
    for replica in [zero, one, two] {
        replica.shutdown().await;
    }
}

/// Appends to the store group's log in `data` (its replica stopped) the first step of a change
/// of voters from `from` to `to`: the joint configuration, as a leader lost before the second
/// step leaves it; returns the entry it follows. The sled database is retried while the
/// stopped replica's handles let go.
async fn append_joint_step(
    data: &Path,
    from: &BTreeSet<ReplicaId>,
    to: &BTreeSet<ReplicaId>,
    nodes: &BTreeMap<ReplicaId, BasicNode>,
) -> openraft::LogId<ReplicaId> {
    use openraft::storage::RaftLogStorageExt;
    use openraft::{Entry, EntryPayload, LogId, Membership, storage::RaftLogStorage};
    let mut db = None;
    for _ in 0..100 {
        match DurableDb::open(sled::Config::new(), &data.join("replica")) {
            Ok(opened) => {
                db = Some(opened);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let db = db.expect("the stopped replica's database let go within 2 s");
    let mut log = SledLog::<StoreGroup>::open(&db, STORE_GROUP).unwrap();
    let last = log.get_log_state().await.unwrap().last_log_id.unwrap();
    let joint = Entry::<StoreGroup> {
        log_id: LogId::new(last.leader_id, last.index + 1),
        payload: EntryPayload::Membership(Membership::new(
            vec![from.clone(), to.clone()],
            nodes.clone(),
        )),
    };
    log.blocking_append([joint]).await.unwrap();
    db.flush().unwrap();
    last
}

/// openraft changes voters in two steps, a joint configuration and then the new one, and a
/// leader lost between them leaves the group joint: nothing but another change ends that, and
/// the store group follows the membership group only from a settled configuration. Here every
/// replica's store log ends with the first step of taking replica 2 out (as if the leader that
/// appended it died right after), and the cluster is started again: the next leader finishes
/// the change, and the store group then follows the membership group back to all three voters.
/// Without the finish the store group stays joint for good, and no voters ever settle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_voters_cut_short_by_its_leader_is_finished_by_the_next() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (peers, [zero, one, two]) = start_pods(&dirs, None).await;
    let all = [zero.id(), one.id(), two.id()];
    for replica in [&zero, &one, &two] {
        voters_become(replica, &all).await;
    }
    let nodes: BTreeMap<ReplicaId, BasicNode> = [&zero, &one, &two]
        .iter()
        .map(|r| (r.id(), BasicNode::new(r.address())))
        .collect();
    // All three at once: stopped one by one, the others could elect a leader in between,
    // and the logs would not end alike.
    tokio::join!(zero.shutdown(), one.shutdown(), two.shutdown());

    let from: BTreeSet<ReplicaId> = all.into_iter().collect();
    let to: BTreeSet<ReplicaId> = all[..2].iter().copied().collect();
    let mut ends = Vec::new();
    for dir in &dirs {
        ends.push(append_joint_step(dir.path(), &from, &to, &nodes).await);
    }
    assert!(
        ends.iter().all(|end| *end == ends[0]),
        "the three logs ended alike, so the joint entry is the same everywhere: {ends:?}"
    );

    let (_, [zero, one, two]) = start_pods(&dirs, Some(peers)).await;
    assert_eq!(
        [zero.id(), one.id(), two.id()],
        all,
        "the same replicas, their data kept"
    );
    for replica in [&zero, &one, &two] {
        voters_become(replica, &all).await;
    }
    for replica in [zero, one, two] {
        replica.shutdown().await;
    }
}
