//! The sending side of the Raft transport: one tonic channel per peer node, and one
//! batcher per peer that coalesces the messages of all groups into `RaftBatch` RPCs.
//!
//! # Design
//!
//! openraft runs one replication task per (group, follower) and calls the network once
//! per append, vote or heartbeat. With one RPC per call, 64 groups × 2 followers each
//! make their own round trip and the node is CPU-bound in HTTP/2 framing. Here every call
//! becomes a [`Pending`] message on the peer's queue; the peer's batcher takes everything
//! queued (up to [`MAX_BATCH`]) as soon as one of its [`IN_FLIGHT`] slots is free and
//! sends it as one `RaftBatch`. Under load the queue fills while a batch is in flight,
//! so batches grow with the load; idle, a message leaves at once. Heartbeats are
//! triggered for all led groups at the same instant by the node's ticker
//! (`enable_heartbeat = false` in the group config), so they share one batch per peer.
//!
//! Snapshots do not go through batches: they stream in chunks on their own RPC.
//!
//! Errors: a peer that refuses connections or does not answer in time is `Unreachable`
//! (openraft backs off); a node that has no such group yet is a `Network` error (retried).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft_multi::{GroupNetworkAdapter, GroupRouter};
use raftcache_proto::tonic::transport::{Channel, Endpoint};
use raftcache_proto::v1::raft_transport_client::RaftTransportClient;
use raftcache_proto::v1::{
    ErrorCode, ErrorDetail, RaftBatch, RaftKind, RaftMessage, SnapshotChunk, SnapshotHeader,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::types::{ReplicaId, ReplicaNode, Snapshot, TypeConfig, Vote};
use crate::storage::{Clock, SystemClock};

/// A Raft group id: a partition id, or [`META_GROUP`].
pub type GroupId = u32;

/// The group id of the meta group (cluster metadata).
pub const META_GROUP: GroupId = u32::MAX;

/// Most messages in one batch.
pub const MAX_BATCH: usize = 512;
/// Batches in flight to one peer at once.
pub const IN_FLIGHT: usize = 16;
/// How long one batch RPC may take before its messages fail as unreachable.
const BATCH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Snapshot chunk size.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

/// Encodes a message for the wire.
pub fn encode<T: Serialize>(value: &T) -> Result<Bytes, String> {
    postcard::to_stdvec(value)
        .map(Bytes::from)
        .map_err(|e| format!("cannot encode raft message: {e}"))
}

/// Decodes a message from the wire.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("cannot decode raft message: {e}"))
}

/// One message waiting in a peer's queue.
struct Pending {
    message: RaftMessage,
    reply: oneshot::Sender<Result<Bytes, SendError>>,
    /// When openraft handed the message over (wall clock ms).
    created_at_ms: u64,
}

/// Why a message got no answer.
#[derive(Debug, Clone)]
enum SendError {
    /// The peer could not be reached or did not answer in time.
    Unreachable(String),
    /// The peer answered that it cannot deliver the message (no such group yet).
    Refused(String),
}

/// One peer node: its channel and its batcher's queue.
struct Peer {
    channel: Channel,
    queue: mpsc::UnboundedSender<Pending>,
}

/// The node's Raft transport, shared by all its groups (a cheap `Clone` handle).
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    /// This node's id, sent with every batch (0 until assigned).
    node_id: AtomicU64,
    /// This node's cluster id, sent with every batch and snapshot.
    cluster_id: AtomicU64,
    /// Peers (by address) that refused our messages as another cluster's: each is
    /// logged once.
    refused_by: Mutex<HashSet<String>>,
    /// Failed batches per peer, logged at most once per peer per interval.
    unreachable_log: Mutex<super::log_limit::PeerLogLimit>,
    /// Whether `unreachable_log` may hold a failing peer (a successful batch then skips
    /// the lock when it is false: the common case).
    failing: AtomicBool,
    /// Peers by address.
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    /// Published address → the address dialled instead (`cluster.peer-routes`).
    routes: HashMap<String, String>,
    /// Where each known replica lives (from membership configs).
    replicas: RwLock<HashMap<ReplicaId, String>>,
    /// Batches sent and messages in them (for metrics and benchmarks).
    batches: AtomicU64,
    messages: AtomicU64,
}

