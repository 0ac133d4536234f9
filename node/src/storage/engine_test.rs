//! Tests of [`Engine`]: validation, TTL, statistics, max-memory admission and eviction,
//! including property tests and a concurrency test of the memory limit.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::mem::entry_cost;
use super::{
    Condition, Engine, EvictionPolicy, ManualClock, Outcome, PartitionId, StorageConfig,
    StorageError, WriteRequest, MAX_TTL_MS,
};

const P0: PartitionId = PartitionId(0);
const START: u64 = 1_700_000_000_000;

fn engine(config: StorageConfig) -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(START));
    (Engine::new(config, clock.clone()), clock)
}

fn limited(partitions: u32, max_memory: u64, policy: EvictionPolicy) -> StorageConfig {
    StorageConfig {
        partitions,
        max_memory,
        policy,
        ..StorageConfig::default()
    }
}

fn set(key: impl Into<Bytes>, value: impl Into<Bytes>, ttl_ms: Option<u64>) -> WriteRequest {
    WriteRequest::Set {
        key: key.into(),
        value: value.into(),
        ttl_ms,
        keep_ttl: false,
        condition: Condition::Always,
        source_lsn: 0,
        source_snapshot: None,
    }
}

fn get_value(engine: &Engine, p: PartitionId, key: &str) -> Option<Bytes> {
    engine.get(p, key.as_bytes()).unwrap().map(|v| v.value)
}

/// Sum of the accounted bytes of every partition, from their snapshots.
fn accounted(engine: &Engine) -> u64 {
    (0..engine.config().partitions)
        .flat_map(|p| engine.snapshot(PartitionId(p)).unwrap().entries)
        .map(|e| entry_cost(e.key.len(), e.value.len(), e.expire_at_ms.is_some()))
        .sum()
}

#[test]
fn engine_is_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Engine>();
}

#[test]
fn validates_keys_values_and_partitions() {
    let config = StorageConfig {
        partitions: 4,
        max_key_bytes: 8,
        max_value_bytes: 16,
        ..StorageConfig::default()
    };
    let (engine, _) = engine(config);
    assert_eq!(
        engine.write(P0, set("", "v", None)),
        Err(StorageError::EmptyKey)
    );
    assert_eq!(
        engine.write(P0, set("123456789", "v", None)),
        Err(StorageError::KeyTooLarge { size: 9, limit: 8 })
    );
    assert_eq!(
        engine.write(P0, set("k", vec![0u8; 17], None)),
        Err(StorageError::ValueTooLarge {
            size: 17,
            limit: 16
        })
    );
    assert!(engine
        .write(P0, set("12345678", vec![0u8; 16], None))
        .is_ok());
    let out_of_range = StorageError::PartitionOutOfRange {
        partition: 4,
        count: 4,
    };
    assert_eq!(
        engine.write(PartitionId(4), set("k", "v", None)),
        Err(out_of_range.clone())
    );
    assert_eq!(engine.get(PartitionId(4), b"k"), Err(out_of_range));
    assert_eq!(engine.get(P0, b""), Err(StorageError::EmptyKey));
    assert_eq!(
        engine.write(P0, WriteRequest::Delete { key: Bytes::new() }),
        Err(StorageError::EmptyKey)
    );
    assert_eq!(engine.partition_applied(PartitionId(4)), None);
    assert_eq!(engine.partition_applied(P0), Some(1));
}

