//! [`Client`]: the typed API over the `raftcache.v1.Cache` service.
//!
//! Every keyed call hashes its key on the ring of the cached cluster map, sends the
//! request to the partition's leader with the route it used, and maps an error status
//! back to a [`ClientError`].
//!
//! # Retries
//! One policy for every routed call, bounded by [`ClientConfig::max_attempts`] and by
//! [`ClientConfig::request_deadline`] for the whole call:
//! - `NOT_LEADER` with a leader hint: the hint goes into the per-partition leader
//!   cache at once; the first such retry goes straight to the hinted leader, without
//!   sleeping.
//! - `NOT_LEADER` without a (new) hint, `WRONG_EPOCH`, an unavailable or unreachable
//!   node, a timed-out attempt: back off (exponential with full jitter), refresh the
//!   cluster map from every known node (not only the configured endpoints), retry.
//! - Anything else (a key too large, out of memory, ...) fails at once.
//!
//! Reads, [`Client::set_with`], [`Client::delete`] and [`Client::expire`] retry on
//! all of these. Every write call carries one request id (random client id, growing
//! sequence) on all its attempts, and a partition applies an id at most once,
//! answering a retry with the first outcome (it remembers ids for 30 s, at most 4,096
//! per partition): a write whose answer was lost is neither applied twice nor
//! reported as "not applied". [`Client::incr`] retries the same way. The final error
//! is the last attempt's, except that a write whose last attempt was surely refused
//! ([`ClientError::is_unapplied`]) after an earlier attempt that may have applied
//! fails with [`ClientError::MaybeApplied`]: a `NOT_LEADER` at the end says nothing
//! about an attempt that timed out before it (a Jepsen counter run caught increments
//! reported "not applied" that a new leader had committed).

use crate::breaker::{BreakerState, Breakers};
use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use crate::load::Loads;
use crate::lsn::Lsn;
use crate::near::{NearCache, NearRead, NearStats, NearWriteGuard};
use crate::pool::Pool;
use crate::routing::{follow_cluster, map_change, ClusterMap, ClusterStatus, MapChange, Topology};
use bytes::Bytes;
use futures::future::{join_all, try_join_all};
use futures::StreamExt;
pub use raftcache_proto::pg_snapshot::PgSnapshot;
use raftcache_proto::tonic::transport::Channel;
use raftcache_proto::tonic::{Code, Request, Response, Status};
use raftcache_proto::v1::{self, admin_client::AdminClient, cache_client::CacheClient};
use rand::Rng;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// How many nodes a map refresh asks at once.
const REFRESH_FAN_OUT: usize = 8;
/// How long a node that answered `REMOVED` or `WRONG_CLUSTER` is not asked for maps.
const SHUN_FOR: Duration = Duration::from_secs(30);
/// The longest pause between two map fetches of a client that has none yet.
const MAP_RETRY_MAX: Duration = Duration::from_secs(1);

/// A connection to a raftcache cluster.
///
/// Cheap to clone: clones share the cached cluster map and the one gRPC channel per
/// node, so a whole program (or every task of a benchmark) can use one client.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    pool: Pool,
    topology: RwLock<Arc<Topology>>,
    /// Rotates FOLLOWER reads over the replicas of a partition.
    follower_reads: AtomicUsize,
    /// Random, non-zero: this client's half of every write's request id.
    client_id: u64,
    /// The sequence half of the next write's request id.
    next_seq: AtomicU64,
    /// Per-node circuit breakers.
    breakers: Breakers,
    /// When a background map refresh was last started by
    /// [`Client::refresh_in_background`].
    last_background_refresh: std::sync::Mutex<Option<Instant>>,
    /// Nodes that answered `REMOVED` or `WRONG_CLUSTER` (by address), and since when:
    /// not asked for maps for [`SHUN_FOR`].
    shunned: std::sync::Mutex<HashMap<String, Instant>>,
    /// Single-flight table, loader limiter and counters of `get_or_load`.
    pub(crate) loads: Loads,
    /// The near cache, when configured (see [`crate::near`]).
    near: Option<Arc<crate::near::NearCache>>,
    /// Why the client has no cluster map yet (the last endpoint error), for the
    /// errors of calls made before one arrives.
    no_map_reason: std::sync::Mutex<String>,
}

/// A handle on a client that does not keep it alive: the near cache's driver holds
/// one, so that dropping the last [`Client`] ends it.
#[derive(Debug, Clone)]
pub(crate) struct WeakClient(std::sync::Weak<Inner>);

impl WeakClient {
    /// The client, unless it was dropped.
    pub(crate) fn upgrade(&self) -> Option<Client> {
        self.0.upgrade().map(|inner| Client { inner })
    }
}

/// A value read from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// The stored bytes.
    pub value: Bytes,
    /// The version of the stored value; pass it to [`Condition::IfVersion`] for a
    /// compare-and-set.
    pub version: u64,
    /// The time left before the key expires; `None` when it has no TTL.
    pub ttl: Option<Duration>,
    /// The Postgres position the value comes from (a fill's `source_lsn`, or the commit
    /// of a CDC update); [`Lsn::ZERO`] when it did not come from Postgres.
    pub source_lsn: Lsn,
}

impl From<v1::GetResponse> for Value {
    fn from(r: v1::GetResponse) -> Self {
        Value {
            value: r.value,
            version: r.version,
            ttl: r.ttl_remaining_ms.map(Duration::from_millis),
            source_lsn: Lsn(r.source_lsn),
        }
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Served by the partition leader while its lease holds (the default).
    #[default]
    Lease,
    /// Served by the partition leader after confirming its leadership.
    Linearizable,
    /// May be served by any replica that is at most `max_staleness` behind.
    Follower {
        /// How stale the answer may be (sent in whole milliseconds, rounded down).
        max_staleness: Duration,
    },
}

impl Consistency {
    /// The wire level and `max_staleness_ms`.
    fn to_wire(self) -> (v1::Consistency, u64) {
        match self {
            Consistency::Lease => (v1::Consistency::Lease, 0),
            Consistency::Linearizable => (v1::Consistency::Linearizable, 0),
            Consistency::Follower { max_staleness } => (
                v1::Consistency::Follower,
                u64::try_from(max_staleness.as_millis()).unwrap_or(u64::MAX),
            ),
        }
    }
}

/// Options of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadOptions {
    /// How fresh the answer must be.
    pub consistency: Consistency,
    /// Read-your-writes with Postgres: answer only once CDC has applied every commit
    /// before this position to the key's partition (see [`Client::get_with_min_lsn`]).
    pub min_lsn: Option<Lsn>,
}

/// When a write applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Condition {
    /// Always (Redis `SET`).
    #[default]
    Always,
    /// Only if the key is absent (Redis `NX`).
    IfAbsent,
    /// Only if the key is present (Redis `XX`).
    IfPresent,
    /// Only if the key's current version is this one (compare-and-set).
    IfVersion(u64),
}

/// Options of a write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SetOptions {
    /// Time to live; `None` for none. Sent in milliseconds, rounded up, so any TTL
    /// (`Duration::ZERO` included) is at least 1 ms.
    pub ttl: Option<Duration>,
    /// When the write applies.
    pub condition: Condition,
    /// Keep the key's current TTL instead of applying `ttl` (Redis `KEEPTTL`).
    pub keep_ttl: bool,
    /// Makes the write a cache-aside fill of a row read from Postgres at this position:
    /// it is refused when CDC already invalidated or rewrote the key at or after it
    /// (see [`Client::set_if_newer`]).
    pub source_lsn: Option<Lsn>,
    /// Makes the write an exact cache-aside fill of a row read under this Postgres
    /// snapshot (see [`Client::set_if_fresh`]). Exclusive with `source_lsn`.
    pub source_snapshot: Option<PgSnapshot>,
}

/// The outcome of [`Client::set_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SetOutcome {
    /// Whether the value was written (false: the condition did not hold).
    pub applied: bool,
    /// When applied, the new version; otherwise the key's current one (0 if absent).
    pub version: u64,
    /// For a fill ([`SetOptions::source_lsn`], [`SetOptions::source_snapshot`]) refused
    /// as stale: the LSN of the newer invalidation or update that refused it (`0/0` when
    /// a snapshot fill was refused by the tombstone floor). `None` otherwise.
    pub refused_by: Option<Lsn>,
}

/// The time to live of a key, as [`Client::ttl`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// The key does not exist.
    Missing,
    /// The key exists and never expires.
    Persistent,
    /// The key expires after this long.
    Expires(Duration),
}

