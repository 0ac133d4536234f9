//! The near cache's state, as sync code over an injected [`Clock`]: the LRU of values,
//! the tracking state of every partition, the hot-key set and the fill tickets. The
//! async parts ([`super::driver`], the client's read path) only call into it under
//! one mutex; every rule of the [module docs](super) is enforced here, so the unit
//! tests (`store_test.rs`) cover them without a network.

use super::{NearMode, NearStats};
use crate::client::Value;
use crate::lsn::Lsn;
use bytes::Bytes;
use lru::LruCache;
use raftcache_proto::v1;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

/// What an entry costs beyond its key and value bytes: the LRU node and its hash slot,
/// the entry's fields and the key's copy in the partition index (estimated).
pub(crate) const ENTRY_OVERHEAD: u64 = 160;

/// Where the store reads the time (tests drive it by hand).
pub(crate) trait Clock: Send + Sync + fmt::Debug {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The monotonic clock of the process.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The bounds and mode the store enforces (from [`super::NearCacheConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// The most entries.
    pub(crate) capacity: usize,
    /// The most bytes (keys, values and [`ENTRY_OVERHEAD`] per entry).
    pub(crate) max_bytes: u64,
    /// The longest an entry is kept.
    pub(crate) max_ttl: Duration,
    /// All keys, or only hot ones.
    pub(crate) mode: NearMode,
}

/// The tracking state of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Track {
    /// Not tracked (no stream, or its SYNC has not arrived, or it was lost): nothing of
    /// the partition is cached, read from or filled into the near cache.
    #[default]
    Unsynced,
    /// The stream at `node` tracks the partition; `seq` is the last change sequence
    /// seen (the SYNC's, then each CHANGE's).
    Synced {
        /// The node whose stream tracks it.
        node: u64,
        /// The partition's change sequence as far as this client knows.
        seq: u64,
    },
}

/// What the store knows of one partition.
#[derive(Debug, Default)]
struct Partition {
    /// The subscription (one `Watch` stream) meant to track the partition, and its
    /// node; events of any other subscription are ignored.
    sub: Option<(u64, u64)>,
    track: Track,
    /// Bumped whenever the partition's entries are dropped as a whole (gap, RESET,
    /// stream lost, resubscription): tickets taken before are void.
    generation: u64,
    /// The cached keys of the partition (for gaps, resets and prefix invalidations).
    keys: BTreeSet<Bytes>,
}

/// One cached value.
#[derive(Debug, Clone)]
struct Entry {
    value: Bytes,
    version: u64,
    source_lsn: Lsn,
    partition: u32,
    /// When the near cache forgets it: the fill plus min(server TTL, `max_ttl`).
    expires_at: Instant,
    /// When the key expires on the server (for [`Value::ttl`]); `None`: no TTL.
    server_deadline: Option<Instant>,
    /// What it counts against `max_bytes`.
    size: u64,
}

/// The fill tickets outstanding for one key.
#[derive(Debug)]
struct Pending {
    /// The key's partition (the ring puts a key in one partition).
    partition: u32,
    tickets: usize,
    /// The stamp of the last invalidation of the key: tickets stamped at or before it
    /// only fill a version of at least `floor`.
    voided: u64,
    /// The highest change sequence that invalidated the key since its first
    /// outstanding ticket (`u64::MAX` for a write of this client, whose version is not
    /// known here). A value's version is the log index of the write that made it, and a
    /// change's sequence the log index of the change, so a value read at a version at
    /// or above it already reflects that change.
    floor: u64,
}

/// A promise to fill `key` with what a remote read returns, valid only while nothing
/// invalidated the key or its partition since it was taken (see
/// [`Store::begin_fill`]). Hand it back to [`Store::complete_fill`] or
/// [`Store::abandon`].
#[derive(Debug)]
pub(crate) struct Ticket {
    key: Bytes,
    partition: u32,
    generation: u64,
    stamp: u64,
}

/// The counters of [`NearStats`].
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    hits: u64,
    misses: u64,
    invalidations: u64,
    gaps: u64,
    resets: u64,
    evictions: u64,
}

/// What an event did (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// From a subscription that no longer tracks the partition, or malformed.
    Ignored,
    /// SYNC: the partition is tracked from this sequence on.
    Synced,
    /// CHANGE in sequence; this many entries were removed.
    Changed(usize),
    /// CHANGE after missed changes: the partition's entries were dropped.
    Gap,
    /// RESET: the partition's entries were dropped, it waits for a SYNC.
    Reset,
}

/// The near cache's state (see the module docs).
pub(crate) struct Store {
    limits: Limits,
    /// Unbounded in the crate's sense: [`Store::make_room`] enforces both bounds, so
    /// that every removal also updates the byte count and the partition index.
    lru: LruCache<Bytes, Entry>,
    bytes: u64,
    partitions: HashMap<u32, Partition>,
    pending: HashMap<Bytes, Pending>,
    /// The stamp of the last ticket or invalidation.
    stamp: u64,
    /// The last generation given to any partition (unique across partitions and time).
    generations: u64,
    /// The keys nodes reported hot (used in [`NearMode::Hot`]).
    hot: HashSet<Bytes>,
    counters: Counters,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("limits", &self.limits)
            .field("entries", &self.lru.len())
            .field("bytes", &self.bytes)
            .field("partitions", &self.partitions.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Store {
    pub(crate) fn new(limits: Limits) -> Store {
        Store {
            limits,
            lru: LruCache::unbounded(),
            bytes: 0,
            partitions: HashMap::new(),
            pending: HashMap::new(),
            stamp: 0,
            generations: 0,
            hot: HashSet::new(),
            counters: Counters::default(),
        }
    }

    /// The cached value of `key` if it is live and its partition tracked (and marks it
    /// recently used); counts a hit or a miss.
    pub(crate) fn get(&mut self, key: &[u8], now: Instant) -> Option<Value> {
        let found = match self.lru.get(key) {
            Some(e) if e.expires_at > now => {
                let tracked = self
                    .partitions
                    .get(&e.partition)
                    .is_some_and(|p| matches!(p.track, Track::Synced { .. }));
                tracked.then(|| Value {
                    value: e.value.clone(),
                    version: e.version,
                    ttl: e.server_deadline.map(|d| d.saturating_duration_since(now)),
                    source_lsn: e.source_lsn,
                })
            }
            Some(_) => {
                self.remove(key);
                None
            }
            None => None,
        };
        if found.is_some() {
            self.counters.hits += 1;
            metrics::counter!("raftcache_client_near_hits_total").increment(1);
        } else {
            self.counters.misses += 1;
            metrics::counter!("raftcache_client_near_misses_total").increment(1);
        }
        found
    }

    /// A ticket to fill `key` (of `partition`) after a remote read, or `None` when the
    /// value must not be cached: the partition is not tracked, or the mode is
    /// [`NearMode::Hot`] and the key is not hot. Take it *before* sending the read.
    pub(crate) fn begin_fill(&mut self, key: &[u8], partition: u32) -> Option<Ticket> {
        if self.limits.capacity == 0 || !self.wanted(key) {
            return None;
        }
        let p = self.partitions.get(&partition)?;
        if !matches!(p.track, Track::Synced { .. }) {
            return None;
        }
        let generation = p.generation;
        self.stamp += 1;
        let key = Bytes::copy_from_slice(key);
        self.pending
            .entry(key.clone())
            .or_insert(Pending {
                partition,
                tickets: 0,
                voided: 0,
                floor: 0,
            })
            .tickets += 1;
        Some(Ticket {
            key,
            partition,
            generation,
            stamp: self.stamp,
        })
    }

    /// Caches what the remote read of `ticket`'s key returned (`None`: not found, which
    /// is not cached) if the ticket is still valid: no invalidation of the key, gap,
    /// RESET, lost stream or resubscription of its partition since it was taken. True
    /// when the value was stored.
    pub(crate) fn complete_fill(
        &mut self,
        ticket: Ticket,
        value: Option<&Value>,
        now: Instant,
    ) -> bool {
        let floor = self.release(&ticket);
        let Some(value) = value else {
            return false;
        };
        let valid = floor.is_some_and(|floor| value.version >= floor);
        let tracked = self.partitions.get(&ticket.partition).is_some_and(|p| {
            p.generation == ticket.generation && matches!(p.track, Track::Synced { .. })
        });
        if !(valid && tracked && self.wanted(&ticket.key)) {
            return false;
        }
        self.insert(ticket.key, ticket.partition, value, now)
    }

    /// Gives a ticket back without filling (the remote read failed).
    pub(crate) fn abandon(&mut self, ticket: &Ticket) {
        self.release(ticket);
    }

    /// Removes `key` and voids its outstanding tickets (around a write of this
    /// client). True when an entry was removed.
    pub(crate) fn invalidate(&mut self, key: &[u8]) -> bool {
        self.invalidate_at(key, u64::MAX)
    }

    /// Removes `key` unless its cached version is at least `seq` (it was written by the
    /// change at `seq` or after it), and voids its outstanding tickets for values below
    /// `seq`. True when an entry was removed.
    fn invalidate_at(&mut self, key: &[u8], seq: u64) -> bool {
        if let Some(p) = self.pending.get_mut(key) {
            p.voided = self.stamp;
            p.floor = p.floor.max(seq);
        }
        let stale = self.lru.peek(key).is_some_and(|e| e.version < seq);
        let removed = stale && self.remove(key).is_some();
        if removed {
            self.counters.invalidations += 1;
            metrics::counter!("raftcache_client_near_invalidations_total").increment(1);
        }
        removed
    }

    /// [`Store::invalidate_at`] for every key of `partition` starting with `prefix`
    /// (all of them for an empty prefix); returns how many entries went.
    fn invalidate_prefix(&mut self, partition: u32, prefix: &[u8], seq: u64) -> usize {
        let stamp = self.stamp;
        for (key, p) in &mut self.pending {
            if p.partition == partition && key.starts_with(prefix) {
                p.voided = stamp;
                p.floor = p.floor.max(seq);
            }
        }
        let keys: Vec<Bytes> = match self.partitions.get(&partition) {
            Some(p) => p
                .keys
                .range::<[u8], _>((
                    std::ops::Bound::Included(prefix),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|k| k.starts_with(prefix))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        keys.iter()
            .filter(|key| self.invalidate_at(key, seq))
            .count()
    }

    /// Makes `sub` (a stream at `node`) the one that tracks `partition`, or none; a
    /// change drops the partition's entries and leaves it unsynced until that
    /// stream's SYNC. No-op when it already is.
    pub(crate) fn assign(&mut self, partition: u32, sub: Option<(u64, u64)>) {
        let current = self.partitions.get(&partition).and_then(|p| p.sub);
        if current == sub {
            return;
        }
        self.drop_partition(partition);
        // Kept even when unwatched: its generation must never repeat.
        self.partitions.entry(partition).or_default().sub = sub;
    }

    /// Applies one event of subscription `sub`.
    pub(crate) fn apply(&mut self, sub: u64, event: &v1::WatchEvent) -> Applied {
        let partition = event.partition;
        let Some(p) = self.partitions.get(&partition) else {
            return Applied::Ignored;
        };
        let (node, current) = match p.sub {
            Some((s, node)) if s == sub => (node, p.track),
            _ => return Applied::Ignored,
        };
        match v1::WatchEventKind::try_from(event.kind) {
            Ok(v1::WatchEventKind::Sync) => {
                if current
                    != (Track::Synced {
                        node,
                        seq: event.seq,
                    })
                {
                    // A first SYNC, or a new starting point: whatever was cached under
                    // the old one may have missed changes.
                    self.drop_partition(partition);
                }
                self.set_track(
                    partition,
                    Track::Synced {
                        node,
                        seq: event.seq,
                    },
                );
                Applied::Synced
            }
            Ok(v1::WatchEventKind::Change) => {
                let Track::Synced { seq, .. } = current else {
                    // Nothing is cached for an unsynced partition; its SYNC comes first.
                    return Applied::Ignored;
                };
                let gap = event.prev_seq != seq;
                if gap {
                    self.drop_partition(partition);
                    self.counters.gaps += 1;
                    metrics::counter!("raftcache_client_near_gaps_total").increment(1);
                }
                self.set_track(
                    partition,
                    Track::Synced {
                        node,
                        seq: event.seq,
                    },
                );
                let mut removed = 0;
                for key in &event.keys {
                    removed += usize::from(self.invalidate_at(key, event.seq));
                }
                for prefix in &event.prefixes {
                    removed += self.invalidate_prefix(partition, prefix, event.seq);
                }
                if gap {
                    Applied::Gap
                } else {
                    Applied::Changed(removed)
                }
            }
            Ok(v1::WatchEventKind::Reset) => {
                self.drop_partition(partition);
                self.counters.resets += 1;
                metrics::counter!("raftcache_client_near_resets_total").increment(1);
                Applied::Reset
            }
            Ok(v1::WatchEventKind::Unspecified) | Err(_) => Applied::Ignored,
        }
    }

    /// The stream of `sub` failed or ended: every partition it tracked is dropped and
    /// unsynced (it keeps `sub`, whose events can no longer come, until the driver
    /// assigns a new stream). Returns how many partitions it tracked.
    pub(crate) fn stream_lost(&mut self, sub: u64) -> usize {
        let lost: Vec<u32> = self
            .partitions
            .iter()
            .filter(|(_, p)| p.sub.is_some_and(|(s, _)| s == sub))
            .map(|(&id, _)| id)
            .collect();
        for &partition in &lost {
            self.drop_partition(partition);
        }
        lost.len()
    }

    /// Replaces the hot-key set; in [`NearMode::Hot`], entries of keys no longer hot go.
    pub(crate) fn set_hot(&mut self, hot: HashSet<Bytes>) {
        self.hot = hot;
        if self.limits.mode == NearMode::Hot {
            let cold: Vec<Bytes> = self
                .lru
                .iter()
                .filter(|(k, _)| !self.hot.contains(*k))
                .map(|(k, _)| k.clone())
                .collect();
            for key in cold {
                self.remove(&key);
            }
        }
    }

    /// The tracking state of `partition`.
    #[cfg(test)]
    pub(crate) fn track(&self, partition: u32) -> Track {
        self.partitions
            .get(&partition)
            .map_or(Track::Unsynced, |p| p.track)
    }

    /// The figures so far.
    pub(crate) fn stats(&self) -> NearStats {
        let c = self.counters;
        NearStats {
            hits: c.hits,
            misses: c.misses,
            entries: self.lru.len() as u64,
            bytes: self.bytes,
            invalidations: c.invalidations,
            gaps: c.gaps,
            resets: c.resets,
            evictions: c.evictions,
            synced_partitions: self
                .partitions
                .values()
                .filter(|p| matches!(p.track, Track::Synced { .. }))
                .count() as u64,
        }
    }

    /// Whether `key` may be cached at all under the mode.
    fn wanted(&self, key: &[u8]) -> bool {
        self.limits.mode == NearMode::All || self.hot.contains(key)
    }

    fn set_track(&mut self, partition: u32, track: Track) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.track = track;
        }
    }

    /// Drops every entry of `partition`, voids its tickets and unsyncs it.
    fn drop_partition(&mut self, partition: u32) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        self.generations += 1;
        p.generation = self.generations;
        p.track = Track::Unsynced;
        let keys = std::mem::take(&mut p.keys);
        for key in keys {
            if let Some(e) = self.lru.pop(&key) {
                self.bytes -= e.size;
            }
        }
    }

    /// Stores a fill, keeping the newer version when the key is already cached.
    fn insert(&mut self, key: Bytes, partition: u32, value: &Value, now: Instant) -> bool {
        // An exact-size copy: a value decoded from a gRPC frame may share (and pin) the
        // whole frame's buffer, which `max_bytes` would not see.
        let stored = Bytes::copy_from_slice(&value.value);
        let size = key.len() as u64 + stored.len() as u64 + ENTRY_OVERHEAD;
        if size > self.limits.max_bytes {
            return false;
        }
        if let Some(e) = self.lru.peek(&key) {
            if e.version > value.version {
                return false;
            }
            self.remove(&key);
        }
        self.make_room(size);
        let keep = value
            .ttl
            .map_or(self.limits.max_ttl, |t| t.min(self.limits.max_ttl));
        let entry = Entry {
            value: stored,
            version: value.version,
            source_lsn: value.source_lsn,
            partition,
            expires_at: now + keep,
            server_deadline: value.ttl.map(|t| now + t),
            size,
        };
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.keys.insert(key.clone());
        }
        self.bytes += size;
        self.lru.push(key, entry);
        true
    }

    /// Evicts least recently used entries until one of `size` bytes fits.
    fn make_room(&mut self, size: u64) {
        while !self.lru.is_empty()
            && (self.lru.len() >= self.limits.capacity || self.bytes + size > self.limits.max_bytes)
        {
            let Some((key, e)) = self.lru.pop_lru() else {
                break;
            };
            self.bytes -= e.size;
            if let Some(p) = self.partitions.get_mut(&e.partition) {
                p.keys.remove(&key);
            }
            self.counters.evictions += 1;
        }
    }

    /// Removes one entry, keeping the byte count and the partition index right.
    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let e = self.lru.pop(key)?;
        self.bytes -= e.size;
        if let Some(p) = self.partitions.get_mut(&e.partition) {
            p.keys.remove(key);
        }
        Some(e)
    }

    /// Ends a ticket; returns the lowest version it may still fill (0 unless its key
    /// was invalidated after it was taken).
    fn release(&mut self, ticket: &Ticket) -> Option<u64> {
        let p = self.pending.get_mut(&ticket.key)?;
        let floor = if p.voided < ticket.stamp { 0 } else { p.floor };
        p.tickets -= 1;
        if p.tickets == 0 {
            self.pending.remove(&ticket.key);
        }
        Some(floor)
    }

    /// How many tickets are outstanding (tests: none leak).
    #[cfg(test)]
    pub(crate) fn pending_tickets(&self) -> usize {
        self.pending.values().map(|p| p.tickets).sum()
    }
}
