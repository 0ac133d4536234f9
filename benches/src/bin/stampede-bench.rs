//! `stampede-bench`: how hard an expiring hot key hits the database, with and without
//! the protections of `get_or_load`, on one local 3-node cluster (R = 3), everything on
//! 127.0.0.1.
//!
//! Scenario (the Facebook memcache paper's "thundering herd"): `--apps` app clients
//! (each its own single-flight table, as separate processes would be) share
//! `--callers` callers that read one hot key again and again (every `--interval`) for
//! `--secs`. The key's TTL is short (`--ttl`), so it keeps expiring, and each load is a
//! database query of `--loader` time. One row per protection level, same run, same
//! cluster (a fresh key each):
//!
//! - `unprotected`: plain cache-aside (get; on a miss load and set);
//! - `single-flight`: callers of one app share one load;
//! - `+ leases`: one load across all apps (the node's lease), the others wait;
//! - `+ XFetch`: the key is refreshed before it expires, by one caller;
//! - `+ stale-while-revalidate`: the value is served stale while one caller refreshes.
//!
//! Reported per row: loader (DB) calls in all and in the busiest second, answers per
//! second, p50/p99/max latency, and the ratio of the peak DB rate to `unprotected`'s.
//!
//! ```text
//! cargo build --release -p raftcache-node --bin raftcache-node -p raftcache-benches --bin stampede-bench
//! target/release/stampede-bench --secs 10
//! ```

use anyhow::Context;
use clap::Parser;
use raftcache_benches::cluster::Cluster;
use raftcache_benches::load::node_binary;
use raftcache_client::stampede::{self, StampedeConfig, StampedeReport};
use raftcache_client::{Client, LoadOptions};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(about = "Stampede benchmark: DB calls for an expiring hot key, by protection")]
struct Cli {
    /// The node binary; default: `raftcache-node` beside this executable.
    #[arg(long, env = "RAFTCACHE_NODE_BIN")]
    node_bin: Option<PathBuf>,
    /// App clients (each stands for one app process).
    #[arg(long, default_value_t = 3)]
    apps: usize,
    /// Callers in all, spread over the apps.
    #[arg(long, default_value_t = 1000)]
    callers: usize,
    /// Seconds per row.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// The hot key's fresh TTL.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// One DB query.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    loader: Duration,
    /// Pause between a caller's reads.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Also print every report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let binary = node_binary(cli.node_bin.clone())?;
    eprintln!("starting a 3-node cluster (R=3, P=16)");
    let cluster = Cluster::start(&binary, 3, 16, 3).await?;
    let mut apps: Vec<Client> = Vec::new();
    for _ in 0..cli.apps.max(1) {
        apps.push(cluster.client(|_| {}).await?);
    }
    let base = LoadOptions::ttl(cli.ttl);
    let rows: Vec<(&str, LoadOptions)> = vec![
        ("unprotected (plain cache-aside)", base.unprotected()),
        (
            "single-flight",
            LoadOptions {
                leases: false,
                xfetch_beta: 0.0,
                ..base
            },
        ),
        (
            "+ leases",
            LoadOptions {
                xfetch_beta: 0.0,
                ..base
            },
        ),
        ("+ XFetch (β = 1)", base),
        (
            "+ stale-while-revalidate",
            base.stale_while_revalidate(cli.ttl),
        ),
    ];
    let mut reports: Vec<(&str, StampedeReport)> = Vec::new();
    for (i, (name, options)) in rows.iter().enumerate() {
        eprintln!("row {}: {name}", i + 1);
        let config = StampedeConfig {
            callers: cli.callers,
            key: format!("hot-{i}-{}", std::process::id()),
            keys: 1,
            loader: cli.loader,
            value_size: 100,
            options: *options,
            duration: Some(Duration::from_secs(cli.secs)),
            interval: cli.interval,
        };
        // Fresh clients per row: no loader costs or flights carried over.
        let mut row_apps = Vec::new();
        for _ in 0..apps.len() {
            row_apps.push(cluster.client(|_| {}).await?);
        }
        let report = stampede::run(&row_apps, &config)
            .await
            .with_context(|| format!("row {name}"))?;
        reports.push((name, report));
    }
    drop(apps);
    print!("{}", table(&cli, &reports));
    if let Some(path) = &cli.json {
        let json: Vec<serde_json::Value> = reports
            .iter()
            .map(|(name, r)| serde_json::json!({ "row": name, "report": r }))
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    cluster.stop().await;
    Ok(())
}

fn table(cli: &Cli, reports: &[(&str, StampedeReport)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} callers in {} apps reading one hot key every {:?} for {} s; TTL {:?}, DB query {:?}; 3 nodes, R=3\n",
        cli.callers, cli.apps, cli.interval, cli.secs, cli.ttl, cli.loader
    );
    let _ = writeln!(
        out,
        "| protection | DB calls | peak DB calls/s | vs unprotected | reads/s | p50 ms | p99 ms | max ms | errors |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let base = reports
        .first()
        .map_or(1, |(_, r)| r.peak_loader_calls_per_second.max(1));
    for (name, r) in reports {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {:.3} | {:.0} | {:.1} | {:.1} | {:.1} | {} |",
            r.loader_calls,
            r.peak_loader_calls_per_second,
            r.peak_loader_calls_per_second as f64 / base as f64,
            r.calls as f64 / r.elapsed_s.max(1e-9),
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.errors,
        );
    }
    out
}
