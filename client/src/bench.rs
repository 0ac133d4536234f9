//! The load generator behind `raftcache bench`.
//!
//! [`run`] optionally preloads the key space, then lets `concurrency` tasks share one
//! [`Client`] and issue gets and sets on uniformly random keys `bench:{i}` until the
//! duration passes or the operation budget is spent. Each task records latencies in
//! its own histogram; they are merged into one [`BenchReport`] at the end.

use crate::client::Client;
use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The slowest latency the histograms track, in microseconds (one minute); slower
/// operations count as this.
const MAX_LATENCY_US: u64 = 60_000_000;

/// What a benchmark run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchConfig {
    /// Tasks issuing requests at the same time.
    pub concurrency: usize,
    /// How long the measured phase runs at most.
    pub duration: Duration,
    /// The key space: keys `bench:0` .. `bench:{keys-1}`.
    pub keys: u64,
    /// The size of every value written, in bytes.
    pub value_size: usize,
    /// The mix of sets and gets.
    pub ratio: Ratio,
    /// Stop after this many operations (all tasks together), if set.
    pub max_ops: Option<u64>,
    /// Write every key once before measuring, so that gets hit.
    pub preload: bool,
}

/// The proportion of sets to gets, written `SET:GET` (`1:1`, `1:9`, `0:1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ratio {
    /// Parts of sets.
    pub sets: u32,
    /// Parts of gets.
    pub gets: u32,
}

impl FromStr for Ratio {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |part: &str| {
            part.trim()
                .parse::<u32>()
                .map_err(|e| format!("{part:?} in ratio {s:?}: {e}"))
        };
        let (sets, gets) = s
            .split_once(':')
            .ok_or_else(|| format!("ratio {s:?} is not SET:GET, e.g. 1:1"))?;
        let ratio = Ratio {
            sets: parse(sets)?,
            gets: parse(gets)?,
        };
        if ratio.sets.checked_add(ratio.gets).unwrap_or(0) == 0 {
            return Err(format!("ratio {s:?} needs a positive total under 2^32"));
        }
        Ok(ratio)
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.sets, self.gets)
    }
}

/// The outcome of a benchmark run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// Successful operations (gets plus sets).
    pub ops: u64,
    /// `ops` per second of the measured phase.
    pub ops_per_sec: f64,
    /// Successful gets.
    pub gets: u64,
    /// `gets` per second.
    pub gets_per_sec: f64,
    /// Successful sets.
    pub sets: u64,
    /// `sets` per second.
    pub sets_per_sec: f64,
    /// Gets that found their key.
    pub hits: u64,
    /// `hits / gets` (0 without gets).
    pub hit_rate: f64,
    /// Failed operations.
    pub errors: u64,
    /// The message of the first failure, if any.
    pub first_error: Option<String>,
    /// Median latency of successful operations, in microseconds.
    pub p50_us: u64,
    /// 99th percentile latency, in microseconds.
    pub p99_us: u64,
    /// 99.9th percentile latency, in microseconds.
    pub p999_us: u64,
    /// Slowest successful operation, in microseconds.
    pub max_us: u64,
    /// Length of the measured phase, in seconds.
    pub duration_s: f64,
    /// Tasks that issued requests.
    pub concurrency: usize,
    /// The key space.
    pub keys: u64,
    /// Bytes per value.
    pub value_size: usize,
    /// The set:get mix, as given.
    pub ratio: String,
    /// Keys written before measuring.
    pub preloaded: u64,
}

/// What one task saw.
struct TaskStats {
    latencies_us: Histogram<u64>,
    gets: u64,
    sets: u64,
    hits: u64,
    errors: u64,
    first_error: Option<(Instant, String)>,
}

