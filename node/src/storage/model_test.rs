//! Model-based property tests of [`PartitionState`]: random op sequences (CDC batches and
//! cache-aside fills and fill leases included) against a `BTreeMap` reference,
//! snapshot/restore mid-sequence, and replica determinism.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;

use super::mem::entry_cost;
use super::{
    CdcApplied, CdcChange, CdcError, Command, Condition, ExpireCondition, IncrError, LeaseDecision,
    Op, Outcome, PartitionId, PartitionState, RedisOp, RedisOutcome,
};

const KEYS: [&str; 5] = ["a", "b", "c", "dd", "eee"];
/// Prefixes for `InvalidatePrefix`: all keys, none, one, two.
const PREFIXES: [&str; 5] = ["", "x", "d", "e", "dd"];
const VALUES: [&str; 10] = [
    "",
    "x",
    "hello",
    "0",
    "-0",
    "42",
    "-7",
    "+1",
    " 1",
    "9223372036854775807",
];

/// One step of a generated sequence. Deadlines are relative to the current model time so
/// that they land near it.
#[derive(Debug, Clone)]
enum Step {
    Set {
        key: usize,
        value: usize,
        ttl: Option<i64>,
        keep_ttl: bool,
        condition: Cond,
        /// 0: an ordinary write; otherwise a cache-aside fill read at this LSN.
        source_lsn: u64,
    },
    Delete(usize),
    Incr(usize, i64),
    Expire(usize, Option<i64>),
    Evict(Vec<usize>),
    /// `Flush` keeping the keys that start with `PREFIXES[i]` (`""`: keeps nothing).
    Flush(usize),
    Reclaim(usize),
    Cdc {
        lsn: u64,
        watermark: u64,
        fence: u64,
        /// Tombstone lifetime relative to the model's time.
        tombstone_ttl: u64,
        changes: Vec<Change>,
    },
    /// `Command::Lease` with a lease lifetime and a stale window (ms).
    Lease(usize, u64, u64),
    ReleaseLease(usize, Tok),
    Fill {
        key: usize,
        value: usize,
        ttl: Option<i64>,
        source_lsn: u64,
        token: Tok,
    },
    /// A `Command::Redis` op on a key.
    Redis(usize, RStep),
    Get(usize),
    Advance(u64),
    Restore,
}

/// A generated [`RedisOp`].
#[derive(Debug, Clone)]
enum RStep {
    Set {
        value: usize,
        ttl: Option<i64>,
        keep_ttl: bool,
        condition: Cond,
    },
    GetDel,
    GetEx(Option<i64>),
    /// A relative deadline and a condition (index into `EXPIRE_CONDITIONS`).
    ExpireIf(i64, usize),
    /// A value to append and the length limit.
    Append(usize, u64),
}

/// A lease token resolved against the model at run time.
#[derive(Debug, Clone, Copy)]
enum Tok {
    /// The key's current lease token (0 when it has none).
    Current,
    /// The current token plus this (a wrong one).
    Off(u64),
}

/// One generated CDC change: indexes into `KEYS`, `VALUES` or `PREFIXES`.
#[derive(Debug, Clone)]
enum Change {
    Invalidate(usize),
    Put(usize, usize, Option<i64>),
    InvalidatePrefix(usize),
}

/// A `Condition` whose version is resolved against the model at run time.
#[derive(Debug, Clone, Copy)]
enum Cond {
    Always,
    IfAbsent,
    IfPresent,
    /// `IfVersion(current version of the key + offset)`.
    IfVersion(u64),
}

