//! One test run: start the cluster (and Postgres + CDC for `cdc`), run the workload
//! and the nemesis side by side until the time limit, heal, do the final reads, check
//! the history, and leave everything in the run folder:
//!
//! ```text
//! DIR/config.json     the run's settings (seed included: rerun with --seed)
//! DIR/history.jsonl   the history (shared/HISTORY_FORMAT.md)
//! DIR/nemesis.jsonl   every fault started and healed, on the history's clock
//! DIR/n<i>.log        each node slot's log, all incarnations
//! DIR/cdc.log         the CDC worker's log (cdc workload)
//! DIR/report.txt      the checker's verdict and anomalies; report.json the same as JSON
//! ```

use super::cdc_workload::{self, Cdc, CdcEnv};
use super::check::{check_file, CheckOptions, Report};
use super::cluster::{JCluster, NodeOptions};
use super::history::HistoryWriter;
use super::nemesis::{External, Fault, Nemesis, NemesisLog, Schedule};
use super::proxy::Net;
use super::workload::{self, run_processes, Counter, Register, WorkloadOptions};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which workload to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// get/set/cas/delete, checked for per-key linearizability.
    Register,
    /// incr and reads, checked against the acknowledged increments.
    Counter,
    /// Postgres writes and cache reads through the CDC worker.
    Cdc,
}

impl Workload {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Register => "register",
            Workload::Counter => "counter",
            Workload::Cdc => "cdc",
        }
    }
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Workload::Register, Workload::Counter, Workload::Cdc]
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| format!("unknown workload {s:?} (register, counter, cdc)"))
    }
}

/// Everything a run needs.
#[derive(Debug, Clone, Serialize)]
pub struct RunOptions {
    /// The workload.
    pub workload: Workload,
    /// The faults (`--nemesis`).
    #[serde(serialize_with = "fault_names")]
    pub faults: Vec<Fault>,
    /// Node processes.
    pub nodes: usize,
    /// Partitions of the cluster.
    pub partitions: u32,
    /// Replicas per partition.
    pub replicas: u32,
    /// How long the workload runs.
    pub time_limit: Duration,
    /// Client processes.
    pub concurrency: usize,
    /// Target operations per second in all.
    pub rate: f64,
    /// Keys (registers, counters or rows).
    pub keys: usize,
    /// Seed of the workload and the nemesis.
    pub seed: u64,
    /// The run folder.
    pub out: PathBuf,
    /// `raftcache-node`.
    pub node_bin: PathBuf,
    /// `raftcache-cdc` (cdc workload).
    pub cdc_bin: PathBuf,
    /// Budget of the linearizability checker.
    pub check_time_limit: Duration,
    /// Register reads from followers (a known non-linearizable mode, to see the
    /// checker catch stale reads).
    pub follower_reads: bool,
    /// The nodes' `--persistence` (`None`: memory only).
    pub persistence: Option<String>,
}

fn fault_names<S: serde::Serializer>(faults: &[Fault], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(faults.iter().map(|f| f.name()))
}

