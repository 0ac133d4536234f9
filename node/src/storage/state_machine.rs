//! [`PartitionState`]: the deterministic state machine of one partition.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use indexmap::IndexMap;

use super::cdc::XidGuard;
use super::cdc::{CdcSnapshot, CdcState};
use super::command::parse_i64;
use super::entry::Entry;
use super::evict::{Access, Candidate};
use super::lease::{is_fresh, Lease, LeaseTable, MAX_LEASES};
use super::mem::{entry_cost, fill_cost};
use super::requests::{RequestId, RequestLog};
use super::ttl::TtlIndex;
use super::{
    CdcApplied, CdcChange, CdcError, Command, Condition, EvictionPolicy, IncrError, LeaseDecision,
    Op, Outcome, PartitionId, RedisOp, RedisOutcome,
};
use raftcache_proto::pg_snapshot::PgSnapshot;

/// The entries of one partition and the index of the last op applied to them.
///
/// Writes go through [`apply`](Self::apply) only, which depends on nothing but the current
/// state, the index and the op, so every replica applying the same log ends in the same
/// state (same entries, versions, deadlines, `memory_used`, even the same internal order).
/// Reads ([`get`](Self::get)) hide expired entries and update node-local access metadata.
///
/// # CDC
///
/// [`Command::Cdc`] batches from the Postgres change stream and cache-aside fills
/// (`Command::Set` with `source_lsn > 0`) are ordered by Postgres commit LSN. A key's *CDC
/// LSN* is the max of its tombstone's LSN, its live entry's `source_lsn`, the LSN of every
/// prefix tombstone it starts with, and (for fills only) the partition's tombstone floor.
///
/// - A fill is refused when the key's CDC LSN is `>= source_lsn`.
/// - A batch whose fence is below the partition's is refused whole ([`CdcError::Fenced`]);
///   otherwise the fence becomes the max of both, tombstones with `until_ms <= now_ms` are
///   forgotten (raising the floor), the changes are applied in order, the tombstone caps
///   are enforced (raising the floor), and the watermark becomes the max of both.
/// - `Invalidate` removes the entry (live or expired) unless a live entry has
///   `source_lsn > lsn`, then raises the key's tombstone to `(lsn, tombstone_until_ms)`.
/// - `Put` is skipped when the key's CDC LSN (without the floor) is `>= lsn`; otherwise it
///   stores the value with version = index and `source_lsn = lsn`, and raises the key's
///   tombstone like `Invalidate`, so an older fill stays refused after the entry is gone.
/// - `InvalidatePrefix` removes every entry under the prefix whose `source_lsn < lsn` and
///   raises the prefix's tombstone to `lsn`.
///
/// Within one batch, two changes to the same key at the same LSN are *not* ordered by
/// position: a `Put` after an `Invalidate` or another `Put` of the same key is skipped
/// (equal LSN), so the worker should send one change per key per transaction (the last).
///
/// # Fill leases
///
/// [`Command::Lease`], [`Command::ReleaseLease`] and [`Command::Fill`] keep at most one
/// lease per key (token = the log index of the grant). An applied `Set`, `Incr` or
/// `Expire`, every `Delete`, and every CDC `Invalidate`/`Put` of the key (skipped or not,
/// unless the batch is fenced) void it; `InvalidatePrefix` voids the leases under the
/// prefix; `Evict` does not; `Reclaim { max }` forgets up to `max` expired leases. See
/// `storage/lease.rs`.
#[derive(Debug, Clone)]
pub struct PartitionState {
    /// Which partition this is.
    id: PartitionId,
    /// Key → entry. An `IndexMap` gives O(1) random access for eviction sampling;
    /// removal is `swap_remove`, which is deterministic given the same op sequence.
    entries: IndexMap<Bytes, Entry>,
    /// Entries with a deadline, by deadline.
    ttl: TtlIndex,
    /// Index of the last applied op.
    applied_index: u64,
    /// Accounted bytes, see [`mem`](super::mem). Tombstones are not counted, see
    /// [`cdc`](super::cdc).
    memory_used: u64,
    /// Fence, watermark, tombstones and floor of the Postgres change stream.
    cdc: CdcState,
    /// Outcomes of recently applied client requests (exactly-once writes).
    requests: RequestLog,
    /// Fill leases, by key. Not counted in `memory_used` (bounded by [`MAX_LEASES`]).
    leases: LeaseTable,
    /// Entries removed because they were expired (by `Reclaim`, by being overwritten or
    /// touched while expired, or evicted while expired). Derived from replicated state,
    /// but kept for statistics only: not part of snapshots.
    expired_removed: u64,
    /// Set only during [`apply_shared`](Self::apply_shared): keep the op's bytes as they
    /// are instead of copying them.
    share_bytes: bool,
}

/// A live entry as seen by a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryView {
    /// The stored value.
    pub value: Bytes,
    /// Index of the op that last wrote the entry (strictly increasing per key).
    pub version: u64,
    /// Absolute deadline in ms since epoch, if the entry has one.
    pub expire_at_ms: Option<u64>,
    /// The Postgres commit LSN the value reflects; 0 when it does not come from Postgres.
    pub source_lsn: u64,
}

impl EntryView {
    fn of(entry: &Entry) -> EntryView {
        EntryView {
            value: entry.value.clone(),
            version: entry.version,
            expire_at_ms: entry.expire_at_ms,
            source_lsn: entry.source_lsn,
        }
    }
}

/// The replicated state of a partition, for persistence and Raft snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionSnapshot {
    /// Index of the last op reflected in `entries`.
    pub applied_index: u64,
    /// Every entry held, expired-but-unreclaimed ones included, in internal order (so a
    /// restored state is identical to the original, not only equivalent).
    pub entries: Vec<SnapshotEntry>,
    /// The CDC fence, watermark, floor and tombstones.
    pub cdc: CdcSnapshot,
    /// Remembered request ids: (id, forget at ms, first outcome), in application order.
    pub requests: Vec<(RequestId, u64, Outcome)>,
    /// Fill leases `(key, token, until_ms)`, by key (expired-but-held ones included).
    pub leases: Vec<(Bytes, u64, u64)>,
}

/// One entry of a [`PartitionSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// The key.
    pub key: Bytes,
    /// The value.
    pub value: Bytes,
    /// Index of the op that last wrote the entry.
    pub version: u64,
    /// Absolute deadline in ms since epoch.
    pub expire_at_ms: Option<u64>,
    /// The Postgres commit LSN the value reflects (0: none).
    pub source_lsn: u64,
    /// The snapshot of a fill read under one (`Command::SnapshotFill`).
    pub fill: Option<PgSnapshot>,
}

