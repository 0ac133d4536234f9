//! Start-up failures of the real binary: each gets a clear one-line reason and a
//! non-zero exit, and nothing is left running.

#![allow(clippy::unwrap_used)]

use raftcache_tests::{bins, output_within, NodeProc};
use std::process::Command;
use std::time::Duration;

/// Runs `test-node` with `args`, expecting it to exit by itself; returns (code, stderr).
fn node_fails(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = output_within(
        Command::new(bins!().node)
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(args),
        Duration::from_secs(20),
    )
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    f
}

#[test]
fn malformed_config_files_are_named_and_explained() {
    let cases = [
        ("this is = = not toml", "invalid config file"),
        ("[storage]\nmax-memroy = \"1GiB\"\n", "max-memroy"),
        ("[storage]\nmax-memory = \"lots\"\n", "max-memory"),
        ("[storage]\neviction-policy = \"random\"\n", "random"),
        ("[storage]\npartitions = 0\n", "storage.partitions"),
        (
            "[server]\nshutdown-timeout = \"soon\"\n",
            "shutdown-timeout",
        ),
    ];
    for (text, needle) in cases {
        let f = config_file(text);
        let (code, err) = node_fails(&["--config", f.path().to_str().unwrap()]);
        assert_eq!(code, 2, "{text:?}: {err}");
        assert!(
            err.contains(needle),
            "{text:?}: expected {needle:?} in {err}"
        );
    }
    let (code, err) = node_fails(&["--config", "/nonexistent/raftcache.toml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read config file /nonexistent/raftcache.toml"),
        "{err}"
    );
}

#[test]
fn bad_flags_are_refused() {
    let (code, err) = node_fails(&["--eviction-policy", "random"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("allkeys-lru"),
        "lists the valid policies: {err}"
    );
    let (code, err) = node_fails(&["--max-memory", "12 parsecs"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let first = NodeProc::start(&bins!(), &[]).unwrap();
    let taken = first.grpc.to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = output_within(
        Command::new(bins!().node)
            .args(["--grpc-addr", &taken, "--metrics-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path()),
        Duration::from_secs(20),
    )
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen for gRPC on {taken}")),
        "{err}"
    );
    assert!(err.contains("--grpc-addr"), "says what to change: {err}");
}

#[test]
fn the_example_config_starts_a_node() {
    // The shipped example, with its ports moved to free ones by flags.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../node/etc/node.example.toml");
    let node = NodeProc::start(&bins!(), &["--config", example]).unwrap();
    assert!(node.log().contains("node ready"));
}
