//! Cluster control: N real `raftcache-node` processes on loopback whose peer links all
//! go through the harness's proxy ([`Net`]).
//!
//! Every node slot has a fixed gRPC address chosen before anything starts, and every
//! directed link (i → j) has its own proxy listener; node i is started with
//! `--peer-route addr(j)=link(i,j)` for every j, so its Raft, join and admin traffic to
//! j passes the proxy while clients talk to the nodes directly. Without persistence a
//! node that is killed comes back at the same address as a *new* node (`--join`, new
//! node id, a fresh data directory), as the node's docs require; with
//! `--persistence durable` it comes back as itself from its data directory, and every
//! node may be killed at once ([`JCluster::restart_all`]).
//!
//! Processes are `tokio::process::Child`ren with `kill_on_drop`, so dropping the
//! [`JCluster`] kills them all (SIGCONT first, in case one was paused). Each slot's
//! stderr is appended to `n<i>.log` in the run folder, one header line per incarnation.

use super::proxy::Net;
use crate::free_addr;
use anyhow::{bail, Context, Result};
use raftcache_client::{Client, ClientConfig, ClusterStatus};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a node may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a node slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Running and a cluster member.
    Up,
    /// Stopped with SIGSTOP.
    Paused,
    /// Killed (or not started); to be restarted.
    Down,
    /// Removed from the cluster by the member nemesis and stopped.
    Removed,
    /// Running, but a member of the old cluster that a fresh restart replaced
    /// ([`JCluster::fresh_restart`]): not counted as a member of the cluster under test.
    Stranded,
}

/// One node position: a fixed address, successive incarnations.
pub struct Slot {
    /// Index of the slot (0..n); the proxy's node number.
    pub index: usize,
    /// The gRPC address every incarnation listens on.
    pub addr: SocketAddr,
    /// The current incarnation's node id (0 when down).
    pub node_id: u64,
    /// The slot's state.
    pub state: SlotState,
    /// The current process id (0 when down).
    pub pid: u32,
    /// How many times it was started.
    pub incarnations: u32,
    /// Its data directory's generation: with persistence a restart reuses it (the node
    /// comes back from it), and it changes only when the slot left the cluster.
    data_gen: u32,
    child: Option<Child>,
}

/// Settings of the nodes.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The `raftcache-node` binary.
    pub bin: PathBuf,
    /// Partitions of the cluster.
    pub partitions: u32,
    /// Replicas per partition.
    pub replicas: u32,
    /// `--persistence` of every node (`None`: memory only, each incarnation in a fresh
    /// data directory). With persistence a killed slot restarts on the same directory.
    pub persistence: Option<String>,
}

/// The cluster under test.
pub struct JCluster {
    /// The node slots.
    pub slots: Vec<Slot>,
    /// The proxy every peer link goes through.
    pub net: Net,
    /// A client that talks to every slot directly.
    pub client: Client,
    routes: Vec<String>,
    dir: PathBuf,
    opts: NodeOptions,
}

impl JCluster {
    /// Starts `n` nodes (slot 0 founds the cluster, the others join it) with proxied
    /// peer links, logs in `dir`, and waits until the cluster is healthy.
    ///
    /// # Errors
    /// When a node does not start or the cluster does not settle.
    pub async fn start(n: usize, opts: NodeOptions, net: Net, dir: &Path) -> Result<JCluster> {
        if n == 0 {
            bail!("a cluster needs at least one node");
        }
        let addrs: Vec<SocketAddr> = (0..n).map(|_| free_addr()).collect::<Result<_>>()?;
        let mut routes = vec![String::new(); n];
        for (i, route) in routes.iter_mut().enumerate() {
            let mut pairs = Vec::new();
            for (j, addr) in addrs.iter().enumerate() {
                if i != j {
                    let via = net
                        .add_link(i, j, *addr)
                        .await
                        .with_context(|| format!("proxy link {i}->{j}"))?;
                    pairs.push(format!("{addr}={via}"));
                }
            }
            *route = pairs.join(",");
        }
        let mut slots: Vec<Slot> = addrs
            .iter()
            .enumerate()
            .map(|(index, &addr)| Slot {
                index,
                addr,
                node_id: 0,
                state: SlotState::Down,
                pid: 0,
                incarnations: 0,
                data_gen: 0,
                child: None,
            })
            .collect();
        let endpoints: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        spawn(&opts, dir, &mut slots[0], &routes[0], None).await?;
        let client = Client::connect(ClientConfig::new(endpoints))
            .await
            .context("connect a client to node 0")?;
        let mut cluster = JCluster {
            slots,
            net,
            client,
            routes,
            dir: dir.to_path_buf(),
            opts,
        };
        let seed = cluster.slots[0].addr.to_string();
        for i in 1..n {
            cluster.spawn(i, Some(&seed)).await?;
        }
        cluster
            .wait_healthy(Duration::from_secs(60))
            .await
            .context("the new cluster did not settle")?;
        Ok(cluster)
    }

