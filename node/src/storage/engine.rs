//! [`Engine`]: one node's partitions, the memory limit and eviction.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use raftcache_proto::pg_snapshot::PgSnapshot;
use rand::Rng;
use serde::Serialize;

use super::evict::{Candidate, EvictionPool};
use super::mem::entry_cost;
use super::{
    CdcChange, Clock, Command, Condition, EntryView, EvictionPolicy, ExpireCondition, Op, Outcome,
    PartitionId, PartitionState, RedisOp, RequestId, StorageConfig, StorageError,
};

/// The longest TTL accepted: 100 Julian years, in ms.
pub const MAX_TTL_MS: u64 = 36_525 * 24 * 60 * 60 * 1000;

/// Rounds of "evict, then try to reserve again" before a write gives up with
/// `OutOfMemory`. Only reached when concurrent writers keep taking the space freed.
const MAX_ADMISSION_ROUNDS: usize = 64;
/// Sampling rounds that find nothing but the key being written before that key itself
/// becomes a candidate.
const ROUNDS_BEFORE_SELF_EVICTION: usize = 4;

/// A client write, before the proposer turns it into an [`Op`] (relative TTLs become
/// absolute deadlines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteRequest {
    /// Store a value.
    Set {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
        /// Time to live in ms; `None` or `Some(0)` means no TTL.
        ttl_ms: Option<u64>,
        /// Keep the current deadline of a live key (Redis `KEEPTTL`); `ttl_ms` then only
        /// applies when the key is absent.
        keep_ttl: bool,
        /// When to apply.
        condition: Condition,
        /// 0 for an ordinary write; otherwise a cache-aside fill of a value read from
        /// Postgres at this commit LSN, refused when the key has seen a change at this LSN
        /// or a later one (see [`Command::Set`]).
        source_lsn: u64,
        /// An exact fill read under this Postgres snapshot ([`Command::SnapshotFill`]);
        /// then `source_lsn` must be 0, `condition` `Always` and `keep_ttl` false.
        source_snapshot: Option<PgSnapshot>,
    },
    /// Remove a key.
    Delete {
        /// The key.
        key: Bytes,
    },
    /// Add `delta` to the integer at `key` (missing = 0).
    Incr {
        /// The key.
        key: Bytes,
        /// The signed amount.
        delta: i64,
    },
    /// Set the TTL of a live key; `None` or `Some(0)` removes it (persist).
    Expire {
        /// The key.
        key: Bytes,
        /// New time to live in ms.
        ttl_ms: Option<u64>,
    },
    /// A batch of Postgres changes committed at `lsn`, from the CDC worker (see
    /// [`Command::Cdc`]). Its tombstones are kept for
    /// [`StorageConfig::cdc_tombstone_ttl_ms`].
    Cdc {
        /// The Postgres commit LSN of the changes.
        lsn: u64,
        /// The LSN up to which the worker has sent every change of this partition.
        watermark: u64,
        /// The worker's fencing token.
        fence: u64,
        /// The 64-bit id of the transaction (see [`Command::CdcTx`]).
        xid: u64,
        /// A snapshot fill of these keys needs `xmin >= min_xmin` (0: none).
        min_xmin: u64,
        /// The changes, applied in order.
        changes: Vec<CdcWrite>,
    },
    /// Read-or-lease for a cache-aside load ([`Command::Lease`]).
    Lease {
        /// The key.
        key: Bytes,
        /// How long a granted lease lasts, in ms: 0 means
        /// [`DEFAULT_LEASE_TTL_MS`](super::DEFAULT_LEASE_TTL_MS), otherwise
        /// `1..=`[`MAX_LEASE_TTL_MS`](super::MAX_LEASE_TTL_MS).
        lease_ttl_ms: u64,
        /// A live value with at most this many ms left counts as stale (at most
        /// [`MAX_TTL_MS`]).
        stale_window_ms: u64,
    },
    /// Gives a lease back ([`Command::ReleaseLease`]).
    ReleaseLease {
        /// The key.
        key: Bytes,
        /// The token of the lease.
        token: u64,
    },
    /// Stores a loaded value under a lease ([`Command::Fill`]).
    Fill {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
        /// Time to live in ms; `None` or `Some(0)` means no TTL.
        ttl_ms: Option<u64>,
        /// As [`WriteRequest::Set`]'s `source_lsn`.
        source_lsn: u64,
        /// As [`WriteRequest::Set`]'s `source_snapshot`.
        source_snapshot: Option<PgSnapshot>,
        /// The lease's token.
        token: u64,
    },
    /// A Redis-only write of the RESP front end ([`Command::Redis`]).
    Redis {
        /// The key.
        key: Bytes,
        /// What to do.
        op: RedisWrite,
    },
}

