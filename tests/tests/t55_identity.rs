//! One cluster, one identity: a cluster restarted fresh on the same addresses while a
//! leftover node of the old one keeps running never sees the old cluster's data (the
//! leftover's raft messages are refused, and logged once per peer), every partition of
//! the new cluster accepts writes, and a client connected before the restart follows the
//! new cluster by itself. A node removed with `admin remove-node` answers "removed" on
//! gRPC and RESP, and a client pointed at it moves on.
//!
//! Every node process is killed by its guard when the test ends, even on panic.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftcache_client::{Client, ClientConfig};
use raftcache_proto::tonic::Code;
use raftcache_proto::v1::cache_client::CacheClient;
use raftcache_proto::v1::{ErrorCode, ErrorDetail, GetRequest, Route};
use raftcache_tests::{bins, connect_settled, run_cli, runtime, settled, wait_status, Cluster};

const PARTITIONS: usize = 8;
const SETTLE: Duration = Duration::from_secs(60);

/// A key of each partition.
fn key_per_partition(client: &Client, prefix: &str) -> Vec<String> {
    let mut keys = vec![None; PARTITIONS];
    for i in 0.. {
        let key = format!("{prefix}-{i}");
        let p = client.partition_of(&key) as usize;
        if keys[p].is_none() {
            keys[p] = Some(key);
        }
        if keys.iter().all(Option::is_some) {
            break;
        }
    }
    keys.into_iter().map(Option::unwrap).collect()
}

/// Polls `f` every 200 ms until it is true, for at most `timeout`.
fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("not {what} within {timeout:?}");
}