    async fn spawn(&mut self, i: usize, join: Option<&str>) -> Result<()> {
        spawn(
            &self.opts,
            &self.dir,
            &mut self.slots[i],
            &self.routes[i],
            join,
        )
        .await
    }

    /// The address of a running, unpaused slot other than `except` to join through.
    fn seed(&self, except: usize) -> Option<String> {
        self.slots
            .iter()
            .find(|s| s.index != except && s.state == SlotState::Up)
            .map(|s| s.addr.to_string())
    }

    /// Sends SIGKILL to slot `i` without waiting (then [`kill`](Self::kill) reaps it);
    /// lets several nodes die at the same instant.
    pub fn signal_kill(&self, i: usize) {
        let slot = &self.slots[i];
        if slot.pid != 0 && slot.child.is_some() {
            super::super::signal(slot.pid, libc::SIGKILL);
        }
    }

    /// Kills slot `i` at once (SIGKILL) and reaps it.
    pub async fn kill(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if let Some(mut child) = slot.child.take() {
            if slot.state == SlotState::Paused {
                super::super::signal(slot.pid, libc::SIGCONT);
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        slot.state = SlotState::Down;
        slot.node_id = 0;
        slot.pid = 0;
    }

    /// Restarts a down (or removed) slot as a new node joining through a live member.
    ///
    /// # Errors
    /// When no member is up or the node does not start.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        if self.slots[i].state == SlotState::Up || self.slots[i].state == SlotState::Paused {
            return Ok(());
        }
        let seed = self.seed(i).context("no live member to join through")?;
        self.spawn(i, Some(&seed)).await
    }

    /// The `fresh-restart` fault (memory-only clusters): kills every node but slot
    /// `keep` (the old member, left running and marked [`SlotState::Stranded`]), then
    /// founds a brand-new cluster on the killed slots' addresses: fresh data
    /// directories, the first of them founding (no `--join`, a new cluster id), the
    /// others joining it. Returns a description for the nemesis log.
    ///
    /// # Errors
    /// With persistence, with fewer than two slots, or when a node does not start.
    pub async fn fresh_restart(&mut self, keep: usize) -> Result<String> {
        anyhow::ensure!(
            self.opts.persistence.is_none(),
            "fresh-restart needs memory-only nodes (no --persistence)"
        );
        let victims: Vec<usize> = (0..self.slots.len()).filter(|&i| i != keep).collect();
        let Some(&founder) = victims.first() else {
            bail!("fresh-restart needs at least two nodes");
        };
        for &i in &victims {
            self.signal_kill(i);
        }
        for &i in &victims {
            self.kill(i).await;
        }
        if self.slots[keep].state == SlotState::Paused {
            self.resume(keep);
        }
        self.slots[keep].state = SlotState::Stranded;
        // Memory-only: each incarnation gets a new data directory (`data-<n>`).
        self.spawn(founder, None).await?;
        let seed = self.slots[founder].addr.to_string();
        for &i in &victims[1..] {
            self.spawn(i, Some(&seed)).await?;
        }
        Ok(format!(
            "old member n{keep} (node {}) left running; new cluster founded by n{founder}: {}",
            self.slots[keep].node_id,
            self.describe()
        ))
    }

