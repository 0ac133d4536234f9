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
//!   ├─ command.rs   Op, Command, Condition, Outcome, IncrError
//!   ├─ entry.rs     Entry (replicated fields + node-local access metadata)
//!   ├─ ttl.rs       TtlIndex: entries ordered by deadline, for Reclaim
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

mod clock;
mod command;
mod config;
mod engine;
mod entry;
mod error;
mod evict;
mod mem;
mod state_machine;
mod ttl;

#[cfg(test)]
mod engine_test;
#[cfg(test)]
mod model_test;
#[cfg(test)]
mod state_machine_test;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use clock::{Clock, ManualClock, SystemClock};
pub use command::{Command, Condition, IncrError, Op, Outcome};
pub use config::{EvictionPolicy, ParsePolicyError, StorageConfig};
pub use engine::{Engine, EngineStats, ReadView, WriteRequest, MAX_TTL_MS};
pub use error::StorageError;
pub use mem::{ENTRY_OVERHEAD, TTL_OVERHEAD};
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