#[test]
fn prepare_turns_ttls_into_deadlines() {
    let (engine, clock) = engine(StorageConfig::default());
    let deadline = |ttl_ms| match engine.prepare(set("k", "v", ttl_ms)).map(|op| op.cmd) {
        Ok(super::Command::Set { expire_at_ms, .. }) => Ok(expire_at_ms),
        Ok(other) => panic!("{other:?}"),
        Err(err) => Err(err),
    };
    assert_eq!(deadline(None), Ok(None));
    assert_eq!(deadline(Some(0)), Ok(None));
    assert_eq!(deadline(Some(1_500)), Ok(Some(START + 1_500)));
    assert_eq!(deadline(Some(MAX_TTL_MS)), Ok(Some(START + MAX_TTL_MS)));
    let too_long = StorageError::TtlOutOfRange {
        ttl_ms: MAX_TTL_MS + 1,
        limit_ms: MAX_TTL_MS,
    };
    assert_eq!(deadline(Some(MAX_TTL_MS + 1)), Err(too_long));
    clock.set(u64::MAX - 10);
    assert!(matches!(
        deadline(Some(11)),
        Err(StorageError::TtlOutOfRange { .. })
    ));
    assert_eq!(
        engine.prepare(set("k", "v", None)).unwrap().now_ms,
        u64::MAX - 10
    );
    assert_eq!(MAX_TTL_MS, 3_155_760_000_000);
}

#[test]
fn ttl_expiry_reclaim_and_stats() {
    let (engine, clock) = engine(limited(2, 0, EvictionPolicy::NoEviction));
    engine.write(P0, set("a", "1", Some(1_000))).unwrap();
    engine
        .write(PartitionId(1), set("b", "2", Some(2_000)))
        .unwrap();
    engine.write(P0, set("c", "3", None)).unwrap();
    let view = engine.get(P0, b"a").unwrap().unwrap();
    assert_eq!(view.ttl_remaining_ms, Some(1_000));
    clock.advance(Duration::from_millis(400));
    assert_eq!(
        engine.get(P0, b"a").unwrap().unwrap().ttl_remaining_ms,
        Some(600)
    );
    assert_eq!(
        engine.get(P0, b"c").unwrap().unwrap().ttl_remaining_ms,
        None
    );
    clock.advance(Duration::from_millis(600));
    assert_eq!(
        engine.get(P0, b"a").unwrap(),
        None,
        "expired at its deadline"
    );
    assert_eq!(engine.stats().keys, 3, "still held until reclaimed");
    assert_eq!(engine.reclaim_expired(10), 1);
    assert_eq!(engine.reclaim_expired(10), 0);
    clock.advance(Duration::from_secs(5));
    assert_eq!(engine.reclaim_expired(10), 1);
    let stats = engine.stats();
    assert_eq!(stats.keys, 1);
    assert_eq!(stats.expirations, 2);
    assert_eq!((stats.hits, stats.misses), (3, 1));
    assert_eq!(stats.memory_used, entry_cost(1, 1, false));
    assert_eq!(stats.memory_used, accounted(&engine));
    assert_eq!(stats.evictions, 0);
    assert_eq!(stats.policy, EvictionPolicy::NoEviction);
}

#[test]
fn writes_return_outcomes_and_incr_errors() {
    let (engine, _) = engine(StorageConfig::default());
    let incr = |delta| WriteRequest::Incr {
        key: Bytes::from_static(b"n"),
        delta,
    };
    assert_eq!(engine.write(P0, incr(5)), Ok(Outcome::Incr(Ok((5, 1)))));
    engine
        .write(P0, set("n", i64::MAX.to_string(), None))
        .unwrap();
    assert_eq!(engine.write(P0, incr(1)), Err(StorageError::IncrOverflow));
    engine.write(P0, set("n", "abc", None)).unwrap();
    assert_eq!(engine.write(P0, incr(1)), Err(StorageError::NotAnInteger));
    assert_eq!(
        engine.partition_applied(P0),
        Some(5),
        "failed INCRs consume an index"
    );
    assert_eq!(get_value(&engine, P0, "n").unwrap(), "abc");
    let expire = WriteRequest::Expire {
        key: Bytes::from_static(b"n"),
        ttl_ms: Some(100),
    };
    assert_eq!(engine.write(P0, expire), Ok(Outcome::Expire(true)));
    let persist = WriteRequest::Expire {
        key: Bytes::from_static(b"n"),
        ttl_ms: Some(0),
    };
    assert_eq!(engine.write(P0, persist), Ok(Outcome::Expire(true)));
    let del = WriteRequest::Delete {
        key: Bytes::from_static(b"n"),
    };
    assert_eq!(engine.write(P0, del.clone()), Ok(Outcome::Deleted(true)));
    assert_eq!(engine.write(P0, del), Ok(Outcome::Deleted(false)));
    assert_eq!(engine.stats().memory_used, 0);
}