/// A [`RedisOp`] before its expiry becomes a deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisWrite {
    /// `SET` with options ([`RedisOp::Set`]).
    Set {
        /// The value.
        value: Bytes,
        /// `EX`/`PX`/`EXAT`/`PXAT`, or none.
        expiry: Expiry,
        /// `KEEPTTL`.
        keep_ttl: bool,
        /// `NX`/`XX`.
        condition: Condition,
    },
    /// `GETDEL`.
    GetDel,
    /// `GETEX` with `EX`/`PX`/`EXAT`/`PXAT`, or `PERSIST` as [`Expiry::Never`].
    GetEx {
        /// The new expiry.
        expiry: Expiry,
    },
    /// `EXPIRE`/`PEXPIRE`/`EXPIREAT`/`PEXPIREAT`, and `PERSIST` as [`Expiry::Never`]:
    /// [`Command::Expire`] (a deadline already passed deletes the key).
    Expire {
        /// The new expiry.
        expiry: Expiry,
        /// `NX`/`XX`/`GT`/`LT`, if given.
        condition: Option<ExpireCondition>,
    },
    /// `APPEND` (the result is limited to `max_value_bytes`).
    Append {
        /// The bytes to append.
        suffix: Bytes,
    },
}

/// When a key written by a [`RedisWrite`] expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No deadline.
    Never,
    /// This many ms from now (`EX`, `PX`); at least 1.
    In(u64),
    /// At this time, in ms since the epoch (`EXAT`, `PXAT`); a time already passed is
    /// allowed (the key is then expired at once).
    At(u64),
}

/// One change of a [`WriteRequest::Cdc`], before TTLs become deadlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CdcWrite {
    /// Drop the cached value of `key` and refuse older fills.
    Invalidate {
        /// The key.
        key: Bytes,
    },
    /// Store the row's new value.
    Put {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
        /// Time to live in ms; `None` or `Some(0)` means no TTL.
        ttl_ms: Option<u64>,
    },
    /// Drop every cached key starting with `prefix` (empty: all) and refuse older fills
    /// under it.
    InvalidatePrefix {
        /// The key prefix (may be empty, at most `max_key_bytes`).
        prefix: Bytes,
    },
}

/// A live value as returned by [`Engine::get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadView {
    /// The stored value.
    pub value: Bytes,
    /// Version (index of the op that last wrote the key), for compare-and-set.
    pub version: u64,
    /// Time left before the key expires, if it has a TTL (always at least 1).
    pub ttl_remaining_ms: Option<u64>,
    /// The Postgres commit LSN the value reflects (CDC `Put` or cache-aside fill); 0 when
    /// it does not come from Postgres.
    pub source_lsn: u64,
}

impl ReadView {
    /// `view` as read at `now_ms` (its deadline becomes the time left).
    fn at(view: EntryView, now_ms: u64) -> ReadView {
        ReadView {
            value: view.value,
            version: view.version,
            ttl_remaining_ms: view
                .expire_at_ms
                .map(|deadline| deadline.saturating_sub(now_ms)),
            source_lsn: view.source_lsn,
        }
    }
}

/// Counters of one node's storage, for the Stats RPC and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    /// Entries held across partitions, expired-but-unreclaimed included.
    pub keys: u64,
    /// Accounted bytes in use, including room reserved by writes being applied at this
    /// instant (never above `memory_limit` when it is set).
    pub memory_used: u64,
    /// `max_memory`; 0 = unlimited.
    pub memory_limit: u64,
    /// The eviction policy.
    pub policy: EvictionPolicy,
    /// Reads that found a live key.
    pub hits: u64,
    /// Reads that found nothing (or only an expired entry).
    pub misses: u64,
    /// Live keys removed to make room.
    pub evictions: u64,
    /// Expired keys removed (by reclaim, overwrite or eviction).
    pub expirations: u64,
}

/// One partition and what the engine knows about it without taking its lock.
#[derive(Debug)]
struct Partition {
    id: PartitionId,
    state: Mutex<PartitionState>,
    /// `state.len()` as of the last apply, for weighted sampling without locking.
    len: AtomicUsize,
}

/// The storage of one node: all its partitions, the node-wide memory limit and eviction.
///
/// `Send + Sync`; share it through an `Arc`. Each partition has its own mutex, held only
/// for one apply or one read; no code path holds two partition locks at once.
#[derive(Debug)]
pub struct Engine {
    config: StorageConfig,
    clock: Arc<dyn Clock>,
    partitions: Box<[Partition]>,
    /// Accounted bytes of all partitions plus reservations of writes being applied.
    /// Only grows by a successful reservation that keeps it `<= max_memory`.
    used: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    /// Eviction candidates shared by all writers (taken without any partition lock held).
    pool: Mutex<EvictionPool>,
}

impl Engine {
    /// An engine with `config.partitions` empty partitions.
    ///
    /// # Panics
    ///
    /// If `config.partitions` or `config.cdc_tombstone_ttl_ms` is 0.
    pub fn new(config: StorageConfig, clock: Arc<dyn Clock>) -> Self {
        assert!(
            config.partitions > 0,
            "storage needs at least one partition"
        );
        assert!(
            config.cdc_tombstone_ttl_ms > 0,
            "CDC tombstones need a TTL above 0"
        );
        let partitions = (0..config.partitions)
            .map(|id| Partition {
                id: PartitionId(id),
                state: Mutex::new(PartitionState::new(PartitionId(id))),
                len: AtomicUsize::new(0),
            })
            .collect();
        Self {
            config,
            clock,
            partitions,
            used: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
            pool: Mutex::new(EvictionPool::default()),
        }
    }

