//! CDC end to end: a real throwaway PostgreSQL (wal_level=logical), real cache nodes, the
//! real `raftcache-cdc` worker; changes are made with SQL and checked through the client.
#![allow(clippy::unwrap_used)]

use raftcache_client::{Client, ClientConfig, ClientError, Lsn, PgSnapshot};
use raftcache_tests::cdc::{config, free_addr, CdcProc, CdcStack};
use raftcache_tests::pg::{current_lsn, exec};
use raftcache_tests::{bins, run_cli, runtime, NodeProc};
use std::time::{Duration, Instant};

const TABLES: &str = r#"
[[table]]
name = "public.users"
keys = ["user:{id}", "user_by_email:{email}"]

[[table]]
name = "profiles"
keys = ["profile:{id}"]
mode = "update"
ttl = "10m"
"#;

const SCHEMA: &str = "
    CREATE TABLE users (id int PRIMARY KEY, email text, name text);
    ALTER TABLE users REPLICA IDENTITY FULL;
    CREATE TABLE profiles (id int PRIMARY KEY, bio text);
    CREATE TABLE unrelated (id int PRIMARY KEY);
";

/// Postgres with [`SCHEMA`], one cache node, one worker streaming [`TABLES`].
fn setup(rt: &tokio::runtime::Runtime) -> CdcStack {
    CdcStack::start(&bins!(), rt, SCHEMA, TABLES).unwrap()
}

async fn cache(node: &NodeProc) -> Client {
    Client::connect(ClientConfig::new([node.endpoint()]))
        .await
        .unwrap()
}

/// A `min_lsn` read of `key`: the value's text, or None.
async fn read(c: &Client, key: &str, lsn: Lsn) -> Option<String> {
    c.get_with_min_lsn(key, lsn)
        .await
        .unwrap_or_else(|e| panic!("min_lsn read of {key} at {lsn}: {e}"))
        .map(|v| String::from_utf8(v.value.to_vec()).unwrap())
}

