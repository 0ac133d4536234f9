//! [`CdcState`]: what a partition remembers about the Postgres change stream — the worker's
//! fencing token, the watermark, per-key and per-prefix tombstones, and the tombstone floor.
//!
//! A *tombstone* `(lsn, until_ms)` says "this key changed in Postgres at `lsn`": a
//! cache-aside fill read at that LSN or before must be refused, or it would put back a value
//! the change made stale. Tombstones are forgotten once `until_ms <= now_ms` (during `Cdc`
//! and `Reclaim` applies) or when there are more than [`MAX_TOMBSTONES`]; forgetting one
//! raises the *floor* to its LSN, and every fill at or below the floor is refused, so
//! forgetting never lets a stale fill in (it only refuses more fills).
//!
//! # Transaction ids (the exact fill guard)
//!
//! Every tombstone also keeps an [`XidGuard`]: the 64-bit xid of its last invalidating
//! transaction (by LSN) and a `min_xmin` that stands for every earlier one. A fill read
//! under a Postgres snapshot `S` (`Command::SnapshotFill`) passes a guard when `S` sees the
//! last invalidator and `S.xmin >= min_xmin` (every xid below `xmin` had ended when `S` was
//! taken, so every earlier invalidator is visible too). When a newer invalidation replaces
//! the last one, the old xid moves into `min_xmin` as `xid + 1`: exact for *any* key, with
//! no assumption about which rows a key comes from, at the price of refusing fills while a
//! transaction older than the second-newest invalidator is still running. Forgotten
//! tombstones raise the partition's `xmin_floor` the same way. See ARCHITECTURE item 15.
//!
//! # Memory
//!
//! Tombstones are *not* counted in `memory_used`: eviction cannot remove them, and counting
//! them would let a burst of invalidations refuse writes (or the invalidations themselves)
//! under `max-memory`. They are bounded instead, in count and in bytes: at most
//! [`MAX_TOMBSTONES`] per partition and at most [`MAX_TOMBSTONE_BYTES`] of them, each
//! charged `key +` [`TOMBSTONE_OVERHEAD`]; past either cap the earliest-expiring are
//! forgotten (raising the floors, so only more fills are refused). The bytes are reported
//! per node as `raftcache_cdc_tombstone_bytes`. At most [`MAX_PREFIX_TOMBSTONES`] prefix
//! tombstones.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::ttl::TtlIndex;

/// The most key tombstones a partition keeps; past it the earliest-expiring ones are
/// forgotten (raising the floor) at the end of each `Cdc` op.
pub const MAX_TOMBSTONES: usize = 65_536;

/// The most bytes of key tombstones a partition keeps (see [`TOMBSTONE_OVERHEAD`]); past
/// it the earliest-expiring ones are forgotten (raising the floor), like the count cap.
/// 16 MiB per partition (the count cap binds first for keys under ~56 bytes): at most
/// 256 MiB on a node holding 16 partitions, reported as `raftcache_cdc_tombstone_bytes`.
pub const MAX_TOMBSTONE_BYTES: u64 = 16 << 20;

/// Bytes charged per key tombstone on top of its key: a `BTreeMap` slot of key +
/// `Tombstone` (32 + 32), a slot of the expiry index (40), B-tree slack (~50) and the
/// key's shared-buffer header and malloc rounding (~48).
pub const TOMBSTONE_OVERHEAD: u64 = 200;

/// Accounted bytes of one key tombstone.
fn tombstone_cost(key_len: usize) -> u64 {
    key_len as u64 + TOMBSTONE_OVERHEAD
}

/// The most prefix tombstones a partition keeps; past it the lowest-LSN ones are forgotten
/// (raising the floor) at the end of each `Cdc` op. Prefixes are few in practice (one per
/// mapped key template), so this only bounds a misbehaving worker.
pub const MAX_PREFIX_TOMBSTONES: usize = 1_024;

/// What a fill's Postgres snapshot must see to pass a tombstone: the last invalidating
/// transaction (`xid`, 0 for none: a reset) and every transaction below `min_xmin`
/// (the snapshot's `xmin` must be at least `min_xmin`; [`UNKNOWN_XMIN`] when the
/// invalidators are unknown, which refuses every snapshot fill).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct XidGuard {
    /// The 64-bit xid of the invalidation with the highest LSN (0: none).
    pub xid: u64,
    /// A snapshot fill needs `xmin >= min_xmin`.
    pub min_xmin: u64,
}

/// `min_xmin` of a tombstone whose invalidating transactions are not known (written by a
/// node or worker from before xids, or decoded from a format-4 snapshot).
pub const UNKNOWN_XMIN: u64 = u64::MAX;

