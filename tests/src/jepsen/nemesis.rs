//! Nemeses: the faults the harness injects, one at a time, on a random schedule.
//!
//! Schedule: pick a fault, hold it for a random 1–10 s, heal it, wait until the
//! cluster is healthy again (bounded), rest 0.5–2 s, repeat until the time limit; then
//! heal everything and wait for recovery. Faults never overlap, and `kill`/`member`
//! only start from a healthy cluster: nodes keep their data in memory, so two
//! overlapping kills could take a partition's majority with them for good (a
//! restarted node is a new, empty member), which is data loss by design, not a bug.
//!
//! | fault | start | heal |
//! |---|---|---|
//! | `partition` | one of: halves, one-way, isolate a leader, bridge (proxy blocks) | unblock |
//! | `net` | delay 50–300 ms ± 50 ms and 5–20 % loss on every link of one node | clear |
//! | `kill` | SIGKILL one node | restart it (a new node at the same address; with `--persistence durable` the same node, from its data directory) |
//! | `kill-all` | SIGKILL every node at once (only with `--persistence durable`) | restart them all from their data directories |
//! | `pause` | SIGSTOP one node | SIGCONT |
//! | `member` | move a partition's leadership, or drain and remove a node | re-add it, rebalance |
//! | `clock` | skew one node's wall clock by ±1–10 s (`Admin/InjectFault`) | reset it |
//! | `cdc-kill` | SIGKILL the CDC worker | restart it |
//! | `pg-restart` | stop PostgreSQL (fast) | start it |
//! | `fresh-restart` | SIGKILL every node but one (the old member, left running) and found a brand-new cluster (new id, empty) on their addresses (memory-only, register workload; only by name, not in `all`) | kill the old member and restart it joining the new cluster |
//!
//! A `fresh-restart` is also marked in the history (the checker needs it, from the
//! file alone): an operation `f: "fresh-restart"` of process [`NEMESIS_PROCESS`] on key
//! `""`, invoked when the kills start and completed as `info` when the new cluster is
//! up, with `value.ready_ns` = that time (see `check/fresh.rs`).
//!
//! Every start and heal is one JSON line in `nemesis.jsonl`, timed on the history's
//! clock.

use super::cluster::{JCluster, SlotState};
use super::history::{Extra, HistoryWriter, Outcome};
use super::partition::{self, Shape};
use anyhow::{bail, Result};
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Network partitions through the proxy.
    Partition,
    /// Delay and loss on one node's links.
    Net,
    /// SIGKILL and restart.
    Kill,
    /// SIGKILL of every node at once, and restart (durable persistence only).
    KillAll,
    /// SIGSTOP and SIGCONT.
    Pause,
    /// Leadership transfers, node removal and re-addition.
    Member,
    /// Wall-clock offsets.
    Clock,
    /// SIGKILL of the CDC worker.
    CdcKill,
    /// PostgreSQL stopped and started.
    PgRestart,
    /// Every node but one killed and a new cluster founded on their addresses beside
    /// the old member (memory-only register runs; never part of `all`).
    FreshRestart,
}

/// The process number of the nemesis's markers in the history (far above any
/// workload or final-read process).
pub const NEMESIS_PROCESS: u64 = 1 << 62;

impl Fault {
    /// Every fault, in the order `all` lists them.
    pub const ALL: [Fault; 10] = [
        Fault::Partition,
        Fault::Net,
        Fault::Kill,
        Fault::KillAll,
        Fault::Pause,
        Fault::Member,
        Fault::Clock,
        Fault::CdcKill,
        Fault::PgRestart,
        Fault::FreshRestart,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Partition => "partition",
            Fault::Net => "net",
            Fault::Kill => "kill",
            Fault::KillAll => "kill-all",
            Fault::Pause => "pause",
            Fault::Member => "member",
            Fault::Clock => "clock",
            Fault::CdcKill => "cdc-kill",
            Fault::PgRestart => "pg-restart",
            Fault::FreshRestart => "fresh-restart",
        }
    }

    /// Whether it needs the CDC workload's processes.
    pub fn needs_cdc(self) -> bool {
        matches!(self, Fault::CdcKill | Fault::PgRestart)
    }

    /// Whether it needs nodes that keep their Raft state (`--persistence durable`):
    /// without it, killing every node loses the data by design.
    pub fn needs_durable(self) -> bool {
        self == Fault::KillAll
    }

    /// Whether it must be named on its own (not part of `all`): a fresh restart
    /// empties the cluster by design, which only the register checker scopes for
    /// (per era), and it needs memory-only nodes.
    pub fn explicit_only(self) -> bool {
        self == Fault::FreshRestart
    }
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s.trim())
            .ok_or_else(|| {
                let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown nemesis {s:?} ({}, all, none)", names.join(", "))
            })
    }
}

