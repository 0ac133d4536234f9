//! Process tests of raftcache: spawn the real binaries on 127.0.0.1 and check them
//! from outside, through the real client library, the real CLI and raw gRPC.
//!
//! # Layout
//! - [`NodeProc`]: one `raftcache-node` child process on free ports, killed by its
//!   `Drop` guard even when the test panics; its log goes to a file that is printed
//!   when a test fails.
//! - [`run_cli`]: runs the `raftcache` CLI with a deadline.
//! - [`scrape_metrics`], [`rss_bytes`]: outside views of a node.
//!
//! `CARGO_BIN_EXE_<name>` only exists for a package's own binaries, so this crate has
//! two one-line binaries, `test-node` and `test-cli`, that call the node's and the
//! client's `cli::main()`; the [`bins!`] macro finds them from an integration test.
//!
//! ```text
//! raftcache-node (lib) ─► bin test-node ─┐
//! raftcache-client (lib) ─► bin test-cli ─┼─► tests/tests/*.rs (spawn, drive, check)
//! raftcache-client (lib) ─────────────────┘
//! ```

#![allow(clippy::unwrap_used)]

pub mod cdc;
pub mod jepsen;
pub mod pg;

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Paths of the binaries under test.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `raftcache-node` (as `test-node`).
    pub node: PathBuf,
    /// `raftcache` CLI (as `test-cli`).
    pub cli: PathBuf,
    /// `raftcache-cdc` (as `test-cdc`).
    pub cdc: PathBuf,
}

/// The binaries of this package, as seen from an integration test.
#[macro_export]
macro_rules! bins {
    () => {
        $crate::Bins {
            node: env!("CARGO_BIN_EXE_test-node").into(),
            cli: env!("CARGO_BIN_EXE_test-cli").into(),
            cdc: env!("CARGO_BIN_EXE_test-cdc").into(),
        }
    };
}

/// How long a child may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `raftcache-node` child. Dropping it kills the process (SIGKILL).
pub struct NodeProc {
    child: Option<Child>,
    /// The node's gRPC address.
    pub grpc: SocketAddr,
    /// The node's metrics address.
    pub metrics: SocketAddr,
    /// The node's RESP (Redis protocol) address, when started with `--resp-addr`.
    pub resp: Option<SocketAddr>,
    /// The process id.
    pub pid: u32,
    /// The node id from the ready line (0 for a standby node).
    pub node_id: u64,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl NodeProc {
    /// Starts a node on free loopback ports with `extra` flags and waits until it is
    /// ready.
    ///
    /// # Errors
    /// When the node exits or does not print its ready line within [`READY_TIMEOUT`]
    /// (the error includes the node's log).
    pub fn start(bins: &Bins, extra: &[&str]) -> Result<NodeProc> {
        Self::start_at(bins, "127.0.0.1:0", extra)
    }

    /// [`start`](Self::start) with the gRPC listener on `grpc` (e.g. the address of a
    /// node that was killed, to restart it in place).
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub fn start_at(bins: &Bins, grpc: &str, extra: &[&str]) -> Result<NodeProc> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        Self::spawn(bins, grpc, &data, dir, extra)
    }

    /// [`start_at`](Self::start_at) with a data directory the caller owns and keeps
    /// across restarts (persistence tests: stop the node, then start it again on the
    /// same `grpc` address and `data_dir`). The log still goes to a fresh temporary
    /// directory of this process, so each run has its own log.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub fn start_with_dir(
        bins: &Bins,
        grpc: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> Result<NodeProc> {
        Self::spawn(bins, grpc, data_dir, tempfile::tempdir()?, extra)
    }

