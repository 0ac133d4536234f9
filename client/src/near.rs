//! An opt-in near cache: values kept in the client process, kept correct by the
//! nodes' `Watch` streams (set [`ClientConfig::near_cache`](crate::ClientConfig)).
//!
//! A read served from process memory costs a hash lookup instead of a round trip.
//! The price is staleness, which this module bounds: a cached value is dropped when
//! the node that leads its partition reports a change of the key, when the client
//! cannot be sure it saw every change, and at the latest after `max_ttl`.
//!
//! # What is cached
//! A bounded LRU (the `lru` crate) of key → (value, version, partition, deadline),
//! bounded by [`NearCacheConfig::capacity`] entries and [`NearCacheConfig::max_bytes`]
//! (keys, values and a fixed per-entry overhead; values are copied to exact size so a
//! cached value never pins a gRPC frame). An entry's deadline is the fill time plus
//! min(the TTL the node reported, `max_ttl`): a key without a TTL is still re-read
//! after `max_ttl`. Keys that do not exist are not cached. In [`NearMode::Hot`] only
//! keys some node reports among its hot keys (`StatsResponse.hot_keys`, polled from
//! every node each `hot_refresh`) are stored, and keys that stop being hot are dropped.
//!
//! # Which reads use it
//! Only [`Client::get`](crate::Client::get), [`Client::get_with`](crate::Client::get_with)
//! and [`Client::mget_with`](crate::Client::mget_with) at the default level
//! ([`Consistency::Lease`]) without `min_lsn`. LINEARIZABLE
//! and FOLLOWER reads, `min_lsn` reads and TTL reads (no value) always go to a node
//! and never fill the near cache. Every write of this client
//! (set/set_with/set_if_newer/delete/incr/expire) removes the key from the near cache
//! before and after its remote call, so the client reads its own writes.
//!
//! # Tracking: one Watch stream per node
//! Each partition is Unsynced, or Synced{node, seq}; only Synced partitions are served
//! from or filled into the near cache. A background task per client (the *driver*,
//! ended when the client is dropped) compares every ~500 ms the client's routing table
//! (cached cluster map + leader cache) with its plan: every partition is watched at its
//! current *leader*, one `Watch` stream per node carrying all the partitions it leads.
//! When a node's set of partitions changes, its stream is reopened with the new set and
//! those partitions start over (entries dropped, Unsynced until the new stream's SYNC).
//! Streams run on their own HTTP/2 connection with keepalive pings (2 s, 3 s timeout),
//! so a dead or frozen node is noticed within ~5 s.
//!
//! Events of a stream:
//! - SYNC(seq): the partition is Synced at `seq`.
//! - CHANGE(prev_seq → seq, keys, prefixes): if `prev_seq` is not the sequence the
//!   client knows, changes were missed — a *gap*: every entry (and fill ticket) of the
//!   partition is dropped, `gaps` counts it, and `seq` is adopted. Then the named keys
//!   and every cached key of the partition under one of the prefixes are removed.
//! - RESET: entries dropped, Unsynced until the next SYNC.
//! - Error or end of the stream: all its partitions dropped and Unsynced; the driver
//!   asks the client to refresh its cluster map and reconnects with jittered exponential
//!   back-off (50 ms doubling to 2 s; 10 s for a node without `Watch`).
//!
//! # The fill race and tickets
//! A miss reads the key from the node, then caches the answer. Without care this
//! can cache an old value for good: the read is served, *then* a write changes the key,
//! its CHANGE event arrives and removes nothing (nothing cached yet), *then* the old
//! answer arrives and is cached. So a miss first takes a *fill ticket* (recording the
//! key and its partition's generation), before sending the read; an invalidation of the
//! key, a gap, a RESET, a lost stream or a resubscription of the partition in between
//! voids the ticket, and `complete_fill` caches the answer only with a valid ticket.
//! Either the change's event arrives before the answer (the ticket is void: nothing is
//! cached), or after it (the event removes the cached entry). The same holds for this
//! client's own writes, which invalidate before and after their remote call. Two fills
//! of one key keep the higher version.
//!
//! A value's version is the log index of the write that made it, and a CHANGE's `seq`
//! the log index of the change (one index space per partition). So an invalidation at
//! `seq` spares a cached value, or a ticket's answer, whose version is at least `seq`:
//! it already reflects that change. Without this, the event of a write that happened
//! *before* a read but arrived after its answer would void a correct fill.
//!
//! What remains is the delay of the event itself: another client's write is seen here
//! once its CHANGE arrives (normally within a millisecond on a LAN), and never later
//! than the keepalive timeout plus a reconnect (a dead stream unsyncs its partitions),
//! or `max_ttl`.
//!
//! # Stats
//! [`NearStats`] via [`Client::near_cache_stats`](crate::Client::near_cache_stats), also
//! exported through the `metrics` facade: counters `raftcache_client_near_hits_total`,
//! `_misses_total`, `_invalidations_total`, `_gaps_total`, `_resets_total`, and gauges
//! `raftcache_client_near_entries`, `_bytes`, `_synced_partitions` (updated by the
//! driver every ~500 ms).
//!
//! ```text
//! Client::get ──► NearCache::read ──► Store (LRU, tracking, tickets) ◄── apply ◄─┐
//!      │ miss: ticket                                                            │
//!      └──► remote Get ──► Fill::complete ──► Store                             │
//! driver (every 500 ms): topology ──► plan ──► one Watch stream per leader node ──┘
//! ```