impl XidGuard {
    /// Whether a fill read under `snapshot` saw every transaction this guard stands for.
    pub fn seen_by(&self, snapshot: &raftcache_proto::pg_snapshot::PgSnapshot) -> bool {
        (self.xid == 0 || snapshot.sees(self.xid)) && snapshot.xmin() >= self.min_xmin
    }

    /// Folds in an invalidation by transaction `xid` at `lsn`, given the guard stood for
    /// invalidations up to `old_lsn`; `min_xmin` is the change's own requirement.
    pub(crate) fn merge(&mut self, old_lsn: u64, lsn: u64, xid: u64, min_xmin: u64) {
        use std::cmp::Ordering;
        let demote = |x: u64| if x == 0 { 0 } else { x.saturating_add(1) };
        match lsn.cmp(&old_lsn) {
            Ordering::Greater => {
                self.min_xmin = self.min_xmin.max(demote(self.xid));
                self.xid = xid;
            }
            Ordering::Less => self.min_xmin = self.min_xmin.max(demote(xid)),
            // The same commit (a replay, or another piece of one transaction).
            Ordering::Equal if self.xid == 0 => self.xid = xid,
            Ordering::Equal if xid != self.xid => {
                self.min_xmin = self.min_xmin.max(demote(xid));
            }
            Ordering::Equal => {}
        }
        self.min_xmin = self.min_xmin.max(min_xmin);
    }

    /// The least `xmin` a snapshot needs to see everything this guard stands for, for
    /// the floor once the tombstone is forgotten; `None` for unknown invalidators (the
    /// floor then cannot cover them: see ARCHITECTURE item 15).
    fn floor_requirement(&self) -> Option<u64> {
        (self.min_xmin != UNKNOWN_XMIN).then(|| {
            self.min_xmin
                .max(if self.xid == 0 { 0 } else { self.xid + 1 })
        })
    }
}

/// The CDC part of a [`PartitionSnapshot`](super::PartitionSnapshot).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CdcSnapshot {
    /// The partition's CDC watermark.
    pub watermark: u64,
    /// The highest fencing token accepted.
    pub fence: u64,
    /// The tombstone floor: fills at or below it are refused.
    pub floor: u64,
    /// Snapshot fills whose `xmin` is below it are refused (forgotten tombstones).
    pub xmin_floor: u64,
    /// Key tombstones `(key, lsn, until_ms, guard)`, by key.
    pub tombstones: Vec<(Bytes, u64, u64, XidGuard)>,
    /// Prefix tombstones `(prefix, lsn, guard)`, by prefix.
    pub prefixes: Vec<(Bytes, u64, XidGuard)>,
}

/// One key's tombstone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tombstone {
    /// The newest LSN at which the key was invalidated or written by CDC.
    lsn: u64,
    /// When the tombstone may be forgotten (ms since epoch).
    until_ms: u64,
    /// What a snapshot fill must see.
    guard: XidGuard,
}

/// One prefix's tombstone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PrefixTombstone {
    lsn: u64,
    guard: XidGuard,
}

/// The CDC state of one partition. Replicated: changed only by `apply`, in the same way on
/// every replica, and part of snapshots.
#[derive(Debug, Clone, Default)]
pub(crate) struct CdcState {
    /// Max of the watermarks of every applied batch.
    pub(crate) watermark: u64,
    /// Max of the fencing tokens of every accepted batch.
    pub(crate) fence: u64,
    /// Max LSN of every forgotten tombstone (key or prefix).
    pub(crate) floor: u64,
    /// Max [`XidGuard`] requirement of every forgotten tombstone: a snapshot fill needs
    /// `xmin >=` this.
    pub(crate) xmin_floor: u64,
    /// Key → tombstone. Ordered, so snapshots list them in one order on every replica.
    tombstones: BTreeMap<Bytes, Tombstone>,
    /// The tombstones by `until_ms`, for expiry and for the cap.
    expiry: TtlIndex,
    /// Prefix → its newest invalidation. Kept until the cap forgets them.
    prefixes: BTreeMap<Bytes, PrefixTombstone>,
    /// Bytes the key tombstones hold (keys and per-tombstone overhead).
    bytes: u64,
}

impl CdcState {
    /// The LSN of `key`'s tombstone, expired-but-held ones included (0: none). Expired
    /// tombstones still count until they are forgotten, and forgetting raises the floor to
    /// their LSN, so a fill is refused the same way before and after.
    pub(crate) fn tombstone_lsn(&self, key: &[u8]) -> u64 {
        self.tombstones.get(key).map_or(0, |t| t.lsn)
    }