#[test]
fn noeviction_refuses_growth_but_allows_shrinking() {
    let one = entry_cost(2, 10, false);
    let (engine, _) = engine(limited(2, 3 * one, EvictionPolicy::NoEviction));
    for k in ["k1", "k2", "k3"] {
        engine.write(P0, set(k, vec![b'x'; 10], None)).unwrap();
    }
    assert_eq!(engine.stats().memory_used, 3 * one);
    let err = engine.write(PartitionId(1), set("k4", vec![b'x'; 10], None));
    assert_eq!(
        err,
        Err(StorageError::OutOfMemory {
            used: 3 * one,
            needed: one,
            limit: 3 * one
        })
    );
    // Same-size overwrite, shrinking overwrite and delete all succeed.
    engine.write(P0, set("k1", vec![b'y'; 10], None)).unwrap();
    engine.write(P0, set("k2", "", None)).unwrap();
    engine
        .write(P0, WriteRequest::Delete { key: "k3".into() })
        .unwrap();
    engine
        .write(PartitionId(1), set("k4", vec![b'x'; 10], None))
        .unwrap();
    assert_eq!(engine.stats().memory_used, accounted(&engine));
    assert_eq!(engine.stats().evictions, 0);
    assert_eq!(engine.stats().keys, 3);
}

#[test]
fn an_entry_larger_than_the_limit_is_refused_under_every_policy() {
    for policy in EvictionPolicy::ALL {
        let (engine, _) = engine(limited(1, 1_000, policy));
        engine.write(P0, set("small", "v", None)).unwrap();
        let err = engine
            .write(P0, set("big", vec![0u8; 1_000], None))
            .unwrap_err();
        assert!(
            matches!(err, StorageError::OutOfMemory { limit: 1_000, .. }),
            "{err}"
        );
        assert_eq!(get_value(&engine, P0, "small").unwrap(), "v", "{policy}");
    }
}

#[test]
fn lru_evicts_the_least_recently_used() {
    let cost = entry_cost(3, 100, false);
    let config = StorageConfig {
        eviction_samples: 300, // sample (almost surely) everything: exact LRU here
        ..limited(4, 20 * cost, EvictionPolicy::AllKeysLru)
    };
    let (engine, clock) = engine(config);
    let part = |i: usize| PartitionId((i % 4) as u32);
    for i in 0..20 {
        clock.advance(Duration::from_millis(10));
        engine
            .write(part(i), set(format!("k{i:02}"), vec![b'v'; 100], None))
            .unwrap();
    }
    // Read the five oldest so they become the most recent.
    clock.advance(Duration::from_millis(10));
    for i in 0..5 {
        assert!(engine
            .get(part(i), format!("k{i:02}").as_bytes())
            .unwrap()
            .is_some());
    }
    for i in 20..25 {
        clock.advance(Duration::from_millis(10));
        engine
            .write(part(i), set(format!("k{i:02}"), vec![b'v'; 100], None))
            .unwrap();
    }
    let stats = engine.stats();
    assert_eq!(stats.evictions, 5);
    assert_eq!(stats.keys, 20);
    assert!(stats.memory_used <= 20 * cost);
    for i in 0..25 {
        let held = engine
            .get(part(i), format!("k{i:02}").as_bytes())
            .unwrap()
            .is_some();
        assert_eq!(held, !(5..10).contains(&i), "k{i:02}");
    }
}