/// Parses `--nemesis` (comma-separated; `all` = every fault that applies to the
/// workload and the persistence; `none` = no faults).
///
/// # Errors
/// On an unknown name, a CDC fault without the CDC workload, or `kill-all` without
/// durable persistence.
pub fn parse_faults(spec: &str, cdc: bool, durable: bool) -> Result<Vec<Fault>, String> {
    let mut faults = Vec::new();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        match part.trim() {
            "none" => {}
            "all" => faults.extend(Fault::ALL.into_iter().filter(|f| {
                (cdc || !f.needs_cdc()) && (durable || !f.needs_durable()) && !f.explicit_only()
            })),
            name => {
                let f: Fault = name.parse()?;
                if f.needs_cdc() && !cdc {
                    return Err(format!("nemesis {name} needs --workload cdc"));
                }
                if f.needs_durable() && !durable {
                    return Err(format!("nemesis {name} needs --persistence durable"));
                }
                faults.push(f);
            }
        }
    }
    faults.dedup();
    Ok(faults)
}

/// Hooks for faults outside the cache cluster (the CDC workload provides them).
pub trait External: Send {
    /// SIGKILLs the CDC worker.
    fn kill_cdc(&mut self) -> Result<()>;
    /// Starts the CDC worker again.
    fn start_cdc(&mut self) -> Result<()>;
    /// Stops PostgreSQL.
    fn stop_pg(&mut self) -> Result<()>;
    /// Starts PostgreSQL again.
    fn start_pg(&mut self) -> Result<()>;
}

/// Timing of the schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Shortest and longest fault.
    pub fault: (Duration, Duration),
    /// Shortest and longest rest between faults.
    pub rest: (Duration, Duration),
    /// How long to wait for recovery after each heal.
    pub recover: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            fault: (Duration::from_secs(1), Duration::from_secs(10)),
            rest: (Duration::from_millis(500), Duration::from_secs(2)),
            recover: Duration::from_secs(30),
        }
    }
}

/// What to undo.
enum Undo {
    Nothing,
    Unblock,
    Restart(usize),
    RestartAll,
    Resume(usize),
    Readd(usize),
    Rejoin(usize),
    Clock(usize),
    StartCdc,
    StartPg,
}

/// The nemesis log (`nemesis.jsonl`).
pub struct NemesisLog {
    out: Mutex<std::io::BufWriter<std::fs::File>>,
    start: Instant,
}

impl NemesisLog {
    /// A log at `path`, timed from `start` (the history's clock).
    ///
    /// # Errors
    /// When the file cannot be created.
    pub fn create(path: &Path, start: Instant) -> Result<NemesisLog> {
        Ok(NemesisLog {
            out: Mutex::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
            start,
        })
    }

