//! `near-bench`: reads of the same hot keys (a) remote, from the partition leaders of
//! a local 3-node cluster, and (b) from the client's near cache, in one run on
//! 127.0.0.1; prints p50/p99 latency and throughput of both and their ratios (a
//! markdown table, or JSON with `--json`).
//!
//! It starts a 3-node R=3 cluster of `raftcache-node` processes (killed on exit, also
//! on panic or ctrl-c), or uses a running one with `--endpoints`. Every load window is
//! bounded in time and in requests.
//!
//! ```text
//! cargo build --release -p raftcache-node --bin raftcache-node -p raftcache-benches --bin near-bench
//! target/release/near-bench --secs 5
//! ```

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clap::Parser;
use raftcache_benches::cluster::Cluster;
use raftcache_benches::load::{load, node_binary, Load};
use raftcache_client::{Client, ClientConfig, NearCacheConfig, NearStats};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Nodes of the cluster it starts.
const NODES: u32 = 3;
/// Partitions of the cluster it starts.
const PARTITIONS: u32 = 16;
/// Warm-up before each measured window.
const WARMUP: Duration = Duration::from_secs(1);
/// How long the near cache may take to track every partition.
const SYNC_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Parser)]
#[command(about = "Near-cache hits vs remote reads of the same hot keys (loopback)")]
struct Cli {
    /// The node binary; default: `raftcache-node` beside this executable.
    #[arg(long, env = "RAFTCACHE_NODE_BIN")]
    node_bin: Option<PathBuf>,
    /// Use this running cluster (comma-separated `host:port`, loopback) instead of
    /// starting one.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Measured seconds per window (after a 1 s warm-up), 1..=60.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Requests in flight (tasks sharing one client).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Hot keys read (all preloaded, all fit in the near cache).
    #[arg(long, default_value_t = 100)]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Print JSON instead of the markdown table.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ensure!((1..=60).contains(&cli.secs), "--secs must be 1..=60");
    ensure!(
        (1..=1_000_000).contains(&cli.keys),
        "--keys must be 1..=1000000"
    );
    ensure!(
        (1..=1024).contains(&cli.concurrency),
        "--concurrency must be 1..=1024"
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    // On a signal the benchmark future is dropped, and with it every node guard.
    tokio::select! {
        r = run(&cli) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; nodes killed"),
        _ = terminate.recv() => bail!("terminated; nodes killed"),
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    let (cluster, endpoints) = if cli.endpoints.is_empty() {
        let binary = node_binary(cli.node_bin.clone())?;
        eprintln!("near-bench: starting a {NODES}-node cluster R=3 P={PARTITIONS}");
        let cluster = Cluster::start(&binary, NODES, PARTITIONS, 3).await?;
        let endpoints = cluster.endpoints();
        (Some(cluster), endpoints)
    } else {
        ensure!(
            cli.endpoints
                .iter()
                .all(|e| e.starts_with("127.") || e.starts_with("localhost:")),
            "--endpoints must be loopback addresses"
        );
        (None, cli.endpoints.clone())
    };
    let result = measure(cli, &endpoints).await;
    if let Some(cluster) = cluster {
        cluster.stop().await;
    }
    let (remote, near, stats) = result?;
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json(cli, &remote, &near, &stats))?
        );
    } else {
        println!("{}", table(cli, &remote, &near, &stats)?);
    }
    Ok(())
}

fn key(index: u64) -> String {
    format!("hot:{index:06}")
}