    /// The configuration the engine was built with.
    pub fn config(&self) -> &StorageConfig {
        &self.config
    }

    /// The injected clock's current time (ms since epoch).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Reads a live key. Expired entries are hidden. Counts a hit or a miss.
    ///
    /// # Errors
    ///
    /// `PartitionOutOfRange`, `EmptyKey`, `KeyTooLarge`.
    pub fn get(&self, p: PartitionId, key: &[u8]) -> Result<Option<ReadView>, StorageError> {
        let partition = self.partition(p)?;
        self.check_key(key)?;
        let now = self.clock.now_ms();
        let view = lock(&partition.state).get(key, now);
        let counter = if view.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(view.map(|v| ReadView::at(v, now)))
    }

    /// Reads a live key like [`get`](Self::get) but without counting a hit or a miss or
    /// recording the access (for answers that accompany a write, such as the stale value
    /// of a lease).
    ///
    /// # Errors
    ///
    /// `PartitionOutOfRange`, `EmptyKey`, `KeyTooLarge`.
    pub fn peek(&self, p: PartitionId, key: &[u8]) -> Result<Option<ReadView>, StorageError> {
        let partition = self.partition(p)?;
        self.check_key(key)?;
        let now = self.clock.now_ms();
        let view = lock(&partition.state).peek(key, now);
        Ok(view.map(|v| ReadView::at(v, now)))
    }

    /// Validates a write (sizes, empty key, TTL range), turns relative TTLs into absolute
    /// deadlines with the clock ([`prepare`](Self::prepare)), admits it under `max_memory`
    /// (`noeviction`: `OutOfMemory`; `allkeys-lru`/`allkeys-lfu`: evicts through applied
    /// [`Command::Evict`] ops first), then applies it with the partition's next index.
    ///
    /// # Errors
    ///
    /// The validation errors of `prepare`, `PartitionOutOfRange`, `OutOfMemory`, and for
    /// `Incr`, `NotAnInteger` / `IncrOverflow` (the index is consumed, nothing changes).
    pub fn write(&self, p: PartitionId, req: WriteRequest) -> Result<Outcome, StorageError> {
        let partition = self.partition(p)?;
        let op = self.prepare(req)?;
        match self.admit_and_apply(partition, &op)? {
            Outcome::Incr(Err(err)) => Err(err.into()),
            outcome => Ok(outcome),
        }
    }

