//! Unit tests of fill leases in [`PartitionState`] (grant, wait, expiry, fill, release,
//! voiding by writes and CDC, the stale window, the cap, reclaim, determinism, exactly-once
//! fills) and of their validation in [`Engine::prepare`].

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::test_apply::apply_checked;
use super::{
    CdcChange, Clock, Command, Condition, Engine, LeaseDecision, ManualClock, Op, Outcome,
    PartitionId, PartitionState, RequestId, StorageConfig, StorageError, WriteRequest,
    DEFAULT_LEASE_TTL_MS, MAX_LEASES, MAX_LEASE_TTL_MS, MAX_TTL_MS,
};

/// A lease lifetime used by the helpers.
const LEASE_MS: u64 = 10_000;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// A partition plus the next index and the proposer's clock.
struct Sm {
    state: PartitionState,
    index: u64,
    now: u64,
}

impl Sm {
    fn new() -> Self {
        Self {
            state: PartitionState::new(PartitionId(2)),
            index: 0,
            now: 1_000,
        }
    }

    /// Applies `cmd` at the current time, checking `growth` and the invariants.
    fn apply(&mut self, cmd: Command) -> Outcome {
        self.index += 1;
        apply_checked(&mut self.state, self.index, self.now, cmd)
    }

    fn lease_with(&mut self, key: &str, ttl: u64, window: u64) -> LeaseDecision {
        let until = self.now + ttl;
        match self.apply(Command::Lease {
            key: b(key),
            lease_until_ms: until,
            stale_window_ms: window,
        }) {
            Outcome::Lease(d) => d,
            other => panic!("lease answered {other:?}"),
        }
    }

    fn lease(&mut self, key: &str) -> LeaseDecision {
        self.lease_with(key, LEASE_MS, 0)
    }

    /// Leases `key` and returns the granted token.
    fn granted(&mut self, key: &str) -> u64 {
        match self.lease(key) {
            LeaseDecision::Granted { token } => token,
            other => panic!("expected a grant of {key}, got {other:?}"),
        }
    }

    fn fill_with(&mut self, key: &str, value: &str, token: u64, source_lsn: u64) -> Outcome {
        self.apply(Command::Fill {
            key: b(key),
            value: b(value),
            expire_at_ms: None,
            source_lsn,
            token,
        })
    }

    fn fill(&mut self, key: &str, value: &str, token: u64) -> Outcome {
        self.fill_with(key, value, token, 0)
    }

    fn set(&mut self, key: &str, value: &str, expire_at_ms: Option<u64>) -> Outcome {
        self.set_if(key, value, expire_at_ms, Condition::Always)
    }

    fn set_if(
        &mut self,
        key: &str,
        value: &str,
        expire_at_ms: Option<u64>,
        condition: Condition,
    ) -> Outcome {
        self.apply(Command::Set {
            key: b(key),
            value: b(value),
            expire_at_ms,
            keep_ttl: false,
            condition,
            source_lsn: 0,
        })
    }

    fn cdc(&mut self, lsn: u64, fence: u64, changes: Vec<CdcChange>) -> Outcome {
        let tombstone_until_ms = self.now + 600_000;
        self.apply(Command::Cdc {
            lsn,
            watermark: lsn,
            fence,
            tombstone_until_ms,
            changes,
        })
    }

    fn value(&mut self, key: &str) -> Option<Bytes> {
        self.state.get(key.as_bytes(), self.now).map(|e| e.value)
    }
}

fn lost(version: u64) -> Outcome {
    Outcome::Fill {
        applied: false,
        version,
        newer_lsn: 0,
        lease_lost: true,
    }
}

fn applied(version: u64) -> Outcome {
    Outcome::Fill {
        applied: true,
        version,
        newer_lsn: 0,
        lease_lost: false,
    }
}