#[test]
fn row_changes_invalidate_or_update_the_mapped_keys() {
    let rt = runtime();
    let s = setup(&rt);
    rt.block_on(async {
        let db = s.pg.client().await;
        let c = cache(&s.node).await;

        // INSERT invalidates keys filled before the row existed.
        for k in ["user:1", "user_by_email:a@x", "other:1"] {
            c.set(k, "cached").await.unwrap();
        }
        let l = exec(&db, "INSERT INTO users VALUES (1, 'a@x', 'Ada')").await;
        assert_eq!(read(&c, "user:1", l).await, None);
        assert_eq!(read(&c, "user_by_email:a@x", l).await, None);
        assert_eq!(read(&c, "other:1", l).await.as_deref(), Some("cached"), "unmapped key kept");

        // UPDATE changing the key column: the new and the *old* email key go.
        for k in ["user:1", "user_by_email:a@x", "user_by_email:b@x"] {
            c.set(k, "cached").await.unwrap();
        }
        let l = exec(&db, "UPDATE users SET email = 'b@x' WHERE id = 1").await;
        for k in ["user:1", "user_by_email:a@x", "user_by_email:b@x"] {
            assert_eq!(read(&c, k, l).await, None, "{k} after the email change");
        }

        // DELETE.
        c.set("user:1", "cached").await.unwrap();
        c.set("user_by_email:b@x", "cached").await.unwrap();
        let l = exec(&db, "DELETE FROM users WHERE id = 1").await;
        assert_eq!(read(&c, "user:1", l).await, None);
        assert_eq!(read(&c, "user_by_email:b@x", l).await, None);

        // A multi-row transaction.
        for id in 10..20 {
            c.set(format!("user:{id}"), "cached").await.unwrap();
        }
        let l = exec(
            &db,
            "BEGIN; INSERT INTO users SELECT g, 'u' || g || '@x', 'n' FROM generate_series(10, 19) g; COMMIT",
        )
        .await;
        for id in 10..20 {
            assert_eq!(read(&c, &format!("user:{id}"), l).await, None, "user:{id}");
        }

        // TRUNCATE: every key of the table's key spaces, whatever row it came from.
        for k in ["user:10", "user:999", "user_by_email:zz", "profile:1", "other:2"] {
            c.set(k, "cached").await.unwrap();
        }
        let l = exec(&db, "TRUNCATE users").await;
        for k in ["user:10", "user:999", "user_by_email:zz"] {
            assert_eq!(read(&c, k, l).await, None, "{k} after TRUNCATE");
        }
        assert_eq!(read(&c, "profile:1", l).await.as_deref(), Some("cached"));
        assert_eq!(read(&c, "other:2", l).await.as_deref(), Some("cached"));

        // Update mode writes the row as JSON, with the table's TTL.
        let l = exec(&db, "INSERT INTO profiles VALUES (1, 'hello')").await;
        let v = c.get_with_min_lsn("profile:1", l).await.unwrap().expect("row written");
        let json: serde_json::Value = serde_json::from_slice(&v.value).unwrap();
        assert_eq!(json, serde_json::json!({"id": "1", "bio": "hello"}));
        assert!(v.ttl.is_some_and(|t| t > Duration::from_secs(500)), "{:?}", v.ttl);
        assert!(v.source_lsn > Lsn::ZERO && v.source_lsn <= l, "{}", v.source_lsn);
        let l = exec(&db, "UPDATE profiles SET bio = NULL WHERE id = 1").await;
        let v = read(&c, "profile:1", l).await.expect("row rewritten");
        let json: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(json, serde_json::json!({"id": "1", "bio": null}));
        let l = exec(&db, "DELETE FROM profiles WHERE id = 1").await;
        assert_eq!(read(&c, "profile:1", l).await, None);

        // Unmapped tables change nothing, but still move the watermark.
        c.set("user:5", "cached").await.unwrap();
        let l = exec(&db, "INSERT INTO unrelated VALUES (1)").await;
        assert_eq!(read(&c, "user:5", l).await.as_deref(), Some("cached"));

        let rows = s.worker.metric("raftcache_cdc_rows_total").unwrap();
        assert!(rows >= 15.0, "rows applied: {rows}");
        // Every partition's watermark moved (the cluster view shows it).
        let status = c.cluster_status().await.unwrap();
        assert!(
            status.partitions.iter().all(|p| p.cdc_lsn >= l),
            "{:?}",
            status.partitions.iter().map(|p| p.cdc_lsn).collect::<Vec<_>>()
        );
    });
}

