//! The binary snapshot format of one partition: versioned, self-describing, checksummed.
//!
//! ```text
//! magic            8 bytes  b"RCSNAP\0\0"
//! format version   u16      5 (versions 1 to 4 are still read)
//! partition id     u32
//! last log id      opt-log-id            (Raft position covered by the snapshot)
//! membership       opt-log-id, configs: u32 n × (u32 m × u64 voter id),
//!                  nodes: u32 n × (u64 id, u32 len, addr UTF-8)
//! applied index    u64                   (PartitionSnapshot::applied_index)
//! entry count      u64
//! entries          count × (u32 len, key, u32 len, value, u64 version,
//!                           u8 has-deadline, [u64 deadline], u64 source lsn (v2))
//! cdc (v2)         u64 watermark, u64 fence, u64 tombstone floor,
//!                  u64 n, n × (u32 len, key, u64 lsn, u64 until ms)   (keys ascending)
//!                  u64 n, n × (u32 len, prefix, u64 lsn)              (prefixes ascending)
//! requests (v3)    u64 n, n × (u64 client, u64 seq, u64 forget-at ms,
//!                          u32 len, outcome as postcard)             (application order)
//! leases (v4)      u64 n, n × (u32 len, key, u64 token, u64 until ms) (keys ascending)
//! xids (v5)        u64 xmin floor,
//!                  tombstone count × (u64 xid, u64 min xmin)          (tombstone order)
//!                  prefix count × (u64 xid, u64 min xmin)             (prefix order)
//!                  u64 n, n × (u64 entry position, u64 xmin, u64 xmax,
//!                          u32 k, k × u64 running xid)  (fill snapshots; positions ascending)
//! checksum         u64                   xxh3-64 of every byte before it
//!
//! opt-log-id = u8 0 | u8 1, u64 term, u64 leader node id, u64 index
//! ```
//!
//! Version 1 has no source LSN per entry and no CDC section; it decodes as source LSN 0
//! and an empty [`CdcSnapshot`]. Versions 1 and 2 have no request section (exactly-once
//! writes); they decode with no remembered requests. Versions 1 to 3 have no lease
//! section (fill leases); they decode with no leases. Versions 1 to 4 have no xid section
//! (the exact fill guard): their tombstones decode with unknown invalidators
//! ([`UNKNOWN_XMIN`]: snapshot fills of those keys are refused while they are held), an
//! xmin floor of 0 and no fill snapshots.
//!
//! All integers are little-endian. The decoder checks magic, version and checksum before it
//! parses, then reads every field with bounds checks and validates the result (no duplicate
//! keys or node ids, versions not after the applied index, ...), so a truncated, corrupted
//! or foreign input is an error, never a panic or a huge allocation. A new layout gets a new
//! version number; the decoder keeps reading the old ones.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use bytes::{BufMut, Bytes, BytesMut};
use xxhash_rust::xxh3::xxh3_64;

use super::types::{
    CommittedLeaderId, LogId, Membership, ReplicaNode, SnapshotMeta, StoredMembership,
};
use crate::storage::{
    CdcSnapshot, Outcome, PartitionId, PartitionSnapshot, RequestId, SnapshotEntry, XidGuard,
    UNKNOWN_XMIN,
};
use raftcache_proto::pg_snapshot::PgSnapshot;

/// First bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"RCSNAP\0\0";
/// The format version [`encode`] writes.
pub const FORMAT_VERSION: u16 = 5;
/// The oldest format version [`decode`] reads.
pub const OLDEST_FORMAT_VERSION: u16 = 1;

/// Bytes of the trailing checksum.
const CHECKSUM_LEN: usize = 8;
/// The smallest encoding of one version-1 entry: two empty byte strings, version, no
/// deadline.
const MIN_ENTRY_LEN_V1: usize = 4 + 4 + 8 + 1;
/// The smallest encoding of one version-2 entry: a version-1 entry and its source LSN.
const MIN_ENTRY_LEN_V2: usize = MIN_ENTRY_LEN_V1 + 8;
/// The smallest encoding of one tombstone: an empty key, LSN, until.
const MIN_TOMBSTONE_LEN: usize = 4 + 8 + 8;
/// The smallest encoding of one prefix tombstone: an empty prefix, LSN.
const MIN_PREFIX_LEN: usize = 4 + 8;
/// The smallest encoding of one remembered request: ids, forget-at, an empty outcome.
const MIN_REQUEST_LEN: usize = 8 + 8 + 8 + 4;
/// The smallest encoding of one lease: an empty key, token, until.
const MIN_LEASE_LEN: usize = 4 + 8 + 8;

