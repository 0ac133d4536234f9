//! The bounded load loop shared by the benchmark binaries, and where they find the
//! node binary.

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use raftcache_client::ClientError;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests one task sends at most, whatever the window (a bound on every loop).
const MAX_OPS_PER_TASK: u64 = 50_000_000;

/// What one load window measured.
pub struct Load {
    /// Requests that succeeded within the window.
    pub ops: u64,
    /// Requests that failed within the window.
    pub errors: u64,
    /// Successful reads that found no key.
    pub misses: u64,
    /// The measured window.
    pub window: Duration,
    /// Latency of the successful requests, µs.
    pub latency_us: Histogram<u64>,
    /// The first error's message.
    pub first_error: Option<String>,
}

impl Load {
    /// Requests per second.
    pub fn per_sec(&self) -> f64 {
        self.ops as f64 / self.window.as_secs_f64()
    }

    /// A latency quantile in ms.
    pub fn ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// The largest latency in ms.
    pub fn max_ms(&self) -> f64 {
        self.latency_us.max() as f64 / 1000.0
    }

    /// The figures as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "ops": self.ops,
            "errors": self.errors,
            "window_s": self.window.as_secs_f64(),
            "ops_per_s": self.per_sec(),
            "p50_ms": self.ms(0.5),
            "p99_ms": self.ms(0.99),
            "max_ms": self.max_ms(),
            "first_error": self.first_error,
        })
    }
}

/// Whether the request found its key (always `true` for writes).
pub type OpResult = Result<bool, ClientError>;

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("creating a histogram")
}

/// Runs `concurrency` tasks, each sending `op(random key index in 0..keys)` back to
/// back for `warmup` + `window`; counts and times the requests that start after the
/// warm-up and end within the window.
///
/// # Errors
/// When a task panics or a histogram cannot be built.
pub async fn load<F, Fut>(
    concurrency: usize,
    keys: u64,
    warmup: Duration,
    window: Duration,
    op: F,
) -> anyhow::Result<Load>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = OpResult> + Send + 'static,
{
    let op = Arc::new(op);
    let keys = keys.max(1);
    let measure_from = Instant::now() + warmup;
    let end = measure_from + window;
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|t| {
            let op = Arc::clone(&op);
            tokio::spawn(async move {
                let mut rng = SmallRng::seed_from_u64(0x5eed ^ t as u64);
                let mut hist = histogram()?;
                let (mut ops, mut errors, mut misses) = (0u64, 0u64, 0u64);
                let mut first_error = None;
                for _ in 0..MAX_OPS_PER_TASK {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let result = op(rng.random_range(0..keys)).await;
                    let done = Instant::now();
                    if sent < measure_from || done > end {
                        continue;
                    }
                    match result {
                        Ok(hit) => {
                            ops += 1;
                            misses += u64::from(!hit);
                            let us = u64::try_from(done.duration_since(sent).as_micros())
                                .unwrap_or(u64::MAX);
                            hist.saturating_record(us.max(1));
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                anyhow::Ok((ops, errors, misses, hist, first_error))
            })
        })
        .collect();
    let mut total = Load {
        ops: 0,
        errors: 0,
        misses: 0,
        window,
        latency_us: histogram()?,
        first_error: None,
    };
    for task in futures::future::join_all(tasks).await {
        let (ops, errors, misses, hist, first_error) = task.context("a load task panicked")??;
        total.ops += ops;
        total.errors += errors;
        total.misses += misses;
        total
            .latency_us
            .add(&hist)
            .context("merging latency histograms")?;
        if total.first_error.is_none() {
            total.first_error = first_error;
        }
    }
    if let Some(e) = &total.first_error {
        eprintln!("  {} errors, first: {e}", total.errors);
    }
    Ok(total)
}

/// `given` (`--node-bin`), else `raftcache-node` beside the running executable.
///
/// # Errors
/// When neither exists, with the command that builds it.
pub fn node_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given.filter(|p| !p.as_os_str().is_empty()) {
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating this benchmark's executable")?;
    let beside = exe.with_file_name("raftcache-node");
    if beside.is_file() {
        return Ok(beside);
    }
    bail!(
        "no raftcache-node at {}: build it (cargo build --release -p raftcache-node --bin raftcache-node) or pass --node-bin",
        beside.display()
    )
}
