//! Persistence of real node processes on loopback: a clean restart of a whole
//! `snapshot`-mode cluster keeps every key, value, version and TTL; a `durable`-mode
//! cluster loses no acknowledged write when every node is killed with SIGKILL; a node
//! whose stored snapshot is corrupt notices it, serves none of it and recovers from its
//! peers as a new node, and refuses to start when it holds the only copy.
//!
//! Every node keeps its data directory in a temporary directory the test owns, so a
//! node can be stopped and started again on the same address with the same data. Every
//! wait is bounded; every node process is killed by its guard when the test ends, even
//! on panic (and its log tail is printed then). The tests run one at a time (one
//! cluster at a time on these 2-core machines: a starved node answers late and the
//! load phases would measure the machine, not persistence).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use raftcache_client::{Client, Consistency, ReadOptions, SetOptions, Value};
use raftcache_proto::v1::cache_client::CacheClient;
use raftcache_proto::v1::{Consistency as WireConsistency, KeyRef, MGetRequest, Route};
use raftcache_tests::{
    bins, free_addr, output_within, runtime, settled, signal, wait_status, Bins, NodeProc,
};
use tempfile::TempDir;

/// One test (one cluster) at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const PARTITIONS: usize = 8;
const SETTLE: Duration = Duration::from_secs(60);
const STOP: Duration = Duration::from_secs(30);
const CHECKPOINT_LINE: &str = "wrote the shutdown checkpoint";

/// One node slot of a test cluster: a fixed address and a data directory that outlive
/// the process, so the node can be restarted in place.
struct Slot {
    addr: SocketAddr,
    data: TempDir,
    /// Flags for a (re)start: mode, and `--join` for every node but the first.
    args: Vec<String>,
}

impl Slot {
    fn start(&self, bins: &Bins) -> anyhow::Result<NodeProc> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        NodeProc::start_with_dir(bins, &self.addr.to_string(), self.data.path(), &args)
    }
}

/// `n` slots: the first founds a cluster with `found` flags, the others join it; all
/// get `common` flags.
fn slots(n: usize, common: &[&str], found: &[&str]) -> Vec<Slot> {
    let addrs: Vec<SocketAddr> = (0..n).map(|_| free_addr().unwrap()).collect();
    addrs
        .iter()
        .enumerate()
        .map(|(i, &addr)| {
            let mut args: Vec<String> = common.iter().map(|s| (*s).to_string()).collect();
            if i == 0 {
                args.extend(found.iter().map(|s| (*s).to_string()));
            } else {
                args.extend(["--join".to_string(), addrs[0].to_string()]);
            }
            Slot {
                addr,
                data: tempfile::tempdir().unwrap(),
                args,
            }
        })
        .collect()
}

fn start_all(bins: &Bins, slots: &[Slot]) -> Vec<NodeProc> {
    slots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.start(bins)
                .unwrap_or_else(|e| panic!("node {} at {} did not start: {e:#}", i + 1, s.addr))
        })
        .collect()
}

async fn connect_settled(slots: &[Slot], voters: usize) -> Client {
    let endpoints: Vec<String> = slots.iter().map(|s| s.addr.to_string()).collect();
    raftcache_tests::connect_settled(endpoints, PARTITIONS, voters, SETTLE)
        .await
        .unwrap()
}

