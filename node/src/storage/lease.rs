//! [`LeaseTable`]: the fill leases of one partition (Facebook memcache leases, replicated).
//!
//! A cache-aside reader that misses asks for a *lease* (`Command::Lease`): the first caller
//! is granted one and loads the value, the others are told to wait (and may use a stale
//! value meanwhile), so a miss on a hot key sends one load to the database, not thousands.
//! The loader writes the value back with `Command::Fill` presenting its token; the fill
//! applies only while the lease is still the key's lease.
//!
//! - **Replicated state.** Leases live in the partition's state machine, change only by
//!   `apply` (grant, release, fill, voiding, expiry decided by the op's `now_ms`) and travel
//!   in snapshots (format 4), so a lease survives a leader change and every replica holds
//!   the same leases.
//! - **The token is the Raft log index of the grant.** It is unique within the partition
//!   and never reused, so a token from a voided or expired lease can never match a later
//!   lease of the same key.
//! - **What voids a lease.** Anything that changes what the key holds or may hold: an
//!   applied `Set`, any `Delete` (even of a missing key), an applied `Incr` or `Expire`,
//!   and every CDC `Invalidate` or `Put` of the key (even one skipped as older: Postgres
//!   changed the row, so a value loaded under the lease may predate it), and a CDC
//!   `InvalidatePrefix` covering the key (empty prefix: every lease). A fenced CDC batch
//!   changes nothing. A fill whose lease was voided is refused (`lease_lost`), so a slow
//!   loader never puts back a value that was replaced meanwhile. Eviction does not void a
//!   lease: it only drops a value, which the fill may then put back.
//! - **Expiry.** A lease ends at `until_ms` (op clock); then the next caller is granted a
//!   new one (the holder died or hangs). Expired leases are forgotten when their key is
//!   leased again, when the table is full, and by `Reclaim` (up to its `max`).
//! - **The cap and `Miss`.** At most [`MAX_LEASES`] per partition. A full table first
//!   forgets its expired leases; if it is still full the caller gets `Miss` ("load and
//!   fill without a token") rather than an unbounded table or an error: leases are an
//!   optimisation, and refusing one only costs a duplicate load.
//!
//! # Memory
//!
//! Leases are *not* counted in `memory_used`, like CDC tombstones: eviction cannot remove
//! them, and counting them would let readers' misses refuse writes under `max-memory`.
//! They are bounded instead: at most [`MAX_LEASES`] per partition, each about `key + 150`
//! bytes (a `BTreeMap` slot of key + token + until, a slot of the expiry index, the key's
//! buffer), i.e. at most 65 536 × (key + 150 B) ≈ 10 MiB plus 64 Ki keys per partition.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::ttl::TtlIndex;

/// The most leases a partition keeps at once; past it (after forgetting the expired ones)
/// a lease request is answered `Miss`.
pub const MAX_LEASES: usize = 65_536;

/// The lease lifetime used when a request asks for 0 ms.
pub const DEFAULT_LEASE_TTL_MS: u64 = 10_000;

/// The longest lease lifetime a request may ask for.
pub const MAX_LEASE_TTL_MS: u64 = 60_000;

/// What a `Command::Lease` decided (see [`Outcome::Lease`](super::Outcome::Lease)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LeaseDecision {
    /// The key holds a live value outside its stale window: read it, no lease needed.
    Hit,
    /// The caller holds the key's lease: load the value and fill it with this token.
    Granted {
        /// The Raft log index of the grant.
        token: u64,
    },
    /// Another caller holds the key's lease for this much longer (ms, op clock).
    Wait {
        /// Time left on the current lease.
        remaining_ms: u64,
    },
    /// The key needs a load but the partition keeps no more leases: load and fill
    /// without a token.
    Miss,
}

/// One key's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    /// The log index of the grant.
    pub(crate) token: u64,
    /// When the lease ends (ms since epoch, op clock).
    pub(crate) until_ms: u64,
}

impl Lease {
    /// Whether the lease still runs at `now_ms`.
    pub(crate) fn is_live(&self, now_ms: u64) -> bool {
        self.until_ms > now_ms
    }
}

/// The leases of one partition. Replicated: changed only by `apply`, in the same way on
/// every replica, and part of snapshots.
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaseTable {
    /// Key → lease. Ordered, so snapshots list them in one order and a prefix is a range.
    leases: BTreeMap<Bytes, Lease>,
    /// The leases by `until_ms` (ties by key), for expiry.
    expiry: TtlIndex,
}

