//! The near cache end to end against an in-process fake node over loopback gRPC: the
//! driver's streams, the client's read and write paths, gaps, lost streams and the
//! driver's end. (The real node's `Watch` is tested in `tests/tests/t95_near_cache.rs`.)

use crate::{Client, ClientConfig, NearCacheConfig};
use bytes::Bytes;
use futures::channel::mpsc;
use raftcache_proto::tonic::transport::server::TcpIncoming;
use raftcache_proto::tonic::transport::Server;
use raftcache_proto::tonic::{self, Request, Response, Status};
use raftcache_proto::v1::cache_server::{Cache, CacheServer};
use raftcache_proto::v1::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const PARTITIONS: u32 = 4;

type Events = mpsc::UnboundedSender<Result<WatchEvent, Status>>;

/// A one-node fake with a plain map whose writes are streamed to its watchers.
#[derive(Default)]
struct Fake {
    addr: String,
    state: Mutex<State>,
    gets: AtomicU64,
    /// CHANGE events to swallow (a forced gap), as `InjectFault.drop_watch_events`.
    drop_events: AtomicU64,
    /// What `Stats` reports as hot.
    hot: Mutex<Vec<Bytes>>,
}

#[derive(Default)]
struct State {
    data: HashMap<Bytes, (Bytes, u64)>,
    /// The last change index, per partition.
    seq: HashMap<u32, u64>,
    next_index: u64,
    watchers: Vec<(Vec<u32>, Events)>,
}

impl Fake {
    /// A change of `key` in `partition` (written or deleted), streamed to its watchers.
    fn changed(&self, state: &mut State, partition: u32, key: &Bytes) -> u64 {
        state.next_index += 1;
        let seq = state.next_index;
        let prev_seq = state.seq.insert(partition, seq).unwrap_or(0);
        let dropped = self
            .drop_events
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !dropped {
            let event = WatchEvent {
                partition,
                kind: WatchEventKind::Change as i32,
                seq,
                prev_seq,
                keys: vec![key.clone()],
                prefixes: vec![],
                cdc_lsn: 0,
            };
            state.watchers.retain(|(ps, tx)| {
                !ps.contains(&partition) || tx.unbounded_send(Ok(event.clone())).is_ok()
            });
        }
        seq
    }

    /// Ends every watch stream (as a node restart would).
    fn end_streams(&self) {
        self.state.lock().unwrap().watchers.clear();
    }

    /// Open watch streams (those whose client end is still there).
    fn open_streams(&self) -> usize {
        let mut state = self.state.lock().unwrap();
        state.watchers.retain(|(_, tx)| !tx.is_closed());
        state.watchers.len()
    }

    fn map(&self) -> ClusterMapResponse {
        ClusterMapResponse {
            epoch: 1,
            partition_count: PARTITIONS,
            vnodes: crate::ring::DEFAULT_VNODES,
            nodes: vec![NodeInfo {
                id: 1,
                addr: self.addr.clone(),
                state: "active".into(),
            }],
            partitions: (0..PARTITIONS)
                .map(|id| PartitionInfo {
                    id,
                    leader: 1,
                    replicas: vec![1],
                    observed: true,
                    ..PartitionInfo::default()
                })
                .collect(),
            node_id: 1,
            replication_factor: 1,
            cluster_id: 0,
        }
    }
}

struct Service(Arc<Fake>);

fn partition(route: Option<Route>) -> Result<u32, Status> {
    route
        .map(|r| r.partition)
        .ok_or_else(|| Status::invalid_argument("no route"))
}

#[tonic::async_trait]
impl Cache for Service {
    async fn get(&self, r: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.0.gets.fetch_add(1, Ordering::SeqCst);
        let r = r.into_inner();
        let state = self.0.state.lock().unwrap();
        Ok(Response::new(match state.data.get(&r.key) {
            Some((value, version)) => GetResponse {
                found: true,
                value: value.clone(),
                version: *version,
                ..GetResponse::default()
            },
            None => GetResponse::default(),
        }))
    }

    async fn m_get(&self, r: Request<MGetRequest>) -> Result<Response<MGetResponse>, Status> {
        let r = r.into_inner();
        let state = self.0.state.lock().unwrap();
        let values = r
            .keys
            .iter()
            .map(|k| {
                self.0.gets.fetch_add(1, Ordering::SeqCst);
                match state.data.get(&k.key) {
                    Some((value, version)) => GetResponse {
                        found: true,
                        value: value.clone(),
                        version: *version,
                        ..GetResponse::default()
                    },
                    None => GetResponse::default(),
                }
            })
            .collect();
        Ok(Response::new(MGetResponse { values }))
    }

    async fn set(&self, r: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        let r = r.into_inner();
        let p = partition(r.route)?;
        let mut state = self.0.state.lock().unwrap();
        let version = self.0.changed(&mut state, p, &r.key);
        state.data.insert(r.key, (r.value, version));
        Ok(Response::new(SetResponse {
            applied: true,
            version,
            ..SetResponse::default()
        }))
    }