fn step() -> impl Strategy<Value = Step> {
    let key = 0..KEYS.len();
    let ttl = prop::option::of(-5i64..40);
    let cond = prop_oneof![
        Just(Cond::Always),
        Just(Cond::IfAbsent),
        Just(Cond::IfPresent),
        (0u64..2).prop_map(Cond::IfVersion),
    ];
    let delta = prop_oneof![
        Just(1i64),
        Just(-1),
        Just(1000),
        Just(i64::MAX),
        Just(i64::MIN),
        any::<i64>()
    ];
    // Small LSNs, so that batches, fills and tombstones collide and tie often.
    let lsn = 1u64..12;
    let source_lsn = prop_oneof![3 => Just(0u64), 2 => lsn.clone()];
    let change = prop_oneof![
        3 => key.clone().prop_map(Change::Invalidate),
        3 => (key.clone(), 0..VALUES.len(), ttl.clone()).prop_map(|(k, v, t)| Change::Put(k, v, t)),
        1 => (0..PREFIXES.len()).prop_map(Change::InvalidatePrefix),
    ];
    let cdc = (
        lsn.clone(),
        0u64..14,
        0u64..3,
        0u64..40,
        prop::collection::vec(change, 0..4),
    )
        .prop_map(
            |(lsn, watermark, fence, tombstone_ttl, changes)| Step::Cdc {
                lsn,
                watermark,
                fence,
                tombstone_ttl,
                changes,
            },
        );
    prop_oneof![
        6 => (key.clone(), 0..VALUES.len(), ttl.clone(), any::<bool>(), cond, source_lsn).prop_map(
            |(key, value, ttl, keep_ttl, condition, source_lsn)| Step::Set { key, value, ttl, keep_ttl, condition, source_lsn }
        ),
        4 => cdc,
        2 => key.clone().prop_map(Step::Delete),
        3 => (key.clone(), delta).prop_map(|(k, d)| Step::Incr(k, d)),
        2 => (key.clone(), ttl).prop_map(|(k, t)| Step::Expire(k, t)),
        1 => prop::collection::vec(key.clone(), 0..4).prop_map(Step::Evict),
        1 => (0..PREFIXES.len()).prop_map(Step::Flush),
        1 => (0usize..4).prop_map(Step::Reclaim),
        3 => key.clone().prop_map(Step::Get),
        3 => (0u64..25).prop_map(Step::Advance),
        1 => Just(Step::Restore),
        3 => (key.clone(), 1u64..40, 0u64..30).prop_map(|(k, ttl, window)| Step::Lease(k, ttl, window)),
        1 => (key.clone(), tok()).prop_map(|(k, t)| Step::ReleaseLease(k, t)),
        3 => (key.clone(), redis_step()).prop_map(|(k, r)| Step::Redis(k, r)),
        3 => (key, 0..VALUES.len(), prop::option::of(-5i64..40), prop_oneof![3 => Just(0u64), 1 => 1u64..12], tok())
            .prop_map(|(key, value, ttl, source_lsn, token)| Step::Fill { key, value, ttl, source_lsn, token }),
    ]
}

const EXPIRE_CONDITIONS: [ExpireCondition; 5] = [
    ExpireCondition::NoDeadline,
    ExpireCondition::HasDeadline,
    ExpireCondition::Later,
    ExpireCondition::Earlier,
    ExpireCondition::EarlierDeadline,
];

/// The reference rule of `EXPIRE`'s conditions, written from Redis's docs.
fn model_expire_holds(c: ExpireCondition, current: Option<u64>, new: u64) -> bool {
    let has = current.is_some();
    // A key without a deadline has an infinite one.
    let cur = current.unwrap_or(u64::MAX);
    match c {
        ExpireCondition::NoDeadline => !has,
        ExpireCondition::HasDeadline => has,
        ExpireCondition::Later => has && new > cur,
        ExpireCondition::Earlier => new < cur,
        ExpireCondition::EarlierDeadline => has && new < cur,
    }
}

fn redis_step() -> impl Strategy<Value = RStep> {
    let cond = prop_oneof![
        Just(Cond::Always),
        Just(Cond::IfAbsent),
        Just(Cond::IfPresent),
    ];
    prop_oneof![
        (
            0..VALUES.len(),
            prop::option::of(-5i64..40),
            any::<bool>(),
            cond
        )
            .prop_map(|(value, ttl, keep_ttl, condition)| RStep::Set {
                value,
                ttl,
                keep_ttl,
                condition
            }),
        Just(RStep::GetDel),
        prop::option::of(-5i64..40).prop_map(RStep::GetEx),
        (-5i64..40, 0..EXPIRE_CONDITIONS.len()).prop_map(|(t, c)| RStep::ExpireIf(t, c)),
        (0..VALUES.len(), 0u64..40).prop_map(|(v, max)| RStep::Append(v, max)),
    ]
}

fn tok() -> impl Strategy<Value = Tok> {
    prop_oneof![4 => Just(Tok::Current), 1 => (1u64..3).prop_map(Tok::Off)]
}

/// A model entry: (value, version, deadline, source LSN).
type ModelEntry = (Vec<u8>, u64, Option<u64>, u64);