/// The counters and memory figures of one node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStats {
    /// The address the figures were fetched from.
    pub addr: String,
    /// The node that answered.
    pub node_id: u64,
    /// Live keys (expired but not yet reclaimed keys included).
    pub keys: u64,
    /// Accounted memory: keys, values and per-entry overhead, in bytes.
    pub memory_used_bytes: u64,
    /// The `max-memory` limit in bytes; 0 means unlimited.
    pub memory_limit_bytes: u64,
    /// The eviction policy in force (`noeviction`, `allkeys-lru`, `allkeys-lfu`).
    pub eviction_policy: String,
    /// Reads that found a key.
    pub hits: u64,
    /// Reads that did not.
    pub misses: u64,
    /// Keys removed to stay under `max-memory`.
    pub evictions: u64,
    /// Keys removed because their TTL passed.
    pub expirations: u64,
    /// Seconds since the node started.
    pub uptime_seconds: u64,
    /// Partitions on the node.
    pub partitions: u32,
    /// The node's version string.
    pub version: String,
    /// `none`, `snapshot` or `durable`.
    pub persistence: String,
    /// Snapshots written since the node started.
    pub snapshots_written: u64,
    /// When the last snapshot was written, Unix ms (0 = never).
    pub last_snapshot_unix_ms: u64,
    /// Its size in bytes.
    pub last_snapshot_bytes: u64,
    /// How long writing it took, in ms.
    pub last_snapshot_ms: u64,
    /// The longest write pause a snapshot caused, in µs.
    pub snapshot_max_pause_us: u64,
    /// Bytes of the latest snapshot of every partition on the node.
    pub snapshot_stored_bytes: u64,
    /// Bytes the node's data directory takes.
    pub disk_bytes: u64,
    /// The keys requested most often on the node recently, hottest first (at most 16).
    pub hot_keys: Vec<crate::hot::HotKey>,
}

/// How long [`Client::snapshot`] waits for a node.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The snapshots one node wrote on request ([`Client::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeSnapshots {
    /// The node's address.
    pub addr: String,
    /// The node id.
    pub node_id: u64,
    /// (partition, Raft index covered, bytes, write pause in µs); the meta group is
    /// partition `u32::MAX`.
    pub snapshots: Vec<(u32, u64, u64, u64)>,
    /// How long it took, in ms.
    pub duration_ms: u64,
}

impl NodeStats {
    fn new(addr: String, s: v1::StatsResponse) -> NodeStats {
        NodeStats {
            addr,
            node_id: s.node_id,
            keys: s.keys,
            memory_used_bytes: s.memory_used_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            eviction_policy: s.eviction_policy,
            hits: s.hits,
            misses: s.misses,
            evictions: s.evictions,
            expirations: s.expirations,
            uptime_seconds: s.uptime_seconds,
            partitions: s.partitions,
            version: s.version,
            persistence: s.persistence,
            snapshots_written: s.snapshots_written,
            last_snapshot_unix_ms: s.last_snapshot_unix_ms,
            last_snapshot_bytes: s.last_snapshot_bytes,
            last_snapshot_ms: s.last_snapshot_ms,
            snapshot_max_pause_us: s.snapshot_max_pause_us,
            snapshot_stored_bytes: s.snapshot_stored_bytes,
            disk_bytes: s.disk_bytes,
            hot_keys: s.hot_keys.into_iter().map(Into::into).collect(),
        }
    }
}

