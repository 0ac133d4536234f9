//! Unit tests of the near cache's store and of the read/fill path over a manual clock.

use super::store::{Applied, Clock, Limits, Store, Track, ENTRY_OVERHEAD};
use super::{NearCache, NearCacheConfig, NearMode, NearRead};
use crate::client::{Consistency, ReadOptions, Value};
use crate::lsn::Lsn;
use bytes::Bytes;
use raftcache_proto::v1::{WatchEvent, WatchEventKind};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A clock the test moves by hand.
#[derive(Debug)]
struct ManualClock(Mutex<Instant>);

impl ManualClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap()
    }
}

const SUB: u64 = 7;
const NODE: u64 = 1;

fn limits() -> Limits {
    Limits {
        capacity: 100,
        max_bytes: 1 << 20,
        max_ttl: Duration::from_secs(30),
        mode: NearMode::All,
    }
}

fn sync(partition: u32, seq: u64) -> WatchEvent {
    WatchEvent {
        partition,
        kind: WatchEventKind::Sync as i32,
        seq,
        ..WatchEvent::default()
    }
}

fn change(partition: u32, prev_seq: u64, seq: u64, keys: &[&str], prefixes: &[&str]) -> WatchEvent {
    WatchEvent {
        partition,
        kind: WatchEventKind::Change as i32,
        seq,
        prev_seq,
        keys: keys
            .iter()
            .map(|k| Bytes::copy_from_slice(k.as_bytes()))
            .collect(),
        prefixes: prefixes
            .iter()
            .map(|k| Bytes::copy_from_slice(k.as_bytes()))
            .collect(),
        cdc_lsn: 0,
    }
}

fn reset(partition: u32) -> WatchEvent {
    WatchEvent {
        partition,
        kind: WatchEventKind::Reset as i32,
        ..WatchEvent::default()
    }
}

fn value(v: &str, version: u64, ttl: Option<Duration>) -> Value {
    Value {
        value: Bytes::copy_from_slice(v.as_bytes()),
        version,
        ttl,
        source_lsn: Lsn::ZERO,
    }
}

/// A store whose partitions `0..n` are synced at seq 10 by subscription [`SUB`].
fn synced(limits: Limits, n: u32) -> Store {
    let mut s = Store::new(limits);
    for p in 0..n {
        s.assign(p, Some((SUB, NODE)));
        assert_eq!(s.apply(SUB, &sync(p, 10)), Applied::Synced);
    }
    s
}

/// Fills `key` of `partition` with `v` (version 1, no TTL); true when stored.
fn fill(s: &mut Store, key: &str, partition: u32, v: &str, now: Instant) -> bool {
    match s.begin_fill(key.as_bytes(), partition) {
        Some(t) => s.complete_fill(t, Some(&value(v, 1, None)), now),
        None => false,
    }
}

fn cached(s: &mut Store, key: &str, now: Instant) -> Option<String> {
    s.get(key.as_bytes(), now)
        .map(|v| String::from_utf8(v.value.to_vec()).unwrap())
}

#[test]
fn lru_is_bounded_by_entries() {
    let now = Instant::now();
    let mut s = synced(
        Limits {
            capacity: 3,
            ..limits()
        },
        1,
    );
    for k in ["a", "b", "c"] {
        assert!(fill(&mut s, k, 0, k, now));
    }
    // Touch "a": "b" is now the least recently used.
    assert_eq!(cached(&mut s, "a", now).as_deref(), Some("a"));
    assert!(fill(&mut s, "d", 0, "d", now));
    let st = s.stats();
    assert_eq!((st.entries, st.evictions), (3, 1));
    assert_eq!(cached(&mut s, "b", now), None);
    for k in ["a", "c", "d"] {
        assert_eq!(cached(&mut s, k, now).as_deref(), Some(k), "{k}");
    }
}

