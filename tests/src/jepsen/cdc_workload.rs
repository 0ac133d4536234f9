//! The `cdc` workload: Postgres is the truth, the cache is derived from it.
//!
//! A throwaway PostgreSQL (`wal_level=logical`) holds `jepsen_rows(id, ver)`; the
//! real `raftcache-cdc` worker maps every row to the cache key `row:<id>` in
//! invalidate mode. Each process, at random:
//! - `db-write`: `UPDATE … SET ver = ver + 1 … RETURNING ver`, then
//!   `pg_current_wal_lsn()`: the `ok` carries the new version and an LSN at or after
//!   its commit;
//! - `cache-read`: a LEASE read of the key, half of the time with `min_lsn` = the
//!   newest LSN any `db-write` returned so far (the invoke carries it);
//! - after a miss, `cache-fill`: the documented cache-aside fill (`pg_current_wal_lsn()`
//!   *before* `SELECT ver`, then `set_if_newer` with that LSN).
//!
//! The nemesis may also SIGKILL the worker and stop PostgreSQL. After the run: wait
//! until the worker has caught up, then per key a `db-read` (row value and the WAL
//! LSN), a `cache-read` at that `min_lsn`, a fill, and another `cache-read`: after
//! quiescence every cached value must equal its row.

use super::history::{Extra, HistoryWriter};
use super::nemesis::External;
use super::workload::{pause, process_client, record_error, WorkloadOptions, OP_TIMEOUT};
use crate::pg::PgCluster;
use anyhow::{bail, Context, Result};
use raftcache_client::{Client, Consistency, Lsn, ReadOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The table the workload writes.
pub const TABLE: &str = "jepsen_rows";

/// The cache key of row `id`.
pub fn key_of(id: usize) -> String {
    format!("row:{id}")
}

/// PostgreSQL plus the CDC worker, faultable by the nemesis.
pub struct CdcEnv {
    pg: PgCluster,
    worker: Option<Child>,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// The database URL.
    pub url: String,
    /// Worker starts so far.
    pub starts: u32,
}

impl CdcEnv {
    /// Starts PostgreSQL, creates the table with `keys` rows, writes the worker's
    /// config (cache at `endpoints`) into `dir` and starts the worker.
    ///
    /// # Errors
    /// When PostgreSQL or the worker cannot start.
    pub async fn start(
        cdc_bin: &Path,
        endpoints: &[String],
        keys: usize,
        dir: &Path,
    ) -> Result<CdcEnv> {
        let pg = tokio::task::spawn_blocking(PgCluster::start).await??;
        let url = pg.url();
        let db = connect(&url).await?;
        db.batch_execute(&format!(
            "CREATE TABLE {TABLE} (id int PRIMARY KEY, ver bigint NOT NULL);\
             INSERT INTO {TABLE} SELECT g, 0 FROM generate_series(0, {}) g;",
            keys.saturating_sub(1)
        ))
        .await
        .context("create the workload table")?;
        let metrics = super::cluster::free_addr()?;
        let tables = format!(
            "[[table]]\nname = \"public.{TABLE}\"\nkeys = [\"row:{{id}}\"]\nmode = \"invalidate\"\n"
        );
        let config = dir.join("cdc.toml");
        std::fs::write(
            &config,
            crate::cdc::config(&url, endpoints, metrics, &tables),
        )?;
        let mut env = CdcEnv {
            pg,
            worker: None,
            bin: cdc_bin.to_path_buf(),
            config,
            log: dir.join("cdc.log"),
            url,
            starts: 0,
        };
        env.spawn_worker()?;
        Ok(env)
    }

    fn spawn_worker(&mut self) -> Result<()> {
        // A fresh metrics port each time (the old one may linger after SIGKILL).
        let text = std::fs::read_to_string(&self.config)?;
        let metrics: SocketAddr = super::cluster::free_addr()?;
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("listen = ") {
                    format!("listen = \"{metrics}\"")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&self.config, text)?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        use std::io::Write;
        writeln!(log, "=== raftcache-jepsen: worker start {}", self.starts)?;
        // No die_with_parent here: restarts run on tokio's blocking pool, whose threads
        // exit when idle, and PR_SET_PDEATHSIG fires on the spawning *thread*'s exit.
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {:?}", self.bin))?;
        self.worker = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// The server log's tail (for reports).
    pub fn pg_log_tail(&self) -> String {
        self.pg.log_tail(20)
    }
}

impl External for CdcEnv {
    fn kill_cdc(&mut self) -> Result<()> {
        if let Some(mut child) = self.worker.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    fn start_cdc(&mut self) -> Result<()> {
        if self.worker.is_none() {
            self.spawn_worker()?;
        }
        Ok(())
    }

    fn stop_pg(&mut self) -> Result<()> {
        self.pg.stop()
    }

    fn start_pg(&mut self) -> Result<()> {
        self.pg.start_again()
    }
}

impl Drop for CdcEnv {
    fn drop(&mut self) {
        let _ = self.kill_cdc();
    }
}

/// Connects to Postgres (bounded), spawning the connection task.
///
/// # Errors
/// When it cannot connect within 5 s.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .context("connect to PostgreSQL: timed out")??;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A process's database connection, reopened after it breaks.
struct Db {
    url: String,
    client: Option<tokio_postgres::Client>,
}

impl Db {
    async fn get(&mut self) -> Result<&tokio_postgres::Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(connect(&self.url).await?);
        }
        self.client.as_ref().context("no connection")
    }

    async fn lsn(&mut self) -> Result<Lsn> {
        let row = self
            .get()
            .await?
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?;
        let text: String = row.try_get(0)?;
        text.parse()
            .map_err(|e| anyhow::anyhow!("bad LSN {text:?}: {e}"))
    }

    async fn bump(&mut self, id: i32) -> Result<i64> {
        let sql = format!("UPDATE {TABLE} SET ver = ver + 1 WHERE id = $1 RETURNING ver");
        let row = self.get().await?.query_one(&sql, &[&id]).await?;
        Ok(row.try_get(0)?)
    }

    async fn row(&mut self, id: i32) -> Result<i64> {
        let sql = format!("SELECT ver FROM {TABLE} WHERE id = $1");
        let row = self.get().await?.query_one(&sql, &[&id]).await?;
        Ok(row.try_get(0)?)
    }
}

/// Newest LSN any db-write returned.
type Newest = Arc<AtomicU64>;

/// Runs the cdc workload until `until`.
pub async fn run(
    h: Arc<HistoryWriter>,
    endpoints: Vec<String>,
    url: String,
    opts: WorkloadOptions,
    until: Instant,
) -> Result<()> {
    let newest: Newest = Arc::default();
    let mut tasks = Vec::new();
    for worker in 0..opts.concurrency {
        let (h, endpoints, url, opts, newest) = (
            h.clone(),
            endpoints.clone(),
            url.clone(),
            opts.clone(),
            newest.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = process_client(&endpoints).await?;
            let mut db = Db { url, client: None };
            let mut rng = SmallRng::seed_from_u64(opts.seed ^ (worker as u64 * 0x9E37_79B9));
            let mut process = worker as u64;
            while Instant::now() < until {
                let id = rng.random_range(0..opts.keys);
                let unknown = if rng.random_bool(0.3) {
                    db_write(&h, &mut db, process, id, &newest).await
                } else {
                    let min = newest.load(Ordering::SeqCst);
                    let min = (min > 0 && rng.random_bool(0.5)).then_some(Lsn(min));
                    match cache_read(&h, &client, process, id, min).await {
                        Read::Miss => fill(&h, &client, &mut db, process, id).await,
                        Read::Unknown => true,
                        Read::Done => false,
                    }
                };
                if unknown {
                    process += opts.concurrency as u64;
                }
                tokio::time::sleep(pause(&mut rng, &opts)).await;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn db_write(
    h: &HistoryWriter,
    db: &mut Db,
    process: u64,
    id: usize,
    newest: &Newest,
) -> bool {
    let key = key_of(id);
    let op = h.invoke(process, "db-write", &key, Value::Null, Extra::default());
    let attempt = async {
        let ver = db.bump(id as i32).await?;
        let lsn = db.lsn().await.context("committed; LSN unknown")?;
        Ok::<_, anyhow::Error>((ver, lsn))
    };
    match tokio::time::timeout(OP_TIMEOUT, attempt).await {
        Ok(Ok((ver, lsn))) => {
            newest.fetch_max(lsn.0, Ordering::SeqCst);
            h.ok(op, json!(ver.to_string()), Extra::default().with_lsn(lsn));
            false
        }
        Ok(Err(e)) => {
            db.client = None;
            // The commit may have happened (the connection broke after it).
            h.info(op, format!("{e:#}"));
            true
        }
        Err(_) => {
            db.client = None;
            h.info(op, "timeout");
            true
        }
    }
}

enum Read {
    Miss,
    Done,
    Unknown,
}

async fn cache_read(
    h: &HistoryWriter,
    client: &Client,
    process: u64,
    id: usize,
    min: Option<Lsn>,
) -> Read {
    let key = key_of(id);
    let extra = match min {
        Some(l) => Extra::default().with_lsn(l),
        None => Extra::default(),
    };
    let op = h.invoke(process, "cache-read", &key, Value::Null, extra);
    let options = ReadOptions {
        consistency: Consistency::Lease,
        min_lsn: min,
    };
    match tokio::time::timeout(OP_TIMEOUT, client.get_with(&key, options)).await {
        Ok(Ok(Some(v))) => {
            let got = String::from_utf8_lossy(&v.value).into_owned();
            h.ok(op, json!(got), Extra::default());
            Read::Done
        }
        Ok(Ok(None)) => {
            h.ok(op, Value::Null, Extra::default());
            Read::Miss
        }
        Ok(Err(e)) => {
            if record_error(h, op, &e) {
                Read::Unknown
            } else {
                Read::Done
            }
        }
        Err(_) => {
            h.info(op, "timeout");
            Read::Unknown
        }
    }
}

/// The cache-aside fill after a miss; returns whether it ended as `info`.
async fn fill(h: &HistoryWriter, client: &Client, db: &mut Db, process: u64, id: usize) -> bool {
    let key = key_of(id);
    let op = h.invoke(process, "cache-fill", &key, Value::Null, Extra::default());
    let attempt = async {
        let lsn = db.lsn().await?;
        let ver = db.row(id as i32).await?;
        let outcome = client
            .set_if_newer(&key, ver.to_string(), lsn, None)
            .await?;
        Ok::<_, anyhow::Error>((ver, lsn, outcome.applied))
    };
    match tokio::time::timeout(OP_TIMEOUT, attempt).await {
        Ok(Ok((ver, lsn, applied))) => {
            let mut extra = Extra::default().with_lsn(lsn);
            if !applied {
                extra = extra.with_error("refused: a newer change is known");
            }
            h.ok(op, json!(ver.to_string()), extra);
            false
        }
        Ok(Err(e)) => {
            db.client = None;
            h.info(op, format!("{e:#}"));
            true
        }
        Err(_) => {
            h.info(op, "timeout");
            true
        }
    }
}

/// The quiescent final check: waits until the worker caught up with the WAL (a
/// min_lsn read succeeds), then per key db-read, cache-read, fill, cache-read.
///
/// # Errors
/// When Postgres or the cache stay unreachable.
pub async fn final_phase(
    h: &HistoryWriter,
    endpoints: &[String],
    url: &str,
    keys: usize,
    process: u64,
) -> Result<()> {
    let client = process_client(endpoints).await?;
    let mut db = Db {
        url: url.to_owned(),
        client: None,
    };
    // Catch-up: a read at the current WAL position must succeed within 60 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lsn = match db.lsn().await {
            Ok(l) => l,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "final phase: Postgres not ready");
                db.client = None;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e.context("Postgres unreachable after the run")),
        };
        match client.get_with_min_lsn(key_of(0), lsn).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "final phase: CDC not caught up");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => bail!("CDC did not catch up with {lsn} within 60 s: {e}"),
        }
    }
    let mut p = process;
    for id in 0..keys {
        let key = key_of(id);
        let op = h.invoke(p, "db-read", &key, Value::Null, Extra::default());
        let (ver, lsn) =
            match async { Ok::<_, anyhow::Error>((db.row(id as i32).await?, db.lsn().await?)) }
                .await
            {
                Ok(x) => x,
                Err(e) => {
                    h.fail(op, format!("{e:#}"));
                    p += 1;
                    continue;
                }
            };
        h.ok(op, json!(ver.to_string()), Extra::default().with_lsn(lsn));
        for round in 0..2 {
            match cache_read(h, &client, p, id, Some(lsn)).await {
                Read::Miss if round == 0 && fill(h, &client, &mut db, p, id).await => p += 1,
                Read::Unknown => p += 1,
                _ => {}
            }
        }
        p += 1;
    }
    Ok(())
}