#[test]
fn a_stale_fill_after_an_invalidation_is_refused() {
    let rt = runtime();
    let s = setup(&rt);
    rt.block_on(async {
        let reader = s.pg.client().await;
        let writer = s.pg.client().await;
        let c = cache(&s.node).await;
        exec(&writer, "INSERT INTO users VALUES (7, 'old@x', 'Old')").await;

        // The slow reader: position first, then the row.
        let read_at = current_lsn(&reader).await;
        let row = reader
            .query_one("SELECT name FROM users WHERE id = 7", &[])
            .await
            .unwrap();
        let stale: String = row.get(0);
        assert_eq!(stale, "Old");

        // The writer commits; CDC invalidates.
        let l = exec(&writer, "UPDATE users SET name = 'New' WHERE id = 7").await;
        assert_eq!(read(&c, "user:7", l).await, None);

        // The slow reader's fill comes too late and is refused, as a status.
        let outcome = c
            .set_if_newer("user:7", stale.clone(), read_at, None)
            .await
            .unwrap();
        assert!(!outcome.applied, "{outcome:?}");
        let newer = outcome.refused_by.expect("refused as stale");
        assert!(newer > read_at, "refused by {newer}, read at {read_at}");
        assert_eq!(
            c.get("user:7").await.unwrap(),
            None,
            "the stale row is not cached"
        );

        // The same through the CLI: exit 3 with a one-line reason.
        let out = run_cli(
            &bins!(),
            &s.node.endpoint(),
            &["set", "--source-lsn", &read_at.to_string(), "user:7", "Old"],
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("stale"),
            "{out:?}"
        );

        // The exact form: the stale reader's snapshot (taken with its read, before the
        // UPDATE) is refused too, through the client and the CLI.
        let (stale_snap, fresh_snap, fresh_at) = {
            let snap = |sql: &'static str| {
                let reader = &reader;
                async move {
                    let row = reader.query_one(sql, &[]).await.unwrap();
                    row.get::<_, String>(0).parse::<PgSnapshot>().unwrap()
                }
            };
            let fresh = snap("SELECT pg_current_snapshot()::text FROM users WHERE id = 7").await;
            // Older than the UPDATE: its xid is not below xmin, nor visible.
            let stale = PgSnapshot::new(3, 3, Vec::new()).unwrap();
            (stale, fresh, current_lsn(&reader).await)
        };
        let outcome = c
            .set_if_fresh("user:7", "Old", &stale_snap, None)
            .await
            .unwrap();
        assert!(
            !outcome.applied && outcome.refused_by.is_some(),
            "{outcome:?}"
        );
        let out = run_cli(
            &bins!(),
            &s.node.endpoint(),
            &["set", "--source-snapshot", "3:3:", "user:7", "Old"],
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("not visible in snapshot"),
            "{out:?}"
        );

        // A fresh fill (row and snapshot read after the commit) is accepted. (The LSN
        // form would need an LSN past the commit's end, i.e. any later WAL.)
        let outcome = c
            .set_if_fresh("user:7", "New", &fresh_snap, None)
            .await
            .unwrap();
        assert!(
            outcome.applied && outcome.refused_by.is_none(),
            "{outcome:?}"
        );
        let out = run_cli(
            &bins!(),
            &s.node.endpoint(),
            &["get", "--min-lsn", &fresh_at.to_string(), "user:7"],
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "New",
            "{out:?}"
        );
    });
}

#[test]
fn min_lsn_reads_never_see_the_old_value() {
    let rt = runtime();
    let s = setup(&rt);
    rt.block_on(async {
        let db = s.pg.client().await;
        let c = cache(&s.node).await;
        exec(&db, "INSERT INTO users VALUES (1, 'a@x', 'v0')").await;
        let mut waited = Duration::ZERO;
        for i in 0..1000 {
            c.set("user:1", format!("old-{i}")).await.unwrap();
            let l = exec(&db, &format!("UPDATE users SET name = 'v{i}' WHERE id = 1")).await;
            let t = Instant::now();
            assert_eq!(
                read(&c, "user:1", l).await,
                None,
                "iteration {i}: old value served"
            );
            waited += t.elapsed();
        }
        eprintln!("mean min_lsn read after commit: {:?}", waited / 1000);
        // A position CDC can never reach fails clearly.
        let far = Lsn(u64::MAX / 2);
        match c.get_with_min_lsn("user:1", far).await {
            Err(ClientError::LsnNotReached { .. }) => {}
            other => panic!("expected LSN_NOT_REACHED, got {other:?}"),
        }
    });
}