/// The reference: key -> entry, and the CDC state.
#[derive(Debug, Default)]
struct Model {
    map: BTreeMap<Vec<u8>, ModelEntry>,
    /// Key -> (lsn, until).
    tombstones: BTreeMap<Vec<u8>, (u64, u64)>,
    prefixes: BTreeMap<Vec<u8>, u64>,
    floor: u64,
    fence: u64,
    watermark: u64,
    /// Key -> (token, until).
    leases: BTreeMap<Vec<u8>, (u64, u64)>,
}

/// Independent INCR parse: `-?[0-9]+` within i64 range.
fn model_parse(v: &[u8]) -> Option<i64> {
    let (neg, digits) = match v.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, v),
    };
    if digits.is_empty() || digits.len() > 40 || digits.iter().any(|c| !c.is_ascii_digit()) {
        return None;
    }
    let mut n: i128 = 0;
    for d in digits {
        n = n * 10 + i128::from(d - b'0');
    }
    i64::try_from(if neg { -n } else { n }).ok()
}

impl Model {
    fn live(&self, key: &[u8], now: u64) -> Option<&ModelEntry> {
        self.map
            .get(key)
            .filter(|(_, _, d, _)| d.is_none_or(|d| d > now))
    }

    /// The key's CDC LSN without the floor.
    fn cdc_lsn(&self, key: &[u8], now: u64) -> u64 {
        let tombstone = self.tombstones.get(key).map_or(0, |t| t.0);
        let entry = self.live(key, now).map_or(0, |e| e.3);
        let prefix = self
            .prefixes
            .iter()
            .filter(|(p, _)| key.starts_with(p))
            .map(|(_, l)| *l)
            .max()
            .unwrap_or(0);
        tombstone.max(entry).max(prefix)
    }

    fn tombstone(&mut self, key: &[u8], lsn: u64, until: u64) {
        let t = self.tombstones.entry(key.to_vec()).or_insert((0, 0));
        t.0 = t.0.max(lsn);
        t.1 = t.1.max(until);
    }

    /// Forgets up to `max` tombstones due at `now`, by (until, key).
    fn expire_tombstones(&mut self, now: u64, max: usize) {
        let mut due: Vec<(u64, Vec<u8>)> = self
            .tombstones
            .iter()
            .filter(|(_, t)| t.1 <= now)
            .map(|(k, t)| (t.1, k.clone()))
            .collect();
        due.sort();
        for (_, k) in due.into_iter().take(max) {
            let (lsn, _) = self.tombstones.remove(&k).unwrap();
            self.floor = self.floor.max(lsn);
        }
    }

    fn cdc(
        &mut self,
        index: u64,
        now: u64,
        (lsn, watermark, fence, until): (u64, u64, u64, u64),
        changes: &[CdcChange],
    ) -> Outcome {
        if fence < self.fence {
            return Outcome::Cdc(Err(CdcError::Fenced {
                current: self.fence,
            }));
        }
        self.fence = fence;
        self.expire_tombstones(now, usize::MAX);
        let mut changed = 0;
        for change in changes {
            match change {
                CdcChange::Invalidate { key } => {
                    self.leases.remove(key.as_ref());
                    let keep = self.live(key, now).is_some_and(|e| e.3 > lsn);
                    if !keep && self.map.remove(key.as_ref()).is_some() {
                        changed += 1;
                    }
                    self.tombstone(key, lsn, until);
                }
                CdcChange::Put {
                    key,
                    value,
                    expire_at_ms,
                } => {
                    self.leases.remove(key.as_ref());
                    if self.cdc_lsn(key, now) >= lsn {
                        // Skipped, but the transaction still counts for the key's guard.
                        self.tombstone(key, lsn, until);
                        continue;
                    }
                    if lsn <= self.floor {
                        // An old replay under the floor only invalidates.
                        let keep = self.live(key, now).is_some_and(|e| e.3 > lsn);
                        if !keep {
                            self.map.remove(key.as_ref());
                        }
                        self.tombstone(key, lsn, until);
                        continue;
                    }
                    self.map
                        .insert(key.to_vec(), (value.to_vec(), index, *expire_at_ms, lsn));
                    self.tombstone(key, lsn, until);
                    changed += 1;
                }
                CdcChange::InvalidatePrefix { prefix } => {
                    self.leases.retain(|k, _| !k.starts_with(prefix));
                    let before = self.map.len();
                    self.map
                        .retain(|k, e| !(k.starts_with(prefix) && e.3 < lsn));
                    changed += (before - self.map.len()) as u64;
                    let p = self.prefixes.entry(prefix.to_vec()).or_insert(0);
                    *p = (*p).max(lsn);
                }
            }
        }
        self.watermark = self.watermark.max(watermark);
        Outcome::Cdc(Ok(CdcApplied {
            changed,
            watermark: self.watermark,
        }))
    }

