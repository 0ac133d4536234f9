//! Applying ops through [`PartitionStateMachine`], snapshot round trips, and the snapshot
//! decoder's behaviour on damaged input.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use bytes::Bytes;
use futures::stream;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use proptest::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use super::snapshot::{self, SnapshotError, MAGIC};
use super::{
    CommittedLeaderId, Entry, EntryPayload, LogId, Membership, PartitionStateMachine, ReplicaNode,
    Snapshot, SnapshotMeta,
};
use crate::storage::{
    CdcChange, CdcSnapshot, Command, Condition, LeaseDecision, Op, Outcome, PartitionId,
    PartitionSnapshot, PartitionState, RequestId, XidGuard, REQUEST_TTL_MS, UNKNOWN_XMIN,
};

const P: PartitionId = PartitionId(3);

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId { term, node_id: 1 }, index)
}

fn normal(index: u64, op: Op) -> Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(op.into()),
    }
}

fn membership(index: u64) -> Entry {
    let nodes = [
        (1, "10.0.0.1:7001"),
        (2, "10.0.0.2:7001"),
        (9, "10.0.0.9:7001"),
    ]
    .map(|(id, addr)| (id, ReplicaNode { addr: addr.into() }));
    let m = Membership::new(
        vec![[1, 2].into()],
        nodes.into_iter().collect::<BTreeMap<_, _>>(),
    )
    .unwrap();
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Membership(m),
    }
}

fn blank(index: u64) -> Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Blank,
    }
}

fn op(now_ms: u64, cmd: Command) -> Op {
    Op { now_ms, cmd }
}

fn set(key: &str, value: &str, expire_at_ms: Option<u64>) -> Command {
    Command::Set {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        expire_at_ms,
        keep_ttl: false,
        condition: Condition::Always,
        source_lsn: 0,
    }
}

fn incr(key: &str, delta: i64) -> Command {
    Command::Incr {
        key: Bytes::copy_from_slice(key.as_bytes()),
        delta,
    }
}

fn delete(key: &str) -> Command {
    Command::Delete {
        key: Bytes::copy_from_slice(key.as_bytes()),
    }
}

/// A mixed op sequence: sets with and without deadlines, incr (fine, on a non-integer, on a
/// missing key), deletes, a CAS, an expiry, a reclaim, a cache-aside fill and a CDC batch
/// (so snapshots carry source LSNs and CDC state).
fn ops() -> Vec<Op> {
    vec![
        op(1_000, set("a", "1", None)),
        op(1_001, set("b", "hello", Some(5_000))),
        op(1_002, incr("a", 41)),
        op(1_003, incr("b", 1)),
        op(1_004, incr("c", -7)),
        op(1_005, delete("a")),
        op(1_006, set("a", "again", None)),
        op(
            1_007,
            Command::Set {
                key: Bytes::from_static(b"c"),
                value: Bytes::from_static(b"cas"),
                expire_at_ms: None,
                keep_ttl: false,
                condition: Condition::IfVersion(7),
                source_lsn: 0,
            },
        ),
        op(1_008, delete("missing")),
        op(1_009, set("d", "short-lived", Some(2_000))),
        op(3_000, Command::Reclaim { max: 10 }),
        op(3_001, incr("c", 1)),
        op(
            3_002,
            Command::Set {
                key: Bytes::from_static(b"e"),
                value: Bytes::from_static(b"filled"),
                expire_at_ms: None,
                keep_ttl: false,
                condition: Condition::Always,
                source_lsn: 5,
            },
        ),
        op(
            3_003,
            Command::Cdc {
                lsn: 7,
                watermark: 9,
                fence: 1,
                tombstone_until_ms: 600_000,
                changes: vec![
                    CdcChange::Put {
                        key: Bytes::from_static(b"p:1"),
                        value: Bytes::from_static(b"row"),
                        expire_at_ms: Some(900_000),
                    },
                    CdcChange::Invalidate {
                        key: Bytes::from_static(b"b"),
                    },
                    CdcChange::InvalidatePrefix {
                        prefix: Bytes::from_static(b"q:"),
                    },
                ],
            },
        ),
    ]
}