    /// Spawns the node with its data in `data` and its log in `dir`, and waits for
    /// its ready line.
    fn spawn(
        bins: &Bins,
        grpc: &str,
        data: &Path,
        dir: tempfile::TempDir,
        extra: &[&str],
    ) -> Result<NodeProc> {
        let log = dir.path().join("node.log");
        let mut cmd = Command::new(&bins.node);
        cmd.args(["--grpc-addr", grpc, "--metrics-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info,openraft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {:?}", bins.node))?;
        let stdout = child.stdout.take().context("no stdout")?;
        match wait_ready_line(stdout, READY_TIMEOUT) {
            Ok(v) => {
                let addr = |k: &str| -> Result<SocketAddr> {
                    v[k].as_str()
                        .with_context(|| format!("ready line lacks {k}: {v}"))?
                        .parse()
                        .with_context(|| format!("bad {k} in {v}"))
                };
                Ok(NodeProc {
                    node_id: v["node"].as_u64().unwrap_or(0),
                    grpc: addr("grpc")?,
                    metrics: addr("metrics")?,
                    resp: match v.get("resp") {
                        Some(_) => Some(addr("resp")?),
                        None => None,
                    },
                    pid: child.id(),
                    child: Some(child),
                    log,
                    _dir: dir,
                })
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "node did not become ready: {e:#}\n--- node log ---\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            }
        }
    }

    /// The endpoint string clients use.
    pub fn endpoint(&self) -> String {
        self.grpc.to_string()
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill9(&mut self) {
        kill_reap(&mut self.child);
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit.
    ///
    /// # Errors
    /// When it does not exit in time (it is then killed).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("already stopped")?;
        signal(child.id(), libc::SIGTERM);
        let status = wait_with_deadline(child, timeout);
        self.child = None;
        status
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        kill_reap(&mut self.child);
        if std::thread::panicking() {
            print_log_tail(&format!("node {}", self.pid), &self.log());
        }
    }
}

/// Prints the last lines of a child's log to stderr (for a failing test):
/// `RAFTCACHE_TEST_LOG_LINES` of them, 40 by default.
pub fn print_log_tail(what: &str, log: &str) {
    let lines = std::env::var("RAFTCACHE_TEST_LOG_LINES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(40);
    let tail: Vec<&str> = log.lines().rev().take(lines).collect();
    eprintln!("--- last lines of {what} log ---");
    for l in tail.iter().rev() {
        eprintln!("{l}");
    }
}

/// A free loopback address (bound and released; the race is acceptable for tests).
///
/// # Errors
/// When no port can be bound.
pub fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .context("binding a free port")?
        .local_addr()?)
}

/// SIGKILLs and reaps the child in `slot`, if any (an error means it already exited).
pub fn kill_reap(slot: &mut Option<Child>) {
    if let Some(mut child) = slot.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of this process.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Makes a child started from `cmd` get SIGKILL when the thread that spawned it
/// dies (Linux `PR_SET_PDEATHSIG`), so a harness killed with SIGKILL does not leave
/// its nodes running. A no-op off Linux.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs between fork and exec and only calls prctl(2),
        // which is async-signal-safe and touches no memory of the parent.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Whether a process with this pid exists (and is not a zombie we could reap).
pub fn process_alive(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    !status.is_empty() && !status.contains("State:\tZ")
}

/// Waits for `child` to exit, killing it when `timeout` passes first.
///
/// # Errors
/// When the deadline passes.
pub fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads lines from `out` until one is a JSON object with `"event":"ready"` (as the
/// node prints) or a `"grpc"` field (as `raftcache dev` prints); other lines are skipped.
/// The reader thread keeps draining the pipe afterwards so the child never blocks.
///
/// # Errors
/// On EOF or timeout.
pub fn wait_ready_line(
    out: impl Read + Send + 'static,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if sent {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v.get("event").and_then(|e| e.as_str()) == Some("ready") {
                    sent = true;
                    let _ = tx.send(v);
                }
            }
        }
    });
    rx.recv_timeout(timeout)
        .map_err(|_| anyhow::anyhow!("no ready line within {timeout:?} (or the process exited)"))
}

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured, killing it
/// after `timeout`. Both pipes are drained while it runs: a child that writes more
/// than a pipe holds (a long Jepsen report on stderr) must not block on the write and
/// be taken for a hang.
///
/// # Errors
/// When it cannot be started or overruns its deadline.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_with_deadline(&mut child, timeout)?;
    // A grandchild that inherited a pipe could keep it open: the output is what came
    // before the child exited, at most a moment later.
    let join = |h: std::thread::JoinHandle<Vec<u8>>| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !h.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if h.is_finished() {
            h.join().unwrap_or_default()
        } else {
            b"(output still open 5 s after exit; not collected)".to_vec()
        }
    };
    Ok(Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    })
}

