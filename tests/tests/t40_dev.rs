//! `raftcache dev`: starts a node as a child, prints its JSON line and `ready`,
//! serves the CLI, and takes its children down on SIGTERM.

#![allow(clippy::unwrap_used)]

use raftcache_tests::{bins, output_within, process_alive, run_cli, signal, wait_with_deadline};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Kills `raftcache dev` (and so, through it, its node) if the test panics.
struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dev_starts_a_node_and_stops_it_on_sigterm() {
    let bins = bins!();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let mut dev = Guard(
        Command::new(&bins.cli)
            .args(["dev", "--base-port", "0", "--max-memory", "32MiB"])
            .arg("--data-dir")
            .arg(&data)
            .env("RAFTCACHE_NODE_BIN", &bins.node)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let stdout = dev.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let node: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(node["node"], 1);
    let pid = u32::try_from(node["pid"].as_u64().unwrap()).unwrap();
    let grpc = node["grpc"].as_str().unwrap().to_owned();
    assert!(grpc.starts_with("127.0.0.1:"), "{grpc}");
    assert!(node["metrics"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), "ready");
    assert!(data.join("node-1").is_dir(), "node data under --data-dir");

    let t = Duration::from_secs(20);
    let out = run_cli(&bins, &grpc, &["set", "tour", "hello"], t).unwrap();
    assert!(out.status.success());
    let out = run_cli(&bins, &grpc, &["get", "tour"], t).unwrap();
    assert_eq!(out.stdout, b"hello\n");
    let out = run_cli(&bins, &grpc, &["stats", "--json"], t).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&(32u64 << 20).to_string()));

    signal(dev.0.id(), libc::SIGTERM);
    let status = wait_with_deadline(&mut dev.0, Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status:?}");
    for _ in 0..100 {
        if !process_alive(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!process_alive(pid), "the node child is gone");
}

#[test]
fn dev_refuses_more_nodes_than_this_build_replicates() {
    let bins = bins!();
    let dir = tempfile::tempdir().unwrap();
    let out = output_within(
        Command::new(&bins.cli)
            .args(["dev", "--nodes", "3", "--base-port", "0"])
            .arg("--data-dir")
            .arg(dir.path())
            .env("RAFTCACHE_NODE_BIN", &bins.node),
        Duration::from_secs(20),
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!out.stderr.is_empty());
}
