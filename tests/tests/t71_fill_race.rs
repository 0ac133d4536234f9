//! The cache-aside fill race under load, end to end: a throwaway PostgreSQL
//! (wal_level=logical), a 3-node cache cluster (R=3), the real `raftcache-cdc` worker
//! (kill -9'd once mid-run and replaced), writers updating rows and fillers filling the
//! keys derived from them, and a checker after every accepted fill.
//!
//! The checker, after a fill of `item:{id}` with `v_fill` was accepted, runs
//! `SELECT pg_current_wal_insert_lsn(), v FROM items WHERE id = $1` (one statement:
//! `(L, v_now)`; every commit visible to that statement ends at or before `L`), then
//! reads the key with `min_lsn = L` (CDC applied every commit before `L` on its
//! partition). Rows only grow (`v = v + 1`), so a cached value below `v_now` at that
//! point is a stale fill that the guard let through and kept: counted as STALE.
//!
//! Arms, run one after another on one stack (one `#[test]`: tests of a file run in
//! parallel threads, and three loads at once would not fit 2 cores):
//! 1. `exact`: the documented form, `SELECT pg_current_snapshot()::text, v FROM items
//!    WHERE id = $1` then (after a random delay) `set_if_fresh`: 0 stale, at least
//!    [`EXACT_MIN_ACCEPTED`] accepted fills, and every key equal to its row at the end.
//! 2. `control`: a deliberately wrong fill (the snapshot taken in a separate statement
//!    *after* the delay that follows the read): stale > 0, which shows the checker sees
//!    stale fills.
//! 3. `old-lsn`: the old LSN guard (`pg_current_wal_lsn()` then the row, in one
//!    REPEATABLE READ transaction, then `set_if_newer`): counts printed, no assertion.
#![allow(clippy::unwrap_used)]

use raftcache_client::{Client, ClientError, Lsn, PgSnapshot};
use raftcache_tests::cdc::{config, free_addr, CdcProc};
use raftcache_tests::pg::{current_lsn, PgCluster};
use raftcache_tests::{bins, connect_settled, runtime, Bins, Cluster};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ROWS: i32 = 200;
const WRITERS: usize = 4;
/// Gap between one writer's updates: uniform in `0..=WRITE_GAP_MS` ms.
const WRITE_GAP_MS: u64 = 10;
const FILLERS: usize = 16;
/// Delay between reading a row and filling it: uniform in `0..=FILL_DELAY_MS` ms.
const FILL_DELAY_MS: u64 = 50;
/// Pause after a cache hit, so that fillers do not spin on hits: `0..=HIT_PAUSE_MS`.
const HIT_PAUSE_MS: u64 = 10;
const PARTITIONS: usize = 8;
const SETTLE: Duration = Duration::from_secs(60);
/// The exact arm must see at least this many accepted fills...
const EXACT_MIN_ACCEPTED: u64 = 10_000;
/// ...and stops once it has this many (margin), or at its time limit.
const EXACT_TARGET: u64 = 12_000;
const EXACT_MAX_TIME: Duration = Duration::from_secs(150);
const CONTROL_TIME: Duration = Duration::from_secs(30);
const OLD_LSN_TIME: Duration = Duration::from_secs(40);
/// `min_lsn` reads of one check: each waits up to the client's request deadline (5 s).
const CHECK_ATTEMPTS: u32 = 12;
/// Stale examples kept per arm.
const EXAMPLES: usize = 8;

const SCHEMA: &str = "
    CREATE TABLE items (id int PRIMARY KEY, v bigint NOT NULL);
    INSERT INTO items SELECT g, 0 FROM generate_series(1, 200) g;
";

const TABLES: &str = r#"
[[table]]
name = "public.items"
keys = ["item:{id}"]
mode = "invalidate"
"#;