/// A decoded snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedSnapshot {
    /// The partition the snapshot belongs to.
    pub partition: PartitionId,
    /// Last log id and membership covered by the snapshot.
    pub meta: SnapshotMeta,
    /// The partition's replicated state.
    pub state: PartitionSnapshot,
}

/// Why bytes are not a valid snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The input does not start with [`MAGIC`].
    #[error("not a raftcache snapshot (bad magic)")]
    BadMagic,
    /// Written by a newer (or unknown) format version.
    #[error("unsupported snapshot format version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// The checksum does not match the content.
    #[error("snapshot checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    Checksum {
        /// The checksum in the snapshot.
        stored: u64,
        /// The checksum of the content read.
        computed: u64,
    },
    /// The input ended inside a field.
    #[error("snapshot truncated while reading {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// A field holds an impossible value.
    #[error("invalid snapshot: {what}")]
    Invalid {
        /// What is wrong.
        what: &'static str,
    },
    /// Bytes left between the last entry and the checksum.
    #[error("{len} unexpected bytes after the last snapshot entry")]
    TrailingBytes {
        /// How many.
        len: usize,
    },
}

/// Encodes a partition's state with the Raft metadata it covers, in [`FORMAT_VERSION`].
pub fn encode(partition: PartitionId, meta: &SnapshotMeta, state: &PartitionSnapshot) -> Bytes {
    encode_as(FORMAT_VERSION, partition, meta, state)
}

/// Encodes in format version 1 (no source LSNs, no CDC state: both are dropped), to test
/// that [`decode`] still reads it.
#[cfg(test)]
pub(crate) fn encode_v1(
    partition: PartitionId,
    meta: &SnapshotMeta,
    state: &PartitionSnapshot,
) -> Bytes {
    encode_as(1, partition, meta, state)
}

/// Encodes in an older format `version` (what it cannot hold is dropped), to test that
/// [`decode`] still reads it.
#[cfg(test)]
pub(crate) fn encode_version(
    version: u16,
    partition: PartitionId,
    meta: &SnapshotMeta,
    state: &PartitionSnapshot,
) -> Bytes {
    encode_as(version, partition, meta, state)
}

