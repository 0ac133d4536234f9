//! Memory accounting: what one entry costs, as a pure function of replicated data.
//!
//! The figure is an estimate of the real heap footprint of the structures in
//! [`PartitionState`](super::PartitionState) on a 64-bit target, averaged over their growth
//! patterns. It deliberately ignores capacity (which differs between replicas that grew
//! differently) so that `memory_used` is identical on every replica.

/// Bytes charged per entry on top of its key and value.
///
/// | part | bytes |
/// |---|---|
/// | `IndexMap` entry slot: `Bucket { hash: u64, key: Bytes (32), value: Entry (88) }` | 128 |
/// | hash index: one `usize` + one control byte per bucket at load ≤ 7/8 | ~10 |
/// | malloc header/rounding of the key and value buffers (glibc: 8 + up to 15) | ~32 |
/// | slack of the doubling entries `Vec` and index: 0 (resident) to +100% (reserved) | 0–130 |
///
/// `Entry` is `value: Bytes` (32), `version: u64` (8), `expire_at_ms: Option<u64>` (16),
/// `source_lsn: u64` (8), `fill: Option<Box<PgSnapshot>>` (8) and node-local access
/// metadata (`u64` + `u8`, padded to 16).
///
/// Measured with a counting global allocator and RSS on 0.7–1.5 M entries (12-byte keys,
/// 100-byte values, `Bytes` built from exact-capacity buffers): ~160 bytes resident per
/// entry, 150–224 bytes of requested heap depending on where the `Vec` is in its doubling.
/// 192 sat between the two, erring towards the reserved figure since a limit that
/// under-counts lets the process outgrow its memory; `source_lsn` (CDC) added 8 bytes per
/// slot, hence 200, and the fill snapshot's pointer 8 more, hence 208. Keys or values that
/// arrive as slices of a larger buffer keep that whole buffer alive and are not covered by
/// any constant. CDC tombstones are not counted: they are bounded per partition instead
/// (see [`MAX_TOMBSTONE_BYTES`](super::MAX_TOMBSTONE_BYTES)).
pub const ENTRY_OVERHEAD: u64 = 208;

/// Extra bytes charged for an entry that has a deadline: its slot in the TTL index.
///
/// | part | bytes |
/// |---|---|
/// | `BTreeSet<(u64, Bytes)>` element: 8 + 32 | 40 |
/// | B-tree leaves (11 slots, ~70% full after random inserts) and node headers, amortised | ~25 |
/// | the key's `Bytes` becomes shared when cloned into the index: a 24-byte `Shared` header in a 32-byte chunk | 32 |
///
/// Measured the same way: 92–96 extra bytes per entry with a deadline; charged as 100.
pub const TTL_OVERHEAD: u64 = 100;

/// Extra bytes charged for an entry filled under a Postgres snapshot
/// (`Command::SnapshotFill`): the boxed snapshot (xmin, xmax and the `Vec` header, 40 B,
/// in a 48-byte malloc chunk) and the running-xid list's buffer header; its xids are
/// charged 8 bytes each on top.
pub const FILL_OVERHEAD: u64 = 64;

/// Accounted bytes of a fill snapshot kept with an entry (0 when none).
pub(crate) fn fill_cost(fill: Option<&raftcache_proto::pg_snapshot::PgSnapshot>) -> u64 {
    fill.map_or(0, |s| FILL_OVERHEAD + s.heap_bytes() as u64)
}

/// Accounted bytes of one entry.
pub(crate) fn entry_cost(key_len: usize, value_len: usize, has_deadline: bool) -> u64 {
    // usize -> u64 is lossless on every supported target (usize is at most 64 bits).
    let payload = key_len as u64 + value_len as u64;
    payload + ENTRY_OVERHEAD + if has_deadline { TTL_OVERHEAD } else { 0 }
}
