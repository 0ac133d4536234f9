//! The replicated write commands and their outcomes.
//!
//! An [`Op`] is everything a replica needs to apply a write deterministically: the command
//! plus the proposer's notion of "now" (used for expiry decisions inside the state machine,
//! which never reads a clock itself).

use bytes::Bytes;
use raftcache_proto::pg_snapshot::PgSnapshot;

use super::LeaseDecision;

/// One replicated write: a [`Command`] stamped with the proposer's clock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Op {
    /// Wall-clock ms chosen by the proposer (later: the Raft leader). Entries whose deadline
    /// is `<= now_ms` count as absent while this op is applied.
    pub now_ms: u64,
    /// What to do.
    pub cmd: Command,
}

/// A write to one partition's state machine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Command {
    /// Store `value` under `key` if `condition` holds.
    Set {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
        /// Absolute deadline (ms since epoch); `None` stores the key without TTL unless
        /// `keep_ttl` keeps an existing one.
        expire_at_ms: Option<u64>,
        /// Keep the deadline of the live entry being replaced (Redis `KEEPTTL`). When the
        /// key is absent, `expire_at_ms` is used instead.
        keep_ttl: bool,
        /// When to apply.
        condition: Condition,
        /// 0 for an ordinary write. Otherwise this is a *cache-aside fill* of a value read
        /// from Postgres at this commit LSN: it is refused (nothing changes, the outcome
        /// names the newer LSN) when the key's CDC LSN is `>= source_lsn` — the max of the
        /// key's tombstone, the live entry's `source_lsn`, every prefix tombstone the key
        /// starts with and the partition's tombstone floor. An applied Set stores
        /// `source_lsn` in the entry.
        source_lsn: u64,
    },
    /// Remove `key`.
    Delete {
        /// The key.
        key: Bytes,
    },
    /// Add `delta` to the decimal integer stored at `key` (missing = 0), keeping its TTL.
    Incr {
        /// The key.
        key: Bytes,
        /// The signed amount to add.
        delta: i64,
    },
    /// Set (`Some`) or remove (`None`, "persist") the deadline of a live key.
    /// A deadline `<= now_ms` deletes the key, as in Redis.
    Expire {
        /// The key.
        key: Bytes,
        /// The new absolute deadline, or `None` to persist.
        expire_at_ms: Option<u64>,
    },
    /// Remove these keys (live or expired). Eviction is decided by the proposer and
    /// replayed identically on every replica.
    Evict {
        /// The keys to remove; missing ones are skipped.
        keys: Vec<Bytes>,
    },
    /// Remove up to `max` keys whose deadline is `<= now_ms`, earliest deadline first
    /// (ties by key order).
    ///
    /// Also forgets up to `max` expired CDC tombstones (`until_ms <= now_ms`), earliest
    /// first, raising the partition's tombstone floor to their LSNs.
    Reclaim {
        /// Upper bound on the keys removed by this op (and, separately, on the tombstones
        /// forgotten).
        max: usize,
    },
    /// A batch of changes from Postgres logical replication, all committed at `lsn`.
    ///
    /// Applying it is idempotent and ordered per key: a change older than or equal to what
    /// the key already reflects is skipped, so a batch applied twice changes nothing the
    /// second time. Every invalidated or written key keeps a *tombstone* `(lsn, until_ms)`
    /// so that cache-aside fills read before the change (`Set` with an older
    /// `source_lsn`) are refused; see [`PartitionState`](super::PartitionState) for the
    /// exact rules.
    Cdc {
        /// The Postgres commit LSN of every change in the batch (non-zero).
        lsn: u64,
        /// The LSN up to which the CDC worker has sent every change for this partition;
        /// the partition's watermark becomes the max of the old one and this.
        watermark: u64,
        /// The worker's fencing token: a batch whose fence is below the partition's current
        /// fence (a deposed worker) is refused with [`CdcError::Fenced`].
        fence: u64,
        /// Absolute time (ms since epoch) until which the tombstones this batch writes are
        /// kept; afterwards they are folded into the tombstone floor.
        tombstone_until_ms: u64,
        /// The changes, applied in order.
        changes: Vec<CdcChange>,
    },
    // New variants go at the end: the durable log is postcard-encoded by variant index.
    /// Read-or-lease for a cache-aside load (see `storage/lease.rs`): at index `i`,
    /// a live value whose deadline is more than `stale_window_ms` away (or that has none)
    /// is a [`LeaseDecision::Hit`]; otherwise a running lease of the key is a
    /// [`LeaseDecision::Wait`]; otherwise the key's expired lease is forgotten and, if the
    /// partition is at [`MAX_LEASES`](super::MAX_LEASES) after forgetting its expired
    /// leases, [`LeaseDecision::Miss`]; otherwise the key gets the lease
    /// `(token: i, until: lease_until_ms)`: [`LeaseDecision::Granted`]. Entries are left
    /// as they are (an expired one is not dropped).
    Lease {
        /// The key.
        key: Bytes,
        /// When a lease granted by this op ends (ms since epoch).
        lease_until_ms: u64,
        /// A live value whose deadline is at most this far from `now_ms` counts as stale.
        stale_window_ms: u64,
    },
    /// Gives back the key's lease if it is `token` (see [`Outcome::Released`]).
    ReleaseLease {
        /// The key.
        key: Bytes,
        /// The token the lease was granted with.
        token: u64,
    },
    /// A fill under a lease: when `key`'s lease is `token` and still runs, the lease ends
    /// and the value is stored exactly as [`Command::Set`] with [`Condition::Always`] and
    /// this `source_lsn` would (a fill refused as stale also ends the lease); otherwise
    /// nothing changes and the outcome says `lease_lost`.
    Fill {
        /// The key.
        key: Bytes,
        /// The loaded value.
        value: Bytes,
        /// Absolute deadline (ms since epoch), or `None` for no TTL.
        expire_at_ms: Option<u64>,
        /// As [`Command::Set`]'s: 0, or the Postgres LSN the value was read at.
        source_lsn: u64,
        /// The lease's token (the log index of its grant).
        token: u64,
    },
    /// A single-key write only Redis has (the RESP front end's `SET … GET`, `GETDEL`,
    /// `GETEX`, `APPEND`), applied atomically like every other single-key write.
    Redis {
        /// The key.
        key: Bytes,
        /// What to do.
        op: RedisOp,
    },
    /// [`Command::Cdc`] with the transaction's id: the form every batch takes now. An old
    /// `Cdc` (from a log written before xids) applies as a `CdcTx` whose transaction is
    /// unknown, which refuses every snapshot fill of its keys while their tombstones last.
    ///
    /// Each key tombstone (and prefix tombstone) folds `(xid, min_xmin)` into its
    /// [`XidGuard`](super::XidGuard): a later [`Command::SnapshotFill`] passes only if its
    /// snapshot sees `xid` and every earlier invalidator. An entry filled under a snapshot
    /// that saw `xid` is kept by an `Invalidate` (and a `Put` leaves it as it is).
    CdcTx {
        /// As `Cdc`'s.
        lsn: u64,
        /// The 64-bit id of the transaction (0: none, e.g. a reset).
        xid: u64,
        /// A snapshot fill of these keys needs `xmin >= min_xmin` (a reset: every
        /// transaction below it had ended). 0: none.
        min_xmin: u64,
        /// As `Cdc`'s.
        watermark: u64,
        /// As `Cdc`'s.
        fence: u64,
        /// As `Cdc`'s.
        tombstone_until_ms: u64,
        /// As `Cdc`'s.
        changes: Vec<CdcChange>,
    },
    /// The exact cache-aside fill: `value` read from Postgres under `snapshot`. Refused
    /// (`newer_lsn` names the newest unseen invalidation) unless the snapshot sees every
    /// transaction the key's tombstone, the prefix tombstones it starts with and the
    /// partition's xmin floor stand for; otherwise stored with `Condition::Always`,
    /// source LSN 0 and the snapshot kept with the entry. With `token` 0 the outcome is
    /// [`Outcome::Set`]; otherwise it is a fill under that lease, exactly as
    /// [`Command::Fill`] (lease checked first, the lease ends with the fill).
    SnapshotFill {
        /// The key.
        key: Bytes,
        /// The loaded value.
        value: Bytes,
        /// Absolute deadline (ms since epoch), or `None` for no TTL.
        expire_at_ms: Option<u64>,
        /// The snapshot the row was read under.
        snapshot: PgSnapshot,
        /// 0, or the lease's token (the log index of its grant).
        token: u64,
    },
    /// Empties the partition in one step (Redis `FLUSHALL`, per partition): removes every
    /// entry, live or expired, whose key does not start with `keep` (an empty `keep`
    /// keeps nothing), and ends their leases. CDC state (tombstones, watermark, fence)
    /// stays. The outcome is [`Outcome::Evicted`] with the number removed.
    Flush {
        /// Keys starting with this stay (the node's internal `__raftcache:` keys).
        keep: Bytes,
    },
}

