//! `cdc-bench`: the CDC benchmark. A throwaway PostgreSQL 15, `raftcache-node`
//! processes and the `raftcache-cdc` worker, everything on 127.0.0.1; the load comes
//! from `pgbench` (a separate process).
//!
//! For each replication factor R in `--replicas` and mapping mode in `--modes` (R nodes,
//! P partitions, a fresh cluster, a fresh worker with its own slot; one Postgres for all):
//!
//! 1. **Lag at a fixed rate.** `pgbench --rate 1000 -c 4 -j 2` of one-row UPDATEs on a
//!    100k-row table (`REPLICA IDENTITY FULL`, keys `item:{id}` and `item_by_sku:{sku}`)
//!    for 2 s of warm-up + `--secs`. Meanwhile an independent probe, every 10 ms: fills
//!    `item:<probe id>` (plain SET), commits an UPDATE of that row (ids outside
//!    pgbench's range), then GETs the key every 0.5 ms until it is gone (`update` mode:
//!    holds the row) (at most 2 s; past 10 ms it polls every 5 % of the wait); the sample
//!    is the time from the UPDATE's return (after COMMIT) to the answer of the first GET
//!    that sees the change (an upper bound: it includes that GET's round trip and up to
//!    one polling interval). Samples of the warm-up are not recorded. Besides,
//!    the worker's own summary `raftcache_cdc_commit_to_applied_seconds` (Postgres commit
//!    timestamp → round committed in the cache).
//! 2. **Maximum row changes/s.** Unthrottled `pgbench -c 4 -j 2` of 100-row UPDATEs
//!    (`WHERE id BETWEEN :a AND :a + 99`) for `--secs`: Postgres's rate (pgbench tps ×
//!    100), the worker's applied rate over the same window (Δ `raftcache_cdc_rows_total`),
//!    how far behind it is when pgbench ends (`pg_current_wal_lsn()` − acked LSN), the
//!    time it then needs until its acked LSN reaches `pg_current_wal_lsn()`, and the
//!    *sustained* rate: rows applied / (load window + catch-up). The walsender's sent LSN
//!    (`pg_stat_replication`) tells how much of the backlog Postgres had not even decoded.
//!
//! CPU of the worker, the walsender, the nodes and of processes outside the benchmark
//! (e.g. a build on the same cores) is sampled from `/proc` over each window; the table
//! flags a run when other processes took more than a quarter of a core.
//!
//! Every child (Postgres, nodes, worker, pgbench) is owned by a guard that stops it on
//! drop, every loop is bounded in count and time. Progress goes to stderr, the markdown
//! table to stdout.
//!
//! ```text
//! cargo build --release -p raftcache-node --bin raftcache-node -p raftcache-cdc --bin raftcache-cdc -p raftcache-benches --bin cdc-bench
//! target/release/cdc-bench --secs 10 --replicas 1,3
//! ```

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use raftcache_benches::cdc::{
    free_addr, machine_cpu_ticks, pgbench, CdcWorker, MachineTicks, PgTarget, PgbenchReport,
    ProcessTicks, Scrape,
};
use raftcache_benches::cluster::{clock_ticks_per_second, cpu_ticks, Cluster};
use raftcache_client::{Client, ClientConfig};
use raftcache_tests::pg::{self, PgCluster};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rows of the table pgbench updates (ids 1..=ROWS).
const ROWS: i32 = 100_000;
/// Rows only the probe updates (ids ROWS+1..=ROWS+PROBE_IDS).
const PROBE_IDS: i32 = 16;
/// The fixed rate of run 1, transactions/s.
const RATE: u32 = 1000;
/// pgbench clients and threads.
const CLIENTS: u32 = 4;
const THREADS: u32 = 2;
/// Rows per transaction of run 2.
const ROWS_PER_TX: u64 = 100;
/// Warm-up of run 1 before the probe records.
const WARMUP: Duration = Duration::from_secs(2);
/// How often the probe starts a sample.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// How often the probe polls the key.
const PROBE_POLL: Duration = Duration::from_micros(500);
/// Past 20 × [`PROBE_POLL`], the probe polls every 1/PROBE_POLL_FRACTION of the time
/// waited so far.
const PROBE_POLL_FRACTION: u32 = 20;
/// How long the probe waits for one invalidation.
const PROBE_GIVE_UP: Duration = Duration::from_secs(2);
/// Upper bound of probe samples (the time bound ends it first).
const PROBE_MAX_SAMPLES: u64 = 1_000_000;
/// How long the worker may take to start streaming.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the worker may take to catch up after a load.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the worker's metrics are scraped while waiting for it to catch up.
const CATCH_UP_POLL: Duration = Duration::from_millis(10);
/// Grace beyond its nominal duration before pgbench is killed.
const PGBENCH_GRACE: Duration = Duration::from_secs(60);
/// Other processes' CPU (% of one core) above which the figures are flagged.
const QUIET_LIMIT: f64 = 25.0;
/// The goals.
const LAG_GOAL_MS: f64 = 20.0;
const ROWS_GOAL: f64 = 20_000.0;

/// Process names that are part of the benchmark (the rest is "other" CPU).
const OURS: &[&str] = &[
    "postgres",
    "pgbench",
    "raftcache-node",
    "raftcache-cdc",
    "cdc-bench",
];