    /// Appends one event (and echoes it on stderr).
    pub fn event(&self, event: &str, fault: &str, detail: &str) {
        let t = self.start.elapsed();
        let line = serde_json::json!({
            "time_ns": u64::try_from(t.as_nanos()).unwrap_or(u64::MAX),
            "event": event,
            "fault": fault,
            "detail": detail,
        });
        eprintln!(
            "[{:>7.2}s] nemesis {event} {fault}: {detail}",
            t.as_secs_f64()
        );
        let mut out = self
            .out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// The nemesis: owns the cluster while the run lasts.
pub struct Nemesis {
    faults: Vec<Fault>,
    schedule: Schedule,
    rng: SmallRng,
    log: Arc<NemesisLog>,
    external: Option<Box<dyn External>>,
    history: Option<Arc<HistoryWriter>>,
    /// Faults started (successfully), by name.
    pub counts: std::collections::BTreeMap<&'static str, u32>,
}

impl Nemesis {
    /// A nemesis injecting `faults`.
    pub fn new(
        faults: Vec<Fault>,
        schedule: Schedule,
        seed: u64,
        log: Arc<NemesisLog>,
        external: Option<Box<dyn External>>,
    ) -> Nemesis {
        Nemesis {
            faults,
            schedule,
            rng: SmallRng::seed_from_u64(seed),
            log,
            external,
            history: None,
            counts: Default::default(),
        }
    }

    /// Marks history-relevant faults (`fresh-restart`) in `h` too.
    #[must_use]
    pub fn with_history(mut self, h: Arc<HistoryWriter>) -> Nemesis {
        self.history = Some(h);
        self
    }

    fn pick(&mut self, (lo, hi): (Duration, Duration)) -> Duration {
        let (lo, hi) = (lo.as_millis() as u64, hi.as_millis() as u64);
        Duration::from_millis(self.rng.random_range(lo..=hi.max(lo)))
    }

    /// Runs the schedule until `until`, then heals everything and waits for recovery.
    /// The cluster is handed back afterwards.
    ///
    /// # Errors
    /// When the cluster does not recover at the end.
    pub async fn run(&mut self, cluster: &mut JCluster, until: Instant) -> Result<()> {
        let mut healthy = true;
        while !self.faults.is_empty() && Instant::now() < until {
            let fault = *self
                .faults
                .choose(&mut self.rng)
                .unwrap_or(&Fault::Partition);
            if matches!(
                fault,
                Fault::Kill | Fault::KillAll | Fault::Member | Fault::FreshRestart
            ) && !healthy
            {
                healthy = cluster.wait_healthy(self.schedule.recover).await.is_ok();
                continue;
            }
            let undo = match self.start(fault, cluster).await {
                Ok(undo) => {
                    *self.counts.entry(fault.name()).or_default() += 1;
                    undo
                }
                Err(e) => {
                    self.log.event("error", fault.name(), &format!("{e:#}"));
                    Undo::Nothing
                }
            };
            let hold = self.pick(self.schedule.fault);
            sleep_until_or(hold, until).await;
            if let Err(e) = self.heal(undo, cluster).await {
                self.log
                    .event("error", fault.name(), &format!("heal: {e:#}"));
            }
            healthy = match cluster.wait_healthy(self.schedule.recover).await {
                Ok(()) => true,
                Err(e) => {
                    self.log.event("unhealthy", fault.name(), &format!("{e:#}"));
                    false
                }
            };
            let rest = self.pick(self.schedule.rest);
            sleep_until_or(rest, until).await;
        }
        self.heal_all(cluster).await
    }

    async fn start(&mut self, fault: Fault, cluster: &mut JCluster) -> Result<Undo> {
        let up = cluster.in_state(SlotState::Up);
        let Some(&victim) = up.choose(&mut self.rng) else {
            bail!("no node is up");
        };
        let name = fault.name();
        Ok(match fault {
            Fault::Partition => {
                let nodes: Vec<usize> = (0..cluster.slots.len()).collect();
                let shape = match self.rng.random_range(0..4) {
                    0 => Shape::Halves,
                    1 => Shape::OneWay,
                    2 => Shape::Bridge,
                    _ => {
                        let p = self.rng.random_range(0..cluster_partitions(cluster));
                        let leader = cluster.leader_of(p).await.and_then(|l| cluster.slot_of(l));
                        Shape::IsolateNode(leader.unwrap_or(victim))
                    }
                };
                let cuts = partition::cuts(&shape, &nodes, &mut self.rng);
                cluster.net.block_all(&cuts);
                self.log.event(
                    "start",
                    name,
                    &format!("{shape:?}: {}", partition::describe(&cuts)),
                );
                Undo::Unblock
            }
            Fault::Net => {
                let delay = Duration::from_millis(self.rng.random_range(50..=300));
                let loss = self.rng.random_range(0.05..=0.2);
                for other in 0..cluster.slots.len() {
                    if other != victim {
                        for (a, b) in [(victim, other), (other, victim)] {
                            cluster
                                .net
                                .set_delay(a, b, delay, Duration::from_millis(50));
                            cluster.net.set_loss(a, b, loss);
                        }
                    }
                }
                self.log.event("start", name, &cluster.net.describe());
                Undo::Unblock
            }
            Fault::Kill => {
                let id = cluster.slots[victim].node_id;
                cluster.kill(victim).await;
                self.log
                    .event("start", name, &format!("SIGKILL n{victim} (node {id})"));
                Undo::Restart(victim)
            }
            Fault::KillAll => {
                let victims = cluster.in_state(SlotState::Up);
                for &i in &victims {
                    cluster.signal_kill(i);
                }
                for &i in &victims {
                    cluster.kill(i).await;
                }
                self.log.event(
                    "start",
                    name,
                    &format!("SIGKILL of all {} nodes at once", victims.len()),
                );
                Undo::RestartAll
            }
            Fault::Pause => {
                cluster.pause(victim);
                self.log.event("start", name, &format!("SIGSTOP n{victim}"));
                Undo::Resume(victim)
            }
            Fault::Member => {
                if self.rng.random_bool(0.5) || up.len() < 2 {
                    let p = self.rng.random_range(0..cluster_partitions(cluster));
                    let status = cluster.client.cluster_status().await?;
                    let part = status
                        .partitions
                        .iter()
                        .find(|x| x.id == p)
                        .ok_or_else(|| anyhow::anyhow!("no partition {p}"))?;
                    let others: Vec<u64> = part
                        .replicas
                        .iter()
                        .copied()
                        .filter(|r| Some(*r) != part.leader)
                        .collect();
                    let Some(&to) = others.choose(&mut self.rng) else {
                        bail!("partition {p} has no other voter");
                    };
                    cluster.client.transfer_leader(p, to).await?;
                    self.log.event(
                        "start",
                        name,
                        &format!("transfer leadership of p{p} to node {to}"),
                    );
                    Undo::Nothing
                } else {
                    let id = cluster.slots[victim].node_id;
                    cluster.client.remove_node(id).await?;
                    self.log
                        .event("start", name, &format!("remove n{victim} (node {id})"));
                    let deadline = Instant::now() + Duration::from_secs(30);
                    loop {
                        let gone = cluster
                            .client
                            .cluster_status()
                            .await
                            .is_ok_and(|s| s.nodes.iter().all(|n| n.id != id));
                        if gone {
                            break;
                        }
                        if Instant::now() > deadline {
                            self.log.event(
                                "note",
                                name,
                                &format!("node {id} not drained within 30 s; stopping it anyway"),
                            );
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    cluster.retire(victim).await;
                    Undo::Readd(victim)
                }
            }
            Fault::Clock => {
                let secs: i64 = self.rng.random_range(1..=10);
                let offset = if self.rng.random_bool(0.5) {
                    secs
                } else {
                    -secs
                } * 1000;
                cluster.set_clock_offset(victim, offset).await?;
                self.log
                    .event("start", name, &format!("n{victim} clock {offset:+} ms"));
                Undo::Clock(victim)
            }
            Fault::CdcKill => {
                self.external_do(|e| e.kill_cdc()).await?;
                self.log.event("start", name, "SIGKILL raftcache-cdc");
                Undo::StartCdc
            }
            Fault::PgRestart => {
                self.external_do(|e| e.stop_pg()).await?;
                self.log.event("start", name, "PostgreSQL stopped");
                Undo::StartPg
            }
            Fault::FreshRestart => {
                let old = format!("n{victim}");
                self.log.event(
                    "start",
                    name,
                    &format!("SIGKILL every node but {old}; founding a new cluster"),
                );
                let marker = self.history.as_ref().map(|h| {
                    let op = h.invoke(
                        NEMESIS_PROCESS,
                        name,
                        "",
                        serde_json::json!({ "old_member": old }),
                        Extra::default(),
                    );
                    (h.clone(), op)
                });
                let result = cluster.fresh_restart(victim).await;
                if let Some((h, op)) = marker {
                    let detail = match &result {
                        Ok(d) => d.clone(),
                        Err(e) => format!("new cluster not fully started: {e:#}"),
                    };
                    let value = serde_json::json!({
                        "old_member": old,
                        "ready_ns": h.elapsed_ns(),
                        "detail": detail,
                    });
                    h.complete(
                        op,
                        Outcome::Info,
                        value,
                        Extra::default().with_error("nemesis marker"),
                    );
                }
                // The old member must rejoin in any case (heal), even if the new
                // cluster did not start fully.
                match result {
                    Ok(detail) => self.log.event("note", name, &detail),
                    Err(e) => self.log.event("error", name, &format!("{e:#}")),
                }
                Undo::Rejoin(victim)
            }
        })
    }

    async fn external_do(
        &mut self,
        f: impl FnOnce(&mut dyn External) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let Some(mut ext) = self.external.take() else {
            bail!("no CDC processes to fault");
        };
        let (ext, result) = tokio::task::spawn_blocking(move || {
            let r = f(ext.as_mut());
            (ext, r)
        })
        .await?;
        self.external = Some(ext);
        result
    }

    async fn heal(&mut self, undo: Undo, cluster: &mut JCluster) -> Result<()> {
        match undo {
            Undo::Nothing => Ok(()),
            Undo::Unblock => {
                cluster.net.heal_all();
                self.log.event("heal", "net", "all links healed");
                Ok(())
            }
            Undo::RestartAll => {
                cluster.restart_all().await?;
                self.log.event(
                    "heal",
                    "kill-all",
                    &format!("restarted: {}", cluster.describe()),
                );
                Ok(())
            }
            Undo::Restart(i) => {
                cluster.restart(i).await?;
                self.log.event(
                    "heal",
                    "kill",
                    &format!("n{i} restarted as node {}", cluster.slots[i].node_id),
                );
                Ok(())
            }
            Undo::Resume(i) => {
                cluster.resume(i);
                self.log.event("heal", "pause", &format!("SIGCONT n{i}"));
                Ok(())
            }
            Undo::Readd(i) => {
                cluster.restart(i).await?;
                let moved = cluster.client.rebalance().await.map(|r| r.1).unwrap_or(0);
                self.log.event(
                    "heal",
                    "member",
                    &format!(
                        "n{i} re-added as node {}; rebalance moved {moved} replicas",
                        cluster.slots[i].node_id
                    ),
                );
                Ok(())
            }
            Undo::Rejoin(i) => {
                cluster.kill(i).await;
                cluster.restart(i).await?;
                self.log.event(
                    "heal",
                    "fresh-restart",
                    &format!(
                        "old member n{i} killed and restarted as node {} of the new cluster",
                        cluster.slots[i].node_id
                    ),
                );
                Ok(())
            }
            Undo::Clock(i) => {
                if cluster.slots[i].state == SlotState::Up {
                    cluster.set_clock_offset(i, 0).await?;
                }
                self.log
                    .event("heal", "clock", &format!("n{i} clock reset"));
                Ok(())
            }
            Undo::StartCdc => {
                self.external_do(|e| e.start_cdc()).await?;
                self.log
                    .event("heal", "cdc-kill", "raftcache-cdc restarted");
                Ok(())
            }
            Undo::StartPg => {
                self.external_do(|e| e.start_pg()).await?;
                self.log.event("heal", "pg-restart", "PostgreSQL started");
                Ok(())
            }
        }
    }

    /// Heals everything that may still be broken and waits for the cluster to recover.
    ///
    /// # Errors
    /// When it does not recover within a minute.
    pub async fn heal_all(&mut self, cluster: &mut JCluster) -> Result<()> {
        cluster.net.heal_all();
        if cluster.durable() && cluster.in_state(SlotState::Up).is_empty() {
            cluster.restart_all().await?;
        }
        for i in 0..cluster.slots.len() {
            match cluster.slots[i].state {
                SlotState::Paused => cluster.resume(i),
                SlotState::Down | SlotState::Removed => cluster.restart(i).await?,
                SlotState::Stranded => {
                    cluster.kill(i).await;
                    cluster.restart(i).await?;
                }
                SlotState::Up => {
                    let _ = cluster.set_clock_offset(i, 0).await;
                }
            }
        }
        self.log.event("heal", "all", &cluster.describe());
        cluster.wait_healthy(Duration::from_secs(60)).await
    }
}

fn cluster_partitions(cluster: &JCluster) -> u32 {
    cluster.partitions().max(1)
}

async fn sleep_until_or(d: Duration, until: Instant) {
    let now = Instant::now();
    let end = (now + d).min(until.max(now));
    tokio::time::sleep_until(end.into()).await;
}