/// What a single-key op will do, computed without mutating so that the engine can learn the
/// exact memory growth before applying (see [`PartitionState::growth`]).
struct Plan {
    /// Position and accounted size of the current entry, live or expired.
    existing: Option<(usize, u64)>,
    /// Whether the current entry is expired (it is then dropped whatever the effect).
    expired: bool,
    effect: Effect,
    outcome: Outcome,
}

enum Effect {
    /// Leave the key as it is (an expired entry is still dropped).
    Keep,
    /// Remove the key.
    Remove,
    /// Store this value, deadline, source LSN and fill snapshot with version = index.
    Put {
        value: Bytes,
        expire_at_ms: Option<u64>,
        source_lsn: u64,
        fill: Option<Box<PgSnapshot>>,
    },
}

impl PartitionState {
    /// An empty partition with nothing applied.
    pub fn new(id: PartitionId) -> Self {
        Self {
            id,
            entries: IndexMap::new(),
            ttl: TtlIndex::default(),
            applied_index: 0,
            memory_used: 0,
            cdc: CdcState::default(),
            requests: RequestLog::default(),
            leases: LeaseTable::default(),
            expired_removed: 0,
            share_bytes: false,
        }
    }

    /// Which partition this is.
    pub fn id(&self) -> PartitionId {
        self.id
    }

    /// Applies `op` as log entry `index` and says what it did.
    ///
    /// `index` strictly increases; the version of anything written by this op is `index`
    /// (so versions strictly increase per key across writes, deletes and re-creates).
    /// Entries whose deadline is `<= op.now_ms` count as absent for every command and are
    /// dropped when the command touches their key. An `Incr` error, a refused fill and a
    /// fenced `Cdc` batch leave the state as it is but still count the index as applied.
    /// See the type's docs for the CDC rules.
    ///
    /// # Panics
    ///
    /// In debug builds, if `index` does not exceed [`applied_index`](Self::applied_index).
    pub fn apply(&mut self, index: u64, op: &Op) -> Outcome {
        debug_assert!(
            index > self.applied_index,
            "partition {}: index {index} applied after {}",
            self.id,
            self.applied_index
        );
        self.applied_index = index;
        let now = op.now_ms;
        match &op.cmd {
            Command::Evict { keys } => Outcome::Evicted(self.evict(keys, now)),
            Command::Flush { keep } => {
                let keys = self.flushed_keys(keep);
                self.leases.keep_only(keep);
                Outcome::Evicted(self.evict(&keys, now))
            }
            Command::Reclaim { max } => {
                self.cdc.expire(now, *max);
                self.leases.expire(now, *max);
                Outcome::Reclaimed(self.reclaim(*max, now))
            }
            Command::Cdc {
                lsn,
                watermark,
                fence,
                tombstone_until_ms,
                changes,
            } => Outcome::Cdc(self.apply_cdc(
                index,
                now,
                *lsn,
                UNKNOWN_TX,
                *watermark,
                *fence,
                *tombstone_until_ms,
                changes,
            )),
            Command::CdcTx {
                lsn,
                xid,
                min_xmin,
                watermark,
                fence,
                tombstone_until_ms,
                changes,
            } => Outcome::Cdc(self.apply_cdc(
                index,
                now,
                *lsn,
                XidGuard {
                    xid: *xid,
                    min_xmin: *min_xmin,
                },
                *watermark,
                *fence,
                *tombstone_until_ms,
                changes,
            )),
            Command::Set { key, .. }
            | Command::Delete { key }
            | Command::Incr { key, .. }
            | Command::Expire { key, .. }
            | Command::Redis { key, .. } => {
                let plan = self.plan(key, op);
                let outcome = self.execute(key, index, now, plan);
                let voids = match &outcome {
                    Outcome::Set { applied, .. } => *applied,
                    Outcome::Deleted(_) => true,
                    Outcome::Incr(result) => result.is_ok(),
                    Outcome::Expire(updated) => *updated,
                    Outcome::Redis(RedisOutcome::Set { applied, .. }) => *applied,
                    Outcome::Redis(RedisOutcome::Value(old)) => old.is_some(),
                    Outcome::Redis(RedisOutcome::Append(len)) => len.is_some(),
                    _ => false,
                };
                if voids {
                    self.leases.remove(key);
                }
                outcome
            }
            Command::Lease {
                key,
                lease_until_ms,
                stale_window_ms,
            } => Outcome::Lease(self.lease(key, index, now, *lease_until_ms, *stale_window_ms)),
            Command::ReleaseLease { key, token } => {
                let released = match self.leases.get(key) {
                    Some(lease) if lease.token == *token => {
                        self.leases.remove(key);
                        lease.is_live(now)
                    }
                    _ => false,
                };
                Outcome::Released(released)
            }
            Command::SnapshotFill { key, token: 0, .. } => {
                let plan = self.plan(key, op);
                self.execute(key, index, now, plan)
            }
            Command::Fill { key, .. } | Command::SnapshotFill { key, .. } => {
                let plan = self.plan(key, op);
                if !matches!(
                    plan.outcome,
                    Outcome::Fill {
                        lease_lost: true,
                        ..
                    }
                ) {
                    // The lease ends with the fill, applied or refused as stale.
                    self.leases.remove(key);
                }
                self.execute(key, index, now, plan)
            }
        }
    }

    /// Applies [`Command::Lease`] for `key` as op `index` (see the command's docs).
    fn lease(
        &mut self,
        key: &Bytes,
        index: u64,
        now: u64,
        lease_until_ms: u64,
        stale_window_ms: u64,
    ) -> LeaseDecision {
        let fresh = self
            .entries
            .get(key.as_ref())
            .filter(|e| !e.is_expired(now))
            .is_some_and(|e| {
                is_fresh(
                    e.expire_at_ms.map(|deadline| deadline.saturating_sub(now)),
                    stale_window_ms,
                )
            });
        if fresh {
            return LeaseDecision::Hit;
        }
        match self.leases.get(key) {
            Some(lease) if lease.is_live(now) => {
                return LeaseDecision::Wait {
                    remaining_ms: lease.until_ms - now,
                }
            }
            Some(_) => {
                self.leases.remove(key);
            }
            None => {}
        }
        if self.leases.len() >= MAX_LEASES {
            self.leases.expire(now, usize::MAX);
            if self.leases.len() >= MAX_LEASES {
                return LeaseDecision::Miss;
            }
        }
        let key = self.keep(key);
        self.leases.insert(
            key,
            Lease {
                token: index,
                until_ms: lease_until_ms,
            },
        );
        LeaseDecision::Granted { token: index }
    }

