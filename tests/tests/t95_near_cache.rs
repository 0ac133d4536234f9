//! The client's near cache against real node processes and their `Watch` streams:
//! invalidation by another client's write, by a CDC change from a real PostgreSQL
//! through the real `raftcache-cdc` worker, and gap detection when a node drops a
//! watch event (`InjectFault.drop_watch_events`, nodes run with `--fault-injection`).
//!
//! Every wait is bounded; every process is killed by its guard, even on panic.

#![allow(clippy::unwrap_used)]

use raftcache_client::{
    Client, ClientConfig, LoadOptions, LoadSource, NearCacheConfig, NearMode, NearStats, PgSnapshot,
};
use raftcache_proto::v1::admin_client::AdminClient;
use raftcache_proto::v1::InjectFaultRequest;
use raftcache_tests::cdc::CdcStack;
use raftcache_tests::pg::exec;
use raftcache_tests::{bins, connect_settled, runtime, Cluster};
use std::time::{Duration, Instant};

const PARTITIONS: usize = 8;
const SETTLE: Duration = Duration::from_secs(60);
/// How long an invalidation may take to reach the near cache.
const INVALIDATED_WITHIN: Duration = Duration::from_secs(3);

/// Three nodes with fault injection, settled; a plain client and a near-cache client
/// whose every partition is synced.
fn cluster(rt: &tokio::runtime::Runtime) -> (Cluster, Client, Client) {
    let flags = [&format!("--partitions={PARTITIONS}"), "--fault-injection"];
    let cluster = Cluster::start(&bins!(), 3, &flags).unwrap();
    let (plain, near) = rt.block_on(async {
        let plain = connect_settled(cluster.endpoints(), PARTITIONS, 3, SETTLE)
            .await
            .unwrap();
        let near = near_client(cluster.endpoints()).await;
        wait_synced(&near, PARTITIONS).await;
        (plain, near)
    });
    (cluster, plain, near)
}

async fn near_client(endpoints: Vec<String>) -> Client {
    let config = ClientConfig {
        near_cache: Some(NearCacheConfig::default()),
        ..ClientConfig::new(endpoints)
    };
    Client::connect(config).await.unwrap()
}

fn stats(c: &Client) -> NearStats {
    c.near_cache_stats().expect("a near cache")
}

