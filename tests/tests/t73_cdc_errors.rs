//! CDC worker fail-fast: every permanent misconfiguration of Postgres ends the real
//! `raftcache-cdc` within seconds with exit 3 and one line naming the cause and the fix
//! (never "standby", never a retry loop); a transient one (Postgres down, then up) is
//! retried and counted, warned about once, until the worker streams. `drop-slot` drops
//! the slot, and refuses while a worker streams on it.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use raftcache_client::{Client, ClientConfig, SetOptions};
use raftcache_tests::cdc::{config, free_addr, CdcProc, CdcStack};
use raftcache_tests::pg::{PgCluster, SUPERUSER, SUPERUSER_PASSWORD};
use raftcache_tests::{bins, die_with_parent, output_within, runtime, Bins, NodeProc};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SCHEMA: &str = "CREATE TABLE users (id int PRIMARY KEY, email text, name text);";

const TABLES: &str = r#"
[[table]]
name = "public.users"
keys = ["user:{id}"]
"#;

/// How long a misconfigured worker may take to give up.
const FAIL_FAST: Duration = Duration::from_secs(15);

/// The worker's exit code for configuration and set-up errors.
const EXIT_MISCONFIGURED: i32 = 3;

/// Runs `raftcache-cdc [args] --config <toml>` to its end (killed after `limit`).
fn run_cdc(bins: &Bins, args: &[&str], toml: &str, limit: Duration) -> (Output, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cdc.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(&bins.cdc);
    cmd.args(args)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info");
    die_with_parent(&mut cmd);
    let started = Instant::now();
    let out = output_within(&mut cmd, limit)
        .unwrap_or_else(|e| panic!("raftcache-cdc {args:?} with\n{toml}\n: {e:#}"));
    (out, started.elapsed())
}

/// Asserts that the worker with `toml` exits with [`EXIT_MISCONFIGURED`] within
/// [`FAIL_FAST`], without retrying or standing by, and that its stderr is exactly one
/// `error:` line, containing every one of `expect`. Returns that line.
fn fails_fast(bins: &Bins, toml: &str, expect: &[&str]) -> String {
    let (out, took) = run_cdc(bins, &[], toml, FAIL_FAST);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!("took {took:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert_eq!(
        out.status.code(),
        Some(EXIT_MISCONFIGURED),
        "exit code; {context}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line; {context}");
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "nothing else on stderr; {context}"
    );
    for e in expect {
        assert!(errors[0].contains(e), "{e:?} missing; {context}");
    }
    assert!(
        !stderr.contains("WARN"),
        "no retries or warnings; {context}"
    );
    assert!(
        !stdout.contains("standby") && !stdout.contains("streaming"),
        "{context}"
    );
    eprintln!("exit {EXIT_MISCONFIGURED} after {took:?}: {}", errors[0]);
    errors[0].to_owned()
}

/// `postgres://user:password@127.0.0.1:PORT/db`.
fn url(pg: &PgCluster, user: &str, password: &str, db: &str) -> String {
    format!(
        "postgres://{user}:{password}@127.0.0.1:{}/{db}?sslmode=disable",
        pg.port()
    )
}

#[test]
fn wal_level_replica_stops_the_worker_with_the_fix() {
    let bins = bins!();
    let rt = runtime();
    let mut pg = PgCluster::start().unwrap();
    pg.psql(&["ALTER SYSTEM SET wal_level = replica"]).unwrap();
    pg.restart().unwrap();
    rt.block_on(async { pg.client().await.batch_execute(SCHEMA).await.unwrap() });
    let node = NodeProc::start(&bins, &[]).unwrap();
    let toml = config(&pg.url(), &[node.endpoint()], free_addr().unwrap(), TABLES);
    fails_fast(
        &bins,
        &toml,
        &[
            "wal_level=replica",
            "logical decoding needs wal_level=logical",
            "ALTER SYSTEM SET wal_level = logical and restart Postgres",
        ],
    );
}