#[test]
fn lru_is_bounded_by_bytes() {
    let now = Instant::now();
    let entry = 1 + 100 + ENTRY_OVERHEAD; // a 1-byte key with a 100-byte value
    let mut s = synced(
        Limits {
            max_bytes: 3 * entry,
            ..limits()
        },
        1,
    );
    let big = "x".repeat(100);
    for k in ["a", "b", "c", "d", "e"] {
        assert!(fill(&mut s, k, 0, &big, now));
        assert!(s.stats().bytes <= 3 * entry);
    }
    let st = s.stats();
    assert_eq!((st.entries, st.bytes, st.evictions), (3, 3 * entry, 2));
    assert_eq!(cached(&mut s, "a", now), None);
    assert_eq!(cached(&mut s, "e", now).as_deref(), Some(big.as_str()));
    // A value larger than the whole budget is not cached, and evicts nothing.
    let huge = "y".repeat(usize::try_from(3 * entry).unwrap());
    assert!(!fill(&mut s, "h", 0, &huge, now));
    assert_eq!(s.stats().entries, 3);
    // Invalidations give the bytes back.
    for k in ["c", "d", "e"] {
        assert!(s.invalidate(k.as_bytes()));
    }
    assert_eq!((s.stats().entries, s.stats().bytes), (0, 0));
}

#[test]
fn an_entry_lives_min_of_server_ttl_and_max_ttl() {
    let t0 = Instant::now();
    let mut s = synced(limits(), 1);
    let fill_ttl = |s: &mut Store, key: &str, ttl: Option<Duration>| {
        let t = s.begin_fill(key.as_bytes(), 0).unwrap();
        assert!(s.complete_fill(t, Some(&value("v", 1, ttl)), t0));
    };
    fill_ttl(&mut s, "short", Some(Duration::from_secs(5)));
    fill_ttl(&mut s, "long", Some(Duration::from_secs(3600)));
    fill_ttl(&mut s, "none", None);

    let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
    // The remaining server TTL is reported from the stored deadline.
    let v = s.get(b"short", at(2.0)).unwrap();
    assert_eq!(v.ttl, Some(Duration::from_secs(3)));
    assert_eq!(s.get(b"none", at(2.0)).unwrap().ttl, None);
    assert!(s.get(b"short", at(4.9)).is_some());
    assert!(
        s.get(b"short", at(5.0)).is_none(),
        "server TTL bounds the entry"
    );
    assert!(s.get(b"long", at(29.9)).is_some());
    assert!(
        s.get(b"long", at(30.0)).is_none(),
        "max_ttl bounds a long TTL"
    );
    assert!(
        s.get(b"none", at(30.0)).is_none(),
        "max_ttl bounds a key without TTL"
    );
    assert_eq!(s.stats().entries, 0, "expired entries are removed when met");
}

#[test]
fn a_ticket_is_voided_by_an_invalidation_of_its_key() {
    let now = Instant::now();
    let mut s = synced(limits(), 1);
    // The race: the remote read is in flight when the key's CHANGE arrives.
    let t = s.begin_fill(b"k", 0).unwrap();
    assert_eq!(
        s.apply(SUB, &change(0, 10, 11, &["k"], &[])),
        Applied::Changed(0)
    );
    assert!(!s.complete_fill(t, Some(&value("old", 1, None)), now));
    assert_eq!(cached(&mut s, "k", now), None);
    // A local write voids it the same way; another key's ticket is unaffected.
    let t = s.begin_fill(b"k", 0).unwrap();
    let other = s.begin_fill(b"j", 0).unwrap();
    s.invalidate(b"k");
    assert!(!s.complete_fill(t, Some(&value("old", 1, None)), now));
    assert!(s.complete_fill(other, Some(&value("j", 1, None)), now));
    // A ticket taken after the invalidation is good.
    assert!(fill(&mut s, "k", 0, "new", now));
    assert_eq!(cached(&mut s, "k", now).as_deref(), Some("new"));
    // Two tickets of one key, one invalidation: both void.
    let (a, b) = (
        s.begin_fill(b"x", 0).unwrap(),
        s.begin_fill(b"x", 0).unwrap(),
    );
    s.apply(SUB, &change(0, 11, 12, &["x"], &[]));
    assert!(!s.complete_fill(a, Some(&value("x", 1, None)), now));
    assert!(!s.complete_fill(b, Some(&value("x", 1, None)), now));
    assert_eq!(s.pending_tickets(), 0);
}