/// Entries: a blank at 1, a membership at 2, then the ops from index 3 on.
fn entries(ops: &[Op]) -> Vec<Entry> {
    let mut out = vec![blank(1), membership(2)];
    out.extend(ops.iter().cloned().zip(3..).map(|(op, i)| normal(i, op)));
    out
}

async fn apply_all(sm: &mut PartitionStateMachine, entries: Vec<Entry>) {
    sm.apply(stream::iter(entries.into_iter().map(|e| Ok((e, None)))))
        .await
        .unwrap();
}

#[test]
fn outcomes_and_versions_match_a_bare_partition_state_at_log_indexes() {
    let sm = PartitionStateMachine::new(P);
    let mut bare = PartitionState::new(P);
    for entry in entries(&ops()) {
        let index = entry.log_id.index;
        let expected = match &entry.payload {
            EntryPayload::Normal(p) => Some(bare.apply(index, &p.op)),
            _ => None,
        };
        let got = sm.apply_entry(entry.clone()).unwrap();
        assert_eq!(got, expected, "entry {index}");
        if let (
            Some(Outcome::Set {
                applied: true,
                version,
                ..
            }),
            EntryPayload::Normal(proposal),
        ) = (&got, &entry.payload)
        {
            let op = &proposal.op;
            assert_eq!(*version, index, "a write's version is its log index");
            let key = op.cmd.key().unwrap();
            let view = sm.with_state(|s| s.get(key, op.now_ms)).unwrap().unwrap();
            assert_eq!(view.version, index);
        }
    }
    assert_eq!(sm.with_state(|s| s.snapshot()).unwrap(), bare.snapshot());
    assert_eq!(sm.last_applied_index().unwrap(), 2 + ops().len() as u64);
    // "a" now holds "again": incr is refused but the index still counts as applied.
    assert_eq!(
        sm.apply_entry(normal(100, op(3_002, incr("a", 0))))
            .unwrap(),
        Some(Outcome::Incr(Err(crate::storage::IncrError::NotAnInteger)))
    );
}

#[test]
fn blank_and_membership_entries_leave_data_alone() {
    let sm = PartitionStateMachine::new(P);
    assert_eq!(sm.apply_entry(blank(1)).unwrap(), None);
    assert_eq!(sm.apply_entry(membership(2)).unwrap(), None);
    assert_eq!(sm.last_applied_index().unwrap(), 2);
    let data = sm.with_state(|s| s.snapshot()).unwrap();
    assert_eq!(data.applied_index, 0);
    assert!(data.entries.is_empty());
    // The first op lands at its log index, not at applied_index + 1.
    assert_eq!(
        sm.apply_entry(normal(3, op(1, set("k", "v", None))))
            .unwrap(),
        Some(Outcome::Set {
            applied: true,
            version: 3,
            newer_lsn: 0,
        })
    );
}

#[test]
fn applying_an_old_entry_is_an_error_not_a_panic() {
    let sm = PartitionStateMachine::new(P);
    sm.apply_entry(normal(5, op(1, set("k", "v", None))))
        .unwrap();
    let err = sm
        .apply_entry(normal(4, op(1, set("k", "w", None))))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    let err = sm.apply_entry(blank(5)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}

/// A state machine that applied [`ops`] and the snapshot it sends of them: building
/// only marks the point (empty data, metadata as of the last apply); the data is encoded
/// when a snapshot is asked for.
async fn leader_with_snapshot() -> (PartitionStateMachine, Snapshot) {
    let mut leader = PartitionStateMachine::new(P);
    apply_all(&mut leader, entries(&ops())).await;
    let marked = leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert!(marked.snapshot.is_empty(), "building encodes nothing");
    let snap = leader.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(snap.meta, marked.meta);
    (leader, snap)
}

#[tokio::test]
async fn snapshot_installs_into_an_identical_state() {
    let (mut leader, snap) = leader_with_snapshot().await;
    assert_eq!(
        snap.meta.last_log_id,
        Some(log_id(1, 2 + ops().len() as u64))
    );
    assert_eq!(snap.meta.last_membership.log_id(), &Some(log_id(1, 2)));
    let current = leader.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);
    assert_eq!(current.snapshot, snap.snapshot);

    let mut follower = PartitionStateMachine::new(P);
    follower
        .install_snapshot(&snap.meta, snap.snapshot.clone())
        .await
        .unwrap();
    assert_eq!(
        follower.with_state(|s| s.snapshot()).unwrap(),
        leader.with_state(|s| s.snapshot()).unwrap()
    );
    assert_eq!(
        follower.applied_state().await.unwrap(),
        leader.applied_state().await.unwrap()
    );
    assert_eq!(
        follower.get_current_snapshot().await.unwrap().unwrap().meta,
        snap.meta
    );

    // Both continue identically from the snapshot.
    let next = 3 + ops().len() as u64;
    for (i, cmd) in [set("a", "x", None), incr("c", 5), delete("b")]
        .into_iter()
        .enumerate()
    {
        let e = normal(next + i as u64, op(4_000, cmd));
        assert_eq!(
            leader.apply_entry(e.clone()).unwrap(),
            follower.apply_entry(e).unwrap()
        );
    }
    assert_eq!(
        follower.with_state(|s| s.snapshot()).unwrap(),
        leader.with_state(|s| s.snapshot()).unwrap()
    );
}

