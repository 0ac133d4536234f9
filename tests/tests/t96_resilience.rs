//! Client resilience with real nodes and real app processes: `raftcache stampede`
//! (many concurrent `get_or_load` callers whose loader sleeps and counts itself) run as
//! separate processes against a 3-node cluster, through a cold key, a leader killed
//! under a read storm, and the whole cluster stopped and restarted.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use raftcache_client::Client;
use raftcache_tests::{
    bins, connect_settled, free_addr, output_within, runtime, Bins, Cluster, NodeProc,
};
use serde_json::Value as Json;
use tempfile::TempDir;

/// One test (one cluster, up to 3 busy client processes) at a time: 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

const PARTITIONS: usize = 8;
const SETTLE: Duration = Duration::from_secs(60);

/// The `stampede` command line against `endpoints`.
fn stampede(bins: &Bins, endpoints: &[String], args: &[&str]) -> Command {
    let mut cmd = Command::new(&bins.cli);
    cmd.arg("--endpoints")
        .arg(endpoints.join(","))
        .arg("stampede")
        .arg("--json")
        .args(args);
    cmd
}

/// Runs a stampede process to its end and parses its report.
fn report(what: &str, output: anyhow::Result<Output>) -> Json {
    let output = output.unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{what} failed ({}): {stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{what} printed no report ({e}): {stdout}"))
}

/// Loads `keys` keys `KEY:0` .. (one caller each) so that a later run starts warm.
fn warm_up(bins: &Bins, endpoints: &[String], keys: usize, key: &str) {
    let keys = keys.to_string();
    let args = [
        "--callers",
        &keys,
        "--keys",
        &keys,
        "--key",
        key,
        "--loader",
        "5ms",
    ];
    let warm = report(
        "warm-up",
        output_within(
            &mut stampede(bins, endpoints, &args),
            Duration::from_secs(60),
        ),
    );
    assert_eq!(num(&warm, "errors"), 0, "{warm}");
}

fn num(report: &Json, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("report has no {field}: {report}"))
}

fn timeline(report: &Json) -> Vec<Json> {
    report["timeline"].as_array().cloned().unwrap_or_default()
}

fn start_cluster(bins: &Bins) -> Cluster {
    let partitions = format!("--partitions={PARTITIONS}");
    Cluster::start(bins, 3, &[&partitions]).expect("cluster starts")
}

async fn settle(endpoints: &[String]) -> Client {
    connect_settled(endpoints.to_vec(), PARTITIONS, 3, SETTLE)
        .await
        .unwrap()
}