/// The Redis-only writes of [`Command::Redis`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RedisOp {
    /// Redis `SET` with its options: exactly [`Command::Set`] with `source_lsn` 0, and
    /// the live value before the op in the outcome (`SET … GET`, `GETSET`).
    Set {
        /// The new value.
        value: Bytes,
        /// Absolute deadline (ms since epoch), or `None`.
        expire_at_ms: Option<u64>,
        /// Keep the live entry's deadline (`KEEPTTL`).
        keep_ttl: bool,
        /// `NX` / `XX`.
        condition: Condition,
    },
    /// `GETDEL`: removes the key and answers its live value.
    GetDel,
    /// `GETEX` with an option: `Some(deadline)` sets the deadline (one `<= now_ms`
    /// deletes the key), `None` persists; answers the live value before the op.
    GetEx {
        /// The new deadline, or `None` to persist.
        expire_at_ms: Option<u64>,
    },
    /// `EXPIRE … NX|XX|GT|LT`: [`Command::Expire`] with a deadline, applied only when
    /// `condition` holds for the live key's current deadline (none counts as infinite,
    /// as in Redis); the outcome is [`Outcome::Expire`].
    ExpireIf {
        /// The new deadline (one `<= now_ms` deletes the key).
        expire_at_ms: u64,
        /// The condition.
        condition: ExpireCondition,
    },
    /// `APPEND`: appends `suffix` to the live value (a missing key counts as empty),
    /// keeping its deadline, unless the result would be longer than `max_len` bytes.
    Append {
        /// The bytes to append.
        suffix: Bytes,
        /// The longest value allowed (the proposer's `max_value_bytes`), so that every
        /// replica decides the same.
        max_len: u64,
    },
}