impl Default for Transport {
    fn default() -> Self {
        Self::new()
    }
}

impl Transport {
    /// A transport with no peers yet.
    pub fn new() -> Self {
        Self::with_routes(HashMap::new())
    }

    /// A transport that dials `routes[addr]` instead of `addr` where given.
    pub fn with_routes(routes: HashMap<String, String>) -> Self {
        Transport {
            inner: Arc::new(Inner {
                node_id: AtomicU64::new(0),
                cluster_id: AtomicU64::new(0),
                refused_by: Mutex::new(HashSet::new()),
                unreachable_log: Mutex::default(),
                failing: AtomicBool::new(false),
                peers: Mutex::new(HashMap::new()),
                routes,
                replicas: RwLock::new(HashMap::new()),
                batches: AtomicU64::new(0),
                messages: AtomicU64::new(0),
            }),
        }
    }

    /// Sets this node's id once it is known.
    pub fn set_node_id(&self, id: u64) {
        self.inner.node_id.store(id, Ordering::Relaxed);
    }

    /// Sets this node's cluster id once it is known.
    pub fn set_cluster_id(&self, id: u64) {
        self.inner.cluster_id.store(id, Ordering::Relaxed);
    }

    /// (batches sent, messages sent) so far.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.inner.batches.load(Ordering::Relaxed),
            self.inner.messages.load(Ordering::Relaxed),
        )
    }

    /// Records where `replica` lives.
    pub fn learn_replica(&self, replica: ReplicaId, addr: &str) {
        let known = self
            .inner
            .replicas
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&replica)
            .is_some_and(|a| a == addr);
        if !known {
            self.inner
                .replicas
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(replica, addr.to_string());
        }
    }

    fn addr_of(&self, replica: ReplicaId) -> Option<String> {
        self.inner
            .replicas
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&replica)
            .cloned()
    }

    /// The channel to the node at `addr` (created lazily, shared by every caller).
    ///
    /// # Errors
    ///
    /// When `addr` is not a valid address.
    pub fn channel(&self, addr: &str) -> Result<Channel, String> {
        Ok(self.peer(addr)?.channel.clone())
    }

    fn peer(&self, addr: &str) -> Result<Arc<Peer>, String> {
        let mut peers = self
            .inner
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(peer) = peers.get(addr) {
            return Ok(peer.clone());
        }
        let dial = self.inner.routes.get(addr).map_or(addr, String::as_str);
        let uri = if dial.contains("://") {
            dial.to_string()
        } else {
            format!("http://{dial}")
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let (queue, rx) = mpsc::unbounded_channel();
        let peer = Arc::new(Peer {
            channel: channel.clone(),
            queue,
        });
        tokio::spawn(run_batcher(
            self.inner.clone(),
            addr.to_string(),
            RaftTransportClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            rx,
        ));
        peers.insert(addr.to_string(), peer.clone());
        Ok(peer)
    }

    /// Sends one message to `target` of `group` and waits for its encoded answer.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        target: ReplicaId,
        group: GroupId,
        kind: RaftKind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let addr = self.addr_of(target).ok_or_else(|| {
            RPCError::Unreachable(Unreachable::from_string(format!(
                "no address known for replica {target}"
            )))
        })?;
        let peer = self
            .peer(&addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))?;
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            message: RaftMessage {
                group,
                target,
                kind: kind as i32,
                payload,
            },
            reply: tx,
            created_at_ms: SystemClock.now_ms(),
        };
        if peer.queue.send(pending).is_err() {
            return Err(RPCError::Unreachable(Unreachable::from_string(
                "transport stopped",
            )));
        }
        let answer = match tokio::time::timeout(option.hard_ttl(), rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(SendError::Unreachable("batcher dropped the message".into())),
            Err(_) => Err(SendError::Unreachable(format!(
                "no answer from {addr} within {:?}",
                option.hard_ttl()
            ))),
        };
        match answer {
            Ok(bytes) => {
                decode(&bytes).map_err(|e| RPCError::Network(NetworkError::from_string(e)))
            }
            Err(SendError::Unreachable(e)) => {
                Err(RPCError::Unreachable(Unreachable::from_string(e)))
            }
            Err(SendError::Refused(e)) => Err(RPCError::Network(NetworkError::from_string(e))),
        }
    }

    /// Streams a snapshot to `target` in [`SNAPSHOT_CHUNK`] pieces.
    async fn send_snapshot(
        &self,
        target: ReplicaId,
        group: GroupId,
        vote: Vote,
        snapshot: Snapshot,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let unreachable = |e: String| StreamingError::Unreachable(Unreachable::from_string(e));
        let network = |e: String| StreamingError::Network(NetworkError::from_string(e));
        let addr = self
            .addr_of(target)
            .ok_or_else(|| unreachable(format!("no address known for replica {target}")))?;
        let channel = self.channel(&addr).map_err(unreachable)?;
        let header = SnapshotHeader {
            group,
            target,
            vote: encode(&vote).map_err(network)?,
            meta: encode(&snapshot.meta).map_err(network)?,
            total_len: snapshot.snapshot.len() as u64,
            cluster_id: self.inner.cluster_id.load(Ordering::Relaxed),
        };
        let data = snapshot.snapshot;
        let mut chunks = Vec::with_capacity(data.len() / SNAPSHOT_CHUNK + 1);
        let mut offset = 0;
        loop {
            let end = (offset + SNAPSHOT_CHUNK).min(data.len());
            chunks.push(SnapshotChunk {
                header: (offset == 0).then(|| header.clone()),
                data: data.slice(offset..end),
            });
            offset = end;
            if offset >= data.len() {
                break;
            }
        }
        let mut client = RaftTransportClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let reply = client
            .install_snapshot(futures::stream::iter(chunks))
            .await
            .map_err(|s| {
                self.inner.note_refusal(&addr, &s);
                unreachable(format!("snapshot to {addr}: {}", s.message()))
            })?
            .into_inner();
        if !reply.unreachable.is_empty() {
            return Err(network(reply.unreachable));
        }
        decode(&reply.payload).map_err(network)
    }
}