impl Client {
    /// Connects to a cluster: fetches the cluster map from the first endpoint of
    /// `config` that answers and builds the ring it describes.
    ///
    /// When no endpoint answers (the cache is down while the application starts), the
    /// client is returned anyway, without a map: it keeps asking the endpoints in the
    /// background (exponential back-off with full jitter, at most 1 s apart), and until
    /// a map arrives its calls fail at once with [`ClientError::Unreachable`] (never
    /// sent, so safe to retry), which sends `get_or_load` to its degraded path (the
    /// loader, at a bounded concurrency). [`Client::has_map`] says whether it has one;
    /// [`Client::try_connect`] fails instead.
    ///
    /// # Errors
    /// Configuration errors, at once: [`ClientError::NoEndpoints`] when
    /// `config.endpoints` is empty, [`ClientError::InvalidEndpoint`] for an endpoint
    /// that is not `host:port`, [`ClientError::NotGrpcEndpoint`] when an endpoint
    /// answers with something other than gRPC (e.g. a node's RESP or metrics port),
    /// [`ClientError::WrongCluster`] when an endpoint serves another cluster than
    /// [`ClientConfig::cluster_id`].
    ///
    /// # Examples
    /// ```no_run
    /// # async fn demo() -> raftcache_client::Result<()> {
    /// use raftcache_client::{Client, ClientConfig};
    /// let client = Client::connect(ClientConfig::new(["127.0.0.1:7001"])).await?;
    /// client.set("greeting", "hello").await?;
    /// assert_eq!(client.get("greeting").await?.unwrap().value, "hello");
    /// # Ok(()) }
    /// ```
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        Self::connect_with(config, true).await
    }

    /// [`Client::connect`], but failing when no endpoint answers now (what a command
    /// line wants: report and exit, rather than wait for the cluster).
    ///
    /// # Errors
    /// As [`Client::connect`]; and when no endpoint answers, the error of the last one
    /// tried: [`ClientError::NothingListens`] when the connection was refused, else
    /// [`ClientError::Connect`].
    pub async fn try_connect(config: ClientConfig) -> Result<Client> {
        Self::connect_with(config, false).await
    }

    async fn connect_with(config: ClientConfig, degraded: bool) -> Result<Client> {
        if config.endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        for endpoint in &config.endpoints {
            crate::endpoint::check(endpoint)?;
        }
        let pool = Pool::new(&config);
        match map_from_endpoints(&config, &pool).await {
            Ok(topology) => Ok(Self::with_topology(config, pool, topology)),
            Err(e) if !degraded || is_misconfigured(&e) => Err(e),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "no raftcache node answers yet: calls fail at once (get_or_load calls its \
                     loader) until a cluster map arrives; asking again in the background"
                );
                let placeholder = ClusterMap {
                    epoch: 0,
                    partition_count: 1,
                    vnodes: 1,
                    replication_factor: 0,
                    node_id: 0,
                    nodes: Vec::new(),
                    partitions: Vec::new(),
                    cluster_id: config.cluster_id,
                };
                let topology = Topology::new(placeholder, &pool, None)?;
                let client = Self::with_topology(config, pool, topology);
                *client
                    .inner
                    .no_map_reason
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = e.to_string();
                client.fetch_map_in_background();
                Ok(client)
            }
        }
    }

    /// A client routing with `topology` (a placeholder without nodes until a map
    /// arrives).
    fn with_topology(config: ClientConfig, pool: Pool, topology: Topology) -> Client {
        let breakers = Breakers::new(config.breaker.clone());
        let loads = Loads::new(&config.load);
        let (near, near_driver) = crate::near::NearCache::for_config(config.near_cache.as_ref());
        let client = Client {
            inner: Arc::new(Inner {
                topology: RwLock::new(Arc::new(topology)),
                config,
                pool,
                follower_reads: AtomicUsize::new(0),
                client_id: rand::random::<u64>().max(1),
                next_seq: AtomicU64::new(1),
                breakers,
                last_background_refresh: std::sync::Mutex::new(None),
                shunned: std::sync::Mutex::new(HashMap::new()),
                loads,
                near,
                no_map_reason: std::sync::Mutex::new(String::new()),
            }),
        };
        if let Some(driver) = near_driver {
            driver.start(WeakClient(Arc::downgrade(&client.inner)));
        }
        client
    }

    /// Whether the client has a cluster map (see [`Client::connect`]: a client
    /// connected while no node answered has none until one arrives).
    pub fn has_map(&self) -> bool {
        !self.topology().map.nodes.is_empty()
    }

    /// The error of a call made before the client has a map: never sent.
    fn no_map(&self) -> ClientError {
        let reason = self
            .inner
            .no_map_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        ClientError::Unreachable(format!(
            "no cluster map yet, no endpoint answered ({reason}); retrying in the background"
        ))
    }

    /// Asks the endpoints for a map until one arrives (or the client is dropped), with
    /// exponential back-off and full jitter, from [`ClientConfig::backoff_base`] up to
    /// [`MAP_RETRY_MAX`] between attempts.
    fn fetch_map_in_background(&self) {
        let weak = Arc::downgrade(&self.inner);
        let mut backoff = Backoff {
            next: self.inner.config.backoff_base,
            max: MAP_RETRY_MAX,
        };
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(backoff.next_pause()).await;
                let Some(inner) = weak.upgrade() else { return };
                let client = Client { inner };
                if client.has_map() {
                    return;
                }
                match map_from_endpoints(&client.inner.config, &client.inner.pool).await {
                    Ok(topology) => {
                        let epoch = topology.map.epoch;
                        let mut slot = client
                            .inner
                            .topology
                            .write()
                            .unwrap_or_else(PoisonError::into_inner);
                        // A refresh (e.g. `cluster_map`) may have installed one meanwhile.
                        if slot.map.nodes.is_empty() {
                            *slot = Arc::new(topology);
                        }
                        drop(slot);
                        tracing::info!(epoch, "cluster map received: the cache is reachable");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "still no cluster map");
                        *client
                            .inner
                            .no_map_reason
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = e.to_string();
                    }
                }
            }
        });
    }

    /// The state of `get_or_load`.
    pub(crate) fn loads(&self) -> &Loads {
        &self.inner.loads
    }

    /// The settings this client runs with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Reads `key` at the default ([`Consistency::Lease`]) level.
    ///
    /// # Errors
    /// Any [`ClientError`]: a rejected key, an unreachable node, a timeout, ...
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Value>> {
        self.get_with(key, ReadOptions::default()).await
    }

    /// Reads `key` at the level `options` asks for; `None` when it does not exist.
    ///
    /// A [`Consistency::Follower`] read goes to one of the partition's voting
    /// replicas (rotating over them); if that replica is not fresh enough it answers
    /// `NOT_LEADER` and the retry goes to the leader.
    ///
    /// # Errors
    /// Any [`ClientError`]: a rejected key, an unreachable node, a timeout, ...
    pub async fn get_with(
        &self,
        key: impl AsRef<[u8]>,
        options: ReadOptions,
    ) -> Result<Option<Value>> {
        let key = key.as_ref();
        let fill = match self.near_read(key, &options) {
            NearRead::Hit(value) => return Ok(Some(value)),
            NearRead::Miss(fill) => fill,
            NearRead::Bypass => None,
        };
        let r = self.get_raw(key, options, false).await?;
        let value = r.found.then(|| Value::from(r));
        if let Some(fill) = fill {
            fill.complete(value.as_ref());
        }
        Ok(value)
    }

    /// Reads several keys at the default level; the answers come back in the order
    /// of `keys`.
    ///
    /// # Errors
    /// As [`Client::mget_with`].
    pub async fn mget<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Value>>> {
        self.mget_with(keys, ReadOptions::default()).await
    }

    /// Reads several keys: one `MGet` per node, sent concurrently; the answers come
    /// back in the order of `keys`. A failure of any node retries the whole call
    /// (routed afresh), as a single read would.
    ///
    /// # Errors
    /// The first error of any node once retries are exhausted; the call fails as a
    /// whole.
    pub async fn mget_with<K: AsRef<[u8]>>(
        &self,
        keys: &[K],
        options: ReadOptions,
    ) -> Result<Vec<Option<Value>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<Bytes> = keys
            .iter()
            .map(|k| Bytes::copy_from_slice(k.as_ref()))
            .collect();
        let near = self.inner.near.as_ref();
        if let Some(near) = near.filter(|_| NearCache::serves(&options)) {
            let remote = |rest: Vec<Bytes>| async move {
                self.routed(Retry::Read, |attempt, limit| {
                    self.mget_once(&rest, options, attempt, limit)
                })
                .await
            };
            return near.mget(&keys, |k| self.partition_of(k), remote).await;
        }
        self.routed(Retry::Read, |attempt, limit| {
            self.mget_once(&keys, options, attempt, limit)
        })
        .await
    }

    /// Writes `key` unconditionally, without a TTL, and returns its new version.
    ///
    /// # Errors
    /// Any [`ClientError`]: sizes over the node's limits, out of memory, ...
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) -> Result<u64> {
        let outcome = self.set_with(key, value, SetOptions::default()).await?;
        Ok(outcome.version)
    }

    /// Writes `key` with a TTL and a condition.
    ///
    /// Retried on every transient failure, exactly once (see the [module](self) docs):
    /// a retry of a write that was applied before its answer was lost gets the first
    /// outcome.
    ///
    /// # Errors
    /// Any [`ClientError`]: sizes over the node's limits, a TTL out of range, out of
    /// memory, ... A condition that does not hold is not an error: see
    /// [`SetOutcome::applied`].
    pub async fn set_with(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        options: SetOptions,
    ) -> Result<SetOutcome> {
        let key = key.as_ref();
        let value = value.into();
        // Over the limits: refused here, unsent and not retried (a message the node
        // cannot take would otherwise break its HTTP/2 stream and look transient).
        self.check_sizes(key, Some(value.len()))?;
        let _near = self.near_write(key);
        let (condition, expected_version) = match options.condition {
            Condition::Always => (v1::SetCondition::None, 0),
            Condition::IfAbsent => (v1::SetCondition::IfAbsent, 0),
            Condition::IfPresent => (v1::SetCondition::IfPresent, 0),
            Condition::IfVersion(v) => (v1::SetCondition::IfVersion, v),
        };
        // One id for every attempt of this call: the partition applies it once and
        // answers a retry with the first outcome, so a retried write whose first answer
        // was lost is neither applied twice nor reported as "not applied".
        let request = self.request_id();
        let r = self
            .keyed(
                key,
                Retry::Write,
                |key, route| v1::SetRequest {
                    key,
                    value: value.clone(),
                    route: Some(route),
                    ttl_ms: ttl_ms(options.ttl),
                    condition: condition as i32,
                    expected_version,
                    keep_ttl: options.keep_ttl,
                    source_lsn: options.source_lsn.map_or(0, |l| l.0),
                    request: Some(request),
                    lease_token: 0,
                    source_snapshot: options.source_snapshot.as_ref().map(PgSnapshot::to_wire),
                },
                |mut c, r| async move { c.set(r).await },
            )
            .await?;
        Ok(SetOutcome {
            applied: r.applied,
            version: r.version,
            refused_by: r.stale.then_some(Lsn(r.newer_lsn)),
        })
    }

    /// Cache-aside fill of a row read from Postgres: writes `key` only if CDC has not
    /// invalidated or rewritten it at or after `source_lsn`. Take `source_lsn` from
    /// `SELECT pg_current_wal_lsn()` *before* reading the row, so that any commit the
    /// read may have missed has a later LSN and wins.
    ///
    /// A refused fill is not an error: [`SetOutcome::refused_by`] says which newer
    /// change refused it (the app just serves the row it read without caching it).
    ///
    /// # Errors
    /// As [`Client::set_with`].
    pub async fn set_if_newer(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        source_lsn: Lsn,
        ttl: Option<Duration>,
    ) -> Result<SetOutcome> {
        let options = SetOptions {
            ttl,
            source_lsn: Some(source_lsn),
            ..SetOptions::default()
        };
        self.set_with(key, value, options).await
    }

    /// Exact cache-aside fill: writes `key` only if no transaction that CDC has seen
    /// invalidate or rewrite it is invisible in `snapshot`, the Postgres snapshot the row
    /// was read under. Read the row and the snapshot in one statement (or one REPEATABLE
    /// READ transaction):
    ///
    /// ```sql
    /// SELECT pg_current_snapshot()::text, row_to_json(u)::text FROM users u WHERE id = $1
    /// ```
    ///
    /// Unlike [`Client::set_if_newer`] this has no window: a commit that is already in
    /// the WAL but not yet visible to the reader is not in the snapshot, so the fill is
    /// refused if that commit's invalidation has reached the cache, and the value is
    /// removed if the invalidation comes later. Parse the snapshot text with
    /// `str::parse::<PgSnapshot>()`.
    ///
    /// A refused fill is not an error: [`SetOutcome::refused_by`] is `Some` and the app
    /// serves the row it read without caching it.
    ///
    /// # Errors
    /// As [`Client::set_with`]; a malformed snapshot is refused by the node as
    /// [`ClientError::InvalidArgument`].
    pub async fn set_if_fresh(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        snapshot: &PgSnapshot,
        ttl: Option<Duration>,
    ) -> Result<SetOutcome> {
        let options = SetOptions {
            ttl,
            source_snapshot: Some(snapshot.clone()),
            ..SetOptions::default()
        };
        self.set_with(key, value, options).await
    }

    /// Reads `key` once CDC has applied every Postgres commit before `min_lsn` to its
    /// partition: after committing a change, take `pg_current_wal_lsn()` and read with it
    /// to see the cache reflect that change (read-your-writes).
    ///
    /// # Errors
    /// [`ClientError::LsnNotReached`] when CDC did not get there within the deadline;
    /// otherwise as [`Client::get_with`].
    pub async fn get_with_min_lsn(
        &self,
        key: impl AsRef<[u8]>,
        min_lsn: Lsn,
    ) -> Result<Option<Value>> {
        let options = ReadOptions {
            min_lsn: Some(min_lsn),
            ..ReadOptions::default()
        };
        self.get_with(key, options).await
    }

    /// Applies one batch of CDC changes to the leader of `partition` (what
    /// `raftcache-cdc` sends; every key of the batch must hash to `partition`).
    /// Retried on transient failures: a batch is idempotent (per-key LSN compare).
    ///
    /// # Errors
    /// [`ClientError::Fenced`] when a newer worker holds the CDC lease; otherwise any
    /// [`ClientError`].
    pub async fn apply_changes(
        &self,
        partition: u32,
        request: v1::ApplyChangesRequest,
    ) -> Result<v1::ApplyChangesResponse> {
        let request = &request;
        self.routed(Retry::Write, |_, limit| async move {
            let target = self.topology().partition_target(partition)?;
            let mut request = request.clone();
            request.route = Some(target.route);
            call(
                &self.inner.config,
                target.channel,
                request,
                limit,
                |mut c, r| async move { c.apply_changes(r).await },
            )
            .await
            .map_err(|e| with_partition(e, partition))
        })
        .await
    }

    /// Removes `key`; true when a live key was removed.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let _near = self.near_write(key.as_ref());
        let request = self.request_id();
        let r = self
            .keyed(
                key.as_ref(),
                Retry::Write,
                |key, route| v1::DeleteRequest {
                    key,
                    route: Some(route),
                    request: Some(request),
                },
                |mut c, r| async move { c.delete(r).await },
            )
            .await?;
        Ok(r.deleted)
    }

    /// Adds `delta` to the integer at `key` (a missing key counts as 0) and returns
    /// the result.
    ///
    /// Retried on every transient failure, exactly once: every attempt carries the
    /// call's request id, so a retry of an increment that was applied before its answer
    /// was lost gets the first result instead of incrementing again.
    ///
    /// # Errors
    /// [`ClientError::NotAnInteger`] when the value is not a base-10 `i64`,
    /// [`ClientError::IncrOverflow`] when the sum leaves the `i64` range, or any other
    /// [`ClientError`].
    pub async fn incr(&self, key: impl AsRef<[u8]>, delta: i64) -> Result<i64> {
        let _near = self.near_write(key.as_ref());
        let request = self.request_id();
        let r = self
            .keyed(
                key.as_ref(),
                Retry::Write,
                |key, route| v1::IncrRequest {
                    key,
                    route: Some(route),
                    delta,
                    request: Some(request),
                },
                |mut c, r| async move { c.incr(r).await },
            )
            .await?;
        Ok(r.value)
    }

    /// Sets the TTL of an existing key, or removes it with `None` (Redis `PERSIST`);
    /// true when the key existed. A TTL is sent in milliseconds, rounded up, so
    /// `Some(Duration::ZERO)` expires the key at once.
    ///
    /// # Errors
    /// [`ClientError::TtlOutOfRange`] for a TTL the node cannot represent, or any
    /// other [`ClientError`].
    pub async fn expire(&self, key: impl AsRef<[u8]>, ttl: Option<Duration>) -> Result<bool> {
        let _near = self.near_write(key.as_ref());
        let request = self.request_id();
        let r = self
            .keyed(
                key.as_ref(),
                Retry::Write,
                |key, route| v1::ExpireRequest {
                    key,
                    route: Some(route),
                    ttl_ms: ttl_ms(ttl),
                    request: Some(request),
                },
                |mut c, r| async move { c.expire(r).await },
            )
            .await?;
        Ok(r.updated)
    }

    /// The time to live of `key` (read without its value).
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn ttl(&self, key: impl AsRef<[u8]>) -> Result<Ttl> {
        let r = self
            .get_raw(key.as_ref(), ReadOptions::default(), true)
            .await?;
        Ok(match (r.found, r.ttl_remaining_ms) {
            (false, _) => Ttl::Missing,
            (true, None) => Ttl::Persistent,
            (true, Some(ms)) => Ttl::Expires(Duration::from_millis(ms)),
        })
    }

    /// Fetches the cluster map afresh from the first node that answers (the nodes of
    /// the cached map and the configured endpoints are asked concurrently) and caches
    /// it unless it is older than the cached one.
    ///
    /// # Errors
    /// The error of the last node tried when none answers, or
    /// [`ClientError::InvalidResponse`] for a map the client cannot use.
    pub async fn cluster_map(&self) -> Result<ClusterMap> {
        self.refresh(Want::default(), Limit::request(&self.inner.config))
            .await
    }

    /// The cluster as all its nodes see it: asks every node of a fresh map for its
    /// map, concurrently, and merges the answers with [`ClusterStatus::merge`], so
    /// that each partition shows its live leader, term and applied index. Nodes that
    /// do not answer are listed in [`ClusterStatus::unreachable`].
    ///
    /// # Errors
    /// When no node answers at all.
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        let first = self.cluster_map().await?;
        let config = &self.inner.config;
        let pool = &self.inner.pool;
        let first_ref = &first;
        let answers = join_all(first.nodes.iter().map(|node| async move {
            let first = first_ref;
            let answer = if node.id == first.node_id {
                Ok(first.clone())
            } else {
                fetch_map(config, pool, &node.addr, Limit::request(config)).await
            };
            (node.addr.clone(), answer)
        }))
        .await;
        let mut reports = Vec::with_capacity(answers.len() + 1);
        let mut unreachable = Vec::new();
        for (addr, answer) in answers {
            match answer {
                Ok(map) => reports.push(map),
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "node did not report its map");
                    unreachable.push(addr);
                }
            }
        }
        if !reports.iter().any(|r| r.node_id == first.node_id) {
            reports.push(first.clone());
        }
        let mut status = ClusterStatus::merge(&reports).ok_or_else(|| {
            ClientError::InvalidResponse("no node reported a cluster map".to_owned())
        })?;
        status.unreachable = unreachable;
        Ok(status)
    }

    /// Adds the node listening at `addr` (started with `--join` or `--standby`) to
    /// the cluster and returns the node id it was given (or already had).
    ///
    /// # Errors
    /// Any [`ClientError`] once retries are exhausted.
    pub async fn add_node(&self, addr: &str) -> Result<u64> {
        let request = v1::AddNodeRequest {
            addr: addr.to_owned(),
            cluster_id: self.topology().map.cluster_id,
        };
        let r = self
            .admin(request, |mut c, r| async move { c.add_node(r).await })
            .await?;
        Ok(r.node_id)
    }

    /// Starts draining node `node_id`: its replicas and leaderships move away, then
    /// it disappears from the cluster map (poll [`Client::cluster_map`]). Returns the
    /// epoch after the change.
    ///
    /// # Errors
    /// Any [`ClientError`] once retries are exhausted.
    pub async fn remove_node(&self, node_id: u64) -> Result<u64> {
        let request = v1::RemoveNodeRequest { node_id };
        let r = self
            .admin(request, |mut c, r| async move { c.remove_node(r).await })
            .await?;
        Ok(r.epoch)
    }

    /// Asks for the leadership of `partition` to move to `node_id` (which must hold a
    /// voting replica of it); it completes within an election round. Returns the
    /// epoch after the change.
    ///
    /// # Errors
    /// Any [`ClientError`] once retries are exhausted.
    pub async fn transfer_leader(&self, partition: u32, node_id: u64) -> Result<u64> {
        let request = v1::TransferLeaderRequest { partition, node_id };
        let r = self
            .admin(
                request,
                |mut c, r| async move { c.transfer_leader(r).await },
            )
            .await?;
        Ok(r.epoch)
    }

    /// Recomputes placement (min(R, active nodes) replicas per partition, spread
    /// evenly); returns the epoch after the change and the number of replicas that
    /// change node.
    ///
    /// # Errors
    /// Any [`ClientError`] once retries are exhausted.
    pub async fn rebalance(&self) -> Result<(u64, u32)> {
        let r = self
            .admin(v1::RebalanceRequest {}, |mut c, r| async move {
                c.rebalance(r).await
            })
            .await?;
        Ok((r.epoch, r.moved_replicas))
    }

    /// The counters of every node in the cached cluster map, fetched concurrently, in
    /// the map's node order.
    ///
    /// # Errors
    /// The first error of any node.
    pub async fn stats(&self) -> Result<Vec<NodeStats>> {
        if !self.has_map() {
            return Err(self.no_map());
        }
        let topology = self.topology();
        let config = &self.inner.config;
        try_join_all(topology.map_nodes().iter().map(|node| async move {
            let s = call(
                config,
                node.channel.clone(),
                v1::StatsRequest {},
                Limit::request(config),
                |mut c, r| async move { c.stats(r).await },
            )
            .await?;
            Ok(NodeStats::new(node.info.addr.clone(), s))
        }))
        .await
    }

    /// Runs a Redis command on the leader of `key`'s partition and returns its reply,
    /// RESP-encoded in `protocol` (2 or 3): how a node's RESP front end forwards a
    /// command whose key it does not lead. `write` commands carry one request id over
    /// every attempt when `call` is [`RespCall::WriteOnce`], so the leader applies them
    /// once.
    ///
    /// # Errors
    /// Routing and transport errors (Redis errors are replies).
    pub async fn resp_keyed(
        &self,
        key: &[u8],
        args: &[Bytes],
        protocol: u32,
        call: RespCall,
    ) -> Result<Bytes> {
        let (retry, request) = match call {
            RespCall::Read => (Retry::Read, None),
            RespCall::Write => (Retry::Write, None),
            RespCall::WriteOnce => (Retry::Write, Some(self.request_id())),
        };
        let r = self
            .keyed(
                key,
                retry,
                |_, route| v1::RespRequest {
                    route: Some(route),
                    args: args.to_vec(),
                    protocol,
                    request,
                },
                |mut c, r| async move { c.resp(r).await },
            )
            .await?;
        Ok(r.reply)
    }

    /// Runs a node-wide Redis command (`RAFTCACHE.KEYSPACE`, `FLUSHALL`) on every node of the
    /// cached map except `skip` (the caller itself), all at once: each answers for the
    /// partitions it leads. One result per node, with its address.
    pub async fn resp_nodes(
        &self,
        args: &[Bytes],
        protocol: u32,
        skip: &str,
    ) -> Vec<(String, Result<Bytes>)> {
        let topology = self.topology();
        let config = &self.inner.config;
        join_all(
            topology
                .map_nodes()
                .iter()
                .filter(|node| node.info.addr != skip)
                .map(|node| async move {
                    let r = call(
                        config,
                        node.channel.clone(),
                        v1::RespRequest {
                            route: None,
                            args: args.to_vec(),
                            protocol,
                            request: None,
                        },
                        Limit::request(config),
                        |mut c, r| async move { c.resp(r).await },
                    )
                    .await
                    .map(|r| r.reply);
                    (node.info.addr.clone(), r)
                }),
        )
        .await
    }

    /// Makes every node in the cached map (all at once) write a snapshot of each
    /// partition it holds, or of `partition` only (nodes without a replica of it are
    /// left out), to its data directory.
    ///
    /// # Errors
    /// The first error of any node (e.g. `FAILED_PRECONDITION` from a node without
    /// persistence).
    pub async fn snapshot(&self, partition: Option<u32>) -> Result<Vec<NodeSnapshots>> {
        if !self.has_map() {
            return Err(self.no_map());
        }
        let topology = self.topology();
        let config = &self.inner.config;
        // Writing a large partition takes longer than a request timeout.
        let limit = Limit {
            wait: SNAPSHOT_TIMEOUT,
            reported: SNAPSHOT_TIMEOUT,
        };
        let answers = join_all(topology.map_nodes().iter().map(|node| async move {
            let client = AdminClient::new(node.channel.clone())
                .max_decoding_message_size(config.max_message_bytes);
            let r = bounded(limit, v1::SnapshotRequest { partition }, |r| async move {
                let mut client = client;
                client.snapshot(r).await
            })
            .await;
            (node.info.addr.clone(), r)
        }))
        .await;
        let mut out = Vec::new();
        for (addr, r) in answers {
            match r {
                Ok(r) => out.push(NodeSnapshots {
                    addr,
                    node_id: r.node_id,
                    snapshots: r
                        .snapshots
                        .iter()
                        .map(|s| (s.partition, s.applied_index, s.bytes, s.pause_us))
                        .collect(),
                    duration_ms: r.duration_ms,
                }),
                // With one partition asked for, a node without it says so; skip it.
                Err(ClientError::Unavailable(m))
                    if partition.is_some() && m.contains("holds no replica") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Every node's circuit-breaker state, by address (nodes never called are absent).
    pub fn breakers(&self) -> Vec<(String, BreakerState)> {
        self.inner.breakers.states(Instant::now())
    }

    /// Whether the circuit breaker of the node that leads `key`'s partition (per the
    /// cached map) is open now, so that a call would fail at once.
    pub fn is_key_node_open(&self, key: &[u8]) -> bool {
        let topology = self.topology();
        match topology.target(key) {
            Ok(target) => self
                .inner
                .breakers
                .is_open(topology.node_addr(target.node), Instant::now()),
            Err(_) => false,
        }
    }

    /// The partition `key` belongs to under the cached cluster map (0 while the client
    /// has no map, see [`Client::has_map`]).
    pub fn partition_of(&self, key: impl AsRef<[u8]>) -> u32 {
        self.topology().ring.partition_of(key)
    }

    /// The figures of the near cache; `None` when the client has none
    /// ([`ClientConfig::near_cache`]).
    pub fn near_cache_stats(&self) -> Option<NearStats> {
        self.inner.near.as_ref().map(|near| near.stats())
    }

    /// The near cache's view of a read: a hit, a miss with its fill ticket, or a
    /// bypass (no near cache, or a read it does not serve).
    pub(crate) fn near_read<'a>(&'a self, key: &[u8], options: &ReadOptions) -> NearRead<'a> {
        match &self.inner.near {
            Some(near) => near.read(key, options, |k| self.partition_of(k)),
            None => NearRead::Bypass,
        }
    }

    /// Drops `key` from the near cache now and again when the guard goes (after the
    /// write's remote call, whatever its outcome).
    pub(crate) fn near_write<'a>(&'a self, key: &'a [u8]) -> NearWriteGuard<'a> {
        NearWriteGuard::new(self.inner.near.as_deref(), key)
    }

    /// A snapshot of the routing table (the near cache's driver plans with it).
    pub(crate) fn topology_snapshot(&self) -> Arc<Topology> {
        self.topology()
    }

    /// The channel for `Watch` streams to `addr` (its own connection, with keepalive).
    pub(crate) fn watch_channel(&self, addr: &str) -> std::result::Result<Channel, String> {
        self.inner.pool.watch_channel(addr)
    }

    /// A snapshot of the cached routing table.
    fn topology(&self) -> Arc<Topology> {
        let topology = self
            .inner
            .topology
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&topology)
    }

    /// Caches `map` by the rule of [`map_change`]: a map of the cached cluster unless
    /// the cached one is newer (leaders the cached table learned survive where `map`
    /// did not observe its partitions, see [`Topology::new`]); a map of another cluster
    /// replaces the cached one whatever the epochs, starting from nothing (no leader
    /// learnt from the old cluster, breakers of its addresses reset).
    fn install(&self, map: ClusterMap) -> Result<()> {
        let mut slot = self
            .inner
            .topology
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match map_change(&slot.map, &map, self.inner.config.cluster_id) {
            MapChange::Ignore => {
                tracing::debug!(
                    fetched = map.epoch,
                    fetched_cluster = map.cluster_id,
                    cached = slot.map.epoch,
                    cached_cluster = slot.map.cluster_id,
                    "ignoring an older cluster map (or one of another cluster)"
                );
            }
            MapChange::Install => {
                let topology = Topology::new(map, &self.inner.pool, Some(&slot))?;
                tracing::debug!(epoch = topology.map.epoch, "cluster map refreshed");
                *slot = Arc::new(topology);
            }
            MapChange::NewCluster => {
                let topology = Topology::new(map, &self.inner.pool, None)?;
                tracing::info!(
                    old_cluster = format_args!("{:016x}", slot.map.cluster_id),
                    old_epoch = slot.map.epoch,
                    new_cluster = format_args!("{:016x}", topology.map.cluster_id),
                    new_epoch = topology.map.epoch,
                    "the endpoints now serve another cluster (restarted?): replacing the \
                     cached cluster map"
                );
                self.inner.breakers.reset();
                // Addresses shunned as "another cluster" may be the one followed now.
                self.inner
                    .shunned
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clear();
                *slot = Arc::new(topology);
            }
        }
        Ok(())
    }

    /// Stops asking `addr` for maps for a while (it answered `REMOVED` or
    /// `WRONG_CLUSTER`).
    fn shun(&self, addr: &str) {
        self.inner
            .shunned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr.to_owned(), Instant::now());
    }

    fn is_shunned(&self, addr: &str) -> bool {
        let mut shunned = self
            .inner
            .shunned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shunned.retain(|_, since| since.elapsed() < SHUN_FOR);
        shunned.contains_key(addr)
    }

    /// Whether `addr` is one of the configured endpoints.
    fn is_endpoint(&self, addr: &str) -> bool {
        let bare = |s: &str| s.strip_prefix("http://").unwrap_or(s).to_owned();
        self.inner
            .config
            .endpoints
            .iter()
            .any(|e| bare(e) == bare(addr))
    }

    /// Puts a `NOT_LEADER` hint into the leader cache. True when the cache now
    /// routes `partition` to the hinted node (whether or not it did before).
    fn learn_leader(
        &self,
        partition: u32,
        leader_id: Option<u64>,
        leader_addr: Option<&str>,
    ) -> bool {
        let mut slot = self
            .inner
            .topology
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(next) = slot.with_leader(partition, leader_id, leader_addr, &self.inner.pool) {
            tracing::debug!(partition, ?leader_id, ?leader_addr, "leader hint");
            *slot = Arc::new(next);
            return true;
        }
        // No change: usable only if the cache already routes to that node.
        let current = slot.leader_id(partition);
        current.is_some() && current == leader_id
    }

    /// Fetches maps from the nodes of the cached map and the configured endpoints,
    /// up to [`REFRESH_FAN_OUT`] at once, until one satisfies `want`; installs that
    /// one, or else the best that came back, and returns it.
    ///
    /// # Errors
    /// The last error when no node answers.
    ///
    /// Which cluster's maps count is decided by [`follow_cluster`]: a node that is not a
    /// configured endpoint only answers for the cached cluster. With `want.endpoints`
    /// (after a `REMOVED` / `WRONG_CLUSTER` answer) only the configured endpoints are
    /// asked.
    async fn refresh(&self, want: Want, limit: Limit) -> Result<ClusterMap> {
        let current = self.topology();
        let cached_cluster = current.map.cluster_id;
        let pinned = self.inner.config.cluster_id;
        let mut candidates: Vec<String> = Vec::new();
        let map_nodes = current
            .nodes
            .iter()
            .map(|n| &n.info.addr)
            .filter(|_| !want.endpoints);
        for addr in map_nodes.chain(&self.inner.config.endpoints) {
            if !candidates.contains(addr) && !self.is_shunned(addr) {
                candidates.push(addr.clone());
            }
        }
        if candidates.is_empty() {
            // Everything is shunned: ask the endpoints anyway.
            candidates.clone_from(&self.inner.config.endpoints);
        }
        let config = &self.inner.config;
        let pool = &self.inner.pool;
        let mut answers = futures::stream::iter(candidates)
            .map(|addr| async move {
                let answer = fetch_map(config, pool, &addr, limit).await;
                (addr, answer)
            })
            .buffer_unordered(REFRESH_FAN_OUT);
        let mut maps: Vec<(bool, ClusterMap)> = Vec::new();
        let mut last_error = ClientError::NoEndpoints;
        while let Some((addr, answer)) = answers.next().await {
            if answer.is_ok() {
                self.inner.breakers.node_answered(&addr, Instant::now());
            }
            match answer {
                Ok(map) => {
                    let from_endpoint = self.is_endpoint(&addr);
                    let usable = (pinned == 0 || map.cluster_id == pinned)
                        && (from_endpoint || map.cluster_id == cached_cluster);
                    if !usable {
                        tracing::debug!(%addr, cluster = map.cluster_id, "map of another cluster");
                        last_error = ClientError::WrongCluster(format!(
                            "{addr} answered a map of cluster {:016x}, the client follows \
                             {:016x}",
                            map.cluster_id, cached_cluster
                        ));
                        continue;
                    }
                    let done = want.is_met_by(&map);
                    maps.push((from_endpoint, map));
                    if done {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "cluster map fetch failed");
                    last_error = e;
                }
            }
        }
        drop(answers);
        let clusters: Vec<(bool, u64)> = maps.iter().map(|(e, m)| (*e, m.cluster_id)).collect();
        let cluster = follow_cluster(cached_cluster, pinned, &clusters);
        let mut best: Option<ClusterMap> = None;
        for (_, map) in maps {
            if map.cluster_id == cluster
                && best.as_ref().is_none_or(|b| want.rank(&map) > want.rank(b))
            {
                best = Some(map);
            }
        }
        let map = best.ok_or(last_error)?;
        self.install(map.clone())?;
        Ok(map)
    }

    /// Sends a keyed request to the leader of the key's partition (or, for
    /// `follower_reads`, to a replica on the first attempt), with the retries of
    /// [`Client::routed`]. `build` makes the request from the key and the route.
    async fn keyed<Req, Resp, Fut>(
        &self,
        key: &[u8],
        retry: Retry,
        build: impl Fn(Bytes, v1::Route) -> Req,
        rpc: impl Fn(CacheClient<Channel>, Request<Req>) -> Fut,
    ) -> Result<Resp>
    where
        Req: raftcache_proto::prost::Message,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        self.keyed_to(key, retry, false, build, rpc).await
    }

    /// [`Client::keyed`], optionally sending the first attempt to a replica.
    async fn keyed_to<Req, Resp, Fut>(
        &self,
        key: &[u8],
        retry: Retry,
        to_replica: bool,
        build: impl Fn(Bytes, v1::Route) -> Req,
        rpc: impl Fn(CacheClient<Channel>, Request<Req>) -> Fut,
    ) -> Result<Resp>
    where
        Req: raftcache_proto::prost::Message,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let budget = self.inner.config.request_deadline;
        self.keyed_within(key, budget, retry, to_replica, build, rpc)
            .await
    }

    /// [`Client::keyed_to`] within `budget` (retries included) instead of the
    /// configured request deadline.
    pub(crate) async fn keyed_within<Req, Resp, Fut>(
        &self,
        key: &[u8],
        budget: Duration,
        retry: Retry,
        to_replica: bool,
        build: impl Fn(Bytes, v1::Route) -> Req,
        rpc: impl Fn(CacheClient<Channel>, Request<Req>) -> Fut,
    ) -> Result<Resp>
    where
        Req: raftcache_proto::prost::Message,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        self.check_sizes(key, None)?;
        let key = &Bytes::copy_from_slice(key);
        let build = &build;
        let rpc = &rpc;
        let attempt = |attempt: u32, limit: Limit| async move {
            let topology = self.topology();
            let target = if to_replica && attempt == 0 {
                let pick = self.inner.follower_reads.fetch_add(1, Ordering::Relaxed);
                topology.replica_target(key, pick)?
            } else {
                topology.target(key)?
            };
            let partition = target.route.partition;
            let addr = topology.node_addr(target.node);
            self.inner.breakers.admit(addr, Instant::now())?;
            let request = build(key.clone(), target.route);
            // A request over the message limit (a fill's value, a forwarded command) would
            // fail in HTTP/2 and look transient: refuse it unsent, not retried.
            let size = raftcache_proto::prost::Message::encoded_len(&request);
            if size > self.inner.config.max_message_bytes {
                return Err(ClientError::ValueTooLarge {
                    size: size as u64,
                    limit: self.inner.config.max_message_bytes as u64,
                });
            }
            let answer = call(&self.inner.config, target.channel, request, limit, rpc).await;
            self.inner.breakers.record(addr, &answer, Instant::now());
            if let Err(e) = &answer {
                if e.is_foreign_node() {
                    self.shun(addr);
                }
            }
            answer.map_err(|e| with_partition(e, partition))
        };
        self.routed_within(budget, retry, attempt).await
    }

    /// Refuses a key over [`ClientConfig::max_key_bytes`] or a value over
    /// [`ClientConfig::max_value_bytes`] before anything is sent.
    ///
    /// # Errors
    /// [`ClientError::KeyTooLarge`], [`ClientError::ValueTooLarge`] (the node's answer to
    /// the same request; neither is retried).
    pub(crate) fn check_sizes(&self, key: &[u8], value: Option<usize>) -> Result<()> {
        let config = &self.inner.config;
        if key.len() > config.max_key_bytes {
            return Err(ClientError::KeyTooLarge {
                size: key.len() as u64,
                limit: config.max_key_bytes as u64,
            });
        }
        match value {
            Some(len) if len > config.max_value_bytes => Err(ClientError::ValueTooLarge {
                size: len as u64,
                limit: config.max_value_bytes as u64,
            }),
            _ => Ok(()),
        }
    }

    /// A fresh request id for one write call (the same on all its attempts).
    pub(crate) fn request_id(&self) -> v1::RequestId {
        v1::RequestId {
            client: self.inner.client_id,
            seq: self.inner.next_seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Runs `attempt` (given its number, from 0, and its time limit) until it
    /// succeeds, fails for good, or the attempts or the call's deadline run out: the
    /// one retry policy of every routed call (see the [module](self) docs).
    async fn routed<T, Fut>(&self, retry: Retry, attempt: impl Fn(u32, Limit) -> Fut) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        self.routed_within(self.inner.config.request_deadline, retry, attempt)
            .await
    }

    /// [`Client::routed`] with `budget` instead of the configured request deadline.
    async fn routed_within<T, Fut>(
        &self,
        budget: Duration,
        retry: Retry,
        attempt: impl Fn(u32, Limit) -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        if !self.has_map() {
            return Err(self.no_map());
        }
        let config = &self.inner.config;
        let deadline = Instant::now() + budget;
        let mut backoff = Backoff::new(config);
        let mut hinted_once = false;
        let mut attempts = 0;
        let mut maybe_applied = false;
        loop {
            let Some(limit) = Limit::until(config, deadline) else {
                return Err(ClientError::Timeout(config.request_deadline));
            };
            let error = match attempt(attempts, limit).await {
                Ok(answer) => return Ok(answer),
                Err(error) => error,
            };
            attempts += 1;
            maybe_applied |= retry == Retry::Write && !error.is_unapplied();
            // The call's final error: surely unapplied only if every attempt was.
            let fail = |error: ClientError| {
                if maybe_applied && error.is_unapplied() {
                    ClientError::MaybeApplied(Box::new(error))
                } else {
                    error
                }
            };
            if !error.is_transient() || attempts >= config.max_attempts {
                if error.is_transient() {
                    self.refresh_soon();
                }
                return Err(fail(error));
            }
            let mut want = Want::default();
            match &error {
                ClientError::NotLeader {
                    partition: Some(partition),
                    leader_id,
                    leader_addr,
                } => {
                    let hinted = (leader_id.is_some() || leader_addr.is_some())
                        && self.learn_leader(*partition, *leader_id, leader_addr.as_deref());
                    if hinted && !hinted_once {
                        hinted_once = true;
                        tracing::debug!(%error, attempts, "retrying at the hinted leader");
                        continue;
                    }
                    want.partition = Some(*partition);
                }
                ClientError::WrongEpoch { epoch: Some(epoch) } => want.min_epoch = *epoch,
                e if e.is_foreign_node() => want.endpoints = true,
                _ => {}
            }
            let pause = backoff.next_pause();
            if Instant::now() + pause >= deadline {
                // Out of time, but the next call must not go to the same dead end.
                self.refresh_soon();
                return Err(fail(error));
            }
            tracing::debug!(%error, attempts, ?pause, "backing off, then refreshing the map");
            tokio::time::sleep(pause).await;
            let Some(limit) = Limit::until(config, deadline) else {
                return Err(fail(error));
            };
            if let Err(refresh) = self.refresh(want, limit).await {
                tracing::debug!(error = %refresh, "cluster map refresh failed");
            }
        }
    }

    /// [`Client::refresh_soon`], at most once per 250 ms: for callers that skip a node
    /// whose breaker is open (they send nothing, so no failure triggers a refresh, and
    /// the map would keep naming the dead leader).
    pub(crate) fn refresh_in_background(&self) {
        let now = Instant::now();
        {
            let mut last = self
                .inner
                .last_background_refresh
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| now.duration_since(t) < Duration::from_millis(250)) {
                return;
            }
            *last = Some(now);
        }
        self.refresh_soon();
    }

    /// Refreshes the cached map in the background (after a call gave up on a transient
    /// error, so that the next call does not go to the same dead end).
    fn refresh_soon(&self) {
        let client = self.clone();
        tokio::spawn(async move {
            let limit = Limit::request(&client.inner.config);
            if let Err(e) = client.refresh(Want::default(), limit).await {
                tracing::debug!(error = %e, "background cluster map refresh failed");
            }
        });
    }

    /// Sends an admin request to the nodes in turn (any node forwards it to the meta
    /// leader), retrying transient failures with back-off within the attempt and time
    /// budget; refreshes the cached map after a success.
    async fn admin<Req, Resp, Fut>(
        &self,
        request: Req,
        rpc: impl Fn(AdminClient<Channel>, Request<Req>) -> Fut,
    ) -> Result<Resp>
    where
        Req: Clone,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let config = &self.inner.config;
        let deadline = Instant::now() + config.request_deadline;
        let mut backoff = Backoff::new(config);
        let mut attempts: u32 = 0;
        loop {
            let Some(limit) = Limit::until(config, deadline) else {
                return Err(ClientError::Timeout(config.request_deadline));
            };
            let topology = self.topology();
            let mut addrs: Vec<&str> = topology.map.nodes.iter().map(|n| n.addr.as_str()).collect();
            addrs.extend(config.endpoints.iter().map(String::as_str));
            let Some(&addr) = addrs.get(attempts as usize % addrs.len().max(1)) else {
                return Err(ClientError::NoEndpoints);
            };
            let answer = match self.inner.pool.channel(addr) {
                Ok(channel) => {
                    let client = AdminClient::new(channel)
                        .max_decoding_message_size(config.max_message_bytes)
                        .max_encoding_message_size(config.max_message_bytes);
                    bounded(limit, request.clone(), |r| rpc(client, r)).await
                }
                Err(message) => Err(ClientError::Connect {
                    endpoint: addr.to_owned(),
                    message,
                }),
            };
            let error = match answer {
                Ok(answer) => {
                    if let Err(e) = self.cluster_map().await {
                        tracing::debug!(error = %e, "map refresh after an admin call failed");
                    }
                    return Ok(answer);
                }
                Err(error) => error,
            };
            attempts += 1;
            if !error.is_transient() || attempts >= config.max_attempts {
                return Err(error);
            }
            let pause = backoff.next_pause();
            if Instant::now() + pause >= deadline {
                // Out of time, but the next call must not go to the same dead end.
                self.refresh_soon();
                return Err(error);
            }
            tracing::debug!(%addr, %error, attempts, "admin call failed; retrying");
            tokio::time::sleep(pause).await;
        }
    }

    /// A `Get`, with or without the value.
    async fn get_raw(
        &self,
        key: &[u8],
        options: ReadOptions,
        skip_value: bool,
    ) -> Result<v1::GetResponse> {
        let (consistency, max_staleness_ms) = options.consistency.to_wire();
        let to_replica = matches!(options.consistency, Consistency::Follower { .. });
        self.keyed_to(
            key,
            Retry::Read,
            to_replica,
            |key, route| v1::GetRequest {
                key,
                route: Some(route),
                consistency: consistency as i32,
                max_staleness_ms,
                skip_value,
                min_lsn: options.min_lsn.map_or(0, |l| l.0),
            },
            |mut c, r| async move { c.get(r).await },
        )
        .await
    }

    /// One routing of a multi-get: keys grouped by node (leaders, or for a FOLLOWER
    /// read's first attempt, replicas), one `MGet` per node.
    async fn mget_once(
        &self,
        keys: &[Bytes],
        options: ReadOptions,
        attempt: u32,
        limit: Limit,
    ) -> Result<Vec<Option<Value>>> {
        struct Batch {
            addr: String,
            channel: Channel,
            /// Where each key of the batch sits in `keys`.
            positions: Vec<usize>,
            refs: Vec<v1::KeyRef>,
        }
        let topology = self.topology();
        let pick = (matches!(options.consistency, Consistency::Follower { .. }) && attempt == 0)
            .then(|| self.inner.follower_reads.fetch_add(1, Ordering::Relaxed));
        let mut batches: BTreeMap<usize, Batch> = BTreeMap::new();
        for (position, key) in keys.iter().enumerate() {
            let target = match pick {
                Some(pick) => topology.replica_target(key, pick)?,
                None => topology.target(key)?,
            };
            let batch = batches.entry(target.node).or_insert_with(|| Batch {
                addr: topology.node_addr(target.node).to_owned(),
                channel: target.channel.clone(),
                positions: Vec::new(),
                refs: Vec::new(),
            });
            batch.positions.push(position);
            batch.refs.push(v1::KeyRef {
                key: key.clone(),
                route: Some(target.route),
            });
        }
        let (consistency, max_staleness_ms) = options.consistency.to_wire();
        let config = &self.inner.config;
        let answers = try_join_all(batches.into_values().map(|batch| async move {
            let request = v1::MGetRequest {
                keys: batch.refs,
                consistency: consistency as i32,
                max_staleness_ms,
                min_lsn: options.min_lsn.map_or(0, |l| l.0),
            };
            self.inner.breakers.admit(&batch.addr, Instant::now())?;
            let answer = call(
                config,
                batch.channel,
                request,
                limit,
                |mut c, r| async move { c.m_get(r).await },
            )
            .await;
            self.inner
                .breakers
                .record(&batch.addr, &answer, Instant::now());
            let r = answer?;
            if r.values.len() != batch.positions.len() {
                return Err(ClientError::InvalidResponse(format!(
                    "MGet of {} keys answered {} values",
                    batch.positions.len(),
                    r.values.len()
                )));
            }
            Ok((batch.positions, r.values))
        }))
        .await?;
        let mut values = vec![None; keys.len()];
        for (positions, answers) in answers {
            for (position, r) in positions.into_iter().zip(answers) {
                values[position] = r.found.then(|| Value::from(r));
            }
        }
        Ok(values)
    }
}

