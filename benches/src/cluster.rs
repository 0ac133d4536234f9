//! Local clusters of `raftcache-node` processes for the replication benchmarks.
//!
//! Every node is a child process owned by a [`NodeProc`]; dropping it (also while a
//! panic unwinds) sends SIGKILL, so no benchmark leaves nodes behind. A node's stdout
//! (its JSON ready line) and stderr (its log) go to files in the cluster's temporary
//! directory, so no pipe can fill up and block it.

use anyhow::{bail, ensure, Context};
use raftcache_client::{Client, ClientConfig, ClusterStatus};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How long a node may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a cluster may take to settle (leaders, voters, no learners).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the ready line and the cluster status are polled.
const POLL: Duration = Duration::from_millis(50);
/// How long a node may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One running `raftcache-node` child. Dropping it kills the process (SIGKILL).
pub struct NodeProc {
    /// The node id it announced.
    pub id: u64,
    /// Its process id.
    pub pid: u32,
    /// Its gRPC address.
    pub grpc: String,
    /// Its metrics address.
    pub metrics: String,
    /// Its data directory (also holds `stdout` and `stderr.log`).
    pub dir: PathBuf,
    child: Child,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        // An error means that the process has already exited.
        let _ = self.child.start_kill();
        let _ = self.child.try_wait();
    }
}