    fn apply(&mut self, index: u64, op: &Op) -> Outcome {
        let outcome = self.apply_inner(index, op);
        let voided = match (&op.cmd, &outcome) {
            (Command::Set { key, .. }, Outcome::Set { applied: true, .. })
            | (Command::Delete { key }, _)
            | (Command::Incr { key, .. }, Outcome::Incr(Ok(_)))
            | (Command::Expire { key, .. }, Outcome::Expire(true))
            | (Command::Redis { key, .. }, Outcome::Expire(true))
            | (
                Command::Redis { key, .. },
                Outcome::Redis(
                    RedisOutcome::Set { applied: true, .. }
                    | RedisOutcome::Value(Some(_))
                    | RedisOutcome::Append(Some(_)),
                ),
            ) => Some(key),
            _ => None,
        };
        if let Some(key) = voided {
            self.leases.remove(key.as_ref());
        }
        outcome
    }

    fn apply_inner(&mut self, index: u64, op: &Op) -> Outcome {
        let now = op.now_ms;
        match &op.cmd {
            Command::Lease {
                key,
                lease_until_ms,
                stale_window_ms,
            } => {
                let fresh = self
                    .live(key, now)
                    .is_some_and(|e| e.2.is_none_or(|d| d - now > *stale_window_ms));
                if fresh {
                    return Outcome::Lease(LeaseDecision::Hit);
                }
                if let Some((_, until)) = self.leases.get(key.as_ref()).filter(|l| l.1 > now) {
                    return Outcome::Lease(LeaseDecision::Wait {
                        remaining_ms: until - now,
                    });
                }
                self.leases.insert(key.to_vec(), (index, *lease_until_ms));
                return Outcome::Lease(LeaseDecision::Granted { token: index });
            }
            Command::ReleaseLease { key, token } => {
                let Some((t, until)) = self.leases.get(key.as_ref()).copied() else {
                    return Outcome::Released(false);
                };
                if t != *token {
                    return Outcome::Released(false);
                }
                self.leases.remove(key.as_ref());
                return Outcome::Released(until > now);
            }
            Command::Fill {
                key,
                value,
                expire_at_ms,
                source_lsn,
                token,
            } => {
                let holds = self
                    .leases
                    .get(key.as_ref())
                    .is_some_and(|(t, until)| t == token && *until > now);
                if !holds {
                    return Outcome::Fill {
                        applied: false,
                        version: self.live(key, now).map_or(0, |e| e.1),
                        newer_lsn: 0,
                        lease_lost: true,
                    };
                }
                self.leases.remove(key.as_ref());
                let set = Op {
                    now_ms: now,
                    cmd: Command::Set {
                        key: key.clone(),
                        value: value.clone(),
                        expire_at_ms: *expire_at_ms,
                        keep_ttl: false,
                        condition: Condition::Always,
                        source_lsn: *source_lsn,
                    },
                };
                let Outcome::Set {
                    applied,
                    version,
                    newer_lsn,
                } = self.apply_inner(index, &set)
                else {
                    unreachable!("a set answers a set outcome")
                };
                return Outcome::Fill {
                    applied,
                    version,
                    newer_lsn,
                    lease_lost: false,
                };
            }
            Command::Redis {
                key,
                op: RedisOp::Append { suffix, max_len },
            } => {
                let len = self.live(key, now).map_or(0, |e| e.0.len()) + suffix.len();
                if len as u64 > *max_len {
                    return Outcome::Redis(RedisOutcome::Append(None));
                }
            }
            _ => {}
        }
        if let Some(key) = op.cmd.key() {
            if self
                .map
                .get(key.as_ref())
                .is_some_and(|(_, _, d, _)| d.is_some_and(|d| d <= now))
            {
                self.map.remove(key.as_ref());
            }
        }
        match &op.cmd {
            Command::Set {
                key,
                value,
                expire_at_ms,
                keep_ttl,
                condition,
                source_lsn,
            } => {
                let cur = self.map.get(key.as_ref()).cloned();
                if *source_lsn > 0 {
                    let newer_lsn = self.cdc_lsn(key, now).max(self.floor);
                    if newer_lsn >= *source_lsn {
                        return Outcome::Set {
                            applied: false,
                            version: cur.map_or(0, |c| c.1),
                            newer_lsn,
                        };
                    }
                }
                let ok = match condition {
                    Condition::Always => true,
                    Condition::IfAbsent => cur.is_none(),
                    Condition::IfPresent => cur.is_some(),
                    Condition::IfVersion(v) => cur.as_ref().is_some_and(|c| c.1 == *v),
                };
                if !ok {
                    return Outcome::Set {
                        applied: false,
                        version: cur.map_or(0, |c| c.1),
                        newer_lsn: 0,
                    };
                }
                let deadline = match (&cur, keep_ttl) {
                    (Some(c), true) => c.2,
                    _ => *expire_at_ms,
                };
                self.map
                    .insert(key.to_vec(), (value.to_vec(), index, deadline, *source_lsn));
                Outcome::Set {
                    applied: true,
                    version: index,
                    newer_lsn: 0,
                }
            }
            Command::Delete { key } => Outcome::Deleted(self.map.remove(key.as_ref()).is_some()),
            Command::Redis { key, op: redis } => {
                let old = self.map.get(key.as_ref()).map(|e| Bytes::from(e.0.clone()));
                match redis {
                    RedisOp::Set {
                        value,
                        expire_at_ms,
                        keep_ttl,
                        condition,
                    } => {
                        let set = Op {
                            now_ms: now,
                            cmd: Command::Set {
                                key: key.clone(),
                                value: value.clone(),
                                expire_at_ms: *expire_at_ms,
                                keep_ttl: *keep_ttl,
                                condition: *condition,
                                source_lsn: 0,
                            },
                        };
                        let Outcome::Set {
                            applied, version, ..
                        } = self.apply_inner(index, &set)
                        else {
                            unreachable!("a set answers a set outcome")
                        };
                        Outcome::Redis(RedisOutcome::Set {
                            applied,
                            version,
                            old,
                        })
                    }
                    RedisOp::GetDel => {
                        self.map.remove(key.as_ref());
                        Outcome::Redis(RedisOutcome::Value(old))
                    }
                    RedisOp::GetEx { expire_at_ms } => {
                        let expire = Op {
                            now_ms: now,
                            cmd: Command::Expire {
                                key: key.clone(),
                                expire_at_ms: *expire_at_ms,
                            },
                        };
                        self.apply_inner(index, &expire);
                        Outcome::Redis(RedisOutcome::Value(old))
                    }
                    RedisOp::ExpireIf {
                        expire_at_ms,
                        condition,
                    } => {
                        let current = self.map.get(key.as_ref()).map(|e| e.2);
                        match current {
                            Some(d) if model_expire_holds(*condition, d, *expire_at_ms) => {
                                let expire = Op {
                                    now_ms: now,
                                    cmd: Command::Expire {
                                        key: key.clone(),
                                        expire_at_ms: Some(*expire_at_ms),
                                    },
                                };
                                self.apply_inner(index, &expire)
                            }
                            _ => Outcome::Expire(false),
                        }
                    }
                    RedisOp::Append { suffix, .. } => {
                        let cur = self.map.get(key.as_ref()).cloned();
                        let mut value = cur.as_ref().map_or_else(Vec::new, |c| c.0.clone());
                        value.extend_from_slice(suffix);
                        let len = value.len() as u64;
                        self.map
                            .insert(key.to_vec(), (value, index, cur.and_then(|c| c.2), 0));
                        Outcome::Redis(RedisOutcome::Append(Some(len)))
                    }
                }
            }
            Command::Incr { key, delta } => {
                let cur = self.map.get(key.as_ref()).cloned();
                let n = match &cur {
                    None => 0,
                    Some(c) => match model_parse(&c.0) {
                        Some(n) => n,
                        None => return Outcome::Incr(Err(IncrError::NotAnInteger)),
                    },
                };
                let Some(n) = n.checked_add(*delta) else {
                    return Outcome::Incr(Err(IncrError::Overflow));
                };
                let deadline = cur.and_then(|c| c.2);
                self.map.insert(
                    key.to_vec(),
                    (n.to_string().into_bytes(), index, deadline, 0),
                );
                Outcome::Incr(Ok((n, index)))
            }
            Command::Expire { key, expire_at_ms } => {
                let Some(cur) = self.map.get_mut(key.as_ref()) else {
                    return Outcome::Expire(false);
                };
                match expire_at_ms {
                    Some(d) if *d <= now => {
                        self.map.remove(key.as_ref());
                        Outcome::Expire(true)
                    }
                    Some(d) => {
                        cur.1 = index;
                        cur.2 = Some(*d);
                        Outcome::Expire(true)
                    }
                    None if cur.2.is_some() => {
                        cur.1 = index;
                        cur.2 = None;
                        Outcome::Expire(true)
                    }
                    None => Outcome::Expire(false),
                }
            }
            Command::Evict { keys } => {
                let mut n = 0;
                for key in keys {
                    if self.map.remove(key.as_ref()).is_some() {
                        n += 1;
                    }
                }
                Outcome::Evicted(n)
            }
            Command::Flush { keep } => {
                let gone = |k: &[u8]| keep.is_empty() || !k.starts_with(keep);
                let before = self.map.len();
                self.map.retain(|k, _| !gone(k));
                self.leases.retain(|k, _| !gone(k));
                Outcome::Evicted(before - self.map.len())
            }
            Command::Reclaim { max } => {
                self.expire_tombstones(now, *max);
                let mut ended: Vec<(u64, Vec<u8>)> = self
                    .leases
                    .iter()
                    .filter(|(_, l)| l.1 <= now)
                    .map(|(k, l)| (l.1, k.clone()))
                    .collect();
                ended.sort();
                for (_, k) in ended.into_iter().take(*max) {
                    self.leases.remove(&k);
                }
                let mut due: Vec<(u64, Vec<u8>)> = self
                    .map
                    .iter()
                    .filter_map(|(k, (_, _, d, _))| d.filter(|d| *d <= now).map(|d| (d, k.clone())))
                    .collect();
                due.sort();
                due.truncate(*max);
                for (_, k) in &due {
                    self.map.remove(k);
                }
                Outcome::Reclaimed(due.len())
            }
            Command::Cdc {
                lsn,
                watermark,
                fence,
                tombstone_until_ms,
                changes,
            } => self.cdc(
                index,
                now,
                (*lsn, *watermark, *fence, *tombstone_until_ms),
                changes,
            ),
            Command::Lease { .. } | Command::ReleaseLease { .. } | Command::Fill { .. } => {
                unreachable!("handled above")
            }
            Command::CdcTx { .. } | Command::SnapshotFill { .. } => {
                unreachable!("not generated: the xid guard has its own model test")
            }
        }
    }