#[test]
fn grant_wait_expire_and_regrant() {
    let mut sm = Sm::new();
    sm.set("other", "x", None);
    // The token is the log index of the grant.
    let token = sm.granted("k");
    assert_eq!(token, 2);
    assert_eq!(sm.state.lease_of(b"k"), Some((2, 1_000 + LEASE_MS)));

    sm.now += 4_000;
    assert_eq!(
        sm.lease("k"),
        LeaseDecision::Wait {
            remaining_ms: LEASE_MS - 4_000
        }
    );
    // A wait changes nothing: the lease keeps its token and end.
    assert_eq!(sm.state.lease_of(b"k"), Some((2, 1_000 + LEASE_MS)));

    // Ended (until <= now): the next caller is granted a new lease at its own index.
    sm.now = 1_000 + LEASE_MS;
    let again = sm.granted("k");
    assert_eq!(again, sm.index);
    assert_eq!(sm.state.lease_of(b"k"), Some((again, sm.now + LEASE_MS)));
    assert_eq!(sm.state.lease_count(), 1);
    // The old token no longer fills.
    assert_eq!(sm.fill("k", "v", token), lost(0));
    assert_eq!(sm.value("k"), None);
}

#[test]
fn fill_with_the_token_applies_and_ends_the_lease() {
    let mut sm = Sm::new();
    let token = sm.granted("k");
    assert_eq!(sm.fill("k", "v", token + 1), lost(0), "a wrong token");
    assert_eq!(sm.fill("k", "v", 0), lost(0), "no token");
    assert_eq!(sm.state.lease_of(b"k").map(|l| l.0), Some(token));
    let out = sm.fill("k", "loaded", token);
    assert_eq!(out, applied(sm.index));
    assert_eq!(sm.value("k"), Some(b("loaded")));
    assert_eq!(sm.state.lease_of(b"k"), None);
    // A second fill with the same token has no lease any more.
    let version = sm.index;
    assert_eq!(sm.fill("k", "again", token), lost(version));
    assert_eq!(sm.value("k"), Some(b("loaded")));
    // The value is now fresh: the next caller hits.
    assert_eq!(sm.lease("k"), LeaseDecision::Hit);
}

#[test]
fn fill_stores_like_set_with_a_deadline_and_replaces_an_expired_entry() {
    let mut sm = Sm::new();
    sm.set("k", "old", Some(1_500));
    sm.now = 2_000;
    let token = sm.granted("k");
    // The expired entry is still held (a lease never drops it).
    assert!(sm.state.contains_key(b"k"));
    let out = sm.apply(Command::Fill {
        key: b("k"),
        value: b("new"),
        expire_at_ms: Some(9_000),
        source_lsn: 0,
        token,
    });
    assert_eq!(out, applied(sm.index));
    let e = sm.state.get(b"k", sm.now).unwrap();
    assert_eq!((e.value, e.expire_at_ms), (b("new"), Some(9_000)));
    assert_eq!(sm.state.expired_removed(), 1);
}

#[test]
fn writes_void_the_lease() {
    type Write = fn(&mut Sm) -> Outcome;
    let writes: [(&str, Write); 6] = [
        ("set", |sm| sm.set("k", "w", None)),
        ("delete", |sm| sm.apply(Command::Delete { key: b("k") })),
        ("incr", |sm| {
            sm.apply(Command::Incr {
                key: b("k"),
                delta: 1,
            })
        }),
        ("expire", |sm| {
            sm.apply(Command::Expire {
                key: b("k"),
                expire_at_ms: Some(50_000),
            })
        }),
        ("persist", |sm| {
            sm.apply(Command::Expire {
                key: b("k"),
                expire_at_ms: None,
            })
        }),
        ("expire in the past", |sm| {
            sm.apply(Command::Expire {
                key: b("k"),
                expire_at_ms: Some(10),
            })
        }),
    ];
    for (name, write) in writes {
        let mut sm = Sm::new();
        // A value inside the stale window, so that Expire/Incr have a live key to change.
        sm.set("k", "7", Some(1_500));
        let token = match sm.lease_with("k", LEASE_MS, 1_000) {
            LeaseDecision::Granted { token } => token,
            other => panic!("{name}: {other:?}"),
        };
        write(&mut sm);
        assert_eq!(sm.state.lease_of(b"k"), None, "{name}");
        let version = sm.state.get(b"k", sm.now).map_or(0, |e| e.version);
        assert_eq!(sm.fill("k", "loaded", token), lost(version), "{name}");
    }
}