/// How [`Client::resp_keyed`] may retry a forwarded Redis command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespCall {
    /// A read: retried on every transient failure.
    Read,
    /// A write whose outcome holds a value (`GETDEL`, `SET … GET`): retried, without a
    /// request id (a retry after a lost answer may apply it again).
    Write,
    /// A write applied once per request id across retries.
    WriteOnce,
}

/// Which failures a call retries, and what its final error says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// A read: every transient failure ([`ClientError::is_transient`]).
    Read,
    /// A write (applied once per request id by the node): every transient failure,
    /// and a final error that is surely unapplied only if every attempt was.
    Write,
}

/// What a map refresh looks for.
#[derive(Debug, Clone, Copy, Default)]
struct Want {
    /// At least this epoch (a `WRONG_EPOCH` named it).
    min_epoch: u64,
    /// A live leader of this partition (a `NOT_LEADER` without a usable hint).
    partition: Option<u32>,
    /// Ask only the configured endpoints (a node answered `REMOVED` or
    /// `WRONG_CLUSTER`: the nodes of the cached map may be another cluster's).
    endpoints: bool,
}

impl Want {
    fn observes_leader(&self, map: &ClusterMap) -> bool {
        self.partition.is_none_or(|p| {
            map.partition(p)
                .is_some_and(|p| p.observed && p.leader.is_some())
        })
    }

