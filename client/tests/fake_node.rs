//! The client and the `raftcache` binary against an in-process fake node.
//!
//! The fake serves `raftcache.v1.Cache` over real loopback gRPC with a plain map, and
//! checks what a real node checks about routing: the partition must be the one the
//! ring gives for the key, and the epoch must be its own. Tests can bump its epoch,
//! slow it down, make it answer NOT_LEADER or UNAVAILABLE, replace the map it serves,
//! and count the calls it got.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use raftcache_client::ring::{Ring, DEFAULT_VNODES};
use raftcache_client::{
    Client, ClientConfig, ClientError, Condition, Consistency, LoadError, LoadOptions, LoadSource,
    ReadOptions, SetOptions, Ttl,
};
use raftcache_proto::tonic::transport::server::TcpIncoming;
use raftcache_proto::tonic::transport::Server;
use raftcache_proto::tonic::{self, Request, Response, Status};
use raftcache_proto::v1::cache_server::{Cache, CacheServer};
use raftcache_proto::v1::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PARTITIONS: u32 = 16;
const MAX_KEY: u64 = 1024;
/// A key the fake answers only after a long pause.
const SLOW_KEY: &[u8] = b"slow";

/// A stored value: (value, version, TTL deadline).
type Entry = (Bytes, u64, Option<Instant>);

#[derive(Default)]
struct Counters {
    cluster_maps: AtomicU64,
    gets: AtomicU64,
    mgets: AtomicU64,
    sets: AtomicU64,
    incrs: AtomicU64,
}

struct Fake {
    id: u64,
    addr: String,
    /// When set, the map served instead of the one-node map.
    map_override: Mutex<Option<ClusterMapResponse>>,
    /// When set, keyed requests (but FOLLOWER reads) answer NOT_LEADER with this
    /// hint (leader id, leader address).
    not_leader: Mutex<Option<(u64, String)>>,
    /// Sets and incrs to answer UNAVAILABLE (without applying them) before serving.
    fail_writes: AtomicU64,
    /// When set, a slow incr (applied, answer lost) also makes the node lose its
    /// leadership: later requests get NOT_LEADER.
    step_down_on_slow: std::sync::atomic::AtomicBool,
    ring: Ring,
    /// The epoch requests must carry.
    epoch: AtomicU64,
    /// The epoch of the map the fake serves (normally `epoch`).
    map_epoch: AtomicU64,
    data: Mutex<HashMap<Bytes, Entry>>,
    /// First answers to sets by request id (what a real partition remembers).
    answered: Mutex<HashMap<(u64, u64), SetResponse>>,
    /// First answers to incrs by request id.
    incremented: Mutex<HashMap<(u64, u64), IncrResponse>>,
    next_version: AtomicU64,
    calls: Counters,
}

impl Fake {
    /// Moves the node, and the map it serves, to `epoch`.
    fn set_epoch(&self, epoch: u64) {
        self.map_epoch.store(epoch, Ordering::SeqCst);
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// Answers UNAVAILABLE while `fail_writes` lasts.
    fn maybe_fail(&self) -> Result<(), Status> {
        let failing = self
            .fail_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(Status::unavailable("the fake is failing writes"));
        }
        Ok(())
    }

    fn check_leader(&self, key: &[u8], route: Option<Route>) -> Result<(), Status> {
        self.check(key, route)?;
        if let Some((id, addr)) = self.not_leader.lock().unwrap().clone() {
            let mut d = ErrorDetail::of(ErrorCode::NotLeader);
            d.partition = route.map(|r| r.partition);
            d.leader_id = Some(id);
            d.leader_addr = Some(addr);
            return Err(d.into_status("not the leader"));
        }
        Ok(())
    }

    fn check(&self, key: &[u8], route: Option<Route>) -> Result<(), Status> {
        if key.is_empty() {
            return Err(ErrorDetail::of(ErrorCode::EmptyKey).into_status("empty key"));
        }
        if key.len() as u64 > MAX_KEY {
            let mut d = ErrorDetail::of(ErrorCode::KeyTooLarge);
            d.actual = Some(key.len() as u64);
            d.limit = Some(MAX_KEY);
            return Err(d.into_status("key too large"));
        }
        let route = route.ok_or_else(|| Status::invalid_argument("no route"))?;
        let epoch = self.epoch.load(Ordering::SeqCst);
        if route.epoch != epoch {
            let mut d = ErrorDetail::of(ErrorCode::WrongEpoch);
            d.epoch = Some(epoch);
            return Err(d.into_status("wrong epoch"));
        }
        let want = self.ring.partition_of(key);
        if route.partition != want {
            return Err(ErrorDetail::of(ErrorCode::InvalidArgument)
                .into_status(format!("key routed to {}, not {want}", route.partition)));
        }
        Ok(())
    }