#[test]
fn deleting_a_missing_key_voids_but_refused_writes_and_evict_do_not() {
    let mut sm = Sm::new();
    let token = sm.granted("k");
    sm.apply(Command::Delete { key: b("k") });
    assert_eq!(sm.fill("k", "v", token), lost(0), "delete of a missing key");

    let mut sm = Sm::new();
    let token = sm.granted("k");
    // Not applied: IF_PRESENT on a missing key, INCR of a non-integer, EXPIRE of a
    // missing key, PERSIST of a key without TTL.
    assert!(matches!(
        sm.set_if("k", "x", None, Condition::IfPresent),
        Outcome::Set { applied: false, .. }
    ));
    sm.apply(Command::Expire {
        key: b("k"),
        expire_at_ms: Some(9_000),
    });
    sm.apply(Command::Evict { keys: vec![b("k")] });
    sm.apply(Command::ReleaseLease {
        key: b("k"),
        token: token + 1,
    });
    assert_eq!(sm.state.lease_of(b"k").map(|l| l.0), Some(token));
    assert_eq!(sm.fill("k", "v", token), applied(sm.index));

    let mut sm = Sm::new();
    sm.set("k", "text", Some(1_200));
    let token = match sm.lease_with("k", LEASE_MS, 500) {
        LeaseDecision::Granted { token } => token,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        sm.apply(Command::Incr {
            key: b("k"),
            delta: 1
        }),
        Outcome::Incr(Err(_))
    ));
    // Evicting the stale value does not void the lease: the fill puts a value back.
    sm.apply(Command::Evict { keys: vec![b("k")] });
    assert_eq!(sm.fill("k", "v", token), applied(sm.index));
}

#[test]
fn cdc_changes_void_leases() {
    // Invalidate, Put, and a Put skipped as older than the key's LSN: all void.
    let cases: [(&str, Vec<CdcChange>); 3] = [
        ("invalidate", vec![CdcChange::Invalidate { key: b("k") }]),
        (
            "put",
            vec![CdcChange::Put {
                key: b("k"),
                value: b("row"),
                expire_at_ms: None,
            }],
        ),
        (
            "skipped put",
            vec![CdcChange::Put {
                key: b("k"),
                value: b("older row"),
                expire_at_ms: None,
            }],
        ),
    ];
    for (name, changes) in cases {
        let mut sm = Sm::new();
        if name == "skipped put" {
            // The key already reflects LSN 50, so the LSN-20 put below is skipped.
            sm.cdc(50, 1, vec![CdcChange::Invalidate { key: b("k") }]);
        }
        let token = sm.granted("k");
        sm.cdc(20, 1, changes);
        assert_eq!(sm.state.lease_of(b"k"), None, "{name}");
        let version = sm.state.get(b"k", sm.now).map_or(0, |e| e.version);
        assert_eq!(sm.fill("k", "loaded", token), lost(version), "{name}");
    }

    // A prefix invalidation voids the leases under the prefix only; an empty one, all.
    let mut sm = Sm::new();
    let user = sm.granted("user:1");
    let user2 = sm.granted("user:2");
    let order = sm.granted("order:1");
    sm.cdc(
        30,
        1,
        vec![CdcChange::InvalidatePrefix { prefix: b("user:") }],
    );
    assert_eq!(sm.fill("user:1", "v", user), lost(0));
    assert_eq!(sm.fill("user:2", "v", user2), lost(0));
    assert_eq!(sm.state.lease_of(b"order:1").map(|l| l.0), Some(order));
    sm.cdc(31, 1, vec![CdcChange::InvalidatePrefix { prefix: b("") }]);
    assert_eq!(sm.state.lease_count(), 0);

    // A fenced batch changes nothing, leases included.
    let mut sm = Sm::new();
    sm.cdc(10, 5, Vec::new());
    let token = sm.granted("k");
    assert!(matches!(
        sm.cdc(11, 4, vec![CdcChange::Invalidate { key: b("k") }]),
        Outcome::Cdc(Err(_))
    ));
    assert_eq!(sm.fill("k", "v", token), applied(sm.index));
}

#[test]
fn fill_refused_as_stale_ends_the_lease() {
    let mut sm = Sm::new();
    sm.cdc(40, 1, vec![CdcChange::Invalidate { key: b("other") }]);
    sm.cdc(45, 1, vec![CdcChange::InvalidatePrefix { prefix: b("p:") }]);
    let token = sm.granted("p:1");
    assert_eq!(
        sm.fill_with("p:1", "row read at 44", token, 44),
        Outcome::Fill {
            applied: false,
            version: 0,
            newer_lsn: 45,
            lease_lost: false
        }
    );
    assert_eq!(sm.state.lease_of(b"p:1"), None);
    assert_eq!(sm.value("p:1"), None);
    // Newer than every CDC LSN of the key: applied, with its source LSN.
    let token = sm.granted("p:1");
    assert_eq!(
        sm.fill_with("p:1", "row read at 46", token, 46),
        applied(sm.index)
    );
    assert_eq!(sm.state.get(b"p:1", sm.now).unwrap().source_lsn, 46);
}

