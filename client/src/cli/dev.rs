//! `raftcache dev`: a local cluster of `raftcache-node` children in the foreground.
//!
//! Each node is started with its own ports and data directory and announces itself
//! with a JSON ready line on its stdout. Node 1 bootstraps the cluster (with
//! `--partitions` and `--replicas`); once it is ready the others start with `--join
//! <node 1>` and get their ids from the cluster. When every node is ready and every
//! partition has min(R, N) voting replicas and a leader, `dev` prints one line per
//! node, `{"node":1,"pid":…,"grpc":"…","metrics":"…","resp":"…"}` (RESP ports are the
//! gRPC ports + 200: `redis-cli -p 7201`), then `ready`. On SIGTERM or
//! ctrl-c it stops the nodes (SIGTERM, up to 10 s, then SIGKILL) and exits 0; if a
//! node dies on its own, it stops the others and exits 1.
//!
//! With `--persistence snapshot|durable`, every node writes to its `node-<i>` folder,
//! and running `dev` again on the same `--data-dir` (and ports) brings the same cluster
//! back with its data: each node finds its identity there and ignores found/join.

use crate::{Client, ClientConfig, ClusterStatus};
use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How long a node may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the cluster may take, after the last ready line, until every partition
/// has its replicas and a leader.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `dev` looks at the cluster while it settles.
const SETTLE_POLL: Duration = Duration::from_millis(200);
/// How long nodes may take to exit after SIGTERM before they get SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long reaping a node may take after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Offset of a node's metrics port from its gRPC port.
const METRICS_PORT_OFFSET: u32 = 100;
/// Offset of a node's RESP (Redis protocol) port from its gRPC port.
const RESP_PORT_OFFSET: u32 = 200;

/// What `raftcache dev` starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DevConfig {
    pub(crate) nodes: u32,
    /// gRPC port of node 1, or 0 for free ports everywhere.
    pub(crate) base_port: u16,
    pub(crate) data_dir: PathBuf,
    pub(crate) partitions: u32,
    /// Replicas per partition (the cluster places min(replicas, nodes)).
    pub(crate) replicas: u32,
    pub(crate) max_memory: Option<String>,
    pub(crate) eviction_policy: Option<String>,
    /// `none`, `snapshot` or `durable`, passed to every node.
    pub(crate) persistence: Option<String>,
}

/// A node's ready line, and the line `dev` prints for it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
struct Ready {
    node: u64,
    pid: u32,
    grpc: String,
    metrics: String,
    /// The RESP address (`redis-cli -p …`); older nodes had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resp: Option<String>,
}

/// A running node.
struct DevNode {
    /// The id the node announced; its 1-based start position until then.
    id: u64,
    child: Child,
}

/// Runs the cluster until a signal (exit 0) or the death of a node (exit 1).
///
/// # Errors
/// Bad arguments, no node binary, a node that fails to start, or a cluster that does
/// not settle in time.
pub(crate) async fn run(config: DevConfig) -> anyhow::Result<ExitCode> {
    ensure!(config.nodes >= 1, "--nodes must be at least 1");
    ensure!(config.replicas >= 1, "--replicas must be at least 1");
    ensure!(
        config.base_port != 0 || config.persistence.as_deref().is_none_or(|p| p == "none"),
        "--persistence needs fixed ports (a node's data directory belongs to its address): \
         use --base-port"
    );
    let binary = find_node_binary(
        std::env::var_os("RAFTCACHE_NODE_BIN"),
        &std::env::current_exe().context("cannot locate the raftcache executable")?,
    )?;
    let mut shutdown = Shutdown::install()?;
    let mut nodes = Vec::new();

    let started = tokio::select! {
        started = start_all(&config, &binary, &mut nodes) => started,
        () = shutdown.wait() => {
            stop(&mut nodes).await;
            return Ok(ExitCode::SUCCESS);
        }
    };
    if let Err(e) = started {
        stop(&mut nodes).await;
        return Err(e);
    }
    print_line("ready")?;

    let exited = tokio::select! {
        () = shutdown.wait() => None,
        exited = first_exit(&mut nodes) => Some(exited),
    };
    let code = match exited {
        None => ExitCode::SUCCESS,
        Some((id, status)) => {
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            eprintln!(
                "raftcache dev: node {id} exited unexpectedly ({status}); stopping the cluster"
            );
            ExitCode::from(1)
        }
    };
    stop(&mut nodes).await;
    Ok(code)
}

