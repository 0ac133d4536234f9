//! `persist-bench`: the persistence benchmark, everything on 127.0.0.1, in one run:
//!
//! 1. **Save and load** of `--keys` keys (`key:{n}`, 100-byte values) on one node
//!    (R=1, P=16, `--persistence snapshot`, periodic snapshots off like Redis with
//!    `--save ''`): fill with the Rust client (`--load-concurrency` sets in flight),
//!    time `admin snapshot` (save), SIGTERM (shutdown checkpoint), restart on the same
//!    address and data directory, time until the ready line and until a read of 100
//!    keys succeeds (load), and count what came back (log line, stats, a sample read).
//! 2. **Write latency during a snapshot**: on that node, `--probe-concurrency` writers
//!    set random keys for `--pause-secs` without a snapshot, then for `--pause-secs`
//!    while `admin snapshot` runs back to back; p50/p99/max and the ratios.
//! 3. **Redis side by side**: `redis-server --save '' --appendonly no`, the same keys and
//!    values through `redis-cli --pipe`, `BGSAVE` until `rdb_bgsave_in_progress:0`
//!    (save), `SHUTDOWN NOSAVE`, restart on the same directory until `PING` answers and
//!    `loading:0` (load), `DBSIZE`. Skipped with a message when redis-server is missing.
//! 4. **Durable vs memory writes**: three fresh 3-node clusters (R=3, P=16) with
//!    `--persistence none`, `snapshot`, `durable`; `--concurrency` writers for `--secs`
//!    each; writes/s, p50/p99 and the ratios to `none`.
//!
//! Every child is owned by a guard that kills it on drop (also on panic, ctrl-c or
//! SIGTERM) and gets SIGKILL if this process dies. Progress goes to stderr; one plain
//! text table goes to stdout at the end, and the figures as JSON to `--json FILE`.
//!
//! ```text
//! cargo build --release -p raftcache-node --bin raftcache-node -p raftcache-benches --bin persist-bench
//! target/release/persist-bench --keys 100000 --secs 3        # quick
//! target/release/persist-bench --json /tmp/persist.json      # 1M keys, 8 s windows
//! ```

use anyhow::{bail, ensure, Context};
use clap::Parser;
use raftcache_benches::cdc::ProcessTicks;
use raftcache_benches::cluster::{clock_ticks_per_second, Cluster};
use raftcache_benches::load::{node_binary, Load};
use raftcache_benches::persist::{
    dir_bytes, fill, find_program, free_addr, info_field, key_of, log_field, redis_pipe, set_load,
    start_node, value_of, NodeRun, Proc, Reply, Resp, POLL,
};
use raftcache_client::{Client, ClientConfig};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Partitions of every raftcache node/cluster here.
const PARTITIONS: u32 = 16;
/// Nodes of the durability clusters.
const CLUSTER_NODES: u32 = 3;
/// Key space of the durability write load.
const CLUSTER_KEYS: u64 = 100_000;
/// Warm-up before each durability window.
const WARMUP: Duration = Duration::from_secs(2);
/// Warm-up before the pause probe's first window.
const PROBE_WARMUP: Duration = Duration::from_millis(500);
/// How long the fill of either store may take.
const FILL_LIMIT: Duration = Duration::from_secs(1800);
/// How long a first start may take to print its ready line / answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a shutdown (checkpoint), a save or a restart (load) may take.
const LONG_TIMEOUT: Duration = Duration::from_secs(600);
/// Keys read to decide that a restarted store serves.
const FIRST_READ_KEYS: u64 = 100;
/// Upper bound of the snapshots requested during one probe window.
const MAX_PROBE_SNAPSHOTS: u32 = 1_000;
/// Process names that are part of the benchmark (the rest is "other" CPU).
const OURS: &[&str] = &[
    "raftcache-node",
    "persist-bench",
    "redis-server",
    "redis-cli",
    "redis-rdb-bgsave",
];

#[derive(Debug, Parser)]
#[command(about = "Persistence benchmark: raftcache snapshots vs Redis RDB, durable vs memory")]
struct Cli {
    /// The node binary; default: `raftcache-node` beside this executable.
    #[arg(long, env = "RAFTCACHE_NODE_BIN")]
    node_bin: Option<PathBuf>,
    /// The redis-server binary (a name is looked up on PATH).
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// The redis-cli binary (a name is looked up on PATH).
    #[arg(long, default_value = "redis-cli")]
    redis_cli: String,
    /// Keys saved and loaded by both stores.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Measured seconds of each durability write window (after a 2 s warm-up).
    #[arg(long, default_value_t = 8)]
    secs: u64,
    /// Seconds of each pause-probe window (without / during snapshots); at most --secs.
    #[arg(long, default_value_t = 3)]
    pause_secs: u64,
    /// Sets in flight while filling the node.
    #[arg(long, default_value_t = 256)]
    load_concurrency: usize,
    /// Writers of the pause probe.
    #[arg(long, default_value_t = 8)]
    probe_concurrency: usize,
    /// Writers of the durability windows.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Random keys read back after the restart.
    #[arg(long, default_value_t = 10_000)]
    sample: u64,
    /// Parts to run, comma-separated: save (with the pause probe), redis, durable.
    #[arg(long, default_value = "save,redis,durable", value_delimiter = ',')]
    parts: Vec<String>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the data directories and logs (their folder is printed).
    #[arg(long)]
    keep: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    for p in &cli.parts {
        ensure!(
            matches!(p.as_str(), "save" | "redis" | "durable"),
            "unknown part {p:?}: expected save, redis or durable"
        );
    }
    ensure!(
        cli.keys >= FIRST_READ_KEYS,
        "--keys must be at least {FIRST_READ_KEYS}"
    );
    ensure!(
        cli.secs >= 1 && cli.pause_secs >= 1,
        "--secs and --pause-secs must be >= 1"
    );
    let binary = node_binary(cli.node_bin.clone())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    // On a signal the benchmark future is dropped, and with it every process guard.
    tokio::select! {
        r = run(&cli, &binary) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; child processes killed"),
        _ = terminate.recv() => bail!("terminated; child processes killed"),
    }
}