    /// The proposer-side step: validates `req` and stamps it with the clock, turning TTLs
    /// into absolute deadlines (`now + ttl`; a TTL of 0 or `None` means none). A `Cdc`
    /// batch's tombstones are kept until `now + cdc_tombstone_ttl_ms`.
    ///
    /// # Errors
    ///
    /// `EmptyKey`, `KeyTooLarge`, `ValueTooLarge`, `TtlOutOfRange` (over [`MAX_TTL_MS`],
    /// or a deadline past `u64::MAX`); for `Cdc`, the same checks on every change (a prefix
    /// may be empty, but not longer than `max_key_bytes`); for `Lease`,
    /// `LeaseTtlOutOfRange`, and `TtlOutOfRange` for a stale window over [`MAX_TTL_MS`].
    pub fn prepare(&self, req: WriteRequest) -> Result<Op, StorageError> {
        let now_ms = self.clock.now_ms();
        let cmd = match req {
            WriteRequest::Set {
                key,
                value,
                ttl_ms,
                keep_ttl,
                condition,
                source_lsn,
                source_snapshot,
            } => {
                self.check_key(&key)?;
                self.check_value(&value)?;
                match source_snapshot {
                    Some(_) if source_lsn != 0 || keep_ttl || condition != Condition::Always => {
                        return Err(StorageError::InvalidFill(
                            "a set with source_snapshot takes no source_lsn, keep_ttl or \
                             condition: a fill writes unless it is stale"
                                .into(),
                        ));
                    }
                    Some(snapshot) => Command::SnapshotFill {
                        key,
                        value,
                        expire_at_ms: deadline(now_ms, ttl_ms)?,
                        snapshot,
                        token: 0,
                    },
                    None => Command::Set {
                        key,
                        value,
                        expire_at_ms: deadline(now_ms, ttl_ms)?,
                        keep_ttl,
                        condition,
                        source_lsn,
                    },
                }
            }
            WriteRequest::Delete { key } => {
                self.check_key(&key)?;
                Command::Delete { key }
            }
            WriteRequest::Incr { key, delta } => {
                self.check_key(&key)?;
                Command::Incr { key, delta }
            }
            WriteRequest::Expire { key, ttl_ms } => {
                self.check_key(&key)?;
                Command::Expire {
                    key,
                    expire_at_ms: deadline(now_ms, ttl_ms)?,
                }
            }
            WriteRequest::Cdc {
                lsn,
                watermark,
                fence,
                xid,
                min_xmin,
                changes,
            } => Command::CdcTx {
                lsn,
                xid,
                min_xmin,
                watermark,
                fence,
                tombstone_until_ms: now_ms.saturating_add(self.config.cdc_tombstone_ttl_ms),
                changes: changes
                    .into_iter()
                    .map(|change| self.prepare_cdc_change(now_ms, change))
                    .collect::<Result<_, _>>()?,
            },
            WriteRequest::Lease {
                key,
                lease_ttl_ms,
                stale_window_ms,
            } => {
                self.check_key(&key)?;
                let ttl = super::lease_ttl_ms(lease_ttl_ms)?;
                if stale_window_ms > MAX_TTL_MS {
                    return Err(StorageError::TtlOutOfRange {
                        ttl_ms: stale_window_ms,
                        limit_ms: MAX_TTL_MS,
                    });
                }
                Command::Lease {
                    key,
                    lease_until_ms: now_ms.saturating_add(ttl),
                    stale_window_ms,
                }
            }
            WriteRequest::ReleaseLease { key, token } => {
                self.check_key(&key)?;
                Command::ReleaseLease { key, token }
            }
            WriteRequest::Redis { key, op } => {
                self.check_key(&key)?;
                let op = match op {
                    RedisWrite::Set {
                        value,
                        expiry,
                        keep_ttl,
                        condition,
                    } => {
                        self.check_value(&value)?;
                        RedisOp::Set {
                            value,
                            expire_at_ms: redis_deadline(now_ms, expiry)?,
                            keep_ttl,
                            condition,
                        }
                    }
                    RedisWrite::GetDel => RedisOp::GetDel,
                    RedisWrite::GetEx { expiry } => RedisOp::GetEx {
                        expire_at_ms: redis_deadline(now_ms, expiry)?,
                    },
                    RedisWrite::Expire { expiry, condition } => {
                        let expire_at_ms = redis_deadline(now_ms, expiry)?;
                        let cmd = match (condition, expire_at_ms) {
                            (Some(condition), Some(expire_at_ms)) => Command::Redis {
                                key,
                                op: RedisOp::ExpireIf {
                                    expire_at_ms,
                                    condition,
                                },
                            },
                            _ => Command::Expire { key, expire_at_ms },
                        };
                        return Ok(Op { now_ms, cmd });
                    }
                    RedisWrite::Append { suffix } => {
                        self.check_value(&suffix)?;
                        RedisOp::Append {
                            suffix,
                            max_len: self.config.max_value_bytes as u64,
                        }
                    }
                };
                Command::Redis { key, op }
            }
            WriteRequest::Fill {
                key,
                value,
                ttl_ms,
                source_lsn,
                source_snapshot,
                token,
            } => {
                self.check_key(&key)?;
                self.check_value(&value)?;
                match source_snapshot {
                    Some(_) if source_lsn != 0 => {
                        return Err(StorageError::InvalidFill(
                            "source_lsn and source_snapshot exclude each other".into(),
                        ));
                    }
                    Some(snapshot) => Command::SnapshotFill {
                        key,
                        value,
                        expire_at_ms: deadline(now_ms, ttl_ms)?,
                        snapshot,
                        token,
                    },
                    None => Command::Fill {
                        key,
                        value,
                        expire_at_ms: deadline(now_ms, ttl_ms)?,
                        source_lsn,
                        token,
                    },
                }
            }
        };
        Ok(Op { now_ms, cmd })
    }

    /// Validates one change of a `Cdc` batch and turns its TTL into a deadline.
    fn prepare_cdc_change(&self, now_ms: u64, change: CdcWrite) -> Result<CdcChange, StorageError> {
        Ok(match change {
            CdcWrite::Invalidate { key } => {
                self.check_key(&key)?;
                CdcChange::Invalidate { key }
            }
            CdcWrite::Put { key, value, ttl_ms } => {
                self.check_key(&key)?;
                self.check_value(&value)?;
                CdcChange::Put {
                    key,
                    value,
                    expire_at_ms: deadline(now_ms, ttl_ms)?,
                }
            }
            CdcWrite::InvalidatePrefix { prefix } => {
                if prefix.len() > self.config.max_key_bytes {
                    return Err(StorageError::KeyTooLarge {
                        size: prefix.len(),
                        limit: self.config.max_key_bytes,
                    });
                }
                CdcChange::InvalidatePrefix { prefix }
            }
        })
    }

    /// Active expiry: applies a [`Command::Reclaim`] to every partition that has a due
    /// deadline, removing up to `max_per_partition` keys from each. Returns keys removed.
    pub fn reclaim_expired(&self, max_per_partition: usize) -> usize {
        if max_per_partition == 0 {
            return 0;
        }
        let now_ms = self.clock.now_ms();
        let op = Op {
            now_ms,
            cmd: Command::Reclaim {
                max: max_per_partition,
            },
        };
        let mut removed = 0;
        for partition in self.partitions.iter() {
            let mut state = lock(&partition.state);
            if reclaim_due(&state, now_ms) {
                if let Outcome::Reclaimed(n) = self.apply_locked(partition, &mut state, &op, None) {
                    removed += n;
                }
            }
        }
        removed
    }

