//! [`Client`]: the typed API over the `raftcache.v1.Cache` service.
//!
//! Every keyed call hashes its key on the ring of the cached cluster map, sends the
//! request to the partition's leader with the route it used, and maps an error status
//! back to a [`ClientError`]. When a node answers `NOT_LEADER` or `WRONG_EPOCH`, the
//! client fetches a fresh map and tries once more.

use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use crate::pool::Pool;
use crate::routing::{ClusterMap, Topology};
use bytes::Bytes;
use futures::future::try_join_all;
use raftcache_proto::tonic::transport::Channel;
use raftcache_proto::tonic::{Code, Request, Response, Status};
use raftcache_proto::v1::{self, cache_client::CacheClient};
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

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
}

impl From<v1::GetResponse> for Value {
    fn from(r: v1::GetResponse) -> Self {
        Value {
            value: r.value,
            version: r.version,
            ttl: r.ttl_remaining_ms.map(Duration::from_millis),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetOptions {
    /// Time to live; `None` for none. Sent in milliseconds, rounded up, so any TTL
    /// (`Duration::ZERO` included) is at least 1 ms.
    pub ttl: Option<Duration>,
    /// When the write applies.
    pub condition: Condition,
    /// Keep the key's current TTL instead of applying `ttl` (Redis `KEEPTTL`).
    pub keep_ttl: bool,
}

/// The outcome of [`Client::set_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SetOutcome {
    /// Whether the value was written (false: the condition did not hold).
    pub applied: bool,
    /// When applied, the new version; otherwise the key's current one (0 if absent).
    pub version: u64,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
        }
    }
}

impl Client {
    /// Connects to a cluster: fetches the cluster map from the first endpoint of
    /// `config` that answers and builds the ring it describes.
    ///
    /// # Errors
    /// [`ClientError::NoEndpoints`] when `config.endpoints` is empty; otherwise, when
    /// no endpoint answers, the [`ClientError::Connect`] of the last one tried.
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
        let pool = Pool::new(&config);
        let mut last_error = ClientError::NoEndpoints;
        for endpoint in &config.endpoints {
            let connected = fetch_map(&config, &pool, endpoint)
                .await
                .and_then(|map| Topology::new(map, &pool, None));
            match connected {
                Ok(topology) => {
                    tracing::debug!(%endpoint, epoch = topology.map.epoch, "connected");
                    return Ok(Client {
                        inner: Arc::new(Inner {
                            topology: RwLock::new(Arc::new(topology)),
                            config,
                            pool,
                        }),
                    });
                }
                Err(e) => {
                    tracing::debug!(%endpoint, error = %e, "endpoint did not answer");
                    let message = match e {
                        // "cannot connect to X: unavailable: ..." would say it twice.
                        ClientError::Unavailable(message) => message,
                        other => other.to_string(),
                    };
                    last_error = ClientError::Connect {
                        endpoint: endpoint.clone(),
                        message,
                    };
                }
            }
        }
        Err(last_error)
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
    /// # Errors
    /// Any [`ClientError`]: a rejected key, an unreachable node, a timeout, ...
    pub async fn get_with(
        &self,
        key: impl AsRef<[u8]>,
        options: ReadOptions,
    ) -> Result<Option<Value>> {
        let r = self.get_raw(key.as_ref(), options, false).await?;
        Ok(r.found.then(|| Value::from(r)))
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
    /// back in the order of `keys`.
    ///
    /// # Errors
    /// The first error of any node; the call fails as a whole.
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
        self.routed(|| self.mget_once(&keys, options)).await
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
        let (condition, expected_version) = match options.condition {
            Condition::Always => (v1::SetCondition::None, 0),
            Condition::IfAbsent => (v1::SetCondition::IfAbsent, 0),
            Condition::IfPresent => (v1::SetCondition::IfPresent, 0),
            Condition::IfVersion(v) => (v1::SetCondition::IfVersion, v),
        };
        let r = self
            .keyed(
                key,
                |key, route| v1::SetRequest {
                    key,
                    value: value.clone(),
                    route: Some(route),
                    ttl_ms: ttl_ms(options.ttl),
                    condition: condition as i32,
                    expected_version,
                    keep_ttl: options.keep_ttl,
                },
                |mut c, r| async move { c.set(r).await },
            )
            .await?;
        Ok(SetOutcome {
            applied: r.applied,
            version: r.version,
        })
    }