    fn read(&self, key: &Bytes, skip_value: bool) -> GetResponse {
        let data = self.data.lock().unwrap();
        match data.get(key) {
            Some((value, version, deadline)) if deadline.is_none_or(|d| d > Instant::now()) => {
                GetResponse {
                    found: true,
                    value: if skip_value {
                        Bytes::new()
                    } else {
                        value.clone()
                    },
                    version: *version,
                    ttl_remaining_ms: deadline
                        .map(|d| d.saturating_duration_since(Instant::now()).as_millis() as u64),
                    source_lsn: 0,
                }
            }
            _ => GetResponse::default(),
        }
    }

    fn map(&self) -> ClusterMapResponse {
        if let Some(mut map) = self.map_override.lock().unwrap().clone() {
            map.node_id = self.id;
            return map;
        }
        ClusterMapResponse {
            epoch: self.map_epoch.load(Ordering::SeqCst),
            partition_count: PARTITIONS,
            vnodes: DEFAULT_VNODES,
            nodes: vec![NodeInfo {
                id: self.id,
                addr: self.addr.clone(),
                state: "active".into(),
            }],
            partitions: (0..PARTITIONS)
                .map(|id| PartitionInfo {
                    id,
                    leader: self.id,
                    replicas: vec![self.id],
                    term: 0,
                    applied: 0,
                    learners: vec![],
                    observed: true,
                    cdc_lsn: 0,
                })
                .collect(),
            node_id: self.id,
            replication_factor: 1,
            cluster_id: 0,
        }
    }
}

/// The service handle: the server owns one, the test keeps the `Arc<Fake>`.
struct Service(Arc<Fake>);

impl std::ops::Deref for Service {
    type Target = Fake;

    fn deref(&self) -> &Fake {
        &self.0
    }
}

#[tonic::async_trait]
impl Cache for Service {
    async fn get(&self, r: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.calls.gets.fetch_add(1, Ordering::SeqCst);
        let r = r.into_inner();
        if r.consistency() == raftcache_proto::v1::Consistency::Follower {
            self.check(&r.key, r.route)?;
        } else {
            self.check_leader(&r.key, r.route)?;
        }
        if r.key == SLOW_KEY {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(Response::new(self.read(&r.key, r.skip_value)))
    }

    async fn m_get(&self, r: Request<MGetRequest>) -> Result<Response<MGetResponse>, Status> {
        self.calls.mgets.fetch_add(1, Ordering::SeqCst);
        let mut values = Vec::new();
        for k in r.into_inner().keys {
            self.check(&k.key, k.route)?;
            values.push(self.read(&k.key, false));
        }
        Ok(Response::new(MGetResponse { values }))
    }

    async fn set(&self, r: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        self.calls.sets.fetch_add(1, Ordering::SeqCst);
        let r = r.into_inner();
        self.check_leader(&r.key, r.route)?;
        self.maybe_fail()?;
        let id = r.request.map(|id| (id.client, id.seq));
        if let Some(first) = id.and_then(|id| self.answered.lock().unwrap().get(&id).copied()) {
            return Ok(Response::new(first));
        }
        let current = self.read(&r.key, true);
        let applies = match r.condition() {
            SetCondition::None => true,
            SetCondition::IfAbsent => !current.found,
            SetCondition::IfPresent => current.found,
            SetCondition::IfVersion => current.found && current.version == r.expected_version,
            SetCondition::Unspecified => {
                return Err(ErrorDetail::of(ErrorCode::InvalidArgument).into_status("condition"))
            }
        };
        if !applies {
            let answer = SetResponse {
                applied: false,
                version: current.version,
                ..Default::default()
            };
            if let Some(id) = id {
                self.answered.lock().unwrap().insert(id, answer);
            }
            return Ok(Response::new(answer));
        }
        let version = self.next_version.fetch_add(1, Ordering::SeqCst) + 1;
        let deadline = (r.ttl_ms > 0).then(|| Instant::now() + Duration::from_millis(r.ttl_ms));
        let slow = r.key == SLOW_KEY;
        self.data
            .lock()
            .unwrap()
            .insert(r.key, (r.value, version, deadline));
        let answer = SetResponse {
            applied: true,
            version,
            ..Default::default()
        };
        if let Some(id) = id {
            self.answered.lock().unwrap().insert(id, answer);
        }
        if slow {
            if self.step_down_on_slow.load(Ordering::SeqCst) {
                *self.not_leader.lock().unwrap() = Some((self.id, self.addr.clone()));
            }
            // Applied, but the answer is lost in a slow network.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(Response::new(answer))
    }

    async fn delete(&self, r: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let r = r.into_inner();
        self.check(&r.key, r.route)?;
        let deleted = self.read(&r.key, true).found;
        self.data.lock().unwrap().remove(&r.key);
        Ok(Response::new(DeleteResponse { deleted }))
    }

    async fn incr(&self, r: Request<IncrRequest>) -> Result<Response<IncrResponse>, Status> {
        self.calls.incrs.fetch_add(1, Ordering::SeqCst);
        let r = r.into_inner();
        self.check_leader(&r.key, r.route)?;
        self.maybe_fail()?;
        let id = r.request.map(|id| (id.client, id.seq));
        if let Some(first) = id.and_then(|id| self.incremented.lock().unwrap().get(&id).copied()) {
            return Ok(Response::new(first));
        }
        let current = self.read(&r.key, false);
        let old: i64 = if current.found {
            std::str::from_utf8(&current.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ErrorDetail::of(ErrorCode::NotAnInteger).into_status("nan"))?
        } else {
            0
        };
        let value = old
            .checked_add(r.delta)
            .ok_or_else(|| ErrorDetail::of(ErrorCode::IncrOverflow).into_status("overflow"))?;
        let version = self.next_version.fetch_add(1, Ordering::SeqCst) + 1;
        let slow = r.key == SLOW_KEY;
        self.data
            .lock()
            .unwrap()
            .insert(r.key, (value.to_string().into(), version, None));
        let answer = IncrResponse { value, version };
        if let Some(id) = id {
            self.incremented.lock().unwrap().insert(id, answer);
        }
        if slow {
            if self.step_down_on_slow.load(Ordering::SeqCst) {
                *self.not_leader.lock().unwrap() = Some((self.id, self.addr.clone()));
            }
            // Applied, but the answer is lost in a slow network.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(Response::new(answer))
    }

    async fn expire(&self, r: Request<ExpireRequest>) -> Result<Response<ExpireResponse>, Status> {
        let r = r.into_inner();
        self.check(&r.key, r.route)?;
        let mut data = self.data.lock().unwrap();
        let updated = match data.get_mut(&r.key) {
            Some(entry) => {
                entry.2 = (r.ttl_ms > 0).then(|| Instant::now() + Duration::from_millis(r.ttl_ms));
                true
            }
            None => false,
        };
        Ok(Response::new(ExpireResponse { updated }))
    }

    async fn cluster_map(
        &self,
        _: Request<ClusterMapRequest>,
    ) -> Result<Response<ClusterMapResponse>, Status> {
        self.calls.cluster_maps.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(self.map()))
    }

    async fn apply_changes(
        &self,
        _: Request<ApplyChangesRequest>,
    ) -> Result<Response<ApplyChangesResponse>, Status> {
        Err(Status::unimplemented("the fake node has no CDC"))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        Ok(Response::new(StatsResponse {
            node_id: self.id,
            keys: self.data.lock().unwrap().len() as u64,
            eviction_policy: "noeviction".into(),
            partitions: PARTITIONS,
            version: "fake".into(),
            ..Default::default()
        }))
    }

    async fn get_or_lease(
        &self,
        _: Request<GetOrLeaseRequest>,
    ) -> Result<Response<GetOrLeaseResponse>, Status> {
        Err(Status::unimplemented("the fake node has no leases"))
    }

    async fn release_lease(
        &self,
        _: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        Err(Status::unimplemented("the fake node has no leases"))
    }

    async fn resp(
        &self,
        _: Request<raftcache_proto::v1::RespRequest>,
    ) -> Result<Response<raftcache_proto::v1::RespResponse>, Status> {
        Err(Status::unimplemented("the fake node has no RESP"))
    }

    type WatchStream = futures::stream::Empty<Result<WatchEvent, Status>>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("the fake node has no watch"))
    }
}

