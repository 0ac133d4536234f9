//! Unit tests of [`PartitionState`]: every command, condition and edge case.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;

use super::mem::entry_cost;
use super::test_apply::apply_checked;
use super::{
    Command, Condition, EntryView, IncrError, Outcome, PartitionId, PartitionState, ENTRY_OVERHEAD,
    TTL_OVERHEAD,
};

/// A partition plus the next index and the proposer's clock.
struct Sm {
    state: PartitionState,
    index: u64,
    now: u64,
}

impl Sm {
    fn new() -> Self {
        Self {
            state: PartitionState::new(PartitionId(3)),
            index: 0,
            now: 1_000,
        }
    }

    /// Applies `cmd` at the current time, checking that `growth` predicted the change.
    fn apply(&mut self, cmd: Command) -> Outcome {
        self.index += 1;
        apply_checked(&mut self.state, self.index, self.now, cmd)
    }

    fn set(&mut self, key: &str, value: &str) -> Outcome {
        self.set_with(key, value, None, false, Condition::Always)
    }

    fn set_with(
        &mut self,
        key: &str,
        value: &str,
        expire_at_ms: Option<u64>,
        keep_ttl: bool,
        condition: Condition,
    ) -> Outcome {
        self.apply(Command::Set {
            key: b(key),
            value: b(value),
            expire_at_ms,
            keep_ttl,
            condition,
            source_lsn: 0,
        })
    }

    fn incr(&mut self, key: &str, delta: i64) -> Outcome {
        self.apply(Command::Incr { key: b(key), delta })
    }

    fn get(&mut self, key: &str) -> Option<EntryView> {
        self.state.get(key.as_bytes(), self.now)
    }