/// Waits (at most 10 s) until `partitions` partitions are synced.
async fn wait_synced(c: &Client, partitions: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats(c).synced_partitions < partitions as u64 {
        assert!(
            Instant::now() < deadline,
            "near cache not synced within 10 s: {:?}",
            stats(c)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn text(c: &Client, key: &str) -> Option<String> {
    c.get(key)
        .await
        .unwrap()
        .map(|v| String::from_utf8(v.value.to_vec()).unwrap())
}

/// Reads `key` through `c` until it reads `want`, at most `limit`; returns how long.
async fn read_until(c: &Client, key: &str, want: Option<&str>, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = text(c, key).await;
        if got.as_deref() == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{key} still reads {got:?}, not {want:?}, after {limit:?}; {:?}",
            stats(c)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn another_clients_write_invalidates_the_near_cache() {
    let rt = runtime();
    let (_cluster, b, a) = cluster(&rt);
    rt.block_on(async {
        tracing::info!("--- A caches k");
        b.set("k", "v1").await.unwrap();
        assert_eq!(text(&a, "k").await.as_deref(), Some("v1"));
        let before = stats(&a);
        assert_eq!(text(&a, "k").await.as_deref(), Some("v1"));
        let after = stats(&a);
        assert_eq!(
            after.hits,
            before.hits + 1,
            "second read is a near hit: {after:?}"
        );
        assert_eq!(after.entries, 1);

        tracing::info!("--- B writes k; A sees it");
        b.set("k", "v2").await.unwrap();
        let took = read_until(&a, "k", Some("v2"), INVALIDATED_WITHIN).await;
        let now = stats(&a);
        assert!(now.invalidations > after.invalidations, "{now:?}");
        println!("invalidation seen after {took:?}; {now:?}");

        tracing::info!("--- deletes and A's own writes");
        b.delete("k").await.unwrap();
        read_until(&a, "k", None, INVALIDATED_WITHIN).await;
        a.set("k", "mine").await.unwrap();
        assert_eq!(text(&a, "k").await.as_deref(), Some("mine"));
        assert_eq!(text(&a, "k").await.as_deref(), Some("mine"));
        assert_eq!(stats(&a).gaps, 0);
    });
}

#[test]
fn a_dropped_watch_event_is_a_gap_and_drops_its_partition() {
    let rt = runtime();
    let (cluster, b, a) = cluster(&rt);
    rt.block_on(async {
        let (ka, kb, kc) = ("{g}a", "{g}b", "{g}c");
        let p = b.partition_of(ka);
        assert_eq!((b.partition_of(kb), b.partition_of(kc)), (p, p));
        tracing::info!("--- A caches {ka} and {kb}");
        for k in [ka, kb] {
            b.set(k, "old").await.unwrap();
            assert_eq!(text(&a, k).await.as_deref(), Some("old"));
        }
        let cached = stats(&a);
        for k in [ka, kb] {
            assert_eq!(text(&a, k).await.as_deref(), Some("old"));
        }
        assert_eq!(stats(&a).hits, cached.hits + 2, "both are near hits");

        tracing::info!("--- the leader of partition {p} drops the next watch event");
        let status = b.cluster_status().await.unwrap();
        let leader = status.partitions[p as usize].leader.unwrap();
        let addr = cluster
            .nodes
            .iter()
            .find(|n| n.node_id == leader)
            .unwrap()
            .endpoint();
        let mut admin = AdminClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        admin
            .inject_fault(InjectFaultRequest {
                clock_offset_ms: 0,
                drop_watch_events: 1,
            })
            .await
            .unwrap();
        b.set(ka, "new").await.unwrap(); // its event is dropped
        b.set(kc, "x").await.unwrap(); // its prev_seq shows the hole

        tracing::info!("--- A detects the gap");
        let deadline = Instant::now() + INVALIDATED_WITHIN;
        while stats(&a).gaps < cached.gaps + 1 {
            assert!(Instant::now() < deadline, "no gap seen: {:?}", stats(&a));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats(&a).gaps, cached.gaps + 1);
        assert_eq!(text(&a, ka).await.as_deref(), Some("new"));
        let misses = stats(&a).misses;
        assert_eq!(text(&a, kb).await.as_deref(), Some("old"));
        assert_eq!(
            stats(&a).misses,
            misses + 1,
            "{kb} was re-fetched: {:?}",
            stats(&a)
        );
        // Filled again, tracked again.
        assert_eq!(text(&a, kb).await.as_deref(), Some("old"));
        assert_eq!(stats(&a).misses, misses + 1);
    });
}

const TABLES: &str = r#"
[[table]]
name = "public.users"
keys = ["user:{id}"]
"#;

#[test]
fn a_cdc_change_invalidates_the_near_cache() {
    let rt = runtime();
    let schema = "CREATE TABLE users (id int PRIMARY KEY, name text)";
    let stack = CdcStack::start(&bins!(), &rt, schema, TABLES).unwrap();
    let node = &stack.node;
    rt.block_on(async {
        let db = stack.pg.client().await;
        let plain = Client::connect(ClientConfig::new([node.endpoint()]))
            .await
            .unwrap();
        let a = near_client(vec![node.endpoint()]).await;
        let partitions = plain.cluster_map().await.unwrap().partition_count as usize;
        wait_synced(&a, partitions).await;

        tracing::info!("--- a row, filled cache-aside, cached near");
        let inserted = exec(&db, "INSERT INTO users VALUES (1, 'Ada'), (2, 'Bob')").await;
        // Wait until CDC applied the insert (its invalidation must not void our fill).
        assert_eq!(
            plain.get_with_min_lsn("user:1", inserted).await.unwrap(),
            None
        );
        // The exact cache-aside fill: a snapshot taken after the insert committed.
        let snapshot: PgSnapshot = db
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
            .parse()
            .unwrap();
        for (k, v) in [("user:1", "Ada"), ("user:2", "Bob"), ("other:1", "kept")] {
            let fill = plain.set_if_fresh(k, v, &snapshot, None).await.unwrap();
            assert!(fill.applied, "{k}: {fill:?}");
            assert_eq!(text(&a, k).await.as_deref(), Some(v));
        }
        let cached = stats(&a);
        assert_eq!(text(&a, "user:1").await.as_deref(), Some("Ada"));
        assert_eq!(stats(&a).hits, cached.hits + 1);

        tracing::info!("--- UPDATE commits; CDC invalidates user:1; A drops it");
        let updated = exec(&db, "UPDATE users SET name = 'Ada L.' WHERE id = 1").await;
        let took = read_until(&a, "user:1", None, Duration::from_secs(10)).await;
        println!("near cache invalidated {took:?} after the commit");
        assert!(stats(&a).invalidations > cached.invalidations);
        assert_eq!(
            plain.get_with_min_lsn("user:1", updated).await.unwrap(),
            None
        );
        assert_eq!(
            text(&a, "user:2").await.as_deref(),
            Some("Bob"),
            "other rows stay"
        );

        tracing::info!("--- TRUNCATE: the whole key space, by prefix");
        let before = stats(&a);
        exec(&db, "TRUNCATE users").await;
        read_until(&a, "user:2", None, Duration::from_secs(10)).await;
        assert!(stats(&a).invalidations > before.invalidations);
        assert_eq!(text(&a, "other:1").await.as_deref(), Some("kept"));
        assert_eq!(stats(&a).gaps, 0, "{:?}", stats(&a));
    });
}

#[test]
fn hot_mode_keeps_only_the_keys_the_nodes_report_hot() {
    let rt = runtime();
    let (cluster, b, _a) = cluster(&rt);
    rt.block_on(async {
        let config = ClientConfig {
            near_cache: Some(NearCacheConfig {
                mode: NearMode::Hot,
                hot_refresh: Duration::from_millis(200),
                ..NearCacheConfig::default()
            }),
            ..ClientConfig::new(cluster.endpoints())
        };
        let h = Client::connect(config).await.unwrap();
        wait_synced(&h, PARTITIONS).await;
        // One partition (hash tag), so one node's top 16: the hot key and 15 of the 20
        // warm keys outrank the cold one. The cold key is written last, so no hot-key
        // refresh can ever see it among the top 16 (one that ran while only a few keys
        // had been counted once let it in, and the test failed).
        for i in 0..20 {
            let key = format!("{{h}}warm-{i}");
            b.set(&key, "w").await.unwrap();
            for _ in 0..50 {
                b.get(&key).await.unwrap();
            }
        }
        b.set("{h}hot", "fire").await.unwrap();
        for _ in 0..2000 {
            b.get("{h}hot").await.unwrap();
        }
        b.set("{h}cold", "ice").await.unwrap();
        // The hot key becomes near-cached once a hot-key refresh has seen it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let before = stats(&h).hits;
            assert_eq!(text(&h, "{h}hot").await.as_deref(), Some("fire"));
            if stats(&h).hits > before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the hot key was never near-cached: {:?}",
                stats(&h)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The cold key is read remotely every time.
        let before = stats(&h);
        for _ in 0..3 {
            assert_eq!(text(&h, "{h}cold").await.as_deref(), Some("ice"));
        }
        let after = stats(&h);
        assert_eq!(
            after.hits, before.hits,
            "the cold key was near-cached: {after:?}"
        );
        assert_eq!(after.misses, before.misses + 3, "{after:?}");
    });
}

#[test]
fn get_or_load_answers_from_the_near_cache_and_sees_invalidations() {
    let rt = runtime();
    let (_cluster, b, a) = cluster(&rt);
    rt.block_on(async {
        let options = LoadOptions::ttl(Duration::from_secs(60));
        let load =
            |v: &'static str| move || async move { Ok(bytes::Bytes::from_static(v.as_bytes())) };
        let first = a
            .get_or_load("page", options, load("loaded"))
            .await
            .unwrap();
        assert_eq!(first.source, LoadSource::Loader);
        // The flight's fill went to the node; the next flight's hit fills the near
        // cache, and the one after never leaves the process.
        a.get_or_load("page", options, load("unused"))
            .await
            .unwrap();
        let before = stats(&a);
        let near = a
            .get_or_load("page", options, load("unused"))
            .await
            .unwrap();
        assert_eq!(
            (near.value.as_ref(), near.source),
            (&b"loaded"[..], LoadSource::Cache)
        );
        assert_eq!(stats(&a).hits, before.hits + 1, "{:?}", stats(&a));
        // Another client's write reaches it through the Watch stream.
        b.set("page", "edited").await.unwrap();
        let deadline = Instant::now() + INVALIDATED_WITHIN;
        loop {
            let now = a
                .get_or_load("page", options, load("unused"))
                .await
                .unwrap();
            if now.value == "edited" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still {:?}; {:?}",
                now,
                stats(&a)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(a.load_stats().loader_calls, 1);
    });
}
