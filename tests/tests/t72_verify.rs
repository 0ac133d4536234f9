//! `raftcache-cdc verify` end to end: a throwaway PostgreSQL, a cache node and a
//! streaming worker ([`CdcStack`]), and the real `raftcache-cdc` binary run as
//! `verify` against them. Everything on 127.0.0.1; every child is killed by a guard.
#![allow(clippy::unwrap_used)]

use raftcache_client::{Client, ClientConfig};
use raftcache_tests::cdc::{config, free_addr, CdcStack};
use raftcache_tests::pg::exec;
use raftcache_tests::{bins, output_within, runtime, scrape_metrics};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `accounts` in update mode (the worker writes the rows; its JSON is the expected
/// value), `items` in invalidate mode with a `verify-value` (the test fills the keys).
const TABLES: &str = r#"
[[table]]
name = "public.accounts"
keys = ["acct:{id}", "acct_by_email:{email}"]
mode = "update"

[[table]]
name = "items"
keys = ["item:{id}"]
verify-value = "t.v || '/' || t.qty"

[[table]]
name = "tags"
keys = ["tag:{name}"]
mode = "update"
"#;

/// Types whose text differs between `::text` and the output function pgoutput uses
/// (boolean), or that depend on session settings (timestamptz), on purpose.
const SCHEMA: &str = "
    CREATE TABLE accounts (id int PRIMARY KEY, email text, name text, active boolean,
                           balance numeric(10,2), created timestamptz);
    ALTER TABLE accounts REPLICA IDENTITY FULL;
    CREATE TABLE items (id int PRIMARY KEY, v text, qty int);
    CREATE TABLE tags (name text NOT NULL, note text);
    ALTER TABLE tags REPLICA IDENTITY FULL;
";

const ACCOUNTS: u64 = 300;
/// Accounts with a NULL email (id % 10 == 0) have no `acct_by_email:` key.
const ACCOUNT_KEYS: u64 = ACCOUNTS + ACCOUNTS - ACCOUNTS / 10;
const ITEMS: u64 = 100;
const ITEMS_FILLED: u64 = 50;
/// `tags` has no primary key: `--all` pages by `(tableoid, ctid)`.
const TAGS: u64 = 30;

/// How long one verify run may take before it is killed.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `raftcache-cdc verify --config <config> args…` to completion (killed after
/// [`RUN_TIMEOUT`]).
fn verify(bin: &Path, config: &Path, args: &[&str]) -> Output {
    let started = Instant::now();
    let mut cmd = Command::new(bin);
    cmd.arg("verify")
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("RAFTCACHE_CDC_CONFIG");
    let out = output_within(&mut cmd, RUN_TIMEOUT).unwrap();
    eprintln!(
        "verify {args:?}: {:?} in {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status.code(),
        started.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {out:?}"))
}

/// A `verify --watch` child, SIGKILLed on drop.
struct Watch(Option<Child>);

impl Drop for Watch {
    fn drop(&mut self) {
        raftcache_tests::kill_reap(&mut self.0);
    }
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn verify_finds_exactly_the_stale_keys() {
    let rt = runtime();
    let bins = bins!();
    let s = CdcStack::start(&bins, &rt, SCHEMA, TABLES).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "cdc.toml",
        &config(&s.pg.url(), &[s.node.endpoint()], s.metrics, TABLES),
    );
    let cache = rt.block_on(async {
        let db = s.pg.client().await;
        let c = Client::connect(ClientConfig::new([s.node.endpoint()]))
            .await
            .unwrap();
        let l = exec(
            &db,
            &format!(
                "INSERT INTO accounts SELECT g, \
                   CASE WHEN g % 10 = 0 THEN NULL ELSE 'u' || g || '@x' END, \
                   CASE WHEN g % 7 = 0 THEN NULL ELSE 'name ' || g END, \
                   g % 2 = 0, g * 1.25, '2024-01-01 00:00+00'::timestamptz + g * interval '1 hour' \
                 FROM generate_series(1, {ACCOUNTS}) g;
                 INSERT INTO items SELECT g, 'v' || g, g * 3 FROM generate_series(1, {ITEMS}) g;
                 INSERT INTO tags SELECT 't' || g, 'note ' || g FROM generate_series(1, {TAGS}) g"
            ),
        )
        .await;
        // CDC caught up: the last account's keys are written.
        let last = c
            .get_with_min_lsn(format!("acct:{ACCOUNTS}"), l)
            .await
            .unwrap();
        assert!(last.is_some(), "the worker wrote the accounts");
        c
    });

    // A clean stack: every key equal (update mode wrote them all), nothing stale; in
    // pages by the primary key.
    let out = verify(
        &bins.cdc,
        &cfg,
        &[
            "--all",
            "--json",
            "--table",
            "accounts",
            "--page-size",
            "64",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r = json(&out);
    assert_eq!(r["checked"], ACCOUNT_KEYS, "{r}");
    assert_eq!(
        r["equal"], ACCOUNT_KEYS,
        "the worker's encoding, byte for byte: {r}"
    );
    assert_eq!(r["stale"], 0, "{r}");
    assert_eq!(r["tables"][0]["rows"], ACCOUNTS, "{r}");
    assert_eq!(r["nines"], 2, "{r}");
    assert_eq!(r["nines_at_least"], true, "{r}");
    assert!(
        r["agreement"]
            .as_str()
            .unwrap()
            .starts_with(&format!("≥ 2 nines (0 of {ACCOUNT_KEYS} stale beyond 1s)")),
        "{r}"
    );
    // A table without a primary key, in pages by (tableoid, ctid).
    let out = verify(
        &bins.cdc,
        &cfg,
        &["--all", "--json", "--table", "tags", "--page-size", "7"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r = json(&out);
    assert_eq!(r["tables"][0]["rows"], TAGS, "{r}");
    assert_eq!(r["equal"], TAGS, "{r}");

    // Every table, sampled (the default scope); the items are not cached: absent.
    let out = verify(&bins.cdc, &cfg, &["--sample", "40", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r = json(&out);
    assert_eq!(r["scope"], "sample");
    assert_eq!(r["tables"][0]["rows"], 40, "{r}");
    assert_eq!(r["tables"][1]["rows"], 40, "{r}");
    assert_eq!(r["tables"][1]["absent"], 40, "{r}");
    assert_eq!(r["stale"], 0, "{r}");

    // --max-time: the round stops early and says so.
    let out = verify(&bins.cdc, &cfg, &["--all", "--json", "--max-time", "1ms"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r = json(&out);
    assert_eq!(r["truncated"], true, "{r}");
    assert!(
        r["checked"].as_u64().unwrap() < ACCOUNT_KEYS + ITEMS + TAGS,
        "{r}"
    );

    // One key made stale on purpose: a plain set, bypassing the app and the worker.
    rt.block_on(cache.set("acct:42", "wrong")).unwrap();
    let out = verify(&bins.cdc, &cfg, &["--all", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r = json(&out);
    assert_eq!(r["stale"], 1, "{r}");
    assert_eq!(r["checked"], ACCOUNT_KEYS + ITEMS + TAGS, "{r}");
    assert_eq!(r["equal"], ACCOUNT_KEYS - 1 + TAGS, "{r}");
    assert_eq!(r["absent"], ITEMS, "{r}");
    let stale = &r["stale_keys"][0];
    assert_eq!(stale["key"], "acct:42", "{r}");
    assert_eq!(stale["table"], "public.accounts", "{r}");
    assert_eq!(stale["cached"], "wrong", "{r}");
    let expected = stale["expected"].as_str().unwrap();
    // The start of the row's JSON (keys sorted): 42 × 1.25.
    assert!(
        expected.starts_with("{\"active\":\"t\",\"balance\":\"52.50\""),
        "{expected}"
    );
    assert!(stale["row_lsn"].as_str().unwrap().contains('/'), "{r}");
    assert_eq!(r["nines"], 2, "1 of {}: {r}", ACCOUNT_KEYS + ITEMS + TAGS);
    // The text report names it too.
    let out = verify(&bins.cdc, &cfg, &["--all", "--bound", "300ms"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("  acct:42  (public.accounts)"), "{text}");
    assert!(text.contains("cached    \"wrong\""), "{text}");
    assert!(text.contains("1 stale"), "{text}");
    let sentence = format!(
        "agreement: 2 nines (1 of {} stale beyond 300ms)",
        ACCOUNT_KEYS + ITEMS + TAGS
    );
    assert!(text.contains(&sentence), "{text}");

    // The worker repairs it when the row changes: verify agrees again.
    rt.block_on(async {
        let db = s.pg.client().await;
        let l = exec(&db, "UPDATE accounts SET name = 'renamed' WHERE id = 42").await;
        let v = cache.get_with_min_lsn("acct:42", l).await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&v.value).contains("renamed"));
    });
    let out = verify(&bins.cdc, &cfg, &["--all", "--json", "--table", "accounts"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(json(&out)["equal"], ACCOUNT_KEYS);

    // A change in flight is not stale: with the worker paused, a row changes; verify
    // sees the old value, rechecks at a watermark past the row, and the key converges
    // once the worker resumes (after 1 s, well within the bound; the lease lasts 2 s).
    raftcache_tests::signal(s.worker.pid, libc::SIGSTOP);
    let resumed = {
        let pid = s.worker.pid;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1000));
            raftcache_tests::signal(pid, libc::SIGCONT);
        })
    };
    rt.block_on(async {
        let db = s.pg.client().await;
        exec(&db, "UPDATE accounts SET name = 'in flight' WHERE id = 43").await;
    });
    let out = verify(
        &bins.cdc,
        &cfg,
        &["--all", "--json", "--table", "accounts", "--bound", "10s"],
    );
    resumed.join().unwrap();
    raftcache_tests::signal(s.worker.pid, libc::SIGCONT);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r = json(&out);
    // Both keys of the row (by id and by email) hold its JSON.
    assert_eq!(r["converged"], 2, "{r}");
    assert_eq!(r["stale"], 0, "{r}");
    assert_eq!(r["equal"], ACCOUNT_KEYS - 2, "{r}");
    let waited = r["convergence"]["max_ms"].as_f64().unwrap();
    assert!((50.0..10_000.0).contains(&waited), "{r}");

    // The invalidate-mode table with verify-value: the app's fills, one of them wrong.
    rt.block_on(async {
        for id in 1..=ITEMS_FILLED {
            let value = if id == 7 {
                "bogus".to_owned()
            } else {
                format!("v{id}/{}", id * 3)
            };
            cache.set(format!("item:{id}"), value).await.unwrap();
        }
    });
    let out = verify(
        &bins.cdc,
        &cfg,
        &["--all", "--json", "--table", "public.items"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r = json(&out);
    assert_eq!(r["checked"], ITEMS, "{r}");
    assert_eq!(r["stale"], 1, "{r}");
    assert_eq!(r["equal"], ITEMS_FILLED - 1, "{r}");
    assert_eq!(r["absent"], ITEMS - ITEMS_FILLED, "{r}");
    assert_eq!(r["stale_keys"][0]["key"], "item:7", "{r}");
    assert_eq!(r["stale_keys"][0]["cached"], "bogus", "{r}");
    assert_eq!(r["stale_keys"][0]["expected"], "v7/21", "{r}");

    // --watch exports the same figures as Prometheus metrics.
    let listen = free_addr().unwrap();
    let mut cmd = Command::new(&bins.cdc);
    cmd.arg("verify")
        .arg("--config")
        .arg(&cfg)
        .args([
            "--watch",
            "--interval",
            "300ms",
            "--all",
            "--table",
            "items",
        ])
        .arg("--metrics-listen")
        .arg(listen.to_string())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    raftcache_tests::die_with_parent(&mut cmd);
    let _watch = Watch(Some(cmd.spawn().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape_metrics(listen).unwrap_or_default();
        if raftcache_tests::metric_value(&text, "raftcache_cdc_verify_rounds_total")
            .is_some_and(|n| n >= 2.0)
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no two rounds within 20 s: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let metric = |name: &str| raftcache_tests::metric_value(&text, name).unwrap_or(-1.0);
    assert_eq!(
        metric("raftcache_cdc_verify_last_round_stale"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric("raftcache_cdc_verify_last_round_checked"),
        ITEMS as f64,
        "{text}"
    );
    assert!(
        metric("raftcache_cdc_verify_checked_total") >= 2.0 * ITEMS as f64,
        "{text}"
    );
    assert!(metric("raftcache_cdc_verify_stale_total") >= 2.0, "{text}");
    assert!(
        metric("raftcache_cdc_verify_equal_total") >= 2.0 * 49.0,
        "{text}"
    );
    assert!(
        metric("raftcache_cdc_verify_absent_total") >= 2.0 * 50.0,
        "{text}"
    );
    assert!(
        text.contains("# HELP raftcache_cdc_verify_stale_total "),
        "{text}"
    );
}

/// One line on stderr, starting `error:`.
fn one_error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    lines[0].to_owned()
}

#[test]
fn verify_errors_exit_2_with_one_line() {
    let bins = bins!();
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on these (bound, then released).
    let pg_port = free_addr().unwrap().port();
    let cache = free_addr().unwrap().to_string();
    let url = format!("postgres://app:secret@127.0.0.1:{pg_port}/app?sslmode=disable");
    let metrics = free_addr().unwrap();

    let bad = config(
        &url,
        std::slice::from_ref(&cache),
        metrics,
        "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\nverify-value = \"  \"\n",
    );
    let out = verify(&bins.cdc, &write_config(dir.path(), "bad.toml", &bad), &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let line = one_error_line(&out);
    assert!(line.contains("table[0].verify-value"), "{line}");
    assert!(out.stdout.is_empty(), "{out:?}");

    let unknown = config(
        &url,
        std::slice::from_ref(&cache),
        metrics,
        "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\nverify = true\n",
    );
    let out = verify(
        &bins.cdc,
        &write_config(dir.path(), "unknown.toml", &unknown),
        &["--json"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(one_error_line(&out).contains("unknown field"), "{out:?}");

    let missing = dir.path().join("missing.toml");
    let out = verify(&bins.cdc, &missing, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(one_error_line(&out).contains("missing.toml"), "{out:?}");

    // A good file, but Postgres is not there.
    let good = config(
        &url,
        &[cache],
        metrics,
        "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n",
    );
    let good = write_config(dir.path(), "good.toml", &good);
    let out = verify(&bins.cdc, &good, &["--all"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(one_error_line(&out).contains("Postgres"), "{out:?}");

    // Bad flags are usage errors (clap's exit 2), and an unknown --table is an error.
    let out = verify(&bins.cdc, &good, &["--sample", "5", "--all"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = verify(&bins.cdc, &good, &["--table", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(one_error_line(&out).contains("--table nope"), "{out:?}");

    // The worker's own command line is unchanged: --check still checks the file.
    let out = output_within(
        Command::new(&bins.cdc)
            .arg("--config")
            .arg(&good)
            .arg("--check"),
        RUN_TIMEOUT,
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}