#[test]
fn an_expired_lease_fill_is_lost() {
    let mut sm = Sm::new();
    let token = sm.granted("k");
    sm.now += LEASE_MS; // until == now: ended
    assert_eq!(sm.fill("k", "late", token), lost(0));
    assert_eq!(sm.value("k"), None);
    // Nothing changed: the ended lease is still held until forgotten.
    assert_eq!(sm.state.lease_of(b"k").map(|l| l.0), Some(token));
}

#[test]
fn release_ends_a_matching_lease_only() {
    let mut sm = Sm::new();
    let token = sm.granted("k");
    let release = |sm: &mut Sm, token| sm.apply(Command::ReleaseLease { key: b("k"), token });
    assert_eq!(release(&mut sm, token + 1), Outcome::Released(false));
    assert_eq!(
        sm.lease("k"),
        LeaseDecision::Wait {
            remaining_ms: LEASE_MS
        }
    );
    assert_eq!(release(&mut sm, token), Outcome::Released(true));
    assert_eq!(sm.state.lease_of(b"k"), None);
    assert_eq!(release(&mut sm, token), Outcome::Released(false));
    // The next caller is granted at once.
    let next = sm.granted("k");
    assert!(next > token);
    // A matching but ended lease is forgotten, and reported as not held.
    sm.now += LEASE_MS;
    assert_eq!(release(&mut sm, next), Outcome::Released(false));
    assert_eq!(sm.state.lease_count(), 0);
}

#[test]
fn stale_window_leases_a_value_that_stays_readable() {
    let mut sm = Sm::new();
    sm.set("fresh", "f", Some(1_000 + 5_001));
    sm.set("stale", "s", Some(1_000 + 5_000));
    sm.set("forever", "p", None);
    assert_eq!(sm.lease_with("fresh", LEASE_MS, 5_000), LeaseDecision::Hit);
    assert_eq!(
        sm.lease_with("forever", LEASE_MS, u64::MAX / 2),
        LeaseDecision::Hit
    );
    // TTL remaining <= window: one caller refreshes, the others wait...
    let token = match sm.lease_with("stale", LEASE_MS, 5_000) {
        LeaseDecision::Granted { token } => token,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        sm.lease_with("stale", LEASE_MS, 5_000),
        LeaseDecision::Wait { .. }
    ));
    // ...while the stale value stays readable.
    assert_eq!(sm.value("stale"), Some(b("s")));
    // With a smaller window the same value is fresh: a hit, whatever the lease.
    assert_eq!(sm.lease_with("stale", LEASE_MS, 4_999), LeaseDecision::Hit);
    assert_eq!(sm.fill("stale", "refreshed", token), applied(sm.index));
    assert_eq!(sm.value("stale"), Some(b("refreshed")));
}

#[test]
fn at_the_cap_expired_leases_are_purged_then_miss() {
    let mut sm = Sm::new();
    // Half end at 1_000 + 100, half run long. (Applied directly: `Sm::apply` checks every
    // invariant after each op, which is quadratic here.)
    for i in 0..MAX_LEASES {
        let ttl = if i % 2 == 0 { 100 } else { LEASE_MS };
        sm.index += 1;
        let op = Op {
            now_ms: sm.now,
            cmd: Command::Lease {
                key: Bytes::from(format!("key:{i}")),
                lease_until_ms: sm.now + ttl,
                stale_window_ms: 0,
            },
        };
        assert_eq!(
            sm.state.apply(sm.index, &op),
            Outcome::Lease(LeaseDecision::Granted { token: sm.index })
        );
    }
    assert_eq!(sm.state.lease_count(), MAX_LEASES);
    assert_eq!(sm.lease("one more"), LeaseDecision::Miss);
    assert_eq!(sm.state.lease_of(b"one more"), None);
    // A key that holds a lease still waits at the cap.
    assert!(matches!(sm.lease("key:1"), LeaseDecision::Wait { .. }));

    // Once half of them ended, the next grant first forgets the ended ones.
    sm.now += 100;
    assert!(matches!(
        sm.lease("one more"),
        LeaseDecision::Granted { .. }
    ));
    assert_eq!(sm.state.lease_count(), MAX_LEASES / 2 + 1);
    assert_eq!(sm.state.lease_of(b"key:0"), None);
    assert!(sm.state.lease_of(b"key:1").is_some());
}