impl LeaseTable {
    /// `key`'s lease, expired-but-held ones included.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Lease> {
        self.leases.get(key).copied()
    }

    /// Number of leases held, expired ones included.
    pub(crate) fn len(&self) -> usize {
        self.leases.len()
    }

    /// The earliest `until_ms` held, if any.
    pub(crate) fn next_expiry(&self) -> Option<u64> {
        self.expiry.first().map(|(until, _)| *until)
    }

    /// Makes `lease` the lease of `key` (replacing any), keeping `key` as given.
    pub(crate) fn insert(&mut self, key: Bytes, lease: Lease) {
        self.remove(&key);
        self.expiry.insert(lease.until_ms, key.clone());
        self.leases.insert(key, lease);
    }

    /// Forgets `key`'s lease; returns it.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Lease> {
        let (stored, lease) = self.leases.remove_entry(key)?;
        self.expiry.remove(lease.until_ms, &stored);
        Some(lease)
    }

    /// Forgets every lease of a key starting with `prefix` (empty: all). Returns how many.
    pub(crate) fn remove_prefix(&mut self, prefix: &[u8]) -> usize {
        if prefix.is_empty() {
            let n = self.leases.len();
            *self = LeaseTable::default();
            return n;
        }
        let keys: Vec<Bytes> = self
            .leases
            .range::<[u8], _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, _)| key.clone())
            .collect();
        for key in &keys {
            self.remove(key);
        }
        keys.len()
    }

    /// Forgets every lease except those of keys starting with `keep` (empty: none kept).
    pub(crate) fn keep_only(&mut self, keep: &[u8]) {
        let gone: Vec<Bytes> = self
            .leases
            .keys()
            .filter(|key| keep.is_empty() || !key.starts_with(keep))
            .cloned()
            .collect();
        for key in &gone {
            self.remove(key);
        }
    }

    /// Forgets up to `max` leases whose `until_ms <= now_ms`, earliest first (ties by
    /// key). Returns how many.
    pub(crate) fn expire(&mut self, now_ms: u64, max: usize) -> usize {
        let mut forgotten = 0;
        while forgotten < max && self.next_expiry().is_some_and(|until| until <= now_ms) {
            if let Some((_, key)) = self.expiry.pop_first() {
                self.leases.remove(&key);
            }
            forgotten += 1;
        }
        forgotten
    }

    /// The leases `(key, token, until_ms)`, by key.
    pub(crate) fn snapshot(&self) -> Vec<(Bytes, u64, u64)> {
        self.leases
            .iter()
            .map(|(key, l)| (key.clone(), l.token, l.until_ms))
            .collect()
    }

    /// Rebuilds the table from a snapshot; `keep` makes the bytes to hold.
    pub(crate) fn restore(items: Vec<(Bytes, u64, u64)>, keep: impl Fn(&Bytes) -> Bytes) -> Self {
        let mut table = LeaseTable::default();
        for (key, token, until_ms) in items {
            table.insert(keep(&key), Lease { token, until_ms });
        }
        table
    }

    /// Panics unless the expiry index mirrors the leases and the cap holds.
    #[cfg(test)]
    pub(crate) fn assert_consistent(&self) {
        assert_eq!(self.expiry.len(), self.leases.len(), "lease index size");
        for (until, key) in self.expiry.due(u64::MAX) {
            assert_eq!(
                self.leases.get(key).map(|l| l.until_ms),
                Some(*until),
                "lease index entry"
            );
        }
        assert!(self.leases.len() <= MAX_LEASES, "lease cap");
    }
}

/// Whether a live value with `ttl_remaining_ms` left (`None`: no TTL) is fresh, i.e.
/// outside a `stale_window_ms` stale window: a `Lease` op answers HIT for it, and so does
/// the leader's read before proposing one.
pub fn is_fresh(ttl_remaining_ms: Option<u64>, stale_window_ms: u64) -> bool {
    ttl_remaining_ms.is_none_or(|left| left > stale_window_ms)
}

/// The lease lifetime a request asks for: 0 means [`DEFAULT_LEASE_TTL_MS`], otherwise it
/// must be `1..=`[`MAX_LEASE_TTL_MS`].
///
/// # Errors
///
/// [`StorageError::LeaseTtlOutOfRange`](super::StorageError::LeaseTtlOutOfRange) above
/// [`MAX_LEASE_TTL_MS`].
pub fn lease_ttl_ms(requested: u64) -> Result<u64, super::StorageError> {
    match requested {
        0 => Ok(DEFAULT_LEASE_TTL_MS),
        ms if ms <= MAX_LEASE_TTL_MS => Ok(ms),
        ms => Err(super::StorageError::LeaseTtlOutOfRange {
            ttl_ms: ms,
            limit_ms: MAX_LEASE_TTL_MS,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn prefix_removal_takes_only_the_range() {
        let mut t = LeaseTable::default();
        for (i, key) in ["a", "ab", "abc", "abd", "b", "aa"].into_iter().enumerate() {
            t.insert(
                b(key),
                Lease {
                    token: i as u64 + 1,
                    until_ms: 100 + i as u64,
                },
            );
        }
        assert_eq!(t.remove_prefix(b"ab"), 3);
        let keys: Vec<_> = t.snapshot().into_iter().map(|(k, _, _)| k).collect();
        assert_eq!(keys, vec![b("a"), b("aa"), b("b")]);
        t.assert_consistent();
        assert_eq!(t.remove_prefix(b""), 3);
        assert_eq!(t.len(), 0);
        t.assert_consistent();
    }

    #[test]
    fn expire_forgets_earliest_first_up_to_max() {
        let mut t = LeaseTable::default();
        t.insert(
            b("x"),
            Lease {
                token: 1,
                until_ms: 30,
            },
        );
        t.insert(
            b("y"),
            Lease {
                token: 2,
                until_ms: 10,
            },
        );
        t.insert(
            b("z"),
            Lease {
                token: 3,
                until_ms: 20,
            },
        );
        assert_eq!(t.expire(25, 1), 1);
        assert!(t.get(b"y").is_none());
        assert_eq!(t.expire(25, 5), 1);
        assert!(t.get(b"z").is_none());
        assert_eq!(t.get(b"x").map(|l| l.token), Some(1));
        t.assert_consistent();
        let back = LeaseTable::restore(t.snapshot(), Bytes::clone);
        assert_eq!(back.snapshot(), t.snapshot());
    }

    #[test]
    fn lease_ttl_defaults_and_bounds() {
        assert_eq!(lease_ttl_ms(0), Ok(DEFAULT_LEASE_TTL_MS));
        assert_eq!(lease_ttl_ms(1), Ok(1));
        assert_eq!(lease_ttl_ms(MAX_LEASE_TTL_MS), Ok(MAX_LEASE_TTL_MS));
        assert!(lease_ttl_ms(MAX_LEASE_TTL_MS + 1).is_err());
    }
}