/// Starts the nodes one after the other, each once the previous one is ready (node
/// 1 bootstraps, the others join it), waits until the cluster has settled, then
/// prints each node's line. Started nodes are pushed to `nodes` at once, so that the
/// caller stops them whatever happens.
async fn start_all(
    config: &DevConfig,
    binary: &Path,
    nodes: &mut Vec<DevNode>,
) -> anyhow::Result<()> {
    let mut readies: Vec<Ready> = Vec::new();
    for index in 1..=config.nodes {
        let dir = config.data_dir.join(format!("node-{index}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let seed = readies.first().map(|r| r.grpc.as_str());
        let mut child = Command::new(binary)
            .args(node_args(config, index, seed)?)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take().context("node stdout is not piped")?;
        nodes.push(DevNode {
            id: u64::from(index),
            child,
        });
        let node = nodes.last_mut().context("the node was just pushed")?;
        let ready = tokio::time::timeout(READY_TIMEOUT, wait_ready(node, stdout))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "node #{index} printed no ready line within {}",
                    humantime::format_duration(READY_TIMEOUT)
                )
            })??;
        node.id = ready.node;
        readies.push(ready);
    }
    let voters = config.replicas.min(config.nodes);
    wait_settled(config, voters, &readies, nodes).await?;
    for ready in &readies {
        print_line(&serde_json::to_string(ready)?)?;
    }
    Ok(())
}