    fn is_met_by(&self, map: &ClusterMap) -> bool {
        map.epoch >= self.min_epoch && self.observes_leader(map)
    }

    /// Better maps rank higher: newer, then observing the wanted leader.
    fn rank(&self, map: &ClusterMap) -> (u64, bool) {
        (map.epoch, self.observes_leader(map))
    }
}

/// How long one attempt may take: `wait`, reported as `reported` when it runs out
/// (the request timeout, or the call's deadline when that cuts the attempt short).
#[derive(Debug, Clone, Copy)]
struct Limit {
    wait: Duration,
    reported: Duration,
}

impl Limit {
    /// The plain request timeout.
    fn request(config: &ClientConfig) -> Limit {
        Limit {
            wait: config.request_timeout,
            reported: config.request_timeout,
        }
    }

    /// The request timeout, cut to what is left before `deadline`; `None` when
    /// nothing is.
    fn until(config: &ClientConfig, deadline: Instant) -> Option<Limit> {
        let left = deadline.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        Some(if left < config.request_timeout {
            Limit {
                wait: left,
                reported: config.request_deadline,
            }
        } else {
            Limit::request(config)
        })
    }
}

/// Exponential back-off with full jitter.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(config: &ClientConfig) -> Backoff {
        Backoff {
            next: config.backoff_base,
            max: config.backoff_max,
        }
    }

    /// A pause drawn uniformly from zero to the current cap, which then doubles (up
    /// to the maximum).
    fn next_pause(&mut self) -> Duration {
        let cap = self.next.min(self.max);
        self.next = cap.saturating_mul(2);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// Fills in the partition of a `NOT_LEADER` that did not name it.
fn with_partition(error: ClientError, partition: u32) -> ClientError {
    match error {
        ClientError::NotLeader {
            partition: None,
            leader_id,
            leader_addr,
        } => ClientError::NotLeader {
            partition: Some(partition),
            leader_id,
            leader_addr,
        },
        other => other,
    }
}

/// Asks the configured endpoints in turn for a cluster map and builds the routing
/// table of the first usable one.
///
/// # Errors
/// A configuration error of any endpoint ([`is_misconfigured`]: it answers but is no
/// raftcache gRPC endpoint, or serves another cluster than the pinned one), else the
/// error of the last one, explained by [`diagnose`].
async fn map_from_endpoints(config: &ClientConfig, pool: &Pool) -> Result<Topology> {
    let mut last_error = ClientError::NoEndpoints;
    let mut misconfigured = None;
    for endpoint in &config.endpoints {
        let connected = fetch_map(config, pool, endpoint, Limit::request(config))
            .await
            .and_then(|map| {
                if config.cluster_id != 0 && map.cluster_id != config.cluster_id {
                    return Err(ClientError::WrongCluster(format!(
                        "{endpoint} belongs to cluster {:016x}, not {:016x}",
                        map.cluster_id, config.cluster_id
                    )));
                }
                Topology::new(map, pool, None)
            });
        match connected {
            Ok(topology) => {
                tracing::debug!(%endpoint, epoch = topology.map.epoch, "connected");
                return Ok(topology);
            }
            Err(e) => {
                tracing::debug!(%endpoint, error = %e, "endpoint did not answer with a map");
                let e = diagnose(config, endpoint, e).await;
                if misconfigured.is_none() && is_misconfigured(&e) {
                    misconfigured = Some(e.clone());
                }
                last_error = e;
            }
        }
    }
    Err(misconfigured.unwrap_or(last_error))
}

/// Errors that asking again will not fix: the endpoint configuration is wrong.
fn is_misconfigured(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::NoEndpoints
            | ClientError::InvalidEndpoint { .. }
            | ClientError::NotGrpcEndpoint(_)
            | ClientError::WrongCluster(_)
    )
}