/// Starts a fake node 1 on a free loopback port; it serves until the test ends.
async fn start_fake() -> Arc<Fake> {
    start_fake_with_id(1).await
}

/// Starts a fake node `id` on a free loopback port.
async fn start_fake_with_id(id: u64) -> Arc<Fake> {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap().to_string();
    let fake = Arc::new(Fake {
        id,
        addr,
        map_override: Mutex::default(),
        not_leader: Mutex::default(),
        fail_writes: AtomicU64::new(0),
        step_down_on_slow: std::sync::atomic::AtomicBool::new(false),
        ring: Ring::new(PARTITIONS, DEFAULT_VNODES),
        epoch: AtomicU64::new(1),
        map_epoch: AtomicU64::new(1),
        data: Mutex::default(),
        answered: Mutex::default(),
        incremented: Mutex::default(),
        next_version: AtomicU64::new(0),
        calls: Counters::default(),
    });
    let service = CacheServer::new(Service(Arc::clone(&fake)))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    fake
}

async fn connect(fake: &Fake) -> Client {
    Client::connect(ClientConfig::new([fake.addr.as_str()]))
        .await
        .unwrap()
}

#[tokio::test]
async fn basic_operations_round_trip() {
    let fake = start_fake().await;
    let client = connect(&fake).await;

    assert_eq!(client.get("k").await.unwrap(), None);
    let v1 = client.set("k", "one").await.unwrap();
    let got = client.get("k").await.unwrap().unwrap();
    assert_eq!(
        (got.value, got.version, got.ttl),
        (Bytes::from("one"), v1, None)
    );

    // Conditions.
    let nx = SetOptions {
        condition: Condition::IfAbsent,
        ..SetOptions::default()
    };
    let outcome = client.set_with("k", "two", nx).await.unwrap();
    assert!(!outcome.applied);
    assert_eq!(outcome.version, v1);
    let cas = SetOptions {
        condition: Condition::IfVersion(v1),
        ttl: Some(Duration::from_secs(60)),
        ..SetOptions::default()
    };
    let outcome = client.set_with("k", "two", cas).await.unwrap();
    assert!(outcome.applied && outcome.version > v1);

    match client.ttl("k").await.unwrap() {
        Ttl::Expires(left) => assert!(left > Duration::from_secs(58), "{left:?}"),
        other => panic!("{other:?}"),
    }
    assert!(client.expire("k", None).await.unwrap());
    assert_eq!(client.ttl("k").await.unwrap(), Ttl::Persistent);
    assert_eq!(client.ttl("nope").await.unwrap(), Ttl::Missing);
    assert!(!client
        .expire("nope", Some(Duration::from_secs(1)))
        .await
        .unwrap());

    assert_eq!(client.incr("n", 5).await.unwrap(), 5);
    assert_eq!(client.incr("n", -7).await.unwrap(), -2);
    assert_eq!(
        client.incr("k", 1).await.unwrap_err(),
        ClientError::NotAnInteger
    );

    assert!(client.delete("k").await.unwrap());
    assert!(!client.delete("k").await.unwrap());

    let stats = client.stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!((stats[0].node_id, stats[0].keys), (1, 1));
    assert_eq!(stats[0].addr, fake.addr);
}