/// SIGTERMs every node at once and checks that each exits 0 after writing its
/// shutdown checkpoint.
fn terminate_all(nodes: &mut [NodeProc]) {
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter_mut()
            .map(|n| s.spawn(move || n.terminate(STOP)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (n, r) in nodes.iter().zip(results) {
        check_clean_exit(n, r);
    }
}

fn check_clean_exit(n: &NodeProc, r: anyhow::Result<std::process::ExitStatus>) {
    let status = r.unwrap_or_else(|e| panic!("node {} did not stop on SIGTERM: {e:#}", n.node_id));
    assert!(
        status.success(),
        "node {} exited with {status} after SIGTERM",
        n.node_id
    );
    assert!(
        n.log().contains(CHECKPOINT_LINE),
        "node {} exited without logging {CHECKPOINT_LINE:?}",
        n.node_id
    );
}

fn linearizable() -> ReadOptions {
    ReadOptions {
        consistency: Consistency::Linearizable,
        ..ReadOptions::default()
    }
}

/// Reads `keys` at LINEARIZABLE in chunks of 1 000, 8 chunks at a time, in key order.
/// A chunk that fails transiently (right after a restart the partitions may still be
/// electing leaders, which takes longer on a loaded machine) is read again, for at most
/// [`SETTLE`]; every answer that does come back is checked by the caller.
async fn read_all(client: &Client, keys: &[String]) -> Vec<Option<Value>> {
    let deadline = Instant::now() + SETTLE;
    let chunks: Vec<Vec<Option<Value>>> = stream::iter(keys.chunks(1_000))
        .map(|chunk| async move {
            loop {
                match client.mget_with(chunk, linearizable()).await {
                    Ok(v) => return v,
                    Err(e) if e.is_transient() && Instant::now() < deadline => {
                        eprintln!("mget of {} keys: {e}; retrying", chunk.len());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => panic!("mget of {} keys failed: {e}", chunk.len()),
                }
            }
        })
        .buffered(8)
        .collect()
        .await;
    chunks.into_iter().flatten().collect()
}

/// `set_with` that tries again on a transient failure (for at most [`SETTLE`]) and
/// returns the version of the write that was acknowledged. Loading the data is not what
/// these tests check; a write that may have applied and is then written again only
/// moves the version on, and the acknowledged one is what the tests remember.
async fn set_retrying(client: &Client, key: &str, value: String, options: SetOptions) -> u64 {
    let deadline = Instant::now() + SETTLE;
    loop {
        match client.set_with(key, value.clone(), options.clone()).await {
            Ok(out) => {
                assert!(
                    out.applied,
                    "unconditional set of {key} not applied: {out:?}"
                );
                return out.version;
            }
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                eprintln!("set {key}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("set {key}: {e}"),
        }
    }
}

/// The file of `partition`'s snapshot in a node's data directory (the meta group's is
/// `meta.snap` next to it; both in the node's checksummed snapshot format).
fn snapshot_file(data: &Path, partition: u32) -> PathBuf {
    data.join("snapshots")
        .join(format!("partition-{partition}.snap"))
}

/// The partition snapshots (not the meta group's) a stopped node stored, by partition.
fn partition_snapshots(data: &Path) -> Vec<(u32, Vec<u8>)> {
    let dir = data.join("snapshots");
    let mut stored: Vec<(u32, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name()?.to_str()?;
            let p = name
                .strip_prefix("partition-")?
                .strip_suffix(".snap")?
                .parse()
                .ok()?;
            Some((p, std::fs::read(&path).unwrap()))
        })
        .collect();
    stored.sort();
    stored
}

/// Flips one byte in the middle of the largest stored partition snapshot of the
/// (stopped) node whose data directory is `data`, which must hold one snapshot per
/// partition it hosts; returns the partition and the corrupted bytes.
fn corrupt_a_partition_snapshot(data: &Path, expect_partitions: usize) -> (u32, Vec<u8>) {
    let stored = partition_snapshots(data);
    assert_eq!(
        stored.len(),
        expect_partitions,
        "the stopped node should have stored one snapshot per hosted partition; found \
         partitions {:?}",
        stored.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    let (partition, value) = stored.into_iter().max_by_key(|(_, v)| v.len()).unwrap();
    assert!(
        value.starts_with(b"RCSNAP\0\0"),
        "a stored snapshot without the magic: {:?}",
        &value[..value.len().min(16)]
    );
    let mut bad = value;
    let mid = bad.len() / 2;
    bad[mid] ^= 0x5a;
    let path = snapshot_file(data, partition);
    std::fs::write(&path, &bad).unwrap();
    std::fs::File::open(&path).unwrap().sync_all().unwrap();
    eprintln!("flipped byte {mid} of {} of {}", bad.len(), path.display());
    (partition, bad)
}

/// Reads `keys` from the node at `addr` itself with FOLLOWER consistency (at most 2 s
/// stale), retrying while it is not fresh enough, for at most 30 s.
async fn follower_read_from(
    addr: SocketAddr,
    client: &Client,
    keys: &[String],
) -> Vec<raftcache_proto::v1::GetResponse> {
    let mut c = CacheClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(1_000) {
        let request = MGetRequest {
            keys: chunk
                .iter()
                .map(|k| KeyRef {
                    key: Bytes::from(k.clone()),
                    route: Some(Route {
                        partition: client.partition_of(k),
                        epoch: 0,
                        cluster_id: 0,
                    }),
                })
                .collect(),
            consistency: WireConsistency::Follower as i32,
            max_staleness_ms: 2_000,
            min_lsn: 0,
        };
        loop {
            match c.m_get(request.clone()).await {
                Ok(r) => {
                    out.extend(r.into_inner().values);
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("follower mget at {addr}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("follower mget at {addr} kept failing for 30 s: {e}"),
            }
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TtlClass {
    None,
    Long,
    Short,
}

const KEYS: usize = 200_000;
/// Keys at and above this index get the short TTL, written last, just before the stop.
const SHORT_FROM: usize = 199_000;
const SHORT_TTL: Duration = Duration::from_secs(5);
const LONG_TTL: Duration = Duration::from_secs(3_600);

fn class(i: usize) -> TtlClass {
    if i >= SHORT_FROM {
        TtlClass::Short
    } else if i % 199 == 5 {
        TtlClass::Long
    } else {
        TtlClass::None
    }
}

fn value_of(i: usize) -> String {
    format!(
        "value-{i}-{:016x}",
        (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    )
}

/// Writes keys `range` with 64 requests in flight; returns (index, version) pairs.
async fn load(
    client: &Client,
    keys: &[String],
    range: std::ops::Range<usize>,
) -> Vec<(usize, u64)> {
    stream::iter(range)
        .map(|i| {
            let client = client.clone();
            let key = keys[i].clone();
            async move {
                let ttl = match class(i) {
                    TtlClass::None => None,
                    TtlClass::Long => Some(LONG_TTL),
                    TtlClass::Short => Some(SHORT_TTL),
                };
                let options = SetOptions {
                    ttl,
                    ..SetOptions::default()
                };
                (i, set_retrying(&client, &key, value_of(i), options).await)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

#[test]
fn snapshot_mode_restart_keeps_every_key_and_version() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let bins = bins!();
    let slots = slots(3, &["--persistence", "snapshot"], &["--partitions", "8"]);
    let mut nodes = start_all(&bins, &slots);
    let ids: Vec<u64> = nodes.iter().map(|n| n.node_id).collect();
    let rt = runtime();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("k{i}")).collect();
    let mut versions = vec![0u64; KEYS];

    let short_written_at = rt.block_on(async {
        let client = connect_settled(&slots, 3).await;
        let started = Instant::now();
        let loaded = tokio::time::timeout(Duration::from_secs(240), async {
            let mut all = load(&client, &keys, 0..SHORT_FROM).await;
            let long_loaded = started.elapsed();
            all.extend(load(&client, &keys, SHORT_FROM..KEYS).await);
            (all, long_loaded)
        })
        .await
        .expect("loading 200 000 keys took over 240 s");
        let short_written_at = Instant::now();
        eprintln!(
            "loaded {} keys in {:?} (the short-TTL ones last, after {:?})",
            loaded.0.len(),
            started.elapsed(),
            loaded.1
        );
        for (i, v) in loaded.0 {
            versions[i] = v;
        }
        // The short-TTL keys are live right before the stop (the checkpoint holds them).
        let short = read_all(&client, &keys[SHORT_FROM..]).await;
        let live = short.iter().filter(|v| v.is_some()).count();
        eprintln!(
            "{live} of {} short-TTL keys live before the stop",
            short.len()
        );
        short_written_at
    });

    terminate_all(&mut nodes);
    // Let the short TTLs pass while the cluster is down.
    let expired_at = short_written_at + SHORT_TTL + Duration::from_millis(500);
    std::thread::sleep(expired_at.saturating_duration_since(Instant::now()));

    drop(nodes);
    let nodes = start_all(&bins, &slots);
    for (n, (old, s)) in nodes.iter().zip(ids.iter().zip(&slots)) {
        assert_eq!(
            n.node_id, *old,
            "the node at {} came back as node {} instead of {old}",
            s.addr, n.node_id
        );
        assert!(
            n.log().contains("restored from the data directory"),
            "node {old} did not restore from its data directory"
        );
    }

    rt.block_on(async {
        let restarted = Instant::now();
        let client = connect_settled(&slots, 3).await;
        eprintln!("settled {:?} after the restart", restarted.elapsed());
        let status = client.cluster_status().await.unwrap();
        let in_map: BTreeSet<u64> = status.nodes.iter().map(|n| n.id).collect();
        assert_eq!(
            in_map,
            ids.iter().copied().collect(),
            "the restarted cluster's nodes"
        );

        let checked = Instant::now();
        let got = read_all(&client, &keys).await;
        let (mut present, mut expired, mut long) = (0, 0, 0);
        for (i, g) in got.iter().enumerate() {
            let key = &keys[i];
            match (class(i), g) {
                (TtlClass::Short, None) => expired += 1,
                (TtlClass::Short, Some(v)) => {
                    panic!("{key} (TTL {SHORT_TTL:?}) is still served after the restart: {v:?}")
                }
                (_, None) => panic!("{key} is missing after the restart"),
                (c, Some(v)) => {
                    assert_eq!(
                        v.value,
                        value_of(i).as_bytes(),
                        "{key} has another value after the restart"
                    );
                    assert_eq!(
                        v.version, versions[i],
                        "{key} has another version after the restart"
                    );
                    if c == TtlClass::Long {
                        long += 1;
                        let ttl = v
                            .ttl
                            .unwrap_or_else(|| panic!("{key} lost its TTL in the restart"));
                        assert!(
                            ttl <= LONG_TTL && ttl > LONG_TTL - Duration::from_secs(900),
                            "{key} has TTL {ttl:?} left after the restart, expected a bit under {LONG_TTL:?}"
                        );
                    } else {
                        assert_eq!(v.ttl, None, "{key} gained a TTL in the restart");
                    }
                    present += 1;
                }
            }
        }
        eprintln!(
            "after the restart: {present} keys present ({long} with a 1 h TTL), {expired} \
             short-TTL keys expired; checked in {:?}",
            checked.elapsed()
        );
        assert_eq!(present + expired, KEYS);
        assert!(long >= 900, "only {long} long-TTL keys");

        // New writes work, and versions keep increasing across the restart.
        let v = client.set("after-restart", "fresh").await.unwrap();
        assert!(v > 0);
        let old = versions[1];
        let newer = client.set(&keys[1], "rewritten").await.unwrap();
        assert!(
            newer > old,
            "rewriting {} after the restart gave version {newer}, not above {old}",
            keys[1]
        );
        let back = client.get_with("after-restart", linearizable()).await.unwrap();
        assert_eq!(back.map(|v| v.value), Some(Bytes::from("fresh")));
    });
    drop(nodes);
}

/// What one writer of the durable test saw.
#[derive(Debug, Default)]
struct AckLog {
    /// Acknowledged sets: key, value, version.
    sets: Vec<(String, u64, u64)>,
    /// The largest acknowledged result of `incr counter 1`.
    max_incr: i64,
    /// Acknowledged increments.
    incrs_acked: u64,
    /// Increments attempted (acknowledged or not).
    incrs_tried: u64,
    /// Failed requests (after the kill, mostly).
    errors: Vec<String>,
}

#[test]
fn durable_mode_survives_kill_9_of_every_node() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let bins = bins!();
    let slots = slots(3, &["--persistence", "durable"], &["--partitions", "8"]);
    let mut nodes = start_all(&bins, &slots);
    let ids: Vec<u64> = nodes.iter().map(|n| n.node_id).collect();
    let rt = runtime();
    let client = rt.block_on(connect_settled(&slots, 3));

    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..8)
        .map(|t| {
            let client = client.clone();
            let stop = stop.clone();
            let acks = acks.clone();
            rt.spawn(async move {
                let mut log = AckLog::default();
                for n in 0..1_000_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("w{t}-{n}");
                    match client.set(&key, n.to_string()).await {
                        Ok(version) => {
                            log.sets.push((key, n, version));
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => log.errors.push(format!("set {key}: {e}")),
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    log.incrs_tried += 1;
                    match client.incr("counter", 1).await {
                        Ok(v) => {
                            log.max_incr = log.max_incr.max(v);
                            log.incrs_acked += 1;
                        }
                        Err(e) => log.errors.push(format!("incr counter: {e}")),
                    }
                }
                log
            })
        })
        .collect();

    // Write for about 5 s, then SIGKILL every node while the writers are still going.
    std::thread::sleep(Duration::from_secs(5));
    let before_kill = acks.load(Ordering::Relaxed);
    for n in &nodes {
        signal(n.pid, libc::SIGKILL);
    }
    for n in &mut nodes {
        n.kill9();
    }
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<AckLog> = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(writers))
            .await
            .expect("writers did not stop within 60 s of the kill")
            .into_iter()
            .map(Result::unwrap)
            .collect()
    });
    let sets: Vec<&(String, u64, u64)> = logs.iter().flat_map(|l| &l.sets).collect();
    let max_incr = logs.iter().map(|l| l.max_incr).max().unwrap_or(0);
    let incrs_acked: u64 = logs.iter().map(|l| l.incrs_acked).sum();
    let incrs_tried: u64 = logs.iter().map(|l| l.incrs_tried).sum();
    let errors = logs.iter().map(|l| l.errors.len()).sum::<usize>();
    eprintln!(
        "acked {} sets and {incrs_acked} increments ({} acks when the kill was sent; largest \
         acked counter value {max_incr}, {incrs_tried} increments tried); {errors} requests \
         failed (after the kill)",
        sets.len(),
        before_kill
    );
    assert!(
        sets.len() + incrs_acked as usize >= 300,
        "too few acknowledged writes to mean anything: {} sets, {incrs_acked} increments",
        sets.len()
    );
    assert!(max_incr > 0, "no increment was acknowledged");

    drop(nodes);
    let nodes = start_all(&bins, &slots);
    for (n, old) in nodes.iter().zip(&ids) {
        assert_eq!(n.node_id, *old, "a durable node came back under another id");
    }
    rt.block_on(async {
        let restarted = Instant::now();
        let client = connect_settled(&slots, 3).await;
        eprintln!("settled {:?} after the restart", restarted.elapsed());
        let keys: Vec<String> = sets.iter().map(|(k, _, _)| k.clone()).collect();
        let got = read_all(&client, &keys).await;
        for ((key, n, version), g) in sets.iter().zip(got) {
            let g = g.unwrap_or_else(|| panic!("acknowledged write of {key} = {n} lost"));
            assert_eq!(
                g.value,
                n.to_string().as_bytes(),
                "acknowledged write of {key} changed"
            );
            assert_eq!(g.version, *version, "{key} has another version");
        }
        let counter = read_all(&client, &["counter".to_string()])
            .await
            .remove(0)
            .expect("the counter is gone after the restart");
        let counter: i64 = std::str::from_utf8(&counter.value).unwrap().parse().unwrap();
        eprintln!("counter after the restart: {counter}");
        assert!(
            counter >= max_incr,
            "the counter is {counter} after the restart, but an increment to {max_incr} was acknowledged"
        );
        assert!(
            counter <= i64::try_from(incrs_tried).unwrap(),
            "the counter is {counter}, above the {incrs_tried} increments ever sent: an \
             increment was applied twice"
        );
        // The cluster takes writes again.
        assert_eq!(client.incr("counter", 1).await.unwrap(), counter + 1);
    });
    drop(nodes);
}

#[test]
fn a_corrupt_snapshot_is_detected_and_the_node_recovers_from_its_peers() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let bins = bins!();
    let slots = slots(3, &["--persistence", "snapshot"], &["--partitions", "8"]);
    let mut nodes = start_all(&bins, &slots);
    let rt = runtime();
    let keys: Vec<String> = (0..5_000).map(|i| format!("c{i}")).collect();
    let client = rt.block_on(connect_settled(&slots, 3));
    let versions: Vec<u64> = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), async {
            stream::iter(&keys)
                .map(|k| {
                    let client = client.clone();
                    async move {
                        set_retrying(&client, k, format!("val-{k}"), SetOptions::default()).await
                    }
                })
                .buffered(64)
                .collect()
                .await
        })
        .await
        .expect("loading 5 000 keys took over 120 s")
    });

    // Stop node 3 cleanly, then damage one of its partition snapshots.
    let old_id = nodes[2].node_id;
    let r = nodes[2].terminate(STOP);
    check_clean_exit(&nodes[2], r);
    let (partition, _) = corrupt_a_partition_snapshot(slots[2].data.path(), PARTITIONS);
    eprintln!("corrupted the snapshot of partition {partition} of node {old_id}");

    // Restart it in place: it must notice, and come back as a new node.
    // (Its flags include `--join <node 1>`, as at its first start.)
    assert!(slots[2].args.contains(&"--join".to_string()));
    let restarted = slots[2]
        .start(&bins)
        .unwrap_or_else(|e| panic!("node 3 with a corrupt snapshot did not start: {e:#}"));
    let new_id = restarted.node_id;
    nodes[2] = restarted;
    let log = nodes[2].log();
    assert!(
        log.contains(&format!("snapshot of group {partition} is corrupt")),
        "the restarted node did not report the corrupt snapshot of partition {partition}"
    );
    assert!(
        log.contains("recovering from the peers as a new node"),
        "the restarted node did not say it recovers from its peers"
    );
    assert_ne!(
        new_id, old_id,
        "the node with a corrupt snapshot came back under its old id"
    );
    eprintln!("node {old_id} came back as node {new_id}");

    rt.block_on(async {
        let restarted = Instant::now();
        let status = wait_status(
            &client,
            SETTLE,
            "settled without the old incarnation",
            |s| {
                settled(s, PARTITIONS, 3)
                    && s.nodes.iter().all(|n| n.id != old_id)
                    && s.nodes.iter().any(|n| n.id == new_id)
                    && s.partitions.iter().all(|p| p.replicas.contains(&new_id))
            },
        )
        .await
        .unwrap();
        eprintln!(
            "settled {:?} after the restart: nodes {:?}",
            restarted.elapsed(),
            status
                .nodes
                .iter()
                .map(|n| (n.id, &n.addr))
                .collect::<Vec<_>>()
        );

        let got = read_all(&client, &keys).await;
        for ((k, v), g) in keys.iter().zip(&versions).zip(got) {
            let g = g.unwrap_or_else(|| panic!("{k} is missing after the recovery"));
            assert_eq!(g.value, format!("val-{k}").as_bytes(), "{k} changed");
            assert_eq!(g.version, *v, "{k} has another version");
        }
        // Node 3's own copy (recovered from its peers) is complete and right.
        let local = follower_read_from(slots[2].addr, &client, &keys).await;
        assert_eq!(local.len(), keys.len());
        for ((k, v), g) in keys.iter().zip(&versions).zip(local) {
            assert!(g.found, "{k} is missing from node {new_id}'s own copy");
            assert_eq!(
                g.value,
                format!("val-{k}").as_bytes(),
                "{k} differs on node {new_id}"
            );
            assert_eq!(g.version, *v, "{k} has another version on node {new_id}");
        }
    });
    drop(nodes);
}

/// Flags of a lone `snapshot`-mode node (R=1, 4 partitions).
const LONE: [&str; 6] = [
    "--persistence",
    "snapshot",
    "--replicas",
    "1",
    "--partitions",
    "4",
];

/// A client of the lone node at `addr`, once its partitions have leaders.
async fn lone_client(addr: &str) -> Client {
    raftcache_tests::connect_settled(vec![addr.to_owned()], 4, 1, SETTLE)
        .await
        .unwrap()
}

/// Runs the node at `addr` on `data` with `flags` until it exits (it is expected to
/// refuse to start), at most 30 s.
fn run_to_exit(bins: &Bins, addr: &str, data: &Path, flags: &[&str]) -> std::process::Output {
    output_within(
        Command::new(&bins.node)
            .args(["--grpc-addr", addr, "--metrics-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data)
            .args(flags)
            .env("RUST_LOG", "info,openraft=warn"),
        Duration::from_secs(30),
    )
    .expect("the node neither became ready nor exited within 30 s")
}

#[test]
fn a_lone_node_with_a_corrupt_snapshot_refuses_to_start() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let bins = bins!();
    let addr = free_addr().unwrap().to_string();
    let data = tempfile::tempdir().unwrap();
    let flags = LONE;
    let mut node = NodeProc::start_with_dir(&bins, &addr, data.path(), &flags).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let client = lone_client(&addr).await;
        for i in 0..500 {
            client
                .set(format!("lone{i}"), format!("v{i}"))
                .await
                .unwrap();
        }
    });
    let r = node.terminate(STOP);
    check_clean_exit(&node, r);
    let (partition, bad) = corrupt_a_partition_snapshot(data.path(), 4);

    let out = run_to_exit(&bins, &addr, data.path(), &flags);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "the node with the only, corrupt copy of partition {partition} exited 0\n\
         stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        !stdout.contains("\"ready\""),
        "the node with the only, corrupt copy became ready: {stdout}"
    );
    assert!(
        stderr.contains("is corrupt") && stderr.contains("only copy"),
        "the refusal does not say why (exit {}):\n{stderr}",
        out.status
    );
    eprintln!(
        "refused with {}: {}",
        out.status,
        stderr.lines().last().unwrap_or("")
    );

    // The refusal left the directory as it was: identity and the damaged snapshot.
    let kept = std::fs::read(snapshot_file(data.path(), partition)).ok();
    assert_eq!(
        kept.as_deref(),
        Some(&bad[..]),
        "the refusing node changed or removed its stored snapshot of partition {partition}"
    );
    let db = sled::open(data.path().join("sled")).unwrap();
    assert!(
        db.open_tree("node")
            .unwrap()
            .get("identity")
            .unwrap()
            .is_some(),
        "the refusing node dropped its identity"
    );
}