#[test]
fn reclaim_forgets_up_to_max_ended_leases() {
    let mut sm = Sm::new();
    sm.lease_with("a", 300, 0);
    sm.lease_with("b", 100, 0);
    sm.lease_with("c", 200, 0);
    sm.lease_with("d", LEASE_MS, 0);
    assert_eq!(sm.state.next_lease_expiry(), Some(1_100));
    sm.now += 250;
    assert_eq!(sm.apply(Command::Reclaim { max: 1 }), Outcome::Reclaimed(0));
    // Earliest end first.
    assert_eq!(sm.state.lease_of(b"b"), None);
    assert!(sm.state.lease_of(b"c").is_some());
    sm.apply(Command::Reclaim { max: 10 });
    assert_eq!(sm.state.lease_count(), 2);
    assert!(sm.state.lease_of(b"a").is_some(), "still running");
    assert!(sm.state.lease_of(b"d").is_some());
}

/// Two replicas applying the same ops (with different reads in between) hold the same
/// leases and answer the same outcomes; so does a replica restored from a snapshot.
#[test]
fn replicas_agree_on_leases() {
    let script = |sm: &mut Sm| -> Vec<Outcome> {
        let mut out = Vec::new();
        let t1 = sm.granted("a");
        out.push(Outcome::Lease(LeaseDecision::Granted { token: t1 }));
        let t2 = sm.granted("b");
        out.push(sm.fill("a", "1", t1));
        sm.now += 50;
        out.push(Outcome::Lease(sm.lease("b")));
        out.push(sm.set("b", "x", Some(sm.now + 20)));
        out.push(sm.fill("b", "late", t2));
        out.push(Outcome::Lease(sm.lease_with("b", 500, 30)));
        out.push(Outcome::Lease(sm.lease_with("c", 40, 0)));
        sm.now += 100;
        out.push(sm.apply(Command::Reclaim { max: 5 }));
        out.push(sm.cdc(9, 1, vec![CdcChange::InvalidatePrefix { prefix: b("z") }]));
        out.push(Outcome::Lease(sm.lease("zz")));
        out
    };
    let mut a = Sm::new();
    let mut b = Sm::new();
    for key in ["a", "b", "c"] {
        b.state.get(key.as_bytes(), 77);
    }
    let out_a = script(&mut a);
    let out_b = script(&mut b);
    assert_eq!(out_a, out_b);
    assert_eq!(a.state.snapshot(), b.state.snapshot());
    assert!(!a.state.snapshot().leases.is_empty());
    let restored = PartitionState::restore(PartitionId(2), a.state.snapshot());
    assert_eq!(restored.snapshot(), a.state.snapshot());
    restored.assert_consistent();
}

/// A retried fill (same request id, a later log entry) answers the first outcome and
/// does not turn into `lease_lost`.
#[test]
fn a_fill_applies_once_per_request_id() {
    let mut state = PartitionState::new(PartitionId(1));
    let op = |now_ms, cmd| Op { now_ms, cmd };
    let grant = state.apply_once(
        1,
        &op(
            1_000,
            Command::Lease {
                key: b("k"),
                lease_until_ms: 5_000,
                stale_window_ms: 0,
            },
        ),
        None,
        false,
    );
    assert_eq!(grant, Outcome::Lease(LeaseDecision::Granted { token: 1 }));
    let fill = op(
        1_100,
        Command::Fill {
            key: b("k"),
            value: b("v"),
            expire_at_ms: None,
            source_lsn: 0,
            token: 1,
        },
    );
    let id = Some(RequestId { client: 3, seq: 9 });
    let first = state.apply_once(2, &fill, id, false);
    assert_eq!(first, applied(2));
    assert_eq!(state.apply_once(3, &fill, id, false), first);
    // Without the id, the same fill has lost its (ended) lease.
    assert_eq!(state.apply_once(4, &fill, None, false), lost(2));
}