/// Measures the CPU other processes take during a part.
struct Others {
    ticks_per_s: f64,
    from: ProcessTicks,
    at: Instant,
}

impl Others {
    fn start(ticks_per_s: f64) -> Others {
        Others {
            ticks_per_s,
            from: ProcessTicks::take(),
            at: Instant::now(),
        }
    }

    /// % of one core used by other processes since [`Others::start`].
    fn percent(&self) -> f64 {
        let ticks = self.from.others_until(&ProcessTicks::take(), OURS) as f64;
        ticks / self.ticks_per_s / self.at.elapsed().as_secs_f64().max(1e-3) * 100.0
    }
}

async fn run(cli: &Cli, binary: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let ticks_per_s = clock_ticks_per_second()? as f64;
    let work = tempfile::Builder::new()
        .prefix("raftcache-persist-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    eprintln!("persist-bench: data and logs in {}", work.path().display());
    let part = |name: &str| cli.parts.iter().any(|p| p == name);
    let mut errors: Vec<String> = Vec::new();

    let mut save = None;
    if part("save") {
        let others = Others::start(ticks_per_s);
        match save_and_load(cli, binary, &work.path().join("raftcache")).await {
            Ok(s) => save = Some((s, others.percent())),
            Err(e) => {
                eprintln!("save/load: FAILED: {e:#}");
                errors.push(format!("raftcache save/load: {e:#}"));
            }
        }
    }
    let mut redis = None;
    let mut redis_skipped = None;
    if part("redis") {
        let others = Others::start(ticks_per_s);
        match redis_side(cli, &work.path().join("redis")).await {
            Ok(Ok(r)) => redis = Some((r, others.percent())),
            Ok(Err(skipped)) => redis_skipped = Some(skipped),
            Err(e) => {
                eprintln!("redis: FAILED: {e:#}");
                errors.push(format!("redis: {e:#}"));
            }
        }
    }
    let mut durable = Vec::new();
    if part("durable") {
        for mode in ["none", "snapshot", "durable"] {
            let others = Others::start(ticks_per_s);
            match durability(cli, binary, mode).await {
                Ok(row) => durable.push((mode, row, others.percent())),
                Err(e) => {
                    eprintln!("durable: {mode}: FAILED: {e:#}");
                    errors.push(format!("writes with --persistence {mode}: {e:#}"));
                }
            }
        }
    }

    let redis_version = redis_version(cli).await;
    let report = Report {
        cli,
        binary,
        redis_version: &redis_version,
        save: save.as_ref(),
        redis: redis.as_ref(),
        redis_skipped: redis_skipped.as_deref(),
        durable: &durable,
        errors: &errors,
    };
    let text = report.text()?;
    println!("{text}");
    if let Some(path) = &cli.json {
        let json = serde_json::to_string_pretty(&report.json()).context("encoding JSON")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("figures written to {}", path.display());
    }
    if cli.keep {
        let kept = work.keep();
        eprintln!("kept data and logs in {}", kept.display());
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    ensure!(
        errors.is_empty(),
        "{} part(s) failed: {}",
        errors.len(),
        errors.join("; ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// 1 + 2: save and load on one node, write latency during snapshots

/// The figures of parts 1 and 2.
struct SaveLoad {
    fill: Duration,
    keys_before: u64,
    /// Wall time of `admin snapshot` at the client.
    save_wall: Duration,
    /// The node's own duration of it.
    save_node_ms: u64,
    save_bytes: u64,
    save_max_pause_us: u64,
    save_groups: usize,
    disk_bytes_stats: u64,
    dir_bytes_after_save: u64,
    probe: Option<Probe>,
    probe_error: Option<String>,
    /// SIGTERM → exit.
    shutdown: Duration,
    checkpoint_ms: Option<u64>,
    checkpoint_bytes: Option<u64>,
    /// Restart: spawn → ready line.
    ready: Duration,
    /// Restart: spawn → a read of [`FIRST_READ_KEYS`] keys all found.
    first_read: Duration,
    restored_log_keys: Option<u64>,
    stats_keys: u64,
    sampled: u64,
    sample_ok: u64,
    dir_bytes_after_restart: u64,
}

/// The pause probe's two windows.
struct Probe {
    quiet: Load,
    during: Load,
    /// Per snapshot request in the window: (wall, node-reported ms, longest pause µs).
    snapshots: Vec<(Duration, u64, u64)>,
}

fn node_args(grpc: &str, data: &Path) -> Vec<OsString> {
    [
        "--grpc-addr",
        grpc,
        "--metrics-addr",
        "127.0.0.1:0",
        "--partitions",
        &PARTITIONS.to_string(),
        "--replicas",
        "1",
        "--persistence",
        "snapshot",
        // Periodic snapshots off, like Redis with --save '': only the requested ones
        // and the shutdown checkpoint are written.
        "--snapshot-interval",
        "24h",
        "--snapshot-writes",
        "1000000000000",
    ]
    .iter()
    .map(OsString::from)
    .chain([OsString::from("--data-dir"), data.as_os_str().to_owned()])
    .collect()
}

fn client_config(grpc: &str) -> ClientConfig {
    ClientConfig::new([grpc.to_owned()])
}

/// Connects to `grpc`, retrying until `deadline`.
async fn connect_until(grpc: &str, deadline: Instant) -> anyhow::Result<Client> {
    loop {
        match Client::try_connect(client_config(grpc)).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(POLL).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("connecting to {grpc}"))),
        }
    }
}

/// Whether the first [`FIRST_READ_KEYS`] keys all read back with their values.
async fn first_keys_ok(client: &Client) -> bool {
    let keys: Vec<String> = (0..FIRST_READ_KEYS).map(key_of).collect();
    match client.mget(&keys).await {
        Ok(values) => values
            .iter()
            .enumerate()
            .all(|(n, v)| v.as_ref().is_some_and(|v| v.value == value_of(n as u64))),
        Err(_) => false,
    }
}

async fn save_and_load(cli: &Cli, binary: &Path, dir: &Path) -> anyhow::Result<SaveLoad> {
    let grpc = free_addr()?.to_string();
    let data = dir.join("data");
    let args = node_args(&grpc, &data);
    eprintln!(
        "save/load: starting one node (R=1, P={PARTITIONS}, --persistence snapshot) at {grpc}"
    );
    let mut run1 = start_node("node-run1", binary, &args, dir, START_TIMEOUT).await?;
    let client = connect_until(&grpc, Instant::now() + START_TIMEOUT).await?;
    // The partitions elect their leader right after the start: wait for a first write.
    let deadline = Instant::now() + START_TIMEOUT;
    while let Err(e) = client.set(key_of(0), value_of(0)).await {
        ensure!(
            Instant::now() < deadline,
            "the node takes no write within {START_TIMEOUT:?}: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "save/load: filling {} keys ({} sets in flight) ...",
        cli.keys, cli.load_concurrency
    );
    let fill_took = fill(&client, cli.keys, cli.load_concurrency, FILL_LIMIT).await?;
    eprintln!(
        "save/load: filled in {:.1} s ({:.0} keys/s)",
        fill_took.as_secs_f64(),
        cli.keys as f64 / fill_took.as_secs_f64()
    );
    let stats = client.stats().await.context("stats after the fill")?;
    let keys_before = stats.iter().map(|s| s.keys).sum();

    eprintln!("save/load: admin snapshot ...");
    let t0 = Instant::now();
    let answers = client.snapshot(None).await.context("admin snapshot")?;
    let save_wall = t0.elapsed();
    let snaps: Vec<_> = answers.iter().flat_map(|a| a.snapshots.iter()).collect();
    ensure!(!snaps.is_empty(), "admin snapshot wrote no snapshot");
    let save_bytes = snaps.iter().map(|s| s.2).sum();
    let save_max_pause_us = snaps.iter().map(|s| s.3).max().unwrap_or(0);
    let save_node_ms = answers.iter().map(|a| a.duration_ms).max().unwrap_or(0);
    let stats = client.stats().await.context("stats after the snapshot")?;
    let disk_bytes_stats = stats.iter().map(|s| s.disk_bytes).sum();
    let dir_bytes_after_save = dir_bytes(&data);
    eprintln!(
        "save/load: saved {} snapshots, {save_bytes} bytes in {} ms (node: {save_node_ms} ms), longest pause {save_max_pause_us} µs",
        snaps.len(),
        save_wall.as_millis()
    );

    let (probe, probe_error) = match pause_probe(cli, &client).await {
        Ok(p) => (Some(p), None),
        Err(e) => {
            eprintln!("pause probe: FAILED: {e:#}");
            (None, Some(format!("{e:#}")))
        }
    };
    drop(client);

    eprintln!("save/load: SIGTERM (shutdown checkpoint) ...");
    let (shutdown, status) = run1.proc.terminate(LONG_TIMEOUT).await?;
    let log1 = run1.proc.stderr_text();
    ensure!(
        status.success(),
        "the node exited with {status} after SIGTERM; log tail:\n{}",
        run1.proc.log_tail(20)
    );
    let checkpoint_ms = log_field(&log1, "wrote the shutdown checkpoint", "ms");
    let checkpoint_bytes = log_field(&log1, "wrote the shutdown checkpoint", "bytes");
    if checkpoint_ms.is_none() {
        eprintln!(
            "save/load: warning: no \"wrote the shutdown checkpoint\" line in the log; tail:\n{}",
            run1.proc.log_tail(10)
        );
    }
    drop(run1);

    eprintln!("save/load: restarting on the same address and data directory ...");
    let run2: NodeRun = start_node("node-run2", binary, &args, dir, LONG_TIMEOUT).await?;
    let deadline = run2.proc.spawned_at + LONG_TIMEOUT;
    let client = connect_until(&grpc, deadline).await?;
    let first_read = loop {
        if first_keys_ok(&client).await {
            break run2.proc.spawned_at.elapsed();
        }
        ensure!(
            Instant::now() < deadline,
            "the restarted node did not serve the first {FIRST_READ_KEYS} keys within {LONG_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL).await;
    };
    eprintln!(
        "save/load: ready after {} ms, first read after {} ms; checking {} random keys ...",
        run2.ready_after.as_millis(),
        first_read.as_millis(),
        cli.sample
    );
    let log2 = run2.proc.stderr_text();
    let restored_log_keys = log_field(&log2, "restored from the data directory", "keys");
    if restored_log_keys.is_none() {
        eprintln!(
            "save/load: warning: no \"restored from the data directory\" line in the log; tail:\n{}",
            run2.proc.log_tail(10)
        );
    }
    let stats = client.stats().await.context("stats after the restart")?;
    let stats_keys = stats.iter().map(|s| s.keys).sum();
    let (sampled, sample_ok) = sample_keys(&client, cli.keys, cli.sample).await?;
    let dir_bytes_after_restart = dir_bytes(&data);
    let ready = run2.ready_after;
    drop(client);
    drop(run2);
    Ok(SaveLoad {
        fill: fill_took,
        keys_before,
        save_wall,
        save_node_ms,
        save_bytes,
        save_max_pause_us,
        save_groups: snaps.len(),
        disk_bytes_stats,
        dir_bytes_after_save,
        probe,
        probe_error,
        shutdown,
        checkpoint_ms,
        checkpoint_bytes,
        ready,
        first_read,
        restored_log_keys,
        stats_keys,
        sampled,
        sample_ok,
        dir_bytes_after_restart,
    })
}

/// Reads `sample` random keys of `0..keys` (100 per MGet); returns (read, found with
/// the right value).
async fn sample_keys(client: &Client, keys: u64, sample: u64) -> anyhow::Result<(u64, u64)> {
    let mut rng = SmallRng::seed_from_u64(0xc0ffee);
    let picks: Vec<u64> = (0..sample).map(|_| rng.random_range(0..keys)).collect();
    let mut ok = 0;
    for chunk in picks.chunks(100) {
        let names: Vec<String> = chunk.iter().map(|&n| key_of(n)).collect();
        let values = client.mget(&names).await.context("reading sample keys")?;
        ok += chunk
            .iter()
            .zip(&values)
            .filter(|(n, v)| v.as_ref().is_some_and(|v| v.value == value_of(**n)))
            .count() as u64;
    }
    Ok((sample, ok))
}

/// Part 2: set latency without, then during back-to-back snapshots.
async fn pause_probe(cli: &Cli, client: &Client) -> anyhow::Result<Probe> {
    let window = Duration::from_secs(cli.pause_secs.min(cli.secs));
    eprintln!(
        "pause probe: {} writers, {} s without a snapshot ...",
        cli.probe_concurrency,
        window.as_secs()
    );
    let quiet = set_load(
        client,
        cli.probe_concurrency,
        cli.keys,
        PROBE_WARMUP,
        window,
    )
    .await?;
    eprintln!(
        "pause probe: {} s while admin snapshot runs back to back ...",
        window.as_secs()
    );
    let end = Instant::now() + window;
    let snapshots = async {
        let mut out = Vec::new();
        for _ in 0..MAX_PROBE_SNAPSHOTS {
            if Instant::now() >= end {
                break;
            }
            let t0 = Instant::now();
            let answers = client.snapshot(None).await.context("admin snapshot")?;
            let pause = answers
                .iter()
                .flat_map(|a| a.snapshots.iter().map(|s| s.3))
                .max()
                .unwrap_or(0);
            let node_ms = answers.iter().map(|a| a.duration_ms).max().unwrap_or(0);
            out.push((t0.elapsed(), node_ms, pause));
        }
        anyhow::Ok(out)
    };
    let (during, snapshots) = tokio::join!(
        set_load(
            client,
            cli.probe_concurrency,
            cli.keys,
            Duration::ZERO,
            window
        ),
        snapshots
    );
    Ok(Probe {
        quiet,
        during: during?,
        snapshots: snapshots?,
    })
}

// ---------------------------------------------------------------------------------
// 3: Redis

struct RedisFigures {
    fill: Duration,
    replies: u64,
    save: Duration,
    fork_us: Option<u64>,
    rdb_bytes: u64,
    shutdown: Duration,
    load: Duration,
    keys_loaded_info: Option<u64>,
    dbsize: i64,
    sample_ok: u64,
    sampled: u64,
}

const REDIS_MISSING: &str = "redis-server not found; install it (benches/scripts/persist.sh does)";

/// Part 3; `Ok(Err(why))` when it was skipped.
async fn redis_side(cli: &Cli, dir: &Path) -> anyhow::Result<Result<RedisFigures, String>> {
    let Some(server) = find_program(&cli.redis_server) else {
        eprintln!("{REDIS_MISSING}");
        return Ok(Err(REDIS_MISSING.to_owned()));
    };
    let Some(redis_cli) = find_program(&cli.redis_cli) else {
        let why = "redis-cli not found; install redis-tools (benches/scripts/persist.sh does)";
        eprintln!("{why}");
        return Ok(Err(why.to_owned()));
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let port = free_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let args: Vec<OsString> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
        "--dbfilename",
        "dump.rdb",
        "--daemonize",
        "no",
        "--logfile",
        "",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    eprintln!("redis: starting redis-server at {addr}");
    let mut run1 = Proc::spawn("redis-run1", &server, &args, &[], dir)?;
    let mut conn = wait_redis(&mut run1, &addr, START_TIMEOUT).await?.1;

    eprintln!("redis: loading {} keys with redis-cli --pipe ...", cli.keys);
    let (fill_took, replies) = redis_pipe(&redis_cli, port, cli.keys, dir, FILL_LIMIT).await?;
    let dbsize_before = conn.cmd(&["DBSIZE"]).await?.int()?;
    ensure!(
        u64::try_from(dbsize_before).ok() == Some(cli.keys),
        "redis has {dbsize_before} keys after the load, expected {}",
        cli.keys
    );
    eprintln!(
        "redis: loaded in {:.1} s; BGSAVE ...",
        fill_took.as_secs_f64()
    );
    let lastsave = conn.cmd(&["LASTSAVE"]).await?.int()?;
    let t0 = Instant::now();
    let reply = conn.cmd(&["BGSAVE"]).await?;
    ensure!(
        matches!(&reply, Reply::Simple(s) if s.contains("started")),
        "BGSAVE: {}",
        reply.text()
    );
    loop {
        let info = conn.info("persistence").await?;
        if info_field(&info, "rdb_bgsave_in_progress") == Some("0") {
            let status = info_field(&info, "rdb_last_bgsave_status").unwrap_or("?");
            ensure!(status == "ok", "BGSAVE ended with status {status}");
            break;
        }
        ensure!(
            t0.elapsed() < LONG_TIMEOUT,
            "BGSAVE did not finish within {LONG_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    let save = t0.elapsed();
    let lastsave_after = conn.cmd(&["LASTSAVE"]).await?.int()?;
    if lastsave_after == lastsave {
        eprintln!("redis: note: LASTSAVE did not change (both within the same second)");
    }
    let stats = conn.info("stats").await?;
    let fork_us = info_field(&stats, "latest_fork_usec").and_then(|v| v.parse().ok());
    let rdb_bytes = std::fs::metadata(dir.join("dump.rdb"))
        .context("no dump.rdb after BGSAVE")?
        .len();
    eprintln!(
        "redis: BGSAVE took {} ms ({rdb_bytes} bytes); SHUTDOWN NOSAVE and restart ...",
        save.as_millis()
    );
    let t0 = Instant::now();
    // The server closes the connection instead of answering.
    let _ = conn.cmd(&["SHUTDOWN", "NOSAVE"]).await;
    drop(conn);
    let status = run1.wait_exit(LONG_TIMEOUT).await?;
    let shutdown = t0.elapsed();
    ensure!(
        status.success(),
        "redis-server exited with {status}; log tail:\n{}",
        run1.log_tail(20)
    );
    drop(run1);

    let mut run2 = Proc::spawn("redis-run2", &server, &args, &[], dir)?;
    let (load, mut conn) = wait_redis(&mut run2, &addr, LONG_TIMEOUT).await?;
    let persistence = conn.info("persistence").await?;
    let keys_loaded_info =
        info_field(&persistence, "rdb_last_load_keys_loaded").and_then(|v| v.parse().ok());
    let dbsize = conn.cmd(&["DBSIZE"]).await?.int()?;
    // Read back the same kind of sample as on raftcache (at most 1,000 GETs here).
    let mut rng = SmallRng::seed_from_u64(0xc0ffee);
    let sampled = cli.sample.min(1_000);
    let mut sample_ok = 0;
    for _ in 0..sampled {
        let n = rng.random_range(0..cli.keys);
        if let Reply::Bulk(Some(v)) = conn.cmd(&["GET", &key_of(n)]).await? {
            sample_ok += u64::from(v == value_of(n).as_ref());
        }
    }
    eprintln!("redis: loaded in {} ms; DBSIZE {dbsize}", load.as_millis());
    drop(conn);
    drop(run2);
    Ok(Ok(RedisFigures {
        fill: fill_took,
        replies,
        save,
        fork_us,
        rdb_bytes,
        shutdown,
        load,
        keys_loaded_info,
        dbsize,
        sample_ok,
        sampled,
    }))
}

/// Waits until the server at `addr` answers PING and reports `loading:0`; returns the
/// time since its spawn and the connection.
async fn wait_redis(
    proc: &mut Proc,
    addr: &str,
    timeout: Duration,
) -> anyhow::Result<(Duration, Resp)> {
    let deadline = proc.spawned_at + timeout;
    loop {
        if let Some(status) = proc.exited()? {
            bail!(
                "{} exited ({status}); log tail:\n{}",
                proc.name,
                proc.log_tail(20)
            );
        }
        let last = match ready_redis(addr).await {
            Ok(Some(conn)) => return Ok((proc.spawned_at.elapsed(), conn)),
            Ok(None) => "loading".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            Instant::now() < deadline,
            "{} was not ready within {timeout:?} ({last}); log tail:\n{}",
            proc.name,
            proc.log_tail(20)
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A connection when the server answers PING and is not loading; `None` while loading.
async fn ready_redis(addr: &str) -> anyhow::Result<Option<Resp>> {
    let mut conn = Resp::connect(addr).await?;
    match conn.cmd(&["PING"]).await? {
        Reply::Simple(s) if s == "PONG" => {}
        Reply::Error(e) if e.starts_with("LOADING") => return Ok(None),
        other => bail!("PING: {}", other.text()),
    }
    let info = conn.info("persistence").await?;
    Ok((info_field(&info, "loading") == Some("0")).then_some(conn))
}

/// `redis-server --version`, shortened (empty when it does not run).
async fn redis_version(cli: &Cli) -> String {
    let Some(server) = find_program(&cli.redis_server) else {
        return String::new();
    };
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new(server)
            .arg("--version")
            .kill_on_drop(true)
            .output(),
    )
    .await;
    match out {
        Ok(Ok(o)) => String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("v="))
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

// ---------------------------------------------------------------------------------
// 4: durable vs memory

struct DurableRow {
    load: Load,
    disk_bytes: u64,
}

async fn durability(cli: &Cli, binary: &Path, mode: &str) -> anyhow::Result<DurableRow> {
    eprintln!("durable: starting {CLUSTER_NODES} nodes, R=3, P={PARTITIONS}, --persistence {mode}");
    let extra: Vec<OsString> = vec!["--persistence".into(), mode.into()];
    let cluster = Cluster::start_with(binary, CLUSTER_NODES, PARTITIONS, 3, &extra).await?;
    let result = async {
        let client = cluster.client(|_| {}).await?;
        eprintln!(
            "durable: {mode}: {} writers, {} s after {} s warm-up",
            cli.concurrency,
            cli.secs,
            WARMUP.as_secs()
        );
        let load = set_load(
            &client,
            cli.concurrency,
            CLUSTER_KEYS,
            WARMUP,
            Duration::from_secs(cli.secs),
        )
        .await?;
        let disk_bytes = client
            .stats()
            .await
            .context("stats")?
            .iter()
            .map(|s| s.disk_bytes)
            .sum();
        eprintln!(
            "durable: {mode}: {:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms",
            load.per_sec(),
            load.ms(0.5),
            load.ms(0.99)
        );
        anyhow::Ok(DurableRow { load, disk_bytes })
    }
    .await;
    cluster.stop().await;
    result
}

// ---------------------------------------------------------------------------------
// Report

struct Report<'a> {
    cli: &'a Cli,
    binary: &'a Path,
    redis_version: &'a str,
    save: Option<&'a (SaveLoad, f64)>,
    redis: Option<&'a (RedisFigures, f64)>,
    redis_skipped: Option<&'a str>,
    durable: &'a [(&'static str, DurableRow, f64)],
    errors: &'a [String],
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".to_owned()
    }
}

/// Left-aligns the first column and right-aligns the others.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let pad = width[c].saturating_sub(cell.chars().count());
            if c == 0 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str("  ");
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|s| (*s).to_owned()).collect()
}

impl Report<'_> {
    fn text(&self) -> anyhow::Result<String> {
        let cli = self.cli;
        let mut out = String::new();
        writeln!(
            out,
            "persist-bench: 127.0.0.1, {} cores, {} keys \"key:N\" with 100 B pseudo-random values (the same bytes in both stores)",
            std::thread::available_parallelism().map_or(0, usize::from),
            cli.keys
        )?;
        writeln!(
            out,
            "raftcache-node: {} (one node, R=1, P={PARTITIONS}, --persistence snapshot, periodic snapshots off); redis-server {} (--save '' --appendonly no)",
            self.binary.display(),
            if self.redis_version.is_empty() { "-" } else { self.redis_version }
        )?;
        writeln!(out)?;

        // 1. Save and load.
        writeln!(out, "1. Save and load of {} keys", cli.keys)?;
        let s = self.save.map(|(s, _)| s);
        let r = self.redis.map(|(r, _)| r);
        let dash = || "-".to_owned();
        let mut rows = vec![row(&["", "raftcache", "redis", "raftcache/redis"])];
        rows.push(vec![
            "fill, s (keys/s)".to_owned(),
            s.map_or_else(dash, |s| {
                format!(
                    "{:.1} ({:.0}/s)",
                    s.fill.as_secs_f64(),
                    cli.keys as f64 / s.fill.as_secs_f64()
                )
            }),
            r.map_or_else(dash, |r| {
                format!(
                    "{:.1} ({:.0}/s)",
                    r.fill.as_secs_f64(),
                    cli.keys as f64 / r.fill.as_secs_f64()
                )
            }),
            match (s, r) {
                (Some(s), Some(r)) => ratio(s.fill.as_secs_f64(), r.fill.as_secs_f64()),
                _ => dash(),
            },
        ]);
        rows.push(vec![
            "save (admin snapshot | BGSAVE), ms".to_owned(),
            s.map_or_else(dash, |s| format!("{:.0}", ms(s.save_wall))),
            r.map_or_else(dash, |r| format!("{:.0}", ms(r.save))),
            match (s, r) {
                (Some(s), Some(r)) => ratio(ms(s.save_wall), ms(r.save)),
                _ => dash(),
            },
        ]);
        rows.push(vec![
            "  node-reported snapshot time, ms".to_owned(),
            s.map_or_else(dash, |s| s.save_node_ms.to_string()),
            dash(),
            dash(),
        ]);
        rows.push(vec![
            "  bytes written (snapshots | dump.rdb), MB".to_owned(),
            s.map_or_else(dash, |s| {
                format!("{:.1} ({} groups)", mb(s.save_bytes), s.save_groups)
            }),
            r.map_or_else(dash, |r| format!("{:.1}", mb(r.rdb_bytes))),
            match (s, r) {
                (Some(s), Some(r)) => ratio(s.save_bytes as f64, r.rdb_bytes as f64),
                _ => dash(),
            },
        ]);
        rows.push(vec![
            "  longest write pause (state copy | fork), us".to_owned(),
            s.map_or_else(dash, |s| s.save_max_pause_us.to_string()),
            r.map_or_else(dash, |r| r.fork_us.map_or_else(dash, |f| f.to_string())),
            match (s, r) {
                (Some(s), Some(r)) => r
                    .fork_us
                    .map_or_else(dash, |f| ratio(s.save_max_pause_us as f64, f as f64)),
                _ => dash(),
            },
        ]);
        rows.push(vec![
            "  data dir after save (sled | rdb), MB".to_owned(),
            s.map_or_else(dash, |s| {
                format!(
                    "{:.1} (stats {:.1})",
                    mb(s.dir_bytes_after_save),
                    mb(s.disk_bytes_stats)
                )
            }),
            r.map_or_else(dash, |r| format!("{:.1}", mb(r.rdb_bytes))),
            match (s, r) {
                (Some(s), Some(r)) => ratio(s.dir_bytes_after_save as f64, r.rdb_bytes as f64),
                _ => dash(),
            },
        ]);
        rows.push(vec![
            "shutdown (SIGTERM + checkpoint | SHUTDOWN NOSAVE), ms".to_owned(),
            s.map_or_else(dash, |s| {
                format!(
                    "{:.0}{}",
                    ms(s.shutdown),
                    s.checkpoint_ms
                        .map_or_else(String::new, |c| format!(" (checkpoint {c})"))
                )
            }),
            r.map_or_else(dash, |r| format!("{:.0}", ms(r.shutdown))),
            dash(),
        ]);
        rows.push(vec![
            "load: restart -> ready line | PING + loading:0, ms".to_owned(),
            s.map_or_else(dash, |s| format!("{:.0}", ms(s.ready))),
            r.map_or_else(dash, |r| format!("{:.0}", ms(r.load))),
            match (s, r) {
                (Some(s), Some(r)) => ratio(ms(s.ready), ms(r.load)),
                _ => dash(),
            },
        ]);
        rows.push(vec![
            format!("load: restart -> first read of {FIRST_READ_KEYS} keys, ms"),
            s.map_or_else(dash, |s| format!("{:.0}", ms(s.first_read))),
            r.map_or_else(dash, |r| format!("{:.0}", ms(r.load))),
            match (s, r) {
                (Some(s), Some(r)) => ratio(ms(s.first_read), ms(r.load)),
                _ => dash(),
            },
        ]);
        rows.push(vec![
            "keys before | restored (log) | stats/DBSIZE".to_owned(),
            s.map_or_else(dash, |s| {
                format!(
                    "{} | {} | {}",
                    s.keys_before,
                    s.restored_log_keys
                        .map_or_else(|| "?".to_owned(), |k| k.to_string()),
                    s.stats_keys
                )
            }),
            r.map_or_else(dash, |r| {
                format!(
                    "{} | {} | {}",
                    r.replies,
                    r.keys_loaded_info
                        .map_or_else(|| "?".to_owned(), |k| k.to_string()),
                    r.dbsize
                )
            }),
            dash(),
        ]);
        rows.push(vec![
            "random keys read back with the right value".to_owned(),
            s.map_or_else(dash, |s| format!("{} of {}", s.sample_ok, s.sampled)),
            r.map_or_else(dash, |r| format!("{} of {}", r.sample_ok, r.sampled)),
            dash(),
        ]);
        rows.push(vec![
            "other processes' CPU during the part, % of a core".to_owned(),
            self.save.map_or_else(dash, |(_, o)| format!("{o:.0}")),
            self.redis.map_or_else(dash, |(_, o)| format!("{o:.0}")),
            dash(),
        ]);
        out.push_str(&table(&rows));
        if let Some(skip) = self.redis_skipped {
            writeln!(out, "redis: skipped: {skip}")?;
        }
        if let Some(s) = s {
            writeln!(
                out,
                "(raftcache data dir after the restart: {:.1} MB)",
                mb(s.dir_bytes_after_restart)
            )?;
        }
        writeln!(out)?;

        // 2. Pause probe.
        writeln!(
            out,
            "2. Set latency during a snapshot (the node of 1., {} writers on random keys of the {}, {} s per window)",
            cli.probe_concurrency,
            cli.keys,
            cli.pause_secs.min(cli.secs)
        )?;
        match s.and_then(|s| s.probe.as_ref()) {
            Some(p) => {
                let mut rows = vec![row(&["", "sets/s", "p50 ms", "p99 ms", "max ms", "errors"])];
                for (name, l) in [("no snapshot", &p.quiet), ("during snapshots", &p.during)] {
                    rows.push(vec![
                        name.to_owned(),
                        format!("{:.0}", l.per_sec()),
                        format!("{:.2}", l.ms(0.5)),
                        format!("{:.2}", l.ms(0.99)),
                        format!("{:.2}", l.max_ms()),
                        l.errors.to_string(),
                    ]);
                }
                rows.push(vec![
                    "during / no snapshot".to_owned(),
                    ratio(p.during.per_sec(), p.quiet.per_sec()),
                    ratio(p.during.ms(0.5), p.quiet.ms(0.5)),
                    ratio(p.during.ms(0.99), p.quiet.ms(0.99)),
                    ratio(p.during.max_ms(), p.quiet.max_ms()),
                    String::new(),
                ]);
                out.push_str(&table(&rows));
                let n = p.snapshots.len();
                let mean = if n == 0 {
                    0.0
                } else {
                    p.snapshots.iter().map(|s| ms(s.0)).sum::<f64>() / n as f64
                };
                writeln!(
                    out,
                    "snapshots in the window: {n} (mean {mean:.0} ms each at the client; node-reported longest state-copy pause {} us)",
                    p.snapshots.iter().map(|s| s.2).max().unwrap_or(0)
                )?;
            }
            None => writeln!(
                out,
                "not measured{}",
                s.and_then(|s| s.probe_error.as_deref())
                    .map_or_else(String::new, |e| format!(": {e}"))
            )?,
        }
        writeln!(out)?;

        // 4. Durable vs memory.
        writeln!(
            out,
            "3. Write throughput by persistence mode ({CLUSTER_NODES} nodes, R=3, P={PARTITIONS}, {} writers, 100 B values, {CLUSTER_KEYS} keys, {} s after {} s warm-up, fresh cluster each)",
            cli.concurrency,
            cli.secs,
            WARMUP.as_secs()
        )?;
        let none = self
            .durable
            .iter()
            .find(|(m, _, _)| *m == "none")
            .map(|(_, d, _)| d);
        let mut rows = vec![row(&[
            "persistence",
            "writes/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "disk MB",
            "writes/s vs none",
            "p99 vs none",
            "others % core",
        ])];
        for (mode, d, others) in self.durable {
            rows.push(vec![
                (*mode).to_owned(),
                format!("{:.0}", d.load.per_sec()),
                format!("{:.2}", d.load.ms(0.5)),
                format!("{:.2}", d.load.ms(0.99)),
                d.load.errors.to_string(),
                format!("{:.1}", mb(d.disk_bytes)),
                none.map_or_else(dash, |n| ratio(d.load.per_sec(), n.load.per_sec())),
                none.map_or_else(dash, |n| ratio(d.load.ms(0.99), n.load.ms(0.99))),
                format!("{others:.0}"),
            ]);
        }
        out.push_str(&table(&rows));
        writeln!(out)?;

        // Ratios.
        writeln!(out, "Ratios")?;
        if let (Some(s), Some(r)) = (s, r) {
            writeln!(
                out,
                "- load: raftcache restart to first read / redis restart to loading:0 = {} ({:.0} / {:.0} ms); to the ready line: {}",
                ratio(ms(s.first_read), ms(r.load)),
                ms(s.first_read),
                ms(r.load),
                ratio(ms(s.ready), ms(r.load))
            )?;
            writeln!(
                out,
                "- save: admin snapshot / BGSAVE = {} ({:.0} / {:.0} ms); bytes {}",
                ratio(ms(s.save_wall), ms(r.save)),
                ms(s.save_wall),
                ms(r.save),
                ratio(s.save_bytes as f64, r.rdb_bytes as f64)
            )?;
            writeln!(
                out,
                "- restart cycle (shutdown + load to first read): raftcache {:.0} ms, redis {:.0} ms: {}",
                ms(s.shutdown + s.first_read),
                ms(r.shutdown + r.load),
                ratio(ms(s.shutdown + s.first_read), ms(r.shutdown + r.load))
            )?;
        }
        if let Some(p) = s.and_then(|s| s.probe.as_ref()) {
            writeln!(
                out,
                "- set latency during snapshots / without: p99 {}, max {}",
                ratio(p.during.ms(0.99), p.quiet.ms(0.99)),
                ratio(p.during.max_ms(), p.quiet.max_ms())
            )?;
        }
        if let Some(n) = none {
            for (mode, d, _) in self.durable.iter().filter(|(m, _, _)| *m != "none") {
                writeln!(
                    out,
                    "- {mode}/none: writes/s {}, p50 {}, p99 {}",
                    ratio(d.load.per_sec(), n.load.per_sec()),
                    ratio(d.load.ms(0.5), n.load.ms(0.5)),
                    ratio(d.load.ms(0.99), n.load.ms(0.99))
                )?;
            }
        }
        for e in self.errors {
            writeln!(out, "FAILED: {e}")?;
        }
        Ok(out)
    }

    fn json(&self) -> serde_json::Value {
        let cli = self.cli;
        let save = self.save.map(|(s, others)| {
            json!({
                "fill_s": s.fill.as_secs_f64(),
                "keys_before": s.keys_before,
                "save_ms": ms(s.save_wall),
                "save_node_ms": s.save_node_ms,
                "save_bytes": s.save_bytes,
                "save_groups": s.save_groups,
                "save_max_pause_us": s.save_max_pause_us,
                "disk_bytes_stats": s.disk_bytes_stats,
                "dir_bytes_after_save": s.dir_bytes_after_save,
                "shutdown_ms": ms(s.shutdown),
                "checkpoint_ms": s.checkpoint_ms,
                "checkpoint_bytes": s.checkpoint_bytes,
                "restart_ready_ms": ms(s.ready),
                "restart_first_read_ms": ms(s.first_read),
                "restored_keys_log": s.restored_log_keys,
                "restored_keys_stats": s.stats_keys,
                "sampled": s.sampled,
                "sample_ok": s.sample_ok,
                "dir_bytes_after_restart": s.dir_bytes_after_restart,
                "others_percent_core": others,
            })
        });
        let probe = self.save.and_then(|(s, _)| s.probe.as_ref()).map(|p| {
            json!({
                "writers": cli.probe_concurrency,
                "window_s": cli.pause_secs.min(cli.secs),
                "no_snapshot": p.quiet.json(),
                "during_snapshots": p.during.json(),
                "snapshots": p.snapshots.iter().map(|(wall, node, pause)| json!({
                    "wall_ms": ms(*wall), "node_ms": node, "max_pause_us": pause,
                })).collect::<Vec<_>>(),
            })
        });
        let redis = self.redis.map(|(r, others)| {
            json!({
                "version": self.redis_version,
                "fill_s": r.fill.as_secs_f64(),
                "replies": r.replies,
                "save_ms": ms(r.save),
                "fork_us": r.fork_us,
                "rdb_bytes": r.rdb_bytes,
                "shutdown_ms": ms(r.shutdown),
                "load_ms": ms(r.load),
                "keys_loaded_info": r.keys_loaded_info,
                "dbsize": r.dbsize,
                "sampled": r.sampled,
                "sample_ok": r.sample_ok,
                "others_percent_core": others,
            })
        });
        let durable: serde_json::Map<String, serde_json::Value> = self
            .durable
            .iter()
            .map(|(mode, d, others)| {
                let mut v = d.load.json();
                if let Some(o) = v.as_object_mut() {
                    o.insert("disk_bytes".into(), json!(d.disk_bytes));
                    o.insert("others_percent_core".into(), json!(others));
                }
                ((*mode).to_owned(), v)
            })
            .collect();
        let f = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        let s = self.save.map(|(s, _)| s);
        let r = self.redis.map(|(r, _)| r);
        let none = self
            .durable
            .iter()
            .find(|(m, _, _)| *m == "none")
            .map(|(_, d, _)| d);
        let mode_ratio = |mode: &str| {
            let d = self
                .durable
                .iter()
                .find(|(m, _, _)| *m == mode)
                .map(|(_, d, _)| d);
            match (d, none) {
                (Some(d), Some(n)) => json!({
                    "writes_per_s": f(d.load.per_sec(), n.load.per_sec()),
                    "p50": f(d.load.ms(0.5), n.load.ms(0.5)),
                    "p99": f(d.load.ms(0.99), n.load.ms(0.99)),
                }),
                _ => serde_json::Value::Null,
            }
        };
        let ratios = json!({
            "load_first_read_vs_redis": s.zip(r).and_then(|(s, r)| f(ms(s.first_read), ms(r.load))),
            "load_ready_vs_redis": s.zip(r).and_then(|(s, r)| f(ms(s.ready), ms(r.load))),
            "save_vs_redis": s.zip(r).and_then(|(s, r)| f(ms(s.save_wall), ms(r.save))),
            "save_bytes_vs_redis": s.zip(r).and_then(|(s, r)| f(s.save_bytes as f64, r.rdb_bytes as f64)),
            "snapshot_p99_vs_quiet": s.and_then(|s| s.probe.as_ref()).and_then(|p| f(p.during.ms(0.99), p.quiet.ms(0.99))),
            "snapshot_max_vs_quiet": s.and_then(|s| s.probe.as_ref()).and_then(|p| f(p.during.max_ms(), p.quiet.max_ms())),
            "durable_vs_none": mode_ratio("durable"),
            "snapshot_vs_none": mode_ratio("snapshot"),
        });
        json!({
            "config": {
                "keys": cli.keys,
                "value_bytes": 100,
                "secs": cli.secs,
                "pause_secs": cli.pause_secs.min(cli.secs),
                "load_concurrency": cli.load_concurrency,
                "probe_concurrency": cli.probe_concurrency,
                "concurrency": cli.concurrency,
                "partitions": PARTITIONS,
                "cores": std::thread::available_parallelism().map_or(0, usize::from),
                "node_bin": self.binary.display().to_string(),
            },
            "save_load": save,
            "pause": probe,
            "redis": redis,
            "redis_skipped": self.redis_skipped,
            "durability": durable,
            "ratios": ratios,
            "errors": self.errors,
        })
    }
}