/// `snapshot` mode after a crash: the node's vote and log are gone. A lone node (no
/// peer to copy from) refuses to start and names `--restore-snapshots`; with it, it
/// comes back from its last snapshots — the keys written before `admin snapshot` are
/// there with their versions, the ones written after it are lost (RDB semantics) —
/// and takes writes again.
#[test]
fn after_a_crash_in_snapshot_mode_restore_snapshots_brings_back_the_last_snapshot() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let bins = bins!();
    let addr = free_addr().unwrap().to_string();
    let data = tempfile::tempdir().unwrap();
    let flags = LONE;
    let mut node = NodeProc::start_with_dir(&bins, &addr, data.path(), &flags).unwrap();
    let rt = runtime();
    let versions: Vec<u64> = rt.block_on(async {
        let client = lone_client(&addr).await;
        let mut versions = Vec::new();
        for i in 0..300 {
            versions.push(
                client
                    .set(format!("before{i}"), format!("v{i}"))
                    .await
                    .unwrap(),
            );
        }
        let written = client.snapshot(None).await.unwrap();
        assert_eq!(written.len(), 1);
        assert_eq!(
            written[0].snapshots.len(),
            5,
            "4 partitions and the meta group"
        );
        for i in 0..100 {
            client.set(format!("after{i}"), "lost").await.unwrap();
        }
        versions
    });
    node.kill9();
    drop(node);

    // Without the flag: no peer holds the data, so it refuses and says what to do.
    let out = run_to_exit(&bins, &addr, data.path(), &flags);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "it started without --restore-snapshots"
    );
    assert!(
        stderr.contains("without a clean shutdown") && stderr.contains("--restore-snapshots"),
        "the refusal does not say what to do:\n{stderr}"
    );

    let mut with_flag = flags.to_vec();
    with_flag.push("--restore-snapshots");
    let node = NodeProc::start_with_dir(&bins, &addr, data.path(), &with_flag).unwrap();
    assert!(node.log().contains("snapshots_only=true"), "{}", node.log());
    rt.block_on(async {
        let client = lone_client(&addr).await;
        for (i, version) in versions.iter().enumerate() {
            let got = get_retrying(&client, &format!("before{i}")).await;
            let got = got.unwrap_or_else(|| panic!("before{i} is missing after the restore"));
            assert_eq!(got.value, Bytes::from(format!("v{i}")));
            assert_eq!(got.version, *version, "before{i} changed version");
        }
        for i in 0..100 {
            assert!(
                get_retrying(&client, &format!("after{i}")).await.is_none(),
                "after{i}, written after the last snapshot, came back from a crash"
            );
        }
        let v = client.set("before0", "new").await.unwrap();
        assert!(v > versions[0], "a new write gets a higher version");
    });
}

/// A linearizable get, retried on transient errors for up to 60 s (a restored group
/// elects its leader first).
async fn get_retrying(client: &Client, key: &str) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.get_with(key, linearizable()).await {
            Ok(v) => return v,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("get {key}: {e}"),
        }
    }
}
