//! [`Client::get_or_load`]: cache-aside reads that protect the database.
//!
//! The seed articles spend most of their words on what goes wrong *around* a cache:
//! a hot key expires and a thousand callers hit the database at once (a stampede), a
//! node dies or the cache is flushed and every miss becomes a query (a herd), the
//! cache is down and the app errors or melts its database. `get_or_load` answers each
//! of them, in layers:
//!
//! 1. **Single-flight** (per client): concurrent callers for one key share one flight
//!    (one cache round trip and at most one loader call); the flight runs as its own
//!    task, so a caller that gives up does not cancel it for the others.
//! 2. **Leases** (cluster-wide, on the node: `GetOrLease`): on a miss exactly one
//!    caller across every process gets a lease token and runs the loader; the others
//!    are told to WAIT and poll again after a short jittered pause (or get the stale
//!    value, see 4). The fill is a `Set` presenting the token, and any write, delete
//!    or CDC change of the key in between voids it (Facebook's memcache leases), so a
//!    slow loader never puts back a value that was replaced meanwhile. A waiter that
//!    waited [`LoadOptions::lease_wait`] loads by itself (the lease holder may have
//!    died; its lease expires after [`LoadOptions::lease_ttl`]).
//! 3. **Early refresh (XFetch)**: on a hit, with `Δ` the loader's measured cost for
//!    the key (an EWMA, or of any key until this one was measured) and `t` the fresh
//!    time left, the flight refreshes in the background when `Δ·β·(−ln U) ≥ t`,
//!    `U` uniform in (0, 1] (Vattani, Chierichetti, Lowenstein: "Optimal Probabilistic
//!    Cache Stampede Prevention", VLDB 2015): rarely while `t ≫ Δ`, almost surely
//!    just before expiry, so a hot key is recomputed once, before it expires, instead
//!    of by everyone after. The refresh takes a lease too, so only one process does it.
//! 4. **Stale-while-revalidate**: a value is stored with TTL `ttl + stale_ttl`; while
//!    its remaining TTL is within `stale_ttl` it is *stale*. The node grants one caller
//!    a lease to refresh it and hands the stale value to everyone (that caller
//!    included: its refresh runs in the background).
//! 5. **Degraded mode**: when the cache cannot answer within
//!    [`LoadConfig::cache_deadline`] (a node down, an election, the whole cluster
//!    stopped; the per-node circuit breakers of [`crate::breaker`] make this fail
//!    fast), the loader is called directly, at most
//!    [`LoadConfig::degraded_concurrency`] at once per client; callers beyond that wait
//!    up to [`LoadConfig::degraded_wait`] and then fail with [`LoadError::Overloaded`].
//!    The database sees a bounded load, the app sees answers, never an error storm.
//!
//! Every layer counts what it did ([`LoadStats`], also exported through the `metrics`
//! facade as `raftcache_client_*`).

use crate::client::{Client, ReadOptions, Retry, Value};
use crate::error::ClientError;
use crate::near::NearRead;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::TryFutureExt;
use raftcache_proto::pg_snapshot::PgSnapshot;
use raftcache_proto::v1::{self, LeaseOutcome};
use rand::Rng;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// How many keys' loader costs are remembered for XFetch.
const COST_KEYS: usize = 4096;

/// A stale window longer than any TTL a loader sets (ten years, in ms): asked for by
/// an early refresh, so that the node leases a value that is still fresh.
const ANY_TTL_IS_STALE_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// How `get_or_load` protects the loader (part of [`ClientConfig`](crate::ClientConfig)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadConfig {
    /// At most this many loader calls run at once in this client while the cache
    /// cannot answer (degraded mode).
    pub degraded_concurrency: usize,
    /// How long a flight waits for the cache (retries included) before it calls the
    /// loader directly.
    pub cache_deadline: Duration,
    /// How long a degraded caller waits for one of the loader slots before failing
    /// with [`LoadError::Overloaded`].
    pub degraded_wait: Duration,
}

impl Default for LoadConfig {
    /// 8 degraded loaders at once, a 1 s cache deadline, a 5 s wait for a slot.
    fn default() -> Self {
        LoadConfig {
            degraded_concurrency: 8,
            cache_deadline: Duration::from_secs(1),
            degraded_wait: Duration::from_secs(5),
        }
    }
}

