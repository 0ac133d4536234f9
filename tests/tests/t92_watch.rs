//! `Cache/Watch` on real node processes: CHANGE events name the keys written and
//! deleted with a continuous `prev_seq → seq` chain, an injected drop shows as a gap, a
//! partition without a replica on the node is RESET, and bad requests are refused.
//! Also the hot keys those writes leave in `Stats`, the CLI and the metrics.
//!
//! Three nodes with R = 1 (each partition lives on one node), started with
//! `--fault-injection`; every process is killed by its guard when the test ends.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use raftcache_client::{Client, ClientConfig};
use raftcache_proto::tonic::{Code, Streaming};
use raftcache_proto::v1::admin_client::AdminClient;
use raftcache_proto::v1::cache_client::CacheClient;
use raftcache_proto::v1::{InjectFaultRequest, WatchEvent, WatchEventKind, WatchRequest};
use raftcache_tests::{bins, run_cli, runtime, scrape_metrics, settled, wait_status, Cluster};

const PARTITIONS: usize = 4;
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

async fn watch(addr: &str, partitions: Vec<u32>) -> Result<Streaming<WatchEvent>, Code> {
    let mut c = CacheClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.watch(WatchRequest { partitions })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.code())
}

async fn next(stream: &mut Streaming<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(EVENT_TIMEOUT, stream.message())
        .await
        .expect("a watch event in time")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

/// Expects the next event to be a CHANGE of exactly `key` continuing from `last`;
/// returns its `seq`.
async fn expect_change(stream: &mut Streaming<WatchEvent>, key: &str, last: u64) -> u64 {
    let e = next(stream).await;
    assert_eq!(e.kind(), WatchEventKind::Change, "{e:?}");
    assert_eq!(e.keys, [Bytes::copy_from_slice(key.as_bytes())], "{e:?}");
    assert_eq!(e.prev_seq, last, "continuous: {e:?}");
    assert!(e.seq > e.prev_seq, "{e:?}");
    e.seq
}

#[test]
fn watch_streams_changes_gaps_and_resets() {
    let bins = bins!();
    let mut cluster = Cluster::start(
        &bins,
        3,
        // `--partitions=N` in one word: joining nodes drop it (see `Cluster::join_at`).
        &["--partitions=4", "--replicas=1", "--fault-injection"],
    )
    .unwrap();
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(ClientConfig::new(cluster.endpoints()))
            .await
            .unwrap();
        let status = wait_status(&client, Duration::from_secs(60), "settled", |s| {
            settled(s, PARTITIONS, 1)
        })
        .await
        .unwrap();

        // Keys of one partition, and the node that leads (and alone holds) it.
        let keys: Vec<String> = (0..1000)
            .map(|i| format!("watch-{i}"))
            .filter(|k| client.partition_of(k) == client.partition_of("watch-0"))
            .take(4)
            .collect();
        let p = client.partition_of(&keys[0]);
        let part = &status.partitions[p as usize];
        let leader_id = part.leader.unwrap();
        let leader = cluster
            .nodes
            .iter()
            .find(|n| n.node_id == leader_id)
            .unwrap();
        let elsewhere = cluster
            .nodes
            .iter()
            .find(|n| !part.replicas.contains(&n.node_id))
            .expect("R = 1: some node holds no replica of the partition");

        let mut stream = watch(&leader.endpoint(), vec![p]).await.unwrap();
        let sync = next(&mut stream).await;
        assert_eq!(sync.kind(), WatchEventKind::Sync, "{sync:?}");
        assert_eq!(sync.partition, p);
        let mut last = sync.seq;

        // Writes and a delete, each one CHANGE continuing the chain.
        for k in &keys[..3] {
            client
                .set(k.as_bytes(), Bytes::from_static(b"v"))
                .await
                .unwrap();
            last = expect_change(&mut stream, k, last).await;
        }
        assert!(client.delete(keys[0].as_bytes()).await.unwrap());
        last = expect_change(&mut stream, &keys[0], last).await;

        // A dropped event shows as a gap: the next prev_seq is not the last seq seen.
        let mut admin = AdminClient::connect(format!("http://{}", leader.endpoint()))
            .await
            .unwrap();
        let answer = admin
            .inject_fault(InjectFaultRequest {
                clock_offset_ms: 0,
                drop_watch_events: 1,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.previous_clock_offset_ms, 0);
        client
            .set(keys[1].as_bytes(), Bytes::from_static(b"w"))
            .await
            .unwrap();
        client
            .set(keys[3].as_bytes(), Bytes::from_static(b"w"))
            .await
            .unwrap();
        let e = next(&mut stream).await;
        assert_eq!(e.kind(), WatchEventKind::Change, "{e:?}");
        assert_eq!(
            e.keys,
            [Bytes::copy_from_slice(keys[3].as_bytes())],
            "{e:?}"
        );
        assert_ne!(e.prev_seq, last, "the dropped change leaves a gap: {e:?}");
        assert!(e.prev_seq > last, "{e:?}");
        // And the chain goes on from there.
        client
            .set(keys[2].as_bytes(), Bytes::from_static(b"x"))
            .await
            .unwrap();
        expect_change(&mut stream, &keys[2], e.seq).await;

        // No replica of the partition on that node: RESET at once.
        let mut other = watch(&elsewhere.endpoint(), vec![p]).await.unwrap();
        let reset = next(&mut other).await;
        assert_eq!(reset.kind(), WatchEventKind::Reset, "{reset:?}");
        assert_eq!(reset.partition, p);

        // Bad requests.
        let bad = watch(&leader.endpoint(), vec![PARTITIONS as u32]).await;
        assert_eq!(bad.err(), Some(Code::InvalidArgument));
        let none = watch(&leader.endpoint(), vec![]).await;
        assert_eq!(none.err(), Some(Code::InvalidArgument));

        // The streams show in the metrics while open.
        let text = scrape_metrics(leader.metrics).unwrap();
        assert!(text.contains("raftcache_watch_streams 1"), "{text}");
        assert!(text.contains("raftcache_watch_events_total{kind=\"change\"}"));

        // Hot keys: the keys just written are reported by their node.
        let stats = client.stats().await.unwrap();
        let hot = &stats
            .iter()
            .find(|s| s.node_id == leader_id)
            .unwrap()
            .hot_keys;
        assert!(
            hot.iter()
                .any(|h| h.partition == p && h.key == keys[1].as_bytes()),
            "{hot:?}"
        );
        assert!(
            text.contains("raftcache_hot_key_requests_per_second{rank=\"1\",key=\"watch-"),
            "{text}"
        );
        drop(stream);
        drop(other);
    });

    let out = run_cli(
        &bins,
        &cluster.endpoints()[0],
        &["stats", "--hot"],
        Duration::from_secs(20),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("node "), "{text}");
    assert!(text.contains("  watch-"), "{text}");

    // An open stream does not hold up a graceful shutdown: it ends with the node.
    let node = cluster.nodes.last_mut().unwrap();
    let mut stream = rt
        .block_on(watch(&node.endpoint(), vec![0, 1, 2, 3]))
        .unwrap();
    rt.block_on(next(&mut stream));
    let started = Instant::now();
    let status = node.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited for the stream: {:?}",
        started.elapsed()
    );
    let end = rt.block_on(async {
        loop {
            match tokio::time::timeout(EVENT_TIMEOUT, stream.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None) | Err(_)) => return true,
                Err(_) => return false,
            }
        }
    });
    assert!(end, "the stream ended with the node");
}