    /// Removes `key`; true when a live key was removed.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let r = self
            .keyed(
                key.as_ref(),
                |key, route| v1::DeleteRequest {
                    key,
                    route: Some(route),
                },
                |mut c, r| async move { c.delete(r).await },
            )
            .await?;
        Ok(r.deleted)
    }

    /// Adds `delta` to the integer at `key` (a missing key counts as 0) and returns
    /// the result.
    ///
    /// # Errors
    /// [`ClientError::NotAnInteger`] when the value is not a base-10 `i64`,
    /// [`ClientError::IncrOverflow`] when the sum leaves the `i64` range, or any other
    /// [`ClientError`].
    pub async fn incr(&self, key: impl AsRef<[u8]>, delta: i64) -> Result<i64> {
        let r = self
            .keyed(
                key.as_ref(),
                |key, route| v1::IncrRequest {
                    key,
                    route: Some(route),
                    delta,
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
        let r = self
            .keyed(
                key.as_ref(),
                |key, route| v1::ExpireRequest {
                    key,
                    route: Some(route),
                    ttl_ms: ttl_ms(ttl),
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

    /// Fetches the cluster map afresh (from the nodes of the cached map, then the
    /// configured endpoints, whichever answers first) and caches it unless it is
    /// older than the cached one.
    ///
    /// # Errors
    /// The error of the last node tried when none answers, or
    /// [`ClientError::InvalidResponse`] for a map the client cannot use.
    pub async fn cluster_map(&self) -> Result<ClusterMap> {
        let current = self.topology();
        let mut candidates: Vec<&str> = current.map.nodes.iter().map(|n| n.addr.as_str()).collect();
        for endpoint in &self.inner.config.endpoints {
            if !candidates.contains(&endpoint.as_str()) {
                candidates.push(endpoint);
            }
        }
        let mut last_error = ClientError::NoEndpoints;
        for addr in candidates {
            match fetch_map(&self.inner.config, &self.inner.pool, addr).await {
                Ok(map) => {
                    self.install(map.clone())?;
                    return Ok(map);
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "cluster map fetch failed");
                    last_error = e;
                }
            }
        }
        Err(last_error)
    }

    /// The counters of every node in the cached cluster map, fetched concurrently, in
    /// the map's node order.
    ///
    /// # Errors
    /// The first error of any node.
    pub async fn stats(&self) -> Result<Vec<NodeStats>> {
        let topology = self.topology();
        let config = &self.inner.config;
        try_join_all(topology.nodes.iter().map(|node| async move {
            let s = call(
                config,
                node.channel.clone(),
                v1::StatsRequest {},
                |mut c, r| async move { c.stats(r).await },
            )
            .await?;
            Ok(NodeStats::new(node.info.addr.clone(), s))
        }))
        .await
    }

    /// The partition `key` belongs to under the cached cluster map.
    pub fn partition_of(&self, key: impl AsRef<[u8]>) -> u32 {
        self.topology().ring.partition_of(key)
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

    /// Caches `map` unless the cached one is newer.
    fn install(&self, map: ClusterMap) -> Result<()> {
        let current = self.topology();
        if map.epoch < current.map.epoch {
            tracing::debug!(
                fetched = map.epoch,
                cached = current.map.epoch,
                "ignoring an older cluster map"
            );
            return Ok(());
        }
        let topology = Arc::new(Topology::new(map, &self.inner.pool, Some(&current))?);
        let mut slot = self
            .inner
            .topology
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        // A concurrent refresh may have installed a newer map meanwhile.
        if topology.map.epoch >= slot.map.epoch {
            tracing::debug!(epoch = topology.map.epoch, "cluster map refreshed");
            *slot = topology;
        }
        Ok(())
    }

    /// Refreshes the cached map after a routing error. A failed refresh is logged and
    /// `error` is returned: it says more about the request than the refresh does.
    async fn refresh_after(&self, error: &ClientError) -> Result<()> {
        tracing::debug!(%error, "refreshing the cluster map");
        match self.cluster_map().await {
            Ok(_) => Ok(()),
            Err(refresh) => {
                tracing::debug!(error = %refresh, "cluster map refresh failed");
                Err(error.clone())
            }
        }
    }

    /// Sends a keyed request to the leader of the key's partition, with the retry of
    /// [`Client::routed`]. `build` makes the request from the key and the route.
    async fn keyed<Req, Resp, Fut>(
        &self,
        key: &[u8],
        build: impl Fn(Bytes, v1::Route) -> Req,
        rpc: impl Fn(CacheClient<Channel>, Request<Req>) -> Fut,
    ) -> Result<Resp>
    where
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let key = Bytes::copy_from_slice(key);
        let attempt = || async {
            let target = self.topology().target(&key)?;
            let request = build(key.clone(), target.route);
            call(&self.inner.config, target.channel, request, &rpc).await
        };
        self.routed(attempt).await
    }

    /// Runs `attempt`; on `NOT_LEADER` or `WRONG_EPOCH` refreshes the map and runs it
    /// once more (it routes again with the new map). The one retry policy of every
    /// routed call.
    async fn routed<T, Fut>(&self, attempt: impl Fn() -> Fut) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        match attempt().await {
            Err(e) if e.is_routing() => {
                self.refresh_after(&e).await?;
                attempt().await
            }
            answer => answer,
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
        self.keyed(
            key,
            |key, route| v1::GetRequest {
                key,
                route: Some(route),
                consistency: consistency as i32,
                max_staleness_ms,
                skip_value,
            },
            |mut c, r| async move { c.get(r).await },
        )
        .await
    }

    /// One routing of a multi-get: keys grouped by leader node, one `MGet` per node.
    async fn mget_once(&self, keys: &[Bytes], options: ReadOptions) -> Result<Vec<Option<Value>>> {
        struct Batch {
            channel: Channel,
            /// Where each key of the batch sits in `keys`.
            positions: Vec<usize>,
            refs: Vec<v1::KeyRef>,
        }
        let topology = self.topology();
        let mut batches: BTreeMap<u64, Batch> = BTreeMap::new();
        for (position, key) in keys.iter().enumerate() {
            let target = topology.target(key)?;
            let batch = batches.entry(target.node_id).or_insert_with(|| Batch {
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
            };
            let r = call(config, batch.channel, request, |mut c, r| async move {
                c.m_get(r).await
            })
            .await?;
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

/// Fetches and checks the cluster map of the node at `addr`.
async fn fetch_map(config: &ClientConfig, pool: &Pool, addr: &str) -> Result<ClusterMap> {
    let channel = pool.channel(addr).map_err(|message| ClientError::Connect {
        endpoint: addr.to_owned(),
        message,
    })?;
    let map = call(
        config,
        channel,
        v1::ClusterMapRequest {},
        |mut c, r| async move { c.cluster_map(r).await },
    )
    .await?;
    ClusterMap::try_from(map)
}

/// One RPC on `channel`, bounded by the request timeout twice over: as the gRPC
/// deadline the node sees, and as a local timer that also covers connecting.
async fn call<Req, Resp, Fut>(
    config: &ClientConfig,
    channel: Channel,
    request: Req,
    rpc: impl FnOnce(CacheClient<Channel>, Request<Req>) -> Fut,
) -> Result<Resp>
where
    Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
{
    let timeout = config.request_timeout;
    let mut request = Request::new(request);
    request.set_timeout(timeout);
    let client = CacheClient::new(channel)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(timeout, rpc(client, request)).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        // The node gave up at our deadline (tonic servers answer CANCELLED then).
        Ok(Err(status))
            if status.code() == Code::DeadlineExceeded
                || (status.code() == Code::Cancelled && started.elapsed() >= timeout) =>
        {
            Err(ClientError::Timeout(timeout))
        }
        Ok(Err(status)) => Err(ClientError::from_status(&status)),
        Err(_elapsed) => Err(ClientError::Timeout(timeout)),
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
        });
        assert_eq!(v.value, "v");
        assert_eq!(v.version, 3);
        assert_eq!(v.ttl, Some(Duration::from_millis(1500)));
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
        match Client::connect(config).await.unwrap_err() {
            ClientError::Connect { endpoint, message } => {
                assert_eq!(endpoint, format!("127.0.0.1:{b}"));
                assert!(!message.is_empty());
                println!("connect error: {message}");
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
}