/// Runs a benchmark against the cluster `client` is connected to.
///
/// # Errors
/// An invalid configuration (no tasks, no keys), a failed preload write, or a
/// task that panicked. Failed operations during the measured phase are counted in
/// the report, not returned.
pub async fn run(client: &Client, config: &BenchConfig) -> anyhow::Result<BenchReport> {
    ensure!(config.concurrency > 0, "concurrency must be at least 1");
    ensure!(config.keys > 0, "the key space must hold at least 1 key");
    let value = Bytes::from(vec![b'x'; config.value_size]);

    let preloaded = if config.preload {
        preload(client, config, &value).await?;
        config.keys
    } else {
        0
    };

    let deadline = Instant::now() + config.duration;
    let budget = Arc::new(AtomicU64::new(config.max_ops.unwrap_or(u64::MAX)));
    let started = Instant::now();
    let tasks: Vec<_> = (0..config.concurrency)
        .map(|_| {
            let (client, value, budget) = (client.clone(), value.clone(), Arc::clone(&budget));
            let (keys, ratio) = (config.keys, config.ratio);
            tokio::spawn(async move { worker(client, keys, ratio, value, deadline, budget).await })
        })
        .collect();
    let mut all = Vec::with_capacity(tasks.len());
    for task in tasks {
        all.push(task.await.context("a benchmark task failed")??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    report(config, preloaded, elapsed, all)
}

/// Writes every key once, `concurrency` writes at a time, stopping at the first error.
async fn preload(client: &Client, config: &BenchConfig, value: &Bytes) -> anyhow::Result<()> {
    futures::stream::iter(0..config.keys)
        .map(Ok)
        .try_for_each_concurrent(config.concurrency, |i| async move {
            let key = format!("bench:{i}");
            client
                .set(&key, value.clone())
                .await
                .with_context(|| format!("preloading {key}"))?;
            Ok(())
        })
        .await
}

/// One task of the measured phase: runs until the deadline or until the shared
/// budget of operations is spent.
async fn worker(
    client: Client,
    keys: u64,
    ratio: Ratio,
    value: Bytes,
    deadline: Instant,
    budget: Arc<AtomicU64>,
) -> anyhow::Result<TaskStats> {
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let mut stats = TaskStats {
        latencies_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
            .context("latency histogram bounds")?,
        gets: 0,
        sets: 0,
        hits: 0,
        errors: 0,
        first_error: None,
    };
    let total = ratio.sets + ratio.gets;
    while Instant::now() < deadline && take_one(&budget) {
        let key = format!("bench:{}", rng.random_range(0..keys));
        let is_set = rng.random_range(0..total) < ratio.sets;
        let start = Instant::now();
        let outcome = if is_set {
            client.set(&key, value.clone()).await.map(|_| None)
        } else {
            client.get(&key).await.map(|v| Some(v.is_some()))
        };
        let latency = start.elapsed();
        match outcome {
            Ok(hit) => {
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                stats
                    .latencies_us
                    .saturating_record(us.clamp(1, MAX_LATENCY_US));
                match hit {
                    None => stats.sets += 1,
                    Some(hit) => {
                        stats.gets += 1;
                        stats.hits += u64::from(hit);
                    }
                }
            }
            Err(e) => {
                stats.errors += 1;
                stats
                    .first_error
                    .get_or_insert_with(|| (start, e.to_string()));
            }
        }
    }
    Ok(stats)
}

/// Takes one operation from the shared budget; false once it is spent.
fn take_one(budget: &AtomicU64) -> bool {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// Merges the tasks' figures into the report.
fn report(
    config: &BenchConfig,
    preloaded: u64,
    elapsed_s: f64,
    tasks: Vec<TaskStats>,
) -> anyhow::Result<BenchReport> {
    let mut latencies_us = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)
        .context("latency histogram bounds")?;
    let (mut gets, mut sets, mut hits, mut errors) = (0, 0, 0, 0);
    let mut first_error: Option<(Instant, String)> = None;
    for t in tasks {
        if let Err(e) = latencies_us.add(&t.latencies_us) {
            bail!("merging latency histograms: {e}");
        }
        gets += t.gets;
        sets += t.sets;
        hits += t.hits;
        errors += t.errors;
        if let Some((at, message)) = t.first_error {
            if first_error.as_ref().is_none_or(|(first, _)| at < *first) {
                first_error = Some((at, message));
            }
        }
    }
    let per_sec = |n: u64| {
        if elapsed_s > 0.0 {
            n as f64 / elapsed_s
        } else {
            0.0
        }
    };
    let quantile = |q: f64| {
        if latencies_us.is_empty() {
            0
        } else {
            latencies_us.value_at_quantile(q)
        }
    };
    Ok(BenchReport {
        ops: gets + sets,
        ops_per_sec: per_sec(gets + sets),
        gets,
        gets_per_sec: per_sec(gets),
        sets,
        sets_per_sec: per_sec(sets),
        hits,
        hit_rate: if gets == 0 {
            0.0
        } else {
            hits as f64 / gets as f64
        },
        errors,
        first_error: first_error.map(|(_, message)| message),
        p50_us: quantile(0.50),
        p99_us: quantile(0.99),
        p999_us: quantile(0.999),
        max_us: latencies_us.max(),
        duration_s: elapsed_s,
        concurrency: config.concurrency,
        keys: config.keys,
        value_size: config.value_size,
        ratio: config.ratio.to_string(),
        preloaded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BenchConfig {
        BenchConfig {
            concurrency: 2,
            duration: Duration::from_secs(1),
            keys: 10,
            value_size: 8,
            ratio: Ratio { sets: 1, gets: 1 },
            max_ops: None,
            preload: false,
        }
    }

    fn task(latencies: &[u64], gets: u64, sets: u64, hits: u64) -> TaskStats {
        let mut h = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap();
        for &l in latencies {
            h.record(l).unwrap();
        }
        TaskStats {
            latencies_us: h,
            gets,
            sets,
            hits,
            errors: 0,
            first_error: None,
        }
    }

    #[test]
    fn ratios_parse_as_set_colon_get() {
        assert_eq!("1:1".parse(), Ok(Ratio { sets: 1, gets: 1 }));
        assert_eq!(" 0 : 9 ".parse(), Ok(Ratio { sets: 0, gets: 9 }));
        assert_eq!(Ratio { sets: 3, gets: 7 }.to_string(), "3:7");
        for bad in ["", "1", "1:", "a:b", "0:0", "-1:1", "4294967295:1"] {
            assert!(bad.parse::<Ratio>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn budget_is_shared_and_bounded() {
        let budget = AtomicU64::new(2);
        assert!(take_one(&budget));
        assert!(take_one(&budget));
        assert!(!take_one(&budget));
        assert!(!take_one(&budget));
    }

    #[test]
    fn report_merges_tasks() {
        let now = Instant::now();
        let mut b = task(&[1000; 10], 8, 2, 4);
        b.errors = 3;
        b.first_error = Some((now + Duration::from_millis(5), "later".into()));
        let mut c = task(&[], 0, 0, 0);
        c.errors = 1;
        c.first_error = Some((now, "earlier".into()));
        let r = report(&config(), 10, 2.0, vec![task(&[100; 90], 45, 45, 40), b, c]).unwrap();
        assert_eq!(
            (r.ops, r.gets, r.sets, r.hits, r.errors),
            (100, 53, 47, 44, 4)
        );
        assert_eq!(r.ops_per_sec, 50.0);
        assert!((r.hit_rate - 44.0 / 53.0).abs() < 1e-9);
        assert_eq!(r.first_error.as_deref(), Some("earlier"));
        assert_eq!(r.p50_us, 100);
        assert!((999..=1001).contains(&r.p99_us), "{}", r.p99_us);
        assert_eq!(r.preloaded, 10);
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.starts_with(r#"{"ops":100,"ops_per_sec":50.0,"#),
            "{json}"
        );
    }

    #[test]
    fn an_empty_report_has_zero_latencies() {
        let r = report(&config(), 0, 0.0, vec![task(&[], 0, 0, 0)]).unwrap();
        assert_eq!((r.ops, r.p50_us, r.p999_us, r.max_us), (0, 0, 0, 0));
        assert_eq!((r.ops_per_sec, r.hit_rate), (0.0, 0.0));
    }
}