#[tokio::test]
async fn install_rejects_another_partition_or_mismatched_meta() {
    let (_, snap) = leader_with_snapshot().await;

    let mut other = PartitionStateMachine::new(PartitionId(4));
    let err = other
        .install_snapshot(&snap.meta, snap.snapshot.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);

    let mut meta = snap.meta.clone();
    meta.last_log_id = Some(log_id(2, 99));
    let mut follower = PartitionStateMachine::new(P);
    let err = follower
        .install_snapshot(&meta, snap.snapshot.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(follower.get_current_snapshot().await.unwrap().is_none());
}

/// A valid encoded snapshot of the op sequence (built once).
fn encoded() -> Bytes {
    static ENCODED: OnceLock<Bytes> = OnceLock::new();
    ENCODED
        .get_or_init(|| {
            let mut sm = PartitionStateMachine::new(P);
            for e in entries(&ops()) {
                sm.apply_entry(e).unwrap();
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async {
                sm.build_snapshot().await.unwrap();
                sm.get_current_snapshot().await.unwrap().unwrap().snapshot
            })
        })
        .clone()
}

/// Rewrites the trailing checksum so that a mutation reaches the field parser.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() >= 8 {
        let body = bytes.len() - 8;
        let sum = xxh3_64(&bytes[..body]);
        bytes[body..].copy_from_slice(&sum.to_le_bytes());
    }
    bytes
}

#[test]
fn encode_decode_round_trip() {
    let bytes = encoded();
    assert_eq!(&bytes[..8], &MAGIC);
    let decoded = snapshot::decode(&bytes).unwrap();
    assert_eq!(decoded.partition, P);
    assert_eq!(
        decoded.meta.last_log_id,
        Some(log_id(1, 2 + ops().len() as u64))
    );
    assert_eq!(
        snapshot::encode(decoded.partition, &decoded.meta, &decoded.state),
        bytes,
        "re-encoding is byte-identical"
    );
}

