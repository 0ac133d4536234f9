//! Unit tests of the CDC rules of [`PartitionState`]: idempotent batches, tombstones that
//! refuse stale cache-aside fills, prefix invalidation, fencing, the watermark, tombstone
//! expiry and the cap (both raising the floor), snapshots and determinism.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;

use super::mem::entry_cost;
use super::test_apply::apply_checked;
use super::{
    CdcApplied, CdcChange, CdcError, CdcWrite, Command, Condition, Engine, EvictionPolicy,
    ManualClock, Op, Outcome, PartitionId, PartitionState, StorageConfig, StorageError,
    WriteRequest, MAX_TOMBSTONES,
};

/// Tombstone lifetime used by the helpers.
const TOMB_TTL: u64 = 600_000;

/// A partition plus the next index and the proposer's clock.
struct Sm {
    state: PartitionState,
    index: u64,
    now: u64,
    fence: u64,
}

impl Sm {
    fn new() -> Self {
        Self {
            state: PartitionState::new(PartitionId(5)),
            index: 0,
            now: 1_000,
            fence: 1,
        }
    }

    /// Applies `cmd` at the current time, checking `growth` (exact, or an upper bound for
    /// `Cdc`) and the internal invariants.
    fn apply(&mut self, cmd: Command) -> Outcome {
        self.index += 1;
        apply_checked(&mut self.state, self.index, self.now, cmd)
    }

    /// A CDC batch at `lsn` (watermark = lsn) with the current fence.
    fn cdc(&mut self, lsn: u64, changes: Vec<CdcChange>) -> Outcome {
        self.cdc_with(lsn, lsn, self.fence, changes)
    }

    fn cdc_with(
        &mut self,
        lsn: u64,
        watermark: u64,
        fence: u64,
        changes: Vec<CdcChange>,
    ) -> Outcome {
        let tombstone_until_ms = self.now + TOMB_TTL;
        self.apply(Command::Cdc {
            lsn,
            watermark,
            fence,
            tombstone_until_ms,
            changes,
        })
    }

    /// A cache-aside fill (`Set` with `source_lsn`, condition `Always`).
    fn fill(&mut self, key: &str, value: &str, source_lsn: u64) -> Outcome {
        self.apply(Command::Set {
            key: b(key),
            value: b(value),
            expire_at_ms: None,
            keep_ttl: false,
            condition: Condition::Always,
            source_lsn,
        })
    }

    fn set(&mut self, key: &str, value: &str) -> Outcome {
        self.fill(key, value, 0)
    }

    fn value(&mut self, key: &str) -> Option<String> {
        self.state
            .get(key.as_bytes(), self.now)
            .map(|v| String::from_utf8(v.value.to_vec()).unwrap())
    }

