//! The stampede simulator behind `raftcache stampede` (and the stampede benchmark):
//! many concurrent callers of [`Client::get_or_load`] whose loader is a stand-in for a
//! database query (it sleeps, and counts itself).
//!
//! Two shapes:
//! - **burst** (`duration` unset): every caller calls `get_or_load` once, all released
//!   at the same moment (a cold key, a flush, a restart);
//! - **loop** (`duration` set): every caller calls it again and again (pausing
//!   `interval` between calls) until the time is up: a hot key that keeps expiring,
//!   or traffic through a failover or an outage.
//!
//! The report has the loader calls (total and the busiest second: the "peak DB query
//! rate" of the Facebook memcache paper), how many ran at once, where answers came
//! from, errors and latency percentiles, plus a per-second timeline.

use crate::breaker::BreakerState;
use crate::client::Client;
use crate::load::{LoadOptions, LoadSource, LoadStats};
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

/// What a stampede run does.
#[derive(Debug, Clone)]
pub struct StampedeConfig {
    /// Concurrent callers (spread over the clients in turn).
    pub callers: usize,
    /// Keys `{key}` (one) or `{key}:0` .. `{key}:{keys-1}`, picked by caller number.
    pub key: String,
    /// How many keys the callers spread over.
    pub keys: usize,
    /// How long one loader call takes.
    pub loader: Duration,
    /// The size of a loaded value.
    pub value_size: usize,
    /// The options of every call.
    pub options: LoadOptions,
    /// Loop for this long; unset: one burst.
    pub duration: Option<Duration>,
    /// Pause between a caller's calls in loop mode.
    pub interval: Duration,
}

/// One second of a loop run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Second {
    /// Seconds since the start.
    pub second: u64,
    /// Answers from a fresh cached value.
    pub cache: u64,
    /// Stale answers.
    pub stale: u64,
    /// Answers from this flight's loader call.
    pub loader: u64,
    /// Answers from a degraded (direct) loader call.
    pub degraded: u64,
    /// Failed calls.
    pub errors: u64,
    /// Loader calls that started in this second.
    pub loader_calls: u64,
    /// The most loader calls running at once in this second.
    pub max_concurrent_loads: u64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct StampedeReport {
    /// Calls made.
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Loader calls in all.
    pub loader_calls: u64,
    /// Loader calls in the busiest second.
    pub peak_loader_calls_per_second: u64,
    /// The most loader calls running at once.
    pub max_concurrent_loads: u64,
    /// Answers by source: cache, stale, loader, degraded.
    pub from_cache: u64,
    /// See `from_cache`.
    pub from_stale: u64,
    /// See `from_cache`.
    pub from_loader: u64,
    /// See `from_cache`.
    pub from_degraded: u64,
    /// Latency percentiles of the calls, in milliseconds.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p99_ms: f64,
    /// See `p50_ms`.
    pub max_ms: f64,
    /// How long the run took, in seconds.
    pub elapsed_s: f64,
    /// The clients' `get_or_load` counters, summed.
    pub load_stats: LoadStats,
    /// Per second (loop runs; one entry for a burst).
    pub timeline: Vec<Second>,
    /// Every client's circuit breakers at the end, by node address.
    pub breakers: Vec<(String, BreakerState)>,
}

/// Shared counters of the run.
struct Run {
    started: Instant,
    loader_calls: AtomicU64,
    running: AtomicU64,
    max_running: AtomicU64,
    timeline: Mutex<Vec<Second>>,
    first_error: Mutex<Option<String>>,
}

impl Run {
    fn second(&self, f: impl FnOnce(&mut Second)) {
        let at = self.started.elapsed().as_secs();
        let mut timeline = self.timeline.lock().unwrap_or_else(PoisonError::into_inner);
        while timeline.len() as u64 <= at {
            let second = timeline.len() as u64;
            timeline.push(Second {
                second,
                ..Second::default()
            });
        }
        if let Some(slot) = timeline.last_mut() {
            f(slot);
        }
    }
}