#[test]
fn a_ticket_is_voided_by_a_gap_a_reset_a_lost_stream_or_a_move() {
    let now = Instant::now();
    type Void = fn(&mut Store);
    let cases: [(&str, Void); 5] = [
        ("gap", |s| {
            assert_eq!(
                s.apply(SUB, &change(0, 9, 12, &["other"], &[])),
                Applied::Gap
            );
        }),
        ("reset", |s| {
            assert_eq!(s.apply(SUB, &reset(0)), Applied::Reset);
            assert_eq!(s.apply(SUB, &sync(0, 20)), Applied::Synced);
        }),
        ("stream lost", |s| {
            assert_eq!(s.stream_lost(SUB), 2);
            s.assign(0, Some((SUB + 1, NODE)));
            s.apply(SUB + 1, &sync(0, 10));
        }),
        ("leader moved", |s| {
            s.assign(0, Some((SUB + 1, NODE + 1)));
            s.apply(SUB + 1, &sync(0, 10));
        }),
        ("prefix", |s| {
            s.apply(SUB, &change(0, 10, 11, &[], &["user:"]));
        }),
    ];
    for (name, void) in cases {
        let mut s = synced(limits(), 2);
        let t = s.begin_fill(b"user:1", 0).unwrap();
        let t1 = s.begin_fill(b"user:1x", 1).unwrap();
        void(&mut s);
        assert!(
            !s.complete_fill(t, Some(&value("old", 1, None)), now),
            "{name}: the ticket must be void"
        );
        assert_eq!(cached(&mut s, "user:1", now), None, "{name}");
        // Partition 1 is another partition: its ticket holds (unless its stream went).
        let kept = s.complete_fill(t1, Some(&value("v", 1, None)), now);
        assert_eq!(kept, name != "stream lost", "{name}: partition 1's ticket");
        assert_eq!(s.pending_tickets(), 0, "{name}");
    }
}

#[test]
fn a_gap_drops_only_its_partition() {
    let now = Instant::now();
    let mut s = synced(limits(), 3);
    for p in 0..3u32 {
        for i in 0..4 {
            assert!(fill(&mut s, &format!("k{p}-{i}"), p, "v", now));
        }
    }
    assert_eq!(
        s.apply(SUB, &change(1, 10, 11, &["k1-0"], &[])),
        Applied::Changed(1)
    );
    // seq 11 → 12 was missed: the next event says prev 12.
    assert_eq!(
        s.apply(SUB, &change(1, 12, 13, &["unrelated"], &[])),
        Applied::Gap
    );
    let st = s.stats();
    assert_eq!((st.gaps, st.entries, st.invalidations), (1, 8, 1));
    for i in 0..4 {
        assert_eq!(cached(&mut s, &format!("k1-{i}"), now), None);
        assert!(cached(&mut s, &format!("k0-{i}"), now).is_some());
        assert!(cached(&mut s, &format!("k2-{i}"), now).is_some());
    }
    // The new sequence is adopted: the partition stays synced and fills again.
    assert_eq!(
        s.track(1),
        Track::Synced {
            node: NODE,
            seq: 13
        }
    );
    assert!(fill(&mut s, "k1-0", 1, "v2", now));
    assert_eq!(
        s.apply(SUB, &change(1, 13, 14, &[], &[])),
        Applied::Changed(0)
    );
    assert_eq!(cached(&mut s, "k1-0", now).as_deref(), Some("v2"));
    assert_eq!(s.stats().gaps, 1);
}

#[test]
fn prefixes_invalidate_every_key_under_them_in_their_partition() {
    let now = Instant::now();
    let mut s = synced(limits(), 2);
    for k in ["user:1", "user:2", "user_by_email:a", "users", "profile:1"] {
        assert!(fill(&mut s, k, 0, "v", now));
    }
    assert!(fill(&mut s, "user:9", 1, "v", now));
    let removed = s.apply(SUB, &change(0, 10, 11, &[], &["user:"]));
    assert_eq!(removed, Applied::Changed(2));
    for (k, kept) in [
        ("user:1", false),
        ("user:2", false),
        ("user_by_email:a", true),
        ("users", true),
        ("profile:1", true),
        ("user:9", true), // another partition: its own stream says so
    ] {
        assert_eq!(cached(&mut s, k, now).is_some(), kept, "{k}");
    }
    // The empty prefix is every key of the partition.
    assert_eq!(
        s.apply(SUB, &change(0, 11, 12, &[], &[""])),
        Applied::Changed(3)
    );
    assert_eq!(s.stats().entries, 1);
}