    /// [`apply`](Self::apply) (or [`apply_shared`](Self::apply_shared) when `shared`)
    /// at most once per client request: when `request` was already applied (and is still
    /// remembered, see [`RequestLog`]), the op only takes up its index and answers the
    /// first outcome. `None` (or client id 0) applies as usual.
    pub fn apply_once(
        &mut self,
        index: u64,
        op: &Op,
        request: Option<RequestId>,
        shared: bool,
    ) -> Outcome {
        let request = request.filter(|id| id.client != 0);
        self.requests.forget(op.now_ms);
        if let Some(first) = request.and_then(|id| self.requests.get(&id)).cloned() {
            debug_assert!(index > self.applied_index);
            self.applied_index = index;
            return first;
        }
        let outcome = if shared {
            self.apply_shared(index, op)
        } else {
            self.apply(index, op)
        };
        if let Some(id) = request {
            self.requests.insert(id, outcome.clone(), op.now_ms);
        }
        outcome
    }

    /// Request ids remembered (see [`apply_once`](Self::apply_once)).
    #[cfg(test)]
    pub fn remembered_requests(&self) -> usize {
        self.requests.len()
    }

    /// [`apply`](Self::apply) for ops whose keys and values are already exact-size
    /// allocations of their own: the state keeps them as they are instead of copying, so
    /// a Raft log entry and the state share one buffer while the entry is in the log
    /// (two copies would double the memory of every recent write).
    ///
    /// The Raft path guarantees it: the gRPC service copies request bytes to exact size
    /// before proposing, and followers decode entries into fresh allocations.
    pub fn apply_shared(&mut self, index: u64, op: &Op) -> Outcome {
        self.share_bytes = true;
        let outcome = self.apply(index, op);
        self.share_bytes = false;
        outcome
    }

    /// The exact change of [`memory_used`](Self::memory_used) that applying `op` now would
    /// cause — for [`Command::Cdc`] an upper bound (never negative). Used by the engine to
    /// reserve memory before applying.
    pub fn growth(&self, op: &Op) -> i64 {
        let now = op.now_ms;
        match &op.cmd {
            Command::Evict { keys } => {
                // A key listed twice is removed once.
                let distinct: BTreeSet<&Bytes> = keys.iter().collect();
                -signed(
                    distinct
                        .into_iter()
                        .filter_map(|key| self.entries.get(key.as_ref()).map(|e| cost_of(key, e)))
                        .sum(),
                )
            }
            Command::Flush { keep } => -signed(
                self.flushed_keys(keep)
                    .iter()
                    .filter_map(|key| self.entries.get(key.as_ref()).map(|e| cost_of(key, e)))
                    .sum(),
            ),
            Command::Reclaim { max } => -signed(
                self.ttl
                    .due(now)
                    .take(*max)
                    .filter_map(|(_, key)| self.entries.get(key.as_ref()).map(|e| cost_of(key, e)))
                    .sum(),
            ),
            Command::Cdc {
                lsn,
                fence,
                changes,
                ..
            }
            | Command::CdcTx {
                lsn,
                fence,
                changes,
                ..
            } => self.cdc_growth(now, *lsn, *fence, changes),
            // Leases are not accounted.
            Command::Lease { .. } | Command::ReleaseLease { .. } => 0,
            Command::Set { key, .. }
            | Command::Delete { key }
            | Command::Incr { key, .. }
            | Command::Expire { key, .. }
            | Command::Fill { key, .. }
            | Command::SnapshotFill { key, .. }
            | Command::Redis { key, .. } => {
                let plan = self.plan(key, op);
                let old = signed(plan.existing.map_or(0, |(_, cost)| cost));
                match plan.effect {
                    Effect::Keep if plan.expired => -old,
                    Effect::Keep => 0,
                    Effect::Remove => -old,
                    Effect::Put {
                        value,
                        expire_at_ms,
                        fill,
                        ..
                    } => {
                        signed(
                            entry_cost(key.len(), value.len(), expire_at_ms.is_some())
                                + fill_cost(fill.as_deref()),
                        ) - old
                    }
                }
            }
        }
    }

    /// Reads a live entry: hides entries whose deadline is `<= now_ms` (lazy expiry: they
    /// stay until an applied op removes them, so replicas stay identical) and records the
    /// access for LRU/LFU (node-local metadata that never affects `apply`).
    pub fn get(&mut self, key: &[u8], now_ms: u64) -> Option<EntryView> {
        let entry = self.entries.get_mut(key)?;
        if entry.is_expired(now_ms) {
            return None;
        }
        entry.access.on_read(now_ms, rand::random());
        Some(EntryView::of(entry))
    }

    /// [`get`](Self::get) without recording the access.
    pub fn peek(&self, key: &[u8], now_ms: u64) -> Option<EntryView> {
        let entry = self.entries.get(key).filter(|e| !e.is_expired(now_ms))?;
        Some(EntryView::of(entry))
    }

