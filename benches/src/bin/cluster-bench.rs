//! `cluster-bench`: replication benchmarks on local 3-node clusters of
//! `raftcache-node` processes, everything on 127.0.0.1.
//!
//! - `throughput`: SET throughput and latency for (R, P) in (1, 16), (3, 16), (1, 64),
//!   (3, 64), each on a fresh cluster, with the R=3 / R=1 ratios of the same run.
//! - `reads`: GET throughput and latency at LEASE, LINEARIZABLE and FOLLOWER (100 ms)
//!   on one R=3 P=16 cluster with 100k preloaded keys, with ratios to LEASE.
//! - `failover`: SIGKILL the node leading most partitions; time from the kill to the
//!   first successful write to each partition it led; restart it and wait until the
//!   cluster is whole again; repeated `--trials` times.
//! - `idle`: CPU of each node of an idle R=3 cluster (P = 16 and 64) over 10 s.
//! - `all`: all of the above.
//!
//! Every node is a child owned by a guard that kills it on drop (also on panic or
//! ctrl-c). Progress goes to stderr, the markdown tables to stdout.
//!
//! ```text
//! cargo build --release -p raftcache-node --bin raftcache-node -p raftcache-benches --bin cluster-bench
//! target/release/cluster-bench all --secs 10 --trials 20
//! ```

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use raftcache_benches::cluster::{clock_ticks_per_second, cpu_ticks, Cluster, SETTLE_TIMEOUT};
use raftcache_benches::load::{load as shared_load, node_binary, Load, OpResult};
use raftcache_client::{Client, Consistency, ReadOptions};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Nodes per cluster.
const NODES: u32 = 3;
/// Key space of the load.
const KEYS: u64 = 100_000;
/// Value size of the writes.
const VALUE_SIZE: usize = 100;
/// Warm-up before each measured load window.
const WARMUP: Duration = Duration::from_secs(2);
/// How long one failover writer keeps trying before the sample counts as failed.
const FAILOVER_GIVE_UP: Duration = Duration::from_secs(30);
/// Upper bound of the writes one failover writer attempts.
const FAILOVER_MAX_ATTEMPTS: u32 = 100_000;
/// The failover goal: p99 of the time from the kill to the first successful write.
const FAILOVER_GOAL: Duration = Duration::from_secs(1);
/// The idle-CPU goal per node at P = 16, in % of one core.
const IDLE_GOAL_PERCENT: f64 = 5.0;

#[derive(Debug, Parser)]
#[command(about = "Replication benchmarks on local 3-node raftcache clusters")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// The node binary; default: `raftcache-node` beside this executable.
    #[arg(long, global = true, env = "RAFTCACHE_NODE_BIN")]
    node_bin: Option<PathBuf>,
    /// Measured seconds of each load window (after a 2 s warm-up).
    #[arg(long, global = true, default_value_t = 10)]
    secs: u64,
    /// Requests in flight (tasks sharing one client).
    #[arg(long, global = true, default_value_t = 64)]
    concurrency: usize,
    /// Failover trials.
    #[arg(long, global = true, default_value_t = 20)]
    trials: u32,
    /// Seconds of the idle CPU measurement.
    #[arg(long, global = true, default_value_t = 10)]
    idle_secs: u64,
}

#[derive(Debug, Clone, Copy, Subcommand)]
enum Cmd {
    /// SET throughput and latency, R=1 vs R=3, P=16 and 64.
    Throughput,
    /// GET throughput and latency per consistency level (R=3, P=16).
    Reads,
    /// Time to the first successful write after SIGKILL of the busiest leader.
    Failover,
    /// Idle CPU per node (R=3, P=16 and 64).
    Idle,
    /// All of the above.
    All,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let binary = node_binary(cli.node_bin.clone())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    // On a signal the benchmark future is dropped, and with it every node guard.
    tokio::select! {
        r = run(&cli, &binary) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; nodes killed"),
        _ = terminate.recv() => bail!("terminated; nodes killed"),
    }
}

