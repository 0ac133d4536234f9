//! Pieces of the CDC benchmark (`src/bin/cdc-bench.rs`): a `raftcache-cdc` child
//! process, an async scrape of its Prometheus endpoint, and `pgbench` runs.
//!
//! Every child is killed when its guard is dropped (also while a panic unwinds), and
//! every wait is bounded in time.

use anyhow::{bail, Context};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// How often the worker's stdout file is read while waiting for an event.
const POLL: Duration = Duration::from_millis(50);
/// How long one metrics scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

pub use raftcache_tests::free_addr;

/// One running `raftcache-cdc` child. Dropping it kills the process (SIGKILL).
pub struct CdcWorker {
    /// Its process id.
    pub pid: u32,
    /// Its Prometheus endpoint.
    pub metrics: SocketAddr,
    /// Holds `cdc.toml`, `stdout` (its JSON events) and `stderr.log` (its log).
    pub dir: PathBuf,
    child: Child,
}

impl Drop for CdcWorker {
    fn drop(&mut self) {
        // An error means that the process has already exited.
        let _ = self.child.start_kill();
        let _ = self.child.try_wait();
    }
}

impl CdcWorker {
    /// Writes `config_toml` to `dir/cdc.toml` and starts `binary --config` on it with
    /// `RUST_LOG=rust_log`; `metrics` must be the address the config listens on.
    ///
    /// # Errors
    /// When the files cannot be written or the process cannot start.
    pub fn start(
        binary: &Path,
        dir: &Path,
        config_toml: &str,
        metrics: SocketAddr,
        rust_log: &str,
    ) -> anyhow::Result<CdcWorker> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("cdc.toml");
        std::fs::write(&config, config_toml).context("writing the worker config")?;
        let stdout = std::fs::File::create(dir.join("stdout")).context("creating stdout")?;
        let stderr = std::fs::File::create(dir.join("stderr.log")).context("creating log")?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id().context("the worker has no pid")?;
        Ok(CdcWorker {
            pid,
            metrics,
            dir: dir.to_owned(),
            child,
        })
    }

    /// Waits until the worker prints `{"event":"<kind>",…}`, at most `timeout`.
    ///
    /// # Errors
    /// When the worker exits or time runs out (the message has the log's tail).
    pub async fn wait_event(
        &mut self,
        kind: &str,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default();
            let found = text.lines().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l.trim()).ok()?;
                (v.get("event")?.as_str()? == kind).then_some(v)
            });
            if let Some(v) = found {
                return Ok(v);
            }
            if let Some(status) = self.child.try_wait().context("checking on the worker")? {
                bail!(
                    "the CDC worker exited ({status}) before {kind:?}; log tail:\n{}",
                    self.log_tail(20)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the CDC worker printed no {kind:?} event within {timeout:?}; log tail:\n{}",
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `n` lines of the worker's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Sends SIGKILL and reaps the process (at most 5 s).
    ///
    /// # Errors
    /// When the process does not go away.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        let _ = self.child.start_kill();
        tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .context("the worker survived SIGKILL for 5 s")?
            .context("reaping the worker")?;
        Ok(())
    }

    /// The worker's metrics, scraped now.
    ///
    /// # Errors
    /// When the endpoint does not answer in time.
    pub async fn scrape(&self) -> anyhow::Result<Scrape> {
        scrape(self.metrics).await
    }
}

/// Clock ticks of the whole machine, all cores, from `/proc/stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineTicks {
    /// total − idle − iowait.
    pub busy: u64,
    /// Every state.
    pub total: u64,
    /// Taken by the hypervisor for other guests (a VM's noisy neighbours).
    pub steal: u64,
}

/// The machine's CPU ticks so far.
///
/// # Errors
/// When the file cannot be read or parsed.
pub fn machine_cpu_ticks() -> anyhow::Result<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().context("parsing /proc/stat"))
        .collect::<anyhow::Result<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice] (guest time is
    // already counted in user and nice).
    let total: u64 = fields.iter().take(8).sum();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    Ok(MachineTicks {
        busy: total.saturating_sub(field(3) + field(4)),
        total,
        steal: field(7),
    })
}

/// CPU ticks (utime + stime) and name of every process, from `/proc/<pid>/stat`: to tell
/// how much CPU *other* processes (e.g. a build) took during a measurement.
#[derive(Debug, Clone, Default)]
pub struct ProcessTicks {
    /// pid → (name, start time, utime + stime).
    at: HashMap<u32, (String, u64, u64)>,
}