/// Preloads the keys, then measures remote reads and near-cache hits of them.
async fn measure(cli: &Cli, endpoints: &[String]) -> anyhow::Result<(Load, Load, NearStats)> {
    let plain = Client::connect(ClientConfig::new(endpoints.iter().cloned()))
        .await
        .context("connecting")?;
    let value = Bytes::from(vec![b'v'; cli.value_size]);
    for k in 0..cli.keys {
        plain
            .set(key(k), value.clone())
            .await
            .with_context(|| format!("preloading {}", key(k)))?;
    }
    let window = Duration::from_secs(cli.secs);

    eprintln!("near-bench: (a) remote reads, {} s", cli.secs);
    let c = plain.clone();
    let remote = load(cli.concurrency, cli.keys, WARMUP, window, move |k| {
        let c = c.clone();
        async move { c.get(key(k)).await.map(|v| v.is_some()) }
    })
    .await?;

    let config = ClientConfig {
        near_cache: Some(NearCacheConfig::default()),
        ..ClientConfig::new(endpoints.iter().cloned())
    };
    let near = Client::connect(config).await.context("connecting")?;
    let partitions = u64::from(near.cluster_map().await?.partition_count);
    let deadline = Instant::now() + SYNC_TIMEOUT;
    while near
        .near_cache_stats()
        .context("no near cache")?
        .synced_partitions
        < partitions
    {
        ensure!(
            Instant::now() < deadline,
            "the near cache did not track every partition within {SYNC_TIMEOUT:?} (does the node serve Watch?): {:?}",
            near.near_cache_stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for k in 0..cli.keys {
        let got = near
            .get(key(k))
            .await?
            .context("a preloaded key is missing")?;
        ensure!(got.value == value, "{} read a wrong value", key(k));
    }
    let before = near.near_cache_stats().context("no near cache")?;
    eprintln!("near-bench: (b) near-cache hits, {} s", cli.secs);
    let c = near.clone();
    let hits = load(cli.concurrency, cli.keys, WARMUP, window, move |k| {
        let c = c.clone();
        async move { c.get(key(k)).await.map(|v| v.is_some()) }
    })
    .await?;
    let after = near.near_cache_stats().context("no near cache")?;
    let stats = NearStats {
        hits: after.hits - before.hits,
        misses: after.misses - before.misses,
        ..after
    };
    Ok((remote, hits, stats))
}

fn us(l: &Load, q: f64) -> f64 {
    l.ms(q) * 1000.0
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn table(cli: &Cli, remote: &Load, near: &Load, stats: &NearStats) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(
        out,
        "### Near cache vs remote reads ({} hot keys, {} B values, {} in flight, {} s per window, {} cores, loopback)\n",
        cli.keys,
        cli.value_size,
        cli.concurrency,
        cli.secs,
        std::thread::available_parallelism().map_or(0, usize::from),
    )?;
    writeln!(
        out,
        "| reads | reads/s | p50 µs | p99 µs | max µs | errors |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    for (name, l) in [
        ("remote (leader, LEASE)", remote),
        ("near-cache hits", near),
    ] {
        writeln!(
            out,
            "| {name} | {:.0} | {:.1} | {:.1} | {:.0} | {} |",
            l.per_sec(),
            us(l, 0.5),
            us(l, 0.99),
            l.max_ms() * 1000.0,
            l.errors
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "- latencies are recorded in whole µs: 1 µs is the floor of the histogram"
    )?;
    writeln!(
        out,
        "- near / remote: reads/s x{:.1}, p50 latency / {:.1}, p99 latency / {:.1}",
        ratio(near.per_sec(), remote.per_sec()),
        ratio(us(remote, 0.5), us(near, 0.5)),
        ratio(us(remote, 0.99), us(near, 0.99)),
    )?;
    writeln!(
        out,
        "- near cache during (b), warm-up included: {} hits, {} misses; {} entries, {} bytes, {} invalidations, {} gaps",
        stats.hits, stats.misses, stats.entries, stats.bytes, stats.invalidations, stats.gaps
    )?;
    Ok(out)
}

fn json(cli: &Cli, remote: &Load, near: &Load, stats: &NearStats) -> serde_json::Value {
    let figures = |l: &Load| {
        serde_json::json!({
            "ops": l.ops,
            "errors": l.errors,
            "ops_per_s": l.per_sec(),
            "p50_us": us(l, 0.5),
            "p99_us": us(l, 0.99),
            "max_us": l.max_ms() * 1000.0,
        })
    };
    serde_json::json!({
        "keys": cli.keys,
        "value_size": cli.value_size,
        "concurrency": cli.concurrency,
        "secs": cli.secs,
        "remote": figures(remote),
        "near": figures(near),
        "ratio": {
            "ops_per_s": ratio(near.per_sec(), remote.per_sec()),
            "p50": ratio(us(remote, 0.5), us(near, 0.5)),
            "p99": ratio(us(remote, 0.99), us(near, 0.99)),
        },
        "near_stats": stats,
    })
}