/// The options of one [`Client::get_or_load`] call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    /// How long a loaded value is fresh; `None`: forever.
    pub ttl: Option<Duration>,
    /// How long after `ttl` the value may still be served (stale) while one caller
    /// refreshes it; zero: never served stale. Ignored without `ttl`.
    pub stale_ttl: Duration,
    /// Use the node's leases (one loader across all processes); off: plain
    /// get-then-set cache-aside.
    pub leases: bool,
    /// How long a granted lease lasts (1 ms to 60 s).
    pub lease_ttl: Duration,
    /// How long a caller waits for another process's lease before loading by itself.
    pub lease_wait: Duration,
    /// Share one flight among this client's concurrent callers of a key.
    pub single_flight: bool,
    /// XFetch's β: above 1 favours earlier refreshes; 0 disables early refresh.
    pub xfetch_beta: f64,
}

impl LoadOptions {
    /// Fresh for `ttl`, every protection on, no stale serving.
    pub fn ttl(ttl: Duration) -> LoadOptions {
        LoadOptions {
            ttl: Some(ttl),
            ..LoadOptions::default()
        }
    }

    /// Also serve the value stale for up to `stale_ttl` after it expires while one
    /// caller refreshes it.
    pub fn stale_while_revalidate(mut self, stale_ttl: Duration) -> LoadOptions {
        self.stale_ttl = stale_ttl;
        self
    }

    /// Every protection off: plain cache-aside (get; on a miss load and set). For
    /// comparison in benchmarks.
    pub fn unprotected(mut self) -> LoadOptions {
        self.leases = false;
        self.single_flight = false;
        self.xfetch_beta = 0.0;
        self.stale_ttl = Duration::ZERO;
        self
    }
}

impl Default for LoadOptions {
    /// No TTL, leases of 10 s, waits of up to 3 s for another loader, single-flight,
    /// XFetch with β = 1, no stale serving.
    fn default() -> Self {
        LoadOptions {
            ttl: None,
            stale_ttl: Duration::ZERO,
            leases: true,
            lease_ttl: Duration::from_secs(10),
            lease_wait: Duration::from_secs(3),
            single_flight: true,
            xfetch_beta: 1.0,
        }
    }
}

/// Where a [`Loaded`] value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadSource {
    /// A fresh value from the cache.
    Cache,
    /// A stale value from the cache (a refresh is under way).
    Stale,
    /// This flight called the loader (and filled the cache).
    Loader,
    /// The cache could not answer; the loader was called directly.
    Degraded,
}

/// The answer of [`Client::get_or_load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The value.
    pub value: Bytes,
    /// Where it came from.
    pub source: LoadSource,
}

/// Why [`Client::get_or_load`] has no value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// The loader failed (shared by every caller of the flight).
    #[error("loader failed: {0:#}")]
    Loader(Arc<anyhow::Error>),
    /// The cache is unavailable and every degraded loader slot stayed busy for the
    /// whole wait.
    #[error("cache unavailable and {slots} loader slots stayed busy for {}", humantime::format_duration(*waited))]
    Overloaded {
        /// [`LoadConfig::degraded_concurrency`].
        slots: usize,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The flight's task ended without an answer (the runtime is shutting down).
    #[error("the load was cancelled")]
    Cancelled,
}

/// What `get_or_load` did, counted since the client was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LoadStats {
    /// Calls of `get_or_load`.
    pub calls: u64,
    /// Calls that joined a flight already under way.
    pub coalesced: u64,
    /// Flights answered by a fresh cached value.
    pub hits: u64,
    /// Flights answered by a stale value.
    pub stale: u64,
    /// Flights that found no usable value.
    pub misses: u64,
    /// Loader calls (foreground, background and degraded).
    pub loader_calls: u64,
    /// Loader calls that failed.
    pub loader_errors: u64,
    /// Leases granted to this client.
    pub lease_grants: u64,
    /// WAIT answers (another process held the lease).
    pub lease_waits: u64,
    /// Fills refused because the lease had been voided.
    pub lease_lost: u64,
    /// Background refreshes started by XFetch.
    pub early_refreshes: u64,
    /// Loader calls made because the cache could not answer.
    pub degraded: u64,
    /// Callers refused with [`LoadError::Overloaded`].
    pub overloaded: u64,
    /// The most loader calls this client ran at once.
    pub max_concurrent_loads: u64,
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    coalesced: AtomicU64,
    hits: AtomicU64,
    stale: AtomicU64,
    misses: AtomicU64,
    loader_calls: AtomicU64,
    loader_errors: AtomicU64,
    lease_grants: AtomicU64,
    lease_waits: AtomicU64,
    lease_lost: AtomicU64,
    early_refreshes: AtomicU64,
    degraded: AtomicU64,
    overloaded: AtomicU64,
    running_loads: AtomicU64,
    max_concurrent_loads: AtomicU64,
}

