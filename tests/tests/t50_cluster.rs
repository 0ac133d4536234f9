//! Replicated clusters of real node processes on loopback: placement and routing,
//! kill -9 of a leader under load, adding / rebalancing / draining nodes under load,
//! and a paused (SIGSTOP) replica that must not serve stale reads.
//!
//! Every workload is bounded in time and count and targets loopback only; every node
//! process is killed by its guard when the test ends, even on panic.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftcache_client::{Client, ClientConfig, Consistency, ReadOptions};
use raftcache_proto::v1::cache_client::CacheClient;
use raftcache_proto::v1::{
    Consistency as WireConsistency, ErrorCode, ErrorDetail, GetRequest, Route,
};
use raftcache_tests::{
    bins, connect_settled, run_cli, runtime, settled, signal, wait_status, Bins, Cluster, NodeProc,
};

const PARTITIONS: usize = 16;
const SETTLE: Duration = Duration::from_secs(60);

/// What one workload worker saw.
#[derive(Debug, Default)]
struct WorkerLog {
    /// Keys whose write was acknowledged, with their value.
    acked: Vec<(String, String)>,
    /// Failed requests: when, and the error.
    errors: Vec<(Instant, String)>,
    /// Reads that contradicted an acknowledged write.
    violations: Vec<String>,
    /// The slowest request.
    slowest: Duration,
}

/// `workers` tasks that each write fresh keys and read back the previous one (LEASE),
/// until `stop` is set or `limit` elapses (and at most 20 000 writes each).
fn workload(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    prefix: &str,
    workers: usize,
    limit: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<WorkerLog>> {
    (0..workers)
        .map(|w| {
            let client = client.clone();
            let stop = stop.clone();
            let prefix = prefix.to_string();
            rt.spawn(async move {
                let mut log = WorkerLog::default();
                let start = Instant::now();
                for n in 0..20_000u32 {
                    if stop.load(Ordering::Relaxed) || start.elapsed() > limit {
                        break;
                    }
                    let key = format!("{prefix}-{w}-{n}");
                    let value = format!("value-{w}-{n}");
                    let t = Instant::now();
                    match client.set(key.as_bytes(), Bytes::from(value.clone())).await {
                        Ok(_) => log.acked.push((key, value)),
                        Err(e) => log.errors.push((Instant::now(), format!("set {key}: {e}"))),
                    }
                    log.slowest = log.slowest.max(t.elapsed());
                    if let Some((k, v)) = log.acked.last().cloned() {
                        let t = Instant::now();
                        match client.get(k.as_bytes()).await {
                            Ok(Some(got)) if got.value == v.as_bytes() => {}
                            Ok(other) => log
                                .violations
                                .push(format!("read {k}: expected {v}, got {other:?}")),
                            Err(e) => log.errors.push((Instant::now(), format!("get {k}: {e}"))),
                        }
                        log.slowest = log.slowest.max(t.elapsed());
                    }
                }
                log
            })
        })
        .collect()
}

async fn collect(handles: Vec<tokio::task::JoinHandle<WorkerLog>>) -> WorkerLog {
    let mut all = WorkerLog::default();
    for h in handles {
        let log = h.await.unwrap();
        all.acked.extend(log.acked);
        all.errors.extend(log.errors);
        all.violations.extend(log.violations);
        all.slowest = all.slowest.max(log.slowest);
    }
    all
}

/// Every acknowledged write reads back at LINEARIZABLE.
async fn check_acked(client: &Client, acked: &[(String, String)]) {
    let opts = ReadOptions {
        consistency: Consistency::Linearizable,
        ..ReadOptions::default()
    };
    for chunk in acked.chunks(200) {
        let keys: Vec<&[u8]> = chunk.iter().map(|(k, _)| k.as_bytes()).collect();
        let got = client.mget_with(&keys, opts).await.unwrap();
        for ((k, v), g) in chunk.iter().zip(got) {
            let g = g.map(|g| g.value);
            assert_eq!(
                g.as_deref(),
                Some(v.as_bytes()),
                "acknowledged write of {k} lost or changed"
            );
        }
    }
}

fn leader_counts(s: &raftcache_client::ClusterStatus) -> BTreeMap<u64, usize> {
    let mut m = BTreeMap::new();
    for p in &s.partitions {
        if let Some(l) = p.leader {
            *m.entry(l).or_default() += 1;
        }
    }
    m
}

async fn raw_get(
    addr: &str,
    key: &str,
    partition: u32,
    consistency: WireConsistency,
    max_staleness_ms: u64,
) -> Result<Option<Bytes>, raftcache_proto::tonic::Status> {
    let mut c = CacheClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| raftcache_proto::tonic::Status::unavailable(e.to_string()))?;
    let r = c
        .get(GetRequest {
            key: Bytes::from(key.to_string()),
            route: Some(Route {
                partition,
                epoch: 0,
                cluster_id: 0,
            }),
            consistency: consistency as i32,
            max_staleness_ms,
            skip_value: false,
            min_lsn: 0,
        })
        .await?
        .into_inner();
    Ok(r.found.then_some(r.value))
}