/// The batcher of one peer: waits for a free slot, drains the queue into one batch,
/// sends it on its own task and hands each message its answer.
async fn run_batcher(
    inner: Arc<Inner>,
    addr: String,
    client: RaftTransportClient<Channel>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // Messages whose sender gave up (its RPC timed out while the peer was slow)
        // are not worth sending: openraft has already moved on.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        // The batch is as old as its oldest message: a receiver dates its freshness by
        // this, and a message may have waited here while the peer did not answer.
        let sent_at_ms = batch
            .iter()
            .map(|p| p.created_at_ms)
            .min()
            .unwrap_or_else(|| SystemClock.now_ms());
        inner.batches.fetch_add(1, Ordering::Relaxed);
        inner
            .messages
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut client = client.clone();
        let from_node = inner.node_id.load(Ordering::Relaxed);
        let cluster_id = inner.cluster_id.load(Ordering::Relaxed);
        let inner = inner.clone();
        let addr = addr.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (messages, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.message, p.reply)).unzip();
            let request = RaftBatch {
                from_node,
                messages,
                sent_at_ms,
                cluster_id,
            };
            let answer = tokio::time::timeout(BATCH_TIMEOUT, client.batch(request)).await;
            match answer {
                Ok(Ok(reply)) => {
                    inner.note_answer(&addr);
                    let results = reply.into_inner().results;
                    let mut results = results.into_iter();
                    for reply in replies {
                        let answer = match results.next() {
                            Some(r) if r.unreachable.is_empty() => Ok(r.payload),
                            Some(r) => Err(SendError::Refused(r.unreachable)),
                            None => Err(SendError::Refused("batch reply too short".into())),
                        };
                        let _ = reply.send(answer);
                    }
                }
                Ok(Err(status)) => {
                    inner.note_refusal(&addr, &status);
                    inner.note_failure(&addr, status.message());
                    let e = SendError::Unreachable(status.message().to_string());
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
                Err(_) => {
                    let e =
                        SendError::Unreachable(format!("batch timed out after {BATCH_TIMEOUT:?}"));
                    inner.note_failure(&addr, &format!("batch timed out after {BATCH_TIMEOUT:?}"));
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

impl Inner {
    /// Logs a failed batch to `addr`: the first at once, then one line per peer per
    /// [`PEER_LOG_INTERVAL`](super::log_limit::PEER_LOG_INTERVAL) with the count.
    /// (openraft's own per-message warnings are filtered out by default: `node::cli`.)
    fn note_failure(&self, addr: &str, error: &str) {
        let now = std::time::Instant::now();
        self.failing.store(true, Ordering::Relaxed);
        let logged = self
            .unreachable_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed(addr, now);
        if let Some(failures) = logged {
            tracing::warn!(
                peer = addr,
                failures,
                "peer {addr} unreachable: {error} ({failures} failed batch(es) since the last \
                 line; at most one line per peer every {:?})",
                super::log_limit::PEER_LOG_INTERVAL
            );
        }
    }

    /// Notes that `addr` answered a batch; logs its recovery if it had failed.
    fn note_answer(&self, addr: &str) {
        if !self.failing.load(Ordering::Relaxed) {
            return;
        }
        let recovered = self
            .unreachable_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recovered(addr);
        if recovered {
            tracing::info!(peer = addr, "peer {addr} answers again");
        }
    }

    /// Logs, once per peer, that the peer at `addr` refused our messages as another
    /// cluster's (its status carries `WRONG_CLUSTER`): the messages are then treated
    /// as undeliverable, so openraft backs off as from an unreachable peer.
    fn note_refusal(&self, addr: &str, status: &raftcache_proto::tonic::Status) {
        let wrong_cluster =
            ErrorDetail::from_status(status).is_some_and(|d| d.code() == ErrorCode::WrongCluster);
        if !wrong_cluster {
            return;
        }
        let first = self
            .refused_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr.to_string());
        if first {
            tracing::warn!(
                peer = addr,
                "the node at {addr} refuses this node's raft messages: {} (logged once per peer)",
                status.message()
            );
        }
    }
}

impl GroupRouter<TypeConfig, GroupId> for Transport {
    type SnapshotData = Bytes;

    async fn append_entries(
        &self,
        target: ReplicaId,
        group_id: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(target, group_id, RaftKind::Append, &rpc, &option)
            .await
    }

    async fn vote(
        &self,
        target: ReplicaId,
        group_id: GroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(target, group_id, RaftKind::Vote, &rpc, &option)
            .await
    }

    async fn pre_vote(
        &self,
        target: ReplicaId,
        group_id: GroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(target, group_id, RaftKind::PreVote, &rpc, &option)
            .await
    }

    async fn full_snapshot(
        &self,
        target: ReplicaId,
        group_id: GroupId,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = self.send_snapshot(target, group_id, vote, snapshot) => sent,
        }
    }

    async fn transfer_leader(
        &self,
        target: ReplicaId,
        group_id: GroupId,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(target, group_id, RaftKind::TransferLeader, &req, &option)
            .await
    }
}

/// The network factory of one group: binds the shared [`Transport`] to the group id.
#[derive(Clone)]
pub struct GroupNetwork {
    transport: Transport,
    group: GroupId,
}

impl GroupNetwork {
    /// The network of `group` over `transport`.
    pub fn new(transport: Transport, group: GroupId) -> Self {
        GroupNetwork { transport, group }
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = GroupNetworkAdapter<TypeConfig, GroupId, Transport>;

    async fn new_client(&mut self, target: ReplicaId, node: &ReplicaNode) -> Self::Network {
        self.transport.learn_replica(target, &node.addr);
        GroupNetworkAdapter::new(self.transport.clone(), target, self.group)
    }
}