/// PostgreSQL, three cache nodes and a worker. Fields drop in order: PostgreSQL, the
/// nodes, then the worker (as `CdcStack`).
struct Stack {
    pg: PgCluster,
    cluster: Cluster,
    worker: CdcProc,
    metrics: SocketAddr,
    cdc_bin: PathBuf,
}

impl Stack {
    fn start(bins: &Bins, rt: &tokio::runtime::Runtime) -> Stack {
        let pg = PgCluster::start().expect("a throwaway PostgreSQL (initdb/pg_ctl)");
        rt.block_on(async { pg.client().await.batch_execute(SCHEMA).await })
            .expect("the schema");
        let flags = [format!("--partitions={PARTITIONS}")];
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let cluster = Cluster::start(bins, 3, &flags).unwrap();
        let metrics = free_addr().unwrap();
        let worker = CdcProc::start(
            &bins.cdc,
            &config(&pg.url(), &cluster.endpoints(), metrics, TABLES),
            metrics,
        )
        .unwrap();
        let mut stack = Stack {
            pg,
            cluster,
            worker,
            metrics,
            cdc_bin: bins.cdc.clone(),
        };
        stack
            .worker
            .wait_event("streaming", Duration::from_secs(30))
            .unwrap();
        stack
    }

    /// kill -9 the worker, start a new one with the same config, wait until it streams.
    fn replace_worker(&mut self) -> Duration {
        let t = Instant::now();
        self.worker.kill9();
        self.worker = CdcProc::start(
            &self.cdc_bin,
            &config(
                &self.pg.url(),
                &self.cluster.endpoints(),
                self.metrics,
                TABLES,
            ),
            self.metrics,
        )
        .unwrap();
        self.worker
            .wait_event("streaming", Duration::from_secs(30))
            .unwrap();
        t.elapsed()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    /// Row and snapshot in one statement, then `set_if_fresh`.
    Exact,
    /// Row, delay, then the snapshot in a separate statement: wrong on purpose.
    Control,
    /// `pg_current_wal_lsn()` then the row in one REPEATABLE READ transaction, then
    /// `set_if_newer`.
    OldLsn,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Exact => "exact",
            Arm::Control => "control",
            Arm::OldLsn => "old-lsn",
        }
    }
}

/// What the fill carried.
#[derive(Debug, Clone)]
enum Guard {
    Snapshot(PgSnapshot),
    Lsn(Lsn),
}

impl std::fmt::Display for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Guard::Snapshot(s) => write!(f, "snapshot {s}"),
            Guard::Lsn(l) => write!(f, "lsn {l}"),
        }
    }
}

#[derive(Default)]
struct Stats {
    updates: AtomicU64,
    write_errors: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    not_applied_other: AtomicU64,
    fill_errors: AtomicU64,
    read_errors: AtomicU64,
    checks: AtomicU64,
    check_retries: AtomicU64,
    unchecked: AtomicU64,
    stale: AtomicU64,
    stale_same_value: AtomicU64,
    examples: Mutex<Vec<String>>,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// One arm's result.
struct Report {
    arm: Arm,
    duration: Duration,
    worker_restart: Duration,
    load: Arc<Load>,
    /// Keys present at quiescence whose value differs from the row.
    mismatches: Vec<String>,
    cached_at_end: usize,
}

impl Report {
    fn line(&self) -> String {
        let s = &self.load.stats;
        let secs = self.duration.as_secs_f64();
        format!(
            "{}: accepted={} refused={} stale={} (same value as the checked fill: {}) \
             unchecked={} final_mismatches={} | fills/s={:.0} misses={} hits={} \
             not_applied_other={} fill_errors={} read_errors={} checks={} check_retries={} \
             updates={} write_errors={} cached_at_end={} duration={:.1}s worker_restart={:.1}s",
            self.arm.name(),
            get(&s.accepted),
            get(&s.refused),
            get(&s.stale),
            get(&s.stale_same_value),
            get(&s.unchecked),
            self.mismatches.len(),
            get(&s.accepted) as f64 / secs,
            get(&s.misses),
            get(&s.hits),
            get(&s.not_applied_other),
            get(&s.fill_errors),
            get(&s.read_errors),
            get(&s.checks),
            get(&s.check_retries),
            get(&s.updates),
            get(&s.write_errors),
            self.cached_at_end,
            secs,
            self.worker_restart.as_secs_f64(),
        )
    }