fn encode_as(
    version: u16,
    partition: PartitionId,
    meta: &SnapshotMeta,
    state: &PartitionSnapshot,
) -> Bytes {
    let v2 = version >= 2;
    let payload: usize = state
        .entries
        .iter()
        .map(|e| MIN_ENTRY_LEN_V2 + 8 + e.key.len() + e.value.len())
        .sum::<usize>()
        + state
            .cdc
            .tombstones
            .iter()
            .map(|(key, _, _, _)| MIN_TOMBSTONE_LEN + 16 + key.len())
            .sum::<usize>()
        + state
            .cdc
            .prefixes
            .iter()
            .map(|(prefix, _, _)| MIN_PREFIX_LEN + 16 + prefix.len())
            .sum::<usize>()
        + state
            .leases
            .iter()
            .map(|(key, _, _)| MIN_LEASE_LEN + key.len())
            .sum::<usize>();
    let mut buf = BytesMut::with_capacity(256 + payload);
    buf.put_slice(&MAGIC);
    buf.put_u16_le(version);
    buf.put_u32_le(partition.0);
    put_log_id(&mut buf, meta.last_log_id.as_ref());
    put_log_id(&mut buf, meta.last_membership.log_id().as_ref());
    let membership = meta.last_membership.membership();
    put_len(&mut buf, membership.get_joint_config().len());
    for config in membership.get_joint_config() {
        put_len(&mut buf, config.len());
        for id in config {
            buf.put_u64_le(*id);
        }
    }
    let nodes: Vec<_> = membership.nodes().collect();
    put_len(&mut buf, nodes.len());
    for (id, node) in nodes {
        buf.put_u64_le(*id);
        put_bytes(&mut buf, node.addr.as_bytes());
    }
    buf.put_u64_le(state.applied_index);
    buf.put_u64_le(state.entries.len() as u64);
    for e in &state.entries {
        put_bytes(&mut buf, &e.key);
        put_bytes(&mut buf, &e.value);
        buf.put_u64_le(e.version);
        match e.expire_at_ms {
            None => buf.put_u8(0),
            Some(at) => {
                buf.put_u8(1);
                buf.put_u64_le(at);
            }
        }
        if v2 {
            buf.put_u64_le(e.source_lsn);
        }
    }
    if v2 {
        let cdc = &state.cdc;
        buf.put_u64_le(cdc.watermark);
        buf.put_u64_le(cdc.fence);
        buf.put_u64_le(cdc.floor);
        buf.put_u64_le(cdc.tombstones.len() as u64);
        for (key, lsn, until_ms, _) in &cdc.tombstones {
            put_bytes(&mut buf, key);
            buf.put_u64_le(*lsn);
            buf.put_u64_le(*until_ms);
        }
        buf.put_u64_le(cdc.prefixes.len() as u64);
        for (prefix, lsn, _) in &cdc.prefixes {
            put_bytes(&mut buf, prefix);
            buf.put_u64_le(*lsn);
        }
    }
    if version >= 3 {
        buf.put_u64_le(state.requests.len() as u64);
        for (id, until, outcome) in &state.requests {
            buf.put_u64_le(id.client);
            buf.put_u64_le(id.seq);
            buf.put_u64_le(*until);
            // An outcome is a few integers: encoding it into a Vec cannot fail.
            let bytes = postcard::to_allocvec(outcome).unwrap_or_default();
            put_bytes(&mut buf, &bytes);
        }
    }
    if version >= 4 {
        buf.put_u64_le(state.leases.len() as u64);
        for (key, token, until_ms) in &state.leases {
            put_bytes(&mut buf, key);
            buf.put_u64_le(*token);
            buf.put_u64_le(*until_ms);
        }
    }
    if version >= 5 {
        let cdc = &state.cdc;
        buf.put_u64_le(cdc.xmin_floor);
        let guards = cdc.tombstones.iter().map(|(_, _, _, g)| g);
        for guard in guards.chain(cdc.prefixes.iter().map(|(_, _, g)| g)) {
            buf.put_u64_le(guard.xid);
            buf.put_u64_le(guard.min_xmin);
        }
        let fills: Vec<(usize, &PgSnapshot)> = state
            .entries
            .iter()
            .enumerate()
            .filter_map(|(at, e)| e.fill.as_ref().map(|f| (at, f)))
            .collect();
        buf.put_u64_le(fills.len() as u64);
        for (at, fill) in fills {
            buf.put_u64_le(at as u64);
            buf.put_u64_le(fill.xmin());
            buf.put_u64_le(fill.xmax());
            put_len(&mut buf, fill.xip().len());
            for x in fill.xip() {
                buf.put_u64_le(*x);
            }
        }
    }
    let checksum = xxh3_64(&buf);
    buf.put_u64_le(checksum);
    buf.freeze()
}

/// Decodes and validates a snapshot written by [`encode`].
///
/// Keys and values are copied into buffers of exactly their size, so the restored state does
/// not pin the snapshot buffer.
///
/// # Errors
///
/// Any [`SnapshotError`]: wrong magic or version, checksum mismatch, truncation, an invalid
/// field or trailing bytes.
pub fn decode(bytes: &[u8]) -> Result<DecodedSnapshot, SnapshotError> {
    let mut r = Reader { buf: bytes };
    if r.take(MAGIC.len(), "magic").ok() != Some(&MAGIC[..]) {
        return Err(SnapshotError::BadMagic);
    }
    let version = r.u16("format version")?;
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(SnapshotError::UnsupportedVersion { version });
    }
    let body_len = bytes
        .len()
        .checked_sub(CHECKSUM_LEN)
        .filter(|&n| n >= MAGIC.len() + 2)
        .ok_or(SnapshotError::Truncated { field: "checksum" })?;
    let (body, stored) = bytes.split_at(body_len);
    let stored = Reader { buf: stored }.u64("checksum")?;
    let computed = xxh3_64(body);
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    let mut r = Reader {
        buf: &body[MAGIC.len() + 2..],
    };
    let decoded = decode_body(&mut r, version)?;
    if !r.buf.is_empty() {
        return Err(SnapshotError::TrailingBytes { len: r.buf.len() });
    }
    Ok(decoded)
}