#[test]
fn a_killed_worker_replays_and_loses_no_invalidation() {
    let rt = runtime();
    let mut s = setup(&rt);
    rt.block_on(async {
        let db = s.pg.client().await;
        let c = cache(&s.node).await;
        exec(
            &db,
            "INSERT INTO users SELECT g, 'u' || g || '@x', 'n0' FROM generate_series(1, 5000) g",
        )
        .await;
        let mut rng_state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state
        };
        let mut changed = std::collections::BTreeSet::new();
        let mut restarted = None;
        for i in 0..1000u32 {
            let id = (next() % 200 + 1) as i32;
            // A fill of the row as read now, then a change to the row: the change's
            // invalidation must win whatever happens to the worker.
            let at = current_lsn(&db).await;
            c.set_if_newer(format!("user:{id}"), format!("fill-{i}"), at, None)
                .await
                .unwrap();
            db.execute(
                "UPDATE users SET name = $1 WHERE id = $2",
                &[&format!("n{i}"), &id],
            )
            .await
            .unwrap();
            changed.insert(id);
            if i == 300 {
                // A large transaction in flight, then kill -9.
                db.batch_execute("UPDATE users SET name = name || '+' WHERE id > 200")
                    .await
                    .unwrap();
                s.worker.kill9();
            }
            if i == 600 {
                let mut w = s.start_worker().unwrap();
                w.wait_event("streaming", Duration::from_secs(30)).unwrap();
                restarted = Some(w);
            }
        }
        let end = current_lsn(&db).await;
        for id in &changed {
            assert_eq!(
                read(&c, &format!("user:{id}"), end).await,
                None,
                "user:{id} changed but its fill survived"
            );
        }
        assert!(changed.len() > 150, "{} rows changed", changed.len());
        drop(restarted);
    });
}

#[test]
fn the_worker_resumes_after_postgres_restarts() {
    let rt = runtime();
    let mut s = setup(&rt);
    rt.block_on(async {
        let c = cache(&s.node).await;
        {
            let db = s.pg.client().await;
            exec(&db, "INSERT INTO users VALUES (1, 'a@x', 'v0')").await;
        }
        s.pg.restart().unwrap();
        let db = s.pg.client().await;
        c.set("user:1", "cached").await.unwrap();
        let l = exec(&db, "UPDATE users SET name = 'v1' WHERE id = 1").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match c.get_with_min_lsn("user:1", l).await {
                Ok(v) => {
                    assert_eq!(v, None, "invalidated after the restart");
                    break;
                }
                Err(ClientError::LsnNotReached { .. }) if Instant::now() < deadline => {}
                Err(e) => panic!("{e}"),
            }
        }
        let reconnects = s.worker.metric("raftcache_cdc_reconnects_total").unwrap();
        assert!(reconnects >= 1.0, "reconnects: {reconnects}");
    });
}

#[test]
fn a_standby_worker_takes_over() {
    let rt = runtime();
    let mut s = setup(&rt);
    let standby_metrics = free_addr().unwrap();
    let mut standby = CdcProc::start(
        &bins!().cdc,
        &config(&s.pg.url(), &[s.node.endpoint()], standby_metrics, TABLES),
        standby_metrics,
    )
    .unwrap();
    standby
        .wait_event("standby", Duration::from_secs(30))
        .unwrap();
    s.worker.kill9();
    let killed = Instant::now();
    standby
        .wait_event("streaming", Duration::from_secs(30))
        .unwrap();
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(15), "takeover took {took:?}");
    eprintln!("standby took over {took:?} after the kill");
    rt.block_on(async {
        let db = s.pg.client().await;
        let c = cache(&s.node).await;
        c.set("user:3", "cached").await.unwrap();
        let l = exec(&db, "INSERT INTO users VALUES (3, 'c@x', 'C')").await;
        assert_eq!(read(&c, "user:3", l).await, None);
    });
}