/// Counts one event in the struct and in the metrics facade.
macro_rules! count {
    ($counters:expr, $field:ident) => {{
        $counters.$field.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(concat!("raftcache_client_", stringify!($field), "_total")).increment(1);
    }};
}

type Flight = Shared<BoxFuture<'static, Result<Loaded, LoadError>>>;

/// The per-client state of `get_or_load` (lives in the client's shared state).
pub(crate) struct Loads {
    flights: Mutex<HashMap<Bytes, Flight>>,
    /// Background refreshes under way, so that one key is refreshed once at a time.
    refreshing: Mutex<std::collections::HashSet<Bytes>>,
    limiter: Arc<Semaphore>,
    costs: Mutex<Costs>,
    counters: Counters,
}

/// By hand: the flights are boxed futures, which have no `Debug`.
impl std::fmt::Debug for Loads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loads")
            .field("stats", &self.stats())
            .field("slots", &self.limiter.available_permits())
            .finish_non_exhaustive()
    }
}

impl Loads {
    pub(crate) fn new(config: &LoadConfig) -> Loads {
        Loads {
            flights: Mutex::new(HashMap::new()),
            refreshing: Mutex::new(std::collections::HashSet::new()),
            limiter: Arc::new(Semaphore::new(config.degraded_concurrency.max(1))),
            costs: Mutex::new(Costs::default()),
            counters: Counters::default(),
        }
    }

    fn stats(&self) -> LoadStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LoadStats {
            calls: get(&c.calls),
            coalesced: get(&c.coalesced),
            hits: get(&c.hits),
            stale: get(&c.stale),
            misses: get(&c.misses),
            loader_calls: get(&c.loader_calls),
            loader_errors: get(&c.loader_errors),
            lease_grants: get(&c.lease_grants),
            lease_waits: get(&c.lease_waits),
            lease_lost: get(&c.lease_lost),
            early_refreshes: get(&c.early_refreshes),
            degraded: get(&c.degraded),
            overloaded: get(&c.overloaded),
            max_concurrent_loads: get(&c.max_concurrent_loads),
        }
    }
}

/// Loader costs for XFetch: an EWMA per key (bounded), and one over every key for keys
/// not measured yet.
#[derive(Debug, Default)]
pub(crate) struct Costs {
    by_key: HashMap<Bytes, f64>,
    any: Option<f64>,
}

impl Costs {
    /// Weight of a new measurement.
    const ALPHA: f64 = 0.3;

    fn record(&mut self, key: &Bytes, seconds: f64) {
        let blend = |old: Option<f64>| match old {
            Some(old) => old + Self::ALPHA * (seconds - old),
            None => seconds,
        };
        self.any = Some(blend(self.any));
        if !self.by_key.contains_key(key) && self.by_key.len() >= COST_KEYS {
            // Forget an arbitrary key: the bound matters, the choice hardly does.
            if let Some(victim) = self.by_key.keys().next().cloned() {
                self.by_key.remove(&victim);
            }
        }
        let next = blend(self.by_key.get(key).copied());
        self.by_key.insert(key.clone(), next);
    }

    fn cost(&self, key: &[u8]) -> Option<f64> {
        self.by_key.get(key).copied().or(self.any)
    }
}

/// XFetch's decision: refresh now when `Δ·β·(−ln u) ≥ fresh_left`, `u` in (0, 1].
pub(crate) fn xfetch(cost: Duration, beta: f64, fresh_left: Duration, u: f64) -> bool {
    if beta <= 0.0 || cost.is_zero() {
        return false;
    }
    let u = u.clamp(f64::MIN_POSITIVE, 1.0);
    cost.as_secs_f64() * beta * -u.ln() >= fresh_left.as_secs_f64()
}

