//! `raftcache-jepsen test …` runs a test and checks it; `raftcache-jepsen check FILE`
//! checks a history again. Both print the one-line verdict on stdout
//! (`valid: true|false|unknown · N ops (ok …, fail …, info …) · anomalies: K`) and exit
//! 0 when valid, 1 when invalid, 3 when unknown (the checker ran out of budget), 2 on a
//! harness error.

use super::check::{check_file, CheckOptions, Validity};
use super::nemesis::{parse_faults, Fault};
use super::run::{run, RunOptions, Workload};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// A Jepsen-style harness for raftcache: real nodes, a fault-injecting proxy on every
/// peer link, client processes recording a history, and checkers.
#[derive(Debug, Parser)]
#[command(name = "raftcache-jepsen", version, about)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs a test: cluster, workload, nemesis, final reads, check.
    Test(TestArgs),
    /// Checks a history file (JSONL, shared/HISTORY_FORMAT.md).
    Check {
        /// The history.
        file: PathBuf,
        /// Time budget of the linearizability search (e.g. 60 or 2m).
        #[arg(long, default_value = "60", value_parser = parse_secs)]
        time_limit: Duration,
        /// Print the whole report (anomalies with their windows), not just the verdict.
        #[arg(long)]
        details: bool,
    },
}

#[derive(Debug, clap::Args)]
struct TestArgs {
    /// register, counter or cdc.
    #[arg(long, default_value = "register")]
    workload: Workload,
    /// Comma-separated faults: partition, net, kill, pause, member, clock, cdc-kill,
    /// pg-restart; `all` for every one that applies; `none`. Only by name (not in
    /// `all`): kill-all (durable persistence), fresh-restart (register workload,
    /// memory-only nodes, at least 2).
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// Node processes.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Partitions of the cluster.
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// Replicas per partition.
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// How long the workload runs (seconds, or e.g. 5m).
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    time_limit: Duration,
    /// Client processes.
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// Target operations per second, all processes together.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Keys (registers, counters or rows).
    #[arg(long, default_value_t = 8)]
    keys: usize,
    /// Seed of the workload and the nemesis (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// The run folder (default: jepsen-runs/<workload>-<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The raftcache-node binary (default: next to this one).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// The raftcache-cdc binary (default: next to this one).
    #[arg(long)]
    cdc_bin: Option<PathBuf>,
    /// Time budget of the linearizability search.
    #[arg(long, default_value = "120", value_parser = parse_secs)]
    check_time_limit: Duration,
    /// Register reads from followers (≤ 10 s stale): NOT linearizable. Shows the
    /// checker finding real stale reads; such a run is expected to be invalid.
    #[arg(long)]
    follower_reads: bool,
    /// The nodes' persistence: none, snapshot or durable. With durable, a killed node
    /// comes back as itself, and `all` includes `kill-all` (every node at once).
    #[arg(long, default_value = "none")]
    persistence: String,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (seconds, or e.g. 90s, 5m)"))
}

/// A sibling binary of this executable: the first of `names` that exists.
fn sibling(names: &[&str]) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

fn existing(path: Option<PathBuf>, names: &[&str], what: &str) -> Result<PathBuf, String> {
    match path.or_else(|| sibling(names)) {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => Err(format!("{what} binary {} does not exist", p.display())),
        None => Err(format!(
            "no {what} binary next to raftcache-jepsen (looked for {}); build the workspace \
             (cargo build --workspace) or pass --{what}-bin",
            names.join(", ")
        )),
    }
}

fn exit_for(v: Validity) -> ExitCode {
    match v {
        Validity::Valid => ExitCode::SUCCESS,
        Validity::Invalid => ExitCode::from(1),
        Validity::Unknown => ExitCode::from(3),
    }
}

/// Entry point of the `raftcache-jepsen` binary.
pub fn main() -> ExitCode {
    // The harness reports through stderr lines; node and worker logs go to the run
    // folder.
    let args = Args::parse();
    match args.command {
        Cmd::Check {
            file,
            time_limit,
            details,
        } => check(&file, time_limit, details),
        Cmd::Test(t) => test(t),
    }
}