/// The condition of [`RedisOp::ExpireIf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExpireCondition {
    /// `NX`: the key has no deadline.
    NoDeadline,
    /// `XX`: the key has a deadline.
    HasDeadline,
    /// `GT`: the new deadline is later than the current one (none: never).
    Later,
    /// `LT`: the new deadline is earlier than the current one (none: always).
    Earlier,
    /// `XX LT`: the key has a deadline and the new one is earlier.
    EarlierDeadline,
}

impl ExpireCondition {
    /// Whether a key with deadline `current` may get `new`.
    pub fn holds(self, current: Option<u64>, new: u64) -> bool {
        match (self, current) {
            (ExpireCondition::NoDeadline, c) => c.is_none(),
            (ExpireCondition::HasDeadline, c) => c.is_some(),
            (ExpireCondition::Later, None) => false,
            (ExpireCondition::Later, Some(c)) => new > c,
            (ExpireCondition::Earlier, None) => true,
            (ExpireCondition::Earlier | ExpireCondition::EarlierDeadline, Some(c)) => new < c,
            (ExpireCondition::EarlierDeadline, None) => false,
        }
    }
}

impl RedisOp {
    /// The Redis command's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            RedisOp::Set { .. } => "set",
            RedisOp::GetDel => "getdel",
            RedisOp::GetEx { .. } => "getex",
            RedisOp::ExpireIf { .. } => "expire-if",
            RedisOp::Append { .. } => "append",
        }
    }
}