/// Whether a value with `ttl_left` is past its fresh life (inside the stale window).
fn is_stale(ttl_left: Option<Duration>, stale_ttl: Duration) -> bool {
    !stale_ttl.is_zero() && ttl_left.is_some_and(|left| left <= stale_ttl)
}

/// What a cache round trip of a flight found.
enum Found {
    /// A fresh value (the node's answer, as a [`Value`]).
    Fresh(Value),
    /// A stale value; someone else refreshes it.
    Stale(Bytes),
    /// A stale value this flight must refresh (under the lease `token`; 0: plainly).
    StaleRefresh(Bytes, u64),
    /// This flight holds the lease (token 0: none, fill plainly).
    Lease(u64),
    /// Another process held the lease for all of `lease_wait`.
    WaitedOut,
}

/// What a loader gives: the value and, for an exact fill, the Postgres snapshot it was
/// read under.
type LoaderOutput = (Bytes, Option<PgSnapshot>);
type BoxLoader = Box<dyn FnOnce() -> BoxFuture<'static, anyhow::Result<LoaderOutput>> + Send>;

impl Client {
    /// Reads `key`, or computes it with `loader` and caches it, protecting the loader
    /// from stampedes, herds and cache outages (see the [module](crate::load) docs).
    ///
    /// The loader runs at most once per flight; its error is returned to every caller
    /// of the flight and nothing is cached.
    ///
    /// # Errors
    /// [`LoadError::Loader`] when the loader failed, [`LoadError::Overloaded`] when
    /// the cache is down and the degraded loader slots stayed busy.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn demo(client: raftcache_client::Client) -> Result<(), raftcache_client::LoadError> {
    /// use raftcache_client::LoadOptions;
    /// use std::time::Duration;
    /// let options = LoadOptions::ttl(Duration::from_secs(60))
    ///     .stale_while_revalidate(Duration::from_secs(10));
    /// let user = client
    ///     .get_or_load("user:42", options, || async {
    ///         // SELECT ... FROM users WHERE id = 42
    ///         Ok(bytes::Bytes::from_static(b"{\"name\":\"Ada\"}"))
    ///     })
    ///     .await?;
    /// println!("{:?} from {:?}", user.value, user.source);
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load<F, Fut>(
        &self,
        key: impl AsRef<[u8]>,
        options: LoadOptions,
        loader: F,
    ) -> Result<Loaded, LoadError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<Bytes>> + Send + 'static,
    {
        let loader: BoxLoader = Box::new(move || loader().map_ok(|v| (v, None)).boxed());
        self.get_or_load_boxed(key.as_ref(), options, loader).await
    }