    /// Whether `key` is held, live or expired.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.entries.contains_key(key)
    }

    /// Every key held (live or expired), in storage order.
    pub fn keys(&self) -> impl Iterator<Item = &Bytes> {
        self.entries.keys()
    }

    /// Index of the last applied op (0 when none).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Entries held, expired-but-unreclaimed ones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entries are held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Accounted bytes: keys + values + per-entry overheads (see [`ENTRY_OVERHEAD`] and
    /// [`TTL_OVERHEAD`]). A pure function of the replicated state.
    ///
    /// [`ENTRY_OVERHEAD`]: super::ENTRY_OVERHEAD
    /// [`TTL_OVERHEAD`]: super::TTL_OVERHEAD
    pub fn memory_used(&self) -> u64 {
        self.memory_used
    }

    /// The earliest deadline held, if any; `Reclaim` has work to do once it is `<= now`.
    pub fn next_deadline(&self) -> Option<u64> {
        self.ttl.first().map(|(deadline, _)| *deadline)
    }

    /// How many entries this state has removed because they were expired (statistics).
    pub fn expired_removed(&self) -> u64 {
        self.expired_removed
    }

    /// The CDC watermark: the max `watermark` of every applied [`Command::Cdc`] (0: none).
    pub fn cdc_watermark(&self) -> u64 {
        self.cdc.watermark
    }

    /// The CDC fencing token: the max `fence` of every accepted [`Command::Cdc`] (0: none).
    pub fn cdc_fence(&self) -> u64 {
        self.cdc.fence
    }

    /// The tombstone floor: the max LSN of every forgotten tombstone. Fills whose
    /// `source_lsn` is at or below it are refused.
    pub fn tombstone_floor(&self) -> u64 {
        self.cdc.floor
    }

    /// Key tombstones held (at most [`MAX_TOMBSTONES`](super::MAX_TOMBSTONES) after each op).
    pub fn tombstone_count(&self) -> usize {
        self.cdc.len()
    }

    /// Bytes charged for the key tombstones held (at most
    /// [`MAX_TOMBSTONE_BYTES`](super::MAX_TOMBSTONE_BYTES) after each op).
    pub fn tombstone_bytes(&self) -> u64 {
        self.cdc.bytes()
    }

    /// Snapshot fills are refused unless their `xmin` is at least this (the requirement of
    /// every forgotten tombstone).
    pub fn xmin_floor(&self) -> u64 {
        self.cdc.xmin_floor
    }

    /// Prefix tombstones held.
    pub fn prefix_tombstone_count(&self) -> usize {
        self.cdc.prefix_count()
    }

    /// The earliest `until_ms` of a key tombstone, if any: a `Cdc` or `Reclaim` op at that
    /// time or later forgets it.
    pub fn next_tombstone_expiry(&self) -> Option<u64> {
        self.cdc.next_expiry()
    }

    /// Fill leases held (expired ones not yet forgotten included; at most
    /// [`MAX_LEASES`](super::MAX_LEASES)).
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// The earliest end of a lease held, if any: a `Reclaim` op at that time or later
    /// forgets it.
    pub fn next_lease_expiry(&self) -> Option<u64> {
        self.leases.next_expiry()
    }

    /// `key`'s lease as `(token, until_ms)`, expired-but-held ones included.
    pub fn lease_of(&self, key: &[u8]) -> Option<(u64, u64)> {
        self.leases.get(key).map(|l| (l.token, l.until_ms))
    }

    /// The replicated state: applied index, every entry with its version, deadline and
    /// source LSN, the CDC state, the remembered requests and the leases.
    pub fn snapshot(&self) -> PartitionSnapshot {
        PartitionSnapshot {
            applied_index: self.applied_index,
            entries: self
                .entries
                .iter()
                .map(|(key, entry)| SnapshotEntry {
                    key: key.clone(),
                    value: entry.value.clone(),
                    version: entry.version,
                    expire_at_ms: entry.expire_at_ms,
                    source_lsn: entry.source_lsn,
                    fill: entry.fill.as_deref().cloned(),
                })
                .collect(),
            cdc: self.cdc.snapshot(),
            requests: self.requests.export(),
            leases: self.leases.snapshot(),
        }
    }

    /// Rebuilds a partition from a snapshot. Access metadata starts cold (as if last read
    /// at time 0), so restored keys are the first eviction candidates until read.
    pub fn restore(id: PartitionId, snap: PartitionSnapshot) -> Self {
        let mut state = Self::new(id);
        state.applied_index = snap.applied_index;
        state.entries.reserve(snap.entries.len());
        for e in snap.entries {
            let stored = Stored {
                value: e.value,
                version: e.version,
                expire_at_ms: e.expire_at_ms,
                source_lsn: e.source_lsn,
                fill: e.fill.map(Box::new),
            };
            state.insert_new(e.key, stored, 0);
        }
        state.cdc = CdcState::restore(snap.cdc, exact);
        state.requests = RequestLog::restore(snap.requests);
        state.leases = LeaseTable::restore(snap.leases, exact);
        state
    }

    /// Number of entries in the TTL index (keys with a deadline).
    pub(crate) fn ttl_len(&self) -> usize {
        self.ttl.len()
    }

    /// Panics unless the TTL index mirrors the entries and `memory_used` matches them.
    #[cfg(test)]
    pub(crate) fn assert_consistent(&self) {
        let with_deadline = self
            .entries
            .values()
            .filter(|e| e.expire_at_ms.is_some())
            .count();
        assert_eq!(self.ttl.len(), with_deadline, "TTL index size");
        for (deadline, key) in self.ttl.due(u64::MAX) {
            let entry = self.entries.get(key.as_ref());
            assert_eq!(
                entry.and_then(|e| e.expire_at_ms),
                Some(*deadline),
                "TTL index entry"
            );
        }
        let memory: u64 = self.entries.iter().map(|(k, e)| cost_of(k, e)).sum();
        assert_eq!(self.memory_used, memory, "memory_used");
        self.cdc.assert_consistent();
        self.leases.assert_consistent();
    }

    /// The accounted size of `key`'s entry (live or expired), if present.
    pub fn entry_cost(&self, key: &[u8]) -> Option<u64> {
        self.entries.get_key_value(key).map(|(k, e)| cost_of(k, e))
    }

    /// Samples up to `samples` random entries as eviction candidates, skipping `exclude`.
    pub(crate) fn sample(
        &self,
        rng: &mut impl rand::Rng,
        samples: usize,
        policy: EvictionPolicy,
        now_ms: u64,
        exclude: Option<&[u8]>,
        out: &mut Vec<Candidate>,
    ) {
        if self.entries.is_empty() {
            return;
        }
        for _ in 0..samples {
            let at = rng.random_range(0..self.entries.len());
            let Some((key, entry)) = self.entries.get_index(at) else {
                continue;
            };
            if exclude == Some(key.as_ref()) {
                continue;
            }
            out.push(Candidate {
                score: entry.access.score(entry.is_expired(now_ms), policy, now_ms),
                partition: self.id,
                key: key.clone(),
            });
        }
    }

    /// Decides what a single-key op does, without changing anything.
    fn plan(&self, key: &Bytes, op: &Op) -> Plan {
        let now = op.now_ms;
        let existing = self.entries.get_full(key.as_ref());
        let expired = existing.is_some_and(|(_, _, e)| e.is_expired(now));
        let live = existing.filter(|_| !expired).map(|(_, _, e)| e);
        let existing = existing.map(|(at, k, e)| (at, cost_of(k, e)));
        let (effect, outcome) = match &op.cmd {
            Command::Set {
                value,
                expire_at_ms,
                keep_ttl,
                condition,
                source_lsn,
                ..
            } => 'set: {
                if *source_lsn > 0 {
                    let newer_lsn = self.key_cdc_lsn(key, live).max(self.cdc.floor);
                    if newer_lsn >= *source_lsn {
                        break 'set (
                            Effect::Keep,
                            Outcome::Set {
                                applied: false,
                                version: live.map_or(0, |e| e.version),
                                newer_lsn,
                            },
                        );
                    }
                }
                let holds = match *condition {
                    Condition::Always => true,
                    Condition::IfAbsent => live.is_none(),
                    Condition::IfPresent => live.is_some(),
                    Condition::IfVersion(v) => live.is_some_and(|e| e.version == v),
                };
                if holds {
                    let expire_at_ms = match live {
                        Some(e) if *keep_ttl => e.expire_at_ms,
                        _ => *expire_at_ms,
                    };
                    (
                        Effect::Put {
                            value: value.clone(),
                            expire_at_ms,
                            source_lsn: *source_lsn,
                            fill: None,
                        },
                        Outcome::Set {
                            applied: true,
                            version: 0, // filled in by execute
                            newer_lsn: 0,
                        },
                    )
                } else {
                    let version = live.map_or(0, |e| e.version);
                    (
                        Effect::Keep,
                        Outcome::Set {
                            applied: false,
                            version,
                            newer_lsn: 0,
                        },
                    )
                }
            }
            Command::Delete { .. } => match live {
                Some(_) => (Effect::Remove, Outcome::Deleted(true)),
                None => (Effect::Keep, Outcome::Deleted(false)),
            },
            Command::Incr { delta, .. } => {
                let current = match live {
                    None => Ok(0),
                    Some(e) => parse_i64(&e.value).ok_or(IncrError::NotAnInteger),
                };
                match current.and_then(|n| n.checked_add(*delta).ok_or(IncrError::Overflow)) {
                    Ok(n) => (
                        // A value computed by the client's INCR does not come from Postgres.
                        Effect::Put {
                            value: Bytes::from(n.to_string()),
                            expire_at_ms: live.and_then(|e| e.expire_at_ms),
                            source_lsn: 0,
                            fill: None,
                        },
                        Outcome::Incr(Ok((n, 0))), // version filled in by execute
                    ),
                    Err(err) => (Effect::Keep, Outcome::Incr(Err(err))),
                }
            }
            Command::Expire { expire_at_ms, .. } => match (live, *expire_at_ms) {
                (None, _) => (Effect::Keep, Outcome::Expire(false)),
                // A deadline already passed deletes the key, as in Redis.
                (Some(_), Some(deadline)) if deadline <= now => {
                    (Effect::Remove, Outcome::Expire(true))
                }
                // The value is unchanged, so it still reflects the same LSN.
                (Some(e), Some(_)) => (
                    Effect::Put {
                        value: e.value.clone(),
                        expire_at_ms: *expire_at_ms,
                        source_lsn: e.source_lsn,
                        fill: e.fill.clone(),
                    },
                    Outcome::Expire(true),
                ),
                (Some(e), None) if e.expire_at_ms.is_some() => (
                    Effect::Put {
                        value: e.value.clone(),
                        expire_at_ms: None,
                        source_lsn: e.source_lsn,
                        fill: e.fill.clone(),
                    },
                    Outcome::Expire(true),
                ),
                (Some(_), None) => (Effect::Keep, Outcome::Expire(false)),
            },
            Command::Fill {
                value,
                expire_at_ms,
                source_lsn,
                token,
                ..
            } => {
                if !self.lease_holds(key, *token, now) {
                    // Nothing changes, not even an expired entry is dropped.
                    return Plan {
                        existing,
                        expired: false,
                        effect: Effect::Keep,
                        outcome: Outcome::Fill {
                            applied: false,
                            version: live.map_or(0, |e| e.version),
                            newer_lsn: 0,
                            lease_lost: true,
                        },
                    };
                }
                // Exactly a `Set` with `Condition::Always` (cheap clones: shared buffers).
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
                let mut plan = self.plan(key, &set);
                if let Outcome::Set {
                    applied,
                    version,
                    newer_lsn,
                } = plan.outcome
                {
                    plan.outcome = Outcome::Fill {
                        applied,
                        version,
                        newer_lsn,
                        lease_lost: false,
                    };
                }
                return plan;
            }
            Command::SnapshotFill {
                value,
                expire_at_ms,
                snapshot,
                token,
                ..
            } => {
                let version = live.map_or(0, |e| e.version);
                let answer = |applied: bool, newer_lsn: u64, lease_lost: bool| {
                    if *token == 0 {
                        Outcome::Set {
                            applied,
                            version: if applied { 0 } else { version },
                            newer_lsn,
                        }
                    } else {
                        Outcome::Fill {
                            applied,
                            version: if applied { 0 } else { version },
                            newer_lsn,
                            lease_lost,
                        }
                    }
                };
                if *token != 0 && !self.lease_holds(key, *token, now) {
                    // As `Fill`: nothing changes, not even an expired entry is dropped.
                    return Plan {
                        existing,
                        expired: false,
                        effect: Effect::Keep,
                        outcome: answer(false, 0, true),
                    };
                }
                match self.cdc.admits(key, snapshot) {
                    Err(newer_lsn) => (Effect::Keep, answer(false, newer_lsn.max(1), false)),
                    Ok(()) => (
                        Effect::Put {
                            value: value.clone(),
                            expire_at_ms: *expire_at_ms,
                            source_lsn: 0,
                            fill: Some(Box::new(snapshot.clone())),
                        },
                        answer(true, 0, false),
                    ),
                }
            }
            Command::Redis { op: redis, .. } => return self.plan_redis(key, now, redis, live),
            Command::Evict { .. }
            | Command::Reclaim { .. }
            | Command::Cdc { .. }
            | Command::CdcTx { .. }
            | Command::Flush { .. }
            | Command::Lease { .. }
            | Command::ReleaseLease { .. } => {
                unreachable!("plan is only called for single-key writes")
            }
        };
        Plan {
            existing,
            expired,
            effect,
            outcome,
        }
    }

    /// [`plan`](Self::plan) of a [`Command::Redis`]; `live` is the key's live entry.
    fn plan_redis(&self, key: &Bytes, now: u64, op: &RedisOp, live: Option<&Entry>) -> Plan {
        let old = live.map(|e| e.value.clone());
        // Each op is an existing single-key write plus the old value in its outcome.
        let (cmd, outcome) = match op {
            RedisOp::Set {
                value,
                expire_at_ms,
                keep_ttl,
                condition,
            } => {
                let set = Command::Set {
                    key: key.clone(),
                    value: value.clone(),
                    expire_at_ms: *expire_at_ms,
                    keep_ttl: *keep_ttl,
                    condition: *condition,
                    source_lsn: 0,
                };
                let mut plan = self.plan(
                    key,
                    &Op {
                        now_ms: now,
                        cmd: set,
                    },
                );
                if let Outcome::Set {
                    applied, version, ..
                } = plan.outcome
                {
                    plan.outcome = Outcome::Redis(RedisOutcome::Set {
                        applied,
                        version,
                        old,
                    });
                }
                return plan;
            }
            RedisOp::GetDel => (
                Command::Delete { key: key.clone() },
                RedisOutcome::Value(old),
            ),
            RedisOp::GetEx { expire_at_ms } => (
                Command::Expire {
                    key: key.clone(),
                    expire_at_ms: *expire_at_ms,
                },
                RedisOutcome::Value(old),
            ),
            RedisOp::ExpireIf {
                expire_at_ms,
                condition,
            } => {
                if !live.is_some_and(|e| condition.holds(e.expire_at_ms, *expire_at_ms)) {
                    // Nothing changes but the drop of an expired entry, as for any op.
                    let expire = Op {
                        now_ms: now,
                        cmd: Command::Expire {
                            key: key.clone(),
                            expire_at_ms: None,
                        },
                    };
                    let mut plan = self.plan(key, &expire);
                    plan.effect = Effect::Keep;
                    plan.outcome = Outcome::Expire(false);
                    return plan;
                }
                return self.plan(
                    key,
                    &Op {
                        now_ms: now,
                        cmd: Command::Expire {
                            key: key.clone(),
                            expire_at_ms: Some(*expire_at_ms),
                        },
                    },
                );
            }
            RedisOp::Append { suffix, max_len } => {
                let len = old.as_ref().map_or(0, Bytes::len) + suffix.len();
                if len as u64 > *max_len {
                    // A refused append changes nothing (an expired entry stays).
                    return Plan {
                        existing: None,
                        expired: false,
                        effect: Effect::Keep,
                        outcome: Outcome::Redis(RedisOutcome::Append(None)),
                    };
                }
                let mut value = Vec::with_capacity(len);
                value.extend_from_slice(old.as_deref().unwrap_or_default());
                value.extend_from_slice(suffix);
                (
                    Command::Set {
                        key: key.clone(),
                        value: Bytes::from(value),
                        expire_at_ms: None,
                        keep_ttl: true,
                        condition: Condition::Always,
                        source_lsn: 0,
                    },
                    RedisOutcome::Append(Some(len as u64)),
                )
            }
        };
        let mut plan = self.plan(key, &Op { now_ms: now, cmd });
        plan.outcome = Outcome::Redis(outcome);
        plan
    }

    /// Carries out a [`Plan`] for `key` as op `index`.
    fn execute(&mut self, key: &Bytes, index: u64, now: u64, plan: Plan) -> Outcome {
        let mut existing = plan.existing.map(|(at, _)| at);
        if plan.expired {
            if let Some(at) = existing.take() {
                self.remove_at(at);
                self.expired_removed += 1;
            }
        }
        match plan.effect {
            Effect::Keep => {}
            Effect::Remove => {
                if let Some(at) = existing {
                    self.remove_at(at);
                }
            }
            Effect::Put {
                value,
                expire_at_ms,
                source_lsn,
                fill,
            } => {
                let stored = Stored {
                    value,
                    version: index,
                    expire_at_ms,
                    source_lsn,
                    fill,
                };
                match existing {
                    Some(at) => self.replace_at(at, stored, now),
                    None => self.insert_new(key.clone(), stored, now),
                }
            }
        }
        match plan.outcome {
            Outcome::Set { applied: true, .. } => Outcome::Set {
                applied: true,
                version: index,
                newer_lsn: 0,
            },
            Outcome::Incr(Ok((n, _))) => Outcome::Incr(Ok((n, index))),
            Outcome::Fill { applied: true, .. } => Outcome::Fill {
                applied: true,
                version: index,
                newer_lsn: 0,
                lease_lost: false,
            },
            Outcome::Redis(RedisOutcome::Set {
                applied: true, old, ..
            }) => Outcome::Redis(RedisOutcome::Set {
                applied: true,
                version: index,
                old,
            }),
            other => other,
        }
    }

    /// `key`'s CDC LSN without the floor: the max of its tombstone, the live entry's
    /// source LSN and the prefix tombstones it starts with.
    fn key_cdc_lsn(&self, key: &[u8], live: Option<&Entry>) -> u64 {
        self.cdc
            .tombstone_lsn(key)
            .max(live.map_or(0, |e| e.source_lsn))
            .max(self.cdc.prefix_lsn(key))
    }

    /// Applies a [`Command::Cdc`] batch (see the type's docs).
    #[allow(clippy::too_many_arguments)]
    fn apply_cdc(
        &mut self,
        index: u64,
        now: u64,
        lsn: u64,
        tx: XidGuard,
        watermark: u64,
        fence: u64,
        until_ms: u64,
        changes: &[CdcChange],
    ) -> Result<CdcApplied, CdcError> {
        if fence < self.cdc.fence {
            return Err(CdcError::Fenced {
                current: self.cdc.fence,
            });
        }
        self.cdc.fence = fence;
        self.cdc.expire(now, usize::MAX);
        let mut changed = 0u64;
        for change in changes {
            changed += match change {
                CdcChange::Invalidate { key } => {
                    u64::from(self.cdc_invalidate(key, lsn, tx, until_ms, now))
                }
                CdcChange::Put {
                    key,
                    value,
                    expire_at_ms,
                } => u64::from(self.cdc_put(
                    key,
                    value,
                    *expire_at_ms,
                    (lsn, tx),
                    until_ms,
                    index,
                    now,
                )),
                CdcChange::InvalidatePrefix { prefix } => {
                    self.cdc_invalidate_prefix(prefix, lsn, tx, now)
                }
            };
        }
        // Caps are enforced once the batch is done, so that no change of the batch sees a
        // tombstone it (or the state before it) had disappear; `growth` relies on it.
        self.cdc.enforce_caps();
        self.cdc.watermark = self.cdc.watermark.max(watermark);
        Ok(CdcApplied {
            changed,
            watermark: self.cdc.watermark,
        })
    }

    /// An upper bound of the growth of a [`Command::Cdc`] batch: for every key with a `Put`
    /// that is not already skipped given the state before the batch, the largest cost among
    /// its `Put`s minus its current entry's cost, at least 0. It holds because a key's CDC
    /// LSN (without the floor) never decreases during a batch (tombstones forgotten by
    /// expiry go before any change, caps apply after the last), so a `Put` skipped now is
    /// skipped then; and whenever a change of the batch raises the key's LSN past its entry's,
    /// that entry is removed or replaced.
    fn cdc_growth(&self, now: u64, lsn: u64, fence: u64, changes: &[CdcChange]) -> i64 {
        if fence < self.cdc.fence {
            return 0;
        }
        let mut puts: BTreeMap<&Bytes, u64> = BTreeMap::new();
        for change in changes {
            let CdcChange::Put {
                key,
                value,
                expire_at_ms,
            } = change
            else {
                continue;
            };
            let live = self
                .entries
                .get(key.as_ref())
                .filter(|e| !e.is_expired(now));
            let current = self
                .cdc
                .tombstone_lsn_after_expiry(key, now)
                .max(live.map_or(0, |e| e.source_lsn))
                .max(self.cdc.prefix_lsn(key));
            if current >= lsn {
                continue;
            }
            let cost = entry_cost(key.len(), value.len(), expire_at_ms.is_some());
            let most = puts.entry(key).or_insert(0);
            *most = (*most).max(cost);
        }
        puts.into_iter()
            .map(|(key, cost)| signed(cost.saturating_sub(self.entry_cost(key).unwrap_or(0))))
            .sum()
    }

    /// CDC `Invalidate`: removes `key`'s entry unless it is live and already reflects the
    /// change (a newer source LSN, or a fill whose snapshot saw the transaction), then
    /// raises its tombstone. Returns whether an entry was removed.
    fn cdc_invalidate(
        &mut self,
        key: &Bytes,
        lsn: u64,
        tx: XidGuard,
        until_ms: u64,
        now: u64,
    ) -> bool {
        let removed = match self.entries.get_full(key.as_ref()) {
            Some((at, _, entry)) => {
                let expired = entry.is_expired(now);
                if !expired && reflects(entry, lsn, tx) {
                    false
                } else {
                    self.remove_at(at);
                    if expired {
                        self.expired_removed += 1;
                    }
                    true
                }
            }
            None => false,
        };
        let share = self.share_bytes;
        self.cdc
            .tombstone(key, lsn, until_ms, tx, || keep_bytes(share, key));
        self.leases.remove(key);
        removed
    }

    /// CDC `Put`: stores the value at version `index` with `source_lsn = lsn` and raises the
    /// key's tombstone (folding in the transaction), unless the entry already reflects the
    /// change: the key's CDC LSN (without the floor) is `>= lsn`, or a live fill's snapshot
    /// saw the transaction. A live fill whose snapshot did not see it is removed even when
    /// the key's LSN is newer (a late, older transaction: the fill may predate it). A `Put` at or below the floor (an old replay whose key's
    /// tombstone was forgotten) cannot tell whether the entry is newer, so it only
    /// invalidates. Returns whether the value was stored.
    #[allow(clippy::too_many_arguments)]
    fn cdc_put(
        &mut self,
        key: &Bytes,
        value: &Bytes,
        expire_at_ms: Option<u64>,
        (lsn, tx): (u64, XidGuard),
        until_ms: u64,
        index: u64,
        now: u64,
    ) -> bool {
        // Postgres changed the row: a value loaded under a lease may predate it.
        self.leases.remove(key);
        let existing = self.entries.get_full(key.as_ref());
        let expired = existing.is_some_and(|(_, _, e)| e.is_expired(now));
        let live = existing.filter(|_| !expired).map(|(_, _, e)| e);
        let reflected = live.is_some_and(|e| reflects(e, lsn, tx));
        if self.key_cdc_lsn(key, live) >= lsn || reflected {
            if live.is_some_and(|e| e.fill.is_some()) && !reflected {
                // The key has seen a newer change, but a fill carries no LSN: one whose
                // snapshot missed this (late) transaction may predate it. Drop it.
                self.cdc_invalidate(key, lsn, tx, until_ms, now);
                return false;
            }
            let share = self.share_bytes;
            self.cdc
                .tombstone(key, lsn, until_ms, tx, || keep_bytes(share, key));
            return false;
        }
        if lsn <= self.cdc.floor {
            self.cdc_invalidate(key, lsn, tx, until_ms, now);
            return false;
        }
        let stored = Stored {
            value: value.clone(),
            version: index,
            expire_at_ms,
            source_lsn: lsn,
            fill: None,
        };
        let at = existing.map(|(at, _, _)| at);
        match at {
            // An expired entry is dropped and the key created anew, as for `Set`.
            Some(at) if expired => {
                self.remove_at(at);
                self.expired_removed += 1;
                self.insert_new(key.clone(), stored, now);
            }
            Some(at) => self.replace_at(at, stored, now),
            None => self.insert_new(key.clone(), stored, now),
        }
        // Share the entry's copy of the key rather than making another one.
        let stored = self
            .entries
            .get_key_value(key.as_ref())
            .map(|(k, _)| k.clone());
        let share = self.share_bytes;
        self.cdc.tombstone(key, lsn, until_ms, tx, || {
            stored.unwrap_or_else(|| keep_bytes(share, key))
        });
        true
    }

    /// CDC `InvalidatePrefix`: removes every entry (live or expired) under `prefix` whose
    /// source LSN is below `lsn` and raises the prefix's tombstone. Returns how many.
    fn cdc_invalidate_prefix(&mut self, prefix: &Bytes, lsn: u64, tx: XidGuard, now: u64) -> u64 {
        let mut removed = 0u64;
        let mut expired = 0u64;
        let ttl = &mut self.ttl;
        let memory_used = &mut self.memory_used;
        // `retain` keeps the order of the others: deterministic, like every removal here.
        self.entries.retain(|key, entry| {
            if !key.starts_with(prefix) || entry.source_lsn >= lsn {
                return true;
            }
            if let Some(deadline) = entry.expire_at_ms {
                ttl.remove(deadline, key);
            }
            *memory_used -= cost_of(key, entry);
            removed += 1;
            if entry.is_expired(now) {
                expired += 1;
            }
            false
        });
        self.expired_removed += expired;
        let share = self.share_bytes;
        self.cdc
            .prefix_tombstone(prefix, lsn, tx, || keep_bytes(share, prefix));
        self.leases.remove_prefix(prefix);
        removed
    }

    /// Whether `key`'s lease is `token` and still runs at `now` (a fill under it may write).
    fn lease_holds(&self, key: &[u8], token: u64, now: u64) -> bool {
        self.leases
            .get(key)
            .is_some_and(|l| l.token == token && l.is_live(now))
    }

    /// The keys a [`Command::Flush`] keeping `keep` removes, in storage order.
    fn flushed_keys(&self, keep: &[u8]) -> Vec<Bytes> {
        self.entries
            .keys()
            .filter(|key| keep.is_empty() || !key.starts_with(keep))
            .cloned()
            .collect()
    }

    /// Removes every listed key that is held (live or expired).
    fn evict(&mut self, keys: &[Bytes], now: u64) -> usize {
        let mut removed = 0;
        for key in keys {
            if let Some(at) = self.entries.get_index_of(key.as_ref()) {
                if let Some((_, entry)) = self.entries.get_index(at) {
                    if entry.is_expired(now) {
                        self.expired_removed += 1;
                    }
                }
                self.remove_at(at);
                removed += 1;
            }
        }
        removed
    }

    /// Removes up to `max` entries whose deadline is `<= now`, earliest first.
    fn reclaim(&mut self, max: usize, now: u64) -> usize {
        let mut removed = 0;
        while removed < max {
            let Some((_, key)) = self.ttl.due(now).next() else {
                break;
            };
            let key = key.clone();
            match self.entries.get_index_of(key.as_ref()) {
                Some(at) => self.remove_at(at),
                None => {
                    // Unreachable while the index mirrors the map; stay terminating anyway.
                    debug_assert!(false, "TTL index names a missing key");
                    break;
                }
            }
            removed += 1;
        }
        self.expired_removed += removed as u64;
        removed
    }

    // Every key and value the state keeps passes through `insert_new` or `replace_at`.
    fn insert_new(&mut self, key: Bytes, stored: Stored, now: u64) {
        let Stored {
            value,
            version,
            expire_at_ms,
            source_lsn,
            fill,
        } = stored;
        let (key, value) = (self.keep(&key), self.keep(&value));
        self.memory_used +=
            entry_cost(key.len(), value.len(), expire_at_ms.is_some()) + fill_cost(fill.as_deref());
        if let Some(deadline) = expire_at_ms {
            self.ttl.insert(deadline, key.clone());
        }
        let entry = Entry {
            value,
            version,
            expire_at_ms,
            source_lsn,
            fill,
            access: Access::new(now),
        };
        // Callers only insert keys that are not held (checked by `plan`, or distinct in a
        // snapshot), so this never replaces an entry.
        self.entries.insert(key, entry);
    }

    /// The bytes to store: a copy, unless the op's bytes are known to be exact.
    fn keep(&self, b: &Bytes) -> Bytes {
        keep_bytes(self.share_bytes, b)
    }

    fn replace_at(&mut self, at: usize, stored: Stored, now: u64) {
        let Stored {
            value,
            version,
            expire_at_ms,
            source_lsn,
            fill,
        } = stored;
        let Some((key, entry)) = self.entries.get_index_mut(at) else {
            return;
        };
        let old = cost_of(key, entry);
        let new =
            entry_cost(key.len(), value.len(), expire_at_ms.is_some()) + fill_cost(fill.as_deref());
        if entry.expire_at_ms != expire_at_ms {
            if let Some(deadline) = entry.expire_at_ms {
                self.ttl.remove(deadline, key);
            }
            if let Some(deadline) = expire_at_ms {
                self.ttl.insert(deadline, key.clone());
            }
        }
        entry.value = if self.share_bytes {
            value
        } else {
            exact(&value)
        };
        entry.version = version;
        entry.expire_at_ms = expire_at_ms;
        entry.source_lsn = source_lsn;
        entry.fill = fill;
        entry.access.on_write(now);
        self.memory_used = self.memory_used - old + new;
    }

    fn remove_at(&mut self, at: usize) {
        if let Some((key, entry)) = self.entries.swap_remove_index(at) {
            if let Some(deadline) = entry.expire_at_ms {
                self.ttl.remove(deadline, &key);
            }
            self.memory_used -= cost_of(&key, &entry);
        }
    }
}