/// Explains why `endpoint` gave no map: when it was not an answer of a raftcache
/// node, a probe of the port tells "nothing listens" from "something that is not
/// gRPC answers" (see [`crate::endpoint`]); otherwise a [`ClientError::Connect`]
/// naming the endpoint.
async fn diagnose(config: &ClientConfig, endpoint: &str, error: ClientError) -> ClientError {
    let message = match error {
        // Answers of a raftcache node (or of the config check): nothing to explain.
        e @ (ClientError::WrongCluster(_)
        | ClientError::Removed(_)
        | ClientError::InvalidEndpoint { .. }) => return e,
        // "cannot connect to X: unavailable: ..." would say it twice.
        ClientError::Unavailable(message) | ClientError::Unreachable(message) => message,
        other => other.to_string(),
    };
    match crate::endpoint::probe(endpoint, config.connect_timeout).await {
        crate::endpoint::Probe::Refused => ClientError::NothingListens(endpoint.to_owned()),
        crate::endpoint::Probe::NotHttp2 => ClientError::NotGrpcEndpoint(endpoint.to_owned()),
        crate::endpoint::Probe::Http2 | crate::endpoint::Probe::Unknown => ClientError::Connect {
            endpoint: endpoint.to_owned(),
            message,
        },
    }
}