impl ProcessTicks {
    /// Reads every process now (processes that vanish meanwhile are skipped).
    pub fn take() -> ProcessTicks {
        let mut at = HashMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return ProcessTicks { at };
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let name = stat[open + 1..close].to_owned();
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            // utime and stime are fields 14 and 15, starttime 22; `fields` starts at 3.
            if let (Some(u), Some(s), Some(start)) = (tick(11), tick(12), tick(19)) {
                at.insert(pid, (name, start, u + s));
            }
        }
        ProcessTicks { at }
    }

    /// Ticks used between `self` and the later `to` by processes whose name is not in
    /// `exclude`. A process is its pid and start time (names change: kernel workers, exec);
    /// one that started in between counts with all its ticks, one that ended in between
    /// is missed.
    pub fn others_until(&self, to: &ProcessTicks, exclude: &[&str]) -> u64 {
        to.at
            .iter()
            .filter(|(_, (name, _, _))| !exclude.contains(&name.as_str()))
            .map(|(pid, (_, start, ticks))| match self.at.get(pid) {
                Some((_, s, t)) if s == start => ticks.saturating_sub(*t),
                _ => *ticks,
            })
            .sum()
    }
}

/// One scrape of a Prometheus text endpoint.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// The response body.
    pub text: String,
}

impl Scrape {
    /// The value of the sample `name` with exactly the labels `labels` (the text between
    /// the braces, e.g. `quantile="0.99"`; empty for none).
    pub fn sample(&self, name: &str, labels: &str) -> Option<f64> {
        self.text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, ls) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.strip_suffix('}')?),
                    None => (series, ""),
                };
                (n == name && ls == labels)
                    .then(|| value.trim().parse().ok())
                    .flatten()
            })
    }

    /// An unlabelled sample; 0 when absent (a counter not yet incremented).
    pub fn value(&self, name: &str) -> f64 {
        self.sample(name, "").unwrap_or(0.0)
    }

    /// Quantile `q` (as the exporter prints it, e.g. `"0.99"`) of summary `name`.
    pub fn quantile(&self, name: &str, q: &str) -> Option<f64> {
        self.sample(name, &format!("quantile=\"{q}\""))
    }
}

/// Fetches `http://addr/metrics` (HTTP/1.0), at most [`SCRAPE_TIMEOUT`].
///
/// # Errors
/// On connection errors, a timeout or a non-200 answer.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        anyhow::Ok(body)
    };
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
        .await
        .with_context(|| format!("scraping {addr}: timed out"))?
        .with_context(|| format!("scraping {addr}"))?;
    if !body.starts_with("HTTP/1.0 200") && !body.starts_with("HTTP/1.1 200") {
        bail!(
            "{addr}/metrics answered: {}",
            body.lines().next().unwrap_or("")
        );
    }
    let text = body
        .split_once("\r\n\r\n")
        .map_or(body.as_str(), |(_, b)| b)
        .to_owned();
    Ok(Scrape { text })
}

/// What `pgbench` reported.
#[derive(Debug, Clone, Default)]
pub struct PgbenchReport {
    /// `number of transactions actually processed`.
    pub transactions: u64,
    /// `number of failed transactions` (0 when not printed).
    pub failed: u64,
    /// `tps = … (without initial connection time)`.
    pub tps: f64,
    /// `latency average = … ms`.
    pub latency_avg_ms: Option<f64>,
    /// How long the process ran (wall clock, from spawn to exit).
    pub wall: Duration,
}

/// Parses the summary `pgbench` prints on stdout.
///
/// # Errors
/// When the transaction count or the tps line is missing.
pub fn parse_pgbench(stdout: &str) -> anyhow::Result<PgbenchReport> {
    let mut r = PgbenchReport::default();
    let mut seen = (false, false);
    for line in stdout.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("number of transactions actually processed:") {
            // "12345" or "12345/20000" (with -t).
            let n = v.trim().split('/').next().unwrap_or("").trim();
            r.transactions = n.parse().with_context(|| format!("parsing {line:?}"))?;
            seen.0 = true;
        } else if let Some(v) = line.strip_prefix("number of failed transactions:") {
            let n = v.split_whitespace().next().unwrap_or("");
            r.failed = n.parse().with_context(|| format!("parsing {line:?}"))?;
        } else if let Some(v) = line.strip_prefix("tps = ") {
            let n = v.split_whitespace().next().unwrap_or("");
            r.tps = n.parse().with_context(|| format!("parsing {line:?}"))?;
            seen.1 = true;
        } else if let Some(v) = line.strip_prefix("latency average = ") {
            r.latency_avg_ms = v.split_whitespace().next().and_then(|n| n.parse().ok());
        }
    }
    if !(seen.0 && seen.1) {
        bail!("pgbench printed no transaction count or tps line:\n{stdout}");
    }
    Ok(r)
}

