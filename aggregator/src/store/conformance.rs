//! The storage conformance suite: what every [`Storage`] implementation must do, checked
//! against a real instance in a temporary directory, reopened (as after a restart) between the
//! steps whose effects must be durable. `sled_passes_the_suite` runs it on [`SledStore`]; the
//! replication issue runs it on its own store. (Crashes — SIGKILL mid-stream — are exercised
//! against the binary in `tests/recovery.rs` and `node-agent/tests/restarts.rs`.)

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::Duration,
};

use mermin_protocol::{agent::v1::Batch, wire::read::BatchBytes};

use super::{BOOT_ID_LEN, BootId, Change, Checkpoint, Retirement, SledStore, Store, StoreError};
use crate::placement::SHARDS;

/// Opens the implementation under test on a directory (again, for a reopen).
pub(crate) type Opener<'a> = &'a dyn Fn(&Path) -> Store;

#[tokio::test]
async fn sled_passes_the_suite() {
    let open = |path: &Path| {
        // The previous handle's background threads let go of sled's lock shortly after it is
        // dropped: retry, bounded.
        for _ in 0..100 {
            if let Ok(store) = SledStore::open(path) {
                return store;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        SledStore::open(path).unwrap()
    };
    run(&open).await;
}

/// Every check of the suite, against the implementation `open` opens.
pub(crate) async fn run(open: Opener<'_>) {
    batches_survive_reopening_in_order(open).await;
    a_gap_or_a_repeat_is_refused(open).await;
    checkpoints_are_recovered_and_a_batch_goes_once_every_shard_is_past_it(open).await;
    a_checkpoint_writes_only_the_positions_it_is_given(open).await;
    states_survive_many_checkpoints_of_updates_and_removals(open).await;
    the_outbox_keeps_order_count_and_size_across_reopening(open).await;
    checkpoints_of_shards_at_once_keep_every_request(open).await;
    checkpoints_written_together_are_each_recovered(open).await;
    a_boot_id_stays_bound_to_its_first_node(open).await;
    a_superseded_boot_id_is_forgotten_once_every_shard_is_past_it(open).await;
}

fn batch(sequence: u64) -> BatchBytes {
    BatchBytes::encode(&Batch {
        sequence,
        records: vec![mermin_protocol::flow::v1::FlowRecord {
            delta_packets: sequence,
            ..Default::default()
        }],
    })
}

async fn batches_survive_reopening_in_order(open: Opener<'_>) {
    let dir = tempfile::tempdir().unwrap();
    let a = [1; BOOT_ID_LEN];
    let b = [2; BOOT_ID_LEN];
    {
        let store = open(dir.path());
        store.append(&b, &batch(1)).await.unwrap();
        store.append(&a, &batch(1)).await.unwrap();
        store.append(&a, &batch(2)).await.unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.last_sequence(&a).unwrap(), 2);
    assert_eq!(store.last_sequence(&b).unwrap(), 1);
    assert_eq!(store.last_sequence(&[3; BOOT_ID_LEN]).unwrap(), 0);
    let replayed: Vec<(u8, u64)> = store
        .batches()
        .map(|r| r.unwrap())
        .map(|(id, batch)| {
            (
                id[0],
                batch.records().next().unwrap().unwrap().delta_packets,
            )
        })
        .collect();
    assert_eq!(replayed, [(1, 1), (1, 2), (2, 1)]);
    assert_eq!(store.batch(&a, 2).unwrap(), Some(batch(2)));
    assert_eq!(store.batch(&a, 3).unwrap(), None);
}

async fn a_gap_or_a_repeat_is_refused(open: Opener<'_>) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let id = [9; BOOT_ID_LEN];
    store.append(&id, &batch(1)).await.unwrap();
    let gap = store.append(&id, &batch(3)).await.unwrap_err();
    assert_eq!(
        gap.to_string(),
        "store: batch 3 of this agent is not the next one (last durable: 1)"
    );
    assert!(matches!(
        store.append(&id, &batch(1)).await,
        Err(StoreError::OutOfOrder {
            sequence: 1,
            last: 1
        })
    ));
    assert_eq!(store.batches().count(), 1);
    assert_eq!(
        store.write_failure(),
        None,
        "refusing a sequence is no disk failure"
    );
}

async fn checkpoints_are_recovered_and_a_batch_goes_once_every_shard_is_past_it(open: Opener<'_>) {
    let dir = tempfile::tempdir().unwrap();
    let id = [4; BOOT_ID_LEN];
    {
        let store = open(dir.path());
        for sequence in 1..=3 {
            store.append(&id, &batch(sequence)).await.unwrap();
        }
        let changes = [
            Change {
                key: vec![1],
                state: Some(vec![10, 11]),
            },
            Change {
                key: vec![2],
                state: None,
            },
        ];
        let at = |sequence| HashMap::from([(id, sequence)]);
        store
            .checkpoint(&[Checkpoint {
                shard: 0,
                positions: &at(2),
                changes: &changes,
                outbox: &[vec![7, 7]],
            }])
            .unwrap();
        let left: Vec<u64> = store.batches().map(|b| b.unwrap().1.sequence()).collect();
        assert_eq!(left, [1, 2, 3], "the other shards have not checkpointed");
        for shard in 1..SHARDS {
            store
                .checkpoint(&[Checkpoint {
                    shard,
                    positions: &at(if shard == 5 { 1 } else { 3 }),
                    changes: &[],
                    outbox: &[],
                }])
                .unwrap();
        }
    }
    let store = open(dir.path());
    let recovered = store.recover().unwrap();
    assert_eq!(recovered.positions.len(), usize::from(SHARDS));
    assert_eq!(recovered.positions[&(0, id)], 2);
    assert_eq!(recovered.positions[&(5, id)], 1);
    assert_eq!(recovered.positions[&(7, id)], 3);
    assert_eq!(recovered.connections, [vec![10, 11]]);
    let left: Vec<u64> = store.batches().map(|b| b.unwrap().1.sequence()).collect();
    assert_eq!(left, [2, 3], "shard 5 still needs batch 2, shard 0 batch 3");
    assert_eq!(store.outbox_oldest(10).unwrap()[0].1, [7, 7]);
    assert_eq!(store.last_sequence(&id).unwrap(), 3);
}

/// Enough checkpoints (12 MB of states) that an implementation which compacts does so.
async fn states_survive_many_checkpoints_of_updates_and_removals(open: Opener<'_>) {
    let dir = tempfile::tempdir().unwrap();
    let mut expected: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut store = open(dir.path());
    for round in 0..24u16 {
        if round == 12 {
            drop(store);
            store = open(dir.path());
        }
        let mut changes = Vec::new();
        for i in 0..500u16 {
            let key = ((round * 500 + i) % 2_000).to_be_bytes().to_vec();
            // The state names its key and round, so that a stale or misplaced one shows.
            let mut state = key.clone();
            state.extend(std::iter::repeat_n(round as u8, 1_000));
            changes.push(Change {
                key,
                state: Some(state),
            });
        }
        changes.push(Change {
            key: ((round * 13) % 2_000).to_be_bytes().to_vec(),
            state: None,
        });
        for change in &changes {
            match &change.state {
                Some(state) => expected.insert(change.key.clone(), state.clone()),
                None => expected.remove(&change.key),
            };
        }
        // A key belongs to one shard: here its number modulo 3.
        for shard in 0..3 {
            let changes: Vec<Change> = changes
                .iter()
                .filter(|c| u16::from_be_bytes([c.key[0], c.key[1]]) % 3 == shard)
                .cloned()
                .collect();
            store
                .checkpoint(&[Checkpoint {
                    shard,
                    positions: &HashMap::new(),
                    changes: &changes,
                    outbox: &[],
                }])
                .unwrap();
        }
    }
    drop(store);
    let mut recovered = open(dir.path()).recover().unwrap().connections;
    recovered.sort();
    let mut expected: Vec<Vec<u8>> = expected.into_values().collect();
    expected.sort();
    // The last four rounds' removals were not written again.
    assert_eq!(recovered.len(), 2_000 - 4);
    assert!(recovered == expected, "the recovered states differ");
}

async fn a_checkpoint_writes_only_the_positions_it_is_given(open: Opener<'_>) {
    let dir = tempfile::tempdir().unwrap();
    let agents: Vec<[u8; BOOT_ID_LEN]> = (0..50u8).map(|i| [i; BOOT_ID_LEN]).collect();
    {
        let store = open(dir.path());
        let all: HashMap<_, _> = agents.iter().map(|a| (*a, 7)).collect();
        store
            .checkpoint(&[Checkpoint {
                shard: 3,
                positions: &all,
                changes: &[],
                outbox: &[],
            }])
            .unwrap();
        store
            .checkpoint(&[Checkpoint {
                shard: 3,
                positions: &HashMap::from([(agents[4], 9)]),
                changes: &[],
                outbox: &[],
            }])
            .unwrap();
    }
    let recovered = open(dir.path()).recover().unwrap();
    assert_eq!(recovered.positions.len(), 50);
    assert_eq!(recovered.positions[&(3, agents[4])], 9);
    assert_eq!(
        recovered.positions[&(3, agents[5])],
        7,
        "kept as written before"
    );
}

async fn the_outbox_keeps_order_count_and_size_across_reopening(open: Opener<'_>) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let first = store.outbox_push(&[1; 10]).await.unwrap();
        store.outbox_push(&[2; 20]).await.unwrap();
        store
            .checkpoint(&[Checkpoint {
                shard: 0,
                positions: &HashMap::new(),
                changes: &[],
                outbox: &[vec![3; 30], vec![4; 40]],
            }])
            .unwrap();
        assert_eq!((store.outbox_len(), store.outbox_bytes()), (4, 100));
        store.outbox_remove(first).await.unwrap();
        assert_eq!((store.outbox_len(), store.outbox_bytes()), (3, 90));
    }
    let store = open(dir.path());
    assert_eq!((store.outbox_len(), store.outbox_bytes()), (3, 90));
    let firsts: Vec<u8> = store
        .outbox_oldest(10)
        .unwrap()
        .iter()
        .map(|(_, request)| request[0])
        .collect();
    assert_eq!(firsts, [2, 3, 4], "oldest first");
    let ids: Vec<u64> = store
        .outbox_oldest(10)
        .unwrap()
        .iter()
        .map(|(id, _)| *id)
        .collect();
    let after: Vec<u8> = store
        .outbox_after(ids[0], 10)
        .unwrap()
        .iter()
        .map(|(_, request)| request[0])
        .collect();
    assert_eq!(after, [3, 4], "the entries after an id, oldest first");
    assert!(store.outbox_after(ids[2], 10).unwrap().is_empty());
}

/// The shards checkpoint on the blocking pool, at once: each checkpoint's requests are queued,
/// none in another's place.
async fn checkpoints_of_shards_at_once_keep_every_request(open: Opener<'_>) {
    const ROUNDS: u8 = 10;
    const REQUESTS: u8 = 3;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // Request (shard, round, i): 3 bytes saying which, padded to a size of its own.
    let request = |shard: u16, round: u8, i: u8| {
        let mut request = vec![shard as u8, round, i];
        request.resize(3 + usize::from(i), 0);
        request
    };
    // As the shards run them: on the blocking pool.
    let checkpoints: Vec<_> = (0..SHARDS)
        .map(|shard| {
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                for round in 0..ROUNDS {
                    let outbox: Vec<Vec<u8>> =
                        (0..REQUESTS).map(|i| request(shard, round, i)).collect();
                    store
                        .checkpoint(&[Checkpoint {
                            shard,
                            positions: &HashMap::new(),
                            changes: &[],
                            outbox: &outbox,
                        }])
                        .unwrap();
                }
            })
        })
        .collect();
    for checkpoint in checkpoints {
        checkpoint.await.unwrap();
    }
    let written = usize::from(SHARDS) * usize::from(ROUNDS) * usize::from(REQUESTS);
    let bytes = (u64::from(SHARDS) * u64::from(ROUNDS)) * (3 + 4 + 5);
    assert_eq!((store.outbox_len(), store.outbox_bytes()), (written, bytes));
    let stored = store.outbox_oldest(written + 1).unwrap();
    let mut found: Vec<Vec<u8>> = stored.into_iter().map(|(_, r)| r).collect();
    found.sort();
    let mut expected: Vec<Vec<u8>> = (0..SHARDS)
        .flat_map(|shard| {
            (0..ROUNDS).flat_map(move |round| (0..REQUESTS).map(move |i| request(shard, round, i)))
        })
        .collect();
    expected.sort();
    assert_eq!(found, expected, "every request of every checkpoint, once");
    // In each shard's order.
    for shard in 0..SHARDS {
        let order: Vec<(u8, u8)> = store
            .outbox_oldest(written)
            .unwrap()
            .iter()
            .filter(|(_, r)| u16::from(r[0]) == shard)
            .map(|(_, r)| (r[1], r[2]))
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(
            order, sorted,
            "shard {shard}'s requests in the order checkpointed"
        );
    }
}