#[test]
fn lfu_keeps_frequently_read_keys() {
    let cost = entry_cost(3, 100, false);
    let config = StorageConfig {
        eviction_samples: 64,
        ..limited(2, 10 * cost, EvictionPolicy::AllKeysLfu)
    };
    let (engine, clock) = engine(config);
    let part = |i: usize| PartitionId((i % 2) as u32);
    for i in 0..10 {
        engine
            .write(part(i), set(format!("k{i:02}"), vec![b'v'; 100], None))
            .unwrap();
    }
    // Keys 5..10 are hot; 0..5 are read once, later (more recently than the hot ones).
    for _ in 0..200 {
        for i in 5..10 {
            engine.get(part(i), format!("k{i:02}").as_bytes()).unwrap();
        }
    }
    clock.advance(Duration::from_millis(10));
    for i in 0..5 {
        engine.get(part(i), format!("k{i:02}").as_bytes()).unwrap();
    }
    for i in 10..15 {
        engine
            .write(part(i), set(format!("k{i:02}"), vec![b'v'; 100], None))
            .unwrap();
    }
    for i in 5..10 {
        let held = engine
            .get(part(i), format!("k{i:02}").as_bytes())
            .unwrap()
            .is_some();
        assert!(held, "hot key k{i:02} was evicted");
    }
    assert_eq!(engine.stats().evictions, 5);
}

#[test]
fn expired_entries_are_evicted_first_and_count_as_expirations() {
    let cost = entry_cost(2, 100, false);
    let ttl_cost = entry_cost(2, 100, true);
    let config = StorageConfig {
        eviction_samples: 64,
        ..limited(1, 4 * cost + 2 * ttl_cost, EvictionPolicy::AllKeysLru)
    };
    let (engine, clock) = engine(config);
    engine
        .write(P0, set("t1", vec![0u8; 100], Some(50)))
        .unwrap();
    for k in ["a1", "a2", "a3", "a4"] {
        engine.write(P0, set(k, vec![0u8; 100], None)).unwrap();
    }
    engine
        .write(P0, set("t2", vec![0u8; 100], Some(50)))
        .unwrap();
    clock.advance(Duration::from_millis(100));
    engine.write(P0, set("b1", vec![0u8; 100], None)).unwrap();
    engine.write(P0, set("b2", vec![0u8; 100], None)).unwrap();
    let stats = engine.stats();
    assert_eq!(stats.expirations, 2);
    assert_eq!(stats.evictions, 0, "only expired entries had to go");
    for k in ["a1", "a2", "a3", "a4", "b1", "b2"] {
        assert!(get_value(&engine, P0, k).is_some(), "{k}");
    }
}

#[test]
fn prefers_not_to_evict_the_key_being_written() {
    let small = entry_cost(1, 10, false);
    let big = entry_cost(1, 100, false);
    for policy in [EvictionPolicy::AllKeysLru, EvictionPolicy::AllKeysLfu] {
        let (engine, clock) = engine(limited(1, small + big - 1, policy));
        engine.write(P0, set("k", vec![b'a'; 10], None)).unwrap();
        clock.advance(Duration::from_millis(10));
        engine.write(P0, set("j", vec![b'b'; 10], None)).unwrap();
        clock.advance(Duration::from_millis(10));
        // k is the older (LRU victim) but is the one being written: j goes instead.
        engine.write(P0, set("k", vec![b'c'; 100], None)).unwrap();
        assert_eq!(get_value(&engine, P0, "k").unwrap(), vec![b'c'; 100]);
        assert_eq!(get_value(&engine, P0, "j"), None);
        assert_eq!(engine.stats().evictions, 1, "{policy}");
    }
}

/// A write for the eviction/noeviction property tests.
#[derive(Debug, Clone)]
enum W {
    Set(u32, u8, usize),
    Incr(u32, u8),
    Delete(u32, u8),
    Expire(u32, u8, u64),
    Get(u32, u8),
    Advance(u64),
    Reclaim,
}

fn w() -> impl Strategy<Value = W> {
    let p = 0u32..3;
    let k = 0u8..12;
    prop_oneof![
        8 => (p.clone(), k.clone(), 0usize..300).prop_map(|(p, k, n)| W::Set(p, k, n)),
        2 => (p.clone(), k.clone()).prop_map(|(p, k)| W::Incr(p, k)),
        1 => (p.clone(), k.clone()).prop_map(|(p, k)| W::Delete(p, k)),
        1 => (p.clone(), k.clone(), 0u64..50).prop_map(|(p, k, t)| W::Expire(p, k, t)),
        4 => (p, k).prop_map(|(p, k)| W::Get(p, k)),
        1 => (0u64..30).prop_map(W::Advance),
        1 => Just(W::Reclaim),
    ]
}