    /// [`tombstone_lsn`](Self::tombstone_lsn), ignoring a tombstone that a `Cdc` op at
    /// `now_ms` forgets before it looks at the key.
    pub(crate) fn tombstone_lsn_after_expiry(&self, key: &[u8], now_ms: u64) -> u64 {
        self.tombstones
            .get(key)
            .filter(|t| t.until_ms > now_ms)
            .map_or(0, |t| t.lsn)
    }

    /// The max LSN of the prefix tombstones `key` starts with (0: none).
    pub(crate) fn prefix_lsn(&self, key: &[u8]) -> u64 {
        self.prefixes
            .iter()
            .filter(|(prefix, _)| key.starts_with(prefix))
            .map(|(_, t)| t.lsn)
            .max()
            .unwrap_or(0)
    }

    /// Whether a fill of `key` read under `snapshot` may be stored: its key tombstone,
    /// every prefix tombstone it starts with and the xmin floor must all be seen by the
    /// snapshot. `Err(lsn)` names the newest unseen invalidation's LSN (the floor's LSN
    /// when only the xmin floor refuses).
    pub(crate) fn admits(
        &self,
        key: &[u8],
        snapshot: &raftcache_proto::pg_snapshot::PgSnapshot,
    ) -> Result<(), u64> {
        let mut refused: Option<u64> = None;
        let mut refuse = |lsn: u64| refused = Some(refused.map_or(lsn, |r| r.max(lsn)));
        if let Some(t) = self.tombstones.get(key) {
            if !t.guard.seen_by(snapshot) {
                refuse(t.lsn);
            }
        }
        for (prefix, t) in &self.prefixes {
            if key.starts_with(prefix) && !t.guard.seen_by(snapshot) {
                refuse(t.lsn);
            }
        }
        if snapshot.xmin() < self.xmin_floor {
            refuse(self.floor);
        }
        refused.map_or(Ok(()), Err)
    }

    /// Bytes held by key tombstones (see [`TOMBSTONE_OVERHEAD`]).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of key tombstones.
    pub(crate) fn len(&self) -> usize {
        self.tombstones.len()
    }

    /// Number of prefix tombstones.
    pub(crate) fn prefix_count(&self) -> usize {
        self.prefixes.len()
    }

    /// The earliest `until_ms` of a key tombstone, if any.
    pub(crate) fn next_expiry(&self) -> Option<u64> {
        self.expiry.first().map(|(until, _)| *until)
    }

    /// Raises `key`'s tombstone to `lsn` and `until_ms` (each the max of old and new) and
    /// folds the invalidating transaction (`xid`, `min_xmin`) into its guard. `make_key`
    /// gives the bytes to keep when the key has no tombstone yet.
    pub(crate) fn tombstone(
        &mut self,
        key: &[u8],
        lsn: u64,
        until_ms: u64,
        xid: XidGuard,
        make_key: impl FnOnce() -> Bytes,
    ) {
        if let Some((stored, t)) = self.tombstones.get_key_value(key) {
            let mut guard = t.guard;
            guard.merge(t.lsn, lsn, xid.xid, xid.min_xmin);
            let next = Tombstone {
                lsn: t.lsn.max(lsn),
                until_ms: t.until_ms.max(until_ms),
                guard,
            };
            if next.until_ms != t.until_ms {
                let stored = stored.clone();
                self.expiry.remove(t.until_ms, &stored);
                self.expiry.insert(next.until_ms, stored);
            }
            if let Some(t) = self.tombstones.get_mut(key) {
                *t = next;
            }
            return;
        }
        let key = make_key();
        self.bytes += tombstone_cost(key.len());
        self.expiry.insert(until_ms, key.clone());
        let mut guard = XidGuard::default();
        guard.merge(0, lsn, xid.xid, xid.min_xmin);
        self.tombstones.insert(
            key,
            Tombstone {
                lsn,
                until_ms,
                guard,
            },
        );
    }

    /// Raises `prefix`'s tombstone to `lsn`. `make_prefix` gives the bytes to keep when the
    /// prefix has no tombstone yet.
    pub(crate) fn prefix_tombstone(
        &mut self,
        prefix: &[u8],
        lsn: u64,
        xid: XidGuard,
        make_prefix: impl FnOnce() -> Bytes,
    ) {
        match self.prefixes.get_mut(prefix) {
            Some(old) => {
                old.guard.merge(old.lsn, lsn, xid.xid, xid.min_xmin);
                old.lsn = old.lsn.max(lsn);
            }
            None => {
                let mut guard = XidGuard::default();
                guard.merge(0, lsn, xid.xid, xid.min_xmin);
                self.prefixes
                    .insert(make_prefix(), PrefixTombstone { lsn, guard });
            }
        }
    }