const LAG_SUMMARY: &str = "raftcache_cdc_commit_to_applied_seconds";
const ROUND_SUMMARY: &str = "raftcache_cdc_round_seconds";
const ROWS_TOTAL: &str = "raftcache_cdc_rows_total";
const ACKED_LSN: &str = "raftcache_cdc_acked_lsn";

const SCHEMA: &str = "
    CREATE TABLE items (id int PRIMARY KEY, sku text NOT NULL, v bigint NOT NULL DEFAULT 0);
    ALTER TABLE items REPLICA IDENTITY FULL;
";

const FIXED_SCRIPT: &str =
    "\\set id random(1, 100000)\nUPDATE items SET v = v + 1 WHERE id = :id;\n";
const BULK_SCRIPT: &str =
    "\\set a random(1, 99901)\nUPDATE items SET v = v + 1 WHERE id BETWEEN :a AND :a + 99;\n";

#[derive(Debug, Parser)]
#[command(about = "CDC benchmark: commit→invalidated lag at 1000 tx/s and maximum row changes/s")]
struct Cli {
    /// Measured seconds of each load (run 1 adds a 2 s warm-up).
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// The node binary; default: `raftcache-node` beside this executable.
    #[arg(long, env = "RAFTCACHE_NODE_BIN")]
    node_bin: Option<PathBuf>,
    /// The worker binary; default: `raftcache-cdc` beside this executable.
    #[arg(long, env = "RAFTCACHE_CDC_BIN")]
    cdc_bin: Option<PathBuf>,
    /// Replication factors to run, one cluster of R nodes each.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    replicas: Vec<u32>,
    /// Mapping modes to run for each R: `invalidate` (remove the keys) and/or `update`
    /// (write the row as JSON).
    #[arg(long, value_delimiter = ',', default_value = "invalidate")]
    modes: Vec<Mode>,
    /// Partitions of each cluster.
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// Before each cluster, wait up to this many seconds until processes outside the
    /// benchmark (e.g. a build) use less than a quarter of a core.
    #[arg(long, default_value_t = 0)]
    wait_quiet: u64,
    /// RUST_LOG of the worker (e.g. `debug`).
    #[arg(long, default_value = "info")]
    worker_log: String,
    /// Keep the worker's config, events and log here (default: a temporary directory).
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Invalidate,
    Update,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Invalidate => "invalidate",
            Mode::Update => "update",
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let node_bin = beside(cli.node_bin.clone(), "raftcache-node", "raftcache-node")?;
    let cdc_bin = beside(cli.cdc_bin.clone(), "raftcache-cdc", "raftcache-cdc")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    // On a signal the benchmark future is dropped, and with it every child's guard.
    tokio::select! {
        r = run(&cli, &node_bin, &cdc_bin) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; children killed"),
        _ = terminate.recv() => bail!("terminated; children killed"),
    }
}

/// `given`, else `name` beside this executable.
fn beside(given: Option<PathBuf>, name: &str, package: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = given.filter(|p| !p.as_os_str().is_empty()) {
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating cdc-bench")?;
    let path = exe.with_file_name(name);
    if path.is_file() {
        return Ok(path);
    }
    bail!(
        "no {name} at {}: build it (cargo build --release -p {package} --bin {name}) or pass its path",
        path.display()
    )
}

/// What one (R, mode) measured.
struct Row {
    replicas: u32,
    mode: Mode,
    fixed: Fixed,
    max: MaxRate,
}

async fn run(cli: &Cli, node_bin: &Path, cdc_bin: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let scratch = tempfile::Builder::new()
        .prefix("raftcache-cdc-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let logs = cli
        .log_dir
        .clone()
        .unwrap_or_else(|| scratch.path().join("logs"));
    let fixed_script = scratch.path().join("fixed.sql");
    let bulk_script = scratch.path().join("bulk.sql");
    std::fs::write(&fixed_script, FIXED_SCRIPT).context("writing a pgbench script")?;
    std::fs::write(&bulk_script, BULK_SCRIPT).context("writing a pgbench script")?;

    let ticks = clock_ticks_per_second()? as f64;
    // Only measured here: each cluster waits for quiet (if asked to) before it starts.
    let quiet_before = wait_quiet(0, ticks).await;
    eprintln!("starting PostgreSQL ...");
    let pg = tokio::task::spawn_blocking(PgCluster::start)
        .await
        .context("starting PostgreSQL panicked")??;
    let db = pg.try_client(&pg.url()).await?;
    // pg_stat_replication shows the walsender's positions to superusers only.
    let admin = pg.try_client(&pg.superuser_url()).await?;
    let version: String = db
        .query_one("SHOW server_version", &[])
        .await
        .context("asking for the server version")?
        .get(0);
    eprintln!("loading {} rows ...", ROWS + PROBE_IDS);
    db.batch_execute(SCHEMA)
        .await
        .context("creating the table")?;
    db.execute(
        "INSERT INTO items SELECT g, 'sku-' || g, 0 FROM generate_series(1, $1) g",
        &[&(ROWS + PROBE_IDS)],
    )
    .await
    .context("loading the table")?;
    db.batch_execute("VACUUM ANALYZE items")
        .await
        .context("VACUUM ANALYZE")?;
    let target = PgTarget {
        bindir: pg::find_bindir()?,
        port: pg.port(),
        user: pg::APP_USER.to_owned(),
        password: pg::APP_PASSWORD.to_owned(),
        database: pg::APP_DB.to_owned(),
    };
    let env = Env {
        cli,
        cdc_bin,
        node_bin,
        pg_url: pg.url(),
        db: &db,
        admin: &admin,
        target: &target,
        fixed_script: &fixed_script,
        bulk_script: &bulk_script,
        logs: &logs,
        ticks,
    };
    let mut rows = Vec::new();
    for &r in &cli.replicas {
        for &mode in &cli.modes {
            rows.push(one_cluster(&env, r, mode).await?);
        }
    }
    println!("{}", table(cli, &version, quiet_before, &rows));
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    if cli.log_dir.is_some() {
        eprintln!("worker logs in {}", logs.display());
    }
    Ok(())
}

/// What every run needs.
struct Env<'a> {
    cli: &'a Cli,
    cdc_bin: &'a Path,
    node_bin: &'a Path,
    pg_url: String,
    db: &'a tokio_postgres::Client,
    /// A superuser connection, to watch the walsender.
    admin: &'a tokio_postgres::Client,
    target: &'a PgTarget,
    fixed_script: &'a Path,
    bulk_script: &'a Path,
    logs: &'a Path,
    /// Clock ticks per second.
    ticks: f64,
}

/// One worker streaming one slot into one cluster.
struct Rig {
    cluster: Cluster,
    worker: CdcWorker,
    slot: String,
    mode: Mode,
}

/// Waits (at most `secs`, checking every second) until processes outside the benchmark
/// use less than [`QUIET_LIMIT`]; returns their last use, % of one core.
async fn wait_quiet(secs: u64, ticks: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut waited = false;
    loop {
        let a = ProcessTicks::take();
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let others = a.others_until(&ProcessTicks::take(), OURS) as f64
            / ticks
            / start.elapsed().as_secs_f64()
            * 100.0;
        if others <= QUIET_LIMIT {
            if waited {
                eprintln!("other processes now use {others:.0}% of a core");
            }
            return others;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "warning: other processes use {others:.0}% of a core: the figures will be lower than on a quiet machine"
            );
            return others;
        }
        if !waited {
            eprintln!(
                "other processes use {others:.0}% of a core; waiting up to {secs} s for them to finish ..."
            );
            waited = true;
        }
    }
}