    fn source_lsn(&mut self, key: &str) -> Option<u64> {
        self.state
            .get(key.as_bytes(), self.now)
            .map(|v| v.source_lsn)
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn inv(key: &str) -> CdcChange {
    CdcChange::Invalidate { key: b(key) }
}

fn put(key: &str, value: &str) -> CdcChange {
    CdcChange::Put {
        key: b(key),
        value: b(value),
        expire_at_ms: None,
    }
}

fn prefix(p: &str) -> CdcChange {
    CdcChange::InvalidatePrefix { prefix: b(p) }
}

fn applied(changed: u64, watermark: u64) -> Outcome {
    Outcome::Cdc(Ok(CdcApplied { changed, watermark }))
}

fn filled(version: u64) -> Outcome {
    Outcome::Set {
        applied: true,
        version,
        newer_lsn: 0,
    }
}

fn stale(version: u64, newer_lsn: u64) -> Outcome {
    Outcome::Set {
        applied: false,
        version,
        newer_lsn,
    }
}

#[test]
fn a_replayed_batch_changes_nothing() {
    let mut sm = Sm::new();
    sm.fill("b", "old", 3);
    sm.fill("p:1", "old", 3);
    let batch = vec![put("a", "1"), inv("b"), prefix("p:"), put("c", "3")];
    assert_eq!(sm.cdc(10, batch.clone()), applied(4, 10));
    let after_first = sm.state.snapshot();
    assert_eq!(sm.cdc(10, batch.clone()), applied(0, 10));
    let after_second = sm.state.snapshot();
    // Only the applied index differs.
    assert_eq!(after_second.entries, after_first.entries);
    assert_eq!(after_second.cdc, after_first.cdc);
    // An older batch is skipped as well.
    assert_eq!(sm.cdc_with(9, 9, 1, batch), applied(0, 10));
    assert_eq!(sm.value("a").as_deref(), Some("1"));
    assert_eq!(sm.value("b"), None);
}

#[test]
fn invalidation_removes_and_refuses_older_fills() {
    let mut sm = Sm::new();
    assert_eq!(sm.fill("k", "v5", 5), filled(1));
    assert_eq!(sm.source_lsn("k"), Some(5));
    assert_eq!(sm.cdc(10, vec![inv("k")]), applied(1, 10));
    assert_eq!(sm.value("k"), None);
    assert_eq!(sm.state.tombstone_count(), 1);

    // Read before the change (9) or at it (10): stale.
    assert_eq!(sm.fill("k", "v9", 9), stale(0, 10));
    assert_eq!(sm.fill("k", "v10", 10), stale(0, 10));
    assert_eq!(sm.value("k"), None);
    // Read after it: stored, with its LSN.
    assert_eq!(sm.fill("k", "v11", 11), filled(5));
    assert_eq!(sm.value("k").as_deref(), Some("v11"));
    assert_eq!(sm.source_lsn("k"), Some(11));
    // A fill against a live newer fill reports that fill's LSN and version.
    assert_eq!(sm.fill("k", "v10b", 11), stale(5, 11));

    // Ordinary writes are never refused, and store source LSN 0.
    assert_eq!(sm.set("k", "client"), filled(7));
    assert_eq!(sm.source_lsn("k"), Some(0));
    // The tombstone still refuses older fills over it.
    assert_eq!(sm.fill("k", "v7", 7), stale(7, 10));
}

#[test]
fn an_older_invalidation_keeps_a_newer_value() {
    let mut sm = Sm::new();
    sm.fill("k", "v20", 20);
    assert_eq!(sm.cdc(10, vec![inv("k")]), applied(0, 10));
    assert_eq!(sm.value("k").as_deref(), Some("v20"));
    assert_eq!(sm.fill("k", "v15", 15), stale(1, 20));
    // An invalidation at the entry's own LSN removes it.
    assert_eq!(sm.cdc(20, vec![inv("k")]), applied(1, 20));
    assert_eq!(sm.value("k"), None);
}

#[test]
fn an_expired_entry_is_removed_whatever_its_lsn() {
    let mut sm = Sm::new();
    sm.apply(Command::Set {
        key: b("k"),
        value: b("v"),
        expire_at_ms: Some(1_500),
        keep_ttl: false,
        condition: Condition::Always,
        source_lsn: 30,
    });
    sm.now = 2_000;
    assert_eq!(sm.cdc(10, vec![inv("k")]), applied(1, 10));
    assert!(!sm.state.contains_key(b"k"));
    assert_eq!(sm.state.expired_removed(), 1);
}

#[test]
fn put_is_skipped_at_an_older_or_equal_lsn() {
    let mut sm = Sm::new();
    assert_eq!(sm.cdc(10, vec![put("k", "v10")]), applied(1, 10));
    let view = sm.state.get(b"k", sm.now).unwrap();
    assert_eq!((view.version, view.source_lsn), (1, 10));

    assert_eq!(sm.cdc(10, vec![put("k", "again")]), applied(0, 10));
    assert_eq!(
        sm.cdc_with(9, 9, 1, vec![put("k", "older")]),
        applied(0, 10)
    );
    assert_eq!(sm.value("k").as_deref(), Some("v10"));

    assert_eq!(sm.cdc(11, vec![put("k", "v11")]), applied(1, 11));
    assert_eq!(sm.value("k").as_deref(), Some("v11"));
    assert_eq!(sm.state.get(b"k", sm.now).unwrap().version, 4);

    // The Put left a tombstone: once the entry is gone, an older fill stays refused.
    sm.apply(Command::Evict { keys: vec![b("k")] });
    assert_eq!(sm.fill("k", "v10", 10), stale(0, 11));
    // And a Put skipped by a newer fill.
    sm.fill("j", "fill", 50);
    assert_eq!(sm.cdc(40, vec![put("j", "v40")]), applied(0, 40));
    assert_eq!(sm.value("j").as_deref(), Some("fill"));
}

#[test]
fn put_with_ttl_and_over_an_expired_entry() {
    let mut sm = Sm::new();
    sm.apply(Command::Set {
        key: b("k"),
        value: b("v"),
        expire_at_ms: Some(1_500),
        keep_ttl: false,
        condition: Condition::Always,
        source_lsn: 30,
    });
    sm.now = 2_000;
    // The expired entry's LSN no longer counts.
    let batch = vec![CdcChange::Put {
        key: b("k"),
        value: b("fresh"),
        expire_at_ms: Some(9_000),
    }];
    assert_eq!(sm.cdc(10, batch), applied(1, 10));
    let view = sm.state.get(b"k", sm.now).unwrap();
    assert_eq!(view.expire_at_ms, Some(9_000));
    assert_eq!(view.source_lsn, 10);
    assert_eq!(sm.state.expired_removed(), 1);
    assert_eq!(sm.state.next_deadline(), Some(9_000));
}

#[test]
fn prefix_invalidation_removes_and_refuses_under_the_prefix_only() {
    let mut sm = Sm::new();
    sm.fill("user:1", "a", 5);
    sm.fill("user:2", "b", 5);
    sm.set("user:3", "ordinary");
    sm.fill("user:9", "newer", 12);
    sm.fill("order:1", "c", 5);
    assert_eq!(sm.cdc(10, vec![prefix("user:")]), applied(3, 10));
    assert_eq!(sm.value("user:1"), None);
    assert_eq!(sm.value("user:3"), None);
    assert_eq!(sm.value("user:9").as_deref(), Some("newer"));
    assert_eq!(sm.value("order:1").as_deref(), Some("c"));
    assert_eq!(sm.state.prefix_tombstone_count(), 1);
    assert_eq!(sm.state.tombstone_count(), 0);

    assert_eq!(sm.fill("user:4", "x", 9), stale(0, 10));
    assert_eq!(sm.fill("user:4", "x", 10), stale(0, 10));
    assert_eq!(sm.fill("order:2", "y", 9), filled(9));
    assert_eq!(sm.fill("user:4", "x", 11), filled(10));
    // Puts under the prefix at or below its LSN are skipped.
    assert_eq!(sm.cdc(10, vec![put("user:5", "v")]), applied(0, 10));
    assert_eq!(sm.cdc(11, vec![put("user:5", "v")]), applied(1, 11));

    // The empty prefix covers every key.
    assert_eq!(sm.cdc(20, vec![prefix("")]), applied(5, 20));
    assert!(sm.state.is_empty());
    assert_eq!(sm.fill("anything", "z", 20), stale(0, 20));
    assert_eq!(sm.state.memory_used(), 0);
}

#[test]
fn a_fenced_batch_changes_nothing() {
    let mut sm = Sm::new();
    sm.fill("k", "v", 1);
    assert_eq!(sm.cdc_with(10, 10, 5, vec![put("a", "1")]), applied(1, 10));
    assert_eq!(sm.state.cdc_fence(), 5);
    let before = sm.state.snapshot();
    assert_eq!(
        sm.cdc_with(20, 20, 4, vec![inv("k"), put("a", "2"), prefix("")]),
        Outcome::Cdc(Err(CdcError::Fenced { current: 5 }))
    );
    let after = sm.state.snapshot();
    assert_eq!(after.applied_index, before.applied_index + 1);
    assert_eq!(after.entries, before.entries);
    assert_eq!(after.cdc, before.cdc);
    // The same fence and a higher one are accepted.
    assert_eq!(sm.cdc_with(20, 20, 5, vec![inv("k")]), applied(1, 20));
    assert_eq!(sm.cdc_with(21, 21, 9, vec![]), applied(0, 21));
    assert_eq!(sm.state.cdc_fence(), 9);
    assert_eq!(
        CdcError::Fenced { current: 9 }.to_string(),
        "CDC batch fenced: its token is below the partition's current fence 9"
    );
}

#[test]
fn the_watermark_never_goes_back() {
    let mut sm = Sm::new();
    assert_eq!(sm.state.cdc_watermark(), 0);
    assert_eq!(sm.cdc_with(5, 100, 1, vec![]), applied(0, 100));
    assert_eq!(sm.cdc_with(6, 50, 1, vec![]), applied(0, 100));
    assert_eq!(sm.state.cdc_watermark(), 100);
    assert_eq!(sm.cdc_with(7, 101, 1, vec![]), applied(0, 101));
    // A fenced batch does not move it.
    sm.cdc_with(8, 500, 7, vec![]);
    sm.cdc_with(9, 900, 6, vec![]);
    assert_eq!(sm.state.cdc_watermark(), 500);
}

#[test]
fn forgotten_tombstones_raise_the_floor() {
    let mut sm = Sm::new();
    sm.cdc(10, vec![inv("a")]);
    sm.now += 1_000;
    sm.cdc(12, vec![inv("b")]);
    assert_eq!(sm.state.tombstone_count(), 2);
    assert_eq!(sm.state.next_tombstone_expiry(), Some(1_000 + TOMB_TTL));

    // Reclaim forgets at most `max` due tombstones, earliest first.
    sm.now = 1_000 + TOMB_TTL + 1_000;
    assert_eq!(sm.apply(Command::Reclaim { max: 1 }), Outcome::Reclaimed(0));
    assert_eq!(sm.state.tombstone_count(), 1);
    assert_eq!(sm.state.tombstone_floor(), 10);
    // "a" is forgotten, yet fills at or below its LSN stay refused — for every key.
    assert_eq!(sm.fill("a", "x", 10), stale(0, 10));
    assert_eq!(sm.fill("zzz", "x", 9), stale(0, 10));
    assert_eq!(sm.fill("a", "x", 11), filled(6));
    // "b" still has its own tombstone.
    assert_eq!(sm.fill("b", "x", 11), stale(0, 12));

    // A Cdc op forgets every due tombstone before its changes; a Put at or below the
    // floor (an old replay: the key's newer tombstone may be forgotten) only invalidates.
    sm.now += 10_000;
    assert_eq!(sm.cdc(11, vec![put("c", "v")]), applied(0, 12));
    assert_eq!(sm.state.tombstone_floor(), 12);
    assert_eq!(sm.state.tombstone_count(), 1, "only c's new tombstone");
    assert_eq!(sm.state.get(b"c", sm.now), None, "the replay wrote nothing");
    assert_eq!(sm.cdc(13, vec![put("c", "v")]), applied(1, 13));
    assert_eq!(sm.fill("b", "x", 12), stale(0, 12));
    assert_eq!(sm.fill("b", "x", 13), filled(11));
}

#[test]
fn the_tombstone_cap_forgets_the_earliest_expiring() {
    let mut sm = Sm::new();
    let keys: Vec<String> = (0..MAX_TOMBSTONES).map(|i| format!("k{i:06}")).collect();
    sm.cdc(5, keys.iter().map(|k| inv(k)).collect());
    assert_eq!(sm.state.tombstone_count(), MAX_TOMBSTONES);
    assert_eq!(sm.state.tombstone_floor(), 0);

    sm.now += 1;
    sm.cdc(9, vec![inv("new1"), inv("new2"), inv("new3")]);
    assert_eq!(sm.state.tombstone_count(), MAX_TOMBSTONES);
    // The three earliest-expiring (the first batch, ties by key) were forgotten.
    assert_eq!(sm.state.tombstone_floor(), 5);
    let snap = sm.state.snapshot();
    assert_eq!(snap.cdc.tombstones[0].0, b("k000003"));
    assert!(snap.cdc.tombstones.iter().any(|t| t.0 == b("new3")));
    assert_eq!(sm.fill("k000000", "x", 5), stale(0, 5));
    assert_eq!(sm.fill("k000000", "x", 6), filled(4));
    assert_eq!(sm.fill("new1", "x", 8), stale(0, 9));

    // Within one batch the cap applies at the end.
    sm.now += 1;
    let many: Vec<CdcChange> = (0..10).map(|i| inv(&format!("m{i}"))).collect();
    sm.cdc(12, many);
    assert_eq!(sm.state.tombstone_count(), MAX_TOMBSTONES);
    assert_eq!(sm.state.tombstone_floor(), 5);
}

#[test]
fn ordinary_writes_reset_the_source_lsn_and_expire_keeps_it() {
    let mut sm = Sm::new();
    sm.fill("k", "5", 5);
    sm.apply(Command::Expire {
        key: b("k"),
        expire_at_ms: Some(50_000),
    });
    assert_eq!(sm.source_lsn("k"), Some(5));
    sm.apply(Command::Incr {
        key: b("k"),
        delta: 1,
    });
    assert_eq!(sm.source_lsn("k"), Some(0));
    sm.fill("k", "x", 7);
    assert_eq!(sm.source_lsn("k"), Some(7));
    sm.set("k", "y");
    assert_eq!(sm.source_lsn("k"), Some(0));
}

#[test]
fn a_fill_refused_by_its_condition_reports_no_lsn() {
    let mut sm = Sm::new();
    sm.set("k", "v");
    let out = sm.apply(Command::Set {
        key: b("k"),
        value: b("w"),
        expire_at_ms: None,
        keep_ttl: false,
        condition: Condition::IfAbsent,
        source_lsn: 4,
    });
    assert_eq!(out, stale(1, 0));
    // Staleness is checked first.
    sm.cdc(10, vec![prefix("k")]);
    sm.set("k", "v2");
    let out = sm.apply(Command::Set {
        key: b("k"),
        value: b("w"),
        expire_at_ms: None,
        keep_ttl: false,
        condition: Condition::IfVersion(4),
        source_lsn: 4,
    });
    assert_eq!(out, stale(4, 10));
    assert_eq!(sm.value("k").as_deref(), Some("v2"));
}

#[test]
fn growth_bounds_cdc_batches_and_replays_need_nothing() {
    let mut sm = Sm::new();
    sm.fill("big", &"x".repeat(100), 1);
    let op = |lsn: u64, changes: Vec<CdcChange>| Op {
        now_ms: 1_000,
        cmd: Command::Cdc {
            lsn,
            watermark: lsn,
            fence: 1,
            tombstone_until_ms: 1_000 + TOMB_TTL,
            changes,
        },
    };
    let batch = vec![
        put("a", "12345"),
        put("a", "1"),
        put("big", "small"),
        inv("c"),
    ];
    assert_eq!(
        sm.state.growth(&op(10, batch.clone())),
        entry_cost(1, 5, false) as i64,
        "the largest Put per key, less the entry it replaces (at least 0)"
    );
    sm.cdc(10, batch.clone());
    assert_eq!(sm.state.growth(&op(10, batch)), 0);
    // A fenced batch needs nothing either.
    let fenced = Op {
        now_ms: 1_000,
        cmd: Command::Cdc {
            lsn: 20,
            watermark: 20,
            fence: 0,
            tombstone_until_ms: 0,
            changes: vec![put("z", "v")],
        },
    };
    assert_eq!(sm.state.growth(&fenced), 0);
}

#[test]
fn snapshot_round_trips_cdc_state() {
    let mut sm = Sm::new();
    sm.fill("a", "1", 3);
    sm.cdc_with(10, 15, 2, vec![put("p:1", "v"), inv("b"), prefix("q:")]);
    sm.now += 1_000;
    sm.cdc_with(11, 16, 3, vec![inv("c")]);
    sm.now += TOMB_TTL;
    // All three are due; Reclaim forgets one, the earliest (b, ties by key), raising the floor.
    sm.apply(Command::Reclaim { max: 1 });
    let snap = sm.state.snapshot();
    assert_eq!(snap.cdc.watermark, 16);
    assert_eq!(snap.cdc.fence, 3);
    assert_eq!(snap.cdc.floor, 10);
    assert_eq!(snap.cdc.tombstones.len(), 2);
    assert_eq!(snap.cdc.prefixes.len(), 1);
    assert_eq!(
        (&snap.cdc.prefixes[0].0, snap.cdc.prefixes[0].1),
        (&b("q:"), 10)
    );
    assert!(snap
        .entries
        .iter()
        .any(|e| e.key == b("p:1") && e.source_lsn == 10));

    let restored = PartitionState::restore(PartitionId(5), snap.clone());
    assert_eq!(restored.snapshot(), snap);
    restored.assert_consistent();
    assert_eq!(restored.cdc_watermark(), 16);
    assert_eq!(
        restored.next_tombstone_expiry(),
        sm.state.next_tombstone_expiry()
    );

    // Continuing from the restored state matches continuing from the original.
    let mut other = Sm {
        state: restored,
        index: sm.index,
        now: sm.now,
        fence: 3,
    };
    for s in [&mut sm, &mut other] {
        s.now += 2_000;
        s.fill("q:1", "x", 10);
        s.fill("c", "x", 12);
        s.cdc_with(13, 13, 3, vec![put("d", "v"), inv("a")]);
    }
    assert_eq!(sm.state.snapshot(), other.state.snapshot());
}

#[test]
fn replicas_applying_the_same_batches_end_equal() {
    let ops: Vec<Op> = (0..200u64)
        .map(|i| {
            let key = Bytes::from(format!("k{}", i % 7));
            let cmd = match i % 5 {
                0 => Command::Cdc {
                    lsn: i / 3 + 1,
                    watermark: i,
                    fence: i / 50,
                    tombstone_until_ms: 1_000 + i * 10 + 50,
                    changes: vec![
                        CdcChange::Put {
                            key: key.clone(),
                            value: Bytes::from(format!("v{i}")),
                            expire_at_ms: (i % 2 == 0).then_some(1_000 + i * 10 + 30),
                        },
                        CdcChange::Invalidate {
                            key: Bytes::from(format!("k{}", (i + 3) % 7)),
                        },
                    ],
                },
                1 => Command::Cdc {
                    lsn: i / 3,
                    watermark: 0,
                    fence: i / 60,
                    tombstone_until_ms: 1_000 + i * 10 + 20,
                    changes: vec![CdcChange::InvalidatePrefix { prefix: b("k1") }],
                },
                2 => Command::Reclaim { max: 2 },
                _ => Command::Set {
                    key,
                    value: b("fill"),
                    expire_at_ms: None,
                    keep_ttl: false,
                    condition: Condition::Always,
                    source_lsn: i / 4,
                },
            };
            Op {
                now_ms: 1_000 + i * 10,
                cmd,
            }
        })
        .collect();
    let mut a = PartitionState::new(PartitionId(1));
    let mut b_ = PartitionState::new(PartitionId(1));
    for (i, op) in ops.iter().enumerate() {
        let index = i as u64 + 1;
        let out_a = a.apply(index, op);
        // Only b is read, at arbitrary node-local times (access metadata).
        b_.get(b"k1", 5_000 + index);
        let out_b = b_.apply_shared(index, op);
        assert_eq!(out_a, out_b, "op {index}");
        if index == 100 {
            b_ = PartitionState::restore(PartitionId(1), b_.snapshot());
        }
    }
    assert_eq!(a.snapshot(), b_.snapshot());
    assert_eq!(a.memory_used(), b_.memory_used());
    a.assert_consistent();
    b_.assert_consistent();
}

// ---- Engine ------------------------------------------------------------------------

const START: u64 = 1_700_000_000_000;
const P0: PartitionId = PartitionId(0);

fn engine(config: StorageConfig) -> Engine {
    Engine::new(config, std::sync::Arc::new(ManualClock::new(START)))
}

fn cdc_write(lsn: u64, changes: Vec<CdcWrite>) -> WriteRequest {
    WriteRequest::Cdc {
        lsn,
        watermark: lsn,
        fence: 1,
        xid: lsn,
        min_xmin: 0,
        changes,
    }
}

#[test]
fn prepare_turns_cdc_ttls_into_deadlines_and_validates() {
    let config = StorageConfig {
        partitions: 2,
        max_key_bytes: 8,
        max_value_bytes: 16,
        cdc_tombstone_ttl_ms: 5_000,
        ..StorageConfig::default()
    };
    let e = engine(config);
    let op = e
        .prepare(cdc_write(
            7,
            vec![
                CdcWrite::Put {
                    key: b("k"),
                    value: b("v"),
                    ttl_ms: Some(100),
                },
                CdcWrite::Put {
                    key: b("n"),
                    value: b("v"),
                    ttl_ms: Some(0),
                },
                CdcWrite::Invalidate { key: b("i") },
                CdcWrite::InvalidatePrefix { prefix: b("") },
            ],
        ))
        .unwrap();
    assert_eq!(op.now_ms, START);
    assert_eq!(
        op.cmd,
        Command::CdcTx {
            lsn: 7,
            xid: 7,
            min_xmin: 0,
            watermark: 7,
            fence: 1,
            tombstone_until_ms: START + 5_000,
            changes: vec![
                CdcChange::Put {
                    key: b("k"),
                    value: b("v"),
                    expire_at_ms: Some(START + 100),
                },
                CdcChange::Put {
                    key: b("n"),
                    value: b("v"),
                    expire_at_ms: None,
                },
                inv("i"),
                prefix(""),
            ],
        }
    );

    let ok = || CdcWrite::Invalidate { key: b("ok") };
    let bad = |change: CdcWrite| e.prepare(cdc_write(1, vec![ok(), change])).unwrap_err();
    assert_eq!(
        bad(CdcWrite::Invalidate { key: b("") }),
        StorageError::EmptyKey
    );
    assert_eq!(
        bad(CdcWrite::InvalidatePrefix {
            prefix: b("123456789")
        }),
        StorageError::KeyTooLarge { size: 9, limit: 8 }
    );
    assert_eq!(
        bad(CdcWrite::Put {
            key: b("k"),
            value: Bytes::from(vec![0; 17]),
            ttl_ms: None
        }),
        StorageError::ValueTooLarge {
            size: 17,
            limit: 16
        }
    );
    assert!(matches!(
        bad(CdcWrite::Put {
            key: b("k"),
            value: b("v"),
            ttl_ms: Some(u64::MAX)
        }),
        StorageError::TtlOutOfRange { .. }
    ));
    assert_eq!(
        bad(CdcWrite::Put {
            key: b(""),
            value: b("v"),
            ttl_ms: None
        }),
        StorageError::EmptyKey
    );
}

#[test]
fn engine_applies_cdc_and_reports_the_watermark_and_source_lsn() {
    let e = engine(StorageConfig {
        partitions: 2,
        ..StorageConfig::default()
    });
    assert_eq!(e.cdc_watermark(P0), Some(0));
    assert_eq!(e.cdc_watermark(PartitionId(2)), None);
    let out = e
        .write(
            P0,
            WriteRequest::Cdc {
                lsn: 40,
                watermark: 41,
                fence: 1,
                xid: 400,
                min_xmin: 0,
                changes: vec![CdcWrite::Put {
                    key: b("k"),
                    value: b("v"),
                    ttl_ms: Some(1_000),
                }],
            },
        )
        .unwrap();
    assert_eq!(out, applied(1, 41));
    assert_eq!(e.cdc_watermark(P0), Some(41));
    assert_eq!(e.cdc_watermark(PartitionId(1)), Some(0));
    let view = e.get(P0, b"k").unwrap().unwrap();
    assert_eq!(view.source_lsn, 40);
    assert_eq!(view.ttl_remaining_ms, Some(1_000));
    assert_eq!(e.stats().memory_used, entry_cost(1, 1, true));

    // A stale fill is an outcome, not an error.
    let fill = |source_lsn| WriteRequest::Set {
        key: b("k"),
        value: b("fill"),
        ttl_ms: None,
        keep_ttl: false,
        condition: Condition::Always,
        source_lsn,
        source_snapshot: None,
    };
    assert_eq!(e.write(P0, fill(39)).unwrap(), stale(1, 40));
    assert_eq!(e.write(P0, fill(41)).unwrap(), filled(3));
    assert_eq!(e.get(P0, b"k").unwrap().unwrap().source_lsn, 41);
    // So is a fenced batch.
    assert_eq!(
        e.write(
            P0,
            WriteRequest::Cdc {
                lsn: 50,
                watermark: 50,
                fence: 0,
                xid: 500,
                min_xmin: 0,
                changes: vec![]
            }
        )
        .unwrap(),
        Outcome::Cdc(Err(CdcError::Fenced { current: 1 }))
    );
}

#[test]
fn a_replayed_batch_is_admitted_when_memory_is_full() {
    let one = entry_cost(2, 10, false);
    let e = engine(StorageConfig {
        partitions: 1,
        max_memory: 2 * one,
        policy: EvictionPolicy::NoEviction,
        ..StorageConfig::default()
    });
    let batch = || {
        cdc_write(
            5,
            vec![
                CdcWrite::Put {
                    key: b("k1"),
                    value: b("0123456789"),
                    ttl_ms: None,
                },
                CdcWrite::Put {
                    key: b("k2"),
                    value: b("0123456789"),
                    ttl_ms: None,
                },
            ],
        )
    };
    assert_eq!(e.write(P0, batch()).unwrap(), applied(2, 5));
    assert_eq!(e.stats().memory_used, 2 * one);
    assert_eq!(e.write(P0, batch()).unwrap(), applied(0, 5));
    // A new Put does not fit; invalidations always do.
    assert!(matches!(
        e.write(
            P0,
            cdc_write(
                6,
                vec![CdcWrite::Put {
                    key: b("k3"),
                    value: b("v"),
                    ttl_ms: None
                }]
            )
        ),
        Err(StorageError::OutOfMemory { .. })
    ));
    assert_eq!(
        e.write(
            P0,
            cdc_write(6, vec![CdcWrite::Invalidate { key: b("k1") }])
        )
        .unwrap(),
        applied(1, 6)
    );
    assert_eq!(e.stats().memory_used, one);
}

#[test]
#[should_panic(expected = "CDC tombstones need a TTL above 0")]
fn a_zero_tombstone_ttl_is_refused() {
    engine(StorageConfig {
        cdc_tombstone_ttl_ms: 0,
        ..StorageConfig::default()
    });
}