fn key_of(k: u8) -> Bytes {
    Bytes::from(format!("key-{k}"))
}

/// A value that names its key and a serial number, so any value read back can be checked.
fn value_of(k: u8, serial: usize, len: usize) -> Bytes {
    let mut v = format!("{k}:{serial}:").into_bytes();
    v.resize(v.len().max(len), b'.');
    Bytes::from(v)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Under LRU/LFU with a small limit: memory never exceeds it, and every value read back
    /// is one that was written for that key (a miss is fine, a wrong value never).
    #[test]
    fn eviction_never_exceeds_limit_nor_returns_wrong_values(
        lfu in any::<bool>(),
        limit in 1_000u64..4_000,
        samples in 1usize..8,
        writes in prop::collection::vec(w(), 1..200),
    ) {
        let policy = if lfu { EvictionPolicy::AllKeysLfu } else { EvictionPolicy::AllKeysLru };
        let config = StorageConfig { eviction_samples: samples, ..limited(3, limit, policy) };
        let (engine, clock) = engine(config);
        let mut written: BTreeMap<(u32, u8), BTreeSet<Bytes>> = BTreeMap::new();
        for (serial, w) in writes.into_iter().enumerate() {
            match w {
                W::Set(p, k, len) => {
                    let value = value_of(k, serial, len);
                    written.entry((p, k)).or_default().insert(value.clone());
                    match engine.write(PartitionId(p), set(key_of(k), value, None)) {
                        Ok(_) => {}
                        Err(StorageError::OutOfMemory { needed, .. }) => prop_assert!(needed > limit),
                        Err(err) => prop_assert!(false, "{err}"),
                    }
                }
                W::Incr(p, k) => {
                    let req = WriteRequest::Incr { key: key_of(k), delta: 1 };
                    if let Ok(Outcome::Incr(Ok((n, _)))) = engine.write(PartitionId(p), req) {
                        written.entry((p, k)).or_default().insert(Bytes::from(n.to_string()));
                    }
                }
                W::Delete(p, k) => {
                    engine.write(PartitionId(p), WriteRequest::Delete { key: key_of(k) }).unwrap();
                }
                W::Expire(p, k, ttl) => {
                    let req = WriteRequest::Expire { key: key_of(k), ttl_ms: Some(ttl) };
                    engine.write(PartitionId(p), req).unwrap();
                }
                W::Get(p, k) => {
                    if let Some(view) = engine.get(PartitionId(p), &key_of(k)).unwrap() {
                        let ok = written.get(&(p, k)).is_some_and(|vs| vs.contains(&view.value));
                        prop_assert!(ok, "read {:?} for {p}/{k}", view.value);
                    }
                }
                W::Advance(ms) => clock.advance(Duration::from_millis(ms)),
                W::Reclaim => { engine.reclaim_expired(3); }
            }
            let stats = engine.stats();
            prop_assert!(stats.memory_used <= limit, "{} > {limit}", stats.memory_used);
            prop_assert_eq!(stats.memory_used, accounted(&engine));
        }
    }

    /// Under noeviction, a refused write changes nothing and nothing stored is ever lost:
    /// the engine matches an exact model of successful writes.
    #[test]
    fn noeviction_loses_nothing(
        limit in 500u64..3_000,
        writes in prop::collection::vec(w(), 1..200),
    ) {
        let (engine, _) = engine(limited(3, limit, EvictionPolicy::NoEviction));
        let mut model: BTreeMap<(u32, u8), Bytes> = BTreeMap::new();
        let mut refused = 0;
        for (serial, w) in writes.into_iter().enumerate() {
            match w {
                W::Set(p, k, len) => {
                    let value = value_of(k, serial, len);
                    match engine.write(PartitionId(p), set(key_of(k), value.clone(), None)) {
                        Ok(_) => { model.insert((p, k), value); }
                        Err(StorageError::OutOfMemory { .. }) => refused += 1,
                        Err(err) => prop_assert!(false, "{err}"),
                    }
                }
                W::Incr(p, k) => {
                    let req = WriteRequest::Incr { key: key_of(k), delta: 1 };
                    match engine.write(PartitionId(p), req) {
                        Ok(Outcome::Incr(Ok((n, _)))) => { model.insert((p, k), Bytes::from(n.to_string())); }
                        Ok(other) => prop_assert!(false, "{other:?}"),
                        Err(StorageError::OutOfMemory { .. }) => refused += 1,
                        Err(StorageError::NotAnInteger) => {}
                        Err(err) => prop_assert!(false, "{err}"),
                    }
                }
                W::Delete(p, k) => {
                    engine.write(PartitionId(p), WriteRequest::Delete { key: key_of(k) }).unwrap();
                    model.remove(&(p, k));
                }
                // No TTLs here: expiry would be a legitimate loss.
                W::Expire(..) | W::Advance(_) | W::Reclaim => {}
                W::Get(p, k) => {
                    let got = engine.get(PartitionId(p), &key_of(k)).unwrap().map(|v| v.value);
                    prop_assert_eq!(got, model.get(&(p, k)).cloned());
                }
            }
            prop_assert!(engine.stats().memory_used <= limit);
        }
        for ((p, k), value) in &model {
            prop_assert_eq!(get_value(&engine, PartitionId(*p), &format!("key-{k}")), Some(value.clone()));
        }
        prop_assert_eq!(engine.stats().keys, model.len() as u64);
        prop_assert_eq!(engine.stats().evictions, 0);
        let _ = refused;
    }
}