#[test]
fn a_lost_slot_is_reported_and_every_key_space_is_reset() {
    let rt = runtime();
    let mut s = setup(&rt);
    s.worker.kill9();
    rt.block_on(async {
        let admin = s.pg.superuser_client().await;
        admin
            .batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
            .await
            .unwrap();
        admin.batch_execute("SELECT pg_reload_conf()").await.unwrap();
        let db = s.pg.client().await;
        let c = cache(&s.node).await;
        let read_at = current_lsn(&db).await;
        exec(&db, "INSERT INTO users VALUES (1, 'a@x', 'v0')").await;
        // Filled while the worker is away: these keys may now be stale.
        c.set("user:1", "cached").await.unwrap();
        c.set("user_by_email:a@x", "cached").await.unwrap();
        c.set("other:1", "cached").await.unwrap();
        // Push the slot past max_slot_wal_keep_size until Postgres drops its WAL.
        let mut status = String::new();
        for round in 0..40 {
            db.batch_execute(&format!(
                "INSERT INTO unrelated SELECT g FROM generate_series({0} * 100000 + 1, {0} * 100000 + 100000) g",
                round + 1
            ))
            .await
            .unwrap();
            admin
                .batch_execute("SELECT pg_switch_wal(); CHECKPOINT")
                .await
                .unwrap();
            status = admin
                .query_one(
                    "SELECT COALESCE(wal_status, '') FROM pg_replication_slots WHERE slot_name = 'raftcache'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if status == "lost" {
                break;
            }
        }
        assert_eq!(status, "lost", "could not make the slot lose its WAL");

        let mut worker = s.start_worker().unwrap();
        worker
            .wait_event("streaming", Duration::from_secs(30))
            .unwrap();
        assert!(
            worker.log().contains("REPLICATION SLOT LOST"),
            "{}",
            worker.log()
        );
        let now = current_lsn(&db).await;
        assert_eq!(read(&c, "user:1", now).await, None);
        assert_eq!(read(&c, "user_by_email:a@x", now).await, None);
        assert_eq!(read(&c, "other:1", now).await.as_deref(), Some("cached"));
        // A fill read before the reset is refused under the reset key space.
        let outcome = c.set_if_newer("user:1", "stale", read_at, None).await.unwrap();
        assert!(outcome.refused_by.is_some(), "{outcome:?}");
        // And streaming works on the new slot.
        c.set("user:1", "cached").await.unwrap();
        let l = exec(&db, "UPDATE users SET name = 'v1' WHERE id = 1").await;
        assert_eq!(read(&c, "user:1", l).await, None);
    });
}

/// The cache is restarted as a brand-new cluster (memory only, a new cluster id) on the
/// same address while the worker runs: the worker follows it without being restarted
/// (its client replaces the old cluster's map; its lease is gone, so it takes a new one,
/// finds no "ready" marker and resets the key spaces), and row changes reach the new
/// cluster.
#[test]
fn the_worker_follows_a_cache_restarted_as_a_new_cluster() {
    let rt = runtime();
    let mut s = setup(&rt);
    let db = rt.block_on(s.pg.client());
    rt.block_on(async {
        let c = cache(&s.node).await;
        c.set("user:60", "cached").await.unwrap();
        let l = exec(
            &db,
            "INSERT INTO users VALUES (60, 'x@x', 'X'), (61, 'y@y', 'Y')",
        )
        .await;
        assert_eq!(read(&c, "user:60", l).await, None, "first cluster");
    });
    let addr = s.node.endpoint();
    s.node.kill9();
    s.node = NodeProc::start_at(&bins!(), &addr, &[]).unwrap();
    rt.block_on(async {
        let c = cache(&s.node).await;
        // The worker reaches the new cluster: a min_lsn read past a new commit succeeds.
        let deadline = Instant::now() + Duration::from_secs(60);
        let l = exec(&db, "UPDATE users SET name = 'X2' WHERE id = 60").await;
        loop {
            match c.get_with_min_lsn("user:60", l).await {
                Ok(_) => break,
                Err(ClientError::LsnNotReached { .. }) if Instant::now() < deadline => {}
                Err(e) => panic!(
                    "the worker did not reach the new cluster: {e}\n{}",
                    s.worker.log()
                ),
            }
        }
        // And its invalidations land there: a key cached in the new cluster goes when its
        // row changes.
        c.set("user:61", "cached").await.unwrap();
        let l = exec(&db, "UPDATE users SET name = 'Y2' WHERE id = 61").await;
        assert_eq!(
            read(&c, "user:61", l).await,
            None,
            "invalidated in the new cluster"
        );
    });
}