    /// The leases, as a snapshot lists them.
    fn leases_snapshot(&self) -> Vec<(Bytes, u64, u64)> {
        self.leases
            .iter()
            .map(|(k, (token, until))| (Bytes::copy_from_slice(k), *token, *until))
            .collect()
    }

    /// The token a generated step presents for `key`.
    fn token(&self, key: usize, tok: Tok) -> u64 {
        let current = self.leases.get(KEYS[key].as_bytes()).map_or(0, |l| l.0);
        match tok {
            Tok::Current => current,
            Tok::Off(offset) => current + offset,
        }
    }

    /// The CDC part of the state, as a snapshot lists it.
    fn cdc_snapshot(&self) -> super::CdcSnapshot {
        super::CdcSnapshot {
            watermark: self.watermark,
            fence: self.fence,
            floor: self.floor,
            // Every generated batch is a `Command::Cdc` (no xid): unknown invalidators.
            xmin_floor: 0,
            tombstones: self
                .tombstones
                .iter()
                .map(|(k, (lsn, until))| (Bytes::copy_from_slice(k), *lsn, *until, UNKNOWN))
                .collect(),
            prefixes: self
                .prefixes
                .iter()
                .map(|(p, lsn)| (Bytes::copy_from_slice(p), *lsn, UNKNOWN))
                .collect(),
        }
    }

