//! Operator tooling, from outside the processes: every metric family a node or a CDC
//! worker exports has `# HELP` and `# TYPE`; logs written to a file carry no ANSI
//! colours; each `raftcache` subcommand's `--help` shows its own options; a wrong
//! `--endpoints` (no port, a node's RESP or metrics port, a closed port) gets one line
//! saying what is wrong; and a client started while the cache is down serves from its
//! loader, then uses the cache as soon as a node answers.

#![allow(clippy::unwrap_used)]

use raftcache_client::{Bytes, Client, ClientConfig, LoadOptions, LoadSource};
use raftcache_tests::cdc::{config as cdc_config, CdcProc};
use raftcache_tests::{bins, free_addr, output_within, run_cli, runtime, scrape_metrics, NodeProc};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// The metric families of a Prometheus text page that lack `# HELP` or `# TYPE`,
/// checked over every sample line of the page (a histogram's or summary's `_bucket`,
/// `_sum` and `_count` samples belong to their family).
fn families_without_help_or_type(page: &str) -> Vec<String> {
    // `scrape_metrics` returns the whole HTTP answer: skip its head.
    let page = match page.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/") => body,
        _ => page,
    };
    let mut help = BTreeSet::new();
    let mut types = BTreeMap::new();
    let mut samples = BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, text)) = rest.split_once(' ') {
                if !text.trim().is_empty() {
                    help.insert(name.to_owned());
                }
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                types.insert(name.to_owned(), kind.trim().to_owned());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_owned());
        }
    }
    let family = |sample: &str| -> String {
        if types.contains_key(sample) {
            return sample.to_owned();
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix) {
                if matches!(
                    types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                ) {
                    return base.to_owned();
                }
            }
        }
        sample.to_owned()
    };
    let families: BTreeSet<String> = samples.iter().map(|s| family(s)).collect();
    assert!(!families.is_empty(), "no samples on the page:\n{page}");
    families
        .into_iter()
        .filter(|f| !help.contains(f) || !types.contains_key(f))
        .collect()
}