/// Fetches and checks the cluster map of the node at `addr`.
async fn fetch_map(
    config: &ClientConfig,
    pool: &Pool,
    addr: &str,
    limit: Limit,
) -> Result<ClusterMap> {
    let channel = pool.channel(addr).map_err(|message| ClientError::Connect {
        endpoint: addr.to_owned(),
        message,
    })?;
    let map = call(
        config,
        channel,
        v1::ClusterMapRequest {},
        limit,
        |mut c, r| async move { c.cluster_map(r).await },
    )
    .await?;
    ClusterMap::try_from(map)
}

/// One `Cache` RPC on `channel`, bounded by `limit` (see [`bounded`]).
async fn call<Req, Resp, Fut>(
    config: &ClientConfig,
    channel: Channel,
    request: Req,
    limit: Limit,
    rpc: impl FnOnce(CacheClient<Channel>, Request<Req>) -> Fut,
) -> Result<Resp>
where
    Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
{
    let client = CacheClient::new(channel)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    bounded(limit, request, |r| rpc(client, r)).await
}

/// One RPC, bounded by `limit` twice over: as the gRPC deadline the node sees, and
/// as a local timer that also covers connecting.
async fn bounded<Req, Resp, Fut>(
    limit: Limit,
    request: Req,
    send: impl FnOnce(Request<Req>) -> Fut,
) -> Result<Resp>
where
    Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
{
    let timeout = limit.wait;
    let mut request = Request::new(request);
    request.set_timeout(timeout);
    let started = Instant::now();
    match tokio::time::timeout(timeout, send(request)).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        // The node gave up at our deadline (tonic servers answer CANCELLED then).
        Ok(Err(status))
            if status.code() == Code::DeadlineExceeded
                || (status.code() == Code::Cancelled && started.elapsed() >= timeout) =>
        {
            Err(ClientError::Timeout(limit.reported))
        }
        Ok(Err(status)) => Err(ClientError::from_status(&status)),
        Err(_elapsed) => Err(ClientError::Timeout(limit.reported)),
    }
}