/// Everything after magic and version, before the checksum, in format `version` (1 to 4).
fn decode_body(r: &mut Reader<'_>, version: u16) -> Result<DecodedSnapshot, SnapshotError> {
    let v2 = version >= 2;
    let partition = PartitionId(r.u32("partition id")?);
    let last_log_id = r.log_id("last log id")?;
    let membership_log_id = r.log_id("membership log id")?;
    if membership_log_id.is_some() && membership_log_id > last_log_id {
        return Err(invalid("membership log id after the last log id"));
    }

    let config_count = r.u32("membership config count")?;
    let mut configs = Vec::new();
    for _ in 0..config_count {
        let voters = r.u32("voter count")?;
        let mut config = BTreeSet::new();
        for _ in 0..voters {
            if !config.insert(r.u64("voter id")?) {
                return Err(invalid("duplicate voter id"));
            }
        }
        configs.push(config);
    }
    let node_count = r.u32("node count")?;
    let mut nodes = BTreeMap::new();
    for _ in 0..node_count {
        let id = r.u64("node id")?;
        let addr = std::str::from_utf8(r.bytes("node address")?)
            .map_err(|_| invalid("node address is not UTF-8"))?;
        let node = ReplicaNode {
            addr: addr.to_owned(),
        };
        if nodes.insert(id, node).is_some() {
            return Err(invalid("duplicate node id"));
        }
    }
    let membership =
        Membership::new(configs, nodes).map_err(|_| invalid("voter without a node"))?;

    let applied_index = r.u64("applied index")?;
    if applied_index > last_log_id.as_ref().map_or(0, |id| id.index) {
        return Err(invalid("applied index after the last log id"));
    }
    let count = r.u64("entry count")?;
    let min_entry_len = if v2 {
        MIN_ENTRY_LEN_V2
    } else {
        MIN_ENTRY_LEN_V1
    };
    let possible = r.buf.len() / min_entry_len;
    if count > possible as u64 {
        return Err(SnapshotError::Truncated { field: "entries" });
    }
    // `count <= possible`, a usize.
    let mut entries = Vec::with_capacity(possible.min(count as usize));
    let mut keys = HashSet::with_capacity(entries.capacity());
    for _ in 0..count {
        let key = r.bytes("key")?;
        let value = r.bytes("value")?;
        let version = r.u64("version")?;
        let expire_at_ms = match r.u8("deadline flag")? {
            0 => None,
            1 => Some(r.u64("deadline")?),
            _ => return Err(invalid("deadline flag is not 0 or 1")),
        };
        let source_lsn = if v2 { r.u64("source lsn")? } else { 0 };
        if version == 0 || version > applied_index {
            return Err(invalid("entry version outside 1..=applied index"));
        }
        if !keys.insert(key) {
            return Err(invalid("duplicate key"));
        }
        entries.push(SnapshotEntry {
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            version,
            expire_at_ms,
            source_lsn,
            fill: None,
        });
    }
    let mut cdc = if v2 {
        decode_cdc(r)?
    } else {
        CdcSnapshot::default()
    };
    let requests = if version >= 3 {
        decode_requests(r)?
    } else {
        Vec::new()
    };
    let leases = if version >= 4 {
        decode_leases(r, applied_index)?
    } else {
        Vec::new()
    };
    if version >= 5 {
        decode_xids(r, &mut cdc, &mut entries)?;
    }
    Ok(DecodedSnapshot {
        partition,
        meta: SnapshotMeta {
            last_log_id,
            last_membership: StoredMembership::new(membership_log_id, membership),
        },
        state: PartitionSnapshot {
            applied_index,
            entries,
            cdc,
            requests,
            leases,
        },
    })
}