#[test]
fn concurrent_writers_never_exceed_the_limit() {
    for policy in EvictionPolicy::ALL {
        let limit = 20_000;
        let config = StorageConfig {
            eviction_samples: 3,
            ..limited(8, limit, policy)
        };
        let engine = Arc::new(Engine::new(config, Arc::new(super::SystemClock)));
        let done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (engine, done) = (engine.clone(), done.clone());
            thread::spawn(move || {
                let mut max_seen = 0;
                while !done.load(Ordering::Relaxed) {
                    max_seen = max_seen.max(engine.stats().memory_used);
                }
                max_seen
            })
        };
        let writers: Vec<_> = (0..4u32)
            .map(|t| {
                let engine = engine.clone();
                thread::spawn(move || {
                    let mut oom = 0;
                    for i in 0..3_000u32 {
                        // Each writer mostly owns two partitions and sometimes crosses over.
                        let p = PartitionId((t * 2 + i % 2 + u32::from(i % 7 == 0)) % 8);
                        let len = (i as usize * 37) % 400;
                        let req = set(format!("t{t}-{}", i % 97), vec![b'x'; len], None);
                        match engine.write(p, req) {
                            Ok(_) => {}
                            Err(StorageError::OutOfMemory { .. }) => oom += 1,
                            Err(err) => panic!("{err}"),
                        }
                        assert!(engine.stats().memory_used <= limit);
                        if i % 11 == 0 {
                            let del = WriteRequest::Delete {
                                key: format!("t{t}-{}", i % 89).into(),
                            };
                            engine.write(p, del).unwrap();
                        }
                    }
                    oom
                })
            })
            .collect();
        let ooms: u32 = writers.into_iter().map(|w| w.join().unwrap()).sum();
        done.store(true, Ordering::Relaxed);
        let max_seen = watcher.join().unwrap();
        assert!(max_seen <= limit, "{policy}: saw {max_seen} > {limit}");
        assert_eq!(engine.stats().memory_used, accounted(&engine), "{policy}");
        if policy == EvictionPolicy::NoEviction {
            assert!(ooms > 0);
        } else {
            assert_eq!(ooms, 0, "{policy}");
            assert!(engine.stats().evictions > 0);
        }
    }
}