fn engine() -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let config = StorageConfig {
        partitions: 2,
        max_value_bytes: 8,
        ..StorageConfig::default()
    };
    (Engine::new(config, clock.clone()), clock)
}

#[test]
fn prepare_validates_lease_requests() {
    let (engine, clock) = engine();
    let now = clock.now_ms();
    let lease = |lease_ttl_ms, stale_window_ms| WriteRequest::Lease {
        key: b("k"),
        lease_ttl_ms,
        stale_window_ms,
    };
    let until = |req| match engine.prepare(req).unwrap().cmd {
        Command::Lease { lease_until_ms, .. } => lease_until_ms,
        other => panic!("{other:?}"),
    };
    assert_eq!(until(lease(0, 0)), now + DEFAULT_LEASE_TTL_MS);
    assert_eq!(until(lease(1, 0)), now + 1);
    assert_eq!(
        until(lease(MAX_LEASE_TTL_MS, MAX_TTL_MS)),
        now + MAX_LEASE_TTL_MS
    );
    let err = engine.prepare(lease(MAX_LEASE_TTL_MS + 1, 0)).unwrap_err();
    assert_eq!(
        err,
        StorageError::LeaseTtlOutOfRange {
            ttl_ms: MAX_LEASE_TTL_MS + 1,
            limit_ms: MAX_LEASE_TTL_MS
        }
    );
    assert!(err.to_string().contains("lease_ttl_ms"), "{err}");
    assert!(matches!(
        engine.prepare(lease(0, MAX_TTL_MS + 1)),
        Err(StorageError::TtlOutOfRange { .. })
    ));
    assert_eq!(
        engine.prepare(WriteRequest::Lease {
            key: Bytes::new(),
            lease_ttl_ms: 0,
            stale_window_ms: 0
        }),
        Err(StorageError::EmptyKey)
    );
    let fill = |value: &str, ttl_ms| WriteRequest::Fill {
        key: b("k"),
        value: b(value),
        ttl_ms,
        source_lsn: 0,
        source_snapshot: None,
        token: 1,
    };
    assert!(matches!(
        engine.prepare(fill("123456789", None)),
        Err(StorageError::ValueTooLarge { .. })
    ));
    assert!(matches!(
        engine.prepare(fill("v", Some(MAX_TTL_MS + 1))),
        Err(StorageError::TtlOutOfRange { .. })
    ));
    match engine.prepare(fill("v", Some(500))).unwrap().cmd {
        Command::Fill { expire_at_ms, .. } => assert_eq!(expire_at_ms, Some(now + 500)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn engine_leases_fill_and_reclaims_ended_leases() {
    let (engine, clock) = engine();
    let p = PartitionId(1);
    let write = |req| engine.write(p, req).unwrap();
    let lease = || WriteRequest::Lease {
        key: b("k"),
        lease_ttl_ms: 1_000,
        stale_window_ms: 0,
    };
    let Outcome::Lease(LeaseDecision::Granted { token }) = write(lease()) else {
        panic!("no grant");
    };
    assert!(matches!(
        write(lease()),
        Outcome::Lease(LeaseDecision::Wait { .. })
    ));
    assert_eq!(
        write(WriteRequest::Fill {
            key: b("k"),
            value: b("v"),
            ttl_ms: None,
            source_lsn: 0,
            source_snapshot: None,
            token,
        }),
        applied(token + 2)
    );
    assert_eq!(engine.peek(p, b"k").unwrap().map(|v| v.value), Some(b("v")));
    assert_eq!(
        engine.stats().hits + engine.stats().misses,
        0,
        "peek counts nothing"
    );

    // An ended lease makes the partition due for reclaim, which forgets it.
    let Outcome::Lease(LeaseDecision::Granted { .. }) = write(WriteRequest::Lease {
        key: b("other"),
        lease_ttl_ms: 1_000,
        stale_window_ms: 0,
    }) else {
        panic!("no grant");
    };
    assert!(engine.due_for_reclaim(clock.now_ms()).is_empty());
    clock.advance(Duration::from_millis(1_000));
    assert_eq!(engine.due_for_reclaim(clock.now_ms()), vec![p]);
    engine.reclaim_expired(10);
    assert!(engine.due_for_reclaim(clock.now_ms()).is_empty());
}