    async fn delete(&self, r: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let r = r.into_inner();
        let p = partition(r.route)?;
        let mut state = self.0.state.lock().unwrap();
        let deleted = state.data.remove(&r.key).is_some();
        self.0.changed(&mut state, p, &r.key);
        Ok(Response::new(DeleteResponse { deleted }))
    }

    async fn incr(&self, _: Request<IncrRequest>) -> Result<Response<IncrResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn expire(&self, _: Request<ExpireRequest>) -> Result<Response<ExpireResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn cluster_map(
        &self,
        _: Request<ClusterMapRequest>,
    ) -> Result<Response<ClusterMapResponse>, Status> {
        Ok(Response::new(self.0.map()))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let hot_keys = self
            .0
            .hot
            .lock()
            .unwrap()
            .iter()
            .map(|key| HotKey {
                key: key.clone(),
                ..HotKey::default()
            })
            .collect();
        Ok(Response::new(StatsResponse {
            hot_keys,
            ..StatsResponse::default()
        }))
    }

    async fn apply_changes(
        &self,
        _: Request<ApplyChangesRequest>,
    ) -> Result<Response<ApplyChangesResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn get_or_lease(
        &self,
        _: Request<GetOrLeaseRequest>,
    ) -> Result<Response<GetOrLeaseResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn release_lease(
        &self,
        _: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn resp(
        &self,
        _: Request<raftcache_proto::v1::RespRequest>,
    ) -> Result<Response<raftcache_proto::v1::RespResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    type WatchStream = mpsc::UnboundedReceiver<Result<WatchEvent, Status>>;

    async fn watch(&self, r: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let partitions = r.into_inner().partitions;
        let (tx, rx) = mpsc::unbounded();
        let mut state = self.0.state.lock().unwrap();
        for &p in &partitions {
            let seq = state.seq.get(&p).copied().unwrap_or(0);
            let sync = WatchEvent {
                partition: p,
                kind: WatchEventKind::Sync as i32,
                seq,
                ..WatchEvent::default()
            };
            let _ = tx.unbounded_send(Ok(sync));
        }
        state.watchers.push((partitions, tx));
        Ok(Response::new(rx))
    }
}

async fn start_fake() -> Arc<Fake> {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
    let fake = Arc::new(Fake {
        addr: incoming.local_addr().unwrap().to_string(),
        ..Fake::default()
    });
    tokio::spawn(
        Server::builder()
            .add_service(CacheServer::new(Service(Arc::clone(&fake))))
            .serve_with_incoming(incoming),
    );
    fake
}

async fn near_client(fake: &Fake) -> Client {
    near_client_with(fake, NearCacheConfig::default()).await
}

async fn near_client_with(fake: &Fake, near: NearCacheConfig) -> Client {
    let config = ClientConfig {
        near_cache: Some(near),
        ..ClientConfig::new([fake.addr.as_str()])
    };
    let client = Client::connect(config).await.unwrap();
    wait_for(Duration::from_secs(5), "every partition synced", || {
        client.near_cache_stats().unwrap().synced_partitions == u64::from(PARTITIONS)
    })
    .await;
    client
}

/// Polls `ok` every 10 ms until it holds; panics after `limit`.
async fn wait_for(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "not {what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads `key` with `client` until it has `want`, at most 3 s; returns the reads.
async fn read_until(client: &Client, key: &str, want: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(3);
    for reads in 1.. {
        let got = client.get(key).await.unwrap().map(|v| v.value);
        if got.as_deref() == Some(want.as_bytes()) {
            return reads;
        }
        assert!(
            Instant::now() < deadline,
            "{key} never read {want}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    unreachable!()
}

#[tokio::test]
async fn hits_are_served_locally_and_other_writes_invalidate_them() {
    let fake = start_fake().await;
    let a = near_client(&fake).await;
    let b = Client::connect(ClientConfig::new([fake.addr.as_str()]))
        .await
        .unwrap();
    assert!(b.near_cache_stats().is_none());

    b.set("k", "v1").await.unwrap();
    assert_eq!(a.get("k").await.unwrap().unwrap().value, "v1");
    let gets = fake.gets.load(Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(a.get("k").await.unwrap().unwrap().value, "v1");
    }
    assert_eq!(
        fake.gets.load(Ordering::SeqCst),
        gets,
        "hits never reach the node"
    );
    let st = a.near_cache_stats().unwrap();
    assert_eq!((st.hits, st.misses, st.entries), (10, 1, 1));

    b.set("k", "v2").await.unwrap();
    read_until(&a, "k", "v2").await;
    let st = a.near_cache_stats().unwrap();
    assert!(st.invalidations >= 1, "{st:?}");
    b.delete("k").await.unwrap();
    wait_for(Duration::from_secs(3), "k dropped", || {
        a.near_cache_stats().unwrap().entries == 0
    })
    .await;
    assert_eq!(a.get("k").await.unwrap(), None);

    // Multi-gets: hits locally, the rest in one remote call, then cached.
    for k in ["m1", "m2", "m3"] {
        b.set(k, k).await.unwrap();
    }
    a.get("m1").await.unwrap();
    let got = a.mget(&["m1", "m2", "m3", "none"]).await.unwrap();
    let got: Vec<Option<Bytes>> = got.into_iter().map(|v| v.map(|v| v.value)).collect();
    assert_eq!(
        got,
        vec![
            Some("m1".into()),
            Some("m2".into()),
            Some("m3".into()),
            None
        ]
    );
    let gets = fake.gets.load(Ordering::SeqCst);
    a.mget(&["m1", "m2", "m3"]).await.unwrap();
    assert_eq!(fake.gets.load(Ordering::SeqCst), gets);
}

#[tokio::test]
async fn the_clients_own_writes_are_read_back_without_an_event() {
    let fake = start_fake().await;
    let a = near_client(&fake).await;
    a.set("own", "1").await.unwrap();
    assert_eq!(a.get("own").await.unwrap().unwrap().value, "1");
    assert_eq!(a.get("own").await.unwrap().unwrap().value, "1");
    // The node's event is lost (and with it the sequence): the local invalidation
    // around the write still makes the next read go to the node.
    fake.drop_events.store(1, Ordering::SeqCst);
    a.set("own", "2").await.unwrap();
    assert_eq!(a.get("own").await.unwrap().unwrap().value, "2");
    a.delete("own").await.unwrap();
    assert_eq!(a.get("own").await.unwrap(), None);
}

#[tokio::test]
async fn a_dropped_event_is_detected_as_a_gap() {
    let fake = start_fake().await;
    let a = near_client(&fake).await;
    let b = Client::connect(ClientConfig::new([fake.addr.as_str()]))
        .await
        .unwrap();
    for k in ["{g}a", "{g}b"] {
        b.set(k, "old").await.unwrap();
        a.get(k).await.unwrap();
        a.get(k).await.unwrap();
    }
    assert_eq!(a.near_cache_stats().unwrap().hits, 2);
    fake.drop_events.store(1, Ordering::SeqCst);
    b.set("{g}a", "new").await.unwrap(); // its event is swallowed
    b.set("{g}c", "x").await.unwrap(); // prev_seq shows the hole
    wait_for(Duration::from_secs(3), "a gap seen", || {
        a.near_cache_stats().unwrap().gaps == 1
    })
    .await;
    assert_eq!(a.get("{g}a").await.unwrap().unwrap().value, "new");
    let misses = a.near_cache_stats().unwrap().misses;
    assert_eq!(a.get("{g}b").await.unwrap().unwrap().value, "old");
    assert_eq!(
        a.near_cache_stats().unwrap().misses,
        misses + 1,
        "re-fetched"
    );
}

#[tokio::test]
async fn a_lost_stream_unsyncs_its_partitions_until_it_is_back() {
    let fake = start_fake().await;
    let a = near_client(&fake).await;
    a.set("k", "v").await.unwrap();
    a.get("k").await.unwrap();
    assert_eq!(a.near_cache_stats().unwrap().entries, 1);
    fake.end_streams();
    wait_for(Duration::from_secs(3), "the stream back", || {
        let st = a.near_cache_stats().unwrap();
        st.entries == 0 && st.synced_partitions == u64::from(PARTITIONS)
    })
    .await;
    a.get("k").await.unwrap();
    a.get("k").await.unwrap();
    assert_eq!(a.near_cache_stats().unwrap().entries, 1);
    assert_eq!(fake.open_streams(), 1, "one stream for the one node");
}

#[tokio::test]
async fn dropping_the_client_ends_its_watch_stream() {
    let fake = start_fake().await;
    let a = near_client(&fake).await;
    let clone = a.clone();
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.open_streams(), 1, "a clone keeps it");
    drop(clone);
    wait_for(Duration::from_secs(3), "the stream closed", || {
        fake.open_streams() == 0
    })
    .await;
}

#[tokio::test]
async fn hot_mode_keeps_only_the_keys_nodes_report_hot() {
    let fake = start_fake().await;
    *fake.hot.lock().unwrap() = vec![Bytes::from_static(b"hot")];
    let near = NearCacheConfig {
        mode: crate::NearMode::Hot,
        hot_refresh: Duration::from_millis(50),
        ..NearCacheConfig::default()
    };
    let a = near_client_with(&fake, near).await;
    a.set("hot", "h").await.unwrap();
    a.set("cold", "c").await.unwrap();
    // Read both until the hot set has arrived (within a refresh) and "hot" is cached.
    let deadline = Instant::now() + Duration::from_secs(3);
    while a.near_cache_stats().unwrap().entries == 0 {
        assert!(Instant::now() < deadline, "the hot key never cached");
        a.get("hot").await.unwrap();
        a.get("cold").await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..3 {
        assert_eq!(a.get("hot").await.unwrap().unwrap().value, "h");
        assert_eq!(a.get("cold").await.unwrap().unwrap().value, "c");
    }
    let st = a.near_cache_stats().unwrap();
    assert_eq!(st.entries, 1, "only the hot key: {st:?}");
    assert!(st.hits >= 3, "{st:?}");
    // The key cools down: it is dropped at the next refresh.
    fake.hot.lock().unwrap().clear();
    wait_for(Duration::from_secs(3), "the cooled key dropped", || {
        a.near_cache_stats().unwrap().entries == 0
    })
    .await;
}