    /// Current counters.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            keys: self
                .partitions
                .iter()
                .map(|p| p.len.load(Ordering::Relaxed) as u64)
                .sum(),
            memory_used: self.used.load(Ordering::Acquire),
            memory_limit: self.config.max_memory,
            policy: self.config.policy,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            expirations: self.expirations.load(Ordering::Relaxed),
        }
    }

    /// Bytes held by CDC tombstones across partitions (not in `memory_used`: bounded by
    /// [`MAX_TOMBSTONE_BYTES`](super::MAX_TOMBSTONE_BYTES) per partition instead). Takes
    /// each partition's lock in turn: for scrapes, not for the request path.
    pub fn tombstone_bytes(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| {
                p.state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .tombstone_bytes()
            })
            .sum()
    }

    /// How many entries partition `p` holds (expired ones not yet reclaimed included),
    /// or `None` if there is no such partition.
    pub fn partition_len(&self, p: PartitionId) -> Option<u64> {
        let partition = self.partition(p).ok()?;
        Some(partition.len.load(Ordering::Relaxed) as u64)
    }

    /// How many entries of partition `p` have a deadline.
    pub fn partition_expires(&self, p: PartitionId) -> Option<u64> {
        let partition = self.partition(p).ok()?;
        let n = lock(&partition.state).ttl_len();
        Some(n as u64)
    }

    /// Up to `max` keys of partition `p` (live or expired), in storage order.
    pub fn partition_keys(&self, p: PartitionId, max: usize) -> Vec<Bytes> {
        let Ok(partition) = self.partition(p) else {
            return Vec::new();
        };
        let state = lock(&partition.state);
        state.keys().take(max).cloned().collect()
    }

    /// Index of the last op applied to partition `p`, or `None` if there is no such partition.
    pub fn partition_applied(&self, p: PartitionId) -> Option<u64> {
        let partition = self.partition(p).ok()?;
        let applied = lock(&partition.state).applied_index();
        Some(applied)
    }

    /// Partition `p`'s CDC watermark (the max `watermark` of its applied `Cdc` batches, 0
    /// before the first), or `None` if there is no such partition.
    pub fn cdc_watermark(&self, p: PartitionId) -> Option<u64> {
        let partition = self.partition(p).ok()?;
        let watermark = lock(&partition.state).cdc_watermark();
        Some(watermark)
    }

    /// A copy of partition `p`'s replicated state, or `None` if there is no such partition.
    pub fn snapshot(&self, p: PartitionId) -> Option<super::PartitionSnapshot> {
        let partition = self.partition(p).ok()?;
        let snapshot = lock(&partition.state).snapshot();
        Some(snapshot)
    }

    fn partition(&self, p: PartitionId) -> Result<&Partition, StorageError> {
        self.partitions
            .get(p.0 as usize)
            .ok_or(StorageError::PartitionOutOfRange {
                partition: p.0,
                count: self.config.partitions,
            })
    }

    fn check_value(&self, value: &[u8]) -> Result<(), StorageError> {
        if value.len() > self.config.max_value_bytes {
            return Err(StorageError::ValueTooLarge {
                size: value.len(),
                limit: self.config.max_value_bytes,
            });
        }
        Ok(())
    }

    fn check_key(&self, key: &[u8]) -> Result<(), StorageError> {
        if key.is_empty() {
            return Err(StorageError::EmptyKey);
        }
        if key.len() > self.config.max_key_bytes {
            return Err(StorageError::KeyTooLarge {
                size: key.len(),
                limit: self.config.max_key_bytes,
            });
        }
        Ok(())
    }

    /// Reserves room for `op`, evicting if the policy allows, and applies it.
    fn admit_and_apply(&self, partition: &Partition, op: &Op) -> Result<Outcome, StorageError> {
        let limit = self.config.max_memory;
        if limit == 0 {
            let mut state = lock(&partition.state);
            return Ok(self.apply_locked(partition, &mut state, op, None));
        }
        let refuse = |needed| StorageError::OutOfMemory {
            used: self.used.load(Ordering::Acquire),
            needed,
            limit,
        };
        // An entry that could never fit is refused before anything is evicted for it.
        if let Some(size) = stored_size(&op.cmd) {
            if size > limit {
                return Err(refuse(size));
            }
        }
        let mut rounds = 0;
        loop {
            let needed = {
                let mut state = lock(&partition.state);
                let growth = state.growth(op);
                let needed = u64::try_from(growth).unwrap_or(0);
                if self.try_reserve(needed) {
                    return Ok(self.apply_locked(partition, &mut state, op, Some(needed)));
                }
                needed
            };
            // The partition lock is released: eviction may need it, or another partition's.
            rounds += 1;
            if self.config.policy == EvictionPolicy::NoEviction
                || needed > limit
                || rounds > MAX_ADMISSION_ROUNDS
            {
                return Err(refuse(needed));
            }
            let used = self.used.load(Ordering::Acquire);
            let to_free = (used + needed).saturating_sub(limit);
            let writing = op.cmd.key().map(|k| (partition.id, k.as_ref()));
            if !self.evict(to_free, op.now_ms, writing) {
                return Err(refuse(needed));
            }
        }
    }

    // ---- The replicated write path -------------------------------------------------
    //
    // With Raft the proposer (the partition leader) and the appliers (every replica) are
    // separate steps: the leader reserves memory for an op before proposing it
    // ([`reserve_for`](Self::reserve_for)), every replica applies the committed op at its
    // log index ([`apply_at`](Self::apply_at)), and the leader's apply consumes the
    // reservation so that the accounted total never counts the op twice. Eviction victims
    // are chosen by [`pick_victims`](Self::pick_victims) and proposed as `Evict` ops.

    /// Tries to reserve the memory `op` needs in partition `p`. `Ok(reserved)` (possibly 0)
    /// or `Err(needed)` when the reservation would exceed `max_memory`.
    ///
    /// # Errors
    ///
    /// `PartitionOutOfRange`; `OutOfMemory` when the entry alone is larger than the limit.
    pub fn reserve_for(&self, p: PartitionId, op: &Op) -> Result<Result<u64, u64>, StorageError> {
        let partition = self.partition(p)?;
        let limit = self.config.max_memory;
        if limit == 0 {
            return Ok(Ok(0));
        }
        if let Some(size) = stored_size(&op.cmd) {
            if size > limit {
                return Err(StorageError::OutOfMemory {
                    used: self.used.load(Ordering::Acquire),
                    needed: size,
                    limit,
                });
            }
        }
        let needed = u64::try_from(lock(&partition.state).growth(op)).unwrap_or(0);
        Ok(if self.try_reserve(needed) {
            Ok(needed)
        } else {
            Err(needed)
        })
    }

    /// Gives back a reservation that no apply consumed (the proposal failed).
    pub fn release(&self, reserved: u64) {
        if reserved > 0 {
            self.used.fetch_sub(reserved, Ordering::AcqRel);
        }
    }

    /// The `OutOfMemory` error for a write that needs `needed` bytes.
    pub fn out_of_memory(&self, needed: u64) -> StorageError {
        StorageError::OutOfMemory {
            used: self.used.load(Ordering::Acquire),
            needed,
            limit: self.config.max_memory,
        }
    }

    /// How many bytes must be freed before `needed` more fit (0 when they fit).
    pub fn shortfall(&self, needed: u64) -> u64 {
        let limit = self.config.max_memory;
        if limit == 0 {
            return 0;
        }
        (self.used.load(Ordering::Acquire) + needed).saturating_sub(limit)
    }

    /// Applies a committed op at log index `index` to partition `p` and settles the memory
    /// counter; `reserved` is what this node reserved for the op when it proposed it (0 on
    /// other replicas, which apply whatever was committed). The op's bytes must be
    /// exact-size allocations (see [`PartitionState::apply_shared`]); they are kept, not
    /// copied.
    ///
    /// # Errors
    ///
    /// `PartitionOutOfRange`.
    pub fn apply_at(
        &self,
        p: PartitionId,
        index: u64,
        op: &Op,
        reserved: u64,
        request: Option<RequestId>,
    ) -> Result<Outcome, StorageError> {
        let partition = self.partition(p)?;
        let mut state = lock(&partition.state);
        let reserved = (reserved > 0).then_some(reserved);
        Ok(self.apply_locked_at(partition, &mut state, index, op, reserved, true, request))
    }

    /// Chooses up to about `to_free` bytes of eviction victims among the partitions for
    /// which `allowed` is true (those this node leads), by the configured policy. Returns
    /// `(partition, key)` pairs; nothing is removed here.
    pub fn pick_victims(
        &self,
        to_free: u64,
        now_ms: u64,
        writing: Option<(PartitionId, &[u8])>,
        allowed: &dyn Fn(PartitionId) -> bool,
    ) -> Vec<(PartitionId, Bytes)> {
        let mut rng = rand::rng();
        let samples = self.config.eviction_samples.max(1);
        let mut out: Vec<(PartitionId, Bytes)> = Vec::new();
        let mut freed = 0u64;
        let mut fruitless = 0usize;
        let mut sampled = Vec::with_capacity(samples);
        while freed < to_free && fruitless <= 2 * ROUNDS_BEFORE_SELF_EVICTION {
            let exclude = writing.filter(|_| fruitless < ROUNDS_BEFORE_SELF_EVICTION);
            sampled.clear();
            self.sample(&mut rng, samples, now_ms, exclude, &mut sampled);
            sampled.retain(|c| {
                allowed(c.partition)
                    && !out
                        .iter()
                        .any(|(p, k)| *p == c.partition && k.as_ref() == c.key.as_ref())
            });
            let victim = {
                let mut pool = lock(&self.pool);
                for candidate in sampled.drain(..) {
                    pool.offer(candidate);
                }
                loop {
                    match pool.pop_best_except(exclude) {
                        Some(c) if !allowed(c.partition) => continue,
                        other => break other,
                    }
                }
            };
            let Some(Candidate { partition, key, .. }) = victim else {
                fruitless += 1;
                continue;
            };
            let Ok(part) = self.partition(partition) else {
                continue;
            };
            let size = {
                let state = lock(&part.state);
                state.entry_cost(&key)
            };
            let Some(size) = size else { continue };
            if out.iter().any(|(p, k)| *p == partition && *k == key) {
                continue;
            }
            freed += size;
            out.push((partition, key));
        }
        out
    }

    /// Replaces partition `p`'s state (a snapshot was installed) and settles the counters.
    ///
    /// # Errors
    ///
    /// `PartitionOutOfRange`.
    pub fn restore(&self, p: PartitionId, state: PartitionState) -> Result<(), StorageError> {
        let partition = self.partition(p)?;
        let mut current = lock(&partition.state);
        let before = current.memory_used();
        *current = state;
        let after = current.memory_used();
        partition.len.store(current.len(), Ordering::Relaxed);
        if after >= before {
            self.used.fetch_add(after - before, Ordering::AcqRel);
        } else {
            self.used.fetch_sub(before - after, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Empties partition `p` (its replica left this node, or a new replica starts from
    /// nothing) and gives its memory back.
    ///
    /// # Errors
    ///
    /// `PartitionOutOfRange`.
    pub fn clear(&self, p: PartitionId) -> Result<(), StorageError> {
        self.restore(p, PartitionState::new(p))
    }

    /// Partitions with an expired entry (or an ended fill lease) due for reclaim at
    /// `now_ms`.
    pub fn due_for_reclaim(&self, now_ms: u64) -> Vec<PartitionId> {
        self.partitions
            .iter()
            .filter(|p| reclaim_due(&lock(&p.state), now_ms))
            .map(|p| p.id)
            .collect()
    }

    /// The number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.config.partitions
    }

    /// Adds `bytes` to `used` if that keeps it within the limit (always when unlimited).
    fn try_reserve(&self, bytes: u64) -> bool {
        if bytes == 0 {
            return true;
        }
        let limit = self.config.max_memory;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let after = used.checked_add(bytes)?;
                (limit == 0 || after <= limit).then_some(after)
            })
            .is_ok()
    }

    /// Applies `op` with the partition's next index and settles the memory counter, given
    /// that `reserved` bytes were reserved for it (`None`: nothing was reserved because
    /// memory is unlimited or the op cannot grow it).
    fn apply_locked(
        &self,
        partition: &Partition,
        state: &mut PartitionState,
        op: &Op,
        reserved: Option<u64>,
    ) -> Outcome {
        let index = state.applied_index() + 1;
        self.apply_locked_at(partition, state, index, op, reserved, false, None)
    }

    /// [`apply_locked`](Self::apply_locked) at a given index (a Raft log index), once
    /// per `request` id, keeping the op's bytes when `shared` (see
    /// [`PartitionState::apply_once`]).
    #[allow(clippy::too_many_arguments)]
    fn apply_locked_at(
        &self,
        partition: &Partition,
        state: &mut PartitionState,
        index: u64,
        op: &Op,
        reserved: Option<u64>,
        shared: bool,
        request: Option<RequestId>,
    ) -> Outcome {
        let memory_before = state.memory_used();
        let expired_before = state.expired_removed();
        let outcome = state.apply_once(index, op, request, shared);
        let memory_after = state.memory_used();
        let expired = state.expired_removed() - expired_before;
        partition.len.store(state.len(), Ordering::Relaxed);

        if memory_after >= memory_before {
            let grown = memory_after - memory_before;
            debug_assert!(
                reserved.is_none_or(|r| grown <= r),
                "growth {grown} over reservation {reserved:?}"
            );
            let reserved = reserved.unwrap_or(0);
            if grown < reserved {
                self.used.fetch_sub(reserved - grown, Ordering::AcqRel);
            } else if grown > reserved {
                // Unreserved growth (no limit), or a misprediction: account for it.
                self.used.fetch_add(grown - reserved, Ordering::AcqRel);
            }
        } else {
            let shrunk = memory_before - memory_after;
            self.used
                .fetch_sub(shrunk + reserved.unwrap_or(0), Ordering::AcqRel);
        }

        if expired > 0 {
            self.expirations.fetch_add(expired, Ordering::Relaxed);
        }
        if let Outcome::Evicted(n) = outcome {
            let live = (n as u64).saturating_sub(expired);
            self.evictions.fetch_add(live, Ordering::Relaxed);
        }
        outcome
    }

    /// Evicts keys until about `to_free` accounted bytes are released. Prefers not to evict
    /// `writing` (the key being written). Returns false when nothing could be evicted.
    fn evict(&self, to_free: u64, now_ms: u64, writing: Option<(PartitionId, &[u8])>) -> bool {
        let mut freed = 0u64;
        while freed < to_free {
            let victims = self.pick_victims(to_free - freed, now_ms, writing, &|_| true);
            if victims.is_empty() {
                return freed > 0;
            }
            let mut by_partition: Vec<(PartitionId, Vec<Bytes>)> = Vec::new();
            for (p, key) in victims {
                match by_partition.iter_mut().find(|(q, _)| *q == p) {
                    Some((_, keys)) => keys.push(key),
                    None => by_partition.push((p, vec![key])),
                }
            }
            for (p, keys) in by_partition {
                let Ok(partition) = self.partition(p) else {
                    continue;
                };
                let mut state = lock(&partition.state);
                let op = Op {
                    now_ms,
                    cmd: Command::Evict { keys },
                };
                let before = state.memory_used();
                self.apply_locked(partition, &mut state, &op, None);
                freed += before.saturating_sub(state.memory_used());
            }
        }
        true
    }

    /// Samples `samples` random keys across the node (each partition chosen with probability
    /// proportional to its number of entries, so every key is about equally likely), locking
    /// each chosen partition once, one at a time.
    fn sample(
        &self,
        rng: &mut impl Rng,
        samples: usize,
        now_ms: u64,
        exclude: Option<(PartitionId, &[u8])>,
        out: &mut Vec<Candidate>,
    ) {
        let mut cumulative = Vec::with_capacity(self.partitions.len());
        let mut total = 0usize;
        for partition in self.partitions.iter() {
            total += partition.len.load(Ordering::Relaxed);
            cumulative.push(total);
        }
        if total == 0 {
            return;
        }
        let mut picks: Vec<usize> = (0..samples)
            .map(|_| {
                let at = rng.random_range(0..total);
                cumulative.partition_point(|&end| end <= at)
            })
            .collect();
        picks.sort_unstable();
        for group in picks.chunk_by(|a, b| a == b) {
            let Some(partition) = group.first().and_then(|&i| self.partitions.get(i)) else {
                continue;
            };
            let exclude = exclude
                .filter(|(p, _)| *p == partition.id)
                .map(|(_, key)| key);
            let state = lock(&partition.state);
            state.sample(rng, group.len(), self.config.policy, now_ms, exclude, out);
        }
    }
}