    fn value(&mut self, key: &str) -> Option<String> {
        self.get(key)
            .map(|v| String::from_utf8(v.value.to_vec()).unwrap())
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn set_ok(version: u64) -> Outcome {
    Outcome::Set {
        applied: true,
        version,
        newer_lsn: 0,
    }
}

fn set_refused(version: u64) -> Outcome {
    Outcome::Set {
        applied: false,
        version,
        newer_lsn: 0,
    }
}

#[test]
fn set_then_get_returns_value_and_version() {
    let mut sm = Sm::new();
    assert_eq!(sm.set("a", "1"), set_ok(1));
    assert_eq!(sm.set("b", "2"), set_ok(2));
    assert_eq!(sm.set("a", "3"), set_ok(3));
    let view = sm.get("a").unwrap();
    assert_eq!(view.value, b("3"));
    assert_eq!(view.version, 3);
    assert_eq!(view.expire_at_ms, None);
    assert_eq!(sm.get("missing"), None);
    assert_eq!(sm.state.len(), 2);
    assert!(!sm.state.is_empty());
}

#[test]
fn stored_bytes_never_alias_the_op_buffer() {
    // A request frame holding one small value among other bytes.
    let frame = Bytes::from(vec![7u8; 8192]);
    let (key, value) = (frame.slice(0..16), frame.slice(1024..2048));
    let in_frame = |b: &Bytes| frame.as_ptr_range().contains(&b.as_ptr());
    let mut sm = Sm::new();
    for round in 0..2 {
        // Round 0 inserts, round 1 replaces: both paths keep their own copies.
        sm.apply(Command::Set {
            key: key.clone(),
            value: value.clone(),
            expire_at_ms: None,
            keep_ttl: false,
            condition: Condition::Always,
            source_lsn: 0,
        });
        let view = sm.state.get(&key, 0).unwrap();
        assert_eq!(view.value, value);
        assert!(
            !in_frame(&view.value),
            "round {round}: value pins the frame"
        );
    }
    let snap = sm.state.snapshot();
    assert!(snap
        .entries
        .iter()
        .all(|e| !in_frame(&e.key) && !in_frame(&e.value)));
}

#[test]
fn if_absent_and_if_present() {
    let mut sm = Sm::new();
    assert_eq!(
        sm.set_with("k", "x", None, false, Condition::IfPresent),
        set_refused(0)
    );
    assert_eq!(sm.get("k"), None);
    assert_eq!(
        sm.set_with("k", "1", None, false, Condition::IfAbsent),
        set_ok(2)
    );
    assert_eq!(
        sm.set_with("k", "2", None, false, Condition::IfAbsent),
        set_refused(2)
    );
    assert_eq!(sm.value("k").unwrap(), "1");
    assert_eq!(
        sm.set_with("k", "3", None, false, Condition::IfPresent),
        set_ok(4)
    );
    assert_eq!(sm.value("k").unwrap(), "3");
}

#[test]
fn if_version_is_compare_and_set() {
    let mut sm = Sm::new();
    assert_eq!(
        sm.set_with("k", "x", None, false, Condition::IfVersion(0)),
        set_refused(0)
    );
    assert_eq!(
        sm.set_with("k", "x", None, false, Condition::IfVersion(1)),
        set_refused(0)
    );
    assert_eq!(sm.set("k", "v1"), set_ok(3));
    assert_eq!(
        sm.set_with("k", "v2", None, false, Condition::IfVersion(2)),
        set_refused(3)
    );
    assert_eq!(sm.value("k").unwrap(), "v1");
    assert_eq!(
        sm.set_with("k", "v2", None, false, Condition::IfVersion(3)),
        set_ok(5)
    );
    assert_eq!(
        sm.set_with("k", "v3", None, false, Condition::IfVersion(3)),
        set_refused(5)
    );
    assert_eq!(sm.value("k").unwrap(), "v2");
}

#[test]
fn if_version_fails_on_expired_key() {
    let mut sm = Sm::new();
    sm.set_with("k", "v", Some(1_500), false, Condition::Always);
    sm.now = 1_500;
    assert_eq!(
        sm.set_with("k", "w", None, false, Condition::IfVersion(1)),
        set_refused(0)
    );
    assert_eq!(
        sm.state.len(),
        0,
        "the expired entry was dropped when touched"
    );
}

#[test]
fn ttl_is_replaced_unless_keep_ttl() {
    let mut sm = Sm::new();
    sm.set_with("k", "1", Some(5_000), false, Condition::Always);
    assert_eq!(sm.get("k").unwrap().expire_at_ms, Some(5_000));
    // keep_ttl keeps the deadline even when a new one is passed.
    sm.set_with("k", "2", Some(9_000), true, Condition::Always);
    assert_eq!(sm.get("k").unwrap().expire_at_ms, Some(5_000));
    assert_eq!(sm.value("k").unwrap(), "2");
    // A plain SET replaces the deadline (here: removes it).
    sm.set("k", "3");
    assert_eq!(sm.get("k").unwrap().expire_at_ms, None);
    // keep_ttl on a key without TTL keeps "no TTL".
    sm.set_with("k", "4", Some(7_000), true, Condition::Always);
    assert_eq!(sm.get("k").unwrap().expire_at_ms, None);
    // keep_ttl on an absent key uses the given deadline.
    sm.set_with("new", "x", Some(7_000), true, Condition::Always);
    assert_eq!(sm.get("new").unwrap().expire_at_ms, Some(7_000));
}

#[test]
fn expired_keys_are_hidden_but_held_until_reclaimed() {
    let mut sm = Sm::new();
    sm.set_with("k", "v", Some(2_000), false, Condition::Always);
    sm.now = 1_999;
    assert!(sm.get("k").is_some());
    sm.now = 2_000;
    assert_eq!(sm.get("k"), None, "deadline <= now is expired");
    assert_eq!(sm.state.len(), 1, "lazy expiry does not remove");
    assert_eq!(sm.state.next_deadline(), Some(2_000));
    assert_eq!(
        sm.apply(Command::Reclaim { max: 10 }),
        Outcome::Reclaimed(1)
    );
    assert_eq!(sm.state.len(), 0);
    assert_eq!(sm.state.memory_used(), 0);
    assert_eq!(sm.state.expired_removed(), 1);
}

#[test]
fn expired_keys_count_as_absent_for_every_command() {
    let mut sm = Sm::new();
    let expired = |sm: &mut Sm, value: &str| {
        sm.now = 1_000;
        sm.set_with("k", value, Some(1_100), false, Condition::Always);
        sm.now = 1_100;
    };

    expired(&mut sm, "5");
    assert_eq!(
        sm.set_with("k", "n", None, false, Condition::IfAbsent),
        set_ok(2)
    );
    assert_eq!(sm.get("k").unwrap().expire_at_ms, None);

    expired(&mut sm, "5");
    assert_eq!(
        sm.set_with("k", "n", None, false, Condition::IfPresent),
        set_refused(0)
    );
    assert_eq!(sm.state.len(), 0);

    expired(&mut sm, "5");
    assert_eq!(
        sm.incr("k", 2),
        Outcome::Incr(Ok((2, 6))),
        "INCR restarts from 0"
    );
    assert_eq!(
        sm.get("k").unwrap().expire_at_ms,
        None,
        "and the old TTL is gone"
    );

    expired(&mut sm, "abc");
    assert_eq!(sm.incr("k", 1), Outcome::Incr(Ok((1, 8))));

    expired(&mut sm, "5");
    assert_eq!(
        sm.apply(Command::Delete { key: b("k") }),
        Outcome::Deleted(false)
    );
    assert_eq!(sm.state.len(), 0);

    expired(&mut sm, "5");
    let expire = Command::Expire {
        key: b("k"),
        expire_at_ms: Some(99_999),
    };
    assert_eq!(sm.apply(expire), Outcome::Expire(false));
    assert_eq!(sm.state.len(), 0);

    expired(&mut sm, "5");
    sm.set_with("k", "kept?", Some(50_000), true, Condition::Always);
    assert_eq!(
        sm.get("k").unwrap().expire_at_ms,
        Some(50_000),
        "keep_ttl has nothing to keep on an expired key"
    );
    assert_eq!(sm.state.expired_removed(), 7);
    assert_eq!(sm.state.memory_used(), entry_cost(1, 5, true));
}

#[test]
fn incr_counts_and_keeps_ttl() {
    let mut sm = Sm::new();
    assert_eq!(sm.incr("n", 1), Outcome::Incr(Ok((1, 1))));
    assert_eq!(sm.incr("n", 41), Outcome::Incr(Ok((42, 2))));
    assert_eq!(sm.incr("n", -50), Outcome::Incr(Ok((-8, 3))));
    assert_eq!(sm.value("n").unwrap(), "-8");
    sm.set_with("t", "10", Some(9_000), false, Condition::Always);
    assert_eq!(sm.incr("t", 5), Outcome::Incr(Ok((15, 5))));
    let view = sm.get("t").unwrap();
    assert_eq!(view.value, b("15"));
    assert_eq!(view.expire_at_ms, Some(9_000));
    assert_eq!(view.version, 5);
    sm.set("z", "-0");
    assert_eq!(sm.incr("z", 0), Outcome::Incr(Ok((0, 7))));
    assert_eq!(sm.value("z").unwrap(), "0");
}

#[test]
fn incr_rejects_non_integers_and_leaves_state_untouched() {
    for bad in [
        "abc",
        " 1",
        "1 ",
        "+1",
        "",
        "1.5",
        "99999999999999999999",
        "0x10",
    ] {
        let mut sm = Sm::new();
        sm.set_with("k", bad, Some(8_000), false, Condition::Always);
        let before = sm.state.snapshot();
        assert_eq!(
            sm.incr("k", 1),
            Outcome::Incr(Err(IncrError::NotAnInteger)),
            "{bad:?}"
        );
        let after = sm.state.snapshot();
        assert_eq!(after.entries, before.entries, "{bad:?}");
        assert_eq!(after.applied_index, 2, "the index still counts as applied");
    }
}

#[test]
fn incr_overflow_is_an_error() {
    let mut sm = Sm::new();
    sm.set("max", &i64::MAX.to_string());
    assert_eq!(sm.incr("max", 1), Outcome::Incr(Err(IncrError::Overflow)));
    assert_eq!(sm.value("max").unwrap(), i64::MAX.to_string());
    assert_eq!(sm.get("max").unwrap().version, 1);
    assert_eq!(sm.incr("max", -1), Outcome::Incr(Ok((i64::MAX - 1, 3))));
    sm.set("min", &i64::MIN.to_string());
    assert_eq!(sm.incr("min", -1), Outcome::Incr(Err(IncrError::Overflow)));
    assert_eq!(sm.incr("fresh", i64::MIN), Outcome::Incr(Ok((i64::MIN, 6))));
    assert_eq!(sm.value("fresh").unwrap(), "-9223372036854775808");
}

#[test]
fn versions_strictly_increase_across_delete_and_recreate() {
    let mut sm = Sm::new();
    let mut last = 0;
    for round in 0..5 {
        sm.set("k", "v");
        let v = sm.get("k").unwrap().version;
        assert!(v > last, "round {round}: {v} <= {last}");
        last = v;
        sm.incr("other", 1);
        assert_eq!(
            sm.apply(Command::Delete { key: b("k") }),
            Outcome::Deleted(true)
        );
        assert_eq!(
            sm.apply(Command::Delete { key: b("k") }),
            Outcome::Deleted(false)
        );
        assert_eq!(sm.get("k"), None);
    }
}

#[test]
fn expire_sets_replaces_and_persists() {
    let mut sm = Sm::new();
    let expire = |key: &str, at: Option<u64>| Command::Expire {
        key: b(key),
        expire_at_ms: at,
    };
    assert_eq!(sm.apply(expire("k", Some(5_000))), Outcome::Expire(false));
    assert_eq!(sm.state.len(), 0, "EXPIRE does not create keys");
    sm.set("k", "v");
    assert_eq!(
        sm.apply(expire("k", None)),
        Outcome::Expire(false),
        "no TTL to remove"
    );
    assert_eq!(
        sm.get("k").unwrap().version,
        2,
        "a no-op persist keeps the version"
    );
    assert_eq!(sm.apply(expire("k", Some(5_000))), Outcome::Expire(true));
    let view = sm.get("k").unwrap();
    assert_eq!((view.expire_at_ms, view.version), (Some(5_000), 4));
    assert_eq!(sm.state.memory_used(), entry_cost(1, 1, true));
    assert_eq!(sm.apply(expire("k", Some(6_000))), Outcome::Expire(true));
    assert_eq!(sm.state.next_deadline(), Some(6_000));
    assert_eq!(sm.apply(expire("k", None)), Outcome::Expire(true));
    assert_eq!(sm.get("k").unwrap().expire_at_ms, None);
    assert_eq!(sm.state.next_deadline(), None);
    assert_eq!(sm.state.memory_used(), entry_cost(1, 1, false));
    // A deadline already passed deletes the key.
    assert_eq!(sm.apply(expire("k", Some(sm.now))), Outcome::Expire(true));
    assert_eq!(sm.state.len(), 0);
    assert_eq!(sm.state.expired_removed(), 0, "a deletion, not an expiry");
}

#[test]
fn evict_removes_listed_keys() {
    let mut sm = Sm::new();
    sm.set("a", "1");
    sm.set("b", "2");
    sm.set_with("c", "3", Some(1_001), false, Condition::Always);
    sm.now = 2_000;
    let evict = Command::Evict {
        keys: vec![b("a"), b("missing"), b("a"), b("c")],
    };
    assert_eq!(sm.apply(evict), Outcome::Evicted(2));
    assert_eq!(sm.state.len(), 1);
    assert_eq!(sm.state.expired_removed(), 1, "c was already expired");
    assert_eq!(sm.value("b").unwrap(), "2");
    assert_eq!(sm.state.memory_used(), entry_cost(1, 1, false));
    assert_eq!(sm.state.next_deadline(), None);
}

#[test]
fn reclaim_goes_in_deadline_order_up_to_max() {
    let mut sm = Sm::new();
    for (key, deadline) in [
        ("d", 1_400),
        ("a", 1_300),
        ("c", 1_100),
        ("b", 1_100),
        ("e", 9_000),
    ] {
        sm.set_with(key, "v", Some(deadline), false, Condition::Always);
    }
    sm.set("live", "v");
    sm.now = 1_350;
    assert_eq!(sm.apply(Command::Reclaim { max: 2 }), Outcome::Reclaimed(2));
    // Ties by key: b before c.
    assert!(sm.state.get(b"a", 0).is_some());
    assert!(sm.state.get(b"b", 0).is_none());
    assert!(sm.state.get(b"c", 0).is_none());
    assert_eq!(
        sm.apply(Command::Reclaim { max: 10 }),
        Outcome::Reclaimed(1)
    );
    assert_eq!(
        sm.apply(Command::Reclaim { max: 10 }),
        Outcome::Reclaimed(0)
    );
    assert_eq!(sm.state.len(), 3);
    sm.now = u64::MAX;
    assert_eq!(sm.apply(Command::Reclaim { max: 0 }), Outcome::Reclaimed(0));
    assert_eq!(
        sm.apply(Command::Reclaim { max: 10 }),
        Outcome::Reclaimed(2)
    );
    assert_eq!(sm.state.len(), 1);
    assert_eq!(sm.state.expired_removed(), 5);
    assert_eq!(sm.state.memory_used(), entry_cost(4, 1, false));
}

#[test]
fn memory_accounting_is_keys_values_and_overheads() {
    let mut sm = Sm::new();
    assert_eq!(sm.state.memory_used(), 0);
    sm.set("key", "value");
    assert_eq!(sm.state.memory_used(), 3 + 5 + ENTRY_OVERHEAD);
    sm.set_with("k2", "vv", Some(5_000), false, Condition::Always);
    assert_eq!(
        sm.state.memory_used(),
        8 + ENTRY_OVERHEAD + 4 + ENTRY_OVERHEAD + TTL_OVERHEAD
    );
    sm.set("key", "");
    sm.apply(Command::Delete { key: b("k2") });
    assert_eq!(sm.state.memory_used(), 3 + ENTRY_OVERHEAD);
    sm.apply(Command::Delete { key: b("key") });
    assert_eq!(sm.state.memory_used(), 0);
    assert!(sm.state.is_empty());
}

#[test]
fn snapshot_restore_round_trips() {
    let mut sm = Sm::new();
    sm.set("a", "1");
    sm.set_with("b", "2", Some(1_200), false, Condition::Always);
    sm.set_with("c", "3", Some(900), false, Condition::Always); // already expired
    sm.incr("n", 7);
    sm.apply(Command::Delete { key: b("a") });
    let snap = sm.state.snapshot();
    assert_eq!(snap.applied_index, 5);
    assert_eq!(
        snap.entries.len(),
        3,
        "expired-but-unreclaimed entries are included"
    );
    let restored = PartitionState::restore(PartitionId(3), snap.clone());
    assert_eq!(restored.snapshot(), snap);
    assert_eq!(restored.memory_used(), sm.state.memory_used());
    assert_eq!(restored.applied_index(), 5);
    assert_eq!(restored.next_deadline(), Some(900));
    assert_eq!(restored.ttl_len(), 2);

    // Continuing from the restored state matches continuing from the original.
    let mut other = Sm {
        state: restored,
        index: sm.index,
        now: sm.now,
    };
    for s in [&mut sm, &mut other] {
        s.now = 1_250;
        s.apply(Command::Reclaim { max: 5 });
        s.incr("n", 1);
        s.set("a", "again");
    }
    assert_eq!(sm.state.snapshot(), other.state.snapshot());
}

#[test]
fn empty_restore_and_default_snapshot() {
    let state = PartitionState::restore(PartitionId(0), Default::default());
    assert!(state.is_empty());
    assert_eq!(state.applied_index(), 0);
    assert_eq!(state.id(), PartitionId(0));
}