    /// [`get_or_load`](Self::get_or_load) whose loader also returns the Postgres
    /// snapshot the row was read under, so that the fill is exact (as
    /// [`Client::set_if_fresh`]): a fill that a concurrent commit made stale is refused
    /// (the caller still gets the loaded value) or removed when the commit's
    /// invalidation arrives.
    ///
    /// ```no_run
    /// # async fn demo(client: raftcache_client::Client, db: tokio_postgres::Client) -> Result<(), raftcache_client::LoadError> {
    /// use raftcache_client::{LoadOptions, PgSnapshot};
    /// use std::time::Duration;
    /// let user = client
    ///     .get_or_load_fresh("user:42", LoadOptions::ttl(Duration::from_secs(60)), move || async move {
    ///         let row = db
    ///             .query_one(
    ///                 "SELECT pg_current_snapshot()::text, row_to_json(u)::text FROM users u WHERE id = 42",
    ///                 &[],
    ///             )
    ///             .await?;
    ///         let snapshot: PgSnapshot = row.get::<_, String>(0).parse()?;
    ///         Ok((bytes::Bytes::from(row.get::<_, String>(1)), snapshot))
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load).
    pub async fn get_or_load_fresh<F, Fut>(
        &self,
        key: impl AsRef<[u8]>,
        options: LoadOptions,
        loader: F,
    ) -> Result<Loaded, LoadError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<(Bytes, PgSnapshot)>> + Send + 'static,
    {
        let loader: BoxLoader = Box::new(move || loader().map_ok(|(v, s)| (v, Some(s))).boxed());
        self.get_or_load_boxed(key.as_ref(), options, loader).await
    }

    async fn get_or_load_boxed(
        &self,
        key: &[u8],
        options: LoadOptions,
        loader: BoxLoader,
    ) -> Result<Loaded, LoadError> {
        let loads = &self.loads();
        count!(loads.counters, calls);
        let key = Bytes::copy_from_slice(key);
        // A fresh near-cache hit needs no flight at all.
        if let NearRead::Hit(value) = self.near_read(&key, &ReadOptions::default()) {
            if !is_stale(value.ttl, options.stale_ttl) {
                count!(loads.counters, hits);
                return Ok(Loaded {
                    value: value.value,
                    source: LoadSource::Cache,
                });
            }
        }
        if !options.single_flight {
            return self.clone().flight(key, options, loader).await;
        }
        let flight = {
            let mut flights = loads.flights.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(flight) = flights.get(&key) {
                count!(loads.counters, coalesced);
                flight.clone()
            } else {
                let client = self.clone();
                let task_key = key.clone();
                let task = tokio::spawn(async move {
                    let answer = client
                        .clone()
                        .flight(task_key.clone(), options, loader)
                        .await;
                    client
                        .loads()
                        .flights
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&task_key);
                    answer
                });
                let flight: Flight = async move { task.await.unwrap_or(Err(LoadError::Cancelled)) }
                    .boxed()
                    .shared();
                flights.insert(key, flight.clone());
                flight
            }
        };
        flight.await
    }

    /// What `get_or_load` did since this client was created.
    pub fn load_stats(&self) -> LoadStats {
        self.loads().stats()
    }

    /// One flight: the cache round trip(s), then the loader if needed.
    async fn flight(
        self,
        key: Bytes,
        options: LoadOptions,
        loader: BoxLoader,
    ) -> Result<Loaded, LoadError> {
        let counters = &self.loads().counters;
        // With a near cache: a ticket taken before the round trip, so that a fresh
        // value read is kept near unless an invalidation overtook it.
        let near_fill = match self.near_read(&key, &ReadOptions::default()) {
            NearRead::Miss(fill) => fill,
            NearRead::Hit(_) | NearRead::Bypass => None,
        };
        let found = if self.is_key_node_open(&key) {
            // Skip the failing node at once; a fresher map may name a new leader.
            self.refresh_in_background();
            Err(ClientError::CircuitOpen("the key's leader".into()))
        } else if options.leases {
            self.lookup_leased(&key, &options).await
        } else {
            self.lookup_plain(&key, &options).await
        };
        match found {
            Ok(Found::Fresh(value)) => {
                count!(counters, hits);
                if let Some(fill) = near_fill {
                    fill.complete(Some(&value));
                }
                self.maybe_refresh_early(&key, &options, value.ttl, loader);
                Ok(Loaded {
                    value: value.value,
                    source: LoadSource::Cache,
                })
            }
            Ok(Found::Stale(value)) => {
                count!(counters, stale);
                Ok(Loaded {
                    value,
                    source: LoadSource::Stale,
                })
            }
            Ok(Found::StaleRefresh(value, token)) => {
                count!(counters, stale);
                self.spawn_refresh(key, options, loader, Some(token));
                Ok(Loaded {
                    value,
                    source: LoadSource::Stale,
                })
            }
            Ok(Found::Lease(token)) => {
                count!(counters, misses);
                let (value, snapshot) = match self.load(&key, loader).await {
                    Ok(loaded) => loaded,
                    Err(error) => {
                        self.release(key, token);
                        return Err(error);
                    }
                };
                self.fill(&key, &options, value.clone(), snapshot, token)
                    .await;
                Ok(Loaded {
                    value,
                    source: LoadSource::Loader,
                })
            }
            Ok(Found::WaitedOut) => {
                count!(counters, misses);
                // The holder may be dead; its lease runs out by itself. Load without
                // filling: only a lease holder may fill.
                let (value, _) = self.load(&key, loader).await?;
                Ok(Loaded {
                    value,
                    source: LoadSource::Loader,
                })
            }
            Err(error) => {
                tracing::debug!(key = ?key, %error, "cache unavailable; loading directly");
                self.degraded(&key, loader).await
            }
        }
    }

    /// The cache round trips with leases. A stale value with a lease for us starts
    /// the refresh in the background.
    async fn lookup_leased(&self, key: &Bytes, options: &LoadOptions) -> crate::Result<Found> {
        let counters = &self.loads().counters;
        let waited_from = Instant::now();
        loop {
            if waited_from.elapsed() >= options.lease_wait {
                return Ok(Found::WaitedOut);
            }
            let answer = self
                .get_or_lease(key, options.lease_ttl, stale_window(options))
                .await?;
            let stale = answer
                .value
                .as_ref()
                .filter(|v| v.found)
                .map(|v| v.value.clone());
            match answer.outcome() {
                LeaseOutcome::Hit => match answer.value {
                    Some(value) if value.found => return Ok(Found::Fresh(Value::from(value))),
                    // Deleted between the node's decision and its read: ask again.
                    _ => continue,
                },
                LeaseOutcome::Granted => {
                    count!(counters, lease_grants);
                    return Ok(match stale {
                        Some(stale) => Found::StaleRefresh(stale, answer.lease_token),
                        None => Found::Lease(answer.lease_token),
                    });
                }
                LeaseOutcome::Miss => return Ok(Found::Lease(0)),
                LeaseOutcome::Wait => {
                    count!(counters, lease_waits);
                    if let Some(stale) = stale {
                        return Ok(Found::Stale(stale));
                    }
                    // Poll again soon: the holder's fill is usually one loader call away.
                    let left = Duration::from_millis(answer.lease_remaining_ms.max(1));
                    let pause = Duration::from_millis(rand::rng().random_range(10..=40));
                    tokio::time::sleep(pause.min(left)).await;
                }
                LeaseOutcome::Unspecified => {
                    return Err(ClientError::InvalidResponse(
                        "GetOrLease answered without an outcome".into(),
                    ))
                }
            }
        }
    }

    /// The cache round trip without leases: a plain get, stale values served while this
    /// client refreshes them in the background.
    async fn lookup_plain(&self, key: &Bytes, options: &LoadOptions) -> crate::Result<Found> {
        let budget = self.config().load.cache_deadline;
        let answer = self
            .keyed_within(
                key,
                budget,
                Retry::Read,
                false,
                |key, route| v1::GetRequest {
                    key,
                    route: Some(route),
                    ..Default::default()
                },
                |mut c, r| async move { c.get(r).await },
            )
            .await?;
        if !answer.found {
            return Ok(Found::Lease(0));
        }
        let ttl_left = answer.ttl_remaining_ms.map(Duration::from_millis);
        if is_stale(ttl_left, options.stale_ttl) {
            return Ok(Found::StaleRefresh(answer.value, 0));
        }
        Ok(Found::Fresh(Value::from(answer)))
    }

    /// One `GetOrLease`, within the cache deadline.
    async fn get_or_lease(
        &self,
        key: &Bytes,
        lease_ttl: Duration,
        stale_window_ms: u64,
    ) -> crate::Result<v1::GetOrLeaseResponse> {
        let lease_ttl_ms = u64::try_from(lease_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, 60_000);
        self.keyed_within(
            key,
            self.config().load.cache_deadline,
            Retry::Read,
            false,
            |key, route| v1::GetOrLeaseRequest {
                key,
                route: Some(route),
                lease_ttl_ms,
                stale_window_ms,
            },
            |mut c, r| async move { c.get_or_lease(r).await },
        )
        .await
    }

    /// Runs the loader, timing it for XFetch and counting it.
    async fn load(&self, key: &Bytes, loader: BoxLoader) -> Result<LoaderOutput, LoadError> {
        let loads = &self.loads();
        count!(loads.counters, loader_calls);
        let running = loads.counters.running_loads.fetch_add(1, Ordering::Relaxed) + 1;
        loads
            .counters
            .max_concurrent_loads
            .fetch_max(running, Ordering::Relaxed);
        let started = Instant::now();
        let answer = loader().await;
        loads.counters.running_loads.fetch_sub(1, Ordering::Relaxed);
        match answer {
            Ok(value) => {
                loads
                    .costs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(key, started.elapsed().as_secs_f64());
                Ok(value)
            }
            Err(error) => {
                count!(loads.counters, loader_errors);
                Err(LoadError::Loader(Arc::new(error)))
            }
        }
    }

    /// Writes a loaded value: under the lease `token`, or plainly when 0. A failed or
    /// refused fill is logged and counted, never the caller's error: the caller has
    /// its value.
    async fn fill(
        &self,
        key: &Bytes,
        options: &LoadOptions,
        value: Bytes,
        snapshot: Option<PgSnapshot>,
        token: u64,
    ) {
        let snapshot = snapshot.as_ref().map(PgSnapshot::to_wire);
        let ttl_ms = options.ttl.map_or(0, |ttl| {
            let total = if options.stale_ttl.is_zero() {
                ttl
            } else {
                ttl + options.stale_ttl
            };
            u64::try_from(total.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        let request = self.request_id();
        // Own write: the near cache (if any) must not keep serving the old value.
        let _near = self.near_write(key);
        let answer = self
            .keyed_within(
                key,
                self.config().load.cache_deadline,
                Retry::Write,
                false,
                |key, route| v1::SetRequest {
                    key,
                    value: value.clone(),
                    route: Some(route),
                    ttl_ms,
                    condition: v1::SetCondition::None as i32,
                    request: Some(request),
                    lease_token: token,
                    source_snapshot: snapshot.clone(),
                    ..Default::default()
                },
                |mut c, r| async move { c.set(r).await },
            )
            .await;
        match answer {
            Ok(r) if r.lease_lost => {
                count!(self.loads().counters, lease_lost);
                tracing::debug!(key = ?key, "fill refused: the lease was voided by a newer write");
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(key = ?key, %error, "fill failed"),
        }
    }

    /// Gives a lease back after the loader failed, in the background.
    fn release(&self, key: Bytes, token: u64) {
        if token == 0 {
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            let answer = client
                .keyed_within(
                    &key,
                    client.config().load.cache_deadline,
                    Retry::Write,
                    false,
                    |key, route| v1::ReleaseLeaseRequest {
                        key,
                        route: Some(route),
                        lease_token: token,
                    },
                    |mut c, r| async move { c.release_lease(r).await },
                )
                .await;
            if let Err(error) = answer {
                tracing::debug!(key = ?key, %error, "lease release failed");
            }
        });
    }

    /// XFetch: on a hit, maybe refresh before expiry.
    fn maybe_refresh_early(
        &self,
        key: &Bytes,
        options: &LoadOptions,
        ttl_left: Option<Duration>,
        loader: BoxLoader,
    ) {
        let Some(ttl_left) = ttl_left else { return };
        let fresh_left = ttl_left.saturating_sub(options.stale_ttl);
        let cost = self
            .loads()
            .costs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cost(key);
        let Some(cost) = cost else { return };
        let u: f64 = rand::rng().random_range(f64::MIN_POSITIVE..=1.0);
        if xfetch(
            Duration::from_secs_f64(cost),
            options.xfetch_beta,
            fresh_left,
            u,
        ) {
            count!(self.loads().counters, early_refreshes);
            self.spawn_refresh(key.clone(), *options, loader, None);
        }
    }

    /// Refreshes `key` in the background, once per key at a time in this client.
    /// With `token` the lease is already ours (0: fill plainly); otherwise, with leases
    /// on, one is asked for with a stale window covering any TTL, so that the node
    /// grants it to one caller across the cluster (a WAIT or HIT means someone else
    /// refreshes, or there is nothing to refresh).
    fn spawn_refresh(
        &self,
        key: Bytes,
        options: LoadOptions,
        loader: BoxLoader,
        token: Option<u64>,
    ) {
        let fresh = self
            .loads()
            .refreshing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone());
        if !fresh {
            if let Some(token) = token {
                self.release(key, token);
            }
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            let token = match token {
                Some(token) => Some(token),
                None if options.leases => {
                    match client
                        .get_or_lease(&key, options.lease_ttl, ANY_TTL_IS_STALE_MS)
                        .await
                    {
                        Ok(a) if a.outcome() == LeaseOutcome::Granted => Some(a.lease_token),
                        Ok(a) if a.outcome() == LeaseOutcome::Miss => Some(0),
                        Ok(_) => None,
                        Err(error) => {
                            tracing::debug!(key = ?key, %error, "no refresh: cache unavailable");
                            None
                        }
                    }
                }
                None => Some(0),
            };
            if let Some(token) = token {
                match client.load(&key, loader).await {
                    Ok((value, snapshot)) => {
                        client.fill(&key, &options, value, snapshot, token).await
                    }
                    Err(error) => {
                        tracing::debug!(key = ?key, %error, "background refresh failed");
                        client.release(key.clone(), token);
                    }
                }
            }
            client
                .loads()
                .refreshing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&key);
        });
    }

    /// Calls the loader directly (the cache cannot answer), at most
    /// `degraded_concurrency` at once.
    async fn degraded(&self, key: &Bytes, loader: BoxLoader) -> Result<Loaded, LoadError> {
        let loads = &self.loads();
        let config = &self.config().load;
        let started = Instant::now();
        let permit = tokio::time::timeout(
            config.degraded_wait,
            Arc::clone(&loads.limiter).acquire_owned(),
        )
        .await;
        let Ok(Ok(_permit)) = permit else {
            count!(loads.counters, overloaded);
            return Err(LoadError::Overloaded {
                slots: config.degraded_concurrency,
                waited: started.elapsed(),
            });
        };
        count!(loads.counters, degraded);
        let (value, _) = self.load(key, loader).await?;
        Ok(Loaded {
            value,
            source: LoadSource::Degraded,
        })
    }
}