fn check(file: &Path, time_limit: Duration, details: bool) -> ExitCode {
    let opts = CheckOptions {
        time_limit,
        ..CheckOptions::default()
    };
    match check_file(file, &opts) {
        Ok(report) => {
            if details {
                print!("{}", report.details());
            } else {
                println!("{}", report.summary());
                if report.anomaly_count > 0 {
                    eprint!("{}", report.details());
                }
            }
            exit_for(report.valid)
        }
        Err(e) => {
            eprintln!("raftcache-jepsen check: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn test(t: TestArgs) -> ExitCode {
    match build_options(t) {
        Ok(opts) => run_test(&opts),
        Err(e) => {
            eprintln!("raftcache-jepsen test: {e}");
            ExitCode::from(2)
        }
    }
}

fn build_options(t: TestArgs) -> Result<RunOptions, String> {
    let cdc = t.workload == Workload::Cdc;
    if !["none", "snapshot", "durable"].contains(&t.persistence.as_str()) {
        return Err(format!(
            "--persistence {:?}: expected none, snapshot or durable",
            t.persistence
        ));
    }
    let faults = parse_faults(&t.nemesis, cdc, t.persistence == "durable")?;
    if faults.contains(&Fault::FreshRestart) {
        // A fresh restart empties the cluster by design: only the register checker
        // scopes for it (per era, plus the no-old-cluster-values rule).
        if t.workload != Workload::Register || t.persistence != "none" || t.nodes < 2 {
            return Err(
                "nemesis fresh-restart needs --workload register, --persistence none and \
                 at least 2 nodes"
                    .into(),
            );
        }
    }
    if t.nodes == 0 || t.nodes > 9 {
        return Err(format!("--nodes {} is outside 1..=9", t.nodes));
    }
    if t.concurrency == 0 || t.keys == 0 {
        return Err("--concurrency and --keys must be at least 1".into());
    }
    if t.rate.is_nan() || t.rate <= 0.0 {
        return Err("--rate must be above 0".into());
    }
    let seed = t.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let out = t.out.unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(format!("jepsen-runs/{}-{secs}", t.workload.name()))
    });
    let node_bin = existing(t.node_bin, &["raftcache-node", "test-node"], "node")?;
    let cdc_bin = if cdc {
        existing(t.cdc_bin, &["raftcache-cdc", "test-cdc"], "cdc")?
    } else {
        t.cdc_bin.unwrap_or_default()
    };
    Ok(RunOptions {
        workload: t.workload,
        faults,
        nodes: t.nodes,
        partitions: t.partitions,
        replicas: t.replicas,
        time_limit: t.time_limit,
        concurrency: t.concurrency,
        rate: t.rate,
        keys: t.keys,
        seed,
        out,
        node_bin,
        cdc_bin,
        check_time_limit: t.check_time_limit,
        follower_reads: t.follower_reads,
        persistence: (t.persistence != "none").then_some(t.persistence),
    })
}

/// Time a run may take beyond its workload and check: start-up, recovery after the
/// nemesis and the final reads (each of those steps is bounded on its own well below).
const WATCHDOG_SLACK: Duration = Duration::from_secs(300);

fn run_test(opts: &RunOptions) -> ExitCode {
    eprintln!(
        "raftcache-jepsen: seed {} (rerun with --seed {})",
        opts.seed, opts.seed
    );
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raftcache-jepsen: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // Ctrl-C drops the run, whose guards kill the nodes, the worker and Postgres.
    // A watchdog bounds the whole run (start-up, workload, recovery, final reads,
    // check), so a stuck step ends as a harness error that names the run folder
    // instead of a silent hang. Dropping the run kills its processes.
    let bound = opts.time_limit + opts.check_time_limit + WATCHDOG_SLACK;
    let outcome = rt.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(bound, run(opts)) => r.unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the run did not finish within {bound:?}; the nemesis log, node logs and \
                     history so far are in {}",
                    opts.out.display()
                ))
            }),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // A blocking step left behind by the watchdog must not hold the exit.
    rt.shutdown_timeout(Duration::from_secs(10));
    match outcome {
        Ok(result) => {
            println!("{}", result.report.summary());
            if result.report.valid != Validity::Valid {
                eprint!("{}", result.report.details());
            }
            let faults: Vec<String> = result
                .faults
                .iter()
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            let faults = if faults.is_empty() {
                "none".to_owned()
            } else {
                faults.join(", ")
            };
            eprintln!("raftcache-jepsen: faults injected: {faults}");
            eprintln!(
                "raftcache-jepsen: history {}, report {}",
                result.history.display(),
                opts.out.join("report.txt").display()
            );
            exit_for(result.report.valid)
        }
        Err(e) => {
            eprintln!("raftcache-jepsen: the run failed: {e:#}");
            ExitCode::from(2)
        }
    }
}