/// Reads `pipe` to its end on a thread of its own.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Runs the CLI with `args` against `endpoint`, killing it after `timeout`.
///
/// # Errors
/// When it cannot be started or overruns its deadline.
pub fn run_cli(bins: &Bins, endpoint: &str, args: &[&str], timeout: Duration) -> Result<Output> {
    output_within(
        Command::new(&bins.cli)
            .arg("--endpoints")
            .arg(endpoint)
            .args(args),
        timeout,
    )
}

/// Fetches `http://addr/metrics` with a plain HTTP/1.0 request.
///
/// # Errors
/// On connection errors or a non-200 answer.
pub fn scrape_metrics(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    if !body.starts_with("HTTP/1.0 200") && !body.starts_with("HTTP/1.1 200") {
        bail!("metrics answered: {}", body.lines().next().unwrap_or(""));
    }
    Ok(body)
}

/// The value of an unlabelled metric line `name value` in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Resident set size of a process, from /proc.
///
/// # Errors
/// When /proc has no such process.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// A fresh multi-threaded runtime for a test that drives the async client.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a test runtime")
}

/// A cluster of node processes on loopback: node 1 founds it, the others join through it.
pub struct Cluster {
    /// The nodes, in start order (restarted nodes are appended).
    pub nodes: Vec<NodeProc>,
}

impl Cluster {
    /// Starts `n` nodes with `extra` flags (`--partitions`/`--replicas` go to the first).
    ///
    /// # Errors
    /// When a node does not become ready.
    pub fn start(bins: &Bins, n: usize, extra: &[&str]) -> Result<Cluster> {
        let first = NodeProc::start(bins, extra)?;
        let seed = first.endpoint();
        let mut nodes = vec![first];
        for _ in 1..n {
            nodes.push(Self::join(bins, &seed, extra)?);
        }
        Ok(Cluster { nodes })
    }

    /// Starts one more node that joins through `seed`.
    ///
    /// # Errors
    /// When it does not become ready.
    pub fn join(bins: &Bins, seed: &str, extra: &[&str]) -> Result<NodeProc> {
        Self::join_at(bins, "127.0.0.1:0", seed, extra)
    }

    /// [`join`](Self::join) with the gRPC listener on `grpc`: a killed node restarted
    /// in place (same address, new incarnation, new node id).
    ///
    /// # Errors
    /// When it does not become ready.
    pub fn join_at(bins: &Bins, grpc: &str, seed: &str, extra: &[&str]) -> Result<NodeProc> {
        let mut args = vec!["--join", seed];
        args.extend(extra.iter().filter(|a| !a.starts_with("--partitions")));
        NodeProc::start_at(bins, grpc, &args)
    }

    /// Every node's endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(NodeProc::endpoint).collect()
    }

    /// The running node with this id.
    pub fn by_id(&mut self, id: u64) -> Option<&mut NodeProc> {
        self.nodes.iter_mut().find(|n| n.node_id == id)
    }
}

/// Polls the merged cluster status until `ok` holds for it, for at most `timeout`.
///
/// # Errors
/// On timeout, with the last status seen.
pub async fn wait_status(
    client: &raftcache_client::Client,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&raftcache_client::ClusterStatus) -> bool,
) -> Result<raftcache_client::ClusterStatus> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        match client.cluster_status().await {
            Ok(s) if ok(&s) => return Ok(s),
            Ok(s) => last = Some(format!("{s:?}")),
            Err(e) => last = Some(format!("error: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("cluster not {what} within {timeout:?}; last status: {last:?}")
}

/// A client of `endpoints`, once the cluster is [`settled`] (`partitions` partitions,
/// each with `voters` voters, no learner and a leader) within `timeout`.
///
/// # Errors
/// When the client cannot connect or the cluster does not settle in time.
pub async fn connect_settled(
    endpoints: Vec<String>,
    partitions: usize,
    voters: usize,
    timeout: Duration,
) -> Result<raftcache_client::Client> {
    let client =
        raftcache_client::Client::connect(raftcache_client::ClientConfig::new(endpoints)).await?;
    wait_status(&client, timeout, "settled", |s| {
        settled(s, partitions, voters)
    })
    .await?;
    Ok(client)
}

/// Whether every one of `partitions` partitions has a leader, exactly `voters` voters
/// and no learners.
pub fn settled(s: &raftcache_client::ClusterStatus, partitions: usize, voters: usize) -> bool {
    s.partitions.len() == partitions
        && s.partitions
            .iter()
            .all(|p| p.leader.is_some() && p.replicas.len() == voters && p.learners.is_empty())
}
