//! `raftcache dev`: starts its nodes as children (one, or a replicated cluster of
//! three), prints their JSON lines and `ready`, serves the CLI, and takes its
//! children down on SIGTERM.

#![allow(clippy::unwrap_used)]

use raftcache_tests::{bins, process_alive, run_cli, signal, wait_with_deadline, Bins};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long `dev` may take to start its nodes and settle (its own bounds are 30 s
/// per node and 60 s to settle).
const DEV_READY: Duration = Duration::from_secs(150);
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// Kills `raftcache dev` (and so, through it, its nodes) if the test panics, and
/// then shows its stderr.
struct Guard {
    child: std::process::Child,
    stderr_log: std::path::PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of raftcache dev stderr ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Starts `raftcache dev` with `args` under `dir`; its stdout lines arrive on the
/// returned channel.
fn start_dev(bins: &Bins, dir: &Path, args: &[&str]) -> (Guard, mpsc::Receiver<String>) {
    let stderr_log = dir.join("dev.stderr");
    let mut child = Command::new(&bins.cli)
        .arg("dev")
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("dev"))
        .env("RAFTCACHE_NODE_BIN", &bins.node)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Guard { child, stderr_log }, rx)
}

/// Reads the node lines up to `ready`.
fn node_lines(rx: &mpsc::Receiver<String>) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + DEV_READY;
    let mut nodes = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no `ready` within {DEV_READY:?} (got {nodes:?})"));
        if line == "ready" {
            return nodes;
        }
        nodes.push(serde_json::from_str(&line).unwrap());
    }
}

/// SIGTERMs `dev`, checks it exits 0 and that its nodes are gone.
fn stop_dev(dev: &mut Guard, pids: &[u32]) {
    signal(dev.child.id(), libc::SIGTERM);
    let status = wait_with_deadline(&mut dev.child, Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status:?}");
    for &pid in pids {
        for _ in 0..100 {
            if !process_alive(pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!process_alive(pid), "the node child {pid} is gone");
    }
}

fn cli(bins: &Bins, endpoint: &str, args: &[&str]) -> (i32, String, String) {
    let out = run_cli(bins, endpoint, args, CLI_TIMEOUT).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn dev_starts_a_node_and_stops_it_on_sigterm() {
    let bins = bins!();
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, rx) = start_dev(
        &bins,
        dir.path(),
        &["--nodes", "1", "--base-port", "0", "--max-memory", "32MiB"],
    );
    let nodes = node_lines(&rx);
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let node = &nodes[0];
    assert_eq!(node["node"], 1);
    let pid = u32::try_from(node["pid"].as_u64().unwrap()).unwrap();
    let grpc = node["grpc"].as_str().unwrap().to_owned();
    assert!(grpc.starts_with("127.0.0.1:"), "{grpc}");
    assert!(node["metrics"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        dir.path().join("dev").join("node-1").is_dir(),
        "node data under --data-dir"
    );

    let (code, _, err) = cli(&bins, &grpc, &["set", "tour", "hello"]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = cli(&bins, &grpc, &["get", "tour"]);
    assert_eq!(out, "hello\n");
    // Every dev node speaks RESP too, and sees what gRPC wrote.
    let resp = node["resp"]
        .as_str()
        .expect("dev prints each node's resp address");
    let mut stream = std::net::TcpStream::connect(resp).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(&mut stream, b"*2\r\n$3\r\nGET\r\n$4\r\ntour\r\n").unwrap();
    let mut reply = [0u8; 64];
    let n = std::io::Read::read(&mut stream, &mut reply).unwrap();
    assert_eq!(&reply[..n], b"$5\r\nhello\r\n");
    let (_, out, _) = cli(&bins, &grpc, &["stats", "--json"]);
    assert!(out.contains(&(32u64 << 20).to_string()), "{out}");

    stop_dev(&mut dev, &[pid]);
}

#[test]
fn dev_runs_a_replicated_cluster_of_three() {
    let bins = bins!();
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, rx) = start_dev(&bins, dir.path(), &["--nodes", "3", "--base-port", "0"]);
    let nodes = node_lines(&rx);
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    let ids: BTreeSet<u64> = nodes.iter().map(|n| n["node"].as_u64().unwrap()).collect();
    assert_eq!(ids, BTreeSet::from([1, 2, 3]));
    let pids: Vec<u32> = nodes
        .iter()
        .map(|n| u32::try_from(n["pid"].as_u64().unwrap()).unwrap())
        .collect();
    let grpc: Vec<String> = nodes
        .iter()
        .map(|n| n["grpc"].as_str().unwrap().to_owned())
        .collect();
    for addr in &grpc {
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    }

    // `dev` said ready: every partition has 3 replicas and a leader, which every
    // node's view agrees on. Leaders spread to the preferred ones shortly after (a
    // partition has no leader for a moment while its leadership moves).
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let (code, out, err) = cli(&bins, &grpc[1], &["cluster", "--json"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.lines().count(), 1, "one JSON line: {out}");
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(status["replication_factor"], 3, "{status}");
        let node_ids: BTreeSet<u64> = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_u64().unwrap())
            .collect();
        assert_eq!(node_ids, ids, "{status}");
        let partitions = status["partitions"].as_array().unwrap();
        assert_eq!(partitions.len(), 16, "{status}");
        let mut leaders = BTreeSet::new();
        let mut leaderless = 0;
        for p in partitions {
            let replicas: BTreeSet<u64> = p["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_u64().unwrap())
                .collect();
            assert_eq!(replicas, ids, "partition {p}");
            // A partition whose leadership is moving to its preferred replica has no
            // leader for a moment (an election): poll again, within the deadline.
            match p["leader"].as_u64() {
                Some(leader) => {
                    assert!(replicas.contains(&leader), "{p}");
                    leaders.insert(leader);
                }
                None => leaderless += 1,
            }
        }
        if leaders == ids && leaderless == 0 {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "leaders stay on {leaders:?} ({leaderless} partitions without one), not on all \
             nodes: {status}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("{status}");
    let (code, table, _) = cli(&bins, &grpc[0], &["cluster"]);
    assert_eq!(code, 0);
    assert!(table.contains("replication factor 3"), "{table}");

    // Writes and reads through the CLI, entering at different nodes.
    for (i, key) in ["alpha", "{user:1}:profile", "tour"].iter().enumerate() {
        let (code, out, err) = cli(&bins, &grpc[i % 3], &["set", key, "hello"]);
        assert_eq!((code, out.as_str()), (0, "OK\n"), "{err}");
        for level in ["lease", "linearizable"] {
            let (code, out, err) = cli(
                &bins,
                &grpc[(i + 1) % 3],
                &["get", key, "--consistency", level],
            );
            assert_eq!((code, out.as_str()), (0, "hello\n"), "{level}: {err}");
        }
        // A follower read may lag behind, but it never errs and never invents.
        let (code, out, err) = cli(
            &bins,
            &grpc[(i + 2) % 3],
            &[
                "get",
                key,
                "--consistency",
                "follower",
                "--max-staleness",
                "1s",
            ],
        );
        assert!(
            (code == 0 && out == "hello\n") || (code == 1 && out.is_empty()),
            "follower read: {code} {out:?} {err}"
        );
    }
    let (code, out, err) = cli(&bins, &grpc[2], &["incr", "counter", "--by", "5"]);
    assert_eq!((code, out.as_str()), (0, "5\n"), "{err}");

    stop_dev(&mut dev, &pids);
}