    /// Stops slot `i` with SIGSTOP.
    pub fn pause(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.state == SlotState::Up {
            super::super::signal(slot.pid, libc::SIGSTOP);
            slot.state = SlotState::Paused;
        }
    }

    /// Resumes slot `i` with SIGCONT.
    pub fn resume(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.state == SlotState::Paused {
            super::super::signal(slot.pid, libc::SIGCONT);
            slot.state = SlotState::Up;
        }
    }

    /// Marks slot `i` removed (after `remove-node`) and stops its process. Its data
    /// directory is left behind: the node it held is gone from the cluster.
    pub async fn retire(&mut self, i: usize) {
        self.kill(i).await;
        self.slots[i].state = SlotState::Removed;
        self.slots[i].data_gen += 1;
    }

    /// Whether nodes keep their Raft state across a kill (`--persistence durable`).
    pub fn durable(&self) -> bool {
        self.opts.persistence.as_deref() == Some("durable")
    }

    /// Restarts every down slot at once (after every node was killed): each comes
    /// back from its data directory, so no live member is needed.
    ///
    /// # Errors
    /// When persistence is off or a node does not start.
    pub async fn restart_all(&mut self) -> Result<()> {
        anyhow::ensure!(
            self.opts.persistence.is_some(),
            "restarting a cluster with no live member needs persistence"
        );
        // One after the other: a node restoring itself is ready at once, without its
        // peers. Join flags are ignored by such a node; name a peer anyway.
        for i in self.in_state(SlotState::Down) {
            let seed = self.slots[(i + 1) % self.slots.len()].addr.to_string();
            self.spawn(i, Some(&seed)).await?;
        }
        Ok(())
    }

    /// The slot whose current incarnation has node id `id`.
    pub fn slot_of(&self, id: u64) -> Option<usize> {
        self.slots
            .iter()
            .find(|s| s.node_id == id && id != 0 && s.state != SlotState::Stranded)
            .map(|s| s.index)
    }

    /// Partitions of the cluster.
    pub fn partitions(&self) -> u32 {
        self.opts.partitions
    }

