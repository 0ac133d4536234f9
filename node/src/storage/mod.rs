//! The storage engine: one node's partitions held in memory, with TTL, memory accounting
//! and eviction. Synchronous, clock-injected, no networking.
//!
//! # Layout
//!
//! ```text
//! engine.rs         Engine: partitions of this node, limits, admission, eviction, stats
//!   ├─ config.rs    StorageConfig, EvictionPolicy
//!   ├─ error.rs     StorageError
//!   ├─ evict.rs     sampling, eviction pool, LRU clock / LFU counter (node-local)
//!   └─ clock.rs     Clock, SystemClock, ManualClock
//! state_machine.rs  PartitionState: the deterministic per-partition state machine
//!   ├─ command.rs   Op, Command, Condition, Outcome, IncrError, CdcChange, CdcApplied, CdcError
//!   ├─ entry.rs     Entry (replicated fields + node-local access metadata)
//!   ├─ cdc.rs       CdcState: fence, watermark, key/prefix tombstones and their floor
//!   ├─ lease.rs     LeaseTable: fill leases (token = grant's log index), their voiding
//!   ├─ ttl.rs       TtlIndex: entries (and tombstones) ordered by deadline
//!   └─ mem.rs       the memory accounting formula and its per-entry overhead
//! ```
//!
//! # Write path
//!
//! ```text
//! WriteRequest ─► Engine::prepare ─► Op { now_ms, Command }      (validate sizes, TTL → deadline)
//!   ─► lock partition, PartitionState::growth(op)                 (exact byte delta)
//!   ─► reserve delta in the node-wide counter (CAS, never > max_memory)
//!        └─ no room: unlock; noeviction → OutOfMemory; lru/lfu → sample keys,
//!           apply Command::Evict to their partitions (one lock at a time), retry
//!   ─► PartitionState::apply(applied_index + 1, op) ─► Outcome   (settle the counter)
//! ```
//!
//! `apply` depends only on (state, index, op): it never reads a clock, an RNG or any
//! node-local data, so the Raft layer can drive the same state machine on every replica
//! with log index = version. Eviction and expiry reclaim are proposer decisions expressed
//! as ordinary ops (`Evict`, `Reclaim`), replayed identically everywhere.
//!
//! # CDC
//!
//! The CDC worker's batches (`WriteRequest::Cdc` → `Command::Cdc`) and cache-aside fills
//! (`Set` with `source_lsn > 0`) are ordered by Postgres commit LSN per key: tombstones
//! refuse fills older than an invalidation, replayed batches change nothing, a fencing
//! token refuses deposed workers. The rules are on [`PartitionState`].
//!
//! # Fill leases
//!
//! `Command::Lease` hands out at most one fill lease per key (token = the grant's log
//! index); `Command::Fill` stores the loaded value only while that lease still holds.
//! Writes, deletes and CDC changes of the key void it. The rules are in `lease.rs`.
//!
//! # Read path
//!
//! ```text
//! Engine::get ─► lock partition ─► PartitionState::get(key, clock.now_ms())
//!   ─► hidden if deadline <= now (lazy expiry, not removed) ─► touch LRU/LFU metadata
//!   ─► ReadView { value, version, ttl_remaining_ms }
//! ```
//!
//! Access metadata (LRU clock, LFU counter) is node-local and never replicated or
//! consulted by `apply`; `memory_used` is a pure function of the replicated entries.

mod cdc;
mod clock;
mod command;
mod config;
mod engine;
mod entry;
mod error;
mod evict;
mod lease;
mod mem;
mod requests;
mod state_machine;
mod ttl;

#[cfg(test)]
mod cdc_test;
#[cfg(test)]
mod engine_test;
#[cfg(test)]
mod lease_test;
#[cfg(test)]
mod model_test;
#[cfg(test)]
mod state_machine_test;
#[cfg(test)]
mod test_apply;
#[cfg(test)]
mod xid_guard_test;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use cdc::{
    CdcSnapshot, XidGuard, MAX_PREFIX_TOMBSTONES, MAX_TOMBSTONES, MAX_TOMBSTONE_BYTES,
    TOMBSTONE_OVERHEAD, UNKNOWN_XMIN,
};
pub use clock::{clock_offset_ms, set_clock_offset_ms, Clock, ManualClock, SystemClock};
pub use command::{
    CdcApplied, CdcChange, CdcError, Command, Condition, ExpireCondition, IncrError, Op, Outcome,
    RedisOp, RedisOutcome,
};
pub use config::{EvictionPolicy, ParsePolicyError, StorageConfig};
pub use engine::{
    CdcWrite, Engine, EngineStats, Expiry, ReadView, RedisWrite, WriteRequest, MAX_TTL_MS,
};
pub use error::StorageError;
pub use lease::{
    is_fresh, lease_ttl_ms, LeaseDecision, DEFAULT_LEASE_TTL_MS, MAX_LEASES, MAX_LEASE_TTL_MS,
};
pub use mem::{ENTRY_OVERHEAD, FILL_OVERHEAD, TTL_OVERHEAD};
pub use requests::{RequestId, RequestLog, MAX_REQUESTS, REQUEST_TTL_MS};
pub use state_machine::{EntryView, PartitionSnapshot, PartitionState, SnapshotEntry};

/// Identifies one partition (one Raft group) of the keyspace: `0..partitions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PartitionId(pub u32);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
