//! The replicated node: its identity, its Raft groups (one per partition replica it
//! holds, plus its replica of the meta group), and the loops that keep them matching the
//! cluster metadata.
//!
//! # How placement becomes membership
//!
//! The meta leader only edits [`ClusterMeta`] (placement, nodes, epoch). Everything else
//! is reconciled locally, every [`RECONCILE_EVERY`], by each node:
//! - a node starts an (empty, uninitialized) replica for every placement entry naming it,
//!   and stops a replica that left the placement once its group no longer counts it
//!   (or after [`UNWANTED_GRACE`]);
//! - the leader of each group compares the group's membership with the placement and
//!   takes one step at a time: add missing replicas as learners, once they caught up
//!   replace the voters (openraft's joint consensus), drop stray learners, and hand the
//!   leadership to the preferred replica (`replicas[0]`) or away from a replica that is
//!   leaving;
//! - the meta leader does the same for the meta group (voters: the first three nodes,
//!   learners: the rest) and forgets drained nodes.
//!
//! A node that restarts without persistence joins as a new node (new node id, new replica
//! ids); the old incarnation is dropped from the map when the new one takes its address,
//! so a replica never votes with state it forgot.

pub mod meta;
mod persist;

pub use persist::{PersistSettings, Restart, SnapshotStats};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftcache_proto::v1::admin_client::AdminClient;
use raftcache_proto::v1::raft_transport_client::RaftTransportClient;
use raftcache_proto::v1::{
    AddNodeRequest, AssignRequest, ClusterMapResponse, Consistency, HelloRequest,
    NodeInfo as PbNodeInfo, PartitionInfo, RemovedRequest,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::{fmt_cluster, NodeError, Result};
use crate::raft::{
    raft_config, ChangeMembers, Group, GroupId, Proposal, RaftConfig, ReadPolicy, ReplicaId,
    ReplicaNode, Tickets, Transport, WriteError, HEARTBEAT, META_GROUP,
};
use crate::storage::{
    Clock, Command, Condition, Engine, EvictionPolicy, Op, Outcome, PartitionId, ReadView,
    RequestId, StorageConfig, WriteRequest,
};
use crate::watch::{ResetReason, WatchHub};
use meta::{ClusterMeta, META_KEY};

/// How often each node reconciles its groups with the metadata.
pub const RECONCILE_EVERY: Duration = Duration::from_millis(200);
/// How long a replica that left the placement keeps running at most when no leader of
/// its group can tell whether it is still counted (normally the leader says so as soon
/// as the replica is out of the membership).
pub const UNWANTED_GRACE: Duration = Duration::from_secs(120);
/// A learner within this many entries of the leader's log counts as caught up.
const CAUGHT_UP_LAG: u64 = 64;
/// Minimum time between membership steps / leadership transfers of one group.
const STEP_INTERVAL: Duration = Duration::from_millis(500);
const TRANSFER_INTERVAL: Duration = Duration::from_secs(3);
/// Rounds of "evict, then reserve again" before a write fails with `OutOfMemory`.
const MAX_ADMISSION_ROUNDS: usize = 64;
/// Bytes freed beyond what a write needs when it has to evict (at most 1/256 of the limit).
const EVICT_HEADROOM: u64 = 256 << 10;

/// What a node needs to know to run.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The address peers and clients reach this node at.
    pub advertise: String,
    /// The storage settings (`partitions` is only used when founding a cluster).
    pub storage: StorageConfig,
    /// V, published in the map when founding a cluster.
    pub vnodes: u32,
    /// R, used when founding a cluster.
    pub replication_factor: u32,
    /// Published peer address → the address this node dials instead.
    pub peer_routes: HashMap<String, String>,
    /// Whether `Admin/InjectFault` is accepted.
    pub fault_injection: bool,
    /// What is persisted, and how often snapshots are written.
    pub persist: PersistSettings,
}

/// One node of the cluster (shared through an `Arc`).
pub struct ClusterNode {
    settings: NodeSettings,
    clock: Arc<dyn Clock>,
    transport: Transport,
    tickets: Arc<Tickets>,
    raft_config: RaftConfig,
    node_id: AtomicU64,
    /// The cluster this node belongs to (see [`ClusterNode::cluster_id`]).
    cluster_id: AtomicU64,
    /// Set once this node learns that its cluster removed it.
    removed: AtomicBool,
    /// (cluster id, node id) of peers whose messages were refused as another
    /// cluster's: each is logged once.
    refused_peers: Mutex<HashSet<(u64, u64)>>,
    engine: OnceLock<Arc<Engine>>,
    meta_engine: Arc<Engine>,
    groups: RwLock<HashMap<GroupId, Arc<Group>>>,
    meta: RwLock<Option<Arc<ClusterMeta>>>,
    /// Serialises metadata changes on the meta leader.
    meta_lock: tokio::sync::Mutex<()>,
    /// Serialises assignment (one identity per process).
    assign_lock: tokio::sync::Mutex<()>,
    /// Serialises starting replicas.
    create_lock: tokio::sync::Mutex<()>,
    /// Serialises eviction rounds of writers under `max-memory`.
    evict_lock: tokio::sync::Mutex<()>,
    assigned: tokio::sync::watch::Sender<u64>,
    started: Instant,
    shutdown: CancellationToken,
    /// Snapshot bookkeeping (persistence `snapshot` or `durable`).
    snapshots: persist::SnapshotBook,
    /// The change feed of `Watch` streams (partition replicas publish to it).
    watch: Arc<WatchHub>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("node_id", &self.node_id())
            .field("advertise", &self.settings.advertise)
            .finish_non_exhaustive()
    }
}

impl ClusterNode {
    /// A node that is not yet part of a cluster.
    ///
    /// # Errors
    ///
    /// When the Raft config is invalid (a bug).
    pub fn new(
        settings: NodeSettings,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let meta_storage = StorageConfig {
            partitions: 1,
            max_memory: 0,
            ..StorageConfig::default()
        };
        let transport = Transport::with_routes(settings.peer_routes.clone());
        Ok(Arc::new(ClusterNode {
            meta_engine: Arc::new(Engine::new(meta_storage, clock.clone())),
            settings,
            clock,
            transport,
            tickets: Arc::new(Tickets::default()),
            raft_config: raft_config().map_err(anyhow::Error::msg)?,
            node_id: AtomicU64::new(0),
            cluster_id: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            refused_peers: Mutex::new(HashSet::new()),
            engine: OnceLock::new(),
            groups: RwLock::new(HashMap::new()),
            meta: RwLock::new(None),
            meta_lock: tokio::sync::Mutex::new(()),
            assign_lock: tokio::sync::Mutex::new(()),
            create_lock: tokio::sync::Mutex::new(()),
            evict_lock: tokio::sync::Mutex::new(()),
            assigned: tokio::sync::watch::channel(0).0,
            started: Instant::now(),
            shutdown,
            snapshots: persist::SnapshotBook::default(),
            watch: Arc::new(WatchHub::default()),
        }))
    }