/// Both runs against a fresh cluster of `r` nodes with replication factor `r`.
async fn one_cluster(env: &Env<'_>, r: u32, mode: Mode) -> anyhow::Result<Row> {
    let cli = env.cli;
    let tag = format!("R={r} {}", mode.name());
    if cli.wait_quiet > 0 {
        wait_quiet(cli.wait_quiet, env.ticks).await;
    }
    eprintln!("{tag}: starting {r} node(s), P={} ...", cli.partitions);
    let cluster = Cluster::start(env.node_bin, r, cli.partitions, r).await?;
    let metrics = free_addr()?;
    let slot = format!("cdc_bench_r{r}_{}", mode.name());
    let config = worker_config(&env.pg_url, &cluster.endpoints(), metrics, &slot, mode);
    let worker = CdcWorker::start(
        env.cdc_bin,
        &env.logs.join(format!("cdc-r{r}-{}", mode.name())),
        &config,
        metrics,
        &cli.worker_log,
    )?;
    let mut rig = Rig {
        cluster,
        worker,
        slot,
        mode,
    };
    rig.worker
        .wait_event("streaming", STREAMING_TIMEOUT)
        .await?;
    if catch_up(env, &mut rig, None).await?.acked_at.is_none() {
        bail!("{tag}: the idle worker did not reach pg_current_wal_lsn()");
    }

    eprintln!(
        "{tag}: run 1, pgbench --rate {RATE} for {} s + {} s warm-up, probe every {:?} ...",
        cli.secs,
        WARMUP.as_secs(),
        PROBE_INTERVAL
    );
    let fixed = fixed_rate(env, &mut rig).await?;
    eprintln!(
        "{tag}: run 1: {:.0} tx/s; probe p50 {:.2} / p99 {:.2} / max {:.2} ms ({} samples, {} timeouts, {} errors); \
         worker p50 {} / p99 {} / max {} ms; round p50 {} / p99 {} ms; CPU {}",
        fixed.bench.tps,
        fixed.probe_ms(0.5),
        fixed.probe_ms(0.99),
        fixed.probe_ms(1.0),
        fixed.probe.recorded,
        fixed.probe.timeouts,
        fixed.probe.errors,
        ms(fixed.worker_lag[0]),
        ms(fixed.worker_lag[1]),
        ms(fixed.worker_lag[2]),
        ms(fixed.round[0]),
        ms(fixed.round[1]),
        fixed.cpu,
    );
    if let Some(e) = &fixed.probe.first_error {
        eprintln!("{tag}: first probe error: {e}");
    }
    if catch_up(env, &mut rig, None).await?.acked_at.is_none() {
        eprintln!("{tag}: the worker did not catch up after run 1 within {CATCH_UP_TIMEOUT:?}");
    }

    eprintln!(
        "{tag}: run 2, unthrottled pgbench ({ROWS_PER_TX} rows/tx, -c {CLIENTS}) for {} s ...",
        cli.secs
    );
    let max = max_rate(env, &mut rig).await?;
    eprintln!(
        "{tag}: run 2: PG {:.0} rows/s ({:.0} tx/s); worker {:.0} rows/s during the load; at its end \
         {:.1} MB not yet decoded by the walsender + {:.1} MB sent but not acked; walsender caught up {}, \
         worker {}; drain {:.0} rows/s; sustained {:.0} rows/s; CPU during the load {}; during the catch-up {}; \
         round p50 {} / p99 {} / max {} ms",
        max.pg_rows_per_sec(),
        max.bench.tps,
        max.window_rate(),
        max.undecoded_bytes as f64 / 1e6,
        max.unacked_bytes as f64 / 1e6,
        secs_or(max.sent_at, "never"),
        secs_or(max.catch_up, "never"),
        max.drain_rate(),
        max.sustained_rate(),
        max.cpu_load,
        max.cpu_catch_up,
        ms(max.round[0]),
        ms(max.round[1]),
        ms(max.round[2]),
    );
    if max.rows_at.is_some() && max.catch_up.is_none() {
        eprintln!(
            "{tag}: every row was applied, but the acked LSN never reached pg_current_wal_lsn()"
        );
    }

    if rig.worker.exited() {
        bail!(
            "{tag}: the worker exited during the benchmark; log tail:\n{}",
            rig.worker.log_tail(20)
        );
    }
    rig.worker.kill().await?;
    rig.cluster.stop().await;
    drop_slot(env.db, &rig.slot).await;
    Ok(Row {
        replicas: r,
        mode,
        fixed,
        max,
    })
}