#[tokio::test]
async fn node_errors_arrive_as_typed_errors() {
    let fake = start_fake().await;
    let client = connect(&fake).await;
    let long = vec![b'k'; 2000];
    assert_eq!(
        client.set(&long, "v").await.unwrap_err(),
        ClientError::KeyTooLarge {
            size: 2000,
            limit: MAX_KEY
        }
    );
    assert_eq!(client.get("").await.unwrap_err(), ClientError::EmptyKey);
}

#[tokio::test]
async fn values_of_16_mib_pass() {
    let fake = start_fake().await;
    let client = connect(&fake).await;
    let big = Bytes::from(vec![7u8; 16 << 20]);
    client.set("big", big.clone()).await.unwrap();
    assert_eq!(client.get("big").await.unwrap().unwrap().value, big);
}

#[tokio::test]
async fn mget_answers_in_input_order_with_one_call_per_node() {
    let fake = start_fake().await;
    let client = connect(&fake).await;
    for i in (0..100).step_by(2) {
        client
            .set(format!("key:{i}"), format!("v{i}"))
            .await
            .unwrap();
    }
    let keys: Vec<String> = (0..100).rev().map(|i| format!("key:{i}")).collect();
    let partitions: std::collections::HashSet<u32> =
        keys.iter().map(|k| client.partition_of(k)).collect();
    assert!(partitions.len() > 8, "the keys span many partitions");

    let values = client.mget(&keys).await.unwrap();
    assert_eq!(values.len(), 100);
    for (key, value) in keys.iter().zip(&values) {
        let i: u32 = key["key:".len()..].parse().unwrap();
        match value {
            Some(v) => {
                assert_eq!(i % 2, 0, "{key}");
                assert_eq!(v.value, format!("v{i}"));
            }
            None => assert_eq!(i % 2, 1, "{key}"),
        }
    }
    assert_eq!(fake.calls.mgets.load(Ordering::SeqCst), 1);
    assert!(client.mget::<&str>(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_wrong_epoch_refreshes_the_map_and_retries_once() {
    let fake = start_fake().await;
    let client = connect(&fake).await;
    client.set("k", "v").await.unwrap();
    let maps_before = fake.calls.cluster_maps.load(Ordering::SeqCst);

    fake.set_epoch(2);
    let gets_before = fake.calls.gets.load(Ordering::SeqCst);
    assert_eq!(client.get("k").await.unwrap().unwrap().value, "v");
    assert_eq!(fake.calls.gets.load(Ordering::SeqCst) - gets_before, 2);
    assert_eq!(
        fake.calls.cluster_maps.load(Ordering::SeqCst) - maps_before,
        1
    );
    assert_eq!(client.cluster_map().await.unwrap().epoch, 2);

    // The same for a multi-get.
    fake.set_epoch(3);
    let values = client.mget(&["k", "missing"]).await.unwrap();
    assert!(values[0].is_some() && values[1].is_none());
}

#[tokio::test]
async fn retrying_is_bounded_by_attempts_and_by_the_deadline() {
    let fake = start_fake().await;
    let mut config = ClientConfig::new([fake.addr.as_str()]);
    config.max_attempts = 4;
    let client = Client::connect(config).await.unwrap();
    // The node moves to epoch 9 but keeps serving a map of epoch 1: a refresh never
    // helps, and the client must give up after its attempts.
    fake.epoch.store(9, Ordering::SeqCst);
    let gets_before = fake.calls.gets.load(Ordering::SeqCst);
    let maps_before = fake.calls.cluster_maps.load(Ordering::SeqCst);
    assert_eq!(
        client.get("k").await.unwrap_err(),
        ClientError::WrongEpoch { epoch: Some(9) }
    );
    assert_eq!(fake.calls.gets.load(Ordering::SeqCst) - gets_before, 4);
    assert_eq!(
        fake.calls.cluster_maps.load(Ordering::SeqCst) - maps_before,
        3
    );

    // With attempts to spare, the deadline ends it, naming the last cause.
    let mut config = ClientConfig::new([fake.addr.as_str()]);
    config.max_attempts = u32::MAX;
    config.request_deadline = Duration::from_millis(300);
    let client = Client::connect(config).await.unwrap();
    let started = Instant::now();
    assert_eq!(
        client.get("k").await.unwrap_err(),
        ClientError::WrongEpoch { epoch: Some(9) }
    );
    let took = started.elapsed();
    assert!(took < Duration::from_millis(800), "{took:?}");
}

#[tokio::test]
async fn a_leader_hint_is_followed_at_once_and_remembered() {
    let a = start_fake_with_id(1).await;
    let b = start_fake_with_id(2).await;
    // A claims every partition in its map but says B (which A's map does not even
    // list) leads.
    *a.not_leader.lock().unwrap() = Some((2, b.addr.clone()));
    let client = connect(&a).await;
    let maps_before = a.calls.cluster_maps.load(Ordering::SeqCst);

    client.set("k", "v").await.unwrap();
    assert_eq!(a.calls.sets.load(Ordering::SeqCst), 1);
    assert_eq!(b.calls.sets.load(Ordering::SeqCst), 1);
    assert_eq!(
        a.calls.cluster_maps.load(Ordering::SeqCst),
        maps_before,
        "a hint needs no map refresh"
    );
    // The partition's leader is now cached: the next call goes straight to B.
    assert_eq!(client.get("k").await.unwrap().unwrap().value, "v");
    assert_eq!(a.calls.gets.load(Ordering::SeqCst), 0);
    assert_eq!(b.calls.gets.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn incr_is_retried_and_applied_once() {
    let fake = start_fake().await;
    let client = connect(&fake).await;

    // Failures that did not apply are retried.
    fake.fail_writes.store(2, Ordering::SeqCst);
    assert_eq!(client.incr("n", 1).await.unwrap(), 1);
    assert_eq!(fake.calls.incrs.load(Ordering::SeqCst), 3);

    // An increment applied before its answer was lost is retried with the same request
    // id and gets the first result: counted once.
    let mut config = ClientConfig::new([fake.addr.as_str()]);
    config.request_timeout = Duration::from_millis(200);
    config.request_deadline = Duration::from_secs(2);
    let client = Client::connect(config).await.unwrap();
    let before = fake.calls.incrs.load(Ordering::SeqCst);
    assert_eq!(client.incr(SLOW_KEY, 5).await.unwrap(), 5);
    assert!(
        fake.calls.incrs.load(Ordering::SeqCst) - before >= 2,
        "it was retried"
    );
    let stored = fake.read(&Bytes::from_static(SLOW_KEY), false);
    assert_eq!(stored.value, Bytes::from_static(b"5"));
}

#[tokio::test]
async fn an_unreachable_leader_is_retried_for_incr() {
    let fake = start_fake().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut map = fake.map();
    map.nodes.push(NodeInfo {
        id: 2,
        addr: dead.clone(),
        state: "active".into(),
    });
    for p in &mut map.partitions {
        p.leader = 2;
        p.replicas = vec![1, 2];
        p.observed = false;
    }
    *fake.map_override.lock().unwrap() = Some(map);
    let mut config = ClientConfig::new([fake.addr.as_str()]);
    config.max_attempts = 3;
    let client = Client::connect(config).await.unwrap();
    let maps_before = fake.calls.cluster_maps.load(Ordering::SeqCst);
    let err = client.incr("n", 1).await.unwrap_err();
    assert!(matches!(err, ClientError::Unreachable(_)), "{err:?}");
    assert_eq!(
        fake.calls.cluster_maps.load(Ordering::SeqCst) - maps_before,
        2,
        "refreshed before each retry"
    );
    assert_eq!(fake.calls.incrs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn follower_reads_spread_over_the_replicas() {
    let a = start_fake_with_id(1).await;
    let b = start_fake_with_id(2).await;
    let mut map = a.map();
    map.nodes.push(NodeInfo {
        id: 2,
        addr: b.addr.clone(),
        state: "active".into(),
    });
    for p in &mut map.partitions {
        p.replicas = vec![1, 2];
    }
    *a.map_override.lock().unwrap() = Some(map.clone());
    *b.map_override.lock().unwrap() = Some(map);
    let client = connect(&a).await;
    let follower = ReadOptions {
        consistency: Consistency::Follower {
            max_staleness: Duration::from_millis(100),
        },
        ..ReadOptions::default()
    };
    for _ in 0..10 {
        assert_eq!(client.get_with("k", follower).await.unwrap(), None);
    }
    let (on_a, on_b) = (
        a.calls.gets.load(Ordering::SeqCst),
        b.calls.gets.load(Ordering::SeqCst),
    );
    assert_eq!(on_a + on_b, 10);
    assert!(on_a > 0 && on_b > 0, "{on_a} on A, {on_b} on B");
    // Leader reads stay on the leader.
    client.get("k").await.unwrap();
    assert_eq!(a.calls.gets.load(Ordering::SeqCst), on_a + 1);

    // The merged status asks both nodes.
    let status = client.cluster_status().await.unwrap();
    assert_eq!(status.nodes.len(), 2);
    assert!(status.unreachable.is_empty());
    assert!(status
        .partitions
        .iter()
        .all(|p| p.leader == Some(1) && p.replicas == [1, 2]));
}

#[tokio::test]
async fn a_slow_node_times_out() {
    let fake = start_fake().await;
    let mut config = ClientConfig::new([fake.addr.as_str()]);
    config.request_timeout = Duration::from_millis(200);
    config.request_deadline = Duration::from_millis(200);
    let client = Client::connect(config).await.unwrap();
    let started = Instant::now();
    let err = client.get(SLOW_KEY).await.unwrap_err();
    assert_eq!(err, ClientError::Timeout(Duration::from_millis(200)));
    assert!(started.elapsed() < Duration::from_secs(2));

    // A timed-out read is retried while the call's deadline allows; the last attempt
    // is cut short by the deadline, which the error then names.
    let mut config = ClientConfig::new([fake.addr.as_str()]);
    config.request_timeout = Duration::from_millis(200);
    config.request_deadline = Duration::from_millis(500);
    let client = Client::connect(config).await.unwrap();
    let gets_before = fake.calls.gets.load(Ordering::SeqCst);
    let started = Instant::now();
    let err = client.get(SLOW_KEY).await.unwrap_err();
    assert_eq!(err, ClientError::Timeout(Duration::from_millis(500)));
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert!(fake.calls.gets.load(Ordering::SeqCst) - gets_before >= 2);
}

/// Regression (raftcache-jepsen's register workload found writes applied twice, and
/// a retried conditional write reported "not applied" although its first attempt had
/// applied): every attempt of one call carries the same request id, so a node that
/// remembers ids answers the retry with the first outcome.
#[tokio::test]
async fn a_retried_write_keeps_its_request_id_and_gets_the_first_outcome() {
    let fake = start_fake().await;
    let mut config = ClientConfig::new([fake.addr.as_str()]);
    config.request_timeout = Duration::from_millis(200);
    config.request_deadline = Duration::from_secs(2);
    let client = Client::connect(config).await.unwrap();
    let options = SetOptions {
        condition: Condition::IfAbsent,
        ..SetOptions::default()
    };
    let sets_before = fake.calls.sets.load(Ordering::SeqCst);
    // The first attempt applies, then its answer is lost (the fake sleeps past the
    // attempt's 200 ms); the retry finds the key present but gets the first outcome.
    let outcome = client
        .set_with(SLOW_KEY, "mine", options.clone())
        .await
        .unwrap();
    assert!(outcome.applied, "{outcome:?}");
    assert!(
        fake.calls.sets.load(Ordering::SeqCst) - sets_before >= 2,
        "it was retried"
    );
    let stored = fake.read(&Bytes::from_static(SLOW_KEY), false);
    assert_eq!(stored.value, Bytes::from_static(b"mine"));
    assert_eq!(stored.version, outcome.version);

    // Separate calls get separate ids: a false condition is still "not applied".
    let outcome = client.set_with("k", "a", options.clone()).await.unwrap();
    assert!(outcome.applied);
    let outcome = client.set_with("k", "b", options).await.unwrap();
    assert!(!outcome.applied);
}

/// Regression (raftcache-jepsen's counter workload found increments reported "not
/// applied" that a new leader had committed): a write whose first attempt may have
/// applied, and whose later attempts were all refused with NOT_LEADER, fails with
/// `MaybeApplied`, not with the last attempt's "surely unapplied" NOT_LEADER.
#[tokio::test]
async fn a_write_refused_after_an_ambiguous_attempt_is_not_reported_unapplied() {
    let fake = start_fake().await;
    let mut config = ClientConfig::new([fake.addr.as_str()]);
    config.request_timeout = Duration::from_millis(200);
    config.request_deadline = Duration::from_secs(2);
    let client = Client::connect(config).await.unwrap();
    fake.step_down_on_slow.store(true, Ordering::SeqCst);
    let err = client.incr(SLOW_KEY, 5).await.unwrap_err();
    let ClientError::MaybeApplied(last) = &err else {
        panic!("expected MaybeApplied, got {err:?}");
    };
    assert!(matches!(**last, ClientError::NotLeader { .. }), "{err:?}");
    assert!(!err.is_unapplied() && err.is_transient());
    assert!(
        fake.calls.incrs.load(Ordering::SeqCst) >= 2,
        "it was retried"
    );
    // It did apply, once.
    let stored = fake.read(&Bytes::from_static(SLOW_KEY), false);
    assert_eq!(stored.value, Bytes::from_static(b"5"));

    // A write refused on every attempt is still surely unapplied, and so is a read.
    let err = client.incr("other", 1).await.unwrap_err();
    assert!(err.is_unapplied(), "{err:?}");
    let err = client.get("other").await.unwrap_err();
    assert!(err.is_unapplied(), "{err:?}");
}

/// Runs the `raftcache` binary against `fake`.
async fn cli(fake: &Fake, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_raftcache"))
        .args(["--endpoints", &fake.addr])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn the_cli_speaks_in_exit_codes() {
    let fake = start_fake().await;

    assert_eq!(
        cli(&fake, &["get", "k"]).await,
        (1, String::new(), String::new())
    );
    assert_eq!(cli(&fake, &["set", "k", "hello"]).await.0, 0);
    assert_eq!(
        cli(&fake, &["set", "k", "x", "--nx"]).await,
        (1, "NOT SET\n".into(), String::new())
    );
    assert_eq!(
        cli(&fake, &["get", "k"]).await,
        (0, "hello\n".into(), String::new())
    );

    let (code, out, _) = cli(&fake, &["get", "k", "--json"]).await;
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["key"], "k");
    assert_eq!(json["found"], true);
    assert_eq!(json["value"], "hello");
    assert_eq!(json["ttl_ms"], serde_json::Value::Null);
    assert!(json["version"].as_u64().unwrap() > 0);

    assert_eq!(cli(&fake, &["incr", "n", "--by", "-3"]).await.1, "-3\n");
    assert_eq!(cli(&fake, &["ttl", "k"]).await.1, "-1\n");
    assert_eq!(cli(&fake, &["ttl", "gone"]).await.1, "-2\n");
    assert_eq!(cli(&fake, &["expire", "k", "10s"]).await.1, "1\n");
    let pttl: i64 = cli(&fake, &["ttl", "k"]).await.1.trim().parse().unwrap();
    assert!((9_000..=10_000).contains(&pttl), "{pttl}");
    assert_eq!(cli(&fake, &["persist", "k"]).await.1, "1\n");
    assert_eq!(cli(&fake, &["del", "k"]).await.1, "1\n");
    assert_eq!(cli(&fake, &["del", "k"]).await.1, "0\n");

    let (code, out, _) = cli(&fake, &["cluster", "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1);
    let map: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(map["epoch"], 1);
    assert_eq!(map["replication_factor"], 1);
    assert_eq!(map["nodes"][0]["addr"], fake.addr.as_str());
    assert_eq!(map["nodes"][0]["state"], "active");
    assert_eq!(
        map["partitions"].as_array().unwrap().len(),
        PARTITIONS as usize
    );
    assert_eq!(map["partitions"][0]["leader"], 1);

    // An error is one line on stderr and exit 2.
    let (code, out, err) = cli(&fake, &["incr", "n2", "--by", "9223372036854775807"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "9223372036854775807\n");
    let (code, out, err) = cli(&fake, &["incr", "n2"]).await;
    assert_eq!((code, out.as_str()), (2, ""));
    assert_eq!(
        err,
        "error: increment would overflow a signed 64-bit integer\n"
    );

    let (code, out, _) = cli(
        &fake,
        &[
            "bench",
            "--duration",
            "2s",
            "--max-ops",
            "500",
            "--keys",
            "50",
            "--concurrency",
            "4",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ops"], 500);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["preloaded"], 50);
    assert_eq!(report["hit_rate"], 1.0);
}

#[tokio::test]
async fn the_cli_reports_an_unreachable_cluster() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_raftcache"))
        .args(["--endpoints", &format!("127.0.0.1:{port}"), "get", "k"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err, format!("error: nothing listens on 127.0.0.1:{port}\n"));
}

/// A loader for `get_or_load` tests: counts its calls and how many ran at once.
#[derive(Default)]
struct CountingLoader {
    calls: AtomicU64,
    running: AtomicU64,
    max_running: AtomicU64,
}

impl CountingLoader {
    fn load(
        self: &Arc<Self>,
        value: &'static str,
        pause: Duration,
    ) -> impl FnOnce() -> futures::future::BoxFuture<'static, anyhow::Result<Bytes>> {
        let me = Arc::clone(self);
        move || {
            Box::pin(async move {
                me.calls.fetch_add(1, Ordering::SeqCst);
                let running = me.running.fetch_add(1, Ordering::SeqCst) + 1;
                me.max_running.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(pause).await;
                me.running.fetch_sub(1, Ordering::SeqCst);
                Ok(Bytes::from_static(value.as_bytes()))
            })
        }
    }
}

#[tokio::test]
async fn get_or_load_coalesces_concurrent_callers_into_one_loader_call() {
    let fake = start_fake().await;
    let client = connect(&fake).await;
    let loader = Arc::new(CountingLoader::default());
    let options = LoadOptions {
        leases: false,
        ..LoadOptions::ttl(Duration::from_secs(60))
    };
    let calls = (0..200).map(|_| {
        let client = client.clone();
        let load = loader.load("v1", Duration::from_millis(100));
        async move { client.get_or_load("hot", options, load).await }
    });
    let answers = futures::future::join_all(calls).await;
    for answer in &answers {
        let loaded = answer.as_ref().unwrap();
        assert_eq!(loaded.value, "v1");
        assert_eq!(loaded.source, LoadSource::Loader);
    }
    assert_eq!(loader.calls.load(Ordering::SeqCst), 1);
    let stats = client.load_stats();
    assert_eq!((stats.calls, stats.coalesced), (200, 199));
    // The value was cached: the next callers hit.
    let again = client
        .get_or_load("hot", options, loader.load("v2", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(
        (again.value.as_ref(), again.source),
        (&b"v1"[..], LoadSource::Cache)
    );
    assert_eq!(loader.calls.load(Ordering::SeqCst), 1);
    // Without single-flight every caller loads.
    let unprotected = LoadOptions::ttl(Duration::from_secs(60)).unprotected();
    let calls = (0..20).map(|i| {
        let client = client.clone();
        let load = loader.load("v3", Duration::from_millis(50));
        async move {
            client
                .get_or_load(format!("cold-{}", i % 2), unprotected, load)
                .await
        }
    });
    futures::future::join_all(calls).await;
    assert_eq!(loader.calls.load(Ordering::SeqCst), 21);
}

#[tokio::test]
async fn without_a_usable_cache_the_loader_runs_at_limited_concurrency() {
    // The fake has no leases: GetOrLease fails, so every flight is degraded.
    let fake = start_fake().await;
    let mut config = ClientConfig::new([fake.addr.as_str()]);
    config.load.degraded_concurrency = 3;
    let client = Client::connect(config).await.unwrap();
    let loader = Arc::new(CountingLoader::default());
    let options = LoadOptions::ttl(Duration::from_secs(60));
    let calls = (0..200).map(|i| {
        let client = client.clone();
        let load = loader.load("db", Duration::from_millis(20));
        async move {
            client
                .get_or_load(format!("k{}", i % 40), options, load)
                .await
        }
    });
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.unwrap().source, LoadSource::Degraded);
    }
    // One flight per key at a time, at most 3 loaders at once, never an error.
    assert!(loader.calls.load(Ordering::SeqCst) <= 200);
    assert!(loader.calls.load(Ordering::SeqCst) >= 40);
    assert_eq!(loader.max_running.load(Ordering::SeqCst), 3);
    let stats = client.load_stats();
    assert_eq!(stats.overloaded, 0);
    assert_eq!(stats.degraded, loader.calls.load(Ordering::SeqCst));
    // Nothing was written to the cache in degraded mode.
    assert!(fake.data.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_loader_error_reaches_every_caller_of_the_flight_and_caches_nothing() {
    let fake = start_fake().await;
    let client = connect(&fake).await;
    let options = LoadOptions {
        leases: false,
        ..LoadOptions::ttl(Duration::from_secs(60))
    };
    let calls = (0..10).map(|_| {
        let client = client.clone();
        async move {
            client
                .get_or_load("broken", options, || async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    anyhow::bail!("database is down")
                })
                .await
        }
    });
    for answer in futures::future::join_all(calls).await {
        let error = answer.unwrap_err();
        assert!(matches!(error, LoadError::Loader(_)), "{error}");
        assert!(error.to_string().contains("database is down"), "{error}");
    }
    assert_eq!(client.load_stats().loader_errors, 1);
    assert!(fake.data.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_stale_value_is_served_while_one_caller_refreshes_it() {
    let fake = start_fake().await;
    let client = connect(&fake).await;
    let loader = Arc::new(CountingLoader::default());
    // Fresh for 300 ms, then stale for 10 s more.
    let options = LoadOptions {
        leases: false,
        xfetch_beta: 0.0,
        ..LoadOptions::ttl(Duration::from_millis(300))
            .stale_while_revalidate(Duration::from_secs(10))
    };
    let first = client
        .get_or_load("page", options, loader.load("old", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(first.source, LoadSource::Loader);
    let ttl = fake
        .read(&Bytes::from_static(b"page"), true)
        .ttl_remaining_ms;
    assert!(ttl.unwrap() > 10_000, "stored for ttl + stale_ttl: {ttl:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let calls = (0..50).map(|_| {
        let client = client.clone();
        let load = loader.load("new", Duration::from_millis(200));
        async move { client.get_or_load("page", options, load).await }
    });
    for answer in futures::future::join_all(calls).await {
        let loaded = answer.unwrap();
        assert_eq!(
            (loaded.value.as_ref(), loaded.source),
            (&b"old"[..], LoadSource::Stale)
        );
    }
    // One background refresh, then the new value is served fresh.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = client
            .get_or_load("page", options, loader.load("unused", Duration::ZERO))
            .await
            .unwrap();
        if now.source == LoadSource::Cache {
            assert_eq!(now.value, "new");
            break;
        }
        assert!(Instant::now() < deadline, "the refresh never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(loader.calls.load(Ordering::SeqCst), 2);
}