/// The stale window to ask the node for.
fn stale_window(options: &LoadOptions) -> u64 {
    if options.ttl.is_none() {
        return 0;
    }
    u64::try_from(options.stale_ttl.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfetch_refreshes_more_often_as_expiry_nears() {
        let cost = Duration::from_millis(100);
        // The share of u in (0, 1] (a fine grid) for which XFetch refreshes.
        let share = |left_ms: u64| {
            let n = 10_000;
            (1..=n)
                .filter(|&i| {
                    xfetch(
                        cost,
                        1.0,
                        Duration::from_millis(left_ms),
                        f64::from(i) / f64::from(n),
                    )
                })
                .count() as f64
                / f64::from(n)
        };
        // P(refresh) = exp(-left / (cost * beta)).
        for left in [0u64, 10, 50, 100, 200, 500, 1000] {
            let want = (-(left as f64) / 100.0).exp();
            assert!(
                (share(left) - want).abs() < 0.01,
                "left {left}: {} vs {want}",
                share(left)
            );
        }
        assert!(share(10) > share(100) && share(100) > share(1000));
        // Never for a free loader or beta 0; always at expiry.
        assert!(!xfetch(Duration::ZERO, 1.0, Duration::ZERO, 0.5));
        assert!(!xfetch(cost, 0.0, Duration::ZERO, 0.5));
        assert!(xfetch(cost, 1.0, Duration::ZERO, 1.0));
        // A larger beta refreshes earlier.
        assert!(xfetch(cost, 4.0, Duration::from_millis(200), 0.5));
        assert!(!xfetch(cost, 1.0, Duration::from_millis(200), 0.5));
    }

    #[test]
    fn loader_costs_are_averaged_per_key_and_bounded() {
        let mut costs = Costs::default();
        assert_eq!(costs.cost(b"a"), None);
        costs.record(&Bytes::from_static(b"a"), 1.0);
        assert_eq!(costs.cost(b"a"), Some(1.0));
        // An unmeasured key borrows the average of every key.
        assert_eq!(costs.cost(b"b"), Some(1.0));
        costs.record(&Bytes::from_static(b"a"), 2.0);
        let a = costs.cost(b"a").unwrap();
        assert!((a - 1.3).abs() < 1e-9, "{a}");
        for i in 0..(COST_KEYS + 100) {
            costs.record(&Bytes::from(format!("k{i}")), 0.5);
        }
        assert_eq!(costs.by_key.len(), COST_KEYS);
    }

    #[test]
    fn values_inside_the_stale_window_are_stale() {
        let s = Duration::from_secs(10);
        assert!(is_stale(Some(Duration::from_secs(10)), s));
        assert!(is_stale(Some(Duration::from_secs(1)), s));
        assert!(!is_stale(Some(Duration::from_secs(11)), s));
        assert!(!is_stale(None, s), "no TTL: never stale");
        assert!(!is_stale(Some(Duration::ZERO), Duration::ZERO), "no window");
        let options = LoadOptions::ttl(Duration::from_secs(60)).stale_while_revalidate(s);
        assert_eq!(stale_window(&options), 10_000);
        assert_eq!(
            stale_window(&LoadOptions::default().stale_while_revalidate(s)),
            0
        );
        let plain = options.unprotected();
        assert!(!plain.leases && !plain.single_flight && plain.xfetch_beta == 0.0);
    }
}