/// What a [`Command::Redis`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RedisOutcome {
    /// [`RedisOp::Set`]: as [`Outcome::Set`], and the live value before the op.
    Set {
        /// Whether the condition held and the value was stored.
        applied: bool,
        /// The new version when applied; otherwise the live entry's, or 0.
        version: u64,
        /// The live value before the op.
        old: Option<Bytes>,
    },
    /// [`RedisOp::GetDel`] and [`RedisOp::GetEx`]: the live value before the op.
    Value(Option<Bytes>),
    /// [`RedisOp::Append`]: the new length, or `None` when it would have exceeded
    /// `max_len` (then nothing changed).
    Append(Option<u64>),
}

/// One change of a [`Command::Cdc`] batch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CdcChange {
    /// The row behind `key` changed or was deleted: drop the cached value unless it is
    /// newer than the batch, and refuse fills older than the batch.
    Invalidate {
        /// The key.
        key: Bytes,
    },
    /// Store the row's new value (write-through from Postgres) unless the key already
    /// reflects this LSN or a later one.
    Put {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
        /// Absolute deadline (ms since epoch), or `None` for no TTL.
        expire_at_ms: Option<u64>,
    },
    /// Every key starting with `prefix` is stale (a `TRUNCATE`, or a change that maps to
    /// many keys): drop the older ones and refuse older fills under the prefix.
    InvalidatePrefix {
        /// The key prefix; empty means every key of the partition.
        prefix: Bytes,
    },
}

impl CdcChange {
    /// The key or prefix the change names.
    pub fn key(&self) -> &Bytes {
        match self {
            CdcChange::Invalidate { key } | CdcChange::Put { key, .. } => key,
            CdcChange::InvalidatePrefix { prefix } => prefix,
        }
    }
}

impl Command {
    /// The single key this command writes, if it is a single-key command.
    pub fn key(&self) -> Option<&Bytes> {
        match self {
            Command::Set { key, .. }
            | Command::Delete { key }
            | Command::Incr { key, .. }
            | Command::Expire { key, .. }
            | Command::Lease { key, .. }
            | Command::ReleaseLease { key, .. }
            | Command::Fill { key, .. }
            | Command::SnapshotFill { key, .. }
            | Command::Redis { key, .. } => Some(key),
            Command::Evict { .. }
            | Command::Reclaim { .. }
            | Command::Cdc { .. }
            | Command::CdcTx { .. }
            | Command::Flush { .. } => None,
        }
    }
}

/// The precondition of a [`Command::Set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Condition {
    /// Always store.
    #[default]
    Always,
    /// Store only if the key is absent or expired (Redis `NX`).
    IfAbsent,
    /// Store only if the key is live (Redis `XX`).
    IfPresent,
    /// Store only if the key is live and its version equals this one (compare-and-set).
    IfVersion(u64),
}