#[test]
fn damaged_snapshots_are_errors() {
    // The offsets below are those of format 4 (the xid section of format 5 comes last and
    // has its own test).
    let current = snapshot::decode(&encoded()).unwrap();
    let bytes = snapshot::encode_version(4, P, &current.meta, &current.state).to_vec();

    for len in [0, 3, 8, 10, 17, 40, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            snapshot::decode(&bytes[..len]).is_err(),
            "truncated to {len}"
        );
    }

    let mut wrong_magic = bytes.clone();
    wrong_magic[0] ^= 0xff;
    assert_eq!(snapshot::decode(&wrong_magic), Err(SnapshotError::BadMagic));

    for version in [0, snapshot::FORMAT_VERSION + 1, 0x0102] {
        let mut wrong_version = bytes.clone();
        wrong_version[8..10].copy_from_slice(&u16::to_le_bytes(version));
        assert_eq!(
            snapshot::decode(&wrong_version),
            Err(SnapshotError::UnsupportedVersion { version })
        );
    }

    for bit in [
        8 * 12,
        8 * 40 + 3,
        8 * (bytes.len() - 20) + 7,
        8 * bytes.len() - 1,
    ] {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(
            matches!(
                snapshot::decode(&flipped),
                Err(SnapshotError::Checksum { .. })
            ),
            "bit {bit}"
        );
    }

    // Past the checksum: an entry count larger than the bytes can hold.
    let body = bytes.len() - 8;
    let decoded = snapshot::decode(&bytes).unwrap();
    let cdc_len = cdc_section_len(&decoded.state.cdc);
    let count_at = {
        // The entry count is the u64 just before the entries.
        let entries_len: usize = decoded
            .state
            .entries
            .iter()
            .map(|e| {
                4 + e.key.len()
                    + 4
                    + e.value.len()
                    + 8
                    + 1
                    + if e.expire_at_ms.is_some() { 8 } else { 0 }
                    + 8
            })
            .sum();
        // After the CDC section: the request and lease sections, just their counts
        // when empty.
        assert!(decoded.state.requests.is_empty());
        assert!(decoded.state.leases.is_empty());
        body - 8 - 8 - cdc_len - entries_len - 8
    };
    let mut huge = bytes.clone();
    huge[count_at..count_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        snapshot::decode(&reseal(huge)),
        Err(SnapshotError::Truncated { field: "entries" })
    );

    let mut trailing = bytes[..body].to_vec();
    trailing.extend_from_slice(&[0, 0, 0]);
    trailing.extend_from_slice(&[0; 8]);
    assert_eq!(
        snapshot::decode(&reseal(trailing)),
        Err(SnapshotError::TrailingBytes { len: 3 })
    );

    // The lease section (format 4) is last, after the request section (format 3): here
    // just their counts, 0.
    let mut huge = bytes.clone();
    huge[body - 8..body].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        snapshot::decode(&reseal(huge)),
        Err(SnapshotError::Truncated { field: "leases" })
    );
    let cdc_end = body - 16;
    let mut huge = bytes.clone();
    huge[cdc_end..body - 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        snapshot::decode(&reseal(huge)),
        Err(SnapshotError::Truncated { field: "requests" })
    );

    // The CDC section: counts larger than the bytes can hold, keys out of order.
    let cdc_at = cdc_end - cdc_len;
    let tombstones_at = cdc_at + 24;
    let mut huge = bytes.clone();
    huge[tombstones_at..tombstones_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        snapshot::decode(&reseal(huge)),
        Err(SnapshotError::Truncated {
            field: "tombstones"
        })
    );
    let prefixes_at = cdc_end
        - 8
        - decoded
            .state
            .cdc
            .prefixes
            .iter()
            .map(|(p, _, _)| 4 + p.len() + 8)
            .sum::<usize>();
    let mut huge = bytes.clone();
    huge[prefixes_at..prefixes_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        snapshot::decode(&reseal(huge)),
        Err(SnapshotError::Truncated { field: "prefixes" })
    );
    let mut unordered = decoded.state.clone();
    unordered.cdc.tombstones.reverse();
    assert!(unordered.cdc.tombstones.len() >= 2);
    assert_eq!(
        snapshot::decode(&snapshot::encode(P, &decoded.meta, &unordered)),
        Err(SnapshotError::Invalid {
            what: "tombstone keys not strictly ascending"
        })
    );
    let mut duplicate = decoded.state.clone();
    let first = duplicate.cdc.prefixes[0].clone();
    duplicate.cdc.prefixes.push(first);
    assert_eq!(
        snapshot::decode(&snapshot::encode(P, &decoded.meta, &duplicate)),
        Err(SnapshotError::Invalid {
            what: "tombstone prefixes not strictly ascending"
        })
    );
}

/// Encoded length of a version-2 CDC section.
fn cdc_section_len(cdc: &CdcSnapshot) -> usize {
    3 * 8
        + 8
        + cdc
            .tombstones
            .iter()
            .map(|(k, _, _, _)| 4 + k.len() + 16)
            .sum::<usize>()
        + 8
        + cdc
            .prefixes
            .iter()
            .map(|(p, _, _)| 4 + p.len() + 8)
            .sum::<usize>()
}

