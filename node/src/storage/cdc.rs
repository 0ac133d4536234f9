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
//! # Memory
//!
//! Tombstones are *not* counted in `memory_used`: eviction cannot remove them, and counting
//! them would let a burst of invalidations refuse writes (or the invalidations themselves)
//! under `max-memory`. They are bounded instead: at most [`MAX_TOMBSTONES`] per partition,
//! each about `key + 190` bytes (a `BTreeMap` slot of key + `(lsn, until)` ≈ 48 B, a slot
//! of the expiry index ≈ 40 B, B-tree slack ≈ 50 B, the key's shared-buffer header and
//! malloc rounding ≈ 48 B), i.e. at most 65 536 × (key + 190 B) ≈ 12.5 MiB plus 64 Ki keys
//! per partition; and at most [`MAX_PREFIX_TOMBSTONES`] prefix tombstones.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::ttl::TtlIndex;

/// The most key tombstones a partition keeps; past it the earliest-expiring ones are
/// forgotten (raising the floor) at the end of each `Cdc` op.
pub const MAX_TOMBSTONES: usize = 65_536;

/// The most prefix tombstones a partition keeps; past it the lowest-LSN ones are forgotten
/// (raising the floor) at the end of each `Cdc` op. Prefixes are few in practice (one per
/// mapped key template), so this only bounds a misbehaving worker.
pub const MAX_PREFIX_TOMBSTONES: usize = 1_024;

/// The CDC part of a [`PartitionSnapshot`](super::PartitionSnapshot).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CdcSnapshot {
    /// The partition's CDC watermark.
    pub watermark: u64,
    /// The highest fencing token accepted.
    pub fence: u64,
    /// The tombstone floor: fills at or below it are refused.
    pub floor: u64,
    /// Key tombstones `(key, lsn, until_ms)`, by key.
    pub tombstones: Vec<(Bytes, u64, u64)>,
    /// Prefix tombstones `(prefix, lsn)`, by prefix.
    pub prefixes: Vec<(Bytes, u64)>,
}

/// One key's tombstone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tombstone {
    /// The newest LSN at which the key was invalidated or written by CDC.
    lsn: u64,
    /// When the tombstone may be forgotten (ms since epoch).
    until_ms: u64,
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
    /// Key → tombstone. Ordered, so snapshots list them in one order on every replica.
    tombstones: BTreeMap<Bytes, Tombstone>,
    /// The tombstones by `until_ms`, for expiry and for the cap.
    expiry: TtlIndex,
    /// Prefix → LSN of its newest invalidation. Kept until the cap forgets them.
    prefixes: BTreeMap<Bytes, u64>,
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
            .map(|(_, lsn)| *lsn)
            .max()
            .unwrap_or(0)
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

    /// Raises `key`'s tombstone to `lsn` and `until_ms` (each the max of old and new).
    /// `make_key` gives the bytes to keep when the key has no tombstone yet.
    pub(crate) fn tombstone(
        &mut self,
        key: &[u8],
        lsn: u64,
        until_ms: u64,
        make_key: impl FnOnce() -> Bytes,
    ) {
        if let Some((stored, t)) = self.tombstones.get_key_value(key) {
            let next = Tombstone {
                lsn: t.lsn.max(lsn),
                until_ms: t.until_ms.max(until_ms),
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
        self.expiry.insert(until_ms, key.clone());
        self.tombstones.insert(key, Tombstone { lsn, until_ms });
    }

    /// Raises `prefix`'s tombstone to `lsn`. `make_prefix` gives the bytes to keep when the
    /// prefix has no tombstone yet.
    pub(crate) fn prefix_tombstone(
        &mut self,
        prefix: &[u8],
        lsn: u64,
        make_prefix: impl FnOnce() -> Bytes,
    ) {
        match self.prefixes.get_mut(prefix) {
            Some(old) => *old = (*old).max(lsn),
            None => {
                self.prefixes.insert(make_prefix(), lsn);
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
        while self.tombstones.len() > MAX_TOMBSTONES {
            self.forget_first();
        }
        while self.prefixes.len() > MAX_PREFIX_TOMBSTONES {
            // `min_by_key` returns the first of equal minima, i.e. the smallest prefix.
            let Some(prefix) = self
                .prefixes
                .iter()
                .min_by_key(|(_, lsn)| **lsn)
                .map(|(prefix, _)| prefix.clone())
            else {
                break;
            };
            if let Some(lsn) = self.prefixes.remove(&prefix) {
                self.floor = self.floor.max(lsn);
            }
        }
    }

    /// Forgets the earliest-expiring key tombstone, raising the floor.
    fn forget_first(&mut self) {
        if let Some((_, key)) = self.expiry.pop_first() {
            if let Some(t) = self.tombstones.remove(&key) {
                self.floor = self.floor.max(t.lsn);
            }
        }
    }

    /// The replicated CDC state, in key order.
    pub(crate) fn snapshot(&self) -> CdcSnapshot {
        CdcSnapshot {
            watermark: self.watermark,
            fence: self.fence,
            floor: self.floor,
            tombstones: self
                .tombstones
                .iter()
                .map(|(key, t)| (key.clone(), t.lsn, t.until_ms))
                .collect(),
            prefixes: self
                .prefixes
                .iter()
                .map(|(prefix, lsn)| (prefix.clone(), *lsn))
                .collect(),
        }
    }

    /// Rebuilds the state from a snapshot; `keep` makes the bytes to hold.
    pub(crate) fn restore(snap: CdcSnapshot, keep: impl Fn(&Bytes) -> Bytes) -> Self {
        let mut state = CdcState {
            watermark: snap.watermark,
            fence: snap.fence,
            floor: snap.floor,
            ..CdcState::default()
        };
        for (key, lsn, until_ms) in snap.tombstones {
            state.tombstone(&key, lsn, until_ms, || keep(&key));
        }
        for (prefix, lsn) in snap.prefixes {
            state.prefix_tombstone(&prefix, lsn, || keep(&prefix));
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
        assert!(self.prefixes.len() <= MAX_PREFIX_TOMBSTONES, "prefix cap");
    }
}