fn cli(bins: &raftcache_tests::Bins, endpoint: &str, args: &[&str]) -> (i32, String, String) {
    let out = run_cli(bins, endpoint, args, CLI_TIMEOUT).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_checker_notices_a_family_without_help() {
    let page = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n\
                # TYPE b_seconds summary\nb_seconds{quantile=\"0.5\"} 1\nb_seconds_sum 1\n\
                b_seconds_count 1\n# HELP c Some c.\nc 2\n";
    assert_eq!(families_without_help_or_type(page), ["b_seconds", "c"]);
}

#[test]
fn every_metric_family_has_help_and_type_and_logs_have_no_colours() {
    let bins = bins!();
    let node = NodeProc::start(
        &bins,
        &[
            "--resp-addr=127.0.0.1:0",
            "--persistence=durable",
            "--partitions=4",
        ],
    )
    .unwrap();
    let ep = node.endpoint();
    // Touch every kind of metric: requests, hits and misses, a lease, durable writes
    // (fsyncs), snapshots, a RESP command.
    for args in [
        &["set", "k", "v"][..],
        &["get", "k"],
        &["get", "missing"],
        &["incr", "n"],
        &["stampede", "--callers", "4", "--loader", "10ms"],
        &["admin", "snapshot"],
        &["stats"],
    ] {
        let (code, _, err) = cli(&bins, &ep, args);
        assert!(code == 0 || code == 1, "{args:?}: {err}");
    }
    let resp = node.resp.unwrap();
    let mut s = std::net::TcpStream::connect(resp).unwrap();
    std::io::Write::write_all(&mut s, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n").unwrap();
    let mut answer = [0u8; 16];
    let _ = std::io::Read::read(&mut s, &mut answer).unwrap();

    let page = scrape_metrics(node.metrics).unwrap();
    for family in [
        "raftcache_ops_total",
        "raftcache_partitions_led",
        "raftcache_raft_messages_total",
        "raftcache_snapshots_total",
        "raftcache_persist_flushes_total",
    ] {
        assert!(
            page.contains(&format!("# TYPE {family} ")),
            "{family} not exported"
        );
    }
    let missing = families_without_help_or_type(&page);
    assert!(
        missing.is_empty(),
        "node metric families without HELP or TYPE: {missing:?}"
    );

    // The CDC worker, without a Postgres (nothing listens at its URL): it serves its
    // metrics and retries the connection.
    let metrics = free_addr().unwrap();
    let pg = free_addr().unwrap();
    let tables = "[[table]]\nname = \"public.users\"\nkeys = [\"user:{id}\"]\n";
    let worker = CdcProc::start(
        &bins.cdc,
        &cdc_config(
            &format!("postgres://app@{pg}/app"),
            std::slice::from_ref(&ep),
            metrics,
            tables,
        ),
        metrics,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        match scrape_metrics(metrics) {
            Ok(page) if page.contains("raftcache_cdc_retries_total") => break page,
            other if Instant::now() >= deadline => {
                panic!("worker metrics: {other:?}\n--- log ---\n{}", worker.log())
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let missing = families_without_help_or_type(&page);
    assert!(
        missing.is_empty(),
        "worker metric families without HELP or TYPE: {missing:?}"
    );

    // Logs to a file (not a terminal): no colour escapes.
    for (who, log) in [("node", node.log()), ("worker", worker.log())] {
        assert!(!log.is_empty(), "the {who} logged nothing");
        assert!(
            !log.contains("\x1b["),
            "the {who}'s log has ANSI escapes:\n{log}"
        );
    }
    let out = output_within(
        Command::new(&bins.cli)
            .args(["--endpoints", &ep, "get", "k"])
            .env("RUST_LOG", "debug"),
        CLI_TIMEOUT,
    )
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.is_empty(), "the CLI logged nothing at debug");
    assert!(
        !err.contains("\x1b["),
        "the CLI's log has ANSI escapes:\n{err}"
    );
}

#[test]
fn every_subcommand_help_shows_its_own_options() {
    let bins = bins!();
    let help = |args: &[&str]| {
        let out = output_within(
            Command::new(&bins.cli).args(args).arg("--help"),
            CLI_TIMEOUT,
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let get = help(&["get"]);
    assert!(!get.contains("remove-node"), "get --help:\n{get}");
    assert!(
        get.contains("--endpoints") && get.contains("--timeout"),
        "{get}"
    );
    assert!(get.contains("--consistency"), "{get}");
    for sub in [
        &["set"][..],
        &["del"],
        &["incr"],
        &["expire"],
        &["persist"],
        &["ttl"],
        &["cluster"],
        &["stats"],
        &["bench"],
        &["stampede"],
        &["dev"],
        &["admin"],
        &["admin", "add-node"],
        &["admin", "transfer-leader"],
        &["admin", "rebalance"],
        &["admin", "snapshot"],
    ] {
        let text = help(sub);
        assert!(
            !text.contains("--wait") && !text.contains("the drain"),
            "{sub:?} --help talks about remove-node --wait:\n{text}"
        );
    }
    let remove = help(&["admin", "remove-node"]);
    assert!(
        remove.contains("--wait") && remove.contains("60s"),
        "{remove}"
    );
}

#[test]
fn wrong_endpoints_get_one_line_that_says_what_is_wrong() {
    let bins = bins!();
    let node = NodeProc::start(&bins, &["--resp-addr=127.0.0.1:0", "--partitions=2"]).unwrap();
    let resp = node.resp.unwrap().to_string();
    let metrics = node.metrics.to_string();
    let closed = free_addr().unwrap().to_string();
    let cases = [
        (
            "127.0.0.1".to_owned(),
            "error: invalid endpoint \"127.0.0.1\": no port (expected host:port, e.g. \
             127.0.0.1:7001)"
                .to_owned(),
        ),
        (
            resp.clone(),
            format!("error: {resp} is not a raftcache gRPC endpoint (is it the RESP or metrics port?)"),
        ),
        (
            metrics.clone(),
            format!(
                "error: {metrics} is not a raftcache gRPC endpoint (is it the RESP or metrics port?)"
            ),
        ),
        (closed.clone(), format!("error: nothing listens on {closed}")),
    ];
    for (endpoint, expected) in cases {
        let started = Instant::now();
        let (code, out, err) = cli(&bins, &endpoint, &["get", "k"]);
        let took = started.elapsed();
        assert_eq!(code, 2, "{endpoint}: {err}");
        assert_eq!(out, "", "{endpoint}");
        assert_eq!(err, format!("{expected}\n"), "{endpoint}");
        assert!(took < Duration::from_secs(5), "{endpoint}: took {took:?}");
        println!("{endpoint}: {took:?}: {}", err.trim_end());
    }
    // The good endpoint still works, and the library says the same as the CLI.
    let (code, _, err) = cli(&bins, &node.endpoint(), &["set", "k", "v"]);
    assert_eq!(code, 0, "{err}");
    runtime().block_on(async {
        let e = Client::connect(ClientConfig::new([resp.as_str()]))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            raftcache_client::ClientError::NotGrpcEndpoint(resp.clone())
        );
    });
}

#[test]
fn a_client_started_during_an_outage_degrades_then_uses_the_cache() {
    let bins = bins!();
    let addr = free_addr().unwrap().to_string();
    let rt = runtime();
    let client = rt.block_on(async {
        let started = Instant::now();
        let client = Client::connect(ClientConfig::new([addr.as_str()]))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!client.has_map());
        let loaded = client
            .get_or_load(
                "user:1",
                LoadOptions::ttl(Duration::from_secs(60)),
                || async { Ok(Bytes::from_static(b"from the database")) },
            )
            .await
            .unwrap();
        assert_eq!(loaded.source, LoadSource::Degraded);
        assert_eq!(loaded.value, "from the database");
        let started = Instant::now();
        let e = client.get("user:1").await.unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(200), "{e}");
        assert!(e.is_unapplied(), "{e:?}");
        client
    });
    let node = NodeProc::start_at(&bins, &addr, &["--partitions=4"]).unwrap();
    let up = Instant::now();
    rt.block_on(async {
        loop {
            match client.set("user:1", "cached").await {
                Ok(_) => break,
                Err(e) if up.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = e;
                }
                Err(e) => panic!("no cache within 10 s of the node being ready: {e}"),
            }
        }
        println!(
            "the client used the cache {:?} after the node was ready",
            up.elapsed()
        );
        assert!(client.has_map());
        let loaded = client
            .get_or_load(
                "user:1",
                LoadOptions::ttl(Duration::from_secs(60)),
                || async { Ok(Bytes::from_static(b"from the database")) },
            )
            .await
            .unwrap();
        assert_eq!(loaded.source, LoadSource::Cache);
        assert_eq!(loaded.value, "cached");
    });
    drop(node);
}