/// The CDC section of a version-2 snapshot.
fn decode_cdc(r: &mut Reader<'_>) -> Result<CdcSnapshot, SnapshotError> {
    let watermark = r.u64("cdc watermark")?;
    let fence = r.u64("cdc fence")?;
    let floor = r.u64("tombstone floor")?;

    let count = r.u64("tombstone count")?;
    let possible = r.buf.len() / MIN_TOMBSTONE_LEN;
    if count > possible as u64 {
        return Err(SnapshotError::Truncated {
            field: "tombstones",
        });
    }
    // Before version 5 the invalidating transactions are unknown; version 5 fills them in.
    let unknown = XidGuard {
        xid: 0,
        min_xmin: UNKNOWN_XMIN,
    };
    // `count <= possible`, a usize.
    let mut tombstones: Vec<(Bytes, u64, u64, XidGuard)> = Vec::with_capacity(count as usize);
    let mut previous: Option<&[u8]> = None;
    for _ in 0..count {
        let key = r.bytes("tombstone key")?;
        let lsn = r.u64("tombstone lsn")?;
        let until_ms = r.u64("tombstone until")?;
        if previous.is_some_and(|p| p >= key) {
            return Err(invalid("tombstone keys not strictly ascending"));
        }
        previous = Some(key);
        tombstones.push((Bytes::copy_from_slice(key), lsn, until_ms, unknown));
    }

    let count = r.u64("prefix count")?;
    let possible = r.buf.len() / MIN_PREFIX_LEN;
    if count > possible as u64 {
        return Err(SnapshotError::Truncated { field: "prefixes" });
    }
    let mut prefixes: Vec<(Bytes, u64, XidGuard)> = Vec::with_capacity(count as usize);
    let mut previous: Option<&[u8]> = None;
    for _ in 0..count {
        let prefix = r.bytes("prefix")?;
        let lsn = r.u64("prefix lsn")?;
        if previous.is_some_and(|p| p >= prefix) {
            return Err(invalid("tombstone prefixes not strictly ascending"));
        }
        previous = Some(prefix);
        prefixes.push((Bytes::copy_from_slice(prefix), lsn, unknown));
    }
    Ok(CdcSnapshot {
        watermark,
        fence,
        floor,
        xmin_floor: 0,
        tombstones,
        prefixes,
    })
}

/// The xid section of a version-5 snapshot: the guards of the tombstones and prefixes
/// decoded before it, the xmin floor and the entries' fill snapshots.
fn decode_xids(
    r: &mut Reader<'_>,
    cdc: &mut CdcSnapshot,
    entries: &mut [SnapshotEntry],
) -> Result<(), SnapshotError> {
    cdc.xmin_floor = r.u64("xmin floor")?;
    let guards = cdc.tombstones.iter_mut().map(|(_, _, _, g)| g);
    for guard in guards.chain(cdc.prefixes.iter_mut().map(|(_, _, g)| g)) {
        *guard = XidGuard {
            xid: r.u64("tombstone xid")?,
            min_xmin: r.u64("tombstone min xmin")?,
        };
    }
    let count = r.u64("fill count")?;
    if count > entries.len() as u64 {
        return Err(invalid("more fill snapshots than entries"));
    }
    let mut previous: Option<u64> = None;
    for _ in 0..count {
        let at = r.u64("fill entry position")?;
        if previous.is_some_and(|p| p >= at) {
            return Err(invalid("fill entry positions not strictly ascending"));
        }
        previous = Some(at);
        let xmin = r.u64("fill xmin")?;
        let xmax = r.u64("fill xmax")?;
        let k = r.u32("fill running count")?;
        if k as usize > raftcache_proto::pg_snapshot::MAX_XIP || (k as usize) > r.buf.len() / 8 {
            return Err(SnapshotError::Truncated {
                field: "fill running xids",
            });
        }
        let mut xip = Vec::with_capacity(k as usize);
        for _ in 0..k {
            xip.push(r.u64("fill running xid")?);
        }
        let snapshot =
            PgSnapshot::new(xmin, xmax, xip).map_err(|_| invalid("fill snapshot is not valid"))?;
        let entry = usize::try_from(at)
            .ok()
            .and_then(|at| entries.get_mut(at))
            .ok_or_else(|| invalid("fill entry position out of range"))?;
        entry.fill = Some(snapshot);
    }
    Ok(())
}

