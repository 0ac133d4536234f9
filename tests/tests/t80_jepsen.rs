//! `raftcache-jepsen` in its short CI form: each workload runs ~25 s on 3 real nodes
//! behind the fault-injecting proxy with `--nemesis all`, and its history must check
//! as valid; the `check` subcommand must fail planted anomalies (exit 1) and pass a
//! valid history (exit 0).
//!
//! Runs are serialised (one cluster at a time on these 2-core machines). Each keeps
//! its folder (history, nemesis log, node logs, report) under the system temp dir when
//! it fails, and prints where. `RAFTCACHE_JEPSEN_SECS` changes the run length,
//! `RAFTCACHE_JEPSEN_SEED` fixes the seed.
#![allow(clippy::unwrap_used)]

use raftcache_tests::{bins, output_within};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

/// One cluster at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn jepsen() -> PathBuf {
    env!("CARGO_BIN_EXE_raftcache-jepsen").into()
}

fn secs() -> String {
    std::env::var("RAFTCACHE_JEPSEN_SECS").unwrap_or_else(|_| "25".into())
}

/// Runs one short test and asserts a valid verdict with real traffic and real faults.
fn short_run(workload: &str) {
    short_run_with(workload, &["--nemesis", "all"], "120");
}

/// [`short_run`] with these extra arguments (the nemesis among them) at `rate` ops/s.
fn short_run_with(workload: &str, extra: &[&str], rate: &str) {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let bins = bins!();
    let dir = tempfile::Builder::new()
        .prefix(&format!("raftcache-jepsen-{workload}-"))
        .tempdir()
        .unwrap();
    let out = dir.path().join("run");
    let mut cmd = Command::new(jepsen());
    cmd.args(["test", "--workload", workload, "--nodes", "3"])
        .args(extra)
        .args([
            "--time-limit",
            &secs(),
            "--concurrency",
            "6",
            "--rate",
            rate,
        ])
        .args(["--partitions", "4"])
        .arg("--out")
        .arg(&out)
        .arg("--node-bin")
        .arg(&bins.node)
        .arg("--cdc-bin")
        .arg(&bins.cdc);
    if let Ok(seed) = std::env::var("RAFTCACHE_JEPSEN_SEED") {
        cmd.args(["--seed", &seed]);
    }
    let output = match output_within(&mut cmd, Duration::from_secs(600)) {
        Ok(output) => output,
        Err(e) => {
            let kept = dir.keep();
            let nemesis =
                std::fs::read_to_string(kept.join("run/nemesis.jsonl")).unwrap_or_default();
            panic!(
                "raftcache-jepsen {workload}: {e:#}; run folder kept at {}\n--- nemesis log ---\n{nemesis}",
                kept.display()
            );
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let ok = output.status.success() && stdout.starts_with("valid: true");
    if !ok {
        let kept = dir.keep();
        panic!(
            "raftcache-jepsen {workload} was not valid ({:?}); run folder kept at {}\n\
             --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            output.status,
            kept.display()
        );
    }
    // Real traffic: hundreds of completed operations, and faults really injected.
    let history = std::fs::read_to_string(out.join("history.jsonl")).unwrap();
    let oks = history
        .lines()
        .filter(|l| l.contains(r#""type":"ok""#))
        .count();
    assert!(
        oks >= 300,
        "only {oks} ok operations in the history\n{stderr}"
    );
    let nemesis = std::fs::read_to_string(out.join("nemesis.jsonl")).unwrap();
    let starts = nemesis
        .lines()
        .filter(|l| l.contains(r#""event":"start""#))
        .count();
    assert!(starts >= 2, "only {starts} faults started\n{nemesis}");
    // The history checks the same again from the file alone.
    let again = output_within(
        Command::new(jepsen())
            .arg("check")
            .arg(out.join("history.jsonl")),
        Duration::from_secs(300),
    )
    .unwrap();
    assert!(again.status.success(), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stdout).starts_with("valid: true"));
    eprintln!("{workload}: {stdout}{stderr}");
}

/// `check` must reject the kept excerpt `name` (exit 1, `valid: false`) and name
/// `anomaly` in its report.
fn rejects_fixture(name: &str, anomaly: &str) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    let out = output_within(
        Command::new(jepsen()).arg("check").arg(&fixture),
        Duration::from_secs(60),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{name}: {stdout}{stderr}");
    assert!(stdout.starts_with("valid: false"), "{name}: {stdout}");
    assert!(
        stderr.contains(anomaly),
        "{name}: no {anomaly:?} in\n{stderr}"
    );
}

#[test]
fn register_with_all_nemeses_is_linearizable() {
    short_run("register");
}

#[test]
fn counter_with_all_nemeses_counts_every_acked_increment_once() {
    short_run("counter");
}

/// Durable persistence: every node killed at once (and single kills, pauses), each
/// comes back as itself from its data directory, no acknowledged increment is lost
/// and no read after a restart is stale.
#[test]
fn durable_counter_survives_kill_all() {
    // With kill-all the whole cluster is down for most of the run (each restart takes
    // seconds), so the short up-windows need a higher rate for the history to hold the
    // 300 completed operations every run must show (seed 1795395318156727991 had three
    // kill-alls and 273 at 120 ops/s; 610 at 300).
    short_run_with(
        "counter",
        &[
            "--persistence",
            "durable",
            "--nemesis",
            "kill-all,kill,pause",
        ],
        "300",
    );
}

#[test]
fn cdc_with_all_nemeses_never_serves_older_than_min_lsn() {
    short_run("cdc");
}

/// The checker finds real anomalies too: register reads served by followers (a
/// documented non-linearizable mode) under partitions must be reported invalid, with
/// small windows.
#[test]
fn follower_reads_are_caught_as_stale() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let bins = bins!();
    let dir = tempfile::tempdir().unwrap();
    let out = output_within(
        Command::new(jepsen())
            .args(["test", "--workload", "register", "--nemesis", "partition"])
            .args(["--nodes", "3", "--partitions", "4", "--time-limit", "15"])
            .args(["--concurrency", "6", "--rate", "150", "--follower-reads"])
            .arg("--out")
            .arg(dir.path().join("run"))
            .arg("--node-bin")
            .arg(&bins.node),
        Duration::from_secs(300),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.starts_with("valid: false"), "{stdout}");
    assert!(stderr.contains("smallest failing window"), "{stderr}");
    assert!(stderr.contains("(follower)"), "{stderr}");
}

/// Writes `lines` as a history file and runs `raftcache-jepsen check` on it.
fn check(dir: &Path, name: &str, lines: &[&str]) -> (i32, String, String) {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let out = output_within(
        Command::new(jepsen()).arg("check").arg(&path),
        Duration::from_secs(60),
    )
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_fails_planted_anomalies_and_passes_a_valid_history() {
    let dir = tempfile::tempdir().unwrap();
    // A stale read: 2 was written and acknowledged, then a read returns 1.
    let (code, stdout, stderr) = check(
        dir.path(),
        "stale.jsonl",
        &[
            r#"{"index":0,"process":0,"type":"invoke","f":"write","key":"k","value":"1","time_ns":10}"#,
            r#"{"index":1,"process":0,"type":"ok","f":"write","key":"k","value":"1","time_ns":20}"#,
            r#"{"index":2,"process":0,"type":"invoke","f":"write","key":"k","value":"2","time_ns":30}"#,
            r#"{"index":3,"process":0,"type":"ok","f":"write","key":"k","value":"2","time_ns":40}"#,
            r#"{"index":4,"process":1,"type":"invoke","f":"read","key":"k","value":null,"time_ns":50}"#,
            r#"{"index":5,"process":1,"type":"ok","f":"read","key":"k","value":"1","time_ns":60}"#,
        ],
    );
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.starts_with("valid: false"), "{stdout}");
    assert!(
        stderr.contains("\"k\""),
        "the anomaly names the key: {stderr}"
    );

    // A double increment: deltas 1 and 2 acknowledged, the final read says 4.
    let (code, stdout, _) = check(
        dir.path(),
        "double.jsonl",
        &[
            r#"{"index":0,"process":0,"type":"invoke","f":"incr","key":"c","value":1,"time_ns":10}"#,
            r#"{"index":1,"process":0,"type":"ok","f":"incr","key":"c","value":1,"time_ns":20}"#,
            r#"{"index":2,"process":0,"type":"invoke","f":"incr","key":"c","value":2,"time_ns":30}"#,
            r#"{"index":3,"process":0,"type":"ok","f":"incr","key":"c","value":3,"time_ns":40}"#,
            r#"{"index":4,"process":1,"type":"invoke","f":"read","key":"c","value":null,"time_ns":50}"#,
            r#"{"index":5,"process":1,"type":"ok","f":"read","key":"c","value":4,"time_ns":60}"#,
        ],
    );
    assert_eq!(code, 1, "{stdout}");

    // The same shapes, valid: the read sees the latest write, the counter its sum; a
    // timed-out write may or may not have happened.
    let (code, stdout, stderr) = check(
        dir.path(),
        "valid.jsonl",
        &[
            r#"{"index":0,"process":0,"type":"invoke","f":"write","key":"k","value":"1","time_ns":10}"#,
            r#"{"index":1,"process":0,"type":"ok","f":"write","key":"k","value":"1","time_ns":20}"#,
            r#"{"index":2,"process":0,"type":"invoke","f":"write","key":"k","value":"2","time_ns":30}"#,
            r#"{"index":3,"process":0,"type":"info","f":"write","key":"k","value":"2","time_ns":40,"error":"timeout"}"#,
            r#"{"index":4,"process":1,"type":"invoke","f":"read","key":"k","value":null,"time_ns":50}"#,
            r#"{"index":5,"process":1,"type":"ok","f":"read","key":"k","value":"2","time_ns":60}"#,
            r#"{"index":6,"process":2,"type":"invoke","f":"incr","key":"c","value":1,"time_ns":70}"#,
            r#"{"index":7,"process":2,"type":"ok","f":"incr","key":"c","value":1,"time_ns":80}"#,
            r#"{"index":8,"process":2,"type":"invoke","f":"read","key":"c","value":null,"time_ns":90}"#,
            r#"{"index":9,"process":2,"type":"ok","f":"read","key":"c","value":1,"time_ns":100}"#,
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.starts_with("valid: true"), "{stdout}");

    // The real anomaly raftcache-jepsen found (5-minute register run, `all`, 5 nodes,
    // seed 1795372387902690602): a write applied twice, its first attempt committed by a
    // new leader after the client had retried. The fix (request ids applied once) is
    // tested in the node and client crates.
    rejects_fixture("jepsen-double-apply.jsonl", "not-linearizable");
    // A CI counter run (seed 1795379175834686442): increments recorded as `fail` (the
    // last attempt got NOT_LEADER) that a new leader had committed, as the client
    // reported them before it learnt `MaybeApplied` (tested in client/tests/fake_node.rs).
    rejects_fixture(
        "jepsen-fail-then-applied.jsonl",
        "double-or-phantom-increment",
    );
    // Counter, --persistence durable, kill-all (seed 1795381656029941870): a
    // LINEARIZABLE read right after every node was killed returned 255 although the
    // increment to 256 had been acknowledged (later increments went on from 256):
    // openraft restored the old leader at once, with a commit index stored behind the
    // one it had acknowledged. Fixed by `enable_leader_restore: false`;
    // `durable_counter_survives_kill_all` runs the same scenario.
    rejects_fixture("jepsen-durable-stale-read.jsonl", "lost-increment");

    // Garbage is a clear error (exit 2), not a verdict.
    let (code, _, stderr) = check(dir.path(), "garbage.jsonl", &["{not json"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("line 1"), "{stderr}");
}

/// `fresh-restart`: every node but one is killed and a brand-new cluster (new cluster
/// id, empty) is founded on their addresses beside the old member (ARCHITECTURE.md
/// item 38). No read after a restart may return a value written to the old cluster
/// (`no-old-cluster-values`); linearizability is checked per era between restarts,
/// since the new cluster starts empty by design (a `null` read after acknowledged
/// writes is expected across the restart, and only there). The checker must catch a
/// planted old-cluster read and accept a reset across a restart first.
#[test]
fn fresh_restart_never_serves_old_cluster_values() {
    let dir = tempfile::tempdir().unwrap();
    // The marker as the nemesis writes it: invoked when the kills start (t=100),
    // `info` when the new cluster is up (`ready_ns` 200).
    let marker = [
        r#"{"index":2,"process":4611686018427387904,"type":"invoke","f":"fresh-restart","key":"","value":{"old_member":"n0"},"time_ns":100}"#,
        r#"{"index":3,"process":4611686018427387904,"type":"info","f":"fresh-restart","key":"","value":{"old_member":"n0","ready_ns":200},"time_ns":200,"error":"nemesis marker"}"#,
    ];
    let before = [
        r#"{"index":0,"process":0,"type":"invoke","f":"write","key":"k","value":"0.1","time_ns":10}"#,
        r#"{"index":1,"process":0,"type":"ok","f":"write","key":"k","value":"0.1","time_ns":20}"#,
    ];
    // Planted bug: after the restart, a read returns the old cluster's value.
    let mut planted: Vec<&str> = before.iter().chain(&marker).copied().collect();
    planted.extend([
        r#"{"index":4,"process":1,"type":"invoke","f":"read","key":"k","value":null,"time_ns":300}"#,
        r#"{"index":5,"process":1,"type":"ok","f":"read","key":"k","value":"0.1","time_ns":310}"#,
    ]);
    let (code, stdout, stderr) = check(dir.path(), "old-value.jsonl", &planted);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.starts_with("valid: false"), "{stdout}");
    assert!(stderr.contains("old-cluster-value"), "{stderr}");
    // Valid: the new cluster starts empty (a null read), then serves its own writes.
    let mut reset: Vec<&str> = before.iter().chain(&marker).copied().collect();
    reset.extend([
        r#"{"index":4,"process":1,"type":"invoke","f":"read","key":"k","value":null,"time_ns":300}"#,
        r#"{"index":5,"process":1,"type":"ok","f":"read","key":"k","value":null,"time_ns":310}"#,
        r#"{"index":6,"process":1,"type":"invoke","f":"write","key":"k","value":"1.1","time_ns":320}"#,
        r#"{"index":7,"process":1,"type":"ok","f":"write","key":"k","value":"1.1","time_ns":330}"#,
        r#"{"index":8,"process":1,"type":"invoke","f":"read","key":"k","value":null,"time_ns":340}"#,
        r#"{"index":9,"process":1,"type":"ok","f":"read","key":"k","value":"1.1","time_ns":350}"#,
    ]);
    let (code, stdout, stderr) = check(dir.path(), "reset.jsonl", &reset);
    assert_eq!(code, 0, "{stdout}{stderr}");

    // A real run: memory-only nodes, the fresh-restart nemesis only.
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let bins = bins!();
    let out = dir.path().join("run");
    let secs = std::env::var("RAFTCACHE_JEPSEN_SECS").unwrap_or_else(|_| "20".into());
    let mut cmd = Command::new(jepsen());
    cmd.args([
        "test",
        "--workload",
        "register",
        "--nemesis",
        "fresh-restart",
    ])
    .args(["--nodes", "3", "--partitions", "4", "--time-limit", &secs])
    .args(["--concurrency", "4", "--rate", "80"])
    .arg("--out")
    .arg(&out)
    .arg("--node-bin")
    .arg(&bins.node);
    if let Ok(seed) = std::env::var("RAFTCACHE_JEPSEN_SEED") {
        cmd.args(["--seed", &seed]);
    }
    let output = match output_within(&mut cmd, Duration::from_secs(300)) {
        Ok(output) => output,
        Err(e) => fail_kept(dir, &format!("{e:#}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !(output.status.success() && stdout.starts_with("valid: true")) {
        fail_kept(
            dir,
            &format!(
                "not valid ({:?})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                output.status
            ),
        );
    }
    let history = std::fs::read_to_string(out.join("history.jsonl")).unwrap();
    let restarts = history
        .lines()
        .filter(|l| l.contains(r#""f":"fresh-restart""#) && l.contains(r#""type":"info""#))
        .count();
    let report = std::fs::read_to_string(out.join("report.txt")).unwrap();
    if restarts == 0 || !report.contains("no-old-cluster-values: valid true") {
        fail_kept(
            dir,
            &format!("{restarts} fresh restarts marked in the history\n{report}"),
        );
    }
    let oks = history
        .lines()
        .filter(|l| l.contains(r#""type":"ok""#))
        .count();
    assert!(oks >= 200, "only {oks} ok operations\n{stderr}");
    eprintln!("fresh-restart: {restarts} restart(s)\n{report}");
}

/// Keeps the run folder of a failed run and panics with `why` and the nemesis log.
fn fail_kept(dir: tempfile::TempDir, why: &str) -> ! {
    let kept = dir.keep();
    let nemesis = std::fs::read_to_string(kept.join("run/nemesis.jsonl")).unwrap_or_default();
    panic!(
        "fresh-restart: {why}; run folder kept at {}\n--- nemesis log ---\n{nemesis}",
        kept.display()
    );
}