fn worker_config(
    pg_url: &str,
    endpoints: &[String],
    metrics: SocketAddr,
    slot: &str,
    mode: Mode,
) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[postgres]\nurl = {pg_url:?}\nslot = {slot:?}\npublication = \"cdc_bench\"\n\n\
         [cache]\nendpoints = [{}]\n\n\
         [metrics]\nlisten = \"{metrics}\"\n\n\
         [worker]\nid = \"cdc-bench\"\n\n\
         [[table]]\nname = \"public.items\"\nkeys = [\"item:{{id}}\", \"item_by_sku:{{sku}}\"]\nmode = \"{}\"\n",
        endpoints.join(", "),
        mode.name()
    )
}

/// Drops the slot of a killed worker (its walsender may take a moment to go away).
async fn drop_slot(db: &tokio_postgres::Client, slot: &str) {
    let mut last = String::new();
    for _ in 0..50 {
        match db
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(_) => return,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("could not drop slot {slot}: {last}");
}

/// Postgres's current WAL insert position.
async fn current_lsn(db: &tokio_postgres::Client) -> anyhow::Result<u64> {
    let v: i64 = db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .context("pg_current_wal_lsn()")?
        .get(0);
    u64::try_from(v).context("a negative LSN")
}

/// The pid of the walsender streaming `slot` and how far it has read and sent the WAL
/// (`db` must be a superuser's connection to see the position).
async fn walsender(db: &tokio_postgres::Client, slot: &str) -> anyhow::Result<Option<(u32, u64)>> {
    let row = db
        .query_opt(
            "SELECT s.active_pid, (r.sent_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots s \
             JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .context("asking for the walsender")?;
    Ok(row.and_then(|r| {
        let pid: i32 = r.get(0);
        let sent: Option<i64> = r.get(1);
        Some((u32::try_from(pid).ok()?, u64::try_from(sent?).ok()?))
    }))
}

/// When the worker caught up.
struct CatchUp {
    /// Since the wait began, when the walsender's sent LSN reached the target.
    sent_at: Option<Duration>,
    /// Since the wait began, when the acked LSN reached the target
    /// (`pg_current_wal_lsn()` when the wait began).
    acked_at: Option<Duration>,
    /// Since the wait began, when `raftcache_cdc_rows_total` reached the expected count.
    rows_at: Option<Duration>,
    /// The last scrape.
    last: Scrape,
    /// When the last scrape was taken.
    last_at: Instant,
}

/// Polls the worker until its acked LSN reaches `pg_current_wal_lsn()` (taken now), at
/// most [`CATCH_UP_TIMEOUT`]; also notes when the walsender's sent LSN reaches it, and
/// when `rows_total` reaches `rows` if given.
async fn catch_up(env: &Env<'_>, rig: &mut Rig, rows: Option<f64>) -> anyhow::Result<CatchUp> {
    let begin = Instant::now();
    let target = current_lsn(env.db).await?;
    let max_polls = CATCH_UP_TIMEOUT.as_millis() / CATCH_UP_POLL.as_millis() + 1;
    let (mut sent_at, mut rows_at) = (None, None);
    let mut last = rig.worker.scrape().await?;
    let mut last_at = Instant::now();
    for _ in 0..max_polls {
        if sent_at.is_none()
            && walsender(env.admin, &rig.slot)
                .await?
                .is_some_and(|(_, sent)| sent >= target)
        {
            sent_at = Some(begin.elapsed());
        }
        if rows_at.is_none() && rows.is_some_and(|n| last.value(ROWS_TOTAL) >= n) {
            rows_at = Some(last_at.duration_since(begin));
        }
        if last.value(ACKED_LSN) >= target as f64 {
            return Ok(CatchUp {
                sent_at,
                acked_at: Some(last_at.duration_since(begin)),
                rows_at,
                last,
                last_at,
            });
        }
        if rig.worker.exited() {
            bail!(
                "the worker exited while catching up; log tail:\n{}",
                rig.worker.log_tail(20)
            );
        }
        if begin.elapsed() >= CATCH_UP_TIMEOUT {
            break;
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
        last = rig.worker.scrape().await?;
        last_at = Instant::now();
    }
    Ok(CatchUp {
        sent_at,
        acked_at: None,
        rows_at,
        last,
        last_at,
    })
}

/// `[p50, p99, max]` of a summary, in seconds.
fn summary(s: &Scrape, name: &str) -> [Option<f64>; 3] {
    ["0.5", "0.99", "1"].map(|q| s.quantile(name, q))
}

/// Seconds as milliseconds, or `?`.
fn ms(s: Option<f64>) -> String {
    s.map_or_else(|| "?".to_owned(), |s| format!("{:.2}", s * 1e3))
}

/// A duration in seconds, or `none`.
fn secs_or(d: Option<Duration>, none: &str) -> String {
    d.map_or_else(|| none.to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
}

// ---------------------------------------------------------------------------------
// CPU

/// CPU ticks of the processes of interest and of the whole machine.
struct CpuSample {
    at: Instant,
    worker: u64,
    walsender: u64,
    nodes: u64,
    machine: MachineTicks,
    procs: ProcessTicks,
}

impl CpuSample {
    async fn take(env: &Env<'_>, rig: &Rig) -> CpuSample {
        let walsender = match walsender(env.admin, &rig.slot).await {
            Ok(Some((pid, _))) => cpu_ticks(pid).unwrap_or(0),
            _ => 0,
        };
        CpuSample {
            at: Instant::now(),
            worker: cpu_ticks(rig.worker.pid).unwrap_or(0),
            walsender,
            nodes: rig
                .cluster
                .nodes
                .iter()
                .map(|n| cpu_ticks(n.pid).unwrap_or(0))
                .sum(),
            machine: machine_cpu_ticks().unwrap_or_default(),
            procs: ProcessTicks::take(),
        }
    }

    /// The use between `self` and the later `to`.
    fn until(&self, to: &CpuSample, ticks: f64) -> CpuUse {
        let secs = to.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let pct = |a: u64, b: u64| b.saturating_sub(a) as f64 / ticks / secs * 100.0;
        let total = to.machine.total.saturating_sub(self.machine.total).max(1) as f64;
        CpuUse {
            worker: pct(self.worker, to.worker),
            walsender: pct(self.walsender, to.walsender),
            nodes: pct(self.nodes, to.nodes),
            machine: to.machine.busy.saturating_sub(self.machine.busy) as f64 / total * 100.0,
            steal: to.machine.steal.saturating_sub(self.machine.steal) as f64 / total * 100.0,
            others: self.procs.others_until(&to.procs, OURS) as f64 / ticks / secs * 100.0,
        }
    }
}

/// CPU use over a window: processes in % of one core, the machine in % of all cores.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    worker: f64,
    walsender: f64,
    nodes: f64,
    machine: f64,
    /// Stolen by the hypervisor, % of all cores.
    steal: f64,
    /// Processes outside the benchmark (e.g. a build), % of one core.
    others: f64,
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "worker {:.0}%, walsender {:.0}%, nodes {:.0}%, other processes {:.0}% of a core; machine {:.0}% busy, {:.0}% stolen",
            self.worker, self.walsender, self.nodes, self.others, self.machine, self.steal
        )
    }
}

// ---------------------------------------------------------------------------------
// Run 1: lag at a fixed rate

struct Fixed {
    bench: PgbenchReport,
    probe: ProbeOutcome,
    /// The worker's commit→applied p50 / p99 / max, seconds.
    worker_lag: [Option<f64>; 3],
    /// The worker's mean commit→applied over the run, seconds.
    worker_mean: Option<f64>,
    /// The worker's apply round p50 / p99 / max, seconds.
    round: [Option<f64>; 3],
    /// Mean apply round over the run, seconds, and rounds per second.
    round_mean: Option<f64>,
    rounds_per_sec: f64,
    cpu: CpuUse,
}

impl Fixed {
    fn probe_ms(&self, q: f64) -> f64 {
        self.probe.lag_us.value_at_quantile(q) as f64 / 1e3
    }
}

/// Δ sum / Δ count of summary `name` between two scrapes, and Δ count.
fn summary_mean(before: &Scrape, after: &Scrape, name: &str) -> (Option<f64>, f64) {
    let count = after.value(&format!("{name}_count")) - before.value(&format!("{name}_count"));
    let sum = after.value(&format!("{name}_sum")) - before.value(&format!("{name}_sum"));
    ((count > 0.0).then(|| sum / count), count)
}

async fn fixed_rate(env: &Env<'_>, rig: &mut Rig) -> anyhow::Result<Fixed> {
    let secs = env.cli.secs;
    let before = rig.worker.scrape().await?;
    let total = WARMUP + Duration::from_secs(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let config = ProbeConfig {
        endpoints: rig.cluster.endpoints(),
        pg_url: env.pg_url.clone(),
        record_from: Instant::now() + WARMUP,
        deadline: Instant::now() + total + PGBENCH_GRACE,
        stop: Arc::clone(&stop),
        mode: rig.mode,
    };
    let probe = std::thread::Builder::new()
        .name("lag-probe".to_owned())
        .spawn(move || probe(&config))
        .context("starting the probe thread")?;
    let args: Vec<String> = [
        "--rate",
        &RATE.to_string(),
        "-T",
        &total.as_secs().to_string(),
        "-c",
        &CLIENTS.to_string(),
        "-j",
        &THREADS.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let started = Instant::now();
    let shared: &Rig = rig;
    let after_warmup = async {
        tokio::time::sleep(WARMUP).await;
        CpuSample::take(env, shared).await
    };
    let (bench, cpu0) = tokio::join!(
        pgbench(env.target, env.fixed_script, &args, total + PGBENCH_GRACE),
        after_warmup
    );
    let cpu1 = CpuSample::take(env, rig).await;
    stop.store(true, Ordering::Relaxed);
    let probe = tokio::task::spawn_blocking(move || probe.join())
        .await
        .context("joining the probe")?
        .map_err(|_| anyhow::anyhow!("the probe thread panicked"))??;
    let bench = bench?;
    let after = rig.worker.scrape().await?;
    let (worker_mean, _) = summary_mean(&before, &after, LAG_SUMMARY);
    let (round_mean, rounds) = summary_mean(&before, &after, ROUND_SUMMARY);
    Ok(Fixed {
        bench,
        probe,
        worker_lag: summary(&after, LAG_SUMMARY),
        worker_mean,
        round: summary(&after, ROUND_SUMMARY),
        round_mean,
        rounds_per_sec: rounds / started.elapsed().as_secs_f64(),
        cpu: cpu0.until(&cpu1, env.ticks),
    })
}

/// What the probe thread needs.
struct ProbeConfig {
    endpoints: Vec<String>,
    pg_url: String,
    /// Samples that start before this are not recorded (warm-up).
    record_from: Instant,
    /// The probe stops here at the latest.
    deadline: Instant,
    /// Set when the load is over.
    stop: Arc<AtomicBool>,
    /// Invalidate: wait until the key is gone; update: until it holds something else.
    mode: Mode,
}

/// What the probe measured.
struct ProbeOutcome {
    /// Commit → change seen, µs (a timed-out sample counts as [`PROBE_GIVE_UP`]).
    lag_us: Histogram<u64>,
    /// Samples that saw the change.
    recorded: u64,
    /// Samples whose key was unchanged after [`PROBE_GIVE_UP`].
    timeouts: u64,
    errors: u64,
    first_error: Option<String>,
}

impl ProbeOutcome {
    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

/// The value the probe fills its key with.
const PROBE_FILL: &[u8] = b"probe";

/// The probe: a thread of its own with a current-thread runtime, so that it can sleep
/// 0.5 ms between polls (the tokio timer has a 1 ms resolution).
fn probe(config: &ProbeConfig) -> anyhow::Result<ProbeOutcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the probe's runtime")?;
    let (cache, db, update) = rt.block_on(async {
        let cache = Client::connect(ClientConfig::new(config.endpoints.clone()))
            .await
            .context("connecting the probe to the cache")?;
        let (db, connection) = tokio_postgres::connect(&config.pg_url, tokio_postgres::NoTls)
            .await
            .context("connecting the probe to Postgres")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let update = db
            .prepare("UPDATE items SET v = v + 1 WHERE id = $1 RETURNING v")
            .await
            .context("preparing the probe's UPDATE")?;
        anyhow::Ok((cache, db, update))
    })?;
    let mut out = ProbeOutcome {
        lag_us: Histogram::new_with_bounds(1, 60_000_000, 3).context("creating a histogram")?,
        recorded: 0,
        timeouts: 0,
        errors: 0,
        first_error: None,
    };
    let max_polls = PROBE_GIVE_UP.as_micros() / PROBE_POLL.as_micros() + 1;
    let mut next = Instant::now();
    for i in 0..PROBE_MAX_SAMPLES {
        if config.stop.load(Ordering::Relaxed) || Instant::now() >= config.deadline {
            break;
        }
        let id = ROWS + 1 + (i % PROBE_IDS as u64) as i32;
        let key = format!("item:{id}");
        if let Err(e) = rt.block_on(cache.set(&key, PROBE_FILL)) {
            out.error(format!("SET {key}: {e}"));
        } else if let Err(e) = rt.block_on(db.query_one(&update, &[&id])) {
            out.error(format!("UPDATE id {id}: {e}"));
        } else {
            let committed = Instant::now();
            let mut seen = None;
            for _ in 0..max_polls {
                match rt.block_on(cache.get(&key)) {
                    Ok(Some(v)) if v.value.as_ref() == PROBE_FILL => {}
                    Ok(found) => {
                        if config.mode == Mode::Update && found.is_none() {
                            out.error(format!("GET {key}: gone in update mode"));
                        }
                        seen = Some(Instant::now());
                        break;
                    }
                    Err(e) => out.error(format!("GET {key}: {e}")),
                }
                if committed.elapsed() >= PROBE_GIVE_UP {
                    break;
                }
                // Every 0.5 ms; past 10 ms every 5 % of the time waited, so that a
                // worker that falls behind is not also flooded with GETs.
                std::thread::sleep(PROBE_POLL.max(committed.elapsed() / PROBE_POLL_FRACTION));
            }
            if committed >= config.record_from {
                match seen {
                    Some(at) => {
                        let us = u64::try_from(at.duration_since(committed).as_micros())
                            .unwrap_or(u64::MAX);
                        out.lag_us.saturating_record(us.max(1));
                        out.recorded += 1;
                    }
                    None => {
                        // Counted at the give-up time: a lower bound.
                        let us = u64::try_from(PROBE_GIVE_UP.as_micros()).unwrap_or(u64::MAX);
                        out.lag_us.saturating_record(us);
                        out.timeouts += 1;
                    }
                }
            }
        }
        next += PROBE_INTERVAL;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------
// Run 2: maximum row changes/s

struct MaxRate {
    bench: PgbenchReport,
    /// The load window (pgbench spawn to exit).
    window: Duration,
    /// Rows the worker applied during the window.
    window_rows: f64,
    /// When pgbench ended: `pg_current_wal_lsn()` − the walsender's sent LSN.
    undecoded_bytes: u64,
    /// When pgbench ended: the walsender's sent LSN − the worker's acked LSN.
    unacked_bytes: u64,
    /// From pgbench's end until the walsender's sent LSN reached `pg_current_wal_lsn()`.
    sent_at: Option<Duration>,
    /// From pgbench's end until the acked LSN reached `pg_current_wal_lsn()`.
    catch_up: Option<Duration>,
    /// From pgbench's end until every row was applied.
    rows_at: Option<Duration>,
    /// Rows applied from the start until caught up (or given up).
    total_rows: f64,
    /// From the start until caught up (or given up).
    total_time: Duration,
    cpu_load: CpuUse,
    cpu_catch_up: CpuUse,
    /// The worker's apply round p50 / p99 / max, seconds (rolling 60 s summary).
    round: [Option<f64>; 3],
}

impl MaxRate {
    fn pg_rows_per_sec(&self) -> f64 {
        self.bench.tps * ROWS_PER_TX as f64
    }

    fn window_rate(&self) -> f64 {
        self.window_rows / self.window.as_secs_f64()
    }

    fn sustained_rate(&self) -> f64 {
        self.total_rows / self.total_time.as_secs_f64()
    }

    /// The rate after the load: rows applied during the catch-up / its time.
    fn drain_rate(&self) -> f64 {
        let secs = self.total_time.saturating_sub(self.window).as_secs_f64();
        if secs > 0.0 {
            (self.total_rows - self.window_rows) / secs
        } else {
            0.0
        }
    }
}

async fn max_rate(env: &Env<'_>, rig: &mut Rig) -> anyhow::Result<MaxRate> {
    let secs = env.cli.secs;
    let before = rig.worker.scrape().await?;
    let cpu0 = CpuSample::take(env, rig).await;
    let start = Instant::now();
    let args: Vec<String> = [
        "-T",
        &secs.to_string(),
        "-c",
        &CLIENTS.to_string(),
        "-j",
        &THREADS.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let bench = pgbench(
        env.target,
        env.bulk_script,
        &args,
        Duration::from_secs(secs) + PGBENCH_GRACE,
    )
    .await?;
    let window = start.elapsed();
    let at_end = rig.worker.scrape().await?;
    let cpu1 = CpuSample::take(env, rig).await;
    let end_lsn = current_lsn(env.db).await?;
    let sent = walsender(env.admin, &rig.slot)
        .await?
        .map_or(0, |(_, sent)| sent);
    let acked = at_end.value(ACKED_LSN) as u64;
    let rows0 = before.value(ROWS_TOTAL);
    let expected = rows0 + bench.transactions as f64 * ROWS_PER_TX as f64;
    let caught = catch_up(env, rig, Some(expected)).await?;
    let cpu2 = CpuSample::take(env, rig).await;
    if caught.last.value(ROWS_TOTAL) < expected && caught.acked_at.is_some() {
        eprintln!(
            "note: the acked LSN caught up but only {:.0} of {expected:.0} rows were counted",
            caught.last.value(ROWS_TOTAL)
        );
    }
    Ok(MaxRate {
        window,
        window_rows: at_end.value(ROWS_TOTAL) - rows0,
        undecoded_bytes: end_lsn.saturating_sub(sent.max(acked)),
        unacked_bytes: sent.saturating_sub(acked),
        sent_at: caught.sent_at,
        catch_up: caught.acked_at,
        rows_at: caught.rows_at,
        total_rows: caught.last.value(ROWS_TOTAL) - rows0,
        total_time: caught.last_at.duration_since(start),
        cpu_load: cpu0.until(&cpu1, env.ticks),
        cpu_catch_up: cpu1.until(&cpu2, env.ticks),
        round: summary(&caught.last, ROUND_SUMMARY),
        bench,
    })
}

// ---------------------------------------------------------------------------------
// Output

/// Whether run 2 met the rate goal. A worker that had not caught up when the wait ended
/// was busy the whole window, so its rate still counts, with a note.
fn rate_goal(m: &MaxRate) -> &'static str {
    match (m.sustained_rate() >= ROWS_GOAL, m.catch_up.is_some()) {
        (true, true) => "yes",
        (true, false) => "yes (still catching up)",
        (false, _) => "**no**",
    }
}

fn table(cli: &Cli, version: &str, quiet_before: f64, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "cdc-bench: PostgreSQL {version}, raftcache-cdc, P={} partitions, {} cores, 127.0.0.1; \
         pgbench -c {CLIENTS} -j {THREADS}; {} s per load (run 1 + {} s warm-up); \
         other processes used {quiet_before:.0}% of a core just before the start\n",
        cli.partitions,
        std::thread::available_parallelism().map_or(0, usize::from),
        cli.secs,
        WARMUP.as_secs(),
    );
    let _ = writeln!(
        s,
        "| R (nodes), mode | run 1 tx/s (--rate {RATE}) | probe lag p50 / p99 / max ms (n) | worker lag p50 / p99 / max ms (mean) | p99 < {LAG_GOAL_MS} ms (probe / worker) | run 2 PG rows/s | worker rows/s during load | behind at end | catch-up | drain rows/s | sustained rows/s | ≥ {ROWS_GOAL} rows/s | other processes' CPU, run 1 / 2 |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let yes = |ok: bool| if ok { "yes" } else { "**no**" };
    for row in rows {
        let f = &row.fixed;
        let m = &row.max;
        let probe_ok =
            f.probe.recorded > 0 && f.probe.timeouts == 0 && f.probe_ms(0.99) < LAG_GOAL_MS;
        let worker_ok = f.worker_lag[1].is_some_and(|x| x * 1e3 < LAG_GOAL_MS);
        let timeouts = if f.probe.timeouts > 0 {
            format!(
                ", {} timed out at {} s",
                f.probe.timeouts,
                PROBE_GIVE_UP.as_secs()
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "| {r} ({r}), {} | {:.0} | {:.2} / {:.2} / {:.2} ({}{timeouts}) | {} / {} / {} ({}) | {} / {} | {:.0} | {:.0} | {:.1} MB | {} | {:.0} | {:.0} | {} | {:.0}% / {:.0}%{} |",
            row.mode.name(),
            f.bench.tps,
            f.probe_ms(0.5),
            f.probe_ms(0.99),
            f.probe_ms(1.0),
            f.probe.recorded,
            ms(f.worker_lag[0]),
            ms(f.worker_lag[1]),
            ms(f.worker_lag[2]),
            ms(f.worker_mean),
            yes(probe_ok),
            yes(worker_ok),
            m.pg_rows_per_sec(),
            m.window_rate(),
            (m.undecoded_bytes + m.unacked_bytes) as f64 / 1e6,
            m.catch_up.map_or_else(
                || format!("> {} s", CATCH_UP_TIMEOUT.as_secs()),
                |d| format!("{:.1} s", d.as_secs_f64())
            ),
            m.drain_rate(),
            m.sustained_rate(),
            rate_goal(m),
            f.cpu.others,
            m.cpu_load.others.max(m.cpu_catch_up.others),
            if f.cpu.others.max(m.cpu_load.others).max(m.cpu_catch_up.others) > QUIET_LIMIT {
                " (**not quiet**)"
            } else {
                ""
            },
            r = row.replicas,
        );
    }
    let _ = writeln!(s);
    for row in rows {
        let f = &row.fixed;
        let m = &row.max;
        let _ = writeln!(
            s,
            "- R={} {}, run 1: pgbench latency avg {} ms; apply rounds {:.0}/s, mean {} ms, p50 / p99 / max {} / {} / {} ms; \
             CPU {}.",
            row.replicas,
            row.mode.name(),
            f.bench
                .latency_avg_ms
                .map_or_else(|| "?".to_owned(), |l| format!("{l:.2}")),
            f.rounds_per_sec,
            ms(f.round_mean),
            ms(f.round[0]),
            ms(f.round[1]),
            ms(f.round[2]),
            f.cpu,
        );
        let _ = writeln!(
            s,
            "  Run 2: {:.0} tx/s × {ROWS_PER_TX} rows, {} failed; behind at the end: {:.1} MB not yet decoded by the walsender \
             + {:.1} MB sent but not acked; the walsender caught up {} after the load, the worker {} (all rows applied {}); \
             apply round p50 / p99 / max {} / {} / {} ms; CPU during the load: {}; during the catch-up: {}.",
            m.bench.tps,
            m.bench.failed,
            m.undecoded_bytes as f64 / 1e6,
            m.unacked_bytes as f64 / 1e6,
            secs_or(m.sent_at, "never"),
            secs_or(m.catch_up, "never"),
            secs_or(m.rows_at, "never"),
            ms(m.round[0]),
            ms(m.round[1]),
            ms(m.round[2]),
            m.cpu_load,
            m.cpu_catch_up,
        );
    }
    let _ = writeln!(
        s,
        "\nProbe lag: UPDATE returned (after COMMIT) → first GET that sees the change (polled every {} µs, past 10 ms every 5 % of the wait; \
         includes that GET's round trip; a sample not seen within {} s counts as {} s); \
         run 1 samples after the warm-up only. Worker lag: `{LAG_SUMMARY}` (Postgres commit timestamp → apply round committed; \
         rolling 60 s summary, so it includes the warm-up). Behind at end: pg_current_wal_lsn() − acked LSN when pgbench ended. \
         Catch-up: from then until the acked LSN reaches pg_current_wal_lsn(). Drain: rows applied during the catch-up / its time. \
         Sustained = rows applied / (load window + catch-up; \
         when the catch-up is cut at {} s, up to then).",
        PROBE_POLL.as_micros(),
        PROBE_GIVE_UP.as_secs(),
        PROBE_GIVE_UP.as_secs(),
        CATCH_UP_TIMEOUT.as_secs(),
    );
    s
}