/// The checkpoints of several shards in one write: each shard's positions and states
/// recovered, the requests in the order given, and a shard named twice refused (nothing written).
async fn checkpoints_written_together_are_each_recovered(open: Opener<'_>) {
    let dir = tempfile::tempdir().unwrap();
    let id = [6; BOOT_ID_LEN];
    let change = |key: u8| Change {
        key: vec![key],
        state: Some(vec![key, key]),
    };
    {
        let store = open(dir.path());
        for sequence in 1..=2 {
            store.append(&id, &batch(sequence)).await.unwrap();
        }
        let at = |sequence| HashMap::from([(id, sequence)]);
        let (one, two) = (at(1), at(2));
        let changes = [vec![change(1)], vec![change(2), change(3)], vec![]];
        let outboxes = [vec![vec![1]], vec![], vec![vec![3], vec![3, 3]]];
        let checkpoints: Vec<Checkpoint<'_>> = (0..3)
            .map(|i| Checkpoint {
                shard: [3, 1, 6][i],
                positions: if i == 1 { &one } else { &two },
                changes: &changes[i],
                outbox: &outboxes[i],
            })
            .collect();
        store.checkpoint(&checkpoints).unwrap();
        let twice = [checkpoints[0], checkpoints[0]];
        assert_eq!(
            store.checkpoint(&twice).unwrap_err().to_string(),
            "store: two checkpoints of shard 3 in one write"
        );
    }
    let store = open(dir.path());
    let recovered = store.recover().unwrap();
    let positions: Vec<((u16, BootId), u64)> = {
        let mut p: Vec<_> = recovered.positions.into_iter().collect();
        p.sort();
        p
    };
    assert_eq!(positions, [((1, id), 1), ((3, id), 2), ((6, id), 2)]);
    let mut states = recovered.connections;
    states.sort();
    assert_eq!(states, [vec![1, 1], vec![2, 2], vec![3, 3]]);
    assert_eq!(
        queued_requests(&*store),
        [vec![1], vec![3], vec![3, 3]],
        "in the order given, once"
    );
    assert_eq!((store.outbox_len(), store.outbox_bytes()), (3, 4));
}