/// Whether a live entry already reflects a CDC change at `lsn` by transaction `tx`: its
/// value comes from a newer LSN, or it was filled under a snapshot that saw `tx`.
fn reflects(entry: &Entry, lsn: u64, tx: XidGuard) -> bool {
    entry.source_lsn > lsn || (tx.xid != 0 && entry.fill.as_deref().is_some_and(|s| tx.seen_by(s)))
}

/// The guard of a batch whose transaction is unknown (a `Command::Cdc` from before xids):
/// it refuses every snapshot fill of its keys while its tombstones are held.
const UNKNOWN_TX: XidGuard = XidGuard {
    xid: 0,
    min_xmin: super::cdc::UNKNOWN_XMIN,
};

/// The bytes to store: `b` itself when the op's bytes are exact (`share`), else a copy.
fn keep_bytes(share: bool, b: &Bytes) -> Bytes {
    if share {
        b.clone()
    } else {
        exact(b)
    }
}

fn cost_of(key: &Bytes, entry: &Entry) -> u64 {
    entry_cost(key.len(), entry.value.len(), entry.expire_at_ms.is_some())
        + fill_cost(entry.fill.as_deref())
}

/// What an applied write stores under a key.
struct Stored {
    value: Bytes,
    version: u64,
    expire_at_ms: Option<u64>,
    source_lsn: u64,
    fill: Option<Box<PgSnapshot>>,
}

/// Accounted sizes fit in i64 by a wide margin (they are bounded by real memory).
fn signed(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// A copy of `b` in a buffer of exactly its size. The bytes of an op are often slices
/// of a larger buffer (a gRPC request frame, a batch of Raft log entries); keeping the
/// slice would pin that whole buffer for as long as the entry lives, unseen by the
/// memory accounting (a 1 KiB value pinned ~8 KiB: 431 MiB RSS under a 64 MiB limit).
fn exact(b: &Bytes) -> Bytes {
    Bytes::copy_from_slice(b)
}