    /// Every slot's address (clients may use them all).
    pub fn endpoints(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.addr.to_string()).collect()
    }

    /// Indexes of the slots in `state`.
    pub fn in_state(&self, state: SlotState) -> Vec<usize> {
        self.slots
            .iter()
            .filter(|s| s.state == state)
            .map(|s| s.index)
            .collect()
    }

    /// Sets the wall-clock offset of slot `i` through `Admin/InjectFault`.
    ///
    /// # Errors
    /// When the node does not answer.
    pub async fn set_clock_offset(&self, i: usize, offset_ms: i64) -> Result<()> {
        use raftcache_proto::v1::admin_client::AdminClient;
        let url = format!("http://{}", self.slots[i].addr);
        let channel = raftcache_proto::tonic::transport::Endpoint::from_shared(url)?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await?;
        AdminClient::new(channel)
            .inject_fault(raftcache_proto::v1::InjectFaultRequest {
                clock_offset_ms: offset_ms,
                drop_watch_events: 0,
            })
            .await?;
        Ok(())
    }

    /// Whether `s` shows a healthy cluster: the members are exactly the running
    /// slots' current incarnations, and every partition has a leader, min(R, members)
    /// voters, all on members, and no learners.
    pub fn is_healthy(&self, s: &ClusterStatus) -> bool {
        let live: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| s.state == SlotState::Up)
            .map(|s| s.node_id)
            .collect();
        let members: Vec<u64> = s.nodes.iter().map(|n| n.id).collect();
        let want = (self.opts.replicas as usize).min(live.len());
        members.len() == live.len()
            && members.iter().all(|m| live.contains(m))
            && s.partitions.len() == self.opts.partitions as usize
            && s.partitions.iter().all(|p| {
                p.leader.is_some_and(|l| live.contains(&l))
                    && p.replicas.len() == want
                    && p.replicas.iter().all(|r| live.contains(r))
                    && p.learners.is_empty()
            })
    }

    /// Waits until [`is_healthy`](Self::is_healthy) holds.
    ///
    /// # Errors
    /// On timeout, with the last status seen.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), self.client.cluster_status()).await {
                Ok(Ok(s)) if self.is_healthy(&s) => return Ok(()),
                Ok(Ok(s)) => last = summarize(&s),
                Ok(Err(e)) => last = format!("error: {e}"),
                Err(_) => last = "status timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("cluster not healthy within {timeout:?}; last: {last}")
    }

    /// The node id leading partition `p`, if any is known.
    pub async fn leader_of(&self, p: u32) -> Option<u64> {
        let s = tokio::time::timeout(Duration::from_secs(3), self.client.cluster_status())
            .await
            .ok()?
            .ok()?;
        s.partitions.iter().find(|x| x.id == p)?.leader
    }

    /// A short description of the slots, for the nemesis log.
    pub fn describe(&self) -> String {
        self.slots
            .iter()
            .map(|s| format!("n{}={:?}#{}", s.index, s.state, s.node_id))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Starts `slot` (founding when `join` is `None`) and waits for its ready line.
async fn spawn(
    opts: &NodeOptions,
    dir: &Path,
    slot: &mut Slot,
    route: &str,
    join: Option<&str>,
) -> Result<()> {
    let i = slot.index;
    let slot_dir = dir.join(format!("n{i}"));
    let generation = match opts.persistence {
        Some(_) => slot.data_gen,
        None => slot.incarnations,
    };
    let data = slot_dir.join(format!("data-{generation}"));
    std::fs::create_dir_all(&data)?;
    let log_path = dir.join(format!("n{i}.log"));
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    writeln!(
        log,
        "=== raftcache-jepsen: slot {i} incarnation {} (join {:?})",
        slot.incarnations, join
    )?;
    let addr = slot.addr.to_string();
    let mut std_cmd = std::process::Command::new(&opts.bin);
    // Nodes die with the harness even when it is killed with SIGKILL.
    crate::die_with_parent(&mut std_cmd);
    let mut cmd = Command::from(std_cmd);
    cmd.args(["--grpc-addr", &addr, "--metrics-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--fault-injection");
    if !route.is_empty() {
        cmd.args(["--peer-route", route]);
    }
    if let Some(mode) = &opts.persistence {
        cmd.args(["--persistence", mode]);
    }
    match join {
        Some(seed) => {
            cmd.args(["--join", seed]);
        }
        None => {
            cmd.args(["--partitions", &opts.partitions.to_string()]);
            cmd.args(["--replicas", &opts.replicas.to_string()]);
        }
    }
    cmd.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(log)
    .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawn {:?}", opts.bin))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(READY_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v.get("event").and_then(|e| e.as_str()) == Some("ready") {
                    return Ok::<_, std::io::Error>(Some(v));
                }
            }
        }
        Ok(None)
    })
    .await;
    let v = match ready {
        Ok(Ok(Some(v))) => v,
        other => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            bail!(
                "node slot {i} did not become ready ({other:?}); see {}",
                log_path.display()
            );
        }
    };
    // Keep draining stdout so the node never blocks on it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    slot.node_id = v["node"].as_u64().unwrap_or(0);
    slot.pid = child.id().unwrap_or(0);
    slot.child = Some(child);
    slot.state = SlotState::Up;
    slot.incarnations += 1;
    Ok(())
}

/// A one-line summary of a cluster status for error messages.
fn summarize(s: &ClusterStatus) -> String {
    let nodes: Vec<String> = s
        .nodes
        .iter()
        .map(|n| format!("{}@{}", n.id, n.addr))
        .collect();
    let bad: Vec<String> = s
        .partitions
        .iter()
        .filter(|p| p.leader.is_none() || !p.learners.is_empty())
        .map(|p| {
            format!(
                "p{} leader {:?} voters {:?} learners {:?}",
                p.id, p.leader, p.replicas, p.learners
            )
        })
        .take(4)
        .collect();
    format!("nodes [{}]; {}", nodes.join(" "), bad.join("; "))
}

impl Drop for JCluster {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            if slot.state == SlotState::Paused {
                super::super::signal(slot.pid, libc::SIGCONT);
            }
            if let Some(child) = slot.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}