#[test]
fn version_2_carries_source_lsns_and_cdc_state() {
    let decoded = snapshot::decode(&encoded()).unwrap();
    let state = &decoded.state;
    let lsn_of = |key: &[u8]| {
        state
            .entries
            .iter()
            .find(|e| e.key.as_ref() == key)
            .map(|e| e.source_lsn)
    };
    assert_eq!(lsn_of(b"e"), Some(5));
    assert_eq!(lsn_of(b"p:1"), Some(7));
    assert_eq!(lsn_of(b"c"), Some(0));
    assert_eq!(lsn_of(b"a"), Some(0));
    assert_eq!(lsn_of(b"b"), None, "invalidated by the batch");
    // The batch is a `Command::Cdc` from before xids: its transaction is unknown.
    let guard = XidGuard {
        xid: 0,
        min_xmin: UNKNOWN_XMIN,
    };
    assert_eq!(
        state.cdc,
        CdcSnapshot {
            watermark: 9,
            fence: 1,
            floor: 0,
            xmin_floor: 0,
            tombstones: vec![
                (Bytes::from_static(b"b"), 7, 600_000, guard),
                (Bytes::from_static(b"p:1"), 7, 600_000, guard),
            ],
            prefixes: vec![(Bytes::from_static(b"q:"), 7, guard)],
        }
    );
    // Restored, the state refuses the same stale fills as the original.
    let mut restored = PartitionState::restore(P, decoded.state.clone());
    let fill = Op {
        now_ms: 3_100,
        cmd: Command::Set {
            key: Bytes::from_static(b"q:9"),
            value: Bytes::from_static(b"x"),
            expire_at_ms: None,
            keep_ttl: false,
            condition: Condition::Always,
            source_lsn: 7,
        },
    };
    let index = decoded.state.applied_index + 1;
    assert_eq!(
        restored.apply(index, &fill),
        Outcome::Set {
            applied: false,
            version: 0,
            newer_lsn: 7
        }
    );
}

/// Exactly-once writes: a second entry with the same request id (a client's retry,
/// committed after the first attempt also committed) answers the first outcome and
/// changes nothing, also on a replica restored from a snapshot; the id is forgotten
/// after `REQUEST_TTL_MS` of op time.
#[test]
fn a_request_id_applies_once_and_survives_snapshots() {
    let set = |value: &'static [u8], now_ms: u64| Op {
        now_ms,
        cmd: Command::Set {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(value),
            expire_at_ms: None,
            keep_ttl: false,
            condition: Condition::Always,
            source_lsn: 0,
        },
    };
    let id = Some(RequestId { client: 9, seq: 1 });
    let mut state = PartitionState::new(P);
    let first = state.apply_once(1, &set(b"a", 1_000), id, false);
    assert_eq!(
        first,
        Outcome::Set {
            applied: true,
            version: 1,
            newer_lsn: 0
        }
    );
    state.apply_once(2, &set(b"other", 1_001), None, false);
    // The retry of the first write (a later log entry) is not applied again.
    assert_eq!(state.apply_once(3, &set(b"a", 1_002), id, false), first);
    assert_eq!(
        state.get(b"k", 1_002).map(|e| e.value),
        Some(Bytes::from_static(b"other"))
    );
    assert_eq!(state.applied_index(), 3);

    // The remembered ids travel in snapshots (format 3).
    let meta = snapshot::decode(&encoded()).unwrap().meta;
    let bytes = snapshot::encode(P, &meta, &state.snapshot());
    let decoded = snapshot::decode(&bytes).unwrap();
    assert_eq!(decoded.state.requests.len(), 1);
    let mut restored = PartitionState::restore(P, decoded.state);
    assert_eq!(restored.apply_once(4, &set(b"a", 1_003), id, false), first);
    assert_eq!(
        restored.get(b"k", 1_003).map(|e| e.value),
        Some(Bytes::from_static(b"other"))
    );

    // Forgotten after the TTL: the same id applies as a new write.
    let later = 1_000 + REQUEST_TTL_MS;
    assert_eq!(
        restored.apply_once(5, &set(b"a", later), id, false),
        Outcome::Set {
            applied: true,
            version: 5,
            newer_lsn: 0
        }
    );
    assert_eq!(restored.remembered_requests(), 1);
}