#[test]
fn a_cluster_restarted_on_the_same_addresses_never_sees_the_old_one() {
    let bins = bins!();
    let rt = runtime();
    let args = ["--partitions=8"];
    let mut old = Cluster::start(&bins, 3, &args).unwrap();
    let addrs = old.endpoints();
    let fourth = Cluster::join(&bins, &addrs[0], &args).unwrap();
    let client = rt
        .block_on(connect_settled(addrs.clone(), PARTITIONS, 3, SETTLE))
        .unwrap();
    rt.block_on(wait_status(&client, SETTLE, "4 nodes", |s| {
        s.nodes.len() == 4
    }))
    .unwrap();
    // The fourth node takes its share of replicas (votes and logs that it would carry
    // into a new cluster on the same addresses, if nothing stopped it).
    rt.block_on(client.rebalance()).unwrap();
    let four = fourth.node_id;
    rt.block_on(wait_status(&client, SETTLE, "rebalanced", |s| {
        settled(s, PARTITIONS, 3)
            && s.partitions
                .iter()
                .filter(|p| p.replicas.contains(&four))
                .count()
                >= 4
    }))
    .unwrap();
    let old_cluster = rt.block_on(client.cluster_map()).unwrap().cluster_id;
    assert_ne!(old_cluster, 0, "a founded cluster has an id");

    // Values unique to the old cluster, one per partition and more.
    let mut old_keys = key_per_partition(&client, "old");
    old_keys.extend((0..32).map(|i| format!("old-extra-{i}")));
    for k in &old_keys {
        rt.block_on(client.set(k.as_bytes(), Bytes::from(format!("old-value-of-{k}"))))
            .unwrap();
    }

    // The founding three die; the fourth (added by hand) keeps running.
    for n in &mut old.nodes {
        n.kill9();
    }
    let restarted = Instant::now();
    let first = raftcache_tests::NodeProc::start_at(&bins, &addrs[0], &args).unwrap();
    let mut new = Cluster { nodes: vec![first] };
    for addr in &addrs[1..] {
        new.nodes
            .push(Cluster::join_at(&bins, addr, &addrs[0], &args).unwrap());
    }
    let fresh = rt
        .block_on(connect_settled(addrs.clone(), PARTITIONS, 3, SETTLE))
        .unwrap();
    let new_map = rt.block_on(fresh.cluster_map()).unwrap();
    assert_ne!(new_map.cluster_id, old_cluster, "a new cluster, a new id");
    assert_eq!(new_map.nodes.len(), 3, "the leftover node is no member");

    // Every partition of the new cluster takes writes, and none shows an old value.
    for k in key_per_partition(&fresh, "new") {
        rt.block_on(fresh.set(k.as_bytes(), Bytes::from("new")))
            .unwrap();
        let got = rt.block_on(fresh.get(k.as_bytes())).unwrap().unwrap();
        assert_eq!(got.value, "new");
    }
    for k in &old_keys {
        let got = rt.block_on(fresh.get(k.as_bytes())).unwrap();
        assert!(
            got.is_none(),
            "the new cluster shows {k} of the old one: {got:?}"
        );
    }

    // The client connected before the restart follows the new cluster by itself.
    let followed = Instant::now();
    eventually(
        Duration::from_secs(30),
        "followed by the old client",
        || {
            let written = rt.block_on(client.set("after-restart", Bytes::from("yes")));
            let read = rt.block_on(client.get("after-restart"));
            matches!((written, read), (Ok(_), Ok(Some(v))) if v.value == "yes")
        },
    );
    eprintln!(
        "the old client followed the new cluster {:?} after it settled ({:?} after the restart)",
        followed.elapsed(),
        restarted.elapsed()
    );
    assert_eq!(
        rt.block_on(client.cluster_map()).unwrap().cluster_id,
        new_map.cluster_id
    );
    for k in &old_keys {
        let got = rt.block_on(client.get(k.as_bytes())).unwrap();
        assert!(
            got.is_none(),
            "the old client reads {k} of the old cluster: {got:?}"
        );
    }

    // The leftover node was told, and says so once per peer; the new nodes refused it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !fourth.log().contains("refuses this node's raft messages") {
        if Instant::now() > deadline {
            for n in &new.nodes {
                raftcache_tests::print_log_tail("new node", &n.log());
            }
            raftcache_tests::print_log_tail("leftover node", &fourth.log());
            panic!("the leftover node logged no refusal");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = fourth.log();
    let told = log.matches("refuses this node's raft messages").count();
    assert!(
        (1..=3).contains(&told),
        "logged once per peer, not per message: {told} times\n{log}"
    );
    assert!(
        log.contains("WRONG_CLUSTER") || log.contains("belongs to cluster"),
        "{log}"
    );
    let refused: usize = new
        .nodes
        .iter()
        .map(|n| n.log().matches("refusing raft messages from node").count())
        .sum();
    assert!(refused >= 1, "the new nodes log the refusal");
    assert!(refused <= 3 * 2, "once per peer: {refused}");

    // Still nothing of the old cluster after the leftover node had time to try.
    for k in &old_keys {
        let got = rt.block_on(fresh.get(k.as_bytes())).unwrap();
        assert!(got.is_none(), "late: the new cluster shows {k}: {got:?}");
    }
}

/// Sends one RESP command and reads one line of reply.
fn resp_line(addr: SocketAddr, args: &[&str]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(out.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        if s.read(&mut byte).unwrap() == 0 {
            break;
        }
        reply.push(byte[0]);
    }
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn a_removed_node_answers_removed_and_clients_move_on() {
    let bins = bins!();
    let rt = runtime();
    let args = ["--partitions=8", "--resp-addr=127.0.0.1:0"];
    let cluster = Cluster::start(&bins, 3, &args).unwrap();
    let seed = cluster.endpoints()[0].clone();
    let fourth = Cluster::join(&bins, &seed, &args).unwrap();
    let all = {
        let mut e = cluster.endpoints();
        e.push(fourth.endpoint());
        e
    };
    let status_client = rt
        .block_on(connect_settled(all, PARTITIONS, 3, SETTLE))
        .unwrap();
    rt.block_on(wait_status(&status_client, SETTLE, "4 nodes", |s| {
        s.nodes.len() == 4 && settled(s, PARTITIONS, 3)
    }))
    .unwrap();
    // A client that only knows the node about to be removed.
    let pointed = rt
        .block_on(Client::connect(ClientConfig::new([fourth.endpoint()])))
        .unwrap();
    rt.block_on(pointed.set("kept", Bytes::from("v1"))).unwrap();

    let id = fourth.node_id.to_string();
    let out = run_cli(
        &bins,
        &seed,
        &["admin", "remove-node", &id, "--wait", "--timeout", "120s"],
        Duration::from_secs(150),
    )
    .unwrap();
    assert!(
        out.status.success(),
        "remove-node: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // gRPC: a keyed call answers REMOVED (FAILED_PRECONDITION), naming node and cluster.
    let mut raw = rt
        .block_on(CacheClient::connect(format!(
            "http://{}",
            fourth.endpoint()
        )))
        .unwrap();
    let mut last = String::new();
    eventually(Duration::from_secs(15), "REMOVED on gRPC", || {
        let req = GetRequest {
            key: Bytes::from("kept"),
            route: Some(Route {
                partition: pointed.partition_of("kept"),
                epoch: 0,
                cluster_id: 0,
            }),
            ..GetRequest::default()
        };
        match rt.block_on(raw.get(req)) {
            Err(st) => {
                last = format!("{st:?}");
                st.code() == Code::FailedPrecondition
                    && ErrorDetail::from_status(&st).map(|d| d.code()) == Some(ErrorCode::Removed)
                    && st
                        .message()
                        .contains(&format!("node {id} was removed from cluster"))
                    && st.message().contains("it can be shut down")
            }
            Ok(r) => {
                last = format!("{r:?}");
                false
            }
        }
    });
    eprintln!("removed node answers: {last}");

    // RESP: keyed commands and DBSIZE answer the same error.
    let resp = fourth.resp.unwrap();
    for cmd in [&["GET", "kept"][..], &["SET", "x", "1"], &["DBSIZE"]] {
        let line = resp_line(resp, cmd);
        assert!(
            line.starts_with("-ERR node ") && line.contains("was removed from cluster"),
            "{cmd:?}: {line}"
        );
    }
    assert_eq!(resp_line(resp, &["PING"]), "+PONG\r\n");
    assert_eq!(
        fourth.log().matches("was removed from cluster").count(),
        1,
        "logged once"
    );

    // The client pointed at it moves on to the cluster's other nodes.
    let moved = Instant::now();
    let got = rt.block_on(pointed.get("kept")).unwrap().unwrap();
    assert_eq!(got.value, "v1");
    rt.block_on(pointed.set("after-removal", Bytes::from("v2")))
        .unwrap();
    eprintln!("the client moved on in {:?}", moved.elapsed());
    // Even a new client seeded with the removed node alone finds the cluster.
    let late = rt
        .block_on(Client::connect(ClientConfig::new([fourth.endpoint()])))
        .unwrap();
    assert_eq!(
        rt.block_on(late.get("after-removal"))
            .unwrap()
            .unwrap()
            .value,
        "v2"
    );
}