/// A TTL on the wire: milliseconds, rounded up and at least 1; 0 for none.
fn ttl_ms(ttl: Option<Duration>) -> u64 {
    match ttl {
        None => 0,
        Some(ttl) => u64::try_from(ttl.as_nanos().div_ceil(1_000_000))
            .unwrap_or(u64::MAX)
            .max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_whole_milliseconds() {
        assert_eq!(ttl_ms(None), 0);
        assert_eq!(ttl_ms(Some(Duration::ZERO)), 1);
        assert_eq!(ttl_ms(Some(Duration::from_micros(1))), 1);
        assert_eq!(ttl_ms(Some(Duration::from_micros(1500))), 2);
        assert_eq!(ttl_ms(Some(Duration::from_secs(10))), 10_000);
        assert_eq!(ttl_ms(Some(Duration::MAX)), u64::MAX);
    }

    #[test]
    fn consistency_levels_on_the_wire() {
        assert_eq!(
            Consistency::default().to_wire(),
            (v1::Consistency::Lease, 0)
        );
        assert_eq!(
            Consistency::Linearizable.to_wire(),
            (v1::Consistency::Linearizable, 0)
        );
        let follower = Consistency::Follower {
            max_staleness: Duration::from_micros(100_900),
        };
        assert_eq!(follower.to_wire(), (v1::Consistency::Follower, 100));
    }

    #[test]
    fn a_get_response_becomes_a_value() {
        let v = Value::from(v1::GetResponse {
            found: true,
            value: Bytes::from_static(b"v"),
            version: 3,
            ttl_remaining_ms: Some(1500),
            source_lsn: 0x16_0000_0010,
        });
        assert_eq!(v.value, "v");
        assert_eq!(v.version, 3);
        assert_eq!(v.ttl, Some(Duration::from_millis(1500)));
        assert_eq!(v.source_lsn.to_string(), "16/10");
    }

    #[tokio::test]
    async fn connect_without_endpoints_fails_as_no_endpoints() {
        let config = ClientConfig::new(Vec::<String>::new());
        assert_eq!(
            Client::connect(config).await.unwrap_err(),
            ClientError::NoEndpoints
        );
    }

    #[tokio::test]
    async fn connect_reports_the_last_endpoint_that_failed() {
        // Two ports nothing listens on: bind, note the port, close.
        let free_port = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (a, b) = (free_port(), free_port());
        let mut config = ClientConfig::new([format!("127.0.0.1:{a}"), format!("127.0.0.1:{b}")]);
        config.connect_timeout = Duration::from_millis(500);
        config.request_timeout = Duration::from_secs(2);
        let e = Client::try_connect(config).await.unwrap_err();
        assert_eq!(e, ClientError::NothingListens(format!("127.0.0.1:{b}")));
        assert_eq!(e.to_string(), format!("nothing listens on 127.0.0.1:{b}"));
    }

    #[tokio::test]
    async fn connect_refuses_bad_endpoints_at_once() {
        let e = Client::connect(ClientConfig::new(["127.0.0.1"]))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::InvalidEndpoint { endpoint, .. } if endpoint == "127.0.0.1"),
            "{e:?}"
        );
        // Something that answers HTTP/1 (a node's metrics port).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await;
                });
            }
        });
        let e = Client::connect(ClientConfig::new([addr.as_str()]))
            .await
            .unwrap_err();
        assert_eq!(e, ClientError::NotGrpcEndpoint(addr.clone()));
        assert_eq!(
            e.to_string(),
            format!("{addr} is not a raftcache gRPC endpoint (is it the RESP or metrics port?)")
        );
    }

    #[tokio::test]
    async fn connect_without_a_node_gives_a_client_that_fails_fast() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::connect(ClientConfig::new([format!("127.0.0.1:{port}")]))
            .await
            .unwrap();
        assert!(!client.has_map());
        let started = Instant::now();
        let e = client.get("k").await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(e, ClientError::Unreachable(_)), "{e:?}");
        assert!(e.is_unapplied(), "{e:?}");
        assert!(e.to_string().contains("nothing listens on"), "{e}");
        let e = client.set("k", "v").await.unwrap_err();
        assert!(e.is_unapplied(), "{e:?}");
        assert!(client.stats().await.is_err());
    }
}