    fn memory(&self) -> u64 {
        self.map
            .iter()
            .map(|(k, (v, _, d, _))| entry_cost(k.len(), v.len(), d.is_some()))
            .sum()
    }
}

/// The guard of a tombstone written by a `Command::Cdc` (no xid).
const UNKNOWN: super::XidGuard = super::XidGuard {
    xid: 0,
    min_xmin: super::UNKNOWN_XMIN,
};

fn deadline(now: u64, rel: Option<i64>) -> Option<u64> {
    rel.map(|r| now.saturating_add_signed(r))
}

fn key(i: usize) -> Bytes {
    Bytes::from_static(KEYS[i].as_bytes())
}

/// Turns a step into an op against the model's current state; `None` for non-writes.
fn to_op(step: &Step, model: &Model, now: u64) -> Option<Op> {
    let cmd = match step {
        Step::Set {
            key: k,
            value,
            ttl,
            keep_ttl,
            condition,
            source_lsn,
        } => Command::Set {
            key: key(*k),
            value: Bytes::from_static(VALUES[*value].as_bytes()),
            expire_at_ms: deadline(now, *ttl),
            keep_ttl: *keep_ttl,
            condition: match condition {
                Cond::Always => Condition::Always,
                Cond::IfAbsent => Condition::IfAbsent,
                Cond::IfPresent => Condition::IfPresent,
                Cond::IfVersion(offset) => {
                    let current = model.live(KEYS[*k].as_bytes(), now).map_or(0, |e| e.1);
                    Condition::IfVersion(current + offset)
                }
            },
            source_lsn: *source_lsn,
        },
        Step::Delete(k) => Command::Delete { key: key(*k) },
        Step::Incr(k, delta) => Command::Incr {
            key: key(*k),
            delta: *delta,
        },
        Step::Expire(k, ttl) => Command::Expire {
            key: key(*k),
            expire_at_ms: deadline(now, *ttl),
        },
        Step::Evict(keys) => Command::Evict {
            keys: keys.iter().map(|k| key(*k)).collect(),
        },
        Step::Flush(i) => Command::Flush {
            keep: Bytes::from_static(PREFIXES[*i].as_bytes()),
        },
        Step::Reclaim(max) => Command::Reclaim { max: *max },
        Step::Cdc {
            lsn,
            watermark,
            fence,
            tombstone_ttl,
            changes,
        } => Command::Cdc {
            lsn: *lsn,
            watermark: *watermark,
            fence: *fence,
            tombstone_until_ms: now + tombstone_ttl,
            changes: changes
                .iter()
                .map(|c| match c {
                    Change::Invalidate(k) => CdcChange::Invalidate { key: key(*k) },
                    Change::Put(k, v, ttl) => CdcChange::Put {
                        key: key(*k),
                        value: Bytes::from_static(VALUES[*v].as_bytes()),
                        expire_at_ms: deadline(now, *ttl),
                    },
                    Change::InvalidatePrefix(p) => CdcChange::InvalidatePrefix {
                        prefix: Bytes::from_static(PREFIXES[*p].as_bytes()),
                    },
                })
                .collect(),
        },
        Step::Lease(k, ttl, window) => Command::Lease {
            key: key(*k),
            lease_until_ms: now + ttl,
            stale_window_ms: *window,
        },
        Step::ReleaseLease(k, tok) => Command::ReleaseLease {
            key: key(*k),
            token: model.token(*k, *tok),
        },
        Step::Fill {
            key: k,
            value,
            ttl,
            source_lsn,
            token,
        } => Command::Fill {
            key: key(*k),
            value: Bytes::from_static(VALUES[*value].as_bytes()),
            expire_at_ms: deadline(now, *ttl),
            source_lsn: *source_lsn,
            token: model.token(*k, *token),
        },
        Step::Redis(k, r) => Command::Redis {
            key: key(*k),
            op: match r {
                RStep::Set {
                    value,
                    ttl,
                    keep_ttl,
                    condition,
                } => RedisOp::Set {
                    value: Bytes::from_static(VALUES[*value].as_bytes()),
                    expire_at_ms: deadline(now, *ttl),
                    keep_ttl: *keep_ttl,
                    condition: match condition {
                        Cond::IfAbsent => Condition::IfAbsent,
                        Cond::IfPresent => Condition::IfPresent,
                        Cond::Always | Cond::IfVersion(_) => Condition::Always,
                    },
                },
                RStep::GetDel => RedisOp::GetDel,
                RStep::GetEx(ttl) => RedisOp::GetEx {
                    expire_at_ms: deadline(now, *ttl),
                },
                RStep::ExpireIf(ttl, c) => RedisOp::ExpireIf {
                    expire_at_ms: deadline(now, Some(*ttl)).unwrap_or(now),
                    condition: EXPIRE_CONDITIONS[*c],
                },
                RStep::Append(v, max_len) => RedisOp::Append {
                    suffix: Bytes::from_static(VALUES[*v].as_bytes()),
                    max_len: *max_len,
                },
            },
        },
        Step::Get(_) | Step::Advance(_) | Step::Restore => return None,
    };
    Some(Op { now_ms: now, cmd })
}