/// How to reach the database with `pgbench`.
#[derive(Debug, Clone)]
pub struct PgTarget {
    /// The directory holding `pgbench`.
    pub bindir: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// User name.
    pub user: String,
    /// Password (passed as `PGPASSWORD`).
    pub password: String,
    /// Database name.
    pub database: String,
}

/// Runs `pgbench -n -f script ARGS` against `target`; killed when it overruns `timeout`
/// (or when the future is dropped).
///
/// # Errors
/// When it cannot start, fails, overruns or prints no summary.
pub async fn pgbench(
    target: &PgTarget,
    script: &Path,
    args: &[String],
    timeout: Duration,
) -> anyhow::Result<PgbenchReport> {
    let started = Instant::now();
    let child = Command::new(target.bindir.join("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &target.port.to_string()])
        .args(["-U", &target.user, "-n", "-f"])
        .arg(script)
        .args(args)
        .arg(&target.database)
        .env("PGPASSWORD", &target.password)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting pgbench")?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .with_context(|| format!("pgbench ran longer than {timeout:?}"))?
        .context("waiting for pgbench")?;
    let wall = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "pgbench failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            out.status
        );
    }
    let mut report = parse_pgbench(&stdout).with_context(|| format!("stderr:\n{stderr}"))?;
    report.wall = wall;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_summary_is_parsed() {
        let out = "\
pgbench (15.10 (Debian 15.10-0+deb12u1))
transaction type: /tmp/x/script.sql
scaling factor: 1
query mode: simple
number of clients: 4
number of threads: 2
maximum number of tries: 1
duration: 10 s
number of transactions actually processed: 9987
number of failed transactions: 0 (0.000%)
latency average = 0.512 ms
latency stddev = 0.301 ms
rate limit schedule lag: avg 0.081 (max 4.113) ms
initial connection time = 12.345 ms
tps = 998.812345 (without initial connection time)
";
        let r = parse_pgbench(out).expect("parsed");
        assert_eq!(r.transactions, 9987);
        assert_eq!(r.failed, 0);
        assert!((r.tps - 998.812345).abs() < 1e-9);
        assert_eq!(r.latency_avg_ms, Some(0.512));
        assert!(parse_pgbench("pgbench: error: oops").is_err());
    }

    #[test]
    fn other_cpu_follows_processes_by_pid_and_start_time() {
        let before = ProcessTicks {
            at: HashMap::from([
                (10, ("kworker/0:1-events".to_owned(), 5, 1000)),
                (11, ("rustc".to_owned(), 7, 50)),
                (12, ("postgres".to_owned(), 8, 10)),
            ]),
        };
        let after = ProcessTicks {
            at: HashMap::from([
                // Renamed, same process: its delta.
                (10, ("kworker/0:1-mm_percpu_wq".to_owned(), 5, 1003)),
                // Pid reused by a new process: all of its ticks.
                (11, ("cc1".to_owned(), 90, 20)),
                // Ours.
                (12, ("postgres".to_owned(), 8, 500)),
                // New.
                (13, ("cargo".to_owned(), 95, 4)),
            ]),
        };
        assert_eq!(before.others_until(&after, &["postgres"]), 3 + 20 + 4);
        assert!(ProcessTicks::take().at.contains_key(&std::process::id()));
    }

    #[test]
    fn samples_are_found_by_name_and_labels() {
        let s = Scrape {
            text: "\
# TYPE raftcache_cdc_rows_total counter
raftcache_cdc_rows_total 1234
raftcache_cdc_commit_to_applied_seconds{quantile=\"0.5\"} 0.0021
raftcache_cdc_commit_to_applied_seconds{quantile=\"0.99\"} 0.0105
raftcache_cdc_commit_to_applied_seconds_sum 1.5
raftcache_cdc_commit_to_applied_seconds_count 600
"
            .to_owned(),
        };
        assert_eq!(s.value("raftcache_cdc_rows_total"), 1234.0);
        assert_eq!(s.value("raftcache_cdc_transactions_total"), 0.0);
        assert_eq!(
            s.quantile("raftcache_cdc_commit_to_applied_seconds", "0.99"),
            Some(0.0105)
        );
        assert_eq!(
            s.value("raftcache_cdc_commit_to_applied_seconds_count"),
            600.0
        );
        assert_eq!(
            s.quantile("raftcache_cdc_commit_to_applied_seconds", "1"),
            None
        );
    }
}