/// The request section of a version-3 snapshot.
fn decode_requests(r: &mut Reader<'_>) -> Result<Vec<(RequestId, u64, Outcome)>, SnapshotError> {
    let count = r.u64("request count")?;
    let possible = r.buf.len() / MIN_REQUEST_LEN;
    if count > possible as u64 {
        return Err(SnapshotError::Truncated { field: "requests" });
    }
    let mut requests = Vec::with_capacity(count as usize);
    let mut seen = HashSet::with_capacity(requests.capacity());
    for _ in 0..count {
        let id = RequestId {
            client: r.u64("request client")?,
            seq: r.u64("request seq")?,
        };
        let until = r.u64("request forget-at")?;
        let outcome: Outcome = postcard::from_bytes(r.bytes("request outcome")?)
            .map_err(|_| invalid("request outcome does not decode"))?;
        if !seen.insert(id) {
            return Err(invalid("duplicate request id"));
        }
        requests.push((id, until, outcome));
    }
    Ok(requests)
}

/// The lease section of a version-4 snapshot. A token is the log index of its grant, so
/// it lies in `1..=applied_index`.
fn decode_leases(
    r: &mut Reader<'_>,
    applied_index: u64,
) -> Result<Vec<(Bytes, u64, u64)>, SnapshotError> {
    let count = r.u64("lease count")?;
    let possible = r.buf.len() / MIN_LEASE_LEN;
    if count > possible as u64 {
        return Err(SnapshotError::Truncated { field: "leases" });
    }
    // `count <= possible`, a usize.
    let mut leases: Vec<(Bytes, u64, u64)> = Vec::with_capacity(count as usize);
    let mut previous: Option<&[u8]> = None;
    for _ in 0..count {
        let key = r.bytes("lease key")?;
        let token = r.u64("lease token")?;
        let until_ms = r.u64("lease until")?;
        if previous.is_some_and(|p| p >= key) {
            return Err(invalid("lease keys not strictly ascending"));
        }
        if token == 0 || token > applied_index {
            return Err(invalid("lease token outside 1..=applied index"));
        }
        previous = Some(key);
        leases.push((Bytes::copy_from_slice(key), token, until_ms));
    }
    Ok(leases)
}

fn invalid(what: &'static str) -> SnapshotError {
    SnapshotError::Invalid { what }
}

fn put_len(buf: &mut BytesMut, len: usize) {
    // Keys (<= 1 MiB) and values (<= 512 MiB) are bounded by the config ceilings in
    // `crate::config`, membership sizes by the cluster size: a length over 4 GiB is a bug.
    let len = u32::try_from(len).expect("snapshot field longer than u32::MAX");
    buf.put_u32_le(len);
}

fn put_bytes(buf: &mut BytesMut, bytes: &[u8]) {
    put_len(buf, bytes.len());
    buf.put_slice(bytes);
}

fn put_log_id(buf: &mut BytesMut, id: Option<&LogId>) {
    match id {
        None => buf.put_u8(0),
        Some(id) => {
            buf.put_u8(1);
            buf.put_u64_le(id.leader_id.term);
            buf.put_u64_le(id.leader_id.node_id);
            buf.put_u64_le(id.index);
        }
    }
}

/// Checked little-endian reads from a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], SnapshotError> {
        if self.buf.len() < n {
            return Err(SnapshotError::Truncated { field });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], SnapshotError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], SnapshotError> {
        let len = self.u32(field)?;
        let len = usize::try_from(len).map_err(|_| SnapshotError::Truncated { field })?;
        self.take(len, field)
    }

    fn log_id(&mut self, field: &'static str) -> Result<Option<LogId>, SnapshotError> {
        match self.u8(field)? {
            0 => Ok(None),
            1 => {
                let term = self.u64(field)?;
                let node_id = self.u64(field)?;
                let index = self.u64(field)?;
                Ok(Some(LogId::new(CommittedLeaderId { term, node_id }, index)))
            }
            _ => Err(invalid("log id flag is not 0 or 1")),
        }
    }
}