#[test]
fn hot_mode_stores_only_hot_keys() {
    let now = Instant::now();
    let mut s = synced(
        Limits {
            mode: NearMode::Hot,
            ..limits()
        },
        1,
    );
    assert!(!fill(&mut s, "hot", 0, "v", now), "nothing is hot yet");
    s.set_hot(HashSet::from([
        Bytes::from_static(b"hot"),
        Bytes::from_static(b"warm"),
    ]));
    assert!(fill(&mut s, "hot", 0, "v", now));
    assert!(fill(&mut s, "warm", 0, "v", now));
    assert!(!fill(&mut s, "cold", 0, "v", now));
    assert_eq!(s.stats().entries, 2);
    // A key that cools down is dropped; a ticket taken while hot does not fill after.
    let t = s.begin_fill(b"hot", 0).unwrap();
    s.set_hot(HashSet::from([Bytes::from_static(b"warm")]));
    assert_eq!(cached(&mut s, "hot", now), None);
    assert!(!s.complete_fill(t, Some(&value("v", 1, None)), now));
    assert_eq!(cached(&mut s, "warm", now).as_deref(), Some("v"));
}

#[test]
fn only_synced_partitions_are_read_or_filled_and_old_streams_are_ignored() {
    let now = Instant::now();
    let mut s = Store::new(limits());
    assert!(s.begin_fill(b"k", 0).is_none(), "no stream");
    s.assign(0, Some((SUB, NODE)));
    assert!(s.begin_fill(b"k", 0).is_none(), "no SYNC yet");
    assert_eq!(
        s.apply(SUB + 1, &sync(0, 5)),
        Applied::Ignored,
        "another stream"
    );
    assert_eq!(
        s.apply(SUB, &change(0, 4, 5, &["k"], &[])),
        Applied::Ignored
    );
    assert_eq!(s.apply(SUB, &sync(0, 5)), Applied::Synced);
    assert_eq!(s.track(0), Track::Synced { node: NODE, seq: 5 });
    assert!(fill(&mut s, "k", 0, "v", now));
    // RESET: dropped and unsynced until the next SYNC.
    assert_eq!(s.apply(SUB, &reset(0)), Applied::Reset);
    assert_eq!(s.track(0), Track::Unsynced);
    assert_eq!(cached(&mut s, "k", now), None);
    assert!(s.begin_fill(b"k", 0).is_none());
    s.apply(SUB, &sync(0, 9));
    assert!(fill(&mut s, "k", 0, "v", now));
    // A repeated SYNC at the known sequence keeps the entries; another one drops them.
    s.apply(SUB, &sync(0, 9));
    assert!(cached(&mut s, "k", now).is_some());
    s.apply(SUB, &sync(0, 15));
    assert_eq!(cached(&mut s, "k", now), None);
    // Unwatching drops; the old subscription's events no longer count.
    assert!(fill(&mut s, "k", 0, "v", now));
    s.assign(0, None);
    assert_eq!(s.stats().entries, 0);
    assert_eq!(s.apply(SUB, &sync(0, 15)), Applied::Ignored);
    let st = s.stats();
    assert_eq!((st.resets, st.synced_partitions), (1, 0));
}

#[test]
fn a_late_fill_never_replaces_a_newer_version() {
    let now = Instant::now();
    let mut s = synced(limits(), 1);
    let older = s.begin_fill(b"k", 0).unwrap();
    let newer = s.begin_fill(b"k", 0).unwrap();
    assert!(s.complete_fill(newer, Some(&value("v2", 2, None)), now));
    assert!(!s.complete_fill(older, Some(&value("v1", 1, None)), now));
    assert_eq!(cached(&mut s, "k", now).as_deref(), Some("v2"));
    // Not found is not cached, and an abandoned ticket is given back.
    let t = s.begin_fill(b"gone", 0).unwrap();
    assert!(!s.complete_fill(t, None, now));
    let t = s.begin_fill(b"gone", 0).unwrap();
    s.abandon(&t);
    assert_eq!(s.pending_tickets(), 0);
    assert_eq!(cached(&mut s, "gone", now), None);
}