async fn run(cli: &Cli, binary: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let header = format!(
        "cluster-bench: {NODES} nodes on 127.0.0.1, {} cores, concurrency {}, {VALUE_SIZE}-byte values, {KEYS} keys, {} s per window after {} s warm-up",
        std::thread::available_parallelism().map_or(0, usize::from),
        cli.concurrency,
        cli.secs,
        WARMUP.as_secs(),
    );
    println!("{header}\n");
    let all = matches!(cli.command, Cmd::All);
    if all || matches!(cli.command, Cmd::Throughput) {
        println!("{}", throughput(cli, binary).await?);
    }
    if all || matches!(cli.command, Cmd::Reads) {
        println!("{}", reads(cli, binary).await?);
    }
    if all || matches!(cli.command, Cmd::Failover) {
        println!("{}", failover(cli, binary).await?);
    }
    if all || matches!(cli.command, Cmd::Idle) {
        println!("{}", idle(cli, binary).await?);
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn key(index: u64) -> String {
    format!("bench:{index:06}")
}

// ---------------------------------------------------------------------------------
// Load generation

/// [`load`] with this benchmark's key space and warm-up, for `secs` seconds.
async fn load<F, Fut>(concurrency: usize, secs: u64, op: F) -> anyhow::Result<Load>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = OpResult> + Send + 'static,
{
    shared_load(concurrency, KEYS, WARMUP, Duration::from_secs(secs), op).await
}

fn value() -> Bytes {
    Bytes::from(vec![b'v'; VALUE_SIZE])
}

async fn write_load(client: &Client, concurrency: usize, secs: u64) -> anyhow::Result<Load> {
    let client = client.clone();
    let value = value();
    load(concurrency, secs, move |k| {
        let client = client.clone();
        let value = value.clone();
        async move { client.set(key(k), value).await.map(|_| true) }
    })
    .await
}

// ---------------------------------------------------------------------------------
// throughput

async fn throughput(cli: &Cli, binary: &Path) -> anyhow::Result<String> {
    let configs = [(1u32, 16u32), (3, 16), (1, 64), (3, 64)];
    let mut rows: BTreeMap<(u32, u32), Load> = BTreeMap::new();
    for (r, p) in configs {
        eprintln!("throughput: starting a {NODES}-node cluster R={r} P={p}");
        let cluster = Cluster::start(binary, NODES, p, r).await?;
        let client = cluster.client(|_| {}).await?;
        eprintln!("throughput: R={r} P={p}: {} s of SETs", cli.secs);
        let result = write_load(&client, cli.concurrency, cli.secs).await;
        drop(client);
        cluster.stop().await;
        rows.insert((p, r), result?);
    }
    let mut out = String::new();
    writeln!(
        out,
        "### Write throughput (SET, {} in flight, {VALUE_SIZE} B values, {KEYS} keys, {} s)\n",
        cli.concurrency, cli.secs
    )?;
    writeln!(out, "| R | P | writes/s | p50 ms | p99 ms | errors |")?;
    writeln!(out, "|---|---|---------:|-------:|-------:|-------:|")?;
    for (r, p) in configs {
        if let Some(l) = rows.get(&(p, r)) {
            writeln!(
                out,
                "| {r} | {p} | {:.0} | {:.2} | {:.2} | {} |",
                l.per_sec(),
                l.ms(0.5),
                l.ms(0.99),
                l.errors
            )?;
        }
    }
    writeln!(out)?;
    for p in [16, 64] {
        if let (Some(one), Some(three)) = (rows.get(&(p, 1)), rows.get(&(p, 3))) {
            writeln!(
                out,
                "- P={p}: R=3/R=1 writes/s = {:.2}, p50 = {:.2}x, p99 = {:.2}x",
                three.per_sec() / one.per_sec(),
                three.ms(0.5) / one.ms(0.5),
                three.ms(0.99) / one.ms(0.99)
            )?;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------
// reads

async fn reads(cli: &Cli, binary: &Path) -> anyhow::Result<String> {
    let (r, p) = (3, 16);
    eprintln!("reads: starting a {NODES}-node cluster R={r} P={p}");
    let cluster = Cluster::start(binary, NODES, p, r).await?;
    let result = reads_on(cli, &cluster).await;
    cluster.stop().await;
    result
}

async fn reads_on(cli: &Cli, cluster: &Cluster) -> anyhow::Result<String> {
    let client = cluster.client(|_| {}).await?;
    let preload_start = Instant::now();
    preload(&client, cli.concurrency.max(1)).await?;
    eprintln!(
        "reads: preloaded {KEYS} keys in {:.1} s",
        preload_start.elapsed().as_secs_f64()
    );
    let levels = [
        ("LEASE", Consistency::Lease),
        ("LINEARIZABLE", Consistency::Linearizable),
        (
            "FOLLOWER (100 ms)",
            Consistency::Follower {
                max_staleness: Duration::from_millis(100),
            },
        ),
    ];
    let mut rows = Vec::new();
    for (name, consistency) in levels {
        eprintln!("reads: {name}: {} s of GETs", cli.secs);
        let c = client.clone();
        let options = ReadOptions {
            consistency,
            ..ReadOptions::default()
        };
        let l = load(cli.concurrency, cli.secs, move |k| {
            let c = c.clone();
            async move { c.get_with(key(k), options).await.map(|v| v.is_some()) }
        })
        .await?;
        rows.push((name, l));
    }
    let lease = rows
        .first()
        .map(|(_, l)| (l.per_sec(), l.ms(0.5), l.ms(0.99)))
        .context("no LEASE row")?;
    let mut out = String::new();
    writeln!(
        out,
        "### Reads (GET, R=3, P=16, {} in flight, {KEYS} preloaded keys, {} s)\n",
        cli.concurrency, cli.secs
    )?;
    writeln!(
        out,
        "| consistency | reads/s | p50 ms | p99 ms | reads/s vs LEASE | p99 vs LEASE | misses | errors |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for (name, l) in &rows {
        writeln!(
            out,
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
            l.per_sec(),
            l.ms(0.5),
            l.ms(0.99),
            l.per_sec() / lease.0,
            l.ms(0.99) / lease.2,
            l.misses,
            l.errors
        )?;
    }
    Ok(out)
}

/// Writes every key once, `concurrency` writers over disjoint strides, at most 5 min.
async fn preload(client: &Client, concurrency: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let tasks: Vec<_> = (0..concurrency as u64)
        .map(|t| {
            let client = client.clone();
            let value = value();
            let stride = concurrency as u64;
            tokio::spawn(async move {
                let mut k = t;
                while k < KEYS {
                    if Instant::now() >= deadline {
                        bail!("preloading took more than 5 min");
                    }
                    client
                        .set(key(k), value.clone())
                        .await
                        .with_context(|| format!("preloading {}", key(k)))?;
                    k += stride;
                }
                Ok(())
            })
        })
        .collect();
    for task in futures::future::join_all(tasks).await {
        task.context("a preload task panicked")??;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// failover

struct Trial {
    victim: u64,
    partitions: usize,
    /// Time from the kill until the cluster status showed a live leader for every
    /// partition the victim led (polled every 20 ms); `None` if not within 30 s.
    elected: Option<Duration>,
    /// Time from the kill to the first successful write, per partition it led.
    samples: Vec<Duration>,
    failed: usize,
    /// Time from the restart's ready line to the settled cluster.
    resettle: Duration,
}

async fn failover(cli: &Cli, binary: &Path) -> anyhow::Result<String> {
    let (r, p) = (3, 16);
    eprintln!("failover: starting a {NODES}-node cluster R={r} P={p}");
    let mut cluster = Cluster::start(binary, NODES, p, r).await?;
    let mut trials = Vec::new();
    let mut failure = None;
    for i in 0..cli.trials {
        match failover_trial(&mut cluster, i).await {
            Ok(t) => {
                eprintln!(
                    "failover: trial {}: killed node {} leading {} partitions; first write after max {:.0} ms{}; whole again {:.1} s after restart",
                    i + 1,
                    t.victim,
                    t.partitions,
                    t.samples.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
                    if t.failed > 0 { format!(" ({} partitions failed)", t.failed) } else { String::new() },
                    t.resettle.as_secs_f64()
                );
                trials.push(t);
            }
            Err(e) => {
                eprintln!("failover: trial {} failed: {e:#}", i + 1);
                failure = Some(format!("trial {} failed: {e:#}", i + 1));
                break;
            }
        }
    }
    cluster.stop().await;
    failover_report(cli, &trials, failure)
}

async fn failover_trial(cluster: &mut Cluster, trial: u32) -> anyhow::Result<Trial> {
    let client = cluster
        .client(|c| {
            c.request_deadline = Duration::from_secs(2);
            c.request_timeout = Duration::from_millis(500);
            c.max_attempts = 40;
            c.backoff_base = Duration::from_millis(5);
            c.backoff_max = Duration::from_millis(50);
        })
        .await?;
    let status = client.cluster_status().await.context("cluster status")?;
    let mut led: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for part in &status.partitions {
        if let Some(leader) = part.leader {
            led.entry(leader).or_default().push(part.id);
        }
    }
    let (victim, partitions) = led
        .into_iter()
        .max_by_key(|(_, ps)| ps.len())
        .context("no partition has a leader")?;
    // One key per partition the victim leads.
    let mut keys: BTreeMap<u32, String> = BTreeMap::new();
    for i in 0..1_000_000u32 {
        if keys.len() == partitions.len() {
            break;
        }
        let k = format!("failover:{trial}:{i}");
        let part = client.partition_of(&k);
        if partitions.contains(&part) {
            keys.entry(part).or_insert(k);
        }
    }
    if keys.len() != partitions.len() {
        bail!(
            "found keys for only {} of {} partitions",
            keys.len(),
            partitions.len()
        );
    }
    // Warm the client: map cached, channels to every node open.
    for k in keys.values() {
        client.set(k, value()).await.context("warm-up write")?;
    }
    let mut node = cluster.take(victim)?;
    let addr = node.grpc.clone();
    let killed_at = node.send_kill()?;
    let writers: Vec<_> = keys
        .values()
        .map(|k| {
            let client = client.clone();
            let k = k.clone();
            tokio::spawn(async move {
                for _ in 0..FAILOVER_MAX_ATTEMPTS {
                    if killed_at.elapsed() >= FAILOVER_GIVE_UP {
                        break;
                    }
                    if client.set(&k, value()).await.is_ok() {
                        return Some(killed_at.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                None
            })
        })
        .collect();
    let watcher = {
        let client = client.clone();
        let live: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
        let partitions = partitions.clone();
        tokio::spawn(async move { leaders_elected(&client, &live, &partitions, killed_at).await })
    };
    node.reap().await?;
    let elected = watcher.await.context("the leader watcher panicked")?;
    let mut samples = Vec::new();
    let mut failed = 0;
    for w in futures::future::join_all(writers).await {
        match w.context("a failover writer panicked")? {
            Some(d) => samples.push(d),
            None => failed += 1,
        }
    }
    drop(node);
    // Restart at the same address, so the cluster drops the dead incarnation.
    let seed = cluster.nodes.first().context("no live node")?.grpc.clone();
    let mut joined = None;
    for attempt in 0..10 {
        match cluster.join(&addr, &seed).await {
            Ok(id) => {
                joined = Some(id);
                break;
            }
            Err(e) if attempt < 9 => {
                eprintln!("failover: restart at {addr} failed ({e:#}); retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context("restarting the killed node")),
        }
    }
    joined.context("the killed node did not restart")?;
    let resettle = cluster.wait_settled(SETTLE_TIMEOUT).await?;
    Ok(Trial {
        victim,
        partitions: partitions.len(),
        elected,
        samples,
        failed,
        resettle,
    })
}

/// Polls the cluster status until each of `partitions` has a leader among `live`;
/// returns the time since `killed_at` then, or `None` after [`FAILOVER_GIVE_UP`].
async fn leaders_elected(
    client: &Client,
    live: &[u64],
    partitions: &[u32],
    killed_at: Instant,
) -> Option<Duration> {
    while killed_at.elapsed() < FAILOVER_GIVE_UP {
        if let Ok(status) = client.cluster_status().await {
            let done = status
                .partitions
                .iter()
                .filter(|p| partitions.contains(&p.id))
                .all(|p| p.leader.is_some_and(|l| live.contains(&l)));
            if done {
                return Some(killed_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn failover_report(cli: &Cli, trials: &[Trial], failure: Option<String>) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(
        out,
        "### Failover (R=3, P=16, SIGKILL of the node leading most partitions; time from the kill to the first successful write per partition it led)\n"
    )?;
    writeln!(out, "| trial | killed node | partitions led | leaders elected ms | first write max ms | first write mean ms | failed | whole again after restart s |")?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for (i, t) in trials.iter().enumerate() {
        let max = t.samples.iter().max().copied().unwrap_or_default();
        let mean = if t.samples.is_empty() {
            Duration::ZERO
        } else {
            t.samples.iter().sum::<Duration>() / u32::try_from(t.samples.len()).unwrap_or(1)
        };
        writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {:.1} |",
            i + 1,
            t.victim,
            t.partitions,
            t.elected
                .map_or_else(|| "-".to_owned(), |d| format!("{:.0}", ms(d))),
            ms(max),
            ms(mean),
            t.failed,
            t.resettle.as_secs_f64()
        )?;
    }
    let mut all: Vec<Duration> = trials.iter().flat_map(|t| t.samples.clone()).collect();
    all.sort();
    let mut maxima: Vec<Duration> = trials
        .iter()
        .filter_map(|t| t.samples.iter().max().copied())
        .collect();
    maxima.sort();
    let failed: usize = trials.iter().map(|t| t.failed).sum();
    writeln!(out)?;
    writeln!(out, "| over | samples | p50 ms | p99 ms | max ms |")?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    let mut elected: Vec<Duration> = trials.iter().filter_map(|t| t.elected).collect();
    elected.sort();
    for (name, v) in [
        ("first write, (partition, trial)", &all),
        ("first write, trial (max per trial)", &maxima),
        ("all leaders elected (status poll), trial", &elected),
    ] {
        writeln!(
            out,
            "| {name} | {} | {:.0} | {:.0} | {:.0} |",
            v.len(),
            ms(quantile(v, 0.5)),
            ms(quantile(v, 0.99)),
            ms(v.last().copied().unwrap_or_default())
        )?;
    }
    let p99 = quantile(&all, 0.99);
    writeln!(out)?;
    writeln!(
        out,
        "- goal p99 < {} ms over (partition, trial): {} ({} of {} trials run{})",
        FAILOVER_GOAL.as_millis(),
        if p99 < FAILOVER_GOAL && failed == 0 && !all.is_empty() {
            "MET"
        } else {
            "NOT MET"
        },
        trials.len(),
        cli.trials,
        if failed > 0 {
            format!(
                ", {failed} partitions never recovered within {} s",
                FAILOVER_GIVE_UP.as_secs()
            )
        } else {
            String::new()
        }
    )?;
    if let Some(f) = failure {
        writeln!(out, "- stopped early: {f}")?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------
// idle

async fn idle(cli: &Cli, binary: &Path) -> anyhow::Result<String> {
    let hz = clock_ticks_per_second()?;
    let mut rows = Vec::new();
    for p in [16u32, 64] {
        eprintln!("idle: starting a {NODES}-node cluster R=3 P={p}");
        let cluster = Cluster::start(binary, NODES, p, 3).await?;
        let result = idle_on(&cluster, hz, cli.idle_secs).await;
        cluster.stop().await;
        rows.push((p, result?));
    }
    let mut out = String::new();
    writeln!(
        out,
        "### Idle CPU (R=3, {NODES} nodes, no requests; % of one core over {} s, utime+stime from /proc, {hz} ticks/s)\n",
        cli.idle_secs
    )?;
    writeln!(out, "| P | node 1 | node 2 | node 3 | mean |")?;
    writeln!(out, "|---:|---:|---:|---:|---:|")?;
    for (p, cpus) in &rows {
        let cells: Vec<String> = cpus.iter().map(|c| format!("{c:.1} %")).collect();
        let mean = cpus.iter().sum::<f64>() / cpus.len().max(1) as f64;
        writeln!(out, "| {p} | {} | {mean:.1} % |", cells.join(" | "))?;
    }
    if let Some((_, cpus)) = rows.iter().find(|(p, _)| *p == 16) {
        let worst = cpus.iter().copied().fold(0.0, f64::max);
        writeln!(
            out,
            "\n- goal < {IDLE_GOAL_PERCENT} % per node at P=16: {} (worst node {worst:.1} %)",
            if worst < IDLE_GOAL_PERCENT {
                "MET"
            } else {
                "NOT MET"
            }
        )?;
    }
    Ok(out)
}

/// Each node's CPU in % of one core over `secs`, after 3 s of rest.
async fn idle_on(cluster: &Cluster, hz: u64, secs: u64) -> anyhow::Result<Vec<f64>> {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pids: Vec<u32> = cluster.nodes.iter().map(|n| n.pid).collect();
    let before = pids
        .iter()
        .map(|&p| cpu_ticks(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let t0 = Instant::now();
    eprintln!("idle: measuring {secs} s");
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let after = pids
        .iter()
        .map(|&p| cpu_ticks(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let wall = t0.elapsed().as_secs_f64();
    Ok(before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / hz as f64 / wall * 100.0)
        .collect())
}