    /// Forgets up to `max` tombstones whose `until_ms <= now_ms`, earliest first (ties by
    /// key), raising the floor. Returns how many.
    pub(crate) fn expire(&mut self, now_ms: u64, max: usize) -> usize {
        let mut forgotten = 0;
        while forgotten < max && self.next_expiry().is_some_and(|until| until <= now_ms) {
            self.forget_first();
            forgotten += 1;
        }
        forgotten
    }

    /// Forgets key tombstones past [`MAX_TOMBSTONES`] (earliest-expiring first) and prefix
    /// tombstones past [`MAX_PREFIX_TOMBSTONES`] (lowest LSN first, ties by prefix), raising
    /// the floor.
    pub(crate) fn enforce_caps(&mut self) {
        while self.tombstones.len() > MAX_TOMBSTONES || self.bytes > MAX_TOMBSTONE_BYTES {
            if self.tombstones.is_empty() {
                break;
            }
            self.forget_first();
        }
        while self.prefixes.len() > MAX_PREFIX_TOMBSTONES {
            // `min_by_key` returns the first of equal minima, i.e. the smallest prefix.
            let Some(prefix) = self
                .prefixes
                .iter()
                .min_by_key(|(_, t)| t.lsn)
                .map(|(prefix, _)| prefix.clone())
            else {
                break;
            };
            if let Some(t) = self.prefixes.remove(&prefix) {
                self.floor = self.floor.max(t.lsn);
                self.raise_xmin_floor(t.guard);
            }
        }
    }

    /// Forgets the earliest-expiring key tombstone, raising the floor.
    fn forget_first(&mut self) {
        if let Some((_, key)) = self.expiry.pop_first() {
            if let Some(t) = self.tombstones.remove(&key) {
                self.floor = self.floor.max(t.lsn);
                self.bytes -= tombstone_cost(key.len());
                self.raise_xmin_floor(t.guard);
            }
        }
    }

    fn raise_xmin_floor(&mut self, guard: XidGuard) {
        if let Some(need) = guard.floor_requirement() {
            self.xmin_floor = self.xmin_floor.max(need);
        }
    }

    /// The replicated CDC state, in key order.
    pub(crate) fn snapshot(&self) -> CdcSnapshot {
        CdcSnapshot {
            watermark: self.watermark,
            fence: self.fence,
            floor: self.floor,
            xmin_floor: self.xmin_floor,
            tombstones: self
                .tombstones
                .iter()
                .map(|(key, t)| (key.clone(), t.lsn, t.until_ms, t.guard))
                .collect(),
            prefixes: self
                .prefixes
                .iter()
                .map(|(prefix, t)| (prefix.clone(), t.lsn, t.guard))
                .collect(),
        }
    }

    /// Rebuilds the state from a snapshot; `keep` makes the bytes to hold.
    pub(crate) fn restore(snap: CdcSnapshot, keep: impl Fn(&Bytes) -> Bytes) -> Self {
        let mut state = CdcState {
            watermark: snap.watermark,
            fence: snap.fence,
            floor: snap.floor,
            xmin_floor: snap.xmin_floor,
            ..CdcState::default()
        };
        for (key, lsn, until_ms, guard) in snap.tombstones {
            let key = keep(&key);
            state.bytes += tombstone_cost(key.len());
            state.expiry.insert(until_ms, key.clone());
            state.tombstones.insert(
                key,
                Tombstone {
                    lsn,
                    until_ms,
                    guard,
                },
            );
        }
        for (prefix, lsn, guard) in snap.prefixes {
            state
                .prefixes
                .insert(keep(&prefix), PrefixTombstone { lsn, guard });
        }
        state
    }

    /// Panics unless the expiry index mirrors the tombstones.
    #[cfg(test)]
    pub(crate) fn assert_consistent(&self) {
        assert_eq!(
            self.expiry.len(),
            self.tombstones.len(),
            "tombstone index size"
        );
        for (until, key) in self.expiry.due(u64::MAX) {
            assert_eq!(
                self.tombstones.get(key).map(|t| t.until_ms),
                Some(*until),
                "tombstone index entry"
            );
        }
        assert!(self.tombstones.len() <= MAX_TOMBSTONES, "tombstone cap");
        let bytes: u64 = self
            .tombstones
            .keys()
            .map(|k| tombstone_cost(k.len()))
            .sum();
        assert_eq!(self.bytes, bytes, "tombstone bytes");
        assert!(self.bytes <= MAX_TOMBSTONE_BYTES, "tombstone byte cap");
        assert!(self.prefixes.len() <= MAX_PREFIX_TOMBSTONES, "prefix cap");
    }
}