    /// This node's id; 0 until it is part of a cluster.
    pub fn node_id(&self) -> u64 {
        self.node_id.load(Ordering::Acquire)
    }

    /// The id of the cluster this node belongs to: random and non-zero, chosen by the
    /// node that founded the cluster and learnt by every node that joins it (0 until the
    /// node is a member, and for a cluster founded by a raftcache without cluster ids).
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id.load(Ordering::Acquire)
    }

    /// Whether this node learnt that its cluster removed it.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// `Removed` once this node was removed from its cluster: keyed requests (gRPC and
    /// RESP) are refused from then on, so callers are told to go elsewhere.
    ///
    /// # Errors
    ///
    /// `Removed`.
    pub fn serving(&self) -> Result<()> {
        if self.is_removed() {
            return Err(NodeError::Removed {
                node: self.node_id(),
                cluster: self.cluster_id(),
            });
        }
        Ok(())
    }

    /// Checks a client request routed with the map of cluster `route_cluster` (0: the
    /// client did not say): refused when this node was removed or belongs to another
    /// cluster.
    ///
    /// # Errors
    ///
    /// `Removed`, `WrongCluster`.
    pub fn check_route_cluster(&self, route_cluster: u64) -> Result<()> {
        self.serving()?;
        let mine = self.cluster_id();
        if route_cluster != 0 && route_cluster != mine && self.node_id() != 0 {
            return Err(NodeError::WrongCluster {
                what: "the request's cluster map".into(),
                got: route_cluster,
                mine,
            });
        }
        Ok(())
    }

    /// Checks a message from `from_node` of cluster `from_cluster` (a Raft batch or a
    /// snapshot): refused, and logged once per peer, when the clusters differ — a
    /// message without a cluster id (an older raftcache) too, unless this node's own
    /// cluster predates cluster ids. A node that is not a member yet holds no replica
    /// to protect (its answer is "no such group" anyway) and checks nothing.
    ///
    /// # Errors
    ///
    /// `WrongCluster`.
    pub fn check_peer_cluster(&self, from_cluster: u64, from_node: u64) -> Result<()> {
        let mine = self.cluster_id();
        if (mine == 0 && self.node_id() == 0) || from_cluster == mine {
            return Ok(());
        }
        let first = self
            .refused_peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((from_cluster, from_node));
        if first {
            warn!(
                peer_node = from_node,
                peer_cluster = %fmt_cluster(from_cluster),
                cluster = %fmt_cluster(mine),
                "refusing raft messages from node {from_node} of cluster {}: this node belongs \
                 to cluster {} (a leftover node of another cluster on a peer's address?); \
                 logged once per peer",
                fmt_cluster(from_cluster),
                fmt_cluster(mine)
            );
        }
        Err(NodeError::WrongCluster {
            what: format!("raft message from node {from_node}"),
            got: from_cluster,
            mine,
        })
    }

    /// Records that this node's cluster removed it (logged once).
    pub fn mark_removed(&self, why: &str) {
        if self.node_id() == 0 || self.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        warn!(
            node = self.node_id(),
            cluster = %fmt_cluster(self.cluster_id()),
            "node {} was removed from cluster {} ({why}); it serves no keys any more and \
             can be shut down",
            self.node_id(),
            fmt_cluster(self.cluster_id())
        );
    }

    /// A `Removed` notice from the meta leader of `cluster` (the RPC).
    ///
    /// # Errors
    ///
    /// `WrongCluster` or `InvalidArgument` when it is not about this node.
    pub fn removed_notice(&self, cluster: u64, node: u64) -> Result<()> {
        let mine = self.cluster_id();
        if cluster != mine {
            return Err(NodeError::WrongCluster {
                what: "the removal notice".into(),
                got: cluster,
                mine,
            });
        }
        if node == 0 || node != self.node_id() {
            return Err(NodeError::InvalidArgument(format!(
                "this node is node {}, not {node}",
                self.node_id()
            )));
        }
        self.mark_removed("the meta leader says so");
        Ok(())
    }

    /// The address this node advertises.
    pub fn advertise(&self) -> &str {
        &self.settings.advertise
    }

    /// The data engine, once the node is part of a cluster.
    pub fn engine(&self) -> Option<&Arc<Engine>> {
        self.engine.get()
    }

    /// Whether the node accepts `Admin/InjectFault` (`server.fault-injection`).
    pub fn fault_injection(&self) -> bool {
        self.settings.fault_injection
    }

    /// The change feed of the partition replicas hosted here (`Watch` streams).
    pub fn watch(&self) -> &Arc<WatchHub> {
        &self.watch
    }

    /// Cancelled when the node shuts down (long-lived streams end with it).
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The raft transport (metrics and the transport service).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// When the node started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The latest cluster metadata this node knows.
    pub fn meta(&self) -> Option<Arc<ClusterMeta>> {
        self.meta
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The local replica of `group`, if this node holds one.
    pub fn group(&self, group: GroupId) -> Option<Arc<Group>> {
        self.groups
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&group)
            .cloned()
    }

    fn all_groups(&self) -> Vec<Arc<Group>> {
        self.groups
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Waits until the node has an id (bootstrapped, joined or added).
    pub async fn wait_assigned(&self) -> u64 {
        let mut rx = self.assigned.subscribe();
        loop {
            let id = *rx.borrow_and_update();
            if id != 0 {
                return id;
            }
            if rx.changed().await.is_err() {
                return 0;
            }
        }
    }

    // ---- Becoming a member ---------------------------------------------------------

    /// Founds a new cluster of this one node: node 1, every partition led here.
    ///
    /// # Errors
    ///
    /// When a group cannot start or the first metadata cannot be written.
    pub async fn bootstrap(self: &Arc<Self>) -> anyhow::Result<()> {
        let storage = &self.settings.storage;
        let mut meta = ClusterMeta::bootstrap(
            &self.settings.advertise,
            storage.partitions,
            self.settings.vnodes,
            self.settings.replication_factor,
        );
        // A new cluster, a new identity: whatever runs on these addresses from an
        // earlier cluster can never be mistaken for a member of this one.
        meta.cluster_id = new_cluster_id();
        let me = 1;
        let meta_replica = meta.meta_replicas.get(&me).copied().unwrap_or(0);
        self.become_member(me, meta_replica, meta.clone()).await?;
        let node = ReplicaNode {
            addr: self.settings.advertise.clone(),
        };
        let meta_group = self
            .group(META_GROUP)
            .ok_or_else(|| anyhow::anyhow!("meta group missing after start"))?;
        meta_group
            .initialize(BTreeMap::from([(meta_replica, node.clone())]))
            .await
            .map_err(anyhow::Error::msg)?;
        wait_leader(&meta_group, Duration::from_secs(10)).await?;
        let json = serde_json::to_vec(&meta)?;
        let op = Op {
            now_ms: self.clock.now_ms(),
            cmd: Command::Set {
                key: Bytes::from_static(META_KEY),
                value: Bytes::from(json),
                expire_at_ms: None,
                keep_ttl: false,
                condition: Condition::IfAbsent,
                source_lsn: 0,
            },
        };
        meta_group
            .write(Proposal::from(op))
            .await
            .map_err(|e| anyhow::anyhow!("cannot write the first cluster metadata: {e:?}"))?;
        for (p, placement) in meta.partitions.iter().enumerate() {
            let p = p as u32;
            let Some(replica) = placement.replicas.first() else {
                continue;
            };
            let group = self.ensure_group(p, replica.id).await?;
            group
                .initialize(BTreeMap::from([(replica.id, node.clone())]))
                .await
                .map_err(anyhow::Error::msg)?;
        }
        for p in 0..meta.partition_count {
            if let Some(g) = self.group(p) {
                wait_leader(&g, Duration::from_secs(10)).await?;
            }
        }
        info!(
            partitions = meta.partition_count,
            cluster = %fmt_cluster(meta.cluster_id),
            "founded a new cluster {} as node 1",
            fmt_cluster(meta.cluster_id)
        );
        Ok(())
    }

    /// Joins the cluster through `seeds`: asks for this node's address to be added and
    /// waits to be assigned. Retries until it works or the node shuts down.
    ///
    /// # Errors
    ///
    /// When the node shuts down before it joined.
    pub async fn join(self: &Arc<Self>, seeds: &[String]) -> anyhow::Result<u64> {
        let mut delay = Duration::from_millis(100);
        loop {
            for seed in seeds {
                if self.node_id() != 0 {
                    return Ok(self.node_id());
                }
                let channel = match self.transport.channel(seed) {
                    Ok(c) => c,
                    Err(e) => anyhow::bail!("bad --join address {seed:?}: {e}"),
                };
                let mut client = AdminClient::new(channel);
                let req = AddNodeRequest {
                    addr: self.settings.advertise.clone(),
                    cluster_id: self.cluster_id(),
                };
                match tokio::time::timeout(Duration::from_secs(10), client.add_node(req)).await {
                    Ok(Ok(resp)) => {
                        let id = resp.into_inner().node_id;
                        info!(node = id, seed = %seed, "joined the cluster");
                        return Ok(self.wait_assigned().await);
                    }
                    Ok(Err(status)) => {
                        debug!(seed = %seed, "join attempt failed: {}", status.message())
                    }
                    Err(_) => debug!(seed = %seed, "join attempt timed out"),
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.shutdown.cancelled() => anyhow::bail!("shut down before joining"),
            }
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// Takes the identity the meta leader gave (the `Assign` RPC). Idempotent for the same
    /// id; refuses a second, different identity.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for a conflicting or malformed assignment.
    pub async fn assign(self: &Arc<Self>, req: AssignRequest) -> Result<u64> {
        let current = self.node_id();
        if current != 0 {
            return if current == req.node_id {
                Ok(current)
            } else {
                Err(NodeError::InvalidArgument(format!(
                    "this node is already node {current}"
                )))
            };
        }
        let meta: ClusterMeta = serde_json::from_slice(&req.meta)
            .map_err(|e| NodeError::InvalidArgument(format!("bad cluster metadata: {e}")))?;
        if req.cluster_id != meta.cluster_id {
            return Err(NodeError::InvalidArgument(format!(
                "the assignment names cluster {} but its metadata cluster {}",
                fmt_cluster(req.cluster_id),
                fmt_cluster(meta.cluster_id)
            )));
        }
        self.become_member(req.node_id, req.meta_replica, meta)
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))?;
        Ok(req.node_id)
    }

    async fn become_member(
        self: &Arc<Self>,
        node_id: u64,
        meta_replica: ReplicaId,
        meta: ClusterMeta,
    ) -> anyhow::Result<()> {
        let _guard = self.assign_lock.lock().await;
        if self.node_id() != 0 {
            anyhow::ensure!(self.node_id() == node_id, "already node {}", self.node_id());
            return Ok(());
        }
        // A new identity: whatever the data directory held belongs to an older one.
        self.persist_new_identity(node_id, meta.cluster_id)?;
        self.take_identity(node_id, meta)?;
        self.persist_replica(META_GROUP, meta_replica)?;
        self.host(META_GROUP, meta_replica, self.meta_engine.clone(), None)
            .await?;
        self.serve_as(node_id);
        Ok(())
    }

    /// The first step of joining and of a restart: the data engine for `meta`'s
    /// partitions, this node's id where it is needed, and the metadata.
    fn take_identity(&self, node_id: u64, meta: ClusterMeta) -> anyhow::Result<Arc<Engine>> {
        let storage = StorageConfig {
            partitions: meta.partition_count,
            ..self.settings.storage.clone()
        };
        anyhow::ensure!(storage.partitions > 0, "cluster metadata has no partitions");
        self.cluster_id.store(meta.cluster_id, Ordering::Release);
        self.transport.set_cluster_id(meta.cluster_id);
        let engine = self
            .engine
            .get_or_init(|| Arc::new(Engine::new(storage, self.clock.clone())))
            .clone();
        self.transport.set_node_id(node_id);
        self.tickets.set_node(node_id);
        self.install_meta(meta);
        Ok(engine)
    }

    /// Starts a replica of `group` over `engine`, empty or from `restored`, and hosts it.
    async fn host(
        &self,
        group: GroupId,
        replica: ReplicaId,
        engine: Arc<Engine>,
        restored: Option<crate::raft::disk::LoadedGroup>,
    ) -> anyhow::Result<Arc<Group>> {
        let g = Group::start(
            group,
            replica,
            self.raft_config.clone(),
            self.transport.clone(),
            engine,
            self.tickets.clone(),
            self.group_disk(restored),
            (group != META_GROUP).then(|| self.watch.clone()),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        self.groups
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(group, g.clone());
        Ok(g)
    }

    /// The last step of joining and of a restart: announce the node id, start the loops.
    fn serve_as(self: &Arc<Self>, node_id: u64) {
        self.node_id.store(node_id, Ordering::Release);
        self.assigned.send_replace(node_id);
        self.clone().spawn_loops();
    }

    fn install_meta(&self, meta: ClusterMeta) {
        if meta.cluster_id != self.cluster_id() {
            // Cannot come from this node's meta group (its peers are checked); never
            // mix another cluster's map in.
            warn!(
                "ignoring cluster metadata of cluster {}: this node belongs to cluster {}",
                fmt_cluster(meta.cluster_id),
                fmt_cluster(self.cluster_id())
            );
            return;
        }
        let mut slot = self.meta.write().unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_none_or(|m| m.epoch < meta.epoch) {
            let me = self.node_id();
            if me != 0 && !meta.nodes.contains_key(&me) {
                // Node ids are never reused: a newer map without this node means the
                // cluster removed it (`remove-node` finished).
                self.mark_removed("the cluster map no longer lists it");
            }
            for (node, n) in &meta.nodes {
                if let Some(r) = meta.meta_replicas.get(node) {
                    self.transport.learn_replica(*r, &n.addr);
                }
            }
            for p in &meta.partitions {
                for r in &p.replicas {
                    if let Some(addr) = meta.addr(r.node) {
                        self.transport.learn_replica(r.id, addr);
                    }
                }
            }
            self.persist_meta(&meta);
            *slot = Some(Arc::new(meta));
        }
    }

    /// Reads the metadata from the local meta replica into the cache if it is newer.
    fn refresh_meta(&self) -> Option<(ClusterMeta, u64)> {
        let view = self.meta_engine.get(PartitionId(0), META_KEY).ok()??;
        let meta: ClusterMeta = match serde_json::from_slice(&view.value) {
            Ok(m) => m,
            Err(e) => {
                warn!("unreadable cluster metadata in the meta group: {e}");
                return None;
            }
        };
        self.install_meta(meta.clone());
        Some((meta, view.version))
    }

    async fn ensure_group(&self, p: GroupId, replica: ReplicaId) -> anyhow::Result<Arc<Group>> {
        // One creator at a time, so the reconciler and the founder never start the same
        // replica twice (the second would replace the first).
        let _guard = self.create_lock.lock().await;
        if let Some(g) = self.group(p) {
            if g.replica == replica {
                return Ok(g);
            }
        }
        let engine = self
            .engine
            .get()
            .ok_or_else(|| anyhow::anyhow!("no engine before assignment"))?
            .clone();
        // A replica starts from nothing: stop an older replica of the partition here and
        // drop whatever data it left, before the new one applies anything.
        self.stop_group(p, None).await;
        self.persist_replica(p, replica)?;
        let group = self.host(p, replica, engine, None).await?;
        debug!(partition = p, replica, "started replica");
        Ok(group)
    }

    /// Stops the local replica of partition `p` (only if it is `expected`, when given)
    /// and empties the partition's data. Returns whether a replica was stopped.
    async fn stop_group(&self, p: GroupId, expected: Option<&Arc<Group>>) -> bool {
        let removed = {
            let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
            match (groups.get(&p), expected) {
                (Some(cur), Some(exp)) if !Arc::ptr_eq(cur, exp) => None,
                (Some(_), _) => groups.remove(&p),
                (None, _) => None,
            }
        };
        let Some(g) = removed else { return false };
        let _ = g.raft.shutdown().await;
        self.forget_replica(p);
        if p != META_GROUP {
            if let Some(engine) = self.engine.get() {
                let _ = engine.clear(PartitionId(p));
            }
            self.watch.reset(p, 0, 0, false, ResetReason::Left);
        }
        true
    }

    /// Whether the leader of `g`'s group still counts this replica, as far as it can be
    /// asked: `None` when no leader answers for the group.
    async fn still_counted(&self, g: &Group) -> Option<bool> {
        let (leader, addr) = g.leader()?;
        if leader == g.replica {
            return Some(true);
        }
        if addr.is_empty() {
            return None;
        }
        let channel = self.transport.channel(&addr).ok()?;
        let mut client = raftcache_proto::v1::cache_client::CacheClient::new(channel);
        let map = tokio::time::timeout(
            Duration::from_secs(1),
            client.cluster_map(raftcache_proto::v1::ClusterMapRequest {}),
        )
        .await
        .ok()?
        .ok()?
        .into_inner();
        let p = map.partitions.iter().find(|p| p.id == g.id)?;
        if !p.observed || p.leader != map.node_id {
            return None;
        }
        let me = self.node_id();
        Some(p.replicas.contains(&me) || p.learners.contains(&me))
    }

    // ---- Background loops ----------------------------------------------------------

    fn spawn_loops(self: Arc<Self>) {
        // One heartbeat for every led group at the same instant: the transport coalesces
        // them into one batch per peer.
        self.every(HEARTBEAT, |node| async move {
            for g in node.all_groups() {
                if g.is_leader() {
                    let _ = g.raft.trigger().heartbeat().await;
                }
            }
        });
        self.every(
            RECONCILE_EVERY,
            |node| async move { node.reconcile().await },
        );
        if self.settings.persist.store.is_some() {
            self.every(persist::SNAPSHOT_CHECK_EVERY, |node| async move {
                node.snapshot_due().await;
            });
        }
    }

    /// Runs `f` every `period` (skipping missed ticks) until the node shuts down.
    fn every<F, Fut>(self: &Arc<Self>, period: Duration, f: F)
    where
        F: Fn(Arc<Self>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let node = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = node.shutdown.cancelled() => return,
                }
                f(node.clone()).await;
            }
        });
    }

    async fn reconcile(self: &Arc<Self>) {
        self.refresh_meta();
        let Some(meta) = self.meta() else { return };
        let me = self.node_id();
        // Start replicas placed here.
        for p in 0..meta.partition_count {
            if let Some(replica) = meta.replica_on(p, me) {
                let current = self.group(p).map(|g| g.replica);
                if current != Some(replica) {
                    if let Err(e) = self.ensure_group(p, replica).await {
                        warn!(partition = p, "cannot start replica: {e}");
                    }
                }
            }
        }
        // Stop replicas that left, once their group lets them go.
        for g in self.all_groups() {
            if g.id == META_GROUP {
                continue;
            }
            let wanted = meta.replica_on(g.id, me) == Some(g.replica);
            let first = {
                let mut since = g
                    .unwanted_since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if wanted {
                    *since = None;
                    continue;
                }
                *since.get_or_insert_with(Instant::now)
            };
            let counted = g.view().counts(g.replica);
            // The group's leader knows best whether it still needs this replica (a
            // removed replica may never see the configuration that removed it).
            let released = !counted
                || (!g.is_leader()
                    && first.elapsed() > STEP_INTERVAL
                    && self.still_counted(&g).await == Some(false))
                || (!g.is_leader() && first.elapsed() > UNWANTED_GRACE);
            if released && self.stop_group(g.id, Some(&g)).await {
                info!(
                    partition = g.id,
                    replica = g.replica,
                    "stopped replica that left"
                );
            }
        }
        // Leaders move their groups toward the placement.
        for g in self.all_groups() {
            if !g.is_leader() {
                continue;
            }
            if g.id == META_GROUP {
                let voters: BTreeMap<ReplicaId, ReplicaNode> = meta
                    .meta_voters()
                    .into_iter()
                    .filter_map(|n| Some((*meta.meta_replicas.get(&n)?, node_of(&meta, n)?)))
                    .collect();
                let learners: BTreeMap<ReplicaId, ReplicaNode> = meta
                    .meta_replicas
                    .iter()
                    .filter(|(_, r)| !voters.contains_key(r))
                    .filter_map(|(&n, &r)| Some((r, node_of(&meta, n)?)))
                    .collect();
                self.step_membership(&g, voters, learners, None);
                self.clone().finish_drains(meta.clone());
            } else if let Some(placement) = meta.partitions.get(g.id as usize) {
                let voters: BTreeMap<ReplicaId, ReplicaNode> = placement
                    .replicas
                    .iter()
                    .filter_map(|r| Some((r.id, node_of(&meta, r.node)?)))
                    .collect();
                let preferred = placement.replicas.first().map(|r| r.id);
                self.step_membership(&g, voters, BTreeMap::new(), preferred);
            }
        }
    }

    /// One step of moving `g`'s membership toward (voters, learners), run by its leader.
    fn step_membership(
        &self,
        g: &Arc<Group>,
        voters: BTreeMap<ReplicaId, ReplicaNode>,
        learners: BTreeMap<ReplicaId, ReplicaNode>,
        preferred: Option<ReplicaId>,
    ) {
        if voters.is_empty() {
            return;
        }
        let view = g.view();
        let caught_up = |r: &ReplicaId| {
            *r == g.replica
                || view
                    .matched
                    .get(r)
                    .is_some_and(|&index| index + CAUGHT_UP_LAG >= view.last_index)
        };
        let current_voters = &view.voters;
        let joint = view.joint;

        // Leaving: hand the leadership to a staying voter first.
        if !voters.contains_key(&g.replica) {
            if let Some(to) = voters
                .keys()
                .find(|r| current_voters.contains(r) && caught_up(r))
            {
                transfer(g, *to);
            }
            return;
        }
        if !due(&g.last_change, STEP_INTERVAL) {
            return;
        }
        let want_all: BTreeMap<ReplicaId, ReplicaNode> = voters
            .iter()
            .chain(learners.iter())
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let missing: BTreeMap<ReplicaId, ReplicaNode> = want_all
            .iter()
            .filter(|(r, _)| !view.counts(**r))
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let want_voters: BTreeSet<ReplicaId> = voters.keys().copied().collect();
        let change = if !missing.is_empty() {
            Some(ChangeMembers::AddNodes(missing))
        } else if joint || *current_voters != want_voters {
            if want_voters.iter().all(caught_up) {
                Some(ChangeMembers::ReplaceAllVoters(want_voters))
            } else {
                None
            }
        } else {
            let stray: BTreeSet<ReplicaId> = current_voters
                .iter()
                .chain(&view.learners)
                .filter(|r| !want_all.contains_key(r))
                .copied()
                .collect();
            (!stray.is_empty()).then_some(ChangeMembers::RemoveNodes(stray))
        };
        if let Some(change) = change {
            mark(&g.last_change);
            let g = g.clone();
            tokio::spawn(async move {
                debug!(group = g.id, ?change, "membership step");
                if let Err(e) = g.raft.change_membership(change, true).await {
                    debug!(group = g.id, "membership step failed: {e}");
                }
            });
            return;
        }
        // Stable: lead from the preferred replica.
        if let Some(pref) = preferred {
            if pref != g.replica
                && current_voters.contains(&pref)
                && caught_up(&pref)
                && due(&g.last_transfer, TRANSFER_INTERVAL)
            {
                transfer(g, pref);
            }
        }
    }

    /// On the meta leader: forgets draining nodes that no longer host any replica.
    fn finish_drains(self: Arc<Self>, meta: Arc<ClusterMeta>) {
        let draining: Vec<(u64, String)> = meta
            .nodes
            .iter()
            .filter(|(_, n)| n.state == meta::NodeState::Draining)
            .map(|(&id, n)| (id, n.addr.clone()))
            .collect();
        if draining.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for (id, addr) in draining {
                let Ok(channel) = self.transport.channel(&addr) else {
                    continue;
                };
                let mut client = RaftTransportClient::new(channel);
                let mine = self.cluster_id();
                let hello = tokio::time::timeout(
                    Duration::from_secs(1),
                    client.hello(HelloRequest { cluster_id: mine }),
                )
                .await;
                let drained = match hello {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        r.node_id != id || r.cluster_id != mine || r.partitions_hosted == 0
                    }
                    _ => false,
                };
                if drained {
                    let result = self.change_meta(|m| m.forget_node(id)).await;
                    match result {
                        Ok(_) => {
                            info!(node = id, "node drained and removed");
                            // Tell it, so that it stops serving at once (it would also
                            // notice the map without it, if its meta replica got it).
                            let notice = RemovedRequest {
                                cluster_id: mine,
                                node_id: id,
                            };
                            let told = tokio::time::timeout(
                                Duration::from_secs(1),
                                client.removed(notice),
                            )
                            .await;
                            if !matches!(told, Ok(Ok(_))) {
                                debug!(node = id, "could not tell the removed node");
                            }
                        }
                        Err(e) => debug!(node = id, "cannot forget drained node yet: {e}"),
                    }
                }
            }
        });
    }

    /// Partitions with a local replica (for `Hello`).
    pub fn partitions_hosted(&self) -> u32 {
        self.groups
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .filter(|g| **g != META_GROUP)
            .count() as u32
    }

    // ---- Metadata changes (meta leader) ------------------------------------------------

    /// Applies `f` to the metadata on the meta leader (compare-and-set on its version)
    /// and returns `f`'s result with the new metadata.
    ///
    /// # Errors
    ///
    /// `NotLeader` (with the meta leader's address) on other nodes, `Unavailable` when
    /// the meta group cannot commit.
    pub async fn change_meta<T>(
        &self,
        f: impl FnOnce(&mut ClusterMeta) -> T,
    ) -> Result<(T, Arc<ClusterMeta>)> {
        let _guard = self.meta_lock.lock().await;
        let group = self
            .group(META_GROUP)
            .ok_or_else(|| NodeError::Unavailable("this node is not part of a cluster".into()))?;
        group
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map_err(|e| self.meta_write_error(e))?;
        let (mut next, version) = self
            .refresh_meta()
            .ok_or_else(|| NodeError::Unavailable("cluster metadata not readable".into()))?;
        let out = f(&mut next);
        let json = serde_json::to_vec(&next).map_err(|e| NodeError::Internal(e.to_string()))?;
        let op = Op {
            now_ms: self.clock.now_ms(),
            cmd: Command::Set {
                key: Bytes::from_static(META_KEY),
                value: Bytes::from(json),
                expire_at_ms: None,
                keep_ttl: false,
                condition: Condition::IfVersion(version),
                source_lsn: 0,
            },
        };
        match group.write(Proposal::from(op)).await {
            Ok(Some(Outcome::Set { applied: true, .. })) => {}
            Ok(_) => {
                return Err(NodeError::Unavailable(
                    "cluster metadata changed concurrently; retry".into(),
                ))
            }
            Err(e) => return Err(self.meta_write_error(e)),
        }
        let next = Arc::new(next);
        self.install_meta((*next).clone());
        Ok((out, next))
    }

    fn meta_write_error(&self, e: WriteError) -> NodeError {
        match e {
            WriteError::NotLeader(hint) => NodeError::NotLeader {
                partition: None,
                leader: hint.map(|(r, addr)| {
                    let node = self.meta().and_then(|m| m.owner(r)).unwrap_or(0);
                    (node, addr)
                }),
                epoch: self.epoch(),
            },
            WriteError::Unavailable(e) => NodeError::Unavailable(e),
        }
    }

    /// Where the meta leader is, if known and not here.
    pub fn meta_leader_addr(&self) -> Option<String> {
        let g = self.group(META_GROUP)?;
        if g.is_leader() {
            return None;
        }
        g.leader().map(|(_, addr)| addr).filter(|a| !a.is_empty())
    }

    /// Whether this node leads the meta group.
    pub fn is_meta_leader(&self) -> bool {
        self.group(META_GROUP).is_some_and(|g| g.is_leader())
    }

    /// Adds the node at `addr` (see `Admin.AddNode`), on the meta leader.
    ///
    /// # Errors
    ///
    /// `Unavailable` when the node at `addr` cannot be reached or refuses.
    pub async fn add_node(&self, addr: &str) -> Result<(u64, u64)> {
        let channel = self
            .transport
            .channel(addr)
            .map_err(NodeError::InvalidArgument)?;
        let mut client = RaftTransportClient::new(channel);
        let mine = self.cluster_id();
        let hello = tokio::time::timeout(
            Duration::from_secs(2),
            client.hello(HelloRequest { cluster_id: mine }),
        )
        .await
        .map_err(|_| NodeError::Unavailable(format!("node at {addr} did not answer")))?
        .map_err(|s| {
            NodeError::Unavailable(format!("node at {addr} unreachable: {}", s.message()))
        })?
        .into_inner();
        if hello.node_id != 0 && hello.cluster_id != mine {
            return Err(NodeError::WrongCluster {
                what: format!("the node at {addr} (node {})", hello.node_id),
                got: hello.cluster_id,
                mine,
            });
        }
        if hello.node_id != 0 && hello.removed {
            return Err(NodeError::InvalidArgument(format!(
                "the node at {addr} was node {} of this cluster and was removed; restart it \
                 (without its old data directory) to add it again",
                hello.node_id
            )));
        }
        if hello.node_id != 0 {
            let meta = self.meta();
            let known = meta
                .as_ref()
                .and_then(|m| m.nodes.get(&hello.node_id))
                .is_some_and(|n| n.addr == addr);
            if known {
                return Ok((hello.node_id, self.epoch()));
            }
            return Err(NodeError::InvalidArgument(format!(
                "the node at {addr} already belongs to a cluster as node {}",
                hello.node_id
            )));
        }
        let ((node_id, meta_replica), meta) = self.change_meta(|m| m.add_node(addr)).await?;
        let json = serde_json::to_vec(&*meta).map_err(|e| NodeError::Internal(e.to_string()))?;
        client
            .assign(AssignRequest {
                node_id,
                meta_replica,
                meta: Bytes::from(json),
                cluster_id: meta.cluster_id,
            })
            .await
            .map_err(|s| {
                NodeError::Unavailable(format!("node at {addr} refused: {}", s.message()))
            })?;
        info!(node = node_id, addr, "added node");
        Ok((node_id, meta.epoch))
    }

    /// The current epoch (0 before the node knows the map).
    pub fn epoch(&self) -> u64 {
        self.meta().map_or(0, |m| m.epoch)
    }

    // ---- The data path ---------------------------------------------------------------

    fn data_group(&self, p: PartitionId) -> Result<Arc<Group>> {
        let meta = self.meta().ok_or_else(|| {
            NodeError::Unavailable("this node is not part of a cluster yet".into())
        })?;
        if p.0 >= meta.partition_count {
            return Err(NodeError::Storage(
                crate::storage::StorageError::PartitionOutOfRange {
                    partition: p.0,
                    count: meta.partition_count,
                },
            ));
        }
        self.group(p.0).ok_or_else(|| self.not_leader(p, None))
    }

    /// The `NotLeader` error for partition `p`, with the leader's node and address when
    /// known (from the group, else the placement's preferred leader).
    fn not_leader(&self, p: PartitionId, hint: Option<(ReplicaId, String)>) -> NodeError {
        // A hint naming this very replica (openraft may still report itself as the
        // leader while it steps down or hands over) would send the client back here.
        let own = self.group(p.0).map(|g| g.replica);
        let hint = hint.filter(|(r, _)| Some(*r) != own);
        let meta = self.meta();
        let leader = match (hint, &meta) {
            (Some((r, addr)), Some(m)) => m.owner(r).map(|n| {
                let addr = if addr.is_empty() {
                    m.addr(n).unwrap_or_default().to_string()
                } else {
                    addr
                };
                (n, addr)
            }),
            (None, Some(m)) => m
                .partitions
                .get(p.0 as usize)
                .and_then(|pl| pl.replicas.first())
                .filter(|r| r.node != self.node_id())
                .and_then(|r| Some((r.node, m.addr(r.node)?.to_string()))),
            _ => None,
        };
        NodeError::NotLeader {
            partition: Some(p.0),
            leader,
            epoch: meta.map_or(0, |m| m.epoch),
        }
    }

    fn map_write_error(&self, p: PartitionId, e: WriteError) -> NodeError {
        match e {
            WriteError::NotLeader(hint) => self.not_leader(p, hint),
            WriteError::Unavailable(e) => NodeError::Unavailable(e),
        }
    }

    /// The storage engine, or `Unavailable` while the node has not joined a cluster.
    pub(crate) fn data_engine(&self) -> Result<&Arc<Engine>> {
        self.engine
            .get()
            .ok_or_else(|| NodeError::Unavailable("this node is not part of a cluster yet".into()))
    }

    /// A write to partition `p`, proposed through its Raft group (leader only).
    ///
    /// # Errors
    ///
    /// `NotLeader`, `Unavailable`, and the storage errors of the write.
    pub async fn write(&self, p: PartitionId, req: WriteRequest) -> Result<Outcome> {
        self.write_once(p, req, None).await
    }

    /// [`write`](Self::write) of a client request identified by `request`: applied at
    /// most once per id, a retry answers the first outcome.
    ///
    /// # Errors
    ///
    /// As [`write`](Self::write).
    pub async fn write_once(
        &self,
        p: PartitionId,
        req: WriteRequest,
        request: Option<RequestId>,
    ) -> Result<Outcome> {
        let group = self.data_group(p)?;
        if !group.is_leader() {
            return Err(self.not_leader(p, group.leader()));
        }
        let engine = self.data_engine()?;
        let op = engine.prepare(req)?;
        let reserved = self.admit(engine, p, &op).await?;
        let ticket = self.tickets.issue(reserved);
        let proposal = Proposal {
            op,
            origin: self.node_id(),
            ticket,
            request,
        };
        let result = group.write(proposal).await;
        // The apply took the reservation if it happened here; give back what is left.
        engine.release(self.tickets.take(self.node_id(), ticket));
        match result {
            Ok(Some(Outcome::Incr(Err(e)))) => Err(NodeError::Storage(e.into())),
            Ok(Some(outcome)) => Ok(outcome),
            Ok(None) => Err(NodeError::Internal(
                "write applied without an outcome".into(),
            )),
            Err(e) => Err(self.map_write_error(p, e)),
        }
    }

    /// Reserves memory for `op`, evicting (through Raft) from partitions led here when the
    /// policy allows. Returns the bytes reserved.
    async fn admit(&self, engine: &Arc<Engine>, p: PartitionId, op: &Op) -> Result<u64> {
        let mut needed = match engine.reserve_for(p, op)? {
            Ok(reserved) => return Ok(reserved),
            Err(needed) => needed,
        };
        if engine.config().policy == EvictionPolicy::NoEviction {
            return Err(engine.out_of_memory(needed).into());
        }
        // One evictor at a time: concurrent writers would pick the same victims and each
        // believe it freed them. The others wait here and usually find room afterwards.
        let _evicting = self.evict_lock.lock().await;
        for _ in 0..MAX_ADMISSION_ROUNDS {
            needed = match engine.reserve_for(p, op)? {
                Ok(reserved) => return Ok(reserved),
                Err(needed) => needed,
            };
            // Free a little more than this write needs, so that one Evict proposal per
            // partition makes room for many writes (each proposal is a Raft round).
            let headroom = (engine.config().max_memory / 256).min(EVICT_HEADROOM);
            let to_free = engine.shortfall(needed) + headroom;
            let leads = |q: PartitionId| self.group(q.0).is_some_and(|g| g.is_leader());
            let writing = op.cmd.key().map(|k| (p, k.as_ref()));
            let victims = engine.pick_victims(to_free, op.now_ms, writing, &leads);
            if victims.is_empty() {
                return Err(engine.out_of_memory(needed).into());
            }
            let mut by_partition: BTreeMap<u32, Vec<Bytes>> = BTreeMap::new();
            for (q, key) in victims {
                by_partition.entry(q.0).or_default().push(key);
            }
            for (q, keys) in by_partition {
                let Some(g) = self.group(q) else { continue };
                let evict = Op {
                    now_ms: op.now_ms,
                    cmd: Command::Evict { keys },
                };
                if let Err(e) = g.write(Proposal::from(evict)).await {
                    debug!(partition = q, "eviction not applied: {e:?}");
                }
            }
        }
        Err(engine.out_of_memory(needed).into())
    }

    /// Proposes a `Reclaim` for every led partition with due deadlines.
    pub async fn reclaim_expired(&self, max_per_partition: usize) -> usize {
        let Some(engine) = self.engine.get() else {
            return 0;
        };
        let now_ms = self.clock.now_ms();
        let mut removed = 0;
        for p in engine.due_for_reclaim(now_ms) {
            let Some(g) = self.group(p.0).filter(|g| g.is_leader()) else {
                continue;
            };
            let op = Op {
                now_ms,
                cmd: Command::Reclaim {
                    max: max_per_partition,
                },
            };
            if let Ok(Some(Outcome::Reclaimed(n))) = g.write(Proposal::from(op)).await {
                removed += n;
            }
        }
        removed
    }

    /// Empties partition `p` while this node leads it (Redis `FLUSHALL`): `Evict` ops
    /// of up to `chunk` of its keys, at most `rounds` of them (keys written meanwhile may
    /// survive a flush that runs out of rounds). Returns the keys removed.
    ///
    /// # Errors
    ///
    /// `NotLeader`, `Unavailable`, and the errors of the Raft write.
    pub async fn flush_partition(
        &self,
        p: PartitionId,
        chunk: usize,
        rounds: usize,
    ) -> Result<u64> {
        let engine = self.data_engine()?;
        let mut removed = 0;
        for _ in 0..rounds {
            let group = self.data_group(p)?;
            if !group.is_leader() {
                return Err(self.not_leader(p, group.leader()));
            }
            let keys = engine.partition_keys(p, chunk);
            if keys.is_empty() {
                break;
            }
            let op = Op {
                now_ms: self.clock.now_ms(),
                cmd: Command::Evict { keys },
            };
            match group.write(Proposal::from(op)).await {
                Ok(Some(Outcome::Evicted(n))) => removed += n as u64,
                Ok(_) => {}
                Err(e) => return Err(self.map_write_error(p, e)),
            }
        }
        Ok(removed)
    }

    /// A read of `key` in partition `p` at the requested consistency.
    ///
    /// # Errors
    ///
    /// `NotLeader` (with a hint) when this replica cannot serve the read, `Unavailable`,
    /// the key checks.
    pub async fn read(
        &self,
        p: PartitionId,
        key: &[u8],
        consistency: Consistency,
        max_staleness: Duration,
    ) -> Result<Option<ReadView>> {
        self.read_ready(p, consistency, max_staleness).await?;
        Ok(self.data_engine()?.get(p, key)?)
    }

    /// Waits until the local replica of `p` has applied CDC up to `min_lsn` (its
    /// watermark), for at most `wait`. `min_lsn = 0` never waits.
    ///
    /// # Errors
    ///
    /// `LsnNotReached` with the watermark when `wait` passes first; `Unavailable`.
    pub async fn wait_cdc(&self, p: PartitionId, min_lsn: u64, wait: Duration) -> Result<()> {
        if min_lsn == 0 {
            return Ok(());
        }
        let engine = self.data_engine()?;
        let deadline = tokio::time::Instant::now() + wait;
        // Polling with a short, growing pause: waits are rare and short (about one CDC
        // round), and applies then need no notification hook.
        let mut pause = Duration::from_micros(500);
        loop {
            let at = engine.cdc_watermark(p).ok_or_else(|| {
                NodeError::InvalidArgument(format!("partition {} does not exist", p.0))
            })?;
            if at >= min_lsn {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(NodeError::LsnNotReached {
                    partition: p.0,
                    wanted: min_lsn,
                    watermark: at,
                });
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Reads `key` of partition `p` from the local state, after
    /// [`read_ready`](Self::read_ready).
    ///
    /// # Errors
    ///
    /// The key checks; `Unavailable` before the node joined.
    pub fn read_local(&self, p: PartitionId, key: &[u8]) -> Result<Option<ReadView>> {
        Ok(self.data_engine()?.get(p, key)?)
    }

    /// Waits until this replica may serve a read of `p` at `consistency`.
    ///
    /// # Errors
    ///
    /// `NotLeader` with a hint, `Unavailable`.
    pub async fn read_ready(
        &self,
        p: PartitionId,
        consistency: Consistency,
        max_staleness: Duration,
    ) -> Result<()> {
        let group = self.data_group(p)?;
        match consistency {
            Consistency::Linearizable | Consistency::Lease | Consistency::Unspecified => {
                let policy = if consistency == Consistency::Linearizable {
                    ReadPolicy::ReadIndex
                } else {
                    ReadPolicy::LeaseRead
                };
                if !group.is_leader() {
                    return Err(self.not_leader(p, group.leader()));
                }
                if policy == ReadPolicy::LeaseRead && group.lease_read_ready() {
                    return Ok(());
                }
                group
                    .ensure_linearizable(policy)
                    .await
                    .map_err(|e| self.map_write_error(p, e))?;
            }
            Consistency::Follower => {
                // A leader serves it under its lease (a deposed leader that has not
                // noticed yet has no lease); a follower when it heard from its leader
                // within `max_staleness` and applied what that leader had committed.
                let leased = group.is_leader()
                    && group
                        .ensure_linearizable(ReadPolicy::LeaseRead)
                        .await
                        .is_ok();
                let staleness = group.staleness();
                let fresh = leased || staleness.is_some_and(|s| s <= max_staleness);
                debug!(partition = p.0, leased, ?staleness, fresh, "follower read");
                if !fresh {
                    return Err(self.not_leader(p, group.leader()));
                }
            }
        }
        Ok(())
    }

    // ---- Cluster map -------------------------------------------------------------------

    /// The cluster map as this node sees it: placement from the metadata, and live
    /// leader, term, voters, learners and applied index for the partitions held here.
    pub fn cluster_map(&self) -> ClusterMapResponse {
        let Some(meta) = self.meta() else {
            return ClusterMapResponse {
                node_id: self.node_id(),
                ..Default::default()
            };
        };
        // A removed node still tells clients where the cluster is (its last map), but
        // never lists itself or claims a live replica.
        let removed = self.is_removed();
        let me = self.node_id();
        let nodes = meta
            .nodes
            .iter()
            .filter(|(&id, _)| !removed || id != me)
            .map(|(&id, n)| PbNodeInfo {
                id,
                addr: n.addr.clone(),
                state: n.state.as_str().to_string(),
            })
            .collect();
        let partitions = meta
            .partitions
            .iter()
            .enumerate()
            .map(|(p, placement)| {
                let p = p as u32;
                let placed: Vec<u64> = placement
                    .replicas
                    .iter()
                    .map(|r| r.node)
                    .filter(|n| !removed || *n != me)
                    .collect();
                match self.group(p).filter(|_| !removed) {
                    Some(g) => {
                        let view = g.view();
                        let owner = |r: &ReplicaId| meta.owner(*r).unwrap_or(0);
                        PartitionInfo {
                            id: p,
                            leader: view.leader.as_ref().map_or(0, owner),
                            replicas: view.voters.iter().map(owner).collect(),
                            term: view.term,
                            applied: view.applied,
                            learners: view.learners.iter().map(owner).collect(),
                            observed: true,
                            cdc_lsn: self
                                .engine
                                .get()
                                .and_then(|e| e.cdc_watermark(PartitionId(p)))
                                .unwrap_or(0),
                        }
                    }
                    None => PartitionInfo {
                        id: p,
                        leader: placed.first().copied().unwrap_or(0),
                        replicas: placed,
                        term: 0,
                        applied: 0,
                        learners: Vec::new(),
                        observed: false,
                        cdc_lsn: 0,
                    },
                }
            })
            .collect();
        ClusterMapResponse {
            epoch: meta.epoch,
            partition_count: meta.partition_count,
            vnodes: meta.vnodes,
            nodes,
            partitions,
            node_id: self.node_id(),
            replication_factor: meta.replication_factor,
            cluster_id: meta.cluster_id,
        }
    }

    /// Whether this node is a leader of `p` (for tests and metrics).
    pub fn leads(&self, p: u32) -> bool {
        self.group(p).is_some_and(|g| g.is_leader())
    }

    /// Stops every group (graceful shutdown); with persistence, then writes the
    /// checkpoint that makes the restart exact and marks the directory clean.
    pub async fn shutdown_groups(&self) {
        let groups: Vec<Arc<Group>> = self
            .groups
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, g)| g)
            .collect();
        for g in &groups {
            let _ = g.raft.shutdown().await;
        }
        self.checkpoint(&groups).await;
    }
}

/// A new cluster id: random, never 0 (0 means "no id").
fn new_cluster_id() -> u64 {
    rand::random::<u64>().max(1)
}

fn node_of(meta: &ClusterMeta, node: u64) -> Option<ReplicaNode> {
    Some(ReplicaNode {
        addr: meta.addr(node)?.to_string(),
    })
}

fn due(slot: &std::sync::Mutex<Option<Instant>>, every: Duration) -> bool {
    slot.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .is_none_or(|t| t.elapsed() >= every)
}

fn mark(slot: &std::sync::Mutex<Option<Instant>>) {
    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
}

fn transfer(g: &Arc<Group>, to: ReplicaId) {
    if !due(&g.last_transfer, TRANSFER_INTERVAL) {
        return;
    }
    mark(&g.last_transfer);
    let g = g.clone();
    tokio::spawn(async move {
        debug!(group = g.id, to, "leadership transfer");
        let _ = g.raft.trigger().transfer_leader(to).await;
    });
}

async fn wait_leader(g: &Group, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if g.is_leader() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("group {} elected no leader within {timeout:?}", g.id)
}
