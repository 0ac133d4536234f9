//! One stored entry.

use bytes::Bytes;
use raftcache_proto::pg_snapshot::PgSnapshot;

use super::evict::Access;

/// A value held by a partition. Every field but `access` is replicated state.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The stored value.
    pub(crate) value: Bytes,
    /// Index of the op that last wrote this entry.
    pub(crate) version: u64,
    /// Absolute deadline, ms since epoch.
    pub(crate) expire_at_ms: Option<u64>,
    /// The Postgres commit LSN the value reflects (a CDC `Put`, or a cache-aside fill read
    /// at that LSN); 0 when the value does not come from Postgres. A CDC invalidation at an
    /// older LSN keeps the entry, and a fill at this LSN or an older one is refused.
    pub(crate) source_lsn: u64,
    /// For a fill read under a Postgres snapshot (`Command::SnapshotFill`): that snapshot.
    /// A later CDC invalidation removes the value unless the snapshot saw its transaction.
    pub(crate) fill: Option<Box<PgSnapshot>>,
    /// Node-local LRU/LFU metadata; never read by `apply`.
    pub(crate) access: Access,
}

impl Entry {
    /// Whether the entry counts as absent at `now_ms`.
    pub(crate) fn is_expired(&self, now_ms: u64) -> bool {
        self.expire_at_ms.is_some_and(|deadline| deadline <= now_ms)
    }
}