impl NodeProc {
    /// Starts `binary` with `args` plus `--data-dir dir`, and waits for its ready line.
    ///
    /// # Errors
    /// When the process cannot start, exits, or prints no ready line within
    /// [`READY_TIMEOUT`].
    pub async fn start(binary: &Path, dir: &Path, args: &[OsString]) -> anyhow::Result<NodeProc> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stdout_path = dir.join("stdout");
        let stdout = std::fs::File::create(&stdout_path)
            .with_context(|| format!("creating {}", stdout_path.display()))?;
        let stderr = std::fs::File::create(dir.join("stderr.log")).context("creating log")?;
        let child = Command::new(binary)
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id().context("the node has no pid")?;
        let mut node = NodeProc {
            id: 0,
            pid,
            grpc: String::new(),
            metrics: String::new(),
            dir: dir.to_owned(),
            child,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&stdout_path).unwrap_or_default();
            if let Some(ready) = text.lines().find_map(parse_ready) {
                (node.id, node.grpc, node.metrics) = ready;
                return Ok(node);
            }
            if let Some(status) = node.child.try_wait().context("checking on a node")? {
                bail!(
                    "node in {} exited before it was ready ({status}); log tail:\n{}",
                    dir.display(),
                    node.log_tail(20)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "node in {} printed no ready line within {READY_TIMEOUT:?}; log tail:\n{}",
                    dir.display(),
                    node.log_tail(20)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last `n` lines of the node's stderr log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Sends SIGKILL and reaps the process (at most 5 s).
    ///
    /// # Errors
    /// When the process cannot be signalled or does not go away.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.send_kill()?;
        self.reap().await
    }

    /// Sends SIGKILL without waiting; returns the instant just before the signal.
    ///
    /// # Errors
    /// When the process cannot be signalled.
    pub fn send_kill(&mut self) -> anyhow::Result<Instant> {
        let at = Instant::now();
        self.child.start_kill().context("SIGKILL")?;
        Ok(at)
    }

    /// Waits (at most 5 s) for the process to exit after [`NodeProc::send_kill`].
    ///
    /// # Errors
    /// When the process does not go away.
    pub async fn reap(&mut self) -> anyhow::Result<()> {
        tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .context("the node survived SIGKILL for 5 s")?
            .context("reaping the node")?;
        Ok(())
    }

    /// Sends SIGTERM, waits up to 10 s for the exit, then SIGKILL.
    pub async fn stop(&mut self) {
        if send_sigterm(self.pid).is_ok()
            && tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
                .await
                .is_ok()
        {
            return;
        }
        eprintln!(
            "node {} did not stop within {STOP_TIMEOUT:?}; killing it",
            self.id
        );
        let _ = self.kill9().await;
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

/// `(node, grpc, metrics)` of a ready line.
fn parse_ready(line: &str) -> Option<(u64, String, String)> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    if v.get("event")?.as_str()? != "ready" {
        return None;
    }
    let node = v.get("node")?.as_u64().filter(|&n| n != 0)?;
    let grpc = v.get("grpc")?.as_str()?.to_owned();
    let metrics = v.get("metrics")?.as_str()?.to_owned();
    Some((node, grpc, metrics))
}

/// Sends SIGTERM to the child `pid`.
#[allow(unsafe_code)]
fn send_sigterm(pid: u32) -> std::io::Result<()> {
    // Zero or a negative pid would signal a process group, never one child.
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a child pid"))?;
    // SAFETY: kill(2) only takes integers and touches no memory of this process.
    if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Clock ticks per second, `sysconf(_SC_CLK_TCK)`.
#[allow(unsafe_code)]
pub fn clock_ticks_per_second() -> anyhow::Result<u64> {
    // SAFETY: sysconf(3) only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks)
        .ok()
        .filter(|&t| t > 0)
        .context("sysconf(_SC_CLK_TCK) failed")
}

/// utime + stime of process `pid` in clock ticks, from `/proc/<pid>/stat`.
///
/// # Errors
/// When the file cannot be read or parsed.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces; the fields
    // after the last ')' start with field 3 (state), so utime (14) is at index 11.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("malformed {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path} has no field {}", i + 3))?
            .parse::<u64>()
            .with_context(|| format!("field {} of {path}", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// A local cluster: the node binary, a temporary directory and the live nodes.
pub struct Cluster {
    binary: PathBuf,
    dir: tempfile::TempDir,
    /// Partition count P.
    pub partitions: u32,
    /// Replication factor R.
    pub replicas: u32,
    /// The live nodes (killed ones are removed from here).
    pub nodes: Vec<NodeProc>,
    started: u32,
    /// Flags every node of this cluster gets (e.g. `--persistence durable`).
    extra: Vec<OsString>,
}

impl Cluster {
    /// Starts `count` nodes: the first founds the cluster with `partitions` and
    /// `replicas`, each other joins through the first; then waits until it settles.
    ///
    /// # Errors
    /// When a node fails to start or the cluster does not settle in time.
    pub async fn start(
        binary: &Path,
        count: u32,
        partitions: u32,
        replicas: u32,
    ) -> anyhow::Result<Cluster> {
        Self::start_with(binary, count, partitions, replicas, &[]).await
    }

    /// [`Cluster::start`] with `extra` flags given to every node (also to nodes that
    /// [`Cluster::join`] later), e.g. `--persistence durable`.
    ///
    /// # Errors
    /// When a node fails to start or the cluster does not settle in time.
    pub async fn start_with(
        binary: &Path,
        count: u32,
        partitions: u32,
        replicas: u32,
        extra: &[OsString],
    ) -> anyhow::Result<Cluster> {
        ensure!(count >= 1, "a cluster needs a node");
        let dir = tempfile::Builder::new()
            .prefix("raftcache-bench-")
            .tempdir()
            .context("creating a temporary directory")?;
        let mut cluster = Cluster {
            binary: binary.to_owned(),
            dir,
            partitions,
            replicas,
            nodes: Vec::new(),
            started: 0,
            extra: extra.to_vec(),
        };
        let mut founder = addr_args("127.0.0.1:0");
        founder.extend([
            "--partitions".into(),
            partitions.to_string().into(),
            "--replicas".into(),
            replicas.to_string().into(),
        ]);
        cluster.spawn(&founder).await?;
        for _ in 1..count {
            let seed = cluster.nodes[0].grpc.clone();
            let mut args = addr_args("127.0.0.1:0");
            args.extend(["--join".into(), seed.into()]);
            cluster.spawn(&args).await?;
        }
        cluster.wait_settled(SETTLE_TIMEOUT).await?;
        Ok(cluster)
    }

    async fn spawn(&mut self, args: &[OsString]) -> anyhow::Result<&NodeProc> {
        self.started += 1;
        let dir = self.dir.path().join(format!("node-{}", self.started));
        let mut args = args.to_vec();
        args.extend(self.extra.iter().cloned());
        let node = NodeProc::start(&self.binary, &dir, &args).await?;
        self.nodes.push(node);
        self.nodes.last().context("the node was just pushed")
    }

    /// Starts a node that joins through `seed` and listens on `grpc_addr` (the address
    /// of a dead node lets the cluster drop the dead incarnation at once).
    ///
    /// # Errors
    /// When the node fails to start.
    pub async fn join(&mut self, grpc_addr: &str, seed: &str) -> anyhow::Result<u64> {
        let mut args = addr_args(grpc_addr);
        args.extend(["--join".into(), seed.into()]);
        Ok(self.spawn(&args).await?.id)
    }

    /// The gRPC addresses of the live nodes.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.grpc.clone()).collect()
    }

    /// A client over all live nodes with `adjust` applied to the default config.
    ///
    /// # Errors
    /// When no node answers.
    pub async fn client(&self, adjust: impl FnOnce(&mut ClientConfig)) -> anyhow::Result<Client> {
        let mut config = ClientConfig::new(self.endpoints());
        adjust(&mut config);
        Client::connect(config)
            .await
            .context("connecting a client to the cluster")
    }

    /// What keeps the cluster from being settled, or `None` when every partition has
    /// a live leader, R voters (all live nodes) and no learners, and the node list is
    /// exactly the live nodes.
    pub fn unsettled(&self, status: &ClusterStatus) -> Option<String> {
        let live: BTreeSet<u64> = self.nodes.iter().map(|n| n.id).collect();
        let listed: BTreeSet<u64> = status.nodes.iter().map(|n| n.id).collect();
        if listed != live {
            return Some(format!("nodes listed {listed:?}, live {live:?}"));
        }
        if status.partitions.len() != self.partitions as usize {
            return Some(format!(
                "{} of {} partitions listed",
                status.partitions.len(),
                self.partitions
            ));
        }
        let voters = self
            .replicas
            .min(u32::try_from(live.len()).unwrap_or(u32::MAX)) as usize;
        let bad = status
            .partitions
            .iter()
            .filter(|p| {
                !(p.leader.is_some_and(|l| live.contains(&l))
                    && p.replicas.len() == voters
                    && p.replicas.iter().all(|r| live.contains(r))
                    && p.learners.is_empty())
            })
            .count();
        (bad > 0).then(|| {
            format!(
                "{bad} of {} partitions lack a live leader, {voters} live voters or have learners",
                self.partitions
            )
        })
    }

    /// Waits until [`Cluster::unsettled`] says `None`, at most `timeout`.
    ///
    /// # Errors
    /// When a node exits or time runs out.
    pub async fn wait_settled(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut last = "no status yet".to_owned();
        let mut client: Option<Client> = None;
        loop {
            for node in &mut self.nodes {
                ensure!(
                    !node.exited(),
                    "node {} exited while the cluster was settling; log tail:\n{}",
                    node.id,
                    node.log_tail(20)
                );
            }
            if client.is_none() {
                match self
                    .client(|c| {
                        c.request_timeout = Duration::from_secs(1);
                        c.request_deadline = Duration::from_secs(2);
                    })
                    .await
                {
                    Ok(c) => client = Some(c),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            if let Some(c) = &client {
                match c.cluster_status().await {
                    Ok(status) => match self.unsettled(&status) {
                        None => return Ok(start.elapsed()),
                        Some(why) => last = why,
                    },
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                bail!("the cluster did not settle within {timeout:?}: {last}");
            }
            tokio::time::sleep(POLL * 4).await;
        }
    }

    /// Removes the node with `id` from the live set (the caller kills it).
    ///
    /// # Errors
    /// When there is no such live node.
    pub fn take(&mut self, id: u64) -> anyhow::Result<NodeProc> {
        let at = self
            .nodes
            .iter()
            .position(|n| n.id == id)
            .with_context(|| format!("no live node {id}"))?;
        Ok(self.nodes.remove(at))
    }

    /// Stops every node gracefully (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(mut self) {
        futures::future::join_all(self.nodes.iter_mut().map(NodeProc::stop)).await;
    }
}

fn addr_args(grpc: &str) -> Vec<OsString> {
    vec![
        "--grpc-addr".into(),
        grpc.into(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
    ]
}