/// What a run produced.
pub struct RunResult {
    /// The checker's report.
    pub report: Report,
    /// Faults started, by kind.
    pub faults: Vec<(&'static str, u32)>,
    /// Where the history is.
    pub history: PathBuf,
}

/// Runs one test (see the module docs).
///
/// # Errors
/// When the cluster (or Postgres, or the worker) cannot be started, does not recover
/// after the run, or the history cannot be written.
pub async fn run(opts: &RunOptions) -> Result<RunResult> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("create the run folder {:?}", opts.out))?;
    std::fs::write(
        opts.out.join("config.json"),
        serde_json::to_string_pretty(opts)?,
    )?;
    let net = Net::with_seed(opts.seed);
    let node_opts = NodeOptions {
        bin: opts.node_bin.clone(),
        partitions: opts.partitions,
        replicas: opts.replicas,
        persistence: opts.persistence.clone(),
    };
    eprintln!(
        "raftcache-jepsen: starting {} nodes (logs in {})",
        opts.nodes,
        opts.out.display()
    );
    let mut cluster = JCluster::start(opts.nodes, node_opts, net, &opts.out).await?;
    let endpoints = cluster.endpoints();
    let history_path = opts.out.join("history.jsonl");
    let h = Arc::new(HistoryWriter::create(&history_path)?);
    let log = Arc::new(NemesisLog::create(
        &opts.out.join("nemesis.jsonl"),
        h.start_instant(),
    )?);
    let mut external: Option<Box<dyn External>> = None;
    let mut pg_url = String::new();
    if opts.workload == Workload::Cdc {
        eprintln!("raftcache-jepsen: starting PostgreSQL and raftcache-cdc");
        let env = CdcEnv::start(&opts.cdc_bin, &endpoints, opts.keys, &opts.out).await?;
        pg_url = env.url.clone();
        external = Some(Box::new(env));
        wait_cdc_ready(&endpoints, &pg_url).await?;
    }
    let wopts = WorkloadOptions {
        concurrency: opts.concurrency,
        rate: opts.rate,
        keys: opts.keys,
        seed: opts.seed,
        follower_reads: opts.follower_reads,
    };
    let until = Instant::now() + opts.time_limit;
    eprintln!(
        "raftcache-jepsen: {:?} workload for {:?} with nemesis [{}]",
        opts.workload,
        opts.time_limit,
        opts.faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(",")
    );
    let load = {
        let (h, endpoints, wopts, url) =
            (h.clone(), endpoints.clone(), wopts.clone(), pg_url.clone());
        let workload = opts.workload;
        tokio::spawn(async move {
            match workload {
                Workload::Register => {
                    let steps = Register::new(h, wopts.keys, wopts.follower_reads);
                    run_processes(Arc::new(steps), endpoints, wopts, until).await
                }
                Workload::Counter => {
                    let steps = Counter::new(h, wopts.keys);
                    run_processes(Arc::new(steps), endpoints, wopts, until).await
                }
                Workload::Cdc => {
                    let steps = Cdc::new(h, url, wopts.keys);
                    run_processes(Arc::new(steps), endpoints, wopts, until).await
                }
            }
        })
    };
    let mut nemesis = Nemesis::new(
        opts.faults.clone(),
        Schedule::default(),
        opts.seed.wrapping_add(1),
        log.clone(),
        external,
    )
    .with_history(h.clone());
    let healed = nemesis.run(&mut cluster, until).await;
    load.await.context("workload task")??;
    healed.context("the cluster did not recover after the run")?;
    log.event("final", "-", "final reads");
    let final_process = (opts.concurrency as u64 + 1) * 1_000_000;
    match opts.workload {
        Workload::Register | Workload::Counter => {
            let counter = opts.workload == Workload::Counter;
            workload::final_reads(&h, &endpoints, final_process, opts.keys, counter).await?;
        }
        Workload::Cdc => {
            cdc_workload::final_phase(&h, &endpoints, &pg_url, opts.keys, final_process).await?;
        }
    }
    h.flush().context("write the history")?;
    let faults = nemesis.counts.iter().map(|(k, v)| (*k, *v)).collect();
    drop(nemesis);
    drop(cluster);
    let check_opts = CheckOptions {
        time_limit: opts.check_time_limit,
        ..CheckOptions::default()
    };
    let path = history_path.clone();
    let report = tokio::task::spawn_blocking(move || check_file(&path, &check_opts)).await??;
    std::fs::write(opts.out.join("report.txt"), report.details())?;
    std::fs::write(
        opts.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(RunResult {
        report,
        faults,
        history: history_path,
    })
}

/// Waits (≤ 60 s) until the CDC worker streams: a read at the current WAL position
/// succeeds.
async fn wait_cdc_ready(endpoints: &[String], url: &str) -> Result<()> {
    let client = workload::process_client(endpoints).await?;
    let db = cdc_workload::connect(url).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = db
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?;
        let text: String = row.try_get(0)?;
        let lsn: raftcache_client::Lsn = text
            .parse()
            .map_err(|e| anyhow::anyhow!("bad LSN {text:?}: {e}"))?;
        match client.get_with_min_lsn(cdc_workload::key_of(0), lsn).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                anyhow::bail!("raftcache-cdc did not start streaming within 60 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}