async fn a_boot_id_stays_bound_to_its_first_node(open: Opener<'_>) {
    let dir = tempfile::tempdir().unwrap();
    let id = [5; BOOT_ID_LEN];
    {
        let store = open(dir.path());
        assert_eq!(store.bind_agent(&id, "node-a").await.unwrap(), None);
        assert_eq!(
            store.bind_agent(&id, "node-a").await.unwrap(),
            Some("node-a".into())
        );
        store.append(&id, &batch(1)).await.unwrap();
    }
    let store = open(dir.path());
    assert_eq!(
        store.bind_agent(&id, "node-b").await.unwrap(),
        Some("node-a".into())
    );
}

/// Every shard's checkpoint at `sequence` of `boot_id` (`except` stays where it was).
fn every_shard_at(store: &Store, boot_id: BootId, sequence: u64, except: Option<u16>) {
    for shard in (0..SHARDS).filter(|shard| Some(*shard) != except) {
        store
            .checkpoint(&[Checkpoint {
                shard,
                positions: &HashMap::from([(boot_id, sequence)]),
                changes: &[],
                outbox: &[],
            }])
            .unwrap();
    }
}

async fn a_superseded_boot_id_is_forgotten_once_every_shard_is_past_it(open: Opener<'_>) {
    let dir = tempfile::tempdir().unwrap();
    let [old, behind, streaming, silent, newest, other] =
        [10, 11, 12, 13, 14, 15].map(|i| [i; BOOT_ID_LEN]);
    {
        let store = open(dir.path());
        // Bound in this order on node-a: `newest` last. `other` is the only one of node-b.
        for id in [old, behind, streaming, silent, newest] {
            assert_eq!(store.bind_agent(&id, "node-a").await.unwrap(), None);
        }
        assert_eq!(store.bind_agent(&other, "node-b").await.unwrap(), None);
        for id in [old, behind, streaming, newest, other] {
            store.append(&id, &batch(1)).await.unwrap();
            store.append(&id, &batch(2)).await.unwrap();
        }
        for id in [old, streaming, newest, other] {
            every_shard_at(&store, id, 2, None);
        }
        every_shard_at(&store, behind, 2, Some(6));
        let open_streams = HashSet::from([streaming]);
        assert_eq!(
            store.retire_superseded(&open_streams).unwrap(),
            Retirement {
                retired: vec![old, silent],
                known: 4,
            },
            "the newest of a node, one with a stream open and one a shard is behind are kept"
        );
        // A checkpoint that raced the retirement writes a forgotten position back.
        every_shard_at(&store, old, 2, None);
    }
    let store = open(dir.path());
    assert_eq!(store.last_sequence(&old).unwrap(), 0);
    assert_eq!(store.last_sequence(&behind).unwrap(), 2);
    let positions = store.recover().unwrap().positions;
    assert_eq!(
        positions.len(),
        8 * 3 + 7 + 8,
        "old's written-back positions too"
    );
    assert_eq!(
        store.retire_superseded(&HashSet::new()).unwrap(),
        Retirement {
            retired: vec![streaming],
            known: 3,
        }
    );
    let positions = store.recover().unwrap().positions;
    let mut agents: Vec<u8> = positions.keys().map(|(_, id)| id[0]).collect();
    agents.sort();
    agents.dedup();
    assert_eq!(agents, [11, 14, 15], "behind, newest and other");
    assert_eq!(
        store.bind_agent(&old, "node-c").await.unwrap(),
        None,
        "a forgotten boot id is a new one"
    );
}

/// The requests in `store`'s outbox, oldest first (at most 100), without their ids.
pub(crate) fn queued_requests(store: &dyn super::Storage) -> Vec<Vec<u8>> {
    let queued = store.outbox_oldest(100).unwrap();
    queued.into_iter().map(|(_, request)| request).collect()
}