/// Whether a `Reclaim` at `now_ms` has work in `state`: an expired entry, or an ended
/// fill lease to forget.
fn reclaim_due(state: &PartitionState, now_ms: u64) -> bool {
    state.next_deadline().is_some_and(|d| d <= now_ms)
        || state.next_lease_expiry().is_some_and(|d| d <= now_ms)
}

/// The accounted size of the entry a `Set` or `Fill` stores, checked against the limit
/// before anything is evicted for it.
fn stored_size(cmd: &Command) -> Option<u64> {
    match cmd {
        Command::Set {
            key,
            value,
            expire_at_ms,
            ..
        }
        | Command::Fill {
            key,
            value,
            expire_at_ms,
            ..
        } => Some(entry_cost(key.len(), value.len(), expire_at_ms.is_some())),
        Command::SnapshotFill {
            key,
            value,
            expire_at_ms,
            snapshot,
            ..
        } => Some(
            entry_cost(key.len(), value.len(), expire_at_ms.is_some())
                + super::mem::fill_cost(Some(snapshot)),
        ),
        Command::Redis {
            key,
            op:
                RedisOp::Set {
                    value,
                    expire_at_ms,
                    ..
                },
        } => Some(entry_cost(key.len(), value.len(), expire_at_ms.is_some())),
        _ => None,
    }
}