fn check_reads(state: &mut PartitionState, model: &Model, now: u64) {
    for k in KEYS {
        let got = state.get(k.as_bytes(), now);
        let want = model.live(k.as_bytes(), now);
        match (got, want) {
            (None, None) => {}
            (Some(g), Some(w)) => {
                assert_eq!(g.value.as_ref(), w.0.as_slice(), "value of {k}");
                assert_eq!(g.version, w.1, "version of {k}");
                assert_eq!(g.expire_at_ms, w.2, "deadline of {k}");
                assert_eq!(g.source_lsn, w.3, "source LSN of {k}");
            }
            (g, w) => panic!("key {k} at {now}: state {g:?}, model {w:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Every outcome and every read matches the model, including after restore(snapshot()).
    #[test]
    fn matches_btreemap_model(steps in prop::collection::vec(step(), 1..120)) {
        let id = PartitionId(7);
        let mut state = PartitionState::new(id);
        let mut model = Model::default();
        let mut now = 1_000u64;
        let mut index = 0u64;
        for step in &steps {
            match step {
                Step::Advance(ms) => now += ms,
                Step::Restore => state = PartitionState::restore(id, state.snapshot()),
                Step::Get(k) => {
                    let got = state.get(KEYS[*k].as_bytes(), now).map(|v| (v.value.to_vec(), v.version, v.expire_at_ms, v.source_lsn));
                    prop_assert_eq!(got, model.live(KEYS[*k].as_bytes(), now).cloned());
                }
                _ => {
                    let Some(op) = to_op(step, &model, now) else { continue };
                    // Every fifth write comes from a larger, jumping index (indexes need
                    // only increase).
                    index += if index % 5 == 4 { 3 } else { 1 };
                    let predicted = state.growth(&op);
                    let before = state.memory_used() as i64;
                    let got = state.apply(index, &op);
                    let want = model.apply(index, &op);
                    prop_assert_eq!(&got, &want, "op {:?}", op);
                    let grown = state.memory_used() as i64 - before;
                    if let Command::Cdc { .. } = op.cmd {
                        // An upper bound for CDC batches.
                        prop_assert!(grown <= predicted && predicted >= 0, "growth {} over {} of {:?}", grown, predicted, op);
                    } else {
                        prop_assert_eq!(grown, predicted, "growth of {:?}", op);
                    }
                }
            }
            prop_assert_eq!(state.len(), model.map.len());
            prop_assert_eq!(state.memory_used(), model.memory());
            prop_assert_eq!(&state.snapshot().cdc, &model.cdc_snapshot());
            prop_assert_eq!(&state.snapshot().leases, &model.leases_snapshot());
            state.assert_consistent();
            check_reads(&mut state, &model, now);
        }
        prop_assert_eq!(state.applied_index(), index);
    }

    /// Two replicas applying the same ops, with different reads (access metadata) in
    /// between, end with identical snapshots.
    #[test]
    fn replicas_are_deterministic(
        steps in prop::collection::vec(step(), 1..150),
        reads in prop::collection::vec((0..KEYS.len(), 0u64..10_000), 0..200),
    ) {
        let mut a = PartitionState::new(PartitionId(1));
        let mut b = PartitionState::new(PartitionId(1));
        let mut model = Model::default();
        let mut reads = reads.into_iter();
        let mut now = 5_000u64;
        let mut index = 0;
        for step in &steps {
            if let Step::Advance(ms) = step {
                now += ms;
            }
            let Some(op) = to_op(step, &model, now) else { continue };
            index += 1;
            model.apply(index, &op);
            let out_a = a.apply(index, &op);
            // Only b sees reads, at arbitrary (node-local) times.
            if let Some((k, at)) = reads.next() {
                b.get(KEYS[k].as_bytes(), at);
            }
            let out_b = b.apply(index, &op);
            prop_assert_eq!(out_a, out_b);
        }
        prop_assert_eq!(a.snapshot(), b.snapshot());
        prop_assert_eq!(a.memory_used(), b.memory_used());
    }
}

#[test]
fn model_parse_agrees_with_parse_i64() {
    for v in VALUES {
        assert_eq!(
            model_parse(v.as_bytes()),
            super::command::parse_i64(v.as_bytes()),
            "{v:?}"
        );
    }
}