#[test]
fn the_read_path_serves_fills_until_they_expire_and_bypasses_other_levels() {
    let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
    let config = NearCacheConfig {
        max_ttl: Duration::from_secs(10),
        ..NearCacheConfig::default()
    };
    let (near, _driver) = NearCache::with_clock(config, clock.clone());
    {
        let mut store = near.shared.store();
        store.assign(3, Some((SUB, NODE)));
        store.apply(SUB, &sync(3, 1));
    }
    let default = ReadOptions::default();
    let partition_of = |_: &[u8]| 3;
    match near.read(b"k", &default, partition_of) {
        NearRead::Miss(Some(fill)) => fill.complete(Some(&value("v", 4, None))),
        _ => panic!("expected a miss with a ticket"),
    }
    match near.read(b"k", &default, partition_of) {
        NearRead::Hit(v) => assert_eq!((v.value, v.version), (Bytes::from("v"), 4)),
        _ => panic!("expected a hit"),
    }
    for options in [
        ReadOptions {
            consistency: Consistency::Linearizable,
            ..ReadOptions::default()
        },
        ReadOptions {
            consistency: Consistency::Follower {
                max_staleness: Duration::from_secs(1),
            },
            ..ReadOptions::default()
        },
        ReadOptions {
            min_lsn: Some(Lsn(1)),
            ..ReadOptions::default()
        },
    ] {
        assert!(matches!(
            near.read(b"k", &options, partition_of),
            NearRead::Bypass
        ));
    }
    // A failed remote read gives its ticket back (the fill is dropped).
    match near.read(b"other", &default, partition_of) {
        NearRead::Miss(Some(fill)) => drop(fill),
        _ => panic!("expected a miss with a ticket"),
    }
    assert_eq!(near.shared.store().pending_tickets(), 0);
    clock.advance(Duration::from_secs(10));
    assert!(matches!(
        near.read(b"k", &default, partition_of),
        NearRead::Miss(Some(_))
    ));
    let st = near.stats();
    assert_eq!((st.hits, st.misses, st.entries), (1, 3, 0));
}

#[test]
fn the_config_reads_human_units() {
    let c: NearCacheConfig = serde_json::from_str(
        r#"{"capacity": 5, "max-bytes": "1MiB", "max-ttl": "2s", "mode": "hot", "hot-refresh": "250ms"}"#,
    )
    .unwrap();
    assert_eq!(
        c,
        NearCacheConfig {
            capacity: 5,
            max_bytes: 1 << 20,
            max_ttl: Duration::from_secs(2),
            mode: NearMode::Hot,
            hot_refresh: Duration::from_millis(250),
        }
    );
    let d: NearCacheConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(d, NearCacheConfig::default());
    assert_eq!(d.max_bytes, 64 << 20);
    assert!(serde_json::from_str::<NearCacheConfig>(r#"{"capasity": 1}"#).is_err());
}

#[test]
fn a_change_the_read_value_already_reflects_voids_nothing() {
    let now = Instant::now();
    let mut s = synced(limits(), 1);
    // The remote read saw the write at index 12 before its CHANGE (seq 12) arrived:
    // the ticket stays good, and the event then keeps the entry.
    let t = s.begin_fill(b"k", 0).unwrap();
    assert_eq!(
        s.apply(SUB, &change(0, 10, 12, &["k"], &[])),
        Applied::Changed(0)
    );
    assert!(s.complete_fill(t, Some(&value("v12", 12, None)), now));
    let t = s.begin_fill(b"j", 0).unwrap();
    assert!(s.complete_fill(t, Some(&value("j13", 13, None)), now));
    assert_eq!(
        s.apply(SUB, &change(0, 12, 13, &["j"], &[])),
        Applied::Changed(0)
    );
    assert_eq!(cached(&mut s, "j", now).as_deref(), Some("j13"));
    // A read older than the change is void; a later change removes the entry.
    let t = s.begin_fill(b"x", 0).unwrap();
    s.apply(SUB, &change(0, 13, 14, &["x", "k"], &[]));
    assert!(!s.complete_fill(t, Some(&value("x", 13, None)), now));
    assert_eq!(cached(&mut s, "k", now), None);
    // The same holds under a prefix.
    let t = s.begin_fill(b"p:1", 0).unwrap();
    s.apply(SUB, &change(0, 14, 15, &[], &["p:"]));
    assert!(s.complete_fill(t, Some(&value("p", 15, None)), now));
    s.apply(SUB, &change(0, 15, 16, &[], &["p:"]));
    assert_eq!(cached(&mut s, "p:1", now), None);
    // A write of this client voids whatever its version: it is not known here.
    let t = s.begin_fill(b"w", 0).unwrap();
    s.invalidate(b"w");
    assert!(!s.complete_fill(t, Some(&value("w", u64::MAX - 1, None)), now));
    assert_eq!(s.stats().invalidations, 2);
}