/// The deadline of an [`Expiry`], at most [`MAX_TTL_MS`] ahead.
fn redis_deadline(now_ms: u64, expiry: Expiry) -> Result<Option<u64>, StorageError> {
    // Redis accepts any deadline that fits an i64; one past MAX_TTL_MS is kept at
    // MAX_TTL_MS (100 years), which no cache entry outlives.
    let cap = now_ms.saturating_add(MAX_TTL_MS);
    Ok(match expiry {
        Expiry::Never => None,
        Expiry::In(ttl_ms) => Some(now_ms.saturating_add(ttl_ms.clamp(1, MAX_TTL_MS))),
        Expiry::At(at_ms) => Some(at_ms.min(cap)),
    })
}

/// `now + ttl` as an absolute deadline; `None`/`Some(0)` mean no TTL.
fn deadline(now_ms: u64, ttl_ms: Option<u64>) -> Result<Option<u64>, StorageError> {
    match ttl_ms {
        None | Some(0) => Ok(None),
        Some(ttl_ms) => {
            let out_of_range = StorageError::TtlOutOfRange {
                ttl_ms,
                limit_ms: MAX_TTL_MS,
            };
            if ttl_ms > MAX_TTL_MS {
                return Err(out_of_range);
            }
            now_ms.checked_add(ttl_ms).map(Some).ok_or(out_of_range)
        }
    }
}

/// Locks a mutex, recovering from poisoning. A panic while a partition was locked can only
/// come from a bug outside `apply`'s data path (apply itself has no panicking operations
/// on any input); the state is still structurally valid, and refusing to serve every later
/// request on that partition would turn one bug into an outage.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