/// Runs the stampede over `clients` (each one stands for an app process: its own
/// single-flight table and loader slots).
///
/// # Errors
/// When no client or no caller is given.
pub async fn run(clients: &[Client], config: &StampedeConfig) -> anyhow::Result<StampedeReport> {
    anyhow::ensure!(!clients.is_empty(), "no client to run the stampede with");
    anyhow::ensure!(config.callers > 0, "--callers must be at least 1");
    let run = Arc::new(Run {
        started: Instant::now(),
        loader_calls: AtomicU64::new(0),
        running: AtomicU64::new(0),
        max_running: AtomicU64::new(0),
        timeline: Mutex::new(Vec::new()),
        first_error: Mutex::new(None),
    });
    let keys = config.keys.max(1);
    let barrier = Arc::new(tokio::sync::Barrier::new(config.callers));
    let stop = config.duration.map(|d| run.started + d);
    let mut tasks = Vec::with_capacity(config.callers);
    for caller in 0..config.callers {
        let client = clients[caller % clients.len()].clone();
        let key = if keys == 1 {
            config.key.clone()
        } else {
            format!("{}:{}", config.key, caller % keys)
        };
        let run = Arc::clone(&run);
        let barrier = Arc::clone(&barrier);
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            let mut histogram = new_histogram()?;
            barrier.wait().await;
            let mut counts = [0u64; 5];
            loop {
                let t = Instant::now();
                let run2 = Arc::clone(&run);
                let (delay, size) = (config.loader, config.value_size);
                let answer = client
                    .get_or_load(&key, config.options, move || loader(run2, delay, size))
                    .await;
                let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                histogram.saturating_record(us.max(1));
                match answer {
                    Ok(loaded) => {
                        let slot = match loaded.source {
                            LoadSource::Cache => 0,
                            LoadSource::Stale => 1,
                            LoadSource::Loader => 2,
                            LoadSource::Degraded => 3,
                        };
                        counts[slot] += 1;
                        run.second(|s| match loaded.source {
                            LoadSource::Cache => s.cache += 1,
                            LoadSource::Stale => s.stale += 1,
                            LoadSource::Loader => s.loader += 1,
                            LoadSource::Degraded => s.degraded += 1,
                        });
                    }
                    Err(error) => {
                        counts[4] += 1;
                        run.second(|s| s.errors += 1);
                        run.first_error
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert_with(|| error.to_string());
                    }
                }
                match stop {
                    Some(stop) if Instant::now() + config.interval < stop => {
                        tokio::time::sleep(config.interval).await;
                    }
                    _ => break,
                }
            }
            anyhow::Ok((histogram, counts))
        }));
    }
    let mut histogram = new_histogram()?;
    let mut counts = [0u64; 5];
    for task in tasks {
        let (h, c) = task.await??;
        histogram.add(&h)?;
        for (total, part) in counts.iter_mut().zip(c) {
            *total += part;
        }
    }
    let elapsed_s = run.started.elapsed().as_secs_f64();
    let mut load_stats = LoadStats::default();
    for client in clients {
        add_stats(&mut load_stats, &client.load_stats());
    }
    let timeline = run
        .timeline
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let first_error = run
        .first_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(StampedeReport {
        calls: counts.iter().sum(),
        errors: counts[4],
        first_error,
        loader_calls: run.loader_calls.load(Ordering::Relaxed),
        peak_loader_calls_per_second: timeline.iter().map(|s| s.loader_calls).max().unwrap_or(0),
        max_concurrent_loads: run.max_running.load(Ordering::Relaxed),
        from_cache: counts[0],
        from_stale: counts[1],
        from_loader: counts[2],
        from_degraded: counts[3],
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: histogram.max() as f64 / 1000.0,
        elapsed_s,
        load_stats,
        timeline,
        breakers: clients.iter().flat_map(Client::breakers).collect(),
    })
}

/// The stand-in for a database query: counts itself, sleeps, answers.
async fn loader(run: Arc<Run>, delay: Duration, size: usize) -> anyhow::Result<Bytes> {
    let n = run.loader_calls.fetch_add(1, Ordering::Relaxed) + 1;
    let running = run.running.fetch_add(1, Ordering::Relaxed) + 1;
    run.max_running.fetch_max(running, Ordering::Relaxed);
    run.second(|s| {
        s.loader_calls += 1;
        s.max_concurrent_loads = s.max_concurrent_loads.max(running);
    });
    tokio::time::sleep(delay).await;
    run.running.fetch_sub(1, Ordering::Relaxed);
    let mut value = format!("loaded-{n}-").into_bytes();
    value.resize(size.max(value.len()), b'x');
    Ok(Bytes::from(value))
}

/// Latencies from 1 µs to 10 min, 3 significant digits.
fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

fn add_stats(total: &mut LoadStats, s: &LoadStats) {
    total.calls += s.calls;
    total.coalesced += s.coalesced;
    total.hits += s.hits;
    total.stale += s.stale;
    total.misses += s.misses;
    total.loader_calls += s.loader_calls;
    total.loader_errors += s.loader_errors;
    total.lease_grants += s.lease_grants;
    total.lease_waits += s.lease_waits;
    total.lease_lost += s.lease_lost;
    total.early_refreshes += s.early_refreshes;
    total.degraded += s.degraded;
    total.overloaded += s.overloaded;
    total.max_concurrent_loads = total.max_concurrent_loads.max(s.max_concurrent_loads);
}