mod driver;
mod store;
#[cfg(test)]
mod store_test;
#[cfg(test)]
mod watch_test;

use crate::client::{Consistency, ReadOptions, Value};
use crate::error::Result;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use store::{Clock, Limits, Store, SystemClock, Ticket};
use tokio::sync::oneshot;

pub(crate) use driver::Driver;

/// Settings of the near cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NearCacheConfig {
    /// The most entries kept; the least recently used go first.
    pub capacity: usize,
    /// The most bytes kept (keys, values and a fixed per-entry overhead), e.g.
    /// "64MiB" in a file.
    #[serde(with = "human_bytes")]
    pub max_bytes: u64,
    /// The longest an entry is kept, whatever the key's TTL on the server (or without
    /// one): a bound on staleness should an invalidation ever be lost.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Which keys are stored.
    pub mode: NearMode,
    /// In [`NearMode::Hot`]: how often the hot keys are fetched from every node.
    #[serde(with = "humantime_serde")]
    pub hot_refresh: Duration,
}

impl Default for NearCacheConfig {
    /// 10,000 entries, 64 MiB, 30 s at most per entry, every key, hot keys refreshed
    /// every 5 s.
    fn default() -> Self {
        NearCacheConfig {
            capacity: 10_000,
            max_bytes: 64 << 20,
            max_ttl: Duration::from_secs(30),
            mode: NearMode::All,
            hot_refresh: Duration::from_secs(5),
        }
    }
}

/// Which keys the near cache stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NearMode {
    /// Every key read at the default level.
    #[default]
    All,
    /// Only keys that nodes report as hot (`StatsResponse.hot_keys`).
    Hot,
}

/// The figures of a client's near cache ([`Client::near_cache_stats`](crate::Client::near_cache_stats)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct NearStats {
    /// Reads answered from the near cache.
    pub hits: u64,
    /// Reads that could use it but went to a node (not cached, expired, or the
    /// partition not tracked).
    pub misses: u64,
    /// Entries now.
    pub entries: u64,
    /// Bytes now (keys, values, per-entry overhead).
    pub bytes: u64,
    /// Entries removed by an invalidation (a CHANGE event, or a write of this client).
    pub invalidations: u64,
    /// CHANGE events showing missed changes (the partition's entries were dropped).
    pub gaps: u64,
    /// RESET events.
    pub resets: u64,
    /// Entries evicted to stay within `capacity` or `max_bytes`.
    pub evictions: u64,
    /// Partitions tracked now (their stream's SYNC arrived).
    pub synced_partitions: u64,
}

/// The state shared by a client's read and write paths, its driver and its streams.
#[derive(Debug)]
pub(crate) struct Shared {
    config: NearCacheConfig,
    clock: Arc<dyn Clock>,
    store: Mutex<Store>,
}

impl Shared {
    fn new(config: NearCacheConfig, clock: Arc<dyn Clock>) -> Shared {
        let limits = Limits {
            capacity: config.capacity,
            max_bytes: config.max_bytes,
            max_ttl: config.max_ttl,
            mode: config.mode,
        };
        Shared {
            config,
            clock,
            store: Mutex::new(Store::new(limits)),
        }
    }

    /// The store, locked (for short critical sections only; never across an await).
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes the gauges.
    fn publish_gauges(&self) {
        let s = self.store().stats();
        metrics::gauge!("raftcache_client_near_entries").set(s.entries as f64);
        metrics::gauge!("raftcache_client_near_bytes").set(s.bytes as f64);
        metrics::gauge!("raftcache_client_near_synced_partitions").set(s.synced_partitions as f64);
    }
}

/// A client's near cache. Dropping it (with the client) ends its driver.
#[derive(Debug)]
pub struct NearCache {
    shared: Arc<Shared>,
    /// Dropped with the cache: the driver sees its receiver close and stops at once.
    _stop: oneshot::Sender<()>,
}

/// What [`NearCache::read`] decided.
pub(crate) enum NearRead<'a> {
    /// The read does not use the near cache (not the default level, or `min_lsn`).
    Bypass,
    /// Served from the near cache.
    Hit(Value),
    /// Read the key remotely, then hand the answer to the fill (if any).
    Miss(Option<Fill<'a>>),
}

/// An outstanding fill ticket; dropped without [`Fill::complete`] (the remote read
/// failed or was cancelled), it is given back.
pub(crate) struct Fill<'a> {
    shared: &'a Shared,
    ticket: Option<Ticket>,
}