    fn details(&self) -> String {
        let mut out = String::new();
        for e in self.load.stats.examples.lock().unwrap().iter() {
            out.push_str(&format!("  {}: stale fill: {e}\n", self.arm.name()));
        }
        for m in self.mismatches.iter().take(EXAMPLES) {
            out.push_str(&format!("  {}: at quiescence: {m}\n", self.arm.name()));
        }
        out
    }
}

fn rng_for(seed: u64, task: usize) -> SmallRng {
    SmallRng::seed_from_u64(seed ^ (task as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

async fn writer(load: Arc<Load>, db: tokio_postgres::Client, task: usize) {
    let stats = &load.stats;
    let mut rng = rng_for(load.seed, 1000 + task);
    let update = db
        .prepare("UPDATE items SET v = v + 1 WHERE id = $1")
        .await
        .unwrap();
    while load.running() {
        let id: i32 = rng.random_range(1..=ROWS);
        match db.execute(&update, &[&id]).await {
            Ok(_) => inc(&stats.updates),
            Err(_) => inc(&stats.write_errors),
        }
        let gap = rng.random_range(0..=WRITE_GAP_MS);
        tokio::time::sleep(Duration::from_millis(gap)).await;
    }
}

/// Reads the row (and what guards its fill) as `arm` does, waiting the random `delay`
/// where the arm puts it: `(v, guard)`.
async fn read_row(
    arm: Arm,
    db: &mut tokio_postgres::Client,
    id: i32,
    delay: Duration,
) -> Result<(i64, Guard), tokio_postgres::Error> {
    match arm {
        Arm::Exact => {
            let row = db
                .query_one(
                    "SELECT pg_current_snapshot()::text, v FROM items WHERE id = $1",
                    &[&id],
                )
                .await?;
            let snapshot: PgSnapshot = row.get::<_, String>(0).parse().unwrap();
            tokio::time::sleep(delay).await;
            Ok((row.get(1), Guard::Snapshot(snapshot)))
        }
        Arm::Control => {
            let row = db
                .query_one("SELECT v FROM items WHERE id = $1", &[&id])
                .await?;
            tokio::time::sleep(delay).await;
            // Wrong on purpose: a snapshot taken after the read sees commits the read
            // did not.
            let snap = db
                .query_one("SELECT pg_current_snapshot()::text", &[])
                .await?;
            let snapshot: PgSnapshot = snap.get::<_, String>(0).parse().unwrap();
            Ok((row.get(0), Guard::Snapshot(snapshot)))
        }
        Arm::OldLsn => {
            let tx = db
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .start()
                .await?;
            let lsn: Lsn = tx
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await?
                .get::<_, String>(0)
                .parse()
                .unwrap();
            let row = tx
                .query_one("SELECT v FROM items WHERE id = $1", &[&id])
                .await?;
            tx.commit().await?;
            tokio::time::sleep(delay).await;
            Ok((row.get(0), Guard::Lsn(lsn)))
        }
    }
}

/// What every task of one arm shares.
struct Load {
    arm: Arm,
    client: Client,
    stats: Stats,
    stop: AtomicBool,
    seed: u64,
    /// Tasks stop by themselves here (plus the bounded check of their last fill).
    deadline: Instant,
}

impl Load {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }
}

async fn filler(load: Arc<Load>, mut db: tokio_postgres::Client, task: usize) {
    let Load {
        arm,
        ref client,
        ref stats,
        seed,
        ..
    } = *load;
    let mut rng = rng_for(seed, task);
    let check = db
        .prepare("SELECT pg_current_wal_insert_lsn()::text, v FROM items WHERE id = $1")
        .await
        .unwrap();
    while load.running() {
        let id: i32 = rng.random_range(1..=ROWS);
        let key = format!("item:{id}");
        match client.get(&key).await {
            Ok(Some(_)) => {
                inc(&stats.hits);
                let pause = rng.random_range(0..=HIT_PAUSE_MS);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
            Ok(None) => inc(&stats.misses),
            Err(_) => {
                inc(&stats.read_errors);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        }
        let delay = Duration::from_millis(rng.random_range(0..=FILL_DELAY_MS));
        let (v_fill, guard) = match read_row(arm, &mut db, id, delay).await {
            Ok(r) => r,
            Err(e) => panic!("{}: reading item {id}: {e}", arm.name()),
        };
        let value = v_fill.to_string();
        let outcome = match &guard {
            Guard::Snapshot(s) => client.set_if_fresh(&key, value, s, None).await,
            Guard::Lsn(l) => client.set_if_newer(&key, value, *l, None).await,
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(_) => {
                inc(&stats.fill_errors);
                continue;
            }
        };
        if !outcome.applied {
            if outcome.refused_by.is_some() {
                inc(&stats.refused);
            } else {
                inc(&stats.not_applied_other);
            }
            continue;
        }
        inc(&stats.accepted);

        // The check: every commit visible to this statement ends at or before `l`.
        let row = db.query_one(&check, &[&id]).await.unwrap();
        let l: Lsn = row.get::<_, String>(0).parse().unwrap();
        let v_now: i64 = row.get(1);
        let mut answer = None;
        for attempt in 0..CHECK_ATTEMPTS {
            if attempt > 0 {
                inc(&stats.check_retries);
            }
            match client.get_with_min_lsn(&key, l).await {
                Ok(v) => {
                    answer = Some(v);
                    break;
                }
                Err(ClientError::LsnNotReached { .. }) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let Some(cached) = answer else {
            inc(&stats.unchecked);
            continue;
        };
        inc(&stats.checks);
        let Some(cached) = cached else { continue };
        let text = String::from_utf8_lossy(&cached.value).into_owned();
        let c: i64 = text
            .parse()
            .unwrap_or_else(|_| panic!("{key} holds {text:?}, not a row value"));
        if c < v_now {
            inc(&stats.stale);
            if c == v_fill {
                inc(&stats.stale_same_value);
            }
            let mut ex = stats.examples.lock().unwrap();
            if ex.len() < EXAMPLES {
                ex.push(format!(
                    "id={id} v_fill={v_fill} (fill {guard}) cached={c} (version {}, source_lsn {}) \
                     v_now={v_now} L={l}",
                    cached.version, cached.source_lsn
                ));
            }
        }
    }
}

/// Reads `key` once CDC reached `lsn`, retrying a bounded number of times.
async fn read_at(client: &Client, key: &str, lsn: Lsn) -> Option<String> {
    let mut last = None;
    for _ in 0..CHECK_ATTEMPTS {
        match client.get_with_min_lsn(key, lsn).await {
            Ok(v) => return v.map(|v| String::from_utf8_lossy(&v.value).into_owned()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{key}: min_lsn read at {lsn} failed: {last:?}")
}

fn run_arm(
    rt: &tokio::runtime::Runtime,
    stack: &mut Stack,
    client: &Client,
    arm: Arm,
    target: Option<u64>,
    max_time: Duration,
    seed: u64,
) -> Report {
    let mut dbs = Vec::new();
    for _ in 0..WRITERS + FILLERS {
        dbs.push(rt.block_on(stack.pg.client()));
    }
    let start = Instant::now();
    let load = Arc::new(Load {
        arm,
        client: client.clone(),
        stats: Stats::default(),
        stop: AtomicBool::new(false),
        seed,
        deadline: start + max_time,
    });
    let mut tasks = Vec::new();
    for (i, db) in dbs.into_iter().enumerate() {
        tasks.push(if i < WRITERS {
            rt.spawn(writer(load.clone(), db, i))
        } else {
            rt.spawn(filler(load.clone(), db, i))
        });
    }
    let accepted = || get(&load.stats.accepted);
    let done = || !load.running() || target.is_some_and(|t| accepted() >= t);
    // Kill -9 the worker half-way (by the target count, or by time).
    while !done() && target.is_none_or(|t| accepted() < t / 2) && start.elapsed() < max_time / 2 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let worker_restart = stack.replace_worker();
    while !done() {
        std::thread::sleep(Duration::from_millis(100));
    }
    load.stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    let duration = start.elapsed();

    // Quiescence: CDC applied everything, then every cached key equals its row.
    let (mismatches, cached_at_end) = rt.block_on(async {
        let db = stack.pg.client().await;
        let end = current_lsn(&db).await;
        let rows = db
            .query("SELECT id, v FROM items ORDER BY id", &[])
            .await
            .unwrap();
        let mut mismatches = Vec::new();
        let mut cached = 0;
        for row in rows {
            let (id, v): (i32, i64) = (row.get(0), row.get(1));
            let key = format!("item:{id}");
            if let Some(c) = read_at(client, &key, end).await {
                cached += 1;
                if c != v.to_string() {
                    mismatches.push(format!("{key} = {c} but the row has v = {v} (end {end})"));
                }
            }
        }
        // The next arm starts from an empty cache.
        for id in 1..=ROWS {
            client.delete(format!("item:{id}")).await.unwrap();
        }
        (mismatches, cached)
    });
    Report {
        arm,
        duration,
        worker_restart,
        load,
        mismatches,
        cached_at_end,
    }
}

#[test]
fn exact_fills_are_never_stale_under_a_write_race() {
    let seed: u64 = std::env::var("T71_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("t71 seed {seed} (set T71_SEED to repeat the schedule of random ids and delays)");
    let t0 = Instant::now();
    let rt = runtime();
    let mut stack = Stack::start(&bins!(), &rt);
    let client = rt
        .block_on(connect_settled(
            stack.cluster.endpoints(),
            PARTITIONS,
            3,
            SETTLE,
        ))
        .unwrap();
    eprintln!("stack up in {:.1}s", t0.elapsed().as_secs_f64());

    let mut reports = Vec::new();
    for (arm, target, time) in [
        (Arm::Exact, Some(EXACT_TARGET), EXACT_MAX_TIME),
        (Arm::Control, None, CONTROL_TIME),
        (Arm::OldLsn, None, OLD_LSN_TIME),
    ] {
        let r = run_arm(&rt, &mut stack, &client, arm, target, time, seed);
        eprintln!("{}", r.line());
        eprint!("{}", r.details());
        reports.push(r);
    }
    eprintln!(
        "--- t71 summary ({:.0}s in all) ---",
        t0.elapsed().as_secs_f64()
    );
    for r in &reports {
        eprintln!("{}", r.line());
    }

    let exact = &reports[0];
    let accepted = get(&exact.load.stats.accepted);
    assert_eq!(
        get(&exact.load.stats.stale),
        0,
        "exact fills served stale values:\n{}",
        exact.details()
    );
    assert!(
        exact.mismatches.is_empty(),
        "exact: keys differ from their rows at quiescence:\n{}",
        exact.details()
    );
    assert_eq!(
        get(&exact.load.stats.unchecked),
        0,
        "exact: checks that never got an answer"
    );
    assert!(
        accepted >= EXACT_MIN_ACCEPTED,
        "exact: only {accepted} accepted fills (at least {EXACT_MIN_ACCEPTED} wanted)"
    );
    let control = &reports[1];
    assert!(
        get(&control.load.stats.stale) > 0,
        "the positive control found no stale fill: the checker cannot see them\n{}",
        control.line()
    );
}