#[test]
fn version_1_snapshots_still_decode() {
    let decoded = snapshot::decode(&encoded()).unwrap();
    // What version 1 can hold: no source LSNs, no CDC state.
    let v1_state = PartitionSnapshot {
        applied_index: decoded.state.applied_index,
        entries: decoded
            .state
            .entries
            .iter()
            .cloned()
            .map(|mut e| {
                e.source_lsn = 0;
                e
            })
            .collect(),
        cdc: CdcSnapshot::default(),
        requests: Vec::new(),
        leases: Vec::new(),
    };
    let v1 = snapshot::encode_v1(P, &decoded.meta, &decoded.state);
    assert_eq!(u16::from_le_bytes([v1[8], v1[9]]), 1);
    let from_v1 = snapshot::decode(&v1).unwrap();
    assert_eq!(from_v1.partition, P);
    assert_eq!(from_v1.meta, decoded.meta);
    assert_eq!(from_v1.state, v1_state);
    // Re-encoded, it becomes version 2 and round-trips.
    let v2 = snapshot::encode(P, &from_v1.meta, &from_v1.state);
    assert_eq!(u16::from_le_bytes([v2[8], v2[9]]), snapshot::FORMAT_VERSION);
    assert_eq!(snapshot::decode(&v2).unwrap().state, v1_state);

    // Version 1 keeps all its checks.
    let v1 = v1.to_vec();
    for len in [0, 10, 40, v1.len() / 2, v1.len() - 1] {
        assert!(snapshot::decode(&v1[..len]).is_err(), "truncated to {len}");
    }
    let mut flipped = v1.clone();
    flipped[60] ^= 4;
    assert!(matches!(
        snapshot::decode(&flipped),
        Err(SnapshotError::Checksum { .. })
    ));
    // A version-1 body read as version 2 is invalid, and the reverse.
    let mut as_v2 = v1.clone();
    as_v2[8] = 2;
    assert!(snapshot::decode(&reseal(as_v2)).is_err());
    let mut as_v1 = encoded().to_vec();
    as_v1[8] = 1;
    assert!(snapshot::decode(&reseal(as_v1)).is_err());
    let mut trailing = v1[..v1.len() - 8].to_vec();
    trailing.push(0);
    trailing.extend_from_slice(&[0; 8]);
    assert_eq!(
        snapshot::decode(&reseal(trailing)),
        Err(SnapshotError::TrailingBytes { len: 1 })
    );
}

#[test]
fn op_display_names_no_key_bytes() {
    let cdc = ops().pop().unwrap();
    assert_eq!(cdc.to_string(), "cdc(lsn 7, 3 changes)@3003");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random truncations, bit flips, overwrites and insertions never panic; with the
    /// checksum fixed up afterwards they reach (and must not crash) the field parser.
    #[test]
    fn mutated_snapshots_never_panic(
        edits in prop::collection::vec((0usize..4, any::<prop::sample::Index>(), any::<u8>()), 1..6),
        reseal_after in any::<bool>(),
    ) {
        let mut bytes = encoded().to_vec();
        for (kind, at, byte) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match kind {
                0 => bytes.truncate(i),
                1 => bytes[i] ^= 1 << (byte % 8),
                2 => bytes[i] = byte,
                _ => bytes.insert(i, byte),
            }
        }
        let bytes = if reseal_after { reseal(bytes) } else { bytes };
        if let Ok(decoded) = snapshot::decode(&bytes) {
            // Whatever decodes is internally valid: it restores without panicking.
            let state = PartitionState::restore(decoded.partition, decoded.state);
            prop_assert!(state.applied_index() <= decoded.meta.last_log_id.map_or(0, |id| id.index));
        }
    }
}