/// Three nodes, every partition with 3 voters and a leader, and a client of them.
fn settled_cluster(bins: &Bins, rt: &tokio::runtime::Runtime) -> (Cluster, Client) {
    let cluster = Cluster::start(bins, 3, &[]).unwrap();
    let client = rt
        .block_on(connect_settled(cluster.endpoints(), PARTITIONS, 3, SETTLE))
        .unwrap();
    (cluster, client)
}

#[test]
fn three_nodes_replicate_every_partition_and_any_node_takes_writes() {
    let bins = bins!();
    let cluster = Cluster::start(&bins, 3, &[]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(ClientConfig::new(cluster.endpoints()))
            .await
            .unwrap();
        // Leaders move to their preferred replicas, spread over the nodes.
        let status = wait_status(&client, SETTLE, "settled with leaders on every node", |s| {
            settled(s, PARTITIONS, 3) && leader_counts(s).len() == 3
        })
        .await
        .unwrap();
        let leaders = leader_counts(&status);
        assert!(
            leaders.values().all(|&n| n >= 4),
            "leaders spread evenly: {leaders:?}"
        );

        // Each node as the only seed takes writes (the client follows NOT_LEADER hints).
        let mut written = Vec::new();
        for (i, ep) in cluster.endpoints().iter().enumerate() {
            let c = Client::connect(ClientConfig::new([ep.clone()]))
                .await
                .unwrap();
            for k in 0..40 {
                let (key, value) = (format!("any-{i}-{k}"), format!("v-{i}-{k}"));
                c.set(key.as_bytes(), Bytes::from(value.clone()))
                    .await
                    .unwrap();
                written.push((key, value));
            }
        }
        check_acked(&client, &written).await;

        // A follower refuses with NOT_LEADER and names the leader.
        let key = "any-0-0";
        let p = client.partition_of(key);
        let leader = status.partitions[p as usize].leader.unwrap();
        let follower = cluster.nodes.iter().find(|n| n.node_id != leader).unwrap();
        let err = raw_get(
            &follower.endpoint(),
            key,
            p,
            WireConsistency::Linearizable,
            0,
        )
        .await
        .unwrap_err();
        let detail = ErrorDetail::from_status(&err).unwrap();
        assert_eq!(detail.code(), ErrorCode::NotLeader, "{err:?}");
        assert_eq!(detail.leader_id, Some(leader), "{err:?}");
        // A FOLLOWER read there is served (it is fresh).
        let mut served = None;
        for _ in 0..50 {
            if let Ok(v) = raw_get(
                &follower.endpoint(),
                key,
                p,
                WireConsistency::Follower,
                5_000,
            )
            .await
            {
                served = v;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(served.as_deref(), Some(&b"v-0-0"[..]));
    });

    // The CLI sees the same cluster.
    let out = run_cli(
        &bins,
        &cluster.endpoints()[2],
        &["cluster", "--json"],
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let parts = map["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), PARTITIONS);
    let leaders: BTreeSet<u64> = parts.iter().filter_map(|p| p["leader"].as_u64()).collect();
    assert_eq!(leaders.len(), 3, "{map}");
    assert!(
        parts
            .iter()
            .all(|p| p["replicas"].as_array().unwrap().len() == 3),
        "{map}"
    );
    let out = run_cli(
        &bins,
        &cluster.endpoints()[1],
        &["set", "cli-key", "cli-value"],
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_cli(
        &bins,
        &cluster.endpoints()[2],
        &["get", "cli-key", "--consistency", "linearizable"],
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("cli-value"));
}

#[test]
fn kill_9_of_the_busiest_leader_loses_no_acknowledged_write() {
    let bins = bins!();
    let rt = runtime();
    let (mut cluster, client) = settled_cluster(&bins, &rt);
    let stop = Arc::new(AtomicBool::new(false));
    let handles = workload(
        &rt,
        &client,
        "kill",
        8,
        Duration::from_secs(30),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_secs(2));

    let status = rt.block_on(client.cluster_status()).unwrap();
    let (&victim, &led) = leader_counts(&status)
        .iter()
        .max_by_key(|(_, n)| **n)
        .unwrap();
    tracing::info!(victim, led, "kill -9 of the busiest leader");
    let killed_at = Instant::now();
    let victim_addr = cluster.by_id(victim).unwrap().endpoint();
    cluster.by_id(victim).unwrap().kill9();
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    let log = rt.block_on(collect(handles));

    assert!(log.violations.is_empty(), "{:?}", log.violations);
    assert!(
        log.acked.len() > 200,
        "only {} writes acknowledged",
        log.acked.len()
    );
    // Errors only inside the failover window (kill .. kill + client deadline).
    let window = Duration::from_secs(6);
    for (at, e) in &log.errors {
        assert!(
            *at >= killed_at && at.duration_since(killed_at) <= window,
            "error outside the failover window: {e}"
        );
    }
    eprintln!(
        "kill -9: {} writes acknowledged, {} errors, slowest request {:?}; first errors: {:?}",
        log.acked.len(),
        log.errors.len(),
        log.slowest,
        log.errors
            .iter()
            .take(3)
            .map(|(_, e)| e)
            .collect::<Vec<_>>()
    );
    let survivors: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| n.node_id != victim)
        .map(NodeProc::endpoint)
        .collect();
    rt.block_on(async {
        let client = Client::connect(ClientConfig::new(survivors.clone()))
            .await
            .unwrap();
        check_acked(&client, &log.acked).await;
    });

    // The killed node comes back in place (same address) as a new node and catches up.
    let reborn = Cluster::join_at(&bins, &victim_addr, &survivors[0], &[]).unwrap();
    assert_ne!(reborn.node_id, victim, "node ids are never reused");
    let reborn_id = reborn.node_id;
    let reborn_addr = reborn.endpoint();
    cluster.nodes.push(reborn);
    rt.block_on(async {
        let client = Client::connect(ClientConfig::new(survivors.clone()))
            .await
            .unwrap();
        wait_status(&client, SETTLE, "healed with the new node", |s| {
            settled(s, PARTITIONS, 3)
                && !s.nodes.iter().any(|n| n.id == victim)
                && s.partitions.iter().all(|p| p.replicas.contains(&reborn_id))
        })
        .await
        .unwrap();
        // Its replicas hold the acknowledged data (served locally as FOLLOWER reads).
        for (k, v) in log.acked.iter().step_by(97).take(20) {
            let p = client.partition_of(k);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match raw_get(&reborn_addr, k, p, WireConsistency::Follower, 2_000).await {
                    Ok(Some(got)) => {
                        assert_eq!(got, v.as_bytes(), "{k} on the new node");
                        break;
                    }
                    other => assert!(
                        Instant::now() < deadline,
                        "new node never served {k}: {other:?}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
}

#[test]
fn add_rebalance_and_drain_under_load_lose_nothing() {
    let bins = bins!();
    let rt = runtime();
    let (mut cluster, client) = settled_cluster(&bins, &rt);
    let stop = Arc::new(AtomicBool::new(false));
    let handles = workload(
        &rt,
        &client,
        "move",
        8,
        Duration::from_secs(150),
        stop.clone(),
    );

    let fourth = NodeProc::start(&bins, &["--standby"]).unwrap();
    assert_eq!(fourth.node_id, 0, "a standby node has no id yet");
    let seed = cluster.endpoints()[1].clone();
    let cli = |args: &[&str]| {
        let out = run_cli(&bins, &seed, args, Duration::from_secs(120)).unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    cli(&["admin", "add-node", &fourth.endpoint()]);
    cli(&["admin", "rebalance"]);
    cluster.nodes.push(fourth);
    let status = rt
        .block_on(wait_status(
            &client,
            Duration::from_secs(90),
            "rebalanced",
            |s| {
                let on_four: usize = s
                    .partitions
                    .iter()
                    .filter(|p| p.replicas.iter().any(|r| *r > 3))
                    .count();
                settled(s, PARTITIONS, 3) && on_four >= 10
            },
        ))
        .unwrap();
    let new_id = status.nodes.iter().map(|n| n.id).max().unwrap();
    assert!(new_id > 3);

    cli(&["admin", "remove-node", "1", "--wait", "--timeout", "120s"]);
    rt.block_on(wait_status(
        &client,
        Duration::from_secs(60),
        "drained",
        |s| {
            settled(s, PARTITIONS, 3)
                && !s.nodes.iter().any(|n| n.id == 1)
                && s.partitions.iter().all(|p| !p.replicas.contains(&1))
        },
    ))
    .unwrap();
    // Node 1 may stop now.
    cluster
        .by_id(1)
        .unwrap()
        .terminate(Duration::from_secs(15))
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let log = rt.block_on(collect(handles));
    eprintln!(
        "membership: {} writes acknowledged, {} errors, slowest request {:?}",
        log.acked.len(),
        log.errors.len(),
        log.slowest
    );
    assert!(log.violations.is_empty(), "{:?}", log.violations);
    assert!(
        log.errors.is_empty(),
        "requests failed: {:?}",
        &log.errors[..log.errors.len().min(5)]
    );
    // The client deadline is 5 s; nothing ran past it (with scheduling slack).
    assert!(
        log.slowest < Duration::from_secs(6),
        "slowest request {:?}",
        log.slowest
    );
    let rest: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| n.node_id != 1)
        .map(NodeProc::endpoint)
        .collect();
    rt.block_on(async {
        let client = Client::connect(ClientConfig::new(rest)).await.unwrap();
        check_acked(&client, &log.acked).await;
    });
}

#[test]
fn a_paused_replica_serves_no_stale_read_and_catches_up() {
    let bins = bins!();
    let mut cluster = Cluster::start(&bins, 3, &[]).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(ClientConfig::new(cluster.endpoints()))
            .await
            .unwrap();
        let status = wait_status(&client, SETTLE, "settled", |s| settled(s, PARTITIONS, 3))
            .await
            .unwrap();
        // A key of a partition led by node F.
        let f = status.partitions[0].leader.unwrap();
        let key = (0..10_000)
            .map(|i| format!("pause-{i}"))
            .find(|k| status.partitions[client.partition_of(k) as usize].leader == Some(f))
            .unwrap();
        let p = client.partition_of(&key);
        client.set(key.as_bytes(), "old").await.unwrap();
        let f_node = cluster.by_id(f).unwrap();
        let (f_pid, f_addr) = (f_node.pid, f_node.endpoint());

        signal(f_pid, libc::SIGSTOP);
        let others: Vec<String> = cluster
            .nodes
            .iter()
            .filter(|n| n.node_id != f)
            .map(NodeProc::endpoint)
            .collect();
        let client2 = Client::connect(ClientConfig::new(others)).await.unwrap();
        // Another replica takes over and acknowledges a new value.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if client2.set(key.as_bytes(), "new").await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "no new leader for partition {p}");
        }
        // Bounded staleness allows the old value for `max_staleness` after the new one
        // was acknowledged; wait past the bound used below, so that from here on the old
        // value is wrong at every level.
        tokio::time::sleep(Duration::from_millis(300)).await;
        signal(f_pid, libc::SIGCONT);
        // Right after it wakes up, F must not answer with the old value at any level.
        let (lease, lin, fol) = tokio::join!(
            raw_get(&f_addr, &key, p, WireConsistency::Lease, 0),
            raw_get(&f_addr, &key, p, WireConsistency::Linearizable, 0),
            raw_get(&f_addr, &key, p, WireConsistency::Follower, 100),
        );
        for (level, r) in [("lease", lease), ("linearizable", lin), ("follower", fol)] {
            match r {
                Ok(v) => assert_eq!(
                    v.as_deref(),
                    Some(&b"new"[..]),
                    "{level} read after SIGCONT"
                ),
                Err(st) => {
                    let code = ErrorDetail::from_status(&st).map(|d| d.code());
                    assert!(
                        matches!(
                            code,
                            Some(ErrorCode::NotLeader) | Some(ErrorCode::Unavailable)
                        ),
                        "{level}: unexpected error {st:?}"
                    );
                }
            }
        }
        // It catches up: a FOLLOWER read there (100 ms bound, long past the write)
        // returns the new value, never the old one.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(v)) = raw_get(&f_addr, &key, p, WireConsistency::Follower, 100).await {
                assert_eq!(v, &b"new"[..]);
                break;
            }
            assert!(Instant::now() < deadline, "paused replica never caught up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