#[test]
fn three_app_processes_of_1000_callers_share_about_one_loader_call() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let bins = bins!();
    let cluster = start_cluster(&bins);
    let endpoints = cluster.endpoints();
    runtime().block_on(settle(&endpoints));

    let args = [
        "--callers",
        "1000",
        "--key",
        "cold:user:42",
        "--loader",
        "200ms",
        "--ttl",
        "60s",
    ];
    let reports: Vec<Json> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..3)
            .map(|i| {
                let mut cmd = stampede(&bins, &endpoints, &args);
                s.spawn(move || {
                    report(
                        &format!("app process {i}"),
                        output_within(&mut cmd, Duration::from_secs(60)),
                    )
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let loader_calls: u64 = reports.iter().map(|r| num(r, "loader_calls")).sum();
    let waits: u64 = reports
        .iter()
        .map(|r| r["load_stats"]["lease_waits"].as_u64().unwrap_or(0))
        .sum();
    eprintln!(
        "3 x 1000 callers: {loader_calls} loader calls, {waits} lease waits, p99 {:?} ms",
        reports
            .iter()
            .map(|r| r["p99_ms"].clone())
            .collect::<Vec<_>>()
    );
    for r in &reports {
        assert_eq!(num(r, "calls"), 1000, "{r}");
        assert_eq!(num(r, "errors"), 0, "{r}");
        // Single-flight: one flight per process, the other 999 callers joined it.
        assert_eq!(r["load_stats"]["coalesced"].as_u64(), Some(999), "{r}");
    }
    // Leases: one process loads, the others wait for its fill.
    assert!(
        (1..=3).contains(&loader_calls),
        "3000 callers on a cold key made {loader_calls} loader calls"
    );
    assert!(waits >= 1, "no process ever waited on a lease: {reports:?}");
}

#[test]
fn killing_the_hot_partitions_leader_under_a_read_storm_keeps_the_loader_bounded() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let bins = bins!();
    let mut cluster = start_cluster(&bins);
    let endpoints = cluster.endpoints();
    let rt = runtime();
    let client = rt.block_on(settle(&endpoints));
    // Every key carries the hash tag {storm}: one partition, one leader.
    warm_up(&bins, &endpoints, 100, "{storm}");

    let storm_args = [
        "--callers",
        "200",
        "--keys",
        "100",
        "--key",
        "{storm}",
        "--loader",
        "50ms",
        "--duration",
        "16s",
        "--interval",
        "20ms",
        "--degraded-concurrency",
        "4",
    ];
    let storm = std::thread::scope(|s| {
        let mut cmd = stampede(&bins, &endpoints, &storm_args);
        let run = s.spawn(move || output_within(&mut cmd, Duration::from_secs(90)));
        std::thread::sleep(Duration::from_secs(4));
        let partition = client.partition_of("{storm}:0");
        let status = rt.block_on(client.cluster_status()).unwrap();
        let leader = status
            .partitions
            .iter()
            .find(|p| p.id == partition)
            .and_then(|p| p.leader)
            .expect("the hot partition has a leader");
        eprintln!("killing node {leader}, the leader of partition {partition}");
        cluster
            .by_id(leader)
            .expect("the leader is one of ours")
            .kill9();
        report("read storm", run.join().unwrap())
    });
    let seconds = timeline(&storm);
    eprintln!(
        "storm: {} calls, {} loader calls, at most {} at once, {} degraded; timeline {}",
        num(&storm, "calls"),
        num(&storm, "loader_calls"),
        num(&storm, "max_concurrent_loads"),
        num(&storm, "from_degraded"),
        serde_json::to_string(&seconds).unwrap_or_default()
    );
    assert_eq!(num(&storm, "errors"), 0, "{}", storm["first_error"]);
    assert!(
        num(&storm, "max_concurrent_loads") <= 4,
        "the loader ran {} at once, over the limit of 4",
        num(&storm, "max_concurrent_loads")
    );
    // Far fewer loader calls than reads: the storm is served by the cache.
    assert!(
        num(&storm, "loader_calls") * 10 < num(&storm, "calls"),
        "{storm}"
    );
    // Reads recovered after the failover: the last seconds are cache hits again.
    let tail = &seconds[seconds.len().saturating_sub(4)..seconds.len().saturating_sub(1)];
    assert!(!tail.is_empty(), "no timeline: {storm}");
    for s in tail {
        assert!(s["cache"].as_u64().unwrap_or(0) > 0, "no hits in {s}");
        assert_eq!(s["degraded"].as_u64(), Some(0), "still degraded in {s}");
    }
}

/// A node slot that keeps its address and data directory across restarts.
struct Slot {
    addr: SocketAddr,
    data: TempDir,
    args: Vec<String>,
}

impl Slot {
    fn start(&self, bins: &Bins) -> NodeProc {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        NodeProc::start_with_dir(bins, &self.addr.to_string(), self.data.path(), &args)
            .unwrap_or_else(|e| panic!("node at {} did not start: {e:#}", self.addr))
    }
}

#[test]
fn a_stopped_cluster_degrades_to_the_loader_and_recovers() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let bins = bins!();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr().unwrap()).collect();
    let slots: Vec<Slot> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let mut args: Vec<String> = vec!["--persistence".into(), "snapshot".into()];
            if i == 0 {
                args.extend(["--partitions".into(), PARTITIONS.to_string()]);
            } else {
                args.extend(["--join".into(), addrs[0].to_string()]);
            }
            Slot {
                addr: *addr,
                data: tempfile::tempdir().unwrap(),
                args,
            }
        })
        .collect();
    let endpoints: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let mut nodes: Vec<NodeProc> = slots.iter().map(|s| s.start(&bins)).collect();
    let rt = runtime();
    rt.block_on(settle(&endpoints));
    warm_up(&bins, &endpoints, 20, "down");

    let args = [
        "--callers",
        "60",
        "--keys",
        "20",
        "--key",
        "down",
        "--loader",
        "20ms",
        "--duration",
        "32s",
        "--interval",
        "20ms",
        "--degraded-concurrency",
        "3",
    ];
    let run = std::thread::scope(|s| {
        let mut cmd = stampede(&bins, &endpoints, &args);
        let run = s.spawn(move || output_within(&mut cmd, Duration::from_secs(120)));
        std::thread::sleep(Duration::from_secs(5));
        eprintln!("stopping every node");
        std::thread::scope(|s| {
            for n in &mut nodes {
                s.spawn(move || n.terminate(Duration::from_secs(30)));
            }
        });
        std::thread::sleep(Duration::from_secs(5));
        eprintln!("restarting every node");
        nodes = slots.iter().map(|s| s.start(&bins)).collect();
        rt.block_on(settle(&endpoints));
        eprintln!("cluster back");
        report("outage run", run.join().unwrap())
    });
    let seconds = timeline(&run);
    eprintln!(
        "outage: {} calls, {} degraded, {} loader calls (at most {} at once); timeline {}",
        num(&run, "calls"),
        num(&run, "from_degraded"),
        num(&run, "loader_calls"),
        num(&run, "max_concurrent_loads"),
        serde_json::to_string(&seconds).unwrap_or_default()
    );
    assert_eq!(num(&run, "errors"), 0, "{}", run["first_error"]);
    assert!(num(&run, "from_degraded") > 0, "never degraded: {run}");
    assert!(
        num(&run, "max_concurrent_loads") <= 3,
        "the loader ran {} at once, over the limit of 3",
        num(&run, "max_concurrent_loads")
    );
    // Some second was answered by the loader alone (the cluster was down) ...
    assert!(
        seconds
            .iter()
            .any(|s| s["cache"].as_u64() == Some(0) && s["degraded"].as_u64().unwrap_or(0) > 0),
        "no second served only by the loader"
    );
    // ... and hits resumed once it was back, with every breaker closed.
    let tail = &seconds[seconds.len().saturating_sub(4)..seconds.len().saturating_sub(1)];
    assert!(!tail.is_empty(), "no timeline: {run}");
    for s in tail {
        assert!(s["cache"].as_u64().unwrap_or(0) > 0, "no hits in {s}");
        assert_eq!(s["degraded"].as_u64(), Some(0), "still degraded in {s}");
    }
    for b in run["breakers"].as_array().into_iter().flatten() {
        assert_eq!(b[1], "closed", "breaker not closed at the end: {b}");
    }
}