/// Waits until the merged cluster status lists every node and shows every partition
/// with `voters` voting replicas and a leader, for at most [`SETTLE_TIMEOUT`].
///
/// # Errors
/// When a node exits meanwhile, or time runs out (the error says what is missing).
async fn wait_settled(
    config: &DevConfig,
    voters: u32,
    readies: &[Ready],
    nodes: &mut [DevNode],
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    let client_config = ClientConfig {
        endpoints: readies.iter().map(|r| r.grpc.clone()).collect(),
        request_timeout: Duration::from_secs(2),
        request_deadline: Duration::from_secs(2),
        ..ClientConfig::default()
    };
    let mut client: Option<Client> = None;
    let mut last = "no node answered yet".to_owned();
    loop {
        for node in nodes.iter_mut() {
            if let Some(status) = node.child.try_wait().context("checking on a node")? {
                bail!(
                    "node {} exited ({status}) while the cluster was forming",
                    node.id
                );
            }
        }
        if client.is_none() {
            match Client::try_connect(client_config.clone()).await {
                Ok(c) => client = Some(c),
                Err(e) => last = e.to_string(),
            }
        }
        if let Some(client) = &client {
            match client.cluster_status().await {
                Ok(status) => match unsettled(&status, config, voters) {
                    None => return Ok(()),
                    Some(why) => last = why,
                },
                Err(e) => last = e.to_string(),
            }
        }
        if tokio::time::Instant::now() + SETTLE_POLL >= deadline {
            bail!(
                "the cluster did not settle within {}: {last}",
                humantime::format_duration(SETTLE_TIMEOUT)
            );
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// What the cluster still lacks, or `None` when it has settled.
fn unsettled(status: &ClusterStatus, config: &DevConfig, voters: u32) -> Option<String> {
    let active = status.nodes.iter().filter(|n| !n.is_draining()).count();
    if active != config.nodes as usize {
        return Some(format!("{active} of {} nodes are members", config.nodes));
    }
    if status.is_settled(config.partitions as usize, voters as usize) {
        return None;
    }
    let done = status
        .partitions
        .iter()
        .filter(|p| p.leader.is_some() && p.replicas.len() >= voters as usize)
        .count();
    Some(format!(
        "{done} of {} partitions have {voters} replicas and a leader",
        config.partitions
    ))
}

/// Reads `node`'s stdout until its ready line, then keeps draining it in the
/// background so that the node never blocks on a full pipe.
async fn wait_ready(node: &mut DevNode, stdout: ChildStdout) -> anyhow::Result<Ready> {
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let Some(line) = lines.next_line().await.context("reading node stdout")? else {
            let status = node.child.wait().await.context("waiting for the node")?;
            bail!("node #{} exited before it was ready ({status})", node.id);
        };
        if let Some(ready) = parse_ready(&line)? {
            ensure!(
                ready.node != 0,
                "node #{} announced itself without a node id",
                node.id
            );
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok(ready);
        }
    }
}

/// The ready line, if `line` is one. Lines that are not JSON, or JSON of another
/// event, are not; a ready event without its fields is an error.
fn parse_ready(line: &str) -> anyhow::Result<Option<Ready>> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(line.trim()) else {
        return Ok(None);
    };
    if value.get("event").and_then(serde_json::Value::as_str) != Some("ready") {
        return Ok(None);
    }
    let ready = serde_json::from_value(value)
        .with_context(|| format!("malformed ready line from a node: {line}"))?;
    Ok(Some(ready))
}

/// The command line of the node started `index`-th (1-based): the first bootstraps
/// the cluster, the others join it through `seed` (the first node's gRPC address).
fn node_args(config: &DevConfig, index: u32, seed: Option<&str>) -> anyhow::Result<Vec<OsString>> {
    let id = index;
    let port = |offset: u32| -> anyhow::Result<u16> {
        if config.base_port == 0 {
            return Ok(0);
        }
        let port = u32::from(config.base_port) + offset + id - 1;
        u16::try_from(port).with_context(|| {
            format!(
                "--base-port {} puts node {id} on port {port}",
                config.base_port
            )
        })
    };
    let mut args: Vec<OsString> = vec![
        "--grpc-addr".into(),
        format!("127.0.0.1:{}", port(0)?).into(),
        "--metrics-addr".into(),
        format!("127.0.0.1:{}", port(METRICS_PORT_OFFSET)?).into(),
        "--resp-addr".into(),
        format!("127.0.0.1:{}", port(RESP_PORT_OFFSET)?).into(),
        "--data-dir".into(),
        config.data_dir.join(format!("node-{id}")).into(),
    ];
    match seed {
        None => args.extend([
            "--partitions".into(),
            config.partitions.to_string().into(),
            "--replicas".into(),
            config.replicas.to_string().into(),
        ]),
        Some(seed) => args.extend(["--join".into(), seed.into()]),
    }
    if let Some(max_memory) = &config.max_memory {
        args.extend(["--max-memory".into(), max_memory.into()]);
    }
    if let Some(policy) = &config.eviction_policy {
        args.extend(["--eviction-policy".into(), policy.into()]);
    }
    if let Some(persistence) = &config.persistence {
        args.extend(["--persistence".into(), persistence.into()]);
    }
    Ok(args)
}

/// The node binary: `$RAFTCACHE_NODE_BIN`, else `raftcache-node` beside `exe`.
fn find_node_binary(from_env: Option<OsString>, exe: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = from_env.filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let beside = exe.with_file_name(format!("raftcache-node{}", std::env::consts::EXE_SUFFIX));
    if beside.is_file() {
        return Ok(beside);
    }
    bail!(
        "cannot find raftcache-node at {}: run `cargo build --release` (or set RAFTCACHE_NODE_BIN)",
        beside.display()
    )
}

/// Waits for the first node to exit on its own.
async fn first_exit(nodes: &mut [DevNode]) -> (u64, std::io::Result<ExitStatus>) {
    if nodes.is_empty() {
        return std::future::pending().await;
    }
    let waits = nodes
        .iter_mut()
        .map(|n| Box::pin(async move { (n.id, n.child.wait().await) }));
    futures::future::select_all(waits).await.0
}

/// Stops every node: SIGTERM, then SIGKILL for those still running after
/// [`STOP_TIMEOUT`].
async fn stop(nodes: &mut [DevNode]) {
    for node in nodes.iter() {
        if let Some(pid) = node.child.id() {
            if let Err(e) = send_signal(pid, libc::SIGTERM) {
                tracing::warn!(node = node.id, pid, error = %e, "cannot send SIGTERM");
            }
        }
    }
    let all_exited = async {
        for node in nodes.iter_mut() {
            let _ = node.child.wait().await;
        }
    };
    if tokio::time::timeout(STOP_TIMEOUT, all_exited).await.is_ok() {
        return;
    }
    for node in nodes.iter_mut() {
        eprintln!(
            "raftcache dev: node {} did not stop in time; killing it",
            node.id
        );
        // An error means the node has exited meanwhile.
        let _ = node.child.start_kill();
        if tokio::time::timeout(KILL_TIMEOUT, node.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(node = node.id, "node survived SIGKILL");
        }
    }
}

/// Sends `signal` to the process `pid`.
#[allow(unsafe_code)]
fn send_signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    // Zero or a negative pid would signal a process group, never one child.
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a child pid"))?;
    // SAFETY: kill(2) only takes integers and touches no memory of this process.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// SIGINT and SIGTERM, listened for from the start so that neither kills `dev`
/// before it can stop its nodes.
struct Shutdown {
    interrupt: Signal,
    terminate: Signal,
}

impl Shutdown {
    fn install() -> anyhow::Result<Shutdown> {
        Ok(Shutdown {
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Prints one line on stdout and flushes it, for whoever waits on it.
fn print_line(line: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(base_port: u16) -> DevConfig {
        DevConfig {
            nodes: 1,
            base_port,
            data_dir: PathBuf::from("/tmp/rc"),
            partitions: 16,
            replicas: 3,
            max_memory: None,
            eviction_policy: None,
            persistence: None,
        }
    }

    #[test]
    fn ready_lines_are_recognised() {
        let line = r#"{"event":"ready","node":1,"pid":123,"grpc":"127.0.0.1:7001","metrics":"127.0.0.1:7101","resp":"127.0.0.1:7201"}"#;
        let ready = parse_ready(line).unwrap().unwrap();
        assert_eq!(
            ready,
            Ready {
                node: 1,
                pid: 123,
                grpc: "127.0.0.1:7001".into(),
                metrics: "127.0.0.1:7101".into(),
                resp: Some("127.0.0.1:7201".into()),
            }
        );
        assert_eq!(
            serde_json::to_string(&ready).unwrap(),
            r#"{"node":1,"pid":123,"grpc":"127.0.0.1:7001","metrics":"127.0.0.1:7101","resp":"127.0.0.1:7201"}"#
        );
        // Other output is skipped.
        assert_eq!(parse_ready("starting up").unwrap(), None);
        assert_eq!(parse_ready("").unwrap(), None);
        assert_eq!(parse_ready(r#"{"event":"listening"}"#).unwrap(), None);
        assert_eq!(parse_ready("[1,2]").unwrap(), None);
        // A ready event without its fields is an error, not a silent wait.
        assert!(parse_ready(r#"{"event":"ready","node":1}"#).is_err());
    }

    #[test]
    fn node_ports_follow_the_base_port() {
        let args = node_args(&config(7001), 1, None).unwrap();
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "--grpc-addr",
                "127.0.0.1:7001",
                "--metrics-addr",
                "127.0.0.1:7101",
                "--resp-addr",
                "127.0.0.1:7201",
                "--data-dir",
                "/tmp/rc/node-1",
                "--partitions",
                "16",
                "--replicas",
                "3"
            ]
        );
        let third = node_args(&config(7001), 3, Some("127.0.0.1:7001")).unwrap();
        let third: Vec<&str> = third.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            third,
            [
                "--grpc-addr",
                "127.0.0.1:7003",
                "--metrics-addr",
                "127.0.0.1:7103",
                "--resp-addr",
                "127.0.0.1:7203",
                "--data-dir",
                "/tmp/rc/node-3",
                "--join",
                "127.0.0.1:7001"
            ]
        );

        let mut c = config(0);
        c.max_memory = Some("64MiB".into());
        c.eviction_policy = Some("allkeys-lru".into());
        let args = node_args(&c, 1, None).unwrap();
        assert!(args.contains(&"127.0.0.1:0".into()));
        assert!(!args.iter().any(|a| a.to_str().unwrap().ends_with(":100")));
        assert!(args.ends_with(&[
            "--max-memory".into(),
            "64MiB".into(),
            "--eviction-policy".into(),
            "allkeys-lru".into()
        ]));

        assert!(
            node_args(&config(65500), 1, None).is_err(),
            "metrics port past 65535"
        );
    }

    #[test]
    fn the_node_binary_comes_from_env_or_beside_the_cli() {
        let dir = std::env::temp_dir().join(format!("raftcache-dev-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("raftcache");
        let err = find_node_binary(None, &exe).unwrap_err().to_string();
        assert!(err.contains("cargo build --release"), "{err}");

        let node = dir.join(format!("raftcache-node{}", std::env::consts::EXE_SUFFIX));
        std::fs::write(&node, b"").unwrap();
        assert_eq!(find_node_binary(None, &exe).unwrap(), node);
        assert_eq!(
            find_node_binary(Some("/opt/node".into()), &exe).unwrap(),
            PathBuf::from("/opt/node")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn bad_counts_are_refused() {
        let mut c = config(7001);
        c.nodes = 0;
        let err = run(c).await.unwrap_err().to_string();
        assert!(err.contains("--nodes"), "{err}");
        let mut c = config(7001);
        c.replicas = 0;
        let err = run(c).await.unwrap_err().to_string();
        assert!(err.contains("--replicas"), "{err}");
    }

    #[test]
    fn settling_needs_every_node_and_every_partition_led() {
        use crate::{NodeInfo, PartitionStatus};
        let mut c = config(0);
        c.nodes = 2;
        c.partitions = 2;
        let node = |id: u64| NodeInfo {
            id,
            addr: format!("127.0.0.1:{id}"),
            state: "active".into(),
        };
        let partition = |id: u32, leader: Option<u64>, replicas: Vec<u64>| PartitionStatus {
            id,
            leader,
            replicas,
            learners: vec![],
            term: 1,
            applied: 1,
            cdc_lsn: Default::default(),
        };
        let mut status = ClusterStatus {
            epoch: 2,
            replication_factor: 2,
            nodes: vec![node(1)],
            partitions: vec![
                partition(0, Some(1), vec![1]),
                partition(1, Some(1), vec![1]),
            ],
            unreachable: vec![],
        };
        assert_eq!(
            unsettled(&status, &c, 2).as_deref(),
            Some("1 of 2 nodes are members")
        );
        status.nodes.push(node(2));
        assert_eq!(
            unsettled(&status, &c, 2).as_deref(),
            Some("0 of 2 partitions have 2 replicas and a leader")
        );
        status.partitions = vec![
            partition(0, Some(1), vec![1, 2]),
            partition(1, None, vec![2, 1]),
        ];
        assert_eq!(
            unsettled(&status, &c, 2).as_deref(),
            Some("1 of 2 partitions have 2 replicas and a leader")
        );
        status.partitions[1].leader = Some(2);
        assert_eq!(unsettled(&status, &c, 2), None);
    }

    #[tokio::test]
    async fn a_node_that_exits_early_is_reported_and_stop_reaps_sleepers() {
        let child = Command::new("sh")
            .args(["-c", "echo not json; echo '{\"event\":\"other\"}'; exit 3"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut node = DevNode { id: 1, child };
        let stdout = node.child.stdout.take().unwrap();
        let err = wait_ready(&mut node, stdout).await.unwrap_err().to_string();
        assert!(err.contains("exited before it was ready"), "{err}");

        let child = Command::new("sh")
            .args([
                "-c",
                r#"echo '{"event":"ready","node":0,"pid":1,"grpc":"g","metrics":"m"}'; exec sleep 30"#,
            ])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut node = DevNode { id: 2, child };
        let stdout = node.child.stdout.take().unwrap();
        let err = wait_ready(&mut node, stdout).await.unwrap_err().to_string();
        assert!(err.contains("without a node id"), "{err}");
        stop(std::slice::from_mut(&mut node)).await;

        let child = Command::new("sh")
            .args([
                "-c",
                r#"echo '{"event":"ready","node":1,"pid":1,"grpc":"g","metrics":"m"}'; exec sleep 30"#,
            ])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut nodes = vec![DevNode { id: 1, child }];
        let stdout = nodes[0].child.stdout.take().unwrap();
        let ready = wait_ready(&mut nodes[0], stdout).await.unwrap();
        assert_eq!(ready.grpc, "g");
        let started = std::time::Instant::now();
        stop(&mut nodes).await;
        assert!(
            started.elapsed() < STOP_TIMEOUT,
            "SIGTERM stopped the sleeper"
        );
        assert!(nodes[0].child.try_wait().unwrap().is_some());
    }
}
