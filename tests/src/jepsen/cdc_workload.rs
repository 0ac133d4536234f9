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
//! - after a miss, `cache-fill`: the LSN form of the cache-aside fill (`pg_current_wal_lsn()`
//!   *before* `SELECT ver`, then `set_if_newer` with that LSN).
//!
//! The nemesis may also SIGKILL the worker and stop PostgreSQL. After the run: wait
//! until the worker has caught up, then per key a `db-read` (row value and the WAL
//! LSN), a `cache-read` at that `min_lsn`, a fill, and another `cache-read`: after
//! quiescence every cached value must equal its row.

use super::history::{Extra, HistoryWriter, OpHandle};
use super::nemesis::External;
use super::workload::{attempt, process_client, Ended, Proc, Steps, OP_TIMEOUT};
use crate::pg::PgCluster;
use anyhow::{bail, Context, Result};
use raftcache_client::{Client, Consistency, Lsn, ReadOptions};
use rand::Rng;
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
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
        let metrics = crate::free_addr()?;
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
        let metrics: SocketAddr = crate::free_addr()?;
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
        crate::kill_reap(&mut self.worker);
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
pub struct Db {
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

/// The `cdc` workload's steps.
pub struct Cdc {
    h: Arc<HistoryWriter>,
    url: String,
    keys: usize,
    /// Newest LSN any db-write returned.
    newest: AtomicU64,
}

impl Cdc {
    /// Over `keys` rows of the database at `url`, recording into `h`.
    pub fn new(h: Arc<HistoryWriter>, url: String, keys: usize) -> Cdc {
        Cdc {
            h,
            url,
            keys,
            newest: AtomicU64::new(0),
        }
    }
}

impl Steps for Cdc {
    type State = Db;

    fn state(&self) -> Db {
        Db {
            url: self.url.clone(),
            client: None,
        }
    }

    fn step<'a>(
        &'a self,
        p: &'a mut Proc,
        db: &'a mut Db,
    ) -> Pin<Box<dyn Future<Output = Ended> + Send + 'a>> {
        Box::pin(async move {
            let id = p.rng.random_range(0..self.keys);
            if p.rng.random_bool(0.3) {
                return db_write(&self.h, db, p.process, id, &self.newest).await;
            }
            let min = self.newest.load(Ordering::SeqCst);
            let min = (min > 0 && p.rng.random_bool(0.5)).then_some(Lsn(min));
            match cache_read(&self.h, &p.client, p.process, id, min).await {
                Read::Miss => fill(&self.h, &p.client, db, p.process, id).await,
                Read::Done(ended) => ended,
            }
        })
    }
}

/// Completes a database step that ran under [`OP_TIMEOUT`]: hands back its answer
/// and the handle, or records `info` (it may have committed before the connection
/// broke) and drops the connection.
fn db_done<T>(
    h: &HistoryWriter,
    op: OpHandle,
    db: &mut Db,
    result: Result<Result<T>, tokio::time::error::Elapsed>,
) -> Result<(T, OpHandle), Ended> {
    let error = match result {
        Ok(Ok(v)) => return Ok((v, op)),
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => "timeout".to_owned(),
    };
    db.client = None;
    h.info(op, error);
    Err(Ended::Info)
}

async fn db_write(
    h: &HistoryWriter,
    db: &mut Db,
    process: u64,
    id: usize,
    newest: &AtomicU64,
) -> Ended {
    let key = key_of(id);
    let op = h.invoke(process, "db-write", &key, Value::Null, Extra::default());
    let write = async {
        let ver = db.bump(id as i32).await?;
        let lsn = db.lsn().await.context("committed; LSN unknown")?;
        Ok((ver, lsn))
    };
    let result = tokio::time::timeout(OP_TIMEOUT, write).await;
    match db_done(h, op, db, result) {
        Ok(((ver, lsn), op)) => {
            newest.fetch_max(lsn.0, Ordering::SeqCst);
            h.ok(op, json!(ver.to_string()), Extra::default().with_lsn(lsn));
            Ended::Ok
        }
        Err(ended) => ended,
    }
}

enum Read {
    Miss,
    Done(Ended),
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
    match attempt(h, op, client.get_with(&key, options)).await {
        Ok((Some(v), op)) => {
            let got = String::from_utf8_lossy(&v.value).into_owned();
            h.ok(op, json!(got), Extra::default());
            Read::Done(Ended::Ok)
        }
        Ok((None, op)) => {
            h.ok(op, Value::Null, Extra::default());
            Read::Miss
        }
        Err(ended) => Read::Done(ended),
    }
}

/// The cache-aside fill after a miss.
async fn fill(h: &HistoryWriter, client: &Client, db: &mut Db, process: u64, id: usize) -> Ended {
    let key = key_of(id);
    let op = h.invoke(process, "cache-fill", &key, Value::Null, Extra::default());
    let filled = async {
        let lsn = db.lsn().await?;
        let ver = db.row(id as i32).await?;
        let outcome = client
            .set_if_newer(&key, ver.to_string(), lsn, None)
            .await?;
        Ok((ver, lsn, outcome.applied))
    };
    let result = tokio::time::timeout(OP_TIMEOUT, filled).await;
    match db_done(h, op, db, result) {
        Ok(((ver, lsn, applied), op)) => {
            let mut extra = Extra::default().with_lsn(lsn);
            if !applied {
                extra = extra.with_error("refused: a newer change is known");
            }
            h.ok(op, json!(ver.to_string()), extra);
            Ended::Ok
        }
        Err(ended) => ended,
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
                Read::Miss
                    if round == 0 && fill(h, &client, &mut db, p, id).await == Ended::Info =>
                {
                    p += 1
                }
                Read::Done(Ended::Info) => p += 1,
                _ => {}
            }
        }
        p += 1;
    }
    Ok(())
}