/// A state after the standard ops plus two fill leases (one still running at 4_000, one
/// ended), applied as further log entries.
fn state_with_leases() -> (PartitionState, SnapshotMeta) {
    let mut sm = PartitionState::new(P);
    let mut index = 2;
    for op in ops() {
        index += 1;
        sm.apply(index, &op);
    }
    let lease = |key: &'static [u8], until: u64| Command::Lease {
        key: Bytes::from_static(key),
        lease_until_ms: until,
        stale_window_ms: 0,
    };
    assert!(matches!(
        sm.apply(index + 1, &op(3_500, lease(b"x", 13_500))),
        Outcome::Lease(LeaseDecision::Granted { .. })
    ));
    assert!(matches!(
        sm.apply(index + 2, &op(3_501, lease(b"y", 3_600))),
        Outcome::Lease(LeaseDecision::Granted { .. })
    ));
    let mut meta = snapshot::decode(&encoded()).unwrap().meta;
    meta.last_log_id = Some(log_id(1, index + 2));
    (sm, meta)
}

/// Formats 4 and later carry the leases: a replica restored from the snapshot holds the same
/// leases, fills with the granted token and refuses the other.
#[test]
fn version_4_round_trip_keeps_leases() {
    let (original, meta) = state_with_leases();
    let x_token = original.lease_of(b"x").unwrap().0;
    let bytes = snapshot::encode(P, &meta, &original.snapshot());
    assert_eq!(
        u16::from_le_bytes([bytes[8], bytes[9]]),
        5,
        "the current format carries them"
    );
    let decoded = snapshot::decode(&bytes).unwrap();
    assert_eq!(decoded.state, original.snapshot());
    assert_eq!(
        decoded.state.leases,
        vec![
            (Bytes::from_static(b"x"), x_token, 13_500),
            (Bytes::from_static(b"y"), x_token + 1, 3_600),
        ]
    );
    assert_eq!(
        snapshot::encode(P, &decoded.meta, &decoded.state),
        bytes,
        "re-encoding is byte-identical"
    );
    let mut restored = PartitionState::restore(P, decoded.state);
    assert_eq!(restored.lease_count(), 2);
    let fill = |token: u64| Command::Fill {
        key: Bytes::from_static(b"x"),
        value: Bytes::from_static(b"loaded"),
        expire_at_ms: None,
        source_lsn: 0,
        token,
    };
    let next = restored.applied_index() + 1;
    assert_eq!(
        restored.apply(next, &op(4_000, fill(x_token + 7))),
        Outcome::Fill {
            applied: false,
            version: 0,
            newer_lsn: 0,
            lease_lost: true
        }
    );
    assert_eq!(
        restored.apply(next + 1, &op(4_000, fill(x_token))),
        Outcome::Fill {
            applied: true,
            version: next + 1,
            newer_lsn: 0,
            lease_lost: false
        }
    );
    assert_eq!(restored.lease_of(b"x"), None);

    // The lease section is checked: keys ascending, tokens within the applied index.
    let mut unordered = original.snapshot();
    unordered.leases.reverse();
    assert_eq!(
        snapshot::decode(&snapshot::encode(P, &meta, &unordered)),
        Err(SnapshotError::Invalid {
            what: "lease keys not strictly ascending"
        })
    );
    let mut future = original.snapshot();
    future.leases[0].1 = future.applied_index + 1;
    assert_eq!(
        snapshot::decode(&snapshot::encode(P, &meta, &future)),
        Err(SnapshotError::Invalid {
            what: "lease token outside 1..=applied index"
        })
    );
}

/// Snapshots written before format 4 (by the encoder of formats 2 and 3, unchanged) still
/// decode, with no leases.
#[test]
fn version_2_and_3_snapshots_decode_without_leases() {
    let (state, meta) = state_with_leases();
    let full = state.snapshot();
    assert_eq!(full.leases.len(), 2);
    for version in [2, 3] {
        let old = snapshot::encode_version(version, P, &meta, &full);
        assert_eq!(u16::from_le_bytes([old[8], old[9]]), version);
        let decoded = snapshot::decode(&old).unwrap();
        let want = PartitionSnapshot {
            leases: Vec::new(),
            requests: if version >= 3 {
                full.requests.clone()
            } else {
                Vec::new()
            },
            ..full.clone()
        };
        assert_eq!(decoded.state, want, "format {version}");
        assert_eq!(decoded.meta, meta);
        let restored = PartitionState::restore(P, decoded.state);
        assert_eq!(restored.lease_count(), 0);
        assert_eq!(restored.snapshot().cdc, full.cdc);
    }
}