impl Fill<'_> {
    /// Caches the remote answer (`None`: not found) if the ticket is still valid.
    pub(crate) fn complete(mut self, value: Option<&Value>) {
        if let Some(ticket) = self.ticket.take() {
            let now = self.shared.clock.now();
            self.shared.store().complete_fill(ticket, value, now);
        }
    }
}

impl Drop for Fill<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.shared.store().abandon(&ticket);
        }
    }
}

impl NearCache {
    /// A near cache with this config and its driver, to be started once the client
    /// exists (`None` without a config).
    pub(crate) fn for_config(
        config: Option<&NearCacheConfig>,
    ) -> (Option<Arc<NearCache>>, Option<Driver>) {
        match config {
            Some(config) => {
                let (near, driver) = NearCache::with_clock(config.clone(), Arc::new(SystemClock));
                (Some(Arc::new(near)), Some(driver))
            }
            None => (None, None),
        }
    }

    fn with_clock(config: NearCacheConfig, clock: Arc<dyn Clock>) -> (NearCache, Driver) {
        let shared = Arc::new(Shared::new(config, clock));
        let (stop_tx, stop_rx) = oneshot::channel();
        let driver = Driver::new(Arc::clone(&shared), stop_rx);
        (
            NearCache {
                shared,
                _stop: stop_tx,
            },
            driver,
        )
    }

    /// Whether a read with `options` may use the near cache.
    pub(crate) fn serves(options: &ReadOptions) -> bool {
        options.consistency == Consistency::Lease && options.min_lsn.is_none()
    }

    /// Looks `key` up for a read with `options`; on a miss takes a fill ticket (the
    /// key's partition comes from `partition_of`, only called then).
    pub(crate) fn read(
        &self,
        key: &[u8],
        options: &ReadOptions,
        partition_of: impl FnOnce(&[u8]) -> u32,
    ) -> NearRead<'_> {
        if !Self::serves(options) {
            return NearRead::Bypass;
        }
        let now = self.shared.clock.now();
        if let Some(value) = self.shared.store().get(key, now) {
            return NearRead::Hit(value);
        }
        let partition = partition_of(key);
        let ticket = self.shared.store().begin_fill(key, partition);
        NearRead::Miss(ticket.map(|ticket| Fill {
            shared: &self.shared,
            ticket: Some(ticket),
        }))
    }

    /// A multi-get through the near cache: hits answered locally, the rest read with
    /// one `remote` call (in the order given) and filled.
    ///
    /// # Errors
    /// `remote`'s error.
    pub(crate) async fn mget<F, Fut>(
        &self,
        keys: &[Bytes],
        partition_of: impl Fn(&[u8]) -> u32,
        remote: F,
    ) -> Result<Vec<Option<Value>>>
    where
        F: FnOnce(Vec<Bytes>) -> Fut,
        Fut: Future<Output = Result<Vec<Option<Value>>>>,
    {
        let options = ReadOptions::default();
        let mut values = vec![None; keys.len()];
        let mut rest = Vec::new();
        let mut fills = Vec::new();
        for (position, key) in keys.iter().enumerate() {
            match self.read(key, &options, &partition_of) {
                NearRead::Hit(value) => values[position] = Some(value),
                NearRead::Miss(fill) => {
                    rest.push(key.clone());
                    fills.push((position, fill));
                }
                NearRead::Bypass => {
                    rest.push(key.clone());
                    fills.push((position, None));
                }
            }
        }
        if rest.is_empty() {
            return Ok(values);
        }
        let answers = remote(rest).await?;
        for ((position, fill), answer) in fills.into_iter().zip(answers) {
            if let Some(fill) = fill {
                fill.complete(answer.as_ref());
            }
            values[position] = answer;
        }
        Ok(values)
    }

    /// Removes `key` and voids its fill tickets (around a write of this client).
    pub(crate) fn invalidate(&self, key: &[u8]) {
        self.shared.store().invalidate(key);
    }

    /// The figures so far.
    pub fn stats(&self) -> NearStats {
        self.shared.store().stats()
    }
}

/// Drops a key from the near cache when made and again when dropped: held by a write
/// of this client across its remote call (see the module docs, "The fill race").
pub(crate) struct NearWriteGuard<'a> {
    near: Option<&'a NearCache>,
    key: &'a [u8],
}

impl<'a> NearWriteGuard<'a> {
    pub(crate) fn new(near: Option<&'a NearCache>, key: &'a [u8]) -> NearWriteGuard<'a> {
        if let Some(near) = near {
            near.invalidate(key);
        }
        NearWriteGuard { near, key }
    }
}

impl Drop for NearWriteGuard<'_> {
    fn drop(&mut self) {
        if let Some(near) = self.near {
            near.invalidate(self.key);
        }
    }
}

/// `max_bytes` in a file: "64MiB" or a plain number of bytes.
mod human_bytes {
    use bytesize::ByteSize;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
        ByteSize(*bytes).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        Ok(ByteSize::deserialize(d)?.0)
    }
}
