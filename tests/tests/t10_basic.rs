//! One real node on loopback, driven through the CLI, the client library and raw gRPC:
//! the basic commands, TTL, INCR errors, bad input, metrics, shutdown.

#![allow(clippy::unwrap_used)]

use raftcache_client::{Client, ClientConfig, ClientError, Condition, SetOptions, Ttl};
use raftcache_proto::tonic::Code;
use raftcache_proto::v1::cache_client::CacheClient;
use raftcache_proto::v1::{ErrorCode, ErrorDetail, Route, SetCondition, SetRequest};
use raftcache_tests::{bins, metric_value, run_cli, runtime, scrape_metrics, NodeProc};
use std::time::{Duration, Instant};

const CLI_TIMEOUT: Duration = Duration::from_secs(20);

fn cli(node: &NodeProc, args: &[&str]) -> (i32, String, String) {
    let out = run_cli(&bins!(), &node.endpoint(), args, CLI_TIMEOUT).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn client(rt: &tokio::runtime::Runtime, node: &NodeProc) -> Client {
    let config = ClientConfig {
        endpoints: vec![node.endpoint()],
        ..ClientConfig::default()
    };
    rt.block_on(Client::connect(config)).unwrap()
}

#[test]
fn cli_set_get_ttl_incr_del() {
    let node = NodeProc::start(&bins!(), &[]).unwrap();

    tracing::info!("--- set and get");
    let (code, out, _) = cli(&node, &["set", "greeting", "hello world"]);
    assert_eq!((code, out.trim()), (0, "OK"));
    let (code, out, _) = cli(&node, &["get", "greeting"]);
    assert_eq!((code, out.as_str()), (0, "hello world\n"));
    let (code, out, _) = cli(&node, &["get", "greeting", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["found"], true);
    assert_eq!(v["value"], "hello world");
    assert!(v["version"].as_u64().unwrap() > 0);

    tracing::info!("--- a miss exits 1, an error exits 2");
    let (code, out, _) = cli(&node, &["get", "nope"]);
    assert_eq!((code, out.as_str()), (1, ""));
    let (code, _, err) = cli(&node, &["get", ""]);
    assert_eq!(code, 2);
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line message: {err}");

    tracing::info!("--- nx / xx");
    let (code, out, _) = cli(&node, &["set", "greeting", "again", "--nx"]);
    assert_eq!((code, out.trim()), (1, "NOT SET"));
    let (code, out, _) = cli(&node, &["set", "absent", "x", "--xx"]);
    assert_eq!((code, out.trim()), (1, "NOT SET"));
    let (code, _, _) = cli(&node, &["set", "fresh", "x", "--nx"]);
    assert_eq!(code, 0);

    tracing::info!("--- ttl");
    let (_, out, _) = cli(&node, &["ttl", "greeting"]);
    assert_eq!(out.trim(), "-1");
    let (_, out, _) = cli(&node, &["ttl", "nope"]);
    assert_eq!(out.trim(), "-2");
    cli(&node, &["set", "short", "v", "--ttl", "1s"]);
    let (_, out, _) = cli(&node, &["ttl", "short"]);
    let ms: i64 = out.trim().parse().unwrap();
    assert!((1..=1000).contains(&ms), "ttl {ms}");
    std::thread::sleep(Duration::from_millis(1100));
    let (code, _, _) = cli(&node, &["get", "short"]);
    assert_eq!(code, 1, "a 1s key is gone after 1.1s");
    // Reads only hide it; the background reclaim removes it (every 100 ms by default).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, out, _) = cli(&node, &["stats", "--json"]);
        let stats: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        if stats[0]["expirations"].as_u64().unwrap() >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expired key never reclaimed: {stats}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    tracing::info!("--- incr");
    let (code, out, _) = cli(&node, &["incr", "counter"]);
    assert_eq!((code, out.trim()), (0, "1"));
    let (_, out, _) = cli(&node, &["incr", "counter", "--by", "41"]);
    assert_eq!(out.trim(), "42");
    let (_, out, _) = cli(&node, &["incr", "counter", "--by", "-50"]);
    assert_eq!(out.trim(), "-8");
    cli(&node, &["set", "word", "abc"]);
    let (code, _, err) = cli(&node, &["incr", "word"]);
    assert_eq!(code, 2);
    assert!(err.contains("not an integer"), "{err}");
    let (_, out, _) = cli(&node, &["get", "word"]);
    assert_eq!(out, "abc\n", "a failed incr changes nothing");

    tracing::info!("--- del");
    let (_, out, _) = cli(&node, &["del", "greeting"]);
    assert_eq!(out.trim(), "1");
    let (_, out, _) = cli(&node, &["del", "greeting"]);
    assert_eq!(out.trim(), "0");
    let (code, _, _) = cli(&node, &["get", "greeting"]);
    assert_eq!(code, 1);

    tracing::info!("--- cluster and stats");
    let (code, out, _) = cli(&node, &["cluster", "--json"]);
    assert_eq!(code, 0);
    let map: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(map["epoch"], 1);
    assert_eq!(map["nodes"][0]["addr"], node.endpoint());
    assert_eq!(map["partitions"].as_array().unwrap().len(), 16);
    assert!(map["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["leader"] == 1));
    let (code, out, _) = cli(&node, &["stats", "--json"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"keys\""), "{out}");
}

#[test]
fn library_versions_conditions_and_ttl() {
    let node = NodeProc::start(&bins!(), &[]).unwrap();
    let rt = runtime();
    let c = client(&rt, &node);
    rt.block_on(async {
        let v1 = c.set("k", "a").await.unwrap();
        let v2 = c.set("k", "b").await.unwrap();
        assert!(v2 > v1, "versions increase: {v1} then {v2}");
        let got = c.get("k").await.unwrap().unwrap();
        assert_eq!((got.value.as_ref(), got.version), (&b"b"[..], v2));

        tracing::info!("--- compare-and-set on the version");
        let stale = SetOptions {
            condition: Condition::IfVersion(v1),
            ..SetOptions::default()
        };
        let out = c.set_with("k", "c", stale).await.unwrap();
        assert!(!out.applied);
        assert_eq!(out.version, v2, "a failed CAS reports the current version");
        let fresh = SetOptions {
            condition: Condition::IfVersion(v2),
            ..SetOptions::default()
        };
        let out = c.set_with("k", "c", fresh).await.unwrap();
        assert!(out.applied && out.version > v2);

        tracing::info!("--- delete and re-create keeps versions increasing");
        assert!(c.delete("k").await.unwrap());
        let v4 = c.set("k", "d").await.unwrap();
        assert!(v4 > out.version);

        tracing::info!("--- expire / persist / ttl");
        assert!(c.expire("k", Some(Duration::from_secs(100))).await.unwrap());
        match c.ttl("k").await.unwrap() {
            Ttl::Expires(d) => {
                assert!(d <= Duration::from_secs(100) && d > Duration::from_secs(90))
            }
            other => panic!("expected a TTL, got {other:?}"),
        }
        assert!(c.expire("k", None).await.unwrap());
        assert_eq!(c.ttl("k").await.unwrap(), Ttl::Persistent);
        assert!(!c
            .expire("missing", Some(Duration::from_secs(1)))
            .await
            .unwrap());
        assert_eq!(c.ttl("missing").await.unwrap(), Ttl::Missing);

        tracing::info!("--- mget across partitions, in order");
        for i in 0..50 {
            c.set(format!("m{i}"), format!("v{i}")).await.unwrap();
        }
        let keys: Vec<String> = (0..55).map(|i| format!("m{i}")).collect();
        let vals = c.mget(&keys).await.unwrap();
        assert_eq!(vals.len(), 55);
        for (i, v) in vals.iter().enumerate() {
            match v {
                Some(v) => assert_eq!(v.value.as_ref(), format!("v{i}").as_bytes()),
                None => assert!(i >= 50, "m{i} missing"),
            }
        }
    });
}

#[test]
fn bad_input_gets_clear_errors_and_the_node_keeps_serving() {
    let node = NodeProc::start(&bins!(), &[]).unwrap();
    let rt = runtime();
    let c = client(&rt, &node);
    rt.block_on(async {
        let big_key = vec![b'k'; 16 * 1024 + 1];
        match c.set(big_key.as_slice(), "v").await {
            Err(ClientError::KeyTooLarge { size, limit }) => {
                assert_eq!((size, limit), (16385, 16384))
            }
            other => panic!("expected KeyTooLarge, got {other:?}"),
        }
        let big_value = vec![b'v'; 16 * 1024 * 1024 + 1];
        let err = c.set("k", big_value).await.unwrap_err();
        assert!(
            matches!(err, ClientError::ValueTooLarge { limit, .. } if limit == 16 * 1024 * 1024),
            "{err:?}"
        );
        assert!(err.to_string().contains("16777216"), "{err}");
        let err = c.set("", "v").await.unwrap_err();
        assert!(matches!(err, ClientError::EmptyKey), "{err:?}");
        let forever = SetOptions {
            ttl: Some(Duration::from_secs(u64::MAX / 1000)),
            ..SetOptions::default()
        };
        let err = c.set_with("k", "v", forever).await.unwrap_err();
        assert!(matches!(err, ClientError::TtlOutOfRange { .. }), "{err:?}");

        tracing::info!("--- a 16 MiB value (at the limit) is fine");
        let at_limit = vec![b'x'; 16 * 1024 * 1024];
        c.set("large", at_limit).await.unwrap();
        let v = c.get("large").await.unwrap().unwrap();
        assert_eq!(v.value.len(), 16 * 1024 * 1024);

        tracing::info!("--- raw gRPC: unknown enum, missing route, bad partition, wrong epoch");
        let mut raw = CacheClient::connect(format!("http://{}", node.grpc))
            .await
            .unwrap();
        let base = SetRequest {
            key: "k".into(),
            value: "v".into(),
            route: Some(Route {
                partition: 0,
                epoch: 0,
                cluster_id: 0,
            }),
            condition: SetCondition::None as i32,
            ..SetRequest::default()
        };
        let cases = [
            (
                SetRequest {
                    condition: 99,
                    ..base.clone()
                },
                ErrorCode::InvalidArgument,
                "99",
            ),
            (
                SetRequest {
                    condition: 0,
                    ..base.clone()
                },
                ErrorCode::InvalidArgument,
                "condition",
            ),
            (
                SetRequest {
                    route: None,
                    ..base.clone()
                },
                ErrorCode::InvalidArgument,
                "route",
            ),
            (
                SetRequest {
                    route: Some(Route {
                        partition: 16,
                        epoch: 0,
                        cluster_id: 0,
                    }),
                    ..base.clone()
                },
                ErrorCode::InvalidArgument,
                "16",
            ),
        ];
        for (req, code, needle) in cases {
            let st = raw.set(req).await.unwrap_err();
            let detail = ErrorDetail::from_status(&st).unwrap();
            assert_eq!(detail.code(), code, "{st:?}");
            assert!(
                st.message().contains(needle),
                "{needle} in {}",
                st.message()
            );
        }
        // The route's epoch is advisory: the partition's leader serves a request routed
        // with any map (P never changes); only a node that cannot serve it redirects.
        raw.set(SetRequest {
            route: Some(Route {
                partition: 0,
                epoch: 7,
                cluster_id: 0,
            }),
            ..base.clone()
        })
        .await
        .unwrap();
        let st = raw.set(base).await.unwrap();
        assert!(st.into_inner().applied, "the node still serves");

        tracing::info!("--- a message far over the gRPC limit is refused, not fatal");
        let huge = SetRequest {
            key: "k".into(),
            value: vec![0u8; 40 * 1024 * 1024].into(),
            route: Some(Route::default()),
            condition: SetCondition::None as i32,
            ..SetRequest::default()
        };
        let mut raw_big = CacheClient::connect(format!("http://{}", node.grpc))
            .await
            .unwrap()
            .max_encoding_message_size(64 * 1024 * 1024);
        let st = raw_big.set(huge).await.unwrap_err();
        assert!(
            matches!(
                st.code(),
                Code::ResourceExhausted | Code::OutOfRange | Code::Internal
            ),
            "{st:?}"
        );
        assert_eq!(c.get("large").await.unwrap().unwrap().value.len(), 16 << 20);
    });
}

#[test]
fn metrics_show_hits_misses_memory_and_latency() {
    let node = NodeProc::start(&bins!(), &["--max-memory", "64MiB"]).unwrap();
    let rt = runtime();
    let c = client(&rt, &node);
    rt.block_on(async {
        c.set("a", "1").await.unwrap();
        for _ in 0..3 {
            assert!(c.get("a").await.unwrap().is_some());
        }
        for _ in 0..2 {
            assert!(c.get("b").await.unwrap().is_none());
        }
        c.set("w", "abc").await.unwrap();
        assert!(c.incr("w", 1).await.is_err());
    });
    let text = scrape_metrics(node.metrics).unwrap();
    assert_eq!(
        metric_value(&text, "raftcache_hits_total"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(metric_value(&text, "raftcache_misses_total"), Some(2.0));
    assert_eq!(metric_value(&text, "raftcache_keys"), Some(2.0));
    assert_eq!(
        metric_value(&text, "raftcache_memory_limit_bytes"),
        Some(64.0 * 1024.0 * 1024.0)
    );
    assert!(metric_value(&text, "raftcache_memory_used_bytes").unwrap() > 0.0);
    assert!(text.contains("raftcache_evictions_total"));
    assert!(text.contains("raftcache_expirations_total"));
    assert!(
        text.contains(r#"raftcache_ops_total{op="get",result="ok"} 5"#),
        "{text}"
    );
    assert!(
        text.contains(r#"raftcache_ops_total{op="incr",result="NOT_AN_INTEGER"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"raftcache_request_duration_seconds_bucket{op="get""#));
}

#[test]
fn sigterm_stops_the_node_gracefully() {
    let mut node = NodeProc::start(&bins!(), &[]).unwrap();
    let started = Instant::now();
    let status = node.terminate(Duration::from_secs(15)).unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(node.log().contains("node stopped"), "{}", node.log());
    tracing::info!(elapsed = ?started.elapsed(), "stopped");
}