/// What applying an [`Op`] did. One variant per [`Command`] variant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    /// Result of [`Command::Set`]. When `applied`, `version` is the new version (the op's
    /// index); otherwise it is the version of the live entry, or 0 when the key is absent.
    Set {
        /// Whether the condition held and the value was stored.
        applied: bool,
        /// See the variant docs.
        version: u64,
        /// When a cache-aside fill (`source_lsn > 0`) was refused as stale: the key's CDC
        /// LSN that is `>=` the fill's. 0 in every other case (applied, or refused by its
        /// condition).
        newer_lsn: u64,
    },
    /// Result of [`Command::Delete`]: whether a live key was removed.
    Deleted(bool),
    /// Result of [`Command::Incr`]: the new value and version, or why nothing changed.
    Incr(Result<(i64, u64), IncrError>),
    /// Result of [`Command::Expire`]: with a deadline, whether the key was live; when
    /// persisting, whether the key was live *and* had a deadline (Redis `PERSIST`).
    Expire(bool),
    /// Result of [`Command::Evict`]: how many keys were removed.
    Evicted(usize),
    /// Result of [`Command::Reclaim`]: how many expired keys were removed.
    Reclaimed(usize),
    /// Result of [`Command::Cdc`]: what the batch changed, or why it was refused (then
    /// nothing changed, but the index still counts as applied).
    Cdc(Result<CdcApplied, CdcError>),
    // New variants go at the end: outcomes are stored (postcard) in the request log and
    // in snapshots.
    /// Result of [`Command::Lease`].
    Lease(LeaseDecision),
    /// Result of [`Command::ReleaseLease`]: whether the key's lease was `token` and still
    /// running. A matching lease is forgotten either way.
    Released(bool),
    /// Result of [`Command::Fill`].
    Fill {
        /// Whether the value was stored.
        applied: bool,
        /// When applied, the new version (the op's index); otherwise the live entry's
        /// version, or 0 when the key is absent.
        version: u64,
        /// As in [`Outcome::Set`]: the key's CDC LSN when the fill was refused as stale.
        newer_lsn: u64,
        /// Refused because the lease was no longer `token` (voided, expired or never
        /// granted); then nothing changed.
        lease_lost: bool,
    },
    /// Result of [`Command::Redis`].
    Redis(RedisOutcome),
}

/// What an applied [`Command::Cdc`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CdcApplied {
    /// Entries removed or written by the batch (skipped changes and invalidations of absent
    /// keys count 0, so a replayed batch reports 0).
    pub changed: u64,
    /// The partition's CDC watermark after the batch.
    pub watermark: u64,
}

/// Why a [`Command::Cdc`] left the partition unchanged.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize,
)]
pub enum CdcError {
    /// The batch's fencing token is below the partition's: it comes from a worker that has
    /// been replaced.
    #[error("CDC batch fenced: its token is below the partition's current fence {current}")]
    Fenced {
        /// The partition's current fence.
        current: u64,
    },
}

/// Why an [`Command::Incr`] left the key unchanged.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize,
)]
pub enum IncrError {
    /// The stored value is not a base-10 signed 64-bit integer.
    #[error("value is not an integer or out of range")]
    NotAnInteger,
    /// The result would not fit in a signed 64-bit integer.
    #[error("increment or decrement would overflow")]
    Overflow,
}

/// Parses a stored value as INCR does: ASCII base-10 `i64`, an optional leading `-`,
/// at least one digit, nothing else (no spaces, no `+`). Leading zeros and `-0` are accepted.
pub(crate) fn parse_i64(value: &[u8]) -> Option<i64> {
    let digits = value.strip_prefix(b"-").unwrap_or(value);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // All ASCII, so this is valid UTF-8; from_str then only rejects out-of-range values.
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_i64_follows_redis_rules() {
        for (input, want) in [
            (&b"0"[..], Some(0)),
            (b"-0", Some(0)),
            (b"42", Some(42)),
            (b"-42", Some(-42)),
            (b"007", Some(7)),
            (b"9223372036854775807", Some(i64::MAX)),
            (b"-9223372036854775808", Some(i64::MIN)),
            (b"9223372036854775808", None),
            (b"", None),
            (b"-", None),
            (b"+1", None),
            (b" 1", None),
            (b"1 ", None),
            (b"abc", None),
            (b"1.0", None),
            (b"--1", None),
            (b"1e3", None),
            ("\u{0661}".as_bytes(), None),
        ] {
            assert_eq!(
                parse_i64(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn incr_error_messages() {
        assert_eq!(
            IncrError::NotAnInteger.to_string(),
            "value is not an integer or out of range"
        );
        assert_eq!(
            IncrError::Overflow.to_string(),
            "increment or decrement would overflow"
        );
    }
}
