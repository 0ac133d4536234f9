//! A `raftcache-cdc` child process for tests: config written to a temp dir, stdout
//! events (`{"event":"streaming"|"standby",…}`) read by a thread, log to a file that is
//! printed when a test fails, SIGKILL on drop.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running worker.
pub struct CdcProc {
    child: Option<Child>,
    /// The process id.
    pub pid: u32,
    /// Its Prometheus endpoint.
    pub metrics: SocketAddr,
    events: mpsc::Receiver<serde_json::Value>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

pub use crate::free_addr;

/// A worker config: `[postgres]` at `pg_url`, the cache at `endpoints`, metrics at
/// `metrics`, a short lease, and `tables` (TOML `[[table]]` entries) appended.
pub fn config(pg_url: &str, endpoints: &[String], metrics: SocketAddr, tables: &str) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[postgres]\nurl = {pg_url:?}\nslot = \"raftcache\"\npublication = \"raftcache\"\n\
         status-interval = \"500ms\"\n\n[cache]\nendpoints = [{}]\n\n[metrics]\nlisten = \"{metrics}\"\n\n\
         [worker]\nlease-ttl = \"2s\"\n\n{tables}\n",
        endpoints.join(", ")
    )
}

impl CdcProc {
    /// Starts `bin --config <file with config_toml>`; `metrics` must be the address the
    /// config listens on.
    ///
    /// # Errors
    /// When it cannot be spawned.
    pub fn start(bin: &Path, config_toml: &str, metrics: SocketAddr) -> Result<CdcProc> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("cdc.toml");
        std::fs::write(&path, config_toml)?;
        let log = dir.path().join("cdc.log");
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("spawn {bin:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Ok(CdcProc {
            pid: child.id(),
            child: Some(child),
            metrics,
            events,
            log,
            _dir: dir,
        })
    }

    /// Waits for the next stdout event named `kind` (others are skipped).
    ///
    /// # Errors
    /// On timeout or exit; the message includes the worker's log.
    pub fn wait_event(&mut self, kind: &str, timeout: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) if v["event"] == kind => return Ok(v),
                Ok(_) => continue,
                Err(_) => bail!(
                    "worker printed no {kind:?} event within {timeout:?}\n--- cdc log ---\n{}",
                    self.log()
                ),
            }
        }
    }

    /// The worker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL now, and reap.
    pub fn kill9(&mut self) {
        crate::kill_reap(&mut self.child);
    }

    /// A metric of the worker (unlabelled), scraped now.
    ///
    /// # Errors
    /// When the endpoint does not answer or lacks the metric.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let text = crate::scrape_metrics(self.metrics)?;
        crate::metric_value(&text, name).with_context(|| format!("no metric {name}"))
    }
}

impl Drop for CdcProc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            crate::print_log_tail(&format!("cdc worker {}", self.pid), &self.log());
        }
    }
}

/// PostgreSQL with a schema, one cache node, and one `raftcache-cdc` worker streaming
/// the mapped tables into it: the stack every CDC process test starts from. Dropping it
/// stops PostgreSQL, then the node, then the worker.
pub struct CdcStack {
    /// The throwaway PostgreSQL.
    pub pg: crate::pg::PgCluster,
    /// The cache node.
    pub node: crate::NodeProc,
    /// The worker started by [`CdcStack::start`] (already streaming).
    pub worker: CdcProc,
    /// The workers' metrics address.
    pub metrics: SocketAddr,
    cdc_bin: PathBuf,
    tables: String,
}

impl CdcStack {
    /// Starts PostgreSQL, applies `schema` (SQL), starts a node and a worker mapping
    /// `tables` (TOML `[[table]]` entries), and waits until the worker streams.
    ///
    /// # Errors
    /// When a part does not start, or the worker does not stream within 30 s.
    pub fn start(
        bins: &crate::Bins,
        rt: &tokio::runtime::Runtime,
        schema: &str,
        tables: &str,
    ) -> Result<CdcStack> {
        let pg = crate::pg::PgCluster::start().context("a throwaway PostgreSQL (initdb/pg_ctl)")?;
        rt.block_on(async { pg.client().await.batch_execute(schema).await })
            .context("applying the schema")?;
        let node = crate::NodeProc::start(bins, &[])?;
        let metrics = free_addr()?;
        let mut stack = CdcStack {
            worker: CdcProc::start(
                &bins.cdc,
                &config(&pg.url(), &[node.endpoint()], metrics, tables),
                metrics,
            )?,
            pg,
            node,
            metrics,
            cdc_bin: bins.cdc.clone(),
            tables: tables.to_owned(),
        };
        stack
            .worker
            .wait_event("streaming", Duration::from_secs(30))?;
        Ok(stack)
    }

    /// Starts another worker with the same config (a standby, or a replacement).
    ///
    /// # Errors
    /// When it cannot be spawned.
    pub fn start_worker(&self) -> Result<CdcProc> {
        CdcProc::start(
            &self.cdc_bin,
            &config(
                &self.pg.url(),
                &[self.node.endpoint()],
                self.metrics,
                &self.tables,
            ),
            self.metrics,
        )
    }
}