#[test]
fn permanent_misconfigurations_stop_the_worker_with_one_line() {
    let bins = bins!();
    let rt = runtime();
    let pg = PgCluster::start().unwrap();
    pg.psql(&[
        "CREATE ROLE norepl LOGIN PASSWORD 'secret'",
        &format!(
            "CREATE DATABASE other OWNER {}",
            raftcache_tests::pg::APP_USER
        ),
    ])
    .unwrap();
    let node = NodeProc::start(&bins, &[]).unwrap();
    let endpoints = [node.endpoint()];
    rt.block_on(async {
        pg.client().await.batch_execute(SCHEMA).await.unwrap();
        // A slot of the same name in another database.
        let other = pg
            .try_client(&url(&pg, SUPERUSER, SUPERUSER_PASSWORD, "other"))
            .await
            .unwrap();
        other
            .batch_execute("SELECT pg_create_logical_replication_slot('raftcache', 'pgoutput')")
            .await
            .unwrap();
    });
    let with = |url: &str, tables: &str| config(url, &endpoints, free_addr().unwrap(), tables);

    // A wrong password.
    fails_fast(
        &bins,
        &with(&url(&pg, "app", "wrong", "app"), TABLES),
        &["rejected the password", "28P01", "[postgres] url"],
    );
    // A role without REPLICATION.
    fails_fast(
        &bins,
        &with(&url(&pg, "norepl", "secret", "app"), TABLES),
        &[
            "may not use logical replication",
            "ALTER ROLE norepl REPLICATION",
        ],
    );
    // A database that does not exist.
    fails_fast(
        &bins,
        &with(&url(&pg, "app", "secret", "nosuchdb"), TABLES),
        &["database \"nosuchdb\" does not exist", "3D000"],
    );
    // A mapped table that does not exist.
    fails_fast(
        &bins,
        &with(
            &pg.url(),
            "[[table]]\nname = \"public.nope\"\nkeys = [\"nope:{id}\"]\n",
        ),
        &["mapped table public.nope does not exist", "create it"],
    );
    // The slot belongs to another database. Another worker holds the lease, so a worker
    // that did not check Postgres first would print "standby" and wait.
    rt.block_on(async {
        let c = Client::connect(ClientConfig::new(endpoints.clone()))
            .await
            .unwrap();
        let options = SetOptions {
            ttl: Some(Duration::from_secs(120)),
            ..SetOptions::default()
        };
        c.set_with(
            "__raftcache:cdc:lease:raftcache",
            Bytes::from_static(b"someone-else"),
            options,
        )
        .await
        .unwrap();
    });
    fails_fast(
        &bins,
        &with(&pg.url(), TABLES),
        &[
            "replication slot \"raftcache\"",
            "belongs to database \"other\", not \"app\"",
            "drop-slot",
        ],
    );
}

#[test]
fn postgres_down_at_start_is_retried_until_the_worker_streams() {
    let bins = bins!();
    let rt = runtime();
    let mut pg = PgCluster::start().unwrap();
    rt.block_on(async { pg.client().await.batch_execute(SCHEMA).await.unwrap() });
    let node = NodeProc::start(&bins, &[]).unwrap();
    pg.stop().unwrap();

    let metrics = free_addr().unwrap();
    let mut w = CdcProc::start(
        &bins.cdc,
        &config(&pg.url(), &[node.endpoint()], metrics, TABLES),
        metrics,
    )
    .unwrap();
    let retries = r#"raftcache_cdc_retries_total{cause="connect"}"#;
    let deadline = Instant::now() + Duration::from_secs(20);
    let n = loop {
        assert!(
            raftcache_tests::process_alive(w.pid),
            "the worker exited on a transient error:\n{}",
            w.log()
        );
        match w.metric(retries) {
            Ok(n) if n >= 3.0 => break n,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("{retries}: {other:?}\n{}", w.log()),
        }
    };
    let text = raftcache_tests::scrape_metrics(metrics).unwrap();
    assert!(
        text.contains("# HELP raftcache_cdc_retries_total")
            && text.contains(r#"raftcache_cdc_retries_total{cause="shutdown"} 0"#),
        "{text}"
    );
    let log = w.log();
    assert_eq!(
        log.matches("Postgres is not reachable").count(),
        1,
        "one warning for {n} retries:\n{log}"
    );
    assert!(!log.contains("standby"), "{log}");

    let t = Instant::now();
    pg.start_again().unwrap();
    w.wait_event("streaming", Duration::from_secs(30)).unwrap();
    eprintln!(
        "streaming {:?} after Postgres started ({n} retries before)",
        t.elapsed()
    );
    assert!(w.log().contains("after retries"), "{}", w.log());

    // A restart while streaming (57P01 admin_shutdown, then refused connections) is
    // transient too.
    pg.restart().unwrap();
    w.wait_event("streaming", Duration::from_secs(30)).unwrap();
    assert!(raftcache_tests::process_alive(w.pid));
}

/// `active` of every slot named `raftcache`.
fn slots(rt: &tokio::runtime::Runtime, pg: &PgCluster) -> Vec<bool> {
    rt.block_on(async {
        pg.client()
            .await
            .query(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'raftcache'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, bool>(0))
            .collect()
    })
}

#[test]
fn drop_slot_refuses_while_streaming_and_drops_once_stopped() {
    let bins = bins!();
    let rt = runtime();
    let mut s = CdcStack::start(&bins, &rt, SCHEMA, TABLES).unwrap();
    let toml = config(
        &s.pg.url(),
        &[s.node.endpoint()],
        free_addr().unwrap(),
        TABLES,
    );
    assert_eq!(slots(&rt, &s.pg), vec![true]);

    let (out, _) = run_cdc(&bins, &["drop-slot"], &toml, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("is active") && stderr.contains("stop the worker first"),
        "{stderr}"
    );
    assert_eq!(
        slots(&rt, &s.pg),
        vec![true],
        "refused: the slot is still there"
    );

    s.worker.kill9();
    // The walsender exits once it notices the worker is gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (out, took) = loop {
        let (out, took) = run_cdc(&bins, &["drop-slot"], &toml, Duration::from_secs(30));
        if out.status.code() != Some(1) || Instant::now() >= deadline {
            break (out, took);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains("dropped replication slot \"raftcache\" of database \"app\""),
        "{stdout}"
    );
    eprintln!("drop-slot took {took:?}: {}", stdout.trim());
    assert_eq!(slots(&rt, &s.pg), Vec::<bool>::new(), "the slot is gone");

    let (out, _) = run_cdc(&bins, &["drop-slot"], &toml, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing dropped"),
        "{out:?}"
    );
}
